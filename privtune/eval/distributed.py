"""Sharding of attack work across `accelerate launch` processes.

Inside `sharded(accelerator)`, every batched attack computation (`attacks.base.map_batches`) gives
each process a contiguous slice of the samples and gathers the per-sample outputs back in order, so
every process ends with the same arrays as a single process would compute (noise is seeded per
sample id, never per batch or per process).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator


@dataclass
class Sharding:
    index: int
    count: int
    gather: Callable[[Any], list]  # all processes' objects, in process order

    def bounds(self, n: int) -> tuple[int, int]:
        per = -(-n // self.count)
        return min(n, self.index * per), min(n, (self.index + 1) * per)


_ACTIVE: list[Sharding] = []


def current() -> Sharding | None:
    return _ACTIVE[-1] if _ACTIVE else None


@contextmanager
def sharded(accelerator) -> Iterator[None]:
    """Shard attack work over the accelerator's processes (a no-op with one process)."""
    if accelerator is None or accelerator.num_processes == 1:
        yield
        return
    from accelerate.utils import gather_object

    _ACTIVE.append(Sharding(accelerator.process_index, accelerator.num_processes, lambda obj: gather_object([obj])))
    try:
        yield
    finally:
        _ACTIVE.pop()
