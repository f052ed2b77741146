"""Image similarity shared by deduplication and the extraction attack: tiled l2 in pixel space and
faiss neighbour search (no all-pairs Python loop).

Tiled l2 (Carlini et al., "Extracting Training Data from Diffusion Models", USENIX Security 2023,
arXiv 2301.13188; specs/attacks.md 9.1): both images at one size in [0, 1], split into a grid of
non-overlapping tiles, per-tile RMS distance, and the *maximum* over tiles, so two images match
only if every tile matches (a similar global colour is not enough).

Search: the global RMS distance is the root of the mean of the squared per-tile RMS distances,
so it never exceeds the tiled distance. A faiss range search on the flattened images with radius
delta therefore returns every pair within tiled-l2 delta (plus some extra), and only those
candidates are checked exactly.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from ..errors import ConfigError


def to_pixels(images: Sequence[Image.Image], resolution: int) -> np.ndarray:
    """PIL images -> float32 [N, R, R, 3] in [0, 1], each resized (whole image, area filter) to R x R."""
    out = np.empty((len(images), resolution, resolution, 3), np.float32)
    for i, im in enumerate(images):
        im = im.convert("RGB")
        if im.size != (resolution, resolution):
            im = im.resize((resolution, resolution), Image.BOX if min(im.size) >= resolution else Image.BILINEAR)
        out[i] = np.asarray(im, dtype=np.float32) / 255.0
    return out


def check_tiles(resolution: int, tiles: int) -> None:
    if tiles < 1 or resolution % tiles:
        raise ConfigError(f"tiles={tiles} must be >= 1 and divide the comparison resolution {resolution} (e.g. 4 tiles for 32 px)")


def _tiles(x: np.ndarray, tiles: int) -> np.ndarray:
    """[N, H, W, C] -> [N, tiles*tiles, tile pixels * C]."""
    n, h, w, c = x.shape
    check_tiles(h, tiles)
    th, tw = h // tiles, w // tiles
    return x.reshape(n, tiles, th, tiles, tw, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, tiles * tiles, th * tw * c)


def tiled_l2(a: np.ndarray, b: np.ndarray, tiles: int = 4) -> np.ndarray:
    """Row-wise tiled l2 of equal-shape stacks a, b [N, H, W, C] -> [N]."""
    d = (_tiles(a, tiles) - _tiles(b, tiles)) ** 2
    return np.sqrt(d.mean(axis=2).max(axis=1))


def tiled_l2_matrix(a: np.ndarray, b: np.ndarray, tiles: int = 4) -> np.ndarray:
    """All-pairs tiled l2 between stacks a [N, ...] and b [M, ...] -> [N, M] (one matmul per tile)."""
    ta, tb = _tiles(a, tiles).astype(np.float64), _tiles(b, tiles).astype(np.float64)
    worst = np.zeros((len(a), len(b)))
    for k in range(ta.shape[1]):
        x, y = ta[:, k], tb[:, k]
        sq = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
        worst = np.maximum(worst, np.maximum(sq, 0.0) / x.shape[1])
    return np.sqrt(worst)


def _range_pairs(index, queries: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    lims, _, labels = index.range_search(np.ascontiguousarray(queries, dtype=np.float32), float(radius))
    rows = np.repeat(np.arange(len(queries)), np.diff(lims).astype(np.int64))
    return rows, labels.astype(np.int64)


def tiled_pairs(x: np.ndarray, delta: float, tiles: int = 4, queries: np.ndarray | None = None) -> list[tuple[int, int, float]]:
    """Pairs (i, j, d) with tiled-l2(queries[i], x[j]) <= delta, found by a faiss range search.

    With `queries=None` the stack is searched against itself and each unordered pair i < j is
    returned once. `queries` must have x's image shape (e.g. the mirrored stack for flip invariance).
    """
    import faiss

    n = len(x)
    flat = np.ascontiguousarray(x.reshape(n, -1), dtype=np.float32)
    dim = flat.shape[1]
    index = faiss.IndexFlatL2(dim)
    index.add(flat)
    q = flat if queries is None else np.ascontiguousarray(queries.reshape(len(queries), -1), dtype=np.float32)
    radius = (delta ** 2) * dim * (1 + 1e-4) + 1e-6  # faiss radii are squared l2, strict
    rows, cols = _range_pairs(index, q, radius)
    if queries is None:
        keep = rows < cols
        rows, cols = rows[keep], cols[keep]
    if rows.size == 0:
        return []
    qx = x if queries is None else queries
    d = tiled_l2(qx[rows], x[cols], tiles)
    ok = d <= delta
    return [(int(i), int(j), float(v)) for i, j, v in zip(rows[ok], cols[ok], d[ok])]


def cosine_pairs(emb: np.ndarray, threshold: float, queries: np.ndarray | None = None) -> list[tuple[int, int, float]]:
    """Pairs (i, j, cos) with cosine(queries[i], emb[j]) >= threshold (faiss inner-product range search)."""
    import faiss

    def unit(v):
        v = np.ascontiguousarray(v, dtype=np.float32)
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)

    e = unit(emb)
    index = faiss.IndexFlatIP(e.shape[1])
    index.add(e)
    q = e if queries is None else unit(queries)
    lims, sims, labels = index.range_search(q, float(threshold) - 1e-6)
    rows = np.repeat(np.arange(len(q)), np.diff(lims).astype(np.int64))
    keep = sims >= threshold - 1e-6
    if queries is None:
        keep &= rows < labels
    return [(int(i), int(j), float(s)) for i, j, s in zip(rows[keep], labels[keep], sims[keep])]
