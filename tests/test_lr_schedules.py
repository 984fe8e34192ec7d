"""Golden values of the LR schedules (hand-computed from the formulas in megatron_ext/train/lr.py's docstring)."""

import math

import pytest

from megatron_ext.train.config import LRConfig
from megatron_ext.train.lr import lr_at


def test_cosine_warmup_golden():
    cfg = LRConfig(schedule="cosine", lr=1e-3, min_lr=1e-4, warmup_steps=4)
    got = [lr_at(s, cfg, 12) for s in range(14)]
    c = lambda p: 1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi * p))  # noqa: E731
    want = [2.5e-4, 5e-4, 7.5e-4, 1e-3,              # warmup: (s + 1) / 4 of the peak, never 0
            1e-3, c(1 / 8), c(2 / 8), c(3 / 8), 5.5e-4, c(5 / 8), c(6 / 8), c(7 / 8),
            1e-4, 1e-4]                               # past the decay: min_lr
    assert got == pytest.approx(want, rel=1e-12, abs=0)
    assert got[6] == pytest.approx(8.681980515339464e-4, rel=1e-12)


def test_cosine_explicit_decay_steps_and_warmup_init():
    cfg = LRConfig(schedule="cosine", lr=2e-4, min_lr=0.0, warmup_steps=2, warmup_init_lr=1e-4, decay_steps=2)
    got = [lr_at(s, cfg, 100) for s in range(6)]
    assert got == pytest.approx([1.5e-4, 2e-4, 2e-4, 1e-4, 0.0, 0.0], abs=1e-18)


def test_wsd_linear_golden():
    cfg = LRConfig(schedule="wsd", lr=1e-3, min_lr=0.0, warmup_steps=2, decay_steps=4, wsd_decay_shape="linear")
    got = [lr_at(s, cfg, 10) for s in range(10)]
    assert got == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 7.5e-4, 5e-4, 2.5e-4, 0.0], abs=1e-18)


def test_wsd_one_minus_sqrt_default_fraction():
    cfg = LRConfig(schedule="wsd", lr=1e-3, min_lr=1e-4, warmup_steps=0, wsd_decay_fraction=0.25)
    got = [lr_at(s, cfg, 8) for s in range(8)]  # decay phase = last 2 of 8 steps
    want = [1e-3] * 6 + [1e-4 + 9e-4 * (1 - math.sqrt(0.5)), 1e-4]
    assert got == pytest.approx(want, rel=1e-12)


def test_wsd_cosine_shape_ends_at_min():
    cfg = LRConfig(schedule="wsd", lr=1e-3, min_lr=2e-4, decay_steps=2, wsd_decay_shape="cosine")
    assert [lr_at(s, cfg, 4) for s in range(4)] == pytest.approx([1e-3, 1e-3, 6e-4, 2e-4], rel=1e-12)


def test_constant_with_warmup():
    cfg = LRConfig(schedule="constant", lr=3e-4, warmup_steps=3)
    assert [lr_at(s, cfg, 10) for s in range(5)] == pytest.approx([1e-4, 2e-4, 3e-4, 3e-4, 3e-4], rel=1e-12)


def test_bad_lr_config_is_rejected():
    with pytest.raises(ValueError, match="min_lr"):
        LRConfig(lr=1e-4, min_lr=1e-3)
    with pytest.raises(ValueError):
        lr_at(-1, LRConfig(), 10)
