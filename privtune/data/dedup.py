"""Near-duplicate removal in the data stage, before any member / non-member or defense split.

Carlini et al. ("Extracting Training Data from Diffusion Models", USENIX Security 2023) find that
the extracted training images are the duplicated ones, and recommend deduplication; Somepalli et
al. (CVPR 2023) detect copies by embedding similarity. specs/defenses.md section 6.

Two images are linked when their tiled l2 (pixel space, privtune.data.similarity) is <= `tiled_l2`
or, with an `embedding`, their cosine similarity is >= `cosine`; with `flip` a mirrored copy also
links. Neighbours come from a faiss range search. Linked images form groups (union-find); each
group keeps its first image in source order, carrying every caption of the group (`captions`).
Running before the split means a "non-member" can never be a copy of a member. The source groups
of merged images are merged too, so their other rows stay on one side of the split.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image

from ..errors import ConfigError
from ..io import atomic_path, atomic_write_json
from .embeddings import get_embedding
from .similarity import check_tiles, cosine_pairs, tiled_pairs, to_pixels
from .sources import LoadedSource, Record

REPORT_JSON = "dedup.json"
CONTACT_SHEET = "dedup_groups.png"


@dataclass
class DedupSettings:
    resolution: int = 16
    tiles: int = 4
    tiled_l2: float | None = 0.1
    embedding: str | None = None
    cosine: float = 0.95
    flip: bool = False
    sheet_groups: int = 8

    @classmethod
    def from_config(cls, node) -> "DedupSettings":
        keys = {k: node[k] for k in ("resolution", "tiles", "tiled_l2", "embedding", "cosine", "flip", "sheet_groups") if k in node}
        s = cls(**keys)
        s.check()
        return s

    def check(self) -> None:
        check_tiles(int(self.resolution), int(self.tiles))
        if self.tiled_l2 is None and self.embedding is None:
            raise ConfigError("dedup needs dedup.tiled_l2 (pixel path) or dedup.embedding set; both are null")
        if self.tiled_l2 is not None and not 0.0 <= float(self.tiled_l2) <= 1.0:
            raise ConfigError(f"dedup.tiled_l2={self.tiled_l2} is outside [0, 1] (pixels are compared in [0, 1]; 0.1 is a near-copy)")
        if not -1.0 <= float(self.cosine) <= 1.0:
            raise ConfigError(f"dedup.cosine={self.cosine} is outside [-1, 1]; use e.g. 0.95 for near-copies")
        if self.embedding is not None:
            get_embedding(self.embedding)


@dataclass
class DedupResult:
    records: list[Record]
    groups: list[list[int]]          # indices into the input, first = kept; only groups of >= 2
    edges: list[tuple[int, int, float, str]] = field(default_factory=list)
    seconds: float = 0.0


class UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a != b:
            self.parent[max(a, b)] = min(a, b)  # the smallest index (first in source order) is the root


def find_edges(images: list[Image.Image], s: DedupSettings) -> list[tuple[int, int, float, str]]:
    """(i, j, value, path) for every linked pair; path is tiled_l2, embedding name, or either with '+flip'."""
    edges = []
    mirrored = [im.transpose(Image.FLIP_LEFT_RIGHT) for im in images] if s.flip else None
    if s.tiled_l2 is not None:
        x = to_pixels(images, int(s.resolution))
        edges += [(i, j, d, "tiled_l2") for i, j, d in tiled_pairs(x, float(s.tiled_l2), int(s.tiles))]
        if s.flip:
            fx = x[:, :, ::-1]
            edges += [(i, j, d, "tiled_l2+flip") for i, j, d in tiled_pairs(x, float(s.tiled_l2), int(s.tiles), queries=fx) if i != j]
    if s.embedding is not None:
        embed = get_embedding(s.embedding)
        e = embed(images)
        mean = e.mean(axis=0, keepdims=True)  # centred: a shared background must not make everything similar
        edges += [(i, j, c, s.embedding) for i, j, c in cosine_pairs(e - mean, float(s.cosine))]
        if s.flip:
            flipped = cosine_pairs(e - mean, float(s.cosine), queries=embed(mirrored) - mean)
            edges += [(i, j, c, f"{s.embedding}+flip") for i, j, c in flipped if i != j]
    return edges


def deduplicate(records: list[Record], settings: DedupSettings) -> DedupResult:
    """One record per near-duplicate group, in source order, with the group's captions merged."""
    start = time.perf_counter()
    edges = find_edges([r.image for r in records], settings) if len(records) > 1 else []
    uf = UnionFind(len(records))
    for i, j, _, _ in edges:
        uf.union(i, j)
    members: dict[int, list[int]] = {}
    for i in range(len(records)):
        members.setdefault(uf.find(i), []).append(i)
    groups = [idx for idx in members.values() if len(idx) > 1]
    # source groups of linked images are merged, so related rows stay on one side of the split
    labels = sorted({r.group for r in records})
    gid = {g: k for k, g in enumerate(labels)}
    guf = UnionFind(len(labels))
    for idx in groups:
        for i in idx[1:]:
            guf.union(gid[records[idx[0]].group], gid[records[i].group])
    out = []
    for root in sorted(members):
        idx = members[root]
        keep = records[idx[0]]
        captions = []
        for i in idx:
            for c in records[i].captions or [records[i].caption]:
                if c not in captions:
                    captions.append(c)
        out.append(replace(keep, captions=captions, group=labels[guf.find(gid[keep.group])]))
    return DedupResult(out, sorted(groups, key=lambda g: (-len(g), g[0])), edges, time.perf_counter() - start)


def apply(source: LoadedSource, node) -> tuple[LoadedSource, dict | None, DedupResult | None]:
    """Deduplicate a loaded source when `node.enabled`; returns (source, report, result) (no-op otherwise)."""
    if node is None or not node.enabled:
        return source, None, None
    settings = DedupSettings.from_config(node)
    result = deduplicate(source.records, settings)
    deduped = LoadedSource(result.records, source.skipped, source.description)
    return deduped, report(source.records, result, settings), result


def report(records: list[Record], result: DedupResult, s: DedupSettings) -> dict:
    n = len(records)
    by_pair = {(min(i, j), max(i, j)): (v, p) for i, j, v, p in result.edges}
    groups = []
    for idx in result.groups:
        links = [{"a": records[i].id, "b": records[j].id, "value": round(v, 5), "path": p}
                 for (i, j), (v, p) in by_pair.items() if i in idx and j in idx]
        groups.append({
            "kept": records[idx[0]].id, "removed": [records[i].id for i in idx[1:]], "size": len(idx),
            "captions": [records[i].caption for i in idx], "links": links,
        })
    return {
        "settings": {"resolution": s.resolution, "tiles": s.tiles, "tiled_l2": s.tiled_l2, "embedding": s.embedding,
                     "cosine": s.cosine, "flip": s.flip, "search": "faiss range search (IndexFlatL2 / IndexFlatIP)"},
        "n_input": n, "n_kept": len(result.records), "n_removed": n - len(result.records), "n_groups": len(result.groups),
        "largest_group": max((len(g) for g in result.groups), default=1),
        "seconds": round(result.seconds, 4), "images_per_second": round(n / result.seconds, 1) if result.seconds > 0 else None,
        "groups": groups,
    }


def contact_sheet(records: list[Record], result: DedupResult, path: Path, n_groups: int = 8, per_row: int = 8,
                  cell: int = 64) -> Path | None:
    """PNG: one row per largest group (kept image first, outlined green), up to `per_row` images each."""
    shown = result.groups[:n_groups]
    if not shown:
        return None
    pad = 4
    sheet = Image.new("RGB", (per_row * (cell + pad) + pad, len(shown) * (cell + pad) + pad), (200, 200, 200))
    for r, idx in enumerate(shown):
        for c, i in enumerate(idx[:per_row]):
            x, y = pad + c * (cell + pad), pad + r * (cell + pad)
            if c == 0:
                sheet.paste((40, 160, 40), (x - 2, y - 2, x + cell + 2, y + cell + 2))
            sheet.paste(records[i].image.convert("RGB").resize((cell, cell), Image.NEAREST), (x, y))
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path


def write(run_dir: Path, records: list[Record], result: DedupResult, report_dict: dict, sheet_groups: int = 8) -> None:
    run_dir = Path(run_dir)
    sheet = contact_sheet(records, result, run_dir / CONTACT_SHEET, sheet_groups)
    atomic_write_json(run_dir / REPORT_JSON, {**report_dict, "contact_sheet": sheet.name if sheet else None})
