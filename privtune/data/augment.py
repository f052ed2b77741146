"""Training-time pixel augmentations: the simple MIA defenses evaluated by SecMI.

Duan et al., "Are Diffusion Models Vulnerable to Membership Inference Attacks?" (ICML 2023,
arXiv 2302.01316; specs/defenses.md section 9) train with Cutout, random horizontal flips and
RandAugment(num_ops=5) as baselines a new defense must beat. Here:

* Cutout (DeVries & Taylor, arXiv 1708.04552): one `data.cutout` x `data.cutout` square per image,
  centred uniformly at random (clipped at the borders), filled with 0 in the VAE's [-1, 1] input
  range (mid grey, as the original zeroes the normalised image).
* RandAugment (Cubuk et al., arXiv 1909.13719) through kornia's `RandAugment(n, m)`:
  `data.randaugment` operations per image at magnitude `data.randaugment_magnitude` (0-30;
  torchvision's default 9 is the SecMI setting).
* Random horizontal flip is `data.random_flip` (handled with the crop in `transforms.preprocess`).

Every random choice is drawn per image from (seed, micro-step, row), so batches are a pure function
of the step (exact resume) and do not depend on batch composition. Only the training loop calls
this module; attack queries are encoded by `eval.encode` from the un-augmented images.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import ConfigError
from ..rng import seeded, torch_generator


def cutout(image: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """`image` [C,H,W] with one size x size square (centre uniform, clipped at the edges) set to 0."""
    _, h, w = image.shape
    cy = int(torch.randint(0, h, (1,), generator=generator))
    cx = int(torch.randint(0, w, (1,), generator=generator))
    y0, y1 = max(0, cy - size // 2), min(h, cy - size // 2 + size)
    x0, x1 = max(0, cx - size // 2), min(w, cx - size // 2 + size)
    out = image.clone()
    out[:, y0:y1, x0:x1] = 0.0
    return out


class Augmentation:
    """The configured training augmentations, applied to a batch of [-1, 1] pixels [B,3,H,W]."""

    def __init__(self, cutout_size: int = 0, randaugment_ops: int = 0, randaugment_magnitude: int = 9):
        self.cutout_size = int(cutout_size)
        self.randaugment_ops = int(randaugment_ops)
        self.randaugment_magnitude = int(randaugment_magnitude)
        self.randaugment = None
        if self.randaugment_ops:
            import kornia.augmentation as K

            self.randaugment = K.auto.RandAugment(n=self.randaugment_ops, m=self.randaugment_magnitude)

    def describe(self) -> str:
        parts = []
        if self.randaugment is not None:
            parts.append(f"RandAugment(n={self.randaugment_ops}, m={self.randaugment_magnitude})")
        if self.cutout_size:
            parts.append(f"Cutout({self.cutout_size}x{self.cutout_size})")
        return " then ".join(parts)

    def __call__(self, pixels: torch.Tensor, seed: int, micro_step: int, rows: Sequence[int]) -> torch.Tensor:
        out = []
        for image, row in zip(pixels, rows):
            if self.randaugment is not None:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seeded(seed, "randaugment", micro_step, row))
                    unit = ((image.float().unsqueeze(0) + 1) / 2).clamp(0, 1)
                    image = (self.randaugment(unit)[0] * 2 - 1).to(pixels.dtype)
            if self.cutout_size:
                image = cutout(image, self.cutout_size, torch_generator(seed, "cutout", micro_step, row))
            out.append(image)
        return torch.stack(out)


def build_augmentation(data_cfg) -> Augmentation | None:
    """The augmentation the `data.cutout` / `data.randaugment` keys ask for, or None when both are off."""
    size = int(data_cfg.get("cutout", 0) or 0)
    ops = int(data_cfg.get("randaugment", 0) or 0)
    magnitude = int(data_cfg.get("randaugment_magnitude", 9))
    if size < 0 or size > int(data_cfg.resolution):
        raise ConfigError(f"data.cutout must be 0 (off) or a hole size in pixels up to data.resolution={data_cfg.resolution} (got {size})")
    if ops < 0:
        raise ConfigError(f"data.randaugment must be 0 (off) or a number of operations >= 1 (got {ops})")
    if not 0 <= magnitude <= 30:
        raise ConfigError(f"data.randaugment_magnitude must be in [0, 30] (got {magnitude})")
    if not size and not ops:
        return None
    return Augmentation(size, ops, magnitude)
