"""Loss-threshold MIA of Matsumoto, Miura & Yanai, "Membership Inference Attacks against Diffusion
Models" (arXiv 2302.03262, IEEE SPW 2023); specs/attacks.md §1.

Members are fitted better, so their single-step diffusion loss ‖ε − ε_θ(x_t, t, c)‖² is lower.
privtune default (§1c): t chosen on the calibration split from {50, 100, 200, 350, 500} by AUC,
K = 4 noise draws per t averaged, conditioning on the sample's caption with the target's own
guidance (1 by default). raw = mean over draws of the summed squared error; score = −raw.
NFE: K per sample at the chosen t (K·|candidates| per calibration sample).

Noise: with noise="shared" (default) draw k is one fixed tensor used for every sample (common
random numbers shared by members and non-members, as §1c asks); with noise="per_sample" it is
seeded by (seed, sample id, k). Both are independent of batching and sharding.
"""

from __future__ import annotations

from typing import Any, Hashable, Sequence

from torch import Tensor

from ...errors import ConfigError
from ..primitives import seeded_noise, single_step_loss
from .base import ATTACKS, Attack, AttackScores, AttackTarget, EncodedSamples, best_by_auc, map_batches, member_labels

DEFAULT_TIMESTEPS = (50, 100, 200, 350, 500)


@ATTACKS.register("loss")
class LossAttack(Attack):
    name = "loss"
    statistic, members_lower = "denoising loss", True

    def __init__(self, timesteps: Sequence[int] = DEFAULT_TIMESTEPS, draws: int = 4, noise: str = "shared", seed: int = 0):
        super().__init__(seed)
        self.timesteps = [int(t) for t in timesteps]
        if not self.timesteps or int(draws) < 1:
            raise ConfigError("loss attack needs at least one timestep and draws >= 1")
        if noise not in ("shared", "per_sample"):
            raise ConfigError(f"loss attack: noise must be 'shared' or 'per_sample', got {noise!r}")
        self.draws = int(draws)
        self.noise = noise
        self.t = self.timesteps[0] if len(self.timesteps) == 1 else None
        self.calibration_auc: dict[str, float] = {}

    def _losses(self, target: AttackTarget, batch: EncodedSamples, timesteps: Sequence[int]) -> dict[Hashable, Tensor]:
        x0 = batch.latents
        total = {t: 0.0 for t in timesteps}
        for k in range(self.draws):
            ids = None if self.noise == "shared" else batch.ids
            noise = seeded_noise(x0.shape[1:], self.seed, f"loss/draw{k}", ids, x0.device, x0.dtype)
            noise = noise.expand_as(x0)
            for t in timesteps:
                total[t] = total[t] + single_step_loss(target.predictor, x0, t, noise, batch.cond, target.alphas_cumprod)
        return {t: v / self.draws for t, v in total.items()}

    def calibrate(self, target, members, nonmembers, batch_size=32, progress=True) -> AttackScores:
        cal = EncodedSamples.concat([members, nonmembers])
        labels = member_labels(len(members), len(nonmembers))
        out, nfe = map_batches(
            target, cal, lambda tg, b: self._losses(tg, b, self.timesteps), batch_size, progress, "loss/calibrate"
        )
        self.t, self.calibration_auc = best_by_auc({t: -out[t] for t in self.timesteps}, labels)
        return AttackScores(-out[self.t], out[self.t], nfe, ids=list(cal.ids), labels=labels)

    def _score_batch(self, target, batch):
        if self.t is None:
            raise ConfigError("loss attack: call calibrate() first, or give a single timestep")
        raw = self._losses(target, batch, [self.t])[self.t]
        return {"score": -raw, "raw": raw}

    def params(self) -> dict[str, Any]:
        return {
            "t": self.t, "timestep_candidates": self.timesteps, "draws": self.draws, "noise": self.noise,
            "reduction": "sum", "calibration_auc": self.calibration_auc, "seed": self.seed,
        }
