"""Deterministic batch schedule: which rows (and flips) every process sees at every micro-step.

The schedule is a pure function of (seed, micro-step), so a resumed run draws exactly the batches an
uninterrupted one would, and `accelerate launch` processes take disjoint slices of each global batch.
"""

from __future__ import annotations

import numpy as np

from ..rng import numpy_rng


class BatchSchedule:
    """Epochs of shuffled rows cut into global batches; `stream` names the random stream (one per schedule)."""

    def __init__(self, num_rows: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 random_flip: bool = False, stream: str = "batches"):
        self.stream = stream
        self.num_rows = num_rows
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.random_flip = random_flip
        self._epochs: dict[int, np.ndarray] = {}

    def _epoch(self, epoch: int) -> np.ndarray:
        if epoch not in self._epochs:
            self._epochs = {epoch: numpy_rng(self.seed, self.stream, "order", epoch).permutation(self.num_rows)}
        return self._epochs[epoch]

    def global_rows(self, micro_step: int) -> np.ndarray:
        """The global batch (all processes) of `micro_step`, drawn from an endless stream of epochs."""
        size = self.batch_size * self.world_size
        start = micro_step * size
        rows = []
        while len(rows) < size:
            epoch, offset = divmod(start + len(rows), self.num_rows)
            perm = self._epoch(epoch)
            rows.extend(perm[offset: offset + size - len(rows)].tolist())
        return np.asarray(rows)

    def rows(self, micro_step: int) -> tuple[np.ndarray, np.ndarray]:
        """This process's rows and flip flags for `micro_step`."""
        rows = self.global_rows(micro_step)[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        if self.random_flip:
            flips = numpy_rng(self.seed, self.stream, "flip", micro_step).random(self.batch_size * self.world_size) < 0.5
            flips = flips[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        else:
            flips = np.zeros(len(rows), dtype=bool)
        return rows, flips
