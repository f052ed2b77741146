"""The proxy attacker's labelled split (D_aux in Luo et al., AAAI 2025; spec: defenses.md section 1).

D_aux^m are extra training members and D_aux^nm local non-members, both drawn from the rows of the
source that the evaluation split does not use (whole groups at a time), so no evaluation sample, nor a
near-duplicate of one, ever reaches the proxy attacker. The LoRA trains on the evaluation members plus
D_aux^m (as in the paper, D_tr = D_te^m + D_aux^m); the evaluation attacks still score only the
evaluation split. The split is written to `attacker_split.json` in the run folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..data.sources import Record
from ..data.split import Split, check_disjoint, make_split
from ..errors import DataError
from ..io import atomic_write_json

ATTACKER_MANIFEST = "attacker_split.json"
SEED_OFFSET = 7919  # the attacker split's draw differs from the evaluation split's under the same seed


def unused_records(records: list[Record], split: Split) -> list[Record]:
    """Rows sharing no id, content hash or group with any evaluation member or non-member."""
    used = split.members + split.nonmembers
    ids, hashes, groups = ({getattr(r, k) for r in used} for k in ("id", "sha256", "group"))
    return [r for r in records if r.id not in ids and r.sha256 not in hashes and r.group not in groups]


def check_attacker_disjoint(split: Split, attacker: Split) -> None:
    """Raise DataError if any attacker row overlaps the evaluation split (id, content hash or group)."""
    for name, rows in (("members", attacker.members), ("non-members", attacker.nonmembers)):
        try:
            check_disjoint(split.members + split.nonmembers, rows)
        except DataError as exc:
            raise DataError(f"the proxy attacker's {name} overlap the evaluation split: {exc}") from exc
    check_disjoint(attacker.members, attacker.nonmembers)


def make_attacker_split(records: list[Record], split: Split, members: int, nonmembers: int, seed: int) -> Split:
    """Draw D_aux^m and D_aux^nm from the rows the evaluation split leaves unused."""
    pool = unused_records(records, split)
    try:
        aux = make_split(pool, members, nonmembers, seed + SEED_OFFSET, split.source)
    except DataError as exc:
        raise DataError(
            f"cannot draw the proxy attacker's split ({members} members + {nonmembers} non-members) from the "
            f"{len(pool)} rows outside the evaluation split: {exc}. Lower mp.attacker_members / "
            f"mp.attacker_nonmembers or data.members / data.nonmembers, or use a larger data set"
        ) from exc
    check_attacker_disjoint(split, aux)
    return aux


def save_attacker_manifest(aux: Split, run_dir) -> Path:
    manifest = aux.manifest()
    manifest["format"] = "privtune-attacker-split-v1"
    manifest["note"] = ("proxy attacker's members (also LoRA training rows) and non-members; disjoint from "
                        "split.json (the evaluation split) by id, content hash and group")
    path = Path(run_dir) / ATTACKER_MANIFEST
    atomic_write_json(path, manifest)
    return path


def load_attacker_split(run_dir, records: list[Record]) -> Split:
    """Rebuild the attacker split of a run (resume), checking every content hash."""
    from ..data.split import split_from_manifest

    path = Path(run_dir) / ATTACKER_MANIFEST
    if not path.is_file():
        raise DataError(f"{path} is missing, so the proxy attacker's split cannot be restored; resume a run made by "
                        f"mp_lora / smp_lora or start a new one")
    return split_from_manifest(json.loads(path.read_text()), records)
