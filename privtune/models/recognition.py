"""Recognisability of a text-to-image model's generations, scored by retrieval in a fixed feature space.

For each caption we generate one image and rank every real image of a reference set by similarity
to it; a hit means the caption's own real image is among the top k. The feature space is fixed and
training-free (coarse pixels plus a foreground colour histogram), so the score cannot be gamed by
fitting the scorer and it is comparable across models. Chance level is k / N.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 3.5


def to_uint8(images: Sequence[Image.Image] | np.ndarray) -> np.ndarray:
    """Stack PIL images (or pass an array through) as uint8 [N, H, W, 3]."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            images = np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)
        return images
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])


def features(images: np.ndarray) -> np.ndarray:
    """Fixed features: 8x8 and 4x4 area-averaged RGB plus a 4x4x4 colour histogram of non-white pixels."""
    x = images.astype(np.float32) / 255.0
    n, h, w, _ = x.shape
    coarse8 = x.reshape(n, 8, h // 8, 8, w // 8, 3).mean(axis=(2, 4)).reshape(n, -1)
    coarse4 = x.reshape(n, 4, h // 4, 4, w // 4, 3).mean(axis=(2, 4)).reshape(n, -1)
    foreground = (x.min(axis=-1) < 0.9).reshape(n, -1).astype(np.float32)
    bins = np.minimum((x * 4).astype(np.int64), 3).reshape(n, -1, 3)
    index = bins[..., 0] * 16 + bins[..., 1] * 4 + bins[..., 2]
    hist = np.zeros((n, 64), np.float32)
    for i in range(n):
        hist[i] = np.bincount(index[i], weights=foreground[i], minlength=64)
    hist /= np.maximum(hist.sum(axis=1, keepdims=True), 1.0)
    return np.concatenate([coarse8, coarse4 * 2.0, np.sqrt(hist) * 2.0], axis=1)


def retrieval_ranks(query: np.ndarray, gallery: np.ndarray, truth: Sequence[int]) -> np.ndarray:
    """0-based rank of each query's true gallery item under cosine similarity of gallery-centred features."""
    mean = gallery.mean(axis=0, keepdims=True)
    q = query - mean
    g = gallery - mean
    q /= np.linalg.norm(q, axis=1, keepdims=True) + 1e-8
    g /= np.linalg.norm(g, axis=1, keepdims=True) + 1e-8
    sims = q @ g.T
    true_sims = sims[np.arange(len(q)), np.asarray(truth)]
    return (sims > true_sims[:, None]).sum(axis=1)


def retrieval_scores(ranks: np.ndarray, gallery_size: int, ks: Sequence[int] = (1, 10)) -> dict:
    """Top-k accuracies from ranks, each with its chance level k / N and the ratio to chance."""
    out: dict = {"n_queries": int(len(ranks)), "gallery_size": int(gallery_size), "median_rank": float(np.median(ranks) + 1)}
    for k in ks:
        acc = float((ranks < k).mean())
        chance = k / gallery_size
        out[f"top{k}"] = acc
        out[f"top{k}_chance"] = chance
        out[f"top{k}_x_chance"] = acc / chance
    return out


@torch.no_grad()
def generate(pipe, captions: Sequence[str], steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE,
             seed: int = 0, batch_size: int = 64) -> np.ndarray:
    """Generate one image per caption with a diffusers pipeline (seeded); returns uint8 [N, H, W, 3]."""
    generator = torch.Generator().manual_seed(seed)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    chunks = []
    for start in range(0, len(captions), batch_size):
        out = pipe(list(captions[start:start + batch_size]), num_inference_steps=steps, guidance_scale=guidance,
                   height=size, width=size, generator=generator, output_type="np")
        chunks.append(to_uint8(out.images))
    return np.concatenate(chunks)


def evaluate(pipe, real_images: np.ndarray, captions: Sequence[str], query_index: Sequence[int],
             steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE, seed: int = 0) -> tuple[dict, np.ndarray]:
    """Generate for captions[query_index] and score retrieval of real_images[query_index] among all real_images."""
    generated = generate(pipe, [captions[i] for i in query_index], steps=steps, guidance=guidance, seed=seed)
    ranks = retrieval_ranks(features(generated), features(real_images), query_index)
    scores = retrieval_scores(ranks, len(real_images))
    scores.update(steps=steps, guidance=guidance, seed=seed)
    return scores, generated


def sample_indices(n: int, k: int, seed: int = 0) -> list[int]:
    """A fixed, seeded sample of k indices out of n (sorted) so evaluations are comparable."""
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(n, size=min(k, n), replace=False).tolist())


def contact_sheet(real: np.ndarray, generated: np.ndarray, path: str | Path, cols: int = 8, scale: int = 2) -> None:
    """Save a PNG grid of (real | generated) pairs, `cols` pairs per row, upscaled `scale` times."""
    n, h, w, _ = real.shape
    rows = (n + cols - 1) // cols
    pad = 2
    cell_w = 2 * w + 3 * pad
    sheet = np.full((rows * (h + pad) + pad, cols * cell_w, 3), 128, np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        y = pad + r * (h + pad)
        x = c * cell_w + pad
        sheet[y:y + h, x:x + w] = real[i]
        sheet[y:y + h, x + w + pad:x + 2 * w + pad] = generated[i]
    image = Image.fromarray(sheet)
    image.resize((image.width * scale, image.height * scale), Image.NEAREST).save(path)
