"""Named random streams: deterministic, distinct per name and key, and the only way privtune seeds a draw."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from privtune.rng import numpy_rng, seeded, torch_generator

PACKAGE = Path(__file__).resolve().parent.parent / "privtune"


def test_streams_are_deterministic_and_distinct():
    assert seeded(0, "flip", 3, 7) == seeded(0, "flip", 3, 7)
    seeds = {seeded(0, "flip", 3, 7), seeded(0, "crop", 3, 7), seeded(0, "flip", 7, 3), seeded(1, "flip", 3, 7),
             seeded(0, "flip", 3), seeded(0, "flip", 3, 7, 0)}
    assert len(seeds) == 6
    assert 0 <= seeded(5, "x") < 2 ** 63
    np.testing.assert_array_equal(numpy_rng(0, "order", 1).permutation(50), numpy_rng(0, "order", 1).permutation(50))
    assert not np.array_equal(numpy_rng(0, "order", 1).permutation(50), numpy_rng(0, "order", 2).permutation(50))
    assert torch.equal(torch.randn(4, generator=torch_generator(2, "noise")), torch.randn(4, generator=torch_generator(2, "noise")))


def test_the_old_collision_is_gone():
    """`[seed, m, 7]` was both the flip stream of micro-step m and row 7's crop stream at key m."""
    m = 5
    assert seeded(0, "batches", "flip", m) != seeded(0, "crop", m, 7)


def test_negative_keys_are_refused():
    with pytest.raises(ValueError, match=">= 0"):
        seeded(0, "flip", -1)


def test_no_integer_tagged_streams_left_in_the_package():
    pattern = re.compile(r"default_rng\(\[|SeedSequence\(|manual_seed\(int\(")
    offenders = [f"{p.relative_to(PACKAGE)}:{i}" for p in PACKAGE.rglob("*.py") if p.name != "rng.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, f"seed draws through privtune.rng.seeded(seed, '<stream>', ...) instead: {offenders}"
