"""MinHash signatures: parity with a pure-Python reference, unbiased estimates, and the LSH S-curve."""

import numpy as np
import pytest

from data_pipeline.dedup.minhash import (MinHasher, band_keys, char_ngram_jaccard, detection_probability,
                                         estimate_jaccard, permutation_params)

M64 = (1 << 64) - 1
KANJI = [chr(c) for c in range(0x4E00, 0x4E00 + 2000)] + [chr(c) for c in range(0x3041, 0x3097)]


def _splitmix(h: int) -> int:
    h ^= h >> 30
    h = (h * 0xBF58476D1CE4E5B9) & M64
    h ^= h >> 27
    h = (h * 0x94D049BB133111EB) & M64
    return h ^ (h >> 31)


def reference_signature(text: str, n: int, num_perm: int, seed: int) -> list[int]:
    """The documented scheme, one shingle and one hash function at a time in Python integers."""
    a = permutation_params(num_perm, seed)
    cps = [ord(c) for c in text]
    if not cps:
        return [0xFFFFFFFF] * num_perm
    if len(cps) < n:
        cps = cps + [0] * (n - len(cps))
    shingles = []
    for i in range(len(cps) - n + 1):
        h = 0
        for c in cps[i:i + n]:
            h = (h * 0x100000001B3 + c) & M64
        shingles.append((_splitmix(h) >> 32) | 1)
    return [min((int(a[k]) * x) & 0xFFFFFFFF for x in shingles) for k in range(num_perm)]


def random_text(rng, length: int) -> str:
    return "".join(rng.choice(KANJI, length))


def mutate(rng, text: str, substitutions: int) -> str:
    chars = list(text)
    for pos in rng.choice(len(chars), substitutions, replace=False):
        chars[pos] = KANJI[rng.integers(len(KANJI))]
    return "".join(chars)


def test_signature_matches_python_reference():
    hasher = MinHasher(ngram=5, bands=4, rows=8, seed=7)
    texts = ["吾輩は猫である。名前はまだ無い。", "abc", "", "🍣寿司🍣と天ぷら", "x" * 40, "日本語の文章です。" * 30]
    sig = hasher.signatures(texts)
    assert sig.dtype == np.uint32 and sig.shape == (len(texts), 32)
    for row, text in zip(sig, texts):
        assert row.tolist() == reference_signature(text, 5, 32, 7)


def test_signature_independent_of_batching():
    rng = np.random.default_rng(1)
    texts = [random_text(rng, int(rng.integers(0, 1500))) for _ in range(30)]
    hasher = MinHasher()
    together = hasher.signatures(texts)
    alone = np.concatenate([hasher.signatures([t]) for t in texts])
    assert np.array_equal(together, alone)


def test_band_keys_equal_exactly_when_band_values_equal():
    rng = np.random.default_rng(2)
    sig = rng.integers(0, 2**32, (6, 12), dtype=np.uint64).astype(np.uint32)
    sig[1] = sig[0]
    sig[2, :4] = sig[0, :4]  # shares band 0 only
    keys = band_keys(sig, bands=3, rows=4)
    assert keys.shape == (3, 6) and keys.dtype == np.uint64
    assert (keys[:, 1] == keys[:, 0]).all()
    assert keys[0, 2] == keys[0, 0] and (keys[1:, 2] != keys[1:, 0]).all()
    assert len(np.unique(keys[:, 3:])) == 9


def test_short_and_empty_texts():
    hasher = MinHasher(bands=2, rows=2)
    sig = hasher.signatures(["", "", "ab", "ab", "abc"])
    assert (sig[0] == 0xFFFFFFFF).all() and np.array_equal(sig[0], sig[1])
    assert np.array_equal(sig[2], sig[3]) and not np.array_equal(sig[2], sig[4])


def test_estimate_is_unbiased_with_binomial_spread():
    rng = np.random.default_rng(3)
    hasher = MinHasher(ngram=5, bands=40, rows=20)
    z = []
    for _ in range(80):
        base = random_text(rng, 600)
        other = mutate(rng, base, int(rng.integers(5, 120)))
        j = char_ngram_jaccard(base, other)
        s = hasher.signatures([base, other])
        z.append((estimate_jaccard(s[0], s[1]) - j) / np.sqrt(j * (1 - j) / 800))
    z = np.array(z)
    # 80 z-scores of an unbiased estimator with binomial variance: mean ~ N(0, 1/80), std ~ 1
    assert abs(z.mean()) < 4 / np.sqrt(80)
    assert 0.75 < z.std() < 1.3


@pytest.mark.parametrize("bands,rows", [(40, 20), (14, 8)])
def test_detection_rate_follows_s_curve(bands, rows):
    """Families of near-duplicates with controlled edit rates: per-Jaccard-bucket detection ~ 1-(1-s^r)^b."""
    rng = np.random.default_rng(4 + bands)
    hasher = MinHasher(ngram=5, bands=bands, rows=rows)
    lo = 0.6 if rows == 20 else 0.3
    pairs_j, detected = [], []
    for _ in range(120):  # 120 families x 5 variants = 600 pairs
        base = random_text(rng, 400)
        # target Jaccard uniform in [lo, 1]: k isolated substitutions turn 5k of ~400 5-grams into new ones,
        # so J ~ (400 - 5k) / (400 + 5k); the measured exact Jaccard is what the buckets use
        targets = rng.uniform(lo, 1.0, 5)
        variants = [mutate(rng, base, max(1, round(400 * (1 - t) / (5 * (1 + t))))) for t in targets]
        sig = hasher.signatures([base, *variants])
        keys = hasher.band_keys(sig)
        for v, text in enumerate(variants, 1):
            pairs_j.append(char_ngram_jaccard(base, text))
            detected.append(bool((keys[:, v] == keys[:, 0]).any()))
    pairs_j, detected = np.array(pairs_j), np.array(detected)
    edges = np.linspace(lo, 1.0, 9)
    checked = 0
    for a, b in zip(edges[:-1], edges[1:]):
        sel = (pairs_j >= a) & (pairs_j < b)
        if sel.sum() < 20:
            continue
        p = detection_probability(pairs_j[sel], bands, rows)
        expected, sd = p.sum(), np.sqrt((p * (1 - p)).sum())
        observed = detected[sel].sum()
        # a sum of independent Bernoullis: 4 standard deviations (+1 for discreteness) is the sampling error bound
        assert abs(observed - expected) <= 4 * sd + 1, (a, b, observed, expected, sd)
        checked += 1
    assert checked >= 5
    if (bands, rows) == (40, 20):
        high = pairs_j >= 0.9
        assert high.sum() >= 50 and detected[high].mean() >= 0.9
        assert detected[pairs_j < 0.65].mean() < 0.15 if (pairs_j < 0.65).sum() else True


def test_exact_duplicates_always_detected():
    rng = np.random.default_rng(5)
    texts = [random_text(rng, int(rng.integers(1, 800))) for _ in range(50)]
    hasher = MinHasher()
    keys = hasher.band_keys(hasher.signatures(texts + texts))
    assert (keys[:, :50] == keys[:, 50:]).all()
