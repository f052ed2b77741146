"""The reconstruction attack of Pang & Wang, "Black-box Membership Inference Attacks against Fine-tuned Diffusion
Models" (NDSS 2025, arXiv 2312.08207); specs/attacks.md §8.4.

A fine-tune reconstructs its members from their captions. For every query (x, c) the release generates n = 3
images from c (generation j of every query shares one public seed: common random numbers), the offline encoder
embeds x and each generation, and each embedding is standardized per dimension (mean and standard deviation of the
fit part's *query* embeddings, no labels used). The similarity features, averaged over the n generations, are

* the negative absolute difference per dimension, -|z(x)_d - z(G_j(c))_d| (the spec's "per-channel similarity"
  with the Manhattan alternative the paper lists: the encoder gives one vector per image, not DeiT's token grid, so
  a cosine *along the token axis* has nothing to run over), and
* the cosine similarity of the standardized embeddings, higher = member.

Inference models (`model=`), each fitted on calibration or shadow features only, with fixed settings:

* `threshold`: the cosine similarity alone (the paper thresholds one statistic too); its only fitted part is the
  label-free standardization, so it holds nothing out and returns every fit sample for the runner, which fits the
  threshold and direction on them as for any unlearned attack. It stays `learned` so that it can be fitted on
  shadow data (`pang_wang~shadow`) like the others;
* `distribution`: one Gaussian per class (member / non-member) on the standardized features, with Ledoit-Wolf
  shrunk (`covariance="ledoit_wolf"`) or diagonal covariance; the score is the log-likelihood ratio;
* `classifier` (default): scikit-learn's MLPClassifier, the member logit. The paper's MLP is 1024-512-256-128-64-32
  with dropout 0.5, Adam 1e-4 and 1000 full-batch epochs, and reports the best epoch *on the target* (the §14
  pitfall). Here it is scaled down for calibration splits of tens to hundreds of samples: the tower's last layers
  128-64-32, L2 weight decay in place of dropout, Adam 1e-3 for a fixed 300 full-batch epochs, and no epoch is
  selected at all.
`distribution` and `classifier` hold a seeded `val_fraction` of each class out of the fit and return it for the
runner's threshold and direction.

Deviations: the offline encoder of the run (privtune.eval.generation.image_encoder: a local CLIP, the shipped
attribute classifier's features or fixed training-free features) stands in for DeiT-base-distilled-384; only the
caption-known scenarios are offered (no BLIP captioner ships); the classifier sizes above. Sampler steps and
guidance are the release API's (the paper: 30 steps, guidance 7.5).

Cost: n × steps × 2 UNet passes per query with guidance (3 × 30 × 2 = 180 at the paper's settings), plus 1 + n
encoder passes; `nfe_per_sample` is the UNet passes the API counted.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ...errors import ConfigError, DataError
from .base import ATTACKS, AttackScores, stratified_holdout
from .blackbox import BlackBoxAttack, checked_mlp_settings, fit_mlp, generation_seeds, mlp_logit

MODELS = ("threshold", "distribution", "classifier")
COVARIANCES = ("ledoit_wolf", "diagonal")
STATISTICS = {"threshold": "cosine similarity of standardized embeddings",
              "distribution": "member / non-member Gaussian log-likelihood ratio",
              "classifier": "inference-MLP logit"}


def _gaussian(x: np.ndarray, covariance: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the rows of x (Ledoit-Wolf shrunk, or diagonal with a variance floor)."""
    if covariance == "ledoit_wolf":
        from sklearn.covariance import LedoitWolf

        lw = LedoitWolf().fit(x)
        cov = lw.covariance_ + 1e-6 * np.eye(x.shape[1])
        return lw.location_, cov
    return x.mean(0), np.diag(np.maximum(x.var(0), 1e-6))


def _log_density(x: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    sign, logdet = np.linalg.slogdet(cov)
    d = x - mean
    maha = np.einsum("ij,ij->i", d, np.linalg.solve(cov, d.T).T)
    return -0.5 * (maha + logdet + x.shape[1] * np.log(2 * np.pi))


@ATTACKS.register("pang_wang")
class PangWang(BlackBoxAttack):
    name = "pang_wang"
    learned = True
    members_lower = False

    def __init__(self, n: int = 3, model: str = "classifier", covariance: str = "ledoit_wolf",
                 hidden: Sequence[int] = (128, 64, 32), epochs: int = 300, learning_rate: float = 1e-3,
                 l2: float = 1e-2, val_fraction: float = 0.3, seed: int = 0):
        super().__init__(seed)
        self.n = int(n)
        if self.n < 1:
            raise ConfigError(f"pang_wang: n (generations per query) must be >= 1, got {n}")
        if model not in MODELS:
            raise ConfigError(f"pang_wang: model must be one of {MODELS}, got {model!r}")
        if covariance not in COVARIANCES:
            raise ConfigError(f"pang_wang: covariance must be one of {COVARIANCES}, got {covariance!r}")
        self.model, self.covariance = model, covariance
        self.statistic = STATISTICS[model]
        self.hidden, self.epochs, self.learning_rate, self.l2, self.val_fraction = checked_mlp_settings(
            "pang_wang", hidden, epochs, learning_rate, l2, val_fraction)
        self._mean: np.ndarray | None = None
        self._std: np.ndarray | None = None
        self.scaler = None
        self.gaussians: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.classifier = None
        self.fit_ids: list[str] = []
        self.val_ids: list[str] = []
        self.val_auc: float | None = None

    # ------------------------------------------------------------------ features
    def _query(self, api, batch) -> dict[str, np.ndarray]:
        x = batch.pixels.float().cpu()
        b = len(batch)
        gens = [api.features(api.images(list(batch.captions), generation_seeds(self.seed, j, b))) for j in range(self.n)]
        return {"query": api.features(x), "generations": np.stack(gens, axis=1)}

    def fit_features(self, target, samples, batch_size, progress):
        out, cost = self.per_query(target, samples, self._query, batch_size, progress, f"{self.name}/calibrate")
        return out, cost["passes_per_query"]

    def similarities(self, features: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(cosine [N], per-dimension negative absolute difference [N, D]) of the standardized embeddings, each the
        mean over the n generations."""
        if self._mean is None:
            raise ConfigError("pang_wang: call calibrate() first (it fits the embedding standardization)")
        query, gens = np.asarray(features["query"], np.float64), np.asarray(features["generations"], np.float64)
        if gens.ndim != 3 or gens.shape[0] != query.shape[0] or gens.shape[2] != query.shape[1]:
            raise DataError(f"pang_wang: query embeddings {query.shape} and generation embeddings {gens.shape} do not match")
        if query.shape[1] != self._mean.shape[0]:
            raise DataError(f"pang_wang: the encoder gives {query.shape[1]} dimensions, the fit saw {self._mean.shape[0]}")
        zq = (query - self._mean) / self._std
        zg = (gens - self._mean) / self._std
        norm = np.linalg.norm(zq, axis=-1)[:, None] * np.linalg.norm(zg, axis=-1)
        cos = ((zq[:, None, :] * zg).sum(-1) / np.maximum(norm, 1e-12)).mean(1)
        return cos, -np.abs(zq[:, None, :] - zg).mean(1)

    def _design(self, features) -> np.ndarray:
        cos, neg_l1 = self.similarities(features)
        return np.concatenate([cos[:, None], neg_l1], axis=1)

    # ------------------------------------------------------------------ inference models
    def _fit_standardization(self, query: np.ndarray) -> None:
        self._mean, self._std = query.mean(0), np.maximum(query.std(0), 1e-6)

    def _member_score(self, features) -> tuple[np.ndarray, np.ndarray]:
        if self.model == "threshold":
            cos, _ = self.similarities(features)
            return cos, cos
        x = self.scaler.transform(self._design(features))
        if self.model == "distribution":
            llr = _log_density(x, *self.gaussians[1]) - _log_density(x, *self.gaussians[0])
            return llr, llr
        logit = mlp_logit(self.classifier, x)
        return logit, logit

    def fit(self, features, labels, ids) -> AttackScores:
        from ...rng import numpy_rng
        from ..metrics import auc

        labels = np.asarray(labels)
        query = np.asarray(features["query"], np.float64)
        if self.model == "threshold":  # only the label-free standardization is fitted: nothing to hold out
            self._fit_standardization(query)
            self.fit_ids, self.val_ids = list(ids), []
            score, raw = self._member_score(features)
            self.val_auc = auc(score, labels)
            return AttackScores(score, raw, 0.0, ids=list(ids), labels=labels)

        from sklearn.preprocessing import StandardScaler

        fit, val = stratified_holdout(labels, self.val_fraction, numpy_rng(self.seed, "pang_wang", "holdout"), self.name)
        part = {k: np.asarray(v)[fit] for k, v in features.items()}
        held = {k: np.asarray(v)[val] for k, v in features.items()}
        self._fit_standardization(query[fit])
        design = self._design(part)
        self.scaler = StandardScaler().fit(design)
        x, y = self.scaler.transform(design), labels[fit]
        if self.model == "distribution":
            self.gaussians = {c: _gaussian(x[y == c], self.covariance) for c in (0, 1)}
        else:
            self.classifier = fit_mlp(x, y, self.hidden, self.epochs, self.learning_rate, self.l2, self.seed)
        self.fit_ids, self.val_ids = [ids[i] for i in fit], [ids[i] for i in val]
        score, raw = self._member_score(held)
        self.val_auc = auc(score, labels[val])
        return AttackScores(score, raw, 0.0, ids=list(self.val_ids), labels=labels[val])

    def score(self, target, samples, batch_size=32, progress=True) -> AttackScores:
        if self._mean is None:
            raise ConfigError("pang_wang: call calibrate() first (it fits the inference model on calibration or shadow data)")
        out, cost = self.per_query(target, samples, self._query, batch_size, progress, self.name)
        self.cost = cost
        score, raw = self._member_score(out)
        return AttackScores(score, raw, cost["passes_per_query"], ids=list(samples.ids))

    def params(self) -> dict[str, Any]:
        out = {**super().params(), "n": self.n, "model": self.model,
               "features": "cosine + per-dimension negative absolute difference of standardized embeddings, "
                           "averaged over the n generations",
               "standardization": "per-dimension mean / std of the fit part's query embeddings",
               "seeds": "common: generation j of every query shares one public seed",
               "val_auc": self.val_auc, "n_fit": len(self.fit_ids), "n_val": len(self.val_ids)}
        if self.model == "distribution":
            out["covariance"] = self.covariance
        if self.model == "classifier":
            out.update({"classifier": "sklearn MLPClassifier (ReLU) on standardized features", "hidden": list(self.hidden),
                        "epochs": self.epochs, "batch": "full", "learning_rate": self.learning_rate, "l2": self.l2})
        if self.model != "threshold":
            out["val_fraction"] = self.val_fraction
        return out
