"""REDIFFUSE of Li, Dong, He & Zhang, "Towards Black-Box Membership Inference Attack for Diffusion Models"
(ICML 2025, arXiv 2405.20771); specs/attacks.md §8.3.

Only an image-variation API is queried: n variations of the query image x (each noised to step t with fresh noise
and DDIM-denoised back with stride k by the release), averaged **in pixel space**, and the score is the distance from
x to that mean, not the mean of the distances (§14 pitfall): SSIM(x, x̄) for latent (SD) models, the spec's choice,
higher = member; `distance=l1` is the pixel-model variant (mean |x - x̄|, lower = member). The variations are
conditioned on the query's caption, which the attacker of this threat model holds.

Defaults are the spec's SD setting: t = 10, k = 10, n = 10 (10 UNet passes and 10 VAE round trips per query). No
learned part: the runner fits direction and threshold on the calibration half.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...errors import ConfigError
from .base import ATTACKS
from .blackbox import BlackBoxAttack, generation_seeds
from .structural import ssim

DISTANCES = ("ssim", "l1")


@ATTACKS.register("rediffuse")
class ReDiffuse(BlackBoxAttack):
    name = "rediffuse"
    requires = ("generation", "variation")

    def __init__(self, t: int = 10, stride: int = 10, n: int = 10, distance: str = "ssim", use_caption: bool = True,
                 seed: int = 0):
        super().__init__(seed)
        self.t, self.stride, self.n = int(t), int(stride), int(n)
        if self.stride <= 0 or self.t <= 0 or self.t % self.stride or self.n < 1:
            raise ConfigError(f"rediffuse: needs t a positive multiple of stride and n >= 1; got t={t}, stride={stride}, n={n}")
        if distance not in DISTANCES:
            raise ConfigError(f"rediffuse: distance must be one of {DISTANCES}, got {distance!r}")
        self.distance, self.use_caption = distance, bool(use_caption)
        self.statistic = "SSIM to the mean variation" if distance == "ssim" else "L1 distance to the mean variation"
        self.members_lower = distance == "l1"

    def _query(self, api, batch) -> dict[str, np.ndarray]:
        x = batch.pixels.float().cpu()
        prompts = list(batch.captions) if self.use_caption else [""] * len(batch)
        total = None
        for j in range(self.n):
            v = api.variations(x, prompts, self.t, self.stride, generation_seeds(self.seed, j, len(batch), "variation"))
            total = v if total is None else total + v
        mean = total / self.n
        if self.distance == "ssim":
            raw = ssim(mean, x).numpy()
            return {"score": raw, "raw": raw}
        raw = (mean - x).abs().flatten(1).mean(1).numpy()
        return {"score": -raw, "raw": raw}

    def params(self) -> dict[str, Any]:
        return {**super().params(), "t": self.t, "stride": self.stride, "n": self.n, "distance": self.distance,
                "average": "pixel space, then one distance", "conditioned_on": "caption" if self.use_caption else "empty prompt"}
