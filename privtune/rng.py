"""Named random streams: every draw in privtune comes from `seeded(seed, "<stream>", *keys)`.

A stream is a name plus integer keys (step, micro-batch, row), mixed by numpy's SeedSequence, so two
streams never collide by accident (an integer tag could: `[seed, m, 7]` was once both the flip stream
and row 7's crop stream) and a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def _word(key: int | str) -> int:
    """A key as a non-negative integer SeedSequence accepts; a name becomes 64 bits of its BLAKE2 hash."""
    if isinstance(key, str):
        return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    key = int(key)
    if key < 0:
        raise ValueError(f"stream keys must be >= 0 (got {key})")
    return key


def seeded(seed: int, stream: str, *keys: int | str) -> int:
    """A 63-bit seed for stream `stream` under `seed`, at `keys` (e.g. step, row)."""
    words = [_word(seed), _word(stream), *map(_word, keys)]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))


def numpy_rng(seed: int, stream: str, *keys: int | str) -> np.random.Generator:
    """A numpy Generator on a named stream."""
    return np.random.default_rng(seeded(seed, stream, *keys))


def torch_generator(seed: int, stream: str, *keys: int | str) -> torch.Generator:
    """A CPU torch Generator on a named stream."""
    return torch.Generator().manual_seed(seeded(seed, stream, *keys))
