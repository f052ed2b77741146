"""CLiD of Zhai, Chen, Dong, Li, Shen, Gao, Su & Liu, "Membership Inference on Text-to-Image Diffusion
Models via Conditional Likelihood Discrepancy" (NeurIPS 2024, arXiv 2405.14800); specs/attacks.md §5.

Text-to-image models overfit the conditional likelihood p(x|c) more than p(x): for a member, the
denoising loss with its own caption is lower than with a condition-diminished caption by more than
for a non-member. With M timesteps and one noise draw per (sample, timestep) shared by every
condition (the variance reduction the spec insists on), L(c) = mean_j mean_pixels ‖ε_j − ε_θ(z_tj, t_j, c)‖²
and D_k = L(c̃_k) − L(c) for K diminished captions.

Diminished captions: the released code's crop variant (character thirds of the caption, plus the
empty prompt; K = 4, t = {485, 495, 505}). The importance variant needs a per-word importance file
whose method the code does not document, so it is not offered.

* `clid_th`: score from (L(c), −mean_k D_k), each scaled by a RobustScaler, S = (1 − α)·Ŝ₁ + α·Ŝ₂ (lower
  = member, score = −S), with α ∈ {0, 0.1, …, 1} chosen by AUC.
* `clid_vec`: a gradient-boosted classifier on [L(c), D_1, …, D_K]; scikit-learn's
  HistGradientBoostingClassifier stands in for the paper's XGBoost (same family, already a dependency),
  with shallow trees and few iterations like the official setting (20 trees of depth 3).

The paper fits the scaler, α and the classifier on a shadow model; here they are fitted on the
target's own calibration split (labelled members and non-members of the released model), which
gives the attacker more than a shadow model does (privtune reports the stronger attacker), and never
on report samples; with eval.shadow.enabled the runner also fits a copy on the pooled shadow models
(`clid_th~shadow`, the paper's setting). clid_vec holds out part of the calibration split to return unbiased scores for the
runner's threshold fit. NFE: M·(1 + K) per sample (15 by default), plus K text-encoder passes.
"""

from __future__ import annotations

from typing import Any, Hashable, Sequence

import numpy as np
import torch
from torch import Tensor

from ...errors import ConfigError
from ..primitives import seeded_noise, single_step_loss
from .base import (ATTACKS, Attack, AttackScores, AttackTarget, EncodedSamples, best_by_auc, map_batches,
                   stratified_holdout)

CROP_TIMESTEPS = (485, 495, 505)
ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))


def diminished_captions(caption: str) -> list[str]:
    """The crop variant's condition-diminished prompts: the caption's character thirds, then the empty prompt."""
    n = len(caption)
    cuts = [0, n // 3, (2 * n) // 3, n]
    return [caption[cuts[i]:cuts[i + 1]].strip() for i in range(3)] + [""]


class _CLiD(Attack):
    """Shared feature extraction: per sample [L(c), D_1, …, D_K]."""

    requires = ("captions",)
    learned = True

    def __init__(self, timesteps: Sequence[int] = CROP_TIMESTEPS, seed: int = 0):
        super().__init__(seed)
        self.timesteps = [int(t) for t in timesteps]
        if not self.timesteps:
            raise ConfigError(f"{self.name} needs at least one timestep")
        self.k = len(diminished_captions("x"))

    def _features(self, target: AttackTarget, batch: EncodedSamples) -> dict[Hashable, Tensor]:
        if batch.captions is None or target.encode_text is None:
            raise ConfigError(f"{self.name} needs the samples' captions and the target's text encoder")
        b = len(batch)
        prompts = [p for c in batch.captions for p in diminished_captions(c)]
        diminished = target.encode_text(prompts).to(batch.cond.device, batch.cond.dtype)
        diminished = diminished.reshape(b, self.k, *diminished.shape[1:])
        conds = [batch.cond] + [diminished[:, i] for i in range(self.k)]
        x0 = batch.latents
        losses = torch.zeros(b, 1 + self.k, dtype=torch.float32, device=x0.device)
        for j, t in enumerate(self.timesteps):
            noise = seeded_noise(x0.shape[1:], self.seed, f"clid/t{j}", batch.ids, x0.device, x0.dtype)
            for i, cond in enumerate(conds):
                losses[:, i] += single_step_loss(target.predictor, x0, t, noise, cond, target.alphas_cumprod, "mean")
        losses /= len(self.timesteps)
        base = losses[:, :1]
        return {"features": torch.cat([base, losses[:, 1:] - base], dim=1)}

    def features(self, target: AttackTarget, samples: EncodedSamples, batch_size: int, progress: bool, desc: str):
        out, nfe = map_batches(target, samples, self._features, batch_size, progress, desc)
        return out["features"].astype(np.float64), nfe

    def fit_features(self, target, samples, batch_size, progress):
        feats, nfe = self.features(target, samples, batch_size, progress, f"{self.name}/calibrate")
        return {"features": feats}, nfe

    def params(self) -> dict[str, Any]:
        return {"timesteps": self.timesteps, "diminished": "caption character thirds + empty prompt",
                "conditions": 1 + self.k, "noise": "one draw per (sample, timestep), shared by every condition",
                "reduction": "mean", "fitted_on": "calibration split", "seed": self.seed}


@ATTACKS.register("clid_th")
class CLiDThreshold(_CLiD):
    name = "clid_th"
    statistic, members_lower = "scaled CLiD combination", True

    def __init__(self, timesteps: Sequence[int] = CROP_TIMESTEPS, alphas: Sequence[float] = ALPHAS, seed: int = 0):
        super().__init__(timesteps, seed)
        self.alphas = [float(a) for a in alphas]
        if not self.alphas or any(not 0.0 <= a <= 1.0 for a in self.alphas):
            raise ConfigError(f"clid_th: alphas must be values in [0, 1], got {list(alphas)}")
        self.alpha: float | None = None
        self.scaler = None
        self.calibration_auc: dict[str, float] = {}

    @staticmethod
    def _pair(features: np.ndarray) -> np.ndarray:
        return np.stack([features[:, 0], -features[:, 1:].mean(axis=1)], axis=1)

    def _combined(self, features: np.ndarray, alpha: float) -> np.ndarray:
        s = self.scaler.transform(self._pair(features))
        return (1.0 - alpha) * s[:, 0] + alpha * s[:, 1]

    def fit(self, features, labels, ids) -> AttackScores:
        from sklearn.preprocessing import RobustScaler

        feats = features["features"]
        self.scaler = RobustScaler().fit(self._pair(feats))
        self.alpha, self.calibration_auc = best_by_auc({a: -self._combined(feats, a) for a in self.alphas}, labels)
        raw = self._combined(feats, self.alpha)
        self.fit_ids = list(ids)
        return AttackScores(-raw, raw, 0.0, ids=list(ids), labels=labels)

    def score(self, target, samples, batch_size=32, progress=True) -> AttackScores:
        if self.alpha is None:
            raise ConfigError("clid_th: call calibrate() first (it fits the scaler and alpha on the calibration split)")
        feats, nfe = self.features(target, samples, batch_size, progress, "clid_th")
        raw = self._combined(feats, self.alpha)
        return AttackScores(-raw, raw, nfe, ids=list(samples.ids))

    def params(self) -> dict[str, Any]:
        return {**super().params(), "alpha": self.alpha, "alpha_candidates": self.alphas,
                "scaler": "RobustScaler on (L(c), -mean_k D_k)", "calibration_auc": self.calibration_auc}


@ATTACKS.register("clid_vec")
class CLiDVector(_CLiD):
    name = "clid_vec"
    statistic, members_lower = "classifier member probability", False

    def __init__(self, timesteps: Sequence[int] = CROP_TIMESTEPS, max_iter: int = 20, max_depth: int = 3,
                 learning_rate: float = 0.1, val_fraction: float = 0.3, seed: int = 0):
        super().__init__(timesteps, seed)
        if not 0.0 < float(val_fraction) < 1.0:
            raise ConfigError(f"clid_vec: val_fraction must be in (0, 1), got {val_fraction}")
        self.max_iter, self.max_depth, self.learning_rate = int(max_iter), int(max_depth), float(learning_rate)
        self.val_fraction = float(val_fraction)
        self.model = None
        self.min_samples_leaf: int | None = None
        self.fit_ids: list[str] = []
        self.val_ids: list[str] = []

    def fit(self, features, labels, ids) -> AttackScores:
        from sklearn.ensemble import HistGradientBoostingClassifier

        from ...rng import numpy_rng

        feats = features["features"]
        fit, val = stratified_holdout(labels, self.val_fraction, numpy_rng(self.seed, "clid_vec", "holdout"), "clid_vec")
        # scikit-learn's default leaf size (20) allows no split at all on a small calibration split
        self.min_samples_leaf = int(min(20, max(2, len(fit) // 8)))
        self.model = HistGradientBoostingClassifier(max_iter=self.max_iter, max_depth=self.max_depth,
                                                    learning_rate=self.learning_rate, min_samples_leaf=self.min_samples_leaf,
                                                    random_state=self.seed % 2**32)
        self.model.fit(feats[fit], labels[fit])
        self.fit_ids, self.val_ids = [ids[i] for i in fit], [ids[i] for i in val]
        prob = self.model.predict_proba(feats[val])[:, 1]
        return AttackScores(prob, prob, 0.0, ids=self.val_ids, labels=labels[val])

    def score(self, target, samples, batch_size=32, progress=True) -> AttackScores:
        if self.model is None:
            raise ConfigError("clid_vec: call calibrate() first (it trains the classifier on the calibration split)")
        feats, nfe = self.features(target, samples, batch_size, progress, "clid_vec")
        prob = self.model.predict_proba(feats)[:, 1]
        return AttackScores(prob, prob, nfe, ids=list(samples.ids))

    def params(self) -> dict[str, Any]:
        return {**super().params(), "classifier": "HistGradientBoostingClassifier", "max_iter": self.max_iter,
                "max_depth": self.max_depth, "min_samples_leaf": self.min_samples_leaf,
                "learning_rate": self.learning_rate, "val_fraction": self.val_fraction,
                "n_fit": len(self.fit_ids), "n_val": len(self.val_ids)}
