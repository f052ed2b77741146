"""PIA and PIAN of Kong, Duan, Ma, Shen, Zhu, Shi & Xu, "An Efficient Membership Inference Attack
for the Diffusion Model by Proximal Initialization" (ICLR 2024, arXiv 2305.18355);
specs/attacks.md §3.

ε₀ = ε_θ(x0, 0, c) stands in for the noise of x0's deterministic trajectory; x_t = sqrt(ᾱ_t)·x0 +
σ_t·ε₀ and ε_t = ε_θ(x_t, t, c). Members' trajectories are consistent, so R = Σ|ε₀ − ε_t|^p (p-th
power sum without the root, p = 4, as the official code) is smaller. PIAN rescales ε₀ per sample
to mean |ε₀| = sqrt(2/π) first (it is known to fail on latent models; kept for comparison).
privtune default: guidance 1, t chosen on calibration from {100, 200, 300, 500} by AUC, ε₀ computed
once per sample and reused over candidates. raw = R, score = −R. NFE: 2 per sample (1 + #t during
calibration), doubled under CFG.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from ...errors import ConfigError
from ..primitives import add_noise, as_timesteps
from .base import ATTACKS, Attack, AttackScores, EncodedSamples, best_by_auc, map_batches, member_labels

DEFAULT_TIMESTEPS = (100, 200, 300, 500)


@ATTACKS.register("pia")
class PIA(Attack):
    name = "pia"
    statistic, members_lower = "PIA error", True
    normalize = False

    def __init__(self, timesteps: Sequence[int] = DEFAULT_TIMESTEPS, p: float = 4, seed: int = 0):
        super().__init__(seed)
        self.timesteps = [int(t) for t in timesteps]
        if not self.timesteps or min(self.timesteps) < 1:
            raise ConfigError(f"{self.name}: needs at least one timestep >= 1, got {list(timesteps)}")
        self.p = float(p)
        self.t = self.timesteps[0] if len(self.timesteps) == 1 else None
        self.calibration_auc: dict[str, float] = {}

    def _distances(self, target, batch: EncodedSamples, timesteps: Sequence[int]) -> dict[int, torch.Tensor]:
        x0, cond, ac = batch.latents, batch.cond, target.alphas_cumprod
        eps0 = target.predictor(x0, as_timesteps(0, x0.shape[0], x0.device), cond)
        if self.normalize:
            eps0 = eps0 * math.sqrt(2 / math.pi) / eps0.abs().mean(dim=tuple(range(1, eps0.dim())), keepdim=True)
        out = {}
        for t in timesteps:
            tt = as_timesteps(t, x0.shape[0], x0.device)
            eps_t = target.predictor(add_noise(x0, eps0, tt, ac), tt, cond)
            out[t] = (eps0 - eps_t).float().abs().pow(self.p).flatten(1).sum(1)
        return out

    def calibrate(self, target, members, nonmembers, batch_size=32, progress=True) -> AttackScores:
        cal = EncodedSamples.concat([members, nonmembers])
        labels = member_labels(len(members), len(nonmembers))
        out, nfe = map_batches(
            target, cal, lambda tg, b: self._distances(tg, b, self.timesteps), batch_size, progress,
            f"{self.name}/calibrate",
        )
        self.t, self.calibration_auc = best_by_auc({t: -out[t] for t in self.timesteps}, labels)
        return AttackScores(-out[self.t], out[self.t], nfe, ids=list(cal.ids), labels=labels)

    def _score_batch(self, target, batch):
        if self.t is None:
            raise ConfigError(f"{self.name}: call calibrate() first, or give a single timestep")
        raw = self._distances(target, batch, [self.t])[self.t]
        return {"score": -raw, "raw": raw}

    def params(self) -> dict[str, Any]:
        return {
            "t": self.t, "timestep_candidates": self.timesteps, "p": self.p, "normalize_eps0": self.normalize,
            "calibration_auc": self.calibration_auc, "seed": self.seed,
        }


@ATTACKS.register("pian")
class PIAN(PIA):
    name = "pian"
    normalize = True
