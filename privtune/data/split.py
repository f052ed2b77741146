"""The seeded member / non-member split and its manifest (ids + content hashes): the attacks' ground truth.

Members and non-members come from the same pool, so membership is never confounded with a shift of
distribution. Rows sharing a group (near-duplicates such as skin-tone variants) stay on one side.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from ..io import atomic_write_json
from .sources import Record

MANIFEST_NAME = "split.json"


@dataclass
class Split:
    members: list[Record]
    nonmembers: list[Record]
    seed: int
    source: str
    training_rows: dict | None = None  # extra training rows beyond one per member (data.duplicate, canaries), for the manifest
    auxiliary: list[Record] | None = None  # data.auxiliary_members: trained on, never attacked
    training_fingerprint: dict | None = None  # `fingerprint` of every row the model trains on (baseline checks)

    def manifest(self) -> dict:
        def rows(records):
            return [{"id": r.id, "sha256": r.sha256, "caption": r.caption, "group": r.group} for r in records]

        return {
            "format": "privtune-split-v1",
            "seed": self.seed,
            "source": self.source,
            "members": rows(self.members),
            "nonmembers": rows(self.nonmembers),
            **({"training_rows": self.training_rows} if self.training_rows else {}),
            **({"auxiliary_members": rows(self.auxiliary)} if self.auxiliary else {}),
            **({"training_fingerprint": self.training_fingerprint} if self.training_fingerprint else {}),
        }


def fingerprint(records: list[Record]) -> dict:
    """{"rows", "sha256"} of a training set: a digest of every row's image hash and caption (as a
    multiset: order-free, repeats count), so two runs trained on the same rows compare equal."""
    rows = sorted(f"{r.sha256}:{hashlib.sha256(r.caption.encode('utf-8')).hexdigest()}" for r in records)
    return {"rows": len(rows), "sha256": hashlib.sha256("\n".join(rows).encode("ascii")).hexdigest()}


def check_disjoint(members: list[Record], nonmembers: list[Record]) -> None:
    """Raise if a non-member shares an id, a content hash or a group with a member."""
    for key in ("id", "sha256", "group"):
        shared = {getattr(r, key) for r in members} & {getattr(r, key) for r in nonmembers}
        if shared:
            example = sorted(shared)[0]
            raise DataError(
                f"members and non-members overlap ({len(shared)} shared {key}s, e.g. {example!r}); "
                f"every non-member must be unseen in training. Fix the manifest or let privtune draw the split"
            )


def make_split(records: list[Record], members: int, nonmembers: int, seed: int, source: str = "",
               one_per_group: bool = False) -> Split:
    """Draw disjoint member and non-member sets of the requested sizes, whole groups at a time.

    With `one_per_group`, each drawn group contributes one seeded row and its other rows are left out of
    both sets, so the split holds no near-duplicates (the controlled duplicated-data benchmark)."""
    if members < 1 or nonmembers < 0:
        raise DataError(f"data.members must be >= 1 and data.nonmembers >= 0 (got {members}, {nonmembers})")
    if members + nonmembers > len(records):
        raise DataError(
            f"data.members ({members}) + data.nonmembers ({nonmembers}) = {members + nonmembers} exceeds the "
            f"{len(records)} usable samples in {source or 'the source'}; lower them or use a larger data set"
        )
    groups: dict[str, list[Record]] = {}
    for r in records:
        groups.setdefault(r.group, []).append(r)
    order = sorted(groups)
    rng = random.Random(seed)
    rng.shuffle(order)
    if one_per_group:
        groups = {g: [sorted(groups[g], key=lambda r: r.id)[rng.randrange(len(groups[g]))]] for g in order}
    chosen_m: list[Record] = []
    chosen_n: list[Record] = []
    for g in order:
        rows = groups[g]
        if len(chosen_m) + len(rows) <= members:
            chosen_m.extend(rows)
        elif len(chosen_n) + len(rows) <= nonmembers:
            chosen_n.extend(rows)
        if len(chosen_m) == members and len(chosen_n) == nonmembers:
            break
    if len(chosen_m) < members or len(chosen_n) < nonmembers:
        raise DataError(
            f"cannot draw {members} members and {nonmembers} non-members without splitting a group "
            f"(got {len(chosen_m)} and {len(chosen_n)}{', one row per group' if one_per_group else ''}); "
            f"lower the sizes or set data.group_column=null"
        )
    check_disjoint(chosen_m, chosen_n)
    return Split(chosen_m, chosen_n, seed, source)


def save_manifest(split: Split, run_dir: str | Path) -> Path:
    path = Path(run_dir) / MANIFEST_NAME
    atomic_write_json(path, split.manifest())
    return path


def load_manifest(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"split manifest {path} not found; pass a run folder or its {MANIFEST_NAME}")
    manifest = json.loads(path.read_text())
    for key in ("members", "nonmembers"):
        if key not in manifest:
            raise DataError(f"{path} is not a privtune split manifest (no {key!r} list)")
    ids_m = {r["id"] for r in manifest["members"]}
    overlap = ids_m & {r["id"] for r in manifest["nonmembers"]}
    hashes = {r.get("sha256") for r in manifest["members"]} & {r.get("sha256") for r in manifest["nonmembers"]} - {None}
    if overlap or hashes:
        raise DataError(
            f"manifest {path}: members and non-members overlap ({len(overlap)} ids, {len(hashes)} identical images, "
            f"e.g. {sorted(overlap or hashes)[0]!r}); an attack's ground truth must be disjoint"
        )
    return manifest


def exclude_rows(records: list[Record], manifest: dict) -> list[Record]:
    """`records` without any row of the manifest's split (members, non-members, auxiliary members): by id, by
    group (near-duplicates stay out too) and by content hash, so data drawn from the rest is disjoint from it."""
    rows = [*manifest.get("members", []), *manifest.get("nonmembers", []), *manifest.get("auxiliary_members", [])]
    ids = {r["id"] for r in rows}
    groups = {r["group"] for r in rows if r.get("group")}
    hashes = {r["sha256"] for r in rows if r.get("sha256")}
    return [r for r in records if r.id not in ids and r.group not in groups and r.sha256 not in hashes]


def split_from_manifest(manifest: dict, records: list[Record]) -> Split:
    """Rebuild a Split from a manifest and the loaded source, checking every content hash."""
    by_id = {r.id: r for r in records}

    def pick(rows):
        out = []
        for row in rows:
            rec = by_id.get(row["id"])
            if rec is None:
                raise DataError(f"manifest sample {row['id']!r} is not in the data source; point data.source at the data the run used")
            if row.get("sha256") and row["sha256"] != rec.sha256:
                raise DataError(f"sample {row['id']!r} changed since the split was made (content hash differs)")
            out.append(rec)
        return out

    return Split(pick(manifest["members"]), pick(manifest["nonmembers"]), manifest.get("seed", 0), manifest.get("source", ""))
