"""Shared parts of the black-box attacks (specs/attacks.md §8): they query a release only through its
`GenerationAPI` (privtune.eval.generation: generated images, image variations and an offline image encoder) and read
the query's image (`samples.pixels`) and caption (`samples.captions`); never a noise prediction, latent or weight.

Generation seeds are common random numbers: generation j of every query uses the same public seed, so members and
non-members are compared under the same sampler noise (a §14 pitfall of Wu et al.). Cost is what the API counted:
generated images, variations and UNet passes per query (`nfe_per_sample` is the passes).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable

import numpy as np
from tqdm.auto import tqdm

from ...errors import ConfigError, DataError
from ..primitives import sample_seed
from .base import Attack, AttackScores, AttackTarget, EncodedSamples, missing_requirements


def generation_seeds(seed: int, index: int, n: int, stream: str = "generation") -> list[int]:
    """The public seed of generation `index`, the same for all n queries."""
    return [sample_seed(seed, "", f"{stream}-{index}")] * n


class BlackBoxAttack(Attack):
    requires: tuple[str, ...] = ("generation",)

    def __init__(self, seed: int = 0):
        super().__init__(seed)
        self.cost: dict[str, float] = {}

    def api(self, target: AttackTarget, samples: EncodedSamples | None = None):
        missing = missing_requirements(self, target, samples)
        if missing:
            raise DataError("; ".join(missing))
        return target.generation

    def per_query(self, target: AttackTarget, samples: EncodedSamples, fn: Callable[[Any, EncodedSamples], dict],
                  batch_size: int, progress: bool, desc: str) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """`fn(api, batch)` -> {key: array [B, ...]} over the samples in batches, with what the API was asked per
        query (images, variations, UNet passes)."""
        if batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        api = self.api(target, samples)
        before = dict(api.counts)
        outs: dict[str, list[np.ndarray]] = defaultdict(list)
        n_batches = -(-len(samples) // batch_size)
        for batch in tqdm(samples.batches(batch_size), total=n_batches, desc=desc, disable=not progress, leave=False):
            for key, value in fn(api, batch).items():
                outs[key].append(np.asarray(value, np.float64))
        n = max(1, len(samples))
        cost = {f"{k}_per_query": (api.counts[k] - before.get(k, 0)) / n for k in ("images", "variations", "passes")}
        return {k: np.concatenate(v) for k, v in outs.items()}, cost

    def score(self, target, samples, batch_size=32, progress=True) -> AttackScores:
        out, cost = self.per_query(target, samples, self._query, batch_size, progress, self.name)
        self.cost = cost
        return AttackScores(out["score"], out["raw"], cost["passes_per_query"], ids=list(samples.ids))

    def _query(self, api, batch: EncodedSamples) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        return {**super().params(), **self.cost}
