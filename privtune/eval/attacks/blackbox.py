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


def checked_mlp_settings(name: str, hidden, epochs, learning_rate, l2, val_fraction) -> tuple:
    """(hidden sizes, epochs, learning rate, L2, held-out fraction) of an attack's MLP, each checked."""
    sizes = [int(h) for h in hidden]
    if not sizes or min(sizes) < 1:
        raise ConfigError(f"{name}: hidden must be positive layer sizes, got {list(hidden)}")
    if int(epochs) < 1 or float(learning_rate) <= 0 or float(l2) < 0:
        raise ConfigError(f"{name}: needs epochs >= 1, learning_rate > 0 and l2 >= 0")
    if not 0.0 < float(val_fraction) < 1.0:
        raise ConfigError(f"{name}: val_fraction must be in (0, 1), got {val_fraction}")
    return sizes, int(epochs), float(learning_rate), float(l2), float(val_fraction)


def fit_mlp(x: np.ndarray, y: np.ndarray, hidden, epochs: int, learning_rate: float, l2: float, seed: int):
    """scikit-learn's ReLU MLPClassifier trained for exactly `epochs` full-batch Adam epochs (tol=0 with
    n_iter_no_change=epochs never stops early, so no epoch is picked on anything: the Pang & Wang pitfall)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    model = MLPClassifier(hidden_layer_sizes=tuple(hidden), activation="relu", solver="adam", alpha=l2,
                          learning_rate_init=learning_rate, max_iter=epochs, batch_size=len(x), tol=0.0,
                          n_iter_no_change=epochs, early_stopping=False, random_state=seed % 2**32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y)
    return model


def mlp_logit(model, x: np.ndarray) -> np.ndarray:
    """A fitted binary ReLU MLPClassifier's output before the logistic (the member logit): its forward pass from
    the public `coefs_` / `intercepts_`, unsaturated where predict_proba would round to 0 or 1."""
    h = x
    for i, (w, b) in enumerate(zip(model.coefs_, model.intercepts_)):
        h = h @ w + b
        if i < len(model.coefs_) - 1:
            h = np.maximum(h, 0.0)
    return h[:, 0]


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
