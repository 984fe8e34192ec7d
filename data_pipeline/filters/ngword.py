"""NG-word ratio (Swallow `ngword.py`): greedy longest-match scan with an Aho-Corasick automaton.

The reference walks the text left to right; at each position it takes the longest list word starting there and
jumps past it, otherwise it moves one character. `num_ng_letters` = characters of the words taken;
`ng_fraction` = num_ng_letters / num_japanese_letters; a document is kept iff ng_fraction < 0.05.
Aho-Corasick reports every occurrence at once; keeping the longest per start and scanning the starts in order with
the same jump reproduces the reference exactly, in C for the text scan.
"""

from __future__ import annotations

from pathlib import Path

import ahocorasick
import numpy as np

from hibari.errors import HibariError

ASSET_DIR = Path(__file__).resolve().parents[1] / "corpus" / "assets"
# the lists Swallow Corpus v1 used (MosasoM/inappropriate-words-ja, MIT; licence next to them)
DEFAULT_NG_FILES = tuple(ASSET_DIR / "ng-words" / name for name in
                         ("Offensive.txt", "Sexual.txt", "Sexual_with_bopo.txt", "Sexual_with_mask.txt"))


def read_word_files(paths) -> list[str]:
    """Words of one-word-per-line files (a directory means its *.txt files except LICENSE*)."""
    words: set[str] = set()
    for raw in paths:
        path = Path(raw)
        files = sorted(p for p in path.glob("*.txt") if not p.name.upper().startswith("LICENSE")) \
            if path.is_dir() else [path]
        for file in files:
            try:
                text = file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as err:
                raise HibariError(f"NG word list {file}: cannot read as UTF-8 text ({err})") from None
            words.update(line.rstrip("\r") for line in text.split("\n"))
    words.discard("")
    return sorted(words)


class NGWordMatcher:
    def __init__(self, words):
        self.words = sorted(set(w for w in words if w))
        self._automaton = ahocorasick.Automaton()
        for w in self.words:
            self._automaton.add_word(w, len(w))
        if self.words:
            self._automaton.make_automaton()
        self._starts = None  # lookup tables of num_ng_letters_batch, built on first use

    @classmethod
    def from_files(cls, paths) -> "NGWordMatcher":
        return cls(read_word_files(paths))

    @classmethod
    def default(cls) -> "NGWordMatcher":
        global _DEFAULT
        if _DEFAULT is None:
            _DEFAULT = cls.from_files(DEFAULT_NG_FILES)
        return _DEFAULT

    def matches(self, text: str) -> list[tuple[int, str]]:
        """(start, word) of the words the greedy longest-match scan takes."""
        if not self.words:
            return []
        longest: dict[int, int] = {}
        for end, length in self._automaton.iter(text):
            start = end - length + 1
            if length > longest.get(start, 0):
                longest[start] = length
        taken = []
        pos = 0
        for start in sorted(longest):
            if start >= pos:
                length = longest[start]
                taken.append((start, text[start: start + length]))
                pos = start + length
        return taken

    def num_ng_letters_batch(self, texts: list[str]) -> list[int]:
        """`[self.num_ng_letters(t) for t in texts]`, exactly, for many texts at once (~4x faster at ~1,000
        characters per text): numpy finds the few positions where a word can start (a one-character word, a
        two-character word, or a longer word's first three characters), only those are checked against the word
        set (longest word first, never past the end of their own text), then the same greedy left-to-right jump."""
        counts = [0] * len(texts)
        if not self.words or not texts:
            return counts
        if self._starts is None:
            self._prepare_batch()
        single, first, second, pair_keys, pair_words, triple_keys, lengths_by_pair, words = self._starts
        joined = "".join(texts)
        cp = np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        if not len(cp):
            return counts
        cand = single[cp]
        if len(pair_keys) and len(cp) > 1:
            # cheap table look-ups narrow the positions, then the exact pair test on the few left
            maybe = np.flatnonzero(first[cp[:-1]] & second[cp[1:]])
            key = (cp[maybe].astype(np.uint64) << np.uint64(21)) | cp[maybe + 1]
            maybe = maybe[_isin_sorted(key, pair_keys)]
            # ... and then: the pair is a word, or the first three characters start a longer word
            key = (cp[maybe].astype(np.uint64) << np.uint64(21)) | cp[maybe + 1]
            third = cp[np.minimum(maybe + 2, len(cp) - 1)]  # past the end: a false candidate at worst
            longer = _isin_sorted((key << np.uint64(21)) | third, triple_keys)
            cand[maybe[longer | _isin_sorted(key, pair_words)]] = True
        positions = np.flatnonzero(cand)
        if not len(positions):
            return counts
        ends = np.cumsum(np.fromiter(map(len, texts), dtype=np.int64, count=len(texts)))
        doc_of = np.searchsorted(ends, positions, side="right")
        pos = 0
        for p, d in zip(positions.tolist(), doc_of.tolist()):
            if p < pos:
                continue
            limit = int(ends[d]) - p  # a word must end inside its own text
            longest = 0
            for length in lengths_by_pair.get(joined[p:p + 2], ()):
                if length <= limit and joined[p:p + length] in words:
                    longest = length
                    break
            if not longest and joined[p] in words:
                longest = 1
            if longest:
                counts[d] += longest
                pos = p + longest
        return counts

    def _prepare_batch(self) -> None:
        single = np.zeros(0x110000, dtype=bool)
        lengths: dict[str, set[int]] = {}
        for w in self.words:
            if len(w) == 1:
                single[ord(w)] = True
            else:
                lengths.setdefault(w[:2], set()).add(len(w))
        first = np.zeros(0x110000, dtype=bool)
        second = np.zeros(0x110000, dtype=bool)
        for k in lengths:
            first[ord(k[0])] = True
            second[ord(k[1])] = True

        def keys(strings):  # up to 3 characters as one integer, 21 bits each
            out = []
            for x in strings:
                key = 0
                for c in x:
                    key = (key << 21) | ord(c)
                out.append(key)
            return np.array(sorted(set(out)), dtype=np.uint64)

        pair_keys = keys(lengths)
        pair_words = keys(w for w in self.words if len(w) == 2)
        triple_keys = keys(w[:3] for w in self.words if len(w) >= 3)
        lengths_by_pair = {k: sorted(v, reverse=True) for k, v in lengths.items()}
        self._starts = (single, first, second, pair_keys, pair_words, triple_keys, lengths_by_pair,
                        frozenset(self.words))

    def num_ng_letters(self, text: str) -> int:
        return sum(len(w) for _, w in self.matches(text))

    def stat(self, text: str, num_japanese_letters: int) -> dict[str, float]:
        n = self.num_ng_letters(text)
        return {"num_ng_letters": n, "ng_fraction": n / num_japanese_letters if num_japanese_letters > 0 else 0.0}


_DEFAULT: NGWordMatcher | None = None


def _isin_sorted(values: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    if not len(sorted_keys):
        return np.zeros(len(values), dtype=bool)
    at = np.searchsorted(sorted_keys, values)
    np.minimum(at, len(sorted_keys) - 1, out=at)
    return sorted_keys[at] == values
