"""Generate-and-filter training-data extraction of Carlini et al., "Extracting Training Data from
Diffusion Models" (USENIX Security 2023, arXiv 2301.13188); specs/attacks.md 9.1.

For each attacked member caption: generate N images with different seeds, link generations whose
tiled l2 is <= delta (faiss range search, privtune.data.similarity), and flag the caption when the
graph has a clique of >= k generations (the model keeps producing one image). A flagged caption
is an extraction when a clique image is within delta of the caption's own training image (the
confirmation step; the paper also inspects by hand). Member captions are attacked most-duplicated
first, as in the paper. Defaults are sized for a CPU (16 captions x 16 generations x 25 DDIM steps);
the paper's settings (500 generations, clique 10, 50 steps) are one `eval.extraction` key away.

The confirmation compares with the training image as the model's autoencoder reproduces it
(`reference: reconstruction`, the default): a latent diffusion model can at best generate the VAE's
reconstruction of an image. At SD's 512 px the VAE is nearly lossless and this equals the paper's
comparison with the raw image (`reference: image`); on a small, lossy VAE (the embedded 32 px model:
median reconstruction error 0.16 tiled l2, above the paper's delta) the raw comparison could never
confirm even a perfect copy.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import networkx as nx
import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..data.similarity import check_tiles, tiled_l2_matrix, tiled_pairs, to_pixels
from ..errors import ConfigError
from ..data.transforms import preprocess
from ..models import recognition
from .primitives import sample_seed

PAIRS_DIR = "extraction"
REFERENCES = ("reconstruction", "image")


def check_settings(node, resolution: int) -> None:
    for key in ("captions", "generations", "clique", "inference_steps"):
        if int(node[key]) < 1:
            raise ConfigError(f"eval.extraction.{key} must be >= 1 (got {node[key]})")
    if int(node.clique) > int(node.generations):
        raise ConfigError(f"eval.extraction.clique={node.clique} exceeds eval.extraction.generations={node.generations}; "
                          f"a clique cannot be larger than the number of generations")
    if not 0.0 < float(node.delta) <= 1.0:
        raise ConfigError(f"eval.extraction.delta={node.delta} is outside (0, 1] (tiled l2 on [0, 1] pixels; the paper uses ~0.15)")
    check_tiles(int(resolution), int(node.tiles))
    if str(node.get("reference", "reconstruction")) not in REFERENCES:
        raise ConfigError(f"eval.extraction.reference={node.reference!r} is not one of {', '.join(REFERENCES)}")


def settings_dict(node) -> dict:
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


def attacked_members(members, duplicated: dict[str, int], n: int):
    """The first `n` members, most duplicated first, then in split order (Carlini et al. attack duplicated captions)."""
    order = sorted(range(len(members)), key=lambda i: (-duplicated.get(members[i].id, 1), i))
    return [members[i] for i in order[:n]]


@torch.no_grad()
def autoencoded(pipe, images, resolution: int, batch_size: int = 64) -> np.ndarray:
    """The images after the pipeline's VAE (encode, posterior mean, decode), as [N, H, W, 3] floats in [0, 1]."""
    vae = pipe.vae
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.stack([preprocess(im, resolution) for im in images[start:start + batch_size]])
        x = x.to(device=vae.device, dtype=vae.dtype)
        y = vae.decode(vae.encode(x).latent_dist.mean).sample.float().clamp(-1, 1)
        y = ((y + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        out.append(to_pixels([Image.fromarray(i) for i in y], resolution))
    return np.concatenate(out)


def largest_clique(x: np.ndarray, delta: float, tiles: int) -> list[int]:
    """Indices of a maximum clique of the graph 'tiled l2 <= delta' over the generations x."""
    graph = nx.Graph()
    graph.add_nodes_from(range(len(x)))
    graph.add_edges_from((i, j) for i, j, _ in tiled_pairs(x, delta, tiles))
    return max(nx.find_cliques(graph), key=lambda c: (len(c), -min(c)))


def save_pair(generated: np.ndarray, training: np.ndarray, path: Path, scale: int = 4) -> None:
    """generation | training image, side by side, upscaled."""
    h, w, _ = generated.shape
    pair = np.full((h, 2 * w + 2, 3), 255, np.uint8)
    pair[:, :w], pair[:, w + 2:] = generated, training
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pair).resize(((2 * w + 2) * scale, h * scale), Image.NEAREST).save(path)


def run_extraction(pipe, members, node, *, resolution: int, seed: int, duplicated: dict[str, int] | None = None,
                   out_dir: Path | None = None, progress: bool = True) -> dict:
    """Attack `members` (Records) of a pipeline; returns the report section (and writes pair PNGs under out_dir)."""
    check_settings(node, resolution)
    duplicated = dict(duplicated or {})
    start = time.perf_counter()
    delta, tiles, k = float(node.delta), int(node.tiles), int(node.clique)
    reference = str(node.get("reference", "reconstruction"))
    chosen = attacked_members(members, duplicated, int(node.captions))
    images = [r.image for r in chosen]
    raw = to_pixels(images, resolution)
    targets = autoencoded(pipe, images, resolution) if reference == "reconstruction" else raw
    rows, extracted = [], []
    for rec, target, own in tqdm(list(zip(chosen, targets, raw)), desc="extraction", disable=not progress, dynamic_ncols=True):
        gen = recognition.generate(pipe, [rec.caption] * int(node.generations), steps=int(node.inference_steps),
                                   guidance=float(node.guidance_scale), seed=sample_seed(seed, rec.id, "extraction") % (2 ** 31),
                                   batch_size=int(node.generations))
        x = to_pixels([Image.fromarray(g) for g in gen], resolution)
        clique = largest_clique(x, delta, tiles)
        dist = tiled_l2_matrix(x[clique], target[None], tiles)[:, 0]
        best = int(np.argmin(dist))
        flagged = len(clique) >= k
        hit = flagged and float(dist[best]) <= delta
        row = {"id": rec.id, "caption": rec.caption, "repeats": duplicated.get(rec.id, 1), "clique_size": len(clique),
               "flagged": flagged, "distance": round(float(dist[best]), 5),
               "image_distance": round(float(tiled_l2_matrix(x[clique], own[None], tiles).min()), 5),
               "extracted": hit}
        rows.append(row)
        if hit:
            extracted.append(rec.id)
            if out_dir is not None:
                name = re.sub(r"[^A-Za-z0-9_.-]+", "_", rec.id)
                save_pair(gen[clique[best]], np.round(own * 255).astype(np.uint8), Path(out_dir) / PAIRS_DIR / f"{name}.png")
    dup_ids = sorted(i for i, r in duplicated.items() if r > 1)
    return {
        "method": "Carlini et al. 2023 generate-and-filter (tiled l2 clique + match with the caption's training image)",
        "settings": {**settings_dict(node), "resolution": resolution},
        "n_captions": len(chosen),
        "n_flagged": sum(r["flagged"] for r in rows),
        "n_extracted": len(set(extracted)),
        "extracted_members": sorted(set(extracted)),
        "duplicated_members": dup_ids,
        "extracted_duplicated": len(set(extracted) & set(dup_ids)),
        "per_caption": rows,
        "pairs_dir": PAIRS_DIR if extracted and out_dir is not None else None,
        "seconds": round(time.perf_counter() - start, 2),
    }
