"""Memorized-prompt detection of Wen, Liu, Chen & Lyu, "Detecting, Explaining, and Mitigating
Memorization in Diffusion Models" (ICLR 2024); specs/attacks.md §9.2, defenses.md §3.

The statistic is the text-conditional noise magnitude ||ε_θ(x_t, c) − ε_θ(x_t, ∅)||₂ over the whole
latent, recorded along deterministic DDIM sampling with classifier-free guidance from a seeded x_T,
averaged over the recorded steps and over `generations` draws of x_T (the same draws for every prompt:
common random numbers). It is prompt-level: the sample's image latent is not used, only its caption.
Higher = memorized = member; raw = score = the mean magnitude.

* `wen`: first step only (2 NFE per generation; spec default 4 generations);
* `wen_trajectory`: every step of the trajectory (spec: 50 steps × 4 generations = 400 NFE; the CPU
  defaults here are 25 steps × 2 generations, `steps=50, generations=4` restores the spec's).

Needs the target's empty-prompt embedding (`AttackTarget.uncond`). When the target predictor itself
applies guidance w, its ε(c) − ε(∅) is w times the conditional direction and is divided by w.
"""

from __future__ import annotations

from typing import Any

import torch

from ...errors import ConfigError
from ...memorization.wen import sampling_magnitudes
from ..primitives import seeded_noise
from .base import ATTACKS, Attack, base_predictor


@ATTACKS.register("wen")
class WenAttack(Attack):
    name = "wen"
    statistic, members_lower = "text-conditional noise magnitude", False
    record_all = False

    def __init__(self, generations: int = 4, steps: int = 50, guidance: float = 7.5, seed: int = 0):
        super().__init__(seed)
        if int(generations) < 1 or int(steps) < 1 or float(guidance) < 0:
            raise ConfigError(f"{self.name} attack needs generations >= 1, steps >= 1 and guidance >= 0")
        self.generations = int(generations)
        self.steps = int(steps)
        self.guidance = float(guidance)

    def _score_batch(self, target, batch):
        if target.uncond is None:
            raise ConfigError(f"{self.name} attack needs the empty-prompt embedding (AttackTarget.uncond)")
        w = float(getattr(base_predictor(target.predictor), "guidance_scale", 1.0)) or 1.0
        x0 = batch.latents
        uncond = target.uncond.to(device=x0.device, dtype=batch.cond.dtype)
        record = self.steps if self.record_all else 1
        per_gen = []
        for g in range(self.generations):
            x_T = seeded_noise(x0.shape[1:], self.seed, f"{self.name}/x_T{g}", None, x0.device, x0.dtype).expand_as(x0)
            mags = sampling_magnitudes(target.predictor, x_T, batch.cond, uncond, target.alphas_cumprod,
                                       self.steps, record, self.guidance)
            per_gen.append(mags.mean(0))
        raw = torch.stack(per_gen).mean(0) / w
        return {"score": raw, "raw": raw}

    def params(self) -> dict[str, Any]:
        return {"generations": self.generations, "sampling_steps": self.steps, "guidance": self.guidance,
                "recorded_steps": "all" if self.record_all else "first", "norm": "L2 over the latent", "seed": self.seed}


@ATTACKS.register("wen_trajectory")
class WenTrajectoryAttack(WenAttack):
    name = "wen_trajectory"
    record_all = True

    def __init__(self, generations: int = 2, steps: int = 25, guidance: float = 7.5, seed: int = 0):
        super().__init__(generations, steps, guidance, seed)
