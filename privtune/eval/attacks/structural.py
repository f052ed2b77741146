"""Structural MIA of Li, Fu, Wang, Liu, Gao, Dai & Han, "Unveiling Structural Memorization:
Structural Membership Inference Attack for Text-to-Image Diffusion Models" (ACM MM 2024,
arXiv 2407.13252); specs/attacks.md §7.

DDIM-invert the clean latent z0, conditioned on the sample's caption state, with stride `stride`
up to an early step t, decode the NOISY inverted latent z_t directly with the target's VAE (no
denoising; §14 pitfall) and compare it with the image: score = raw = SSIM(x, Dec(z_t)), higher =
member (members' structure survives the early forward diffusion better).

Defaults follow the spec's starting point (§7c, no official code): a 50-step DDIM grid (stride 20
on T = 1000), t chosen on the calibration split by AUC from {20, 40, 60, 100}; a single t skips
the choice. SSIM is torchmetrics' standard one (11×11 Gaussian window, σ = 1.5, k1 = 0.01,
k2 = 0.03, data range 2 for pixels in [-1, 1]), per sample, on all channels.

`calibrate` also records the VAE floor, the mean SSIM(x, Dec(z0)) over the calibration samples
(members and non-members separately): the score cannot exceed what the autoencoder itself
preserves, so the gap between the floor and the member / non-member SSIM at t is what the attack
reads.

NFE: t/stride per sample at the chosen t (max candidate/stride during calibration, where all
candidates are read off one trajectory); plus one VAE decode per candidate (and one for the floor
during calibration), which the NFE count (UNet evaluations) leaves out.
"""

from __future__ import annotations

from typing import Any, Hashable, Sequence

import numpy as np
from torch import Tensor

from ...errors import ConfigError, DataError
from ..primitives import ddim_transfer
from .base import (
    ATTACKS, Attack, AttackScores, AttackTarget, EncodedSamples, best_by_auc, map_batches, member_labels,
    missing_requirements,
)

DEFAULT_TIMESTEPS = (20, 40, 60, 100)
DATA_RANGE = 2.0  # pixels in [-1, 1]


def ssim(images: Tensor, reference: Tensor) -> Tensor:
    """Per-sample SSIM [B] of two image batches [B,3,H,W] in [-1, 1] (torchmetrics, Gaussian 11×11 window)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    reference = reference.to(device=images.device)
    if images.shape != reference.shape:
        raise DataError(
            f"structural: decoded images {tuple(images.shape)} and pixels {tuple(reference.shape)} differ in shape; "
            "samples.pixels must be the images the latents encode, at the VAE's resolution"
        )
    return structural_similarity_index_measure(
        images.float(), reference.float(), data_range=DATA_RANGE, reduction="none"
    ).reshape(-1)


@ATTACKS.register("structural")
class StructuralMIA(Attack):
    name = "structural"
    statistic, members_lower = "SSIM", False
    requires = ("pixels",)

    def __init__(self, timesteps: int | Sequence[int] = DEFAULT_TIMESTEPS, stride: int = 20, seed: int = 0):
        super().__init__(seed)
        self.timesteps = [int(timesteps)] if isinstance(timesteps, (int, np.integer)) else [int(t) for t in timesteps]
        self.stride = int(stride)
        if self.stride <= 0 or not self.timesteps or any(t <= 0 or t % self.stride for t in self.timesteps):
            raise ConfigError(
                f"structural: needs stride > 0 and timesteps that are positive multiples of it; "
                f"got timesteps={list(self.timesteps)}, stride={stride}"
            )
        self.timesteps = sorted(set(self.timesteps))
        self.t = self.timesteps[0] if len(self.timesteps) == 1 else None
        self.calibration_auc: dict[str, float] = {}
        self.vae_floor: dict[str, float] = {}
        self.ssim_at_t: dict[str, float] = {}

    def _check(self, target: AttackTarget, batch: EncodedSamples) -> None:
        if target.decode is None or batch.pixels is None:
            raise DataError("; ".join(missing_requirements(self, target, batch)))
        if max(self.timesteps) >= len(target.alphas_cumprod):
            raise ConfigError(f"structural: t={max(self.timesteps)} is beyond the scheduler's {len(target.alphas_cumprod)} steps")

    def _ssims(self, target: AttackTarget, batch: EncodedSamples, timesteps: Sequence[int],
               floor: bool = False) -> dict[Hashable, Tensor]:
        self._check(target, batch)
        want = set(timesteps)
        z, out = batch.latents, {}
        if floor:
            out["floor"] = ssim(target.decode(z), batch.pixels)
        for s in range(0, max(timesteps), self.stride):
            z = ddim_transfer(target.predictor, z, s, s + self.stride, batch.cond, target.alphas_cumprod)
            if s + self.stride in want:
                out[s + self.stride] = ssim(target.decode(z), batch.pixels)
        return out

    def calibrate(self, target, members, nonmembers, batch_size=32, progress=True) -> AttackScores:
        cal = EncodedSamples.concat([members, nonmembers])
        labels = member_labels(len(members), len(nonmembers))
        out, nfe = map_batches(
            target, cal, lambda tg, b: self._ssims(tg, b, self.timesteps, floor=True), batch_size, progress,
            "structural/calibrate",
        )
        if len(self.timesteps) > 1:
            self.t, self.calibration_auc = best_by_auc({t: out[t] for t in self.timesteps}, labels)
        else:
            self.calibration_auc = {}
        floor = out["floor"]
        self.vae_floor = {
            "all": float(floor.mean()), "members": float(floor[labels == 1].mean()),
            "nonmembers": float(floor[labels == 0].mean()),
        }
        at_t = out[self.t]
        self.ssim_at_t = {"members": float(at_t[labels == 1].mean()), "nonmembers": float(at_t[labels == 0].mean())}
        return AttackScores(at_t, at_t, nfe, ids=list(cal.ids), labels=labels)

    def _score_batch(self, target, batch):
        if self.t is None:
            raise ConfigError("structural: call calibrate() first, or give a single timestep")
        value = self._ssims(target, batch, [self.t])[self.t]
        return {"score": value, "raw": value}

    def params(self) -> dict[str, Any]:
        return {
            "t": self.t, "timestep_candidates": self.timesteps, "stride": self.stride,
            "nfe_inversion": None if self.t is None else self.t // self.stride,
            "ssim": {"window": "gaussian 11x11", "sigma": 1.5, "k1": 0.01, "k2": 0.03, "data_range": DATA_RANGE},
            "decoded": "noisy inverted latent z_t (no denoising)", "calibration_auc": self.calibration_auc,
            "vae_floor_ssim": self.vae_floor, "calibration_mean_ssim_at_t": self.ssim_at_t,
            "seed": self.seed,
        }
