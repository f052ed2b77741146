"""The black-box attack of Wu, Yu, Li, Backes & Zhang, "Membership Inference Attacks Against Text-to-image
Generation Models" (arXiv 2210.00968); specs/attacks.md §8.1.

A model generates images closer to a member than to a non-member from its caption. For every query (x, c) the
release generates n images G_j(c) (one public seed per j, shared by every query: common random numbers, the §14
pitfall), and the attack averages over the n generations:

* **pixel-level**: the mean squared pixel distance between G_j(c) and x (a generation of another size is resized
  to x's with antialiased bilinear interpolation), lower = member;
* **semantic-level**: the cosine similarity of the offline encoder's embeddings (`api.features`) of G_j(c) and x,
  higher = member.

An attack classifier, scikit-learn's MLPClassifier on the standardized features [log pixel distance, cosine],
turns them into a member logit; `features=` picks the paper's pixel-level, semantic-level or combined attack.

Deviations from the paper:
* the **faithfulness / quality** attack is not offered: it needs a text-image scorer (CLIP's text tower) and the
  GenerationAPI holds an image encoder only;
* the semantic encoder is the run's offline encoder (privtune.eval.generation.image_encoder: a local CLIP, the
  shipped attribute classifier's features or fixed training-free features) instead of a downloaded pretrained one;
* the classifier's size was not retrieved: an MLP of 32-16 ReLU units with L2 weight decay, trained for a fixed
  number of full-batch Adam epochs (no epoch or checkpoint is ever selected on the target), with fixed settings;
* it is fitted on the target's labelled calibration split (an attacker stronger than the paper's, which privtune
  reports), or with eval.shadow on the pooled shadow models' features (`wu~shadow`, the paper's setting). A seeded
  `val_fraction` of each class is held out of the fit and returned for the runner's threshold and direction.

Cost: n generations per query, i.e. n × steps × 2 UNet passes with guidance (3 × 50 × 2 = 300 at the defaults of
a 50-step guided release), plus 1 + n encoder passes; `nfe_per_sample` is the UNet passes the API counted.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch.nn.functional as F

from ...errors import ConfigError, DataError
from .base import ATTACKS, AttackScores, stratified_holdout
from .blackbox import BlackBoxAttack, checked_mlp_settings, fit_mlp, generation_seeds, mlp_logit

FEATURES = ("pixel", "semantic")


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two [N, D] arrays."""
    norm = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return (a * b).sum(-1) / np.maximum(norm, 1e-12)


@ATTACKS.register("wu")
class Wu(BlackBoxAttack):
    name = "wu"
    learned = True
    statistic, members_lower = "attack-classifier logit", False

    def __init__(self, n: int = 3, features: Sequence[str] = FEATURES, hidden: Sequence[int] = (32, 16),
                 epochs: int = 300, learning_rate: float = 1e-3, l2: float = 1e-3, val_fraction: float = 0.3,
                 seed: int = 0):
        super().__init__(seed)
        self.n = int(n)
        if self.n < 1:
            raise ConfigError(f"wu: n (generations per query) must be >= 1, got {n}")
        self.features = [str(f) for f in ([features] if isinstance(features, str) else features)]
        if not self.features or any(f not in FEATURES for f in self.features) or len(set(self.features)) != len(self.features):
            raise ConfigError(f"wu: features must be distinct names among {FEATURES}, got {list(self.features)}")
        self.hidden, self.epochs, self.learning_rate, self.l2, self.val_fraction = checked_mlp_settings(
            "wu", hidden, epochs, learning_rate, l2, val_fraction)
        self.scaler = None
        self.model = None
        self.fit_ids: list[str] = []
        self.val_ids: list[str] = []
        self.val_auc: float | None = None

    # ------------------------------------------------------------------ features
    def _query(self, api, batch) -> dict[str, np.ndarray]:
        x = batch.pixels.float().cpu()
        b = len(batch)
        semantic = "semantic" in self.features
        ex = api.features(x) if semantic else None
        pixel, cos = np.zeros(b), np.zeros(b)
        for j in range(self.n):
            g = api.images(list(batch.captions), generation_seeds(self.seed, j, b))
            if g.shape[-2:] != x.shape[-2:]:
                g = F.interpolate(g, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False, antialias=True)
            pixel += (g - x).pow(2).flatten(1).mean(1).double().numpy()
            if semantic:
                cos += cosine(ex, api.features(g))
        out = {"pixel": pixel / self.n}
        if semantic:
            out["semantic"] = cos / self.n
        return out

    def fit_features(self, target, samples, batch_size, progress):
        out, cost = self.per_query(target, samples, self._query, batch_size, progress, f"{self.name}/calibrate")
        return out, cost["passes_per_query"]

    def _design(self, features: dict[str, np.ndarray]) -> np.ndarray:
        missing = [f for f in self.features if f not in features]
        if missing:
            raise DataError(f"wu: features {missing} missing; got {sorted(features)}")
        cols = [np.log(np.maximum(features[f], 1e-12)) if f == "pixel" else features[f] for f in self.features]
        return np.stack([np.asarray(c, np.float64).reshape(-1) for c in cols], axis=1)

    # ------------------------------------------------------------------ the attack classifier
    def fit(self, features, labels, ids) -> AttackScores:
        from sklearn.preprocessing import StandardScaler

        from ...rng import numpy_rng
        from ..metrics import auc

        labels = np.asarray(labels)
        design = self._design(features)
        fit, val = stratified_holdout(labels, self.val_fraction, numpy_rng(self.seed, "wu", "holdout"), self.name)
        self.scaler = StandardScaler().fit(design[fit])
        self.model = model = fit_mlp(self.scaler.transform(design[fit]), labels[fit], self.hidden, self.epochs,
                                     self.learning_rate, self.l2, self.seed)
        self.fit_ids, self.val_ids = [ids[i] for i in fit], [ids[i] for i in val]
        logit = mlp_logit(model, self.scaler.transform(design[val]))
        self.val_auc = auc(logit, labels[val])
        return AttackScores(logit, logit, 0.0, ids=list(self.val_ids), labels=labels[val])

    def score(self, target, samples, batch_size=32, progress=True) -> AttackScores:
        if self.model is None:
            raise ConfigError("wu: call calibrate() first (it trains the attack classifier on calibration or shadow data)")
        out, cost = self.per_query(target, samples, self._query, batch_size, progress, self.name)
        self.cost = cost
        logit = mlp_logit(self.model, self.scaler.transform(self._design(out)))
        return AttackScores(logit, logit, cost["passes_per_query"], ids=list(samples.ids))

    def params(self) -> dict[str, Any]:
        return {**super().params(), "n": self.n, "features": list(self.features),
                "pixel_feature": "log mean squared pixel distance to the query, averaged over the n generations",
                "semantic_feature": "cosine similarity of encoder embeddings, averaged over the n generations",
                "faithfulness": "not offered: the generation API has no text-image scorer",
                "seeds": "common: generation j of every query shares one public seed",
                "classifier": "sklearn MLPClassifier (ReLU) on standardized features", "hidden": list(self.hidden),
                "epochs": self.epochs, "batch": "full", "learning_rate": self.learning_rate, "l2": self.l2,
                "val_fraction": self.val_fraction, "val_auc": self.val_auc, "n_fit": len(self.fit_ids),
                "n_val": len(self.val_ids)}
