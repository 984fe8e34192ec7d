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

from launch.errors import HibariError

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

    def num_ng_letters(self, text: str) -> int:
        return sum(len(w) for _, w in self.matches(text))

    def stat(self, text: str, num_japanese_letters: int) -> dict[str, float]:
        n = self.num_ng_letters(text)
        return {"num_ng_letters": n, "ng_fraction": n / num_japanese_letters if num_japanese_letters > 0 else 0.0}


_DEFAULT: NGWordMatcher | None = None
