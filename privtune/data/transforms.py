"""Image preprocessing with PIL and numpy (no torchvision build exists for the CPU torch here)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def resize_shorter(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    if min(w, h) == size:
        return image
    scale = size / min(w, h)
    return image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)


def crop(image: Image.Image, size: int, rng: np.random.Generator | None) -> Image.Image:
    """Center crop, or a random crop drawn from `rng`."""
    w, h = image.size
    if rng is None:
        left, top = (w - size) // 2, (h - size) // 2
    else:
        left, top = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
    return image.crop((left, top, left + size, top + size))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> float tensor [3, H, W] in [-1, 1] (the VAE's input range)."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def preprocess(image: Image.Image, resolution: int, center_crop: bool = True, flip: bool = False,
               rng: np.random.Generator | None = None) -> torch.Tensor:
    """Resize the shorter side, crop to a square, optionally mirror; random choices come from `rng`."""
    image = crop(resize_shorter(image, resolution), resolution, None if center_crop else rng)
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return to_tensor(image)
