"""Auxiliary training members and the proxy attacker's labelled split (D_aux in Luo et al., AAAI
2025; spec: defenses.md section 1).

`data.auxiliary_members` extra training rows are drawn from the rows of the source that the
evaluation split does not use (whole groups at a time): trained on, never attacked. MP-/SMP-LoRA's
D_aux^m are exactly these rows and D_aux^nm local non-members from the same unused rows, so no
evaluation sample, nor a near-duplicate of one, ever reaches the proxy attacker (as in the paper,
D_tr = D_te^m + D_aux^m, and attacks report on D_te only). Because the auxiliary draw does not depend
on the defense, `recipe=lora data.auxiliary_members=N` trains on exactly the rows of an MP/SMP run
with the same seed and data: the like-for-like baseline. The attacker split is written to
`attacker_split.json` in the run folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..data.sources import Record
from ..data.split import Split, check_disjoint, make_split
from ..errors import DataError
from ..io import atomic_write_json
from ..rng import seeded

ATTACKER_MANIFEST = "attacker_split.json"


def auxiliary_seed(seed: int) -> int:
    """The attacker split's own stream, so its draw differs from the evaluation split's under the same seed."""
    return seeded(seed, "auxiliary-split")


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


def draw_auxiliary_members(records: list[Record], split: Split, members: int, seed: int) -> list[Record]:
    """`members` extra training rows from the rows the evaluation split leaves unused (seeded, whole groups);
    the same rows as the members of `make_attacker_split` with that count and seed."""
    if members < 1:
        return []
    pool = unused_records(records, split)
    try:
        return make_split(pool, members, 0, auxiliary_seed(seed), split.source).members
    except DataError as exc:
        raise DataError(f"cannot draw data.auxiliary_members={members} extra training rows from the {len(pool)} rows outside "
                        f"the evaluation split: {exc}. Lower data.auxiliary_members, data.members or data.nonmembers, "
                        "or use a larger data set") from exc


def make_attacker_split(records: list[Record], split: Split, members: int, nonmembers: int, seed: int) -> Split:
    """Draw D_aux^m and D_aux^nm from the rows the evaluation split leaves unused."""
    pool = unused_records(records, split)
    try:
        aux = make_split(pool, members, nonmembers, auxiliary_seed(seed), split.source)
    except DataError as exc:
        raise DataError(
            f"cannot draw the proxy attacker's split ({members} members + {nonmembers} non-members) from the "
            f"{len(pool)} rows outside the evaluation split: {exc}. Lower data.auxiliary_members / "
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
