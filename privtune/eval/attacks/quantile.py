"""Quantile-regression MIA of Tang, Wu, Aydore, Kearns & Roth, "Membership Inference Attacks on
Diffusion Models via Quantile Regression" (ICML 2024, arXiv 2312.05140); specs/attacks.md §4.

Statistic: s(x) = log of SecMI's summed squared t-error (§2; `t_sec`, `k` as in `secmi`, default
t_sec = 150, k = 10: t_sec/k + 1 = 16 NFE per sample). The log turns the t-error's multiplicative
spread into an additive one; quantiles are equivariant under it, so the test itself is unchanged.

Per-example threshold: B bagged regressors q_b(x) of the α-quantile of s given x, each fitted on a
bootstrap resample of KNOWN NON-MEMBERS ONLY. For a non-member P[s(x) < q_b(x)] ≈ α, so "member iff
s(x) < q(x)" is a test with FPR ≈ α whose threshold adapts to how hard x is to re-trace.
score = mean_b(q_b(x) − s(x)) (higher = member, the mean-margin ROC score of §4b); raw = s(x).

Protocol (§14 pitfall): `calibrate` never fits on members. It splits the calibration non-members
by a seeded permutation into a fit part (`fit_fraction`, default 70%; ids in `fit_ids`) and a held-out
part; the regressors see only the fit part. It returns the scores of all calibration members plus
the held-out non-members, with labels, for the runner's threshold fit, and `params()` records the
empirical FPR of the α-rule (mean-of-bags and majority vote) on the held-out non-members; with
few of them it is coarse (30 held-out non-members resolve FPR only in steps of 3.3%).

Regressor features of x: the latents average-pooled to at most 8×8 per channel (4×8×8 = 256 values
for SD whatever the resolution), plus each channel's standard deviation and mean absolute spatial
difference (texture energy, which pooling removes and the t-error depends on), optionally plus the
caption state averaged over tokens (`use_cond`).

Regressors: scikit-learn `HistGradientBoostingRegressor`s with shallow trees (depth 2, 50 rounds,
≥ 20 samples a leaf) instead of the paper's small ResNets: privtune's known non-members are the
calibration half of a fine-tuning set (tens to hundreds of images, not the paper's tens of
thousands), where a CNN fitted to a 1% quantile mostly memorizes the few tail points and needs its own
epoch selection, while shallow boosted trees on pooled features are deterministic, CPU-only and take
seconds. Default `regressor="location_scale"`: q_b(x) = μ_b(x) + σ_b(x)·c with μ_b boosted on s,
σ_b on |s − μ_b| (both squared loss), and c the α-quantile (the pinball-loss minimiser among
constants) of the out-of-bag standardized residuals. `regressor="pinball"` boosts the pinball loss
at α directly (`loss="quantile"`); on heteroscedastic test data it barely moved from the global
α-quantile within 50 rounds (the loss gradient is −α on 99% of the points at α = 1%) and, with more
rounds or deeper trees, overfitted the tail (held-out FPR 2–6% at α = 1%), whereas location_scale
held 0.5–0.9% overall and stayed near α within each noise tercile (tests/eval/test_quantile.py;
slightly conservative because the mean of B quantile estimates is less noisy than each one).
The bagging, the per-example α-test and the score are the paper's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...errors import ConfigError, DataError
from .base import ATTACKS, Attack, AttackScores, AttackTarget, EncodedSamples, map_batches, member_labels
from .secmi import SecMI

POOL = 8  # pooled spatial size (per side) of the regressor features
REGRESSORS = ("location_scale", "pinball")
DEFAULT_TREES = {"max_iter": 50, "learning_rate": 0.1, "max_depth": 2, "min_samples_leaf": 20}


def latent_features(latents: Tensor, cond: Tensor | None = None) -> Tensor:
    """[N, F] regressor features: latents average-pooled to ≤ 8×8 per channel, plus per-channel std and
    mean |spatial difference|, plus the token-averaged condition when `cond` is given."""
    x = latents.float()
    size = (min(POOL, x.shape[-2]), min(POOL, x.shape[-1]))
    pooled = torch.nn.functional.adaptive_avg_pool2d(x, size).flatten(1)
    std = x.flatten(2).std(dim=2, unbiased=False)
    dh = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(2).mean(2) if x.shape[-2] > 1 else torch.zeros_like(std)
    dw = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(2).mean(2) if x.shape[-1] > 1 else torch.zeros_like(std)
    parts = [pooled, std, (dh + dw) / 2]
    if cond is not None:
        parts.append(cond.float().mean(dim=1))
    return torch.cat(parts, dim=1)


class BaggedQuantileRegressor:
    """B regressors q_b(x) of the α-quantile of a scalar statistic, each fitted on a bootstrap resample.

    * "location_scale" (default): q_b(x) = μ_b(x) + σ_b(x)·c, with μ_b boosted on s (squared loss),
      σ_b boosted on |s − μ_b| and c the α-quantile (the pinball-loss minimiser among constants) of the
      out-of-bag standardized residuals (s − μ̄_oob)/σ̄_oob, each point scored only by the bags that did
      not see it. Out-of-bag, so c carries no in-sample optimism.
    * "pinball": q_b = HistGradientBoostingRegressor(loss="quantile", quantile=α) on s directly.
    """

    def __init__(self, alpha: float = 0.01, n_models: int = 10, seed: int = 0, regressor: str = "location_scale",
                 **trees: Any):
        if not 0.0 < alpha < 1.0:
            raise ConfigError(f"quantile: alpha must be in (0, 1), got {alpha}")
        if int(n_models) < 1:
            raise ConfigError(f"quantile: needs at least one regressor, got B={n_models}")
        if regressor not in REGRESSORS:
            raise ConfigError(f"quantile: regressor must be one of {', '.join(REGRESSORS)}, got {regressor!r}")
        self.alpha, self.n_models, self.seed, self.regressor = float(alpha), int(n_models), int(seed), regressor
        self.trees = {**DEFAULT_TREES, **trees}
        self.models: list[tuple[Any, Any, float]] = []  # (location or quantile model, scale model or None, scale floor)
        self.c = 0.0

    def _tree(self, b: int, **loss: Any):
        from sklearn.ensemble import HistGradientBoostingRegressor

        from ...rng import seeded

        return HistGradientBoostingRegressor(
            early_stopping=False, random_state=seeded(self.seed, "quantile/model", b) % (2**32), **loss, **self.trees
        )

    def fit(self, features: np.ndarray, stats: np.ndarray) -> "BaggedQuantileRegressor":
        from ...rng import numpy_rng

        x, s = np.asarray(features, np.float64), np.asarray(stats, np.float64)
        n = len(s)
        if n < 2 or x.shape[0] != n:
            raise DataError(f"quantile: need at least 2 (feature, statistic) pairs to fit, got {n}")
        self.models, self.c = [], 0.0
        oob_mu, oob_sigma, oob_n = np.zeros(n), np.zeros(n), np.zeros(n)
        for b in range(self.n_models):
            idx = numpy_rng(self.seed, "quantile/bootstrap", b).integers(0, n, n)
            if self.regressor == "pinball":
                self.models.append((self._tree(b, loss="quantile", quantile=self.alpha).fit(x[idx], s[idx]), None, 0.0))
                continue
            loc = self._tree(b).fit(x[idx], s[idx])
            resid = np.abs(s[idx] - loc.predict(x[idx]))
            scale = self._tree(b).fit(x[idx], resid)
            floor = max(0.05 * float(resid.mean()), 1e-12)
            self.models.append((loc, scale, floor))
            oob = np.ones(n, dtype=bool)
            oob[idx] = False
            if oob.any():
                oob_mu[oob] += loc.predict(x[oob])
                oob_sigma[oob] += np.maximum(scale.predict(x[oob]), floor)
                oob_n[oob] += 1
        if self.regressor == "location_scale":
            seen = oob_n > 0
            if seen.sum() >= 1:
                z = (s[seen] - oob_mu[seen] / oob_n[seen]) / (oob_sigma[seen] / oob_n[seen])
            else:  # every point in every bag (tiny n): fall back to in-bag residuals
                mu, sigma = self._location_scale(x)
                z = (s - mu.mean(0)) / sigma.mean(0)
            self.c = float(np.quantile(z, self.alpha))
        return self

    def _location_scale(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mu = np.stack([loc.predict(x) for loc, _, _ in self.models])
        sigma = np.stack([np.maximum(scale.predict(x), floor) for _, scale, floor in self.models])
        return mu, sigma

    def predict(self, features: np.ndarray) -> np.ndarray:
        """[B, N] predicted α-quantiles."""
        if not self.models:
            raise ConfigError("quantile: the regressors are not fitted; call calibrate() first")
        x = np.asarray(features, np.float64)
        if self.regressor == "pinball":
            return np.stack([m.predict(x) for m, _, _ in self.models])
        mu, sigma = self._location_scale(x)
        return mu + sigma * self.c

    def params(self) -> dict[str, Any]:
        kind = {"location_scale": "bagged location-scale (squared-loss boosting for mu and |s-mu|, out-of-bag "
                                  "alpha-quantile of standardized residuals)",
                "pinball": "bagged HistGradientBoostingRegressor(loss='quantile')"}[self.regressor]
        return {"kind": kind, "model": "sklearn HistGradientBoostingRegressor", **self.trees,
                **({"c_alpha": self.c} if self.regressor == "location_scale" else {})}


def rule_fprs(quantiles: np.ndarray, stats: np.ndarray) -> dict[str, float]:
    """Empirical FPR on non-members of "member iff s < mean_b q_b" and of the majority vote of s < q_b."""
    stats = np.asarray(stats, np.float64)
    if stats.size == 0:
        return {"mean": float("nan"), "vote": float("nan")}
    return {
        "mean": float(np.mean(stats < quantiles.mean(0))),
        "vote": float(np.mean((stats[None] < quantiles).mean(0) > 0.5)),
    }


@ATTACKS.register("quantile")
class QuantileRegression(Attack):
    name = "quantile"
    learned = True
    statistic, members_lower = "log t-error", True

    def __init__(
        self, t_sec: int = 150, k: int = 10, alpha: float = 0.01, n_models: int = 10, fit_fraction: float = 0.7,
        regressor: str = "location_scale", use_cond: bool = False, max_iter: int = 50, learning_rate: float = 0.1,
        max_depth: int = 2, min_samples_leaf: int = 20, seed: int = 0,
    ):
        super().__init__(seed)
        if not 0.0 < fit_fraction < 1.0:
            raise ConfigError(f"quantile: fit_fraction must be in (0, 1), got {fit_fraction}")
        self.secmi = SecMI(t_sec, k, seed)
        self.fit_fraction, self.use_cond = float(fit_fraction), bool(use_cond)
        self.bag = BaggedQuantileRegressor(
            alpha, n_models, seed, regressor, max_iter=int(max_iter), learning_rate=float(learning_rate),
            max_depth=int(max_depth), min_samples_leaf=int(min_samples_leaf),
        )
        self.fit_ids: list[str] = []
        self.heldout_ids: list[str] = []
        self.heldout_fpr: dict[str, float] = {}

    def _statistic(self, target: AttackTarget, batch: EncodedSamples) -> dict[str, Tensor]:
        err = self.secmi.error_map(target, batch).float().pow(2).flatten(1).sum(1)
        feats = latent_features(batch.latents, batch.cond if self.use_cond else None)
        return {"s": err.clamp_min(1e-30).log(), "features": feats}

    def fit_features(self, target, samples, batch_size, progress):
        out, nfe = map_batches(target, samples, self._statistic, batch_size, progress, "quantile/calibrate")
        return {"s": out["s"], "features": out["features"]}, nfe

    def fit(self, features, labels, ids) -> AttackScores:
        from ...rng import numpy_rng

        members, nonmembers = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
        n_non = len(nonmembers)
        n_fit = int(round(self.fit_fraction * n_non))
        if n_fit < 2 or n_fit >= n_non:
            raise DataError(
                f"quantile: cannot split {n_non} calibration non-members into a fit part (fraction "
                f"{self.fit_fraction}, at least 2) and a held-out part (at least 1)"
            )
        perm = numpy_rng(self.seed, "quantile/fit-split").permutation(n_non)
        fit_idx, held_idx = nonmembers[np.sort(perm[:n_fit])], nonmembers[np.sort(perm[n_fit:])]
        s, feats = features["s"], features["features"]
        self.fit_ids = [ids[i] for i in fit_idx]
        self.heldout_ids = [ids[i] for i in held_idx]
        self.bag.fit(feats[fit_idx], s[fit_idx])

        keep = np.concatenate([members, held_idx])
        q = self.bag.predict(feats[keep])
        self.heldout_fpr = rule_fprs(q[:, len(members):], s[held_idx])
        scores = q.mean(0) - s[keep]
        return AttackScores(scores, s[keep], 0.0, ids=[ids[i] for i in keep],
                            labels=member_labels(len(members), len(held_idx)))

    def _score_batch(self, target, batch):
        if not self.bag.models:
            raise ConfigError("quantile: call calibrate() first (it fits the regressors on calibration non-members)")
        out = self._statistic(target, batch)
        q = self.bag.predict(out["features"].cpu().numpy()).mean(0)
        s = out["s"]
        return {"score": torch.from_numpy(q).to(s) - s, "raw": s}

    def params(self) -> dict[str, Any]:
        return {
            **self.secmi.params(), "statistic": "log summed squared t-error", "alpha": self.bag.alpha,
            "n_models": self.bag.n_models, "fit_fraction": self.fit_fraction,
            "regressor": self.bag.regressor, "regressor_params": self.bag.params(),
            "features": f"latents avg-pooled to <= {POOL}x{POOL} + per-channel std and mean |diff|"
                        + (" + token-mean cond" if self.use_cond else ""),
            "n_fit": len(self.fit_ids), "n_heldout": len(self.heldout_ids),
            "heldout_fpr": self.heldout_fpr.get("mean"), "heldout_fpr_vote": self.heldout_fpr.get("vote"),
        }
