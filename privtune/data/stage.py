"""The data stage around the member / non-member split, shared by training and evaluation.

Before the split: deduplication of the loaded source (`dedup:`), so a non-member is never a copy of
a member and no defense's own split sees copies. After the split, the training rows: the trainer's
rows, plus `data.duplicate` copies of a few members (the duplicated-data benchmark of Carlini et
al. 2023; deduplicated again when `dedup.enabled`, so they collapse), plus audit canaries
(`canaries:`, never deduplicated: their repetition is the experiment). Everything is a pure
function of the config and the split, so `privtune.evaluate` rebuilds the same rows.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..errors import ConfigError
from ..io import atomic_write_json
from . import dedup
from .canaries import CanarySet, make_canaries
from .sources import LoadedSource, Record
from ..rng import numpy_rng

DUP_MARK = "~dup"
CANARIES_JSON = "canaries.json"


def check_settings(cfg) -> None:
    """Validate the dedup, canaries and eval.extraction sections before anything is trained."""
    node = cfg.get("dedup")
    if node is not None and node.enabled:
        dedup.DedupSettings.from_config(node)
    make_canaries(cfg.get("canaries"), int(cfg.seed), 8)
    extraction = cfg.eval.get("extraction")
    if cfg.eval.enabled and extraction is not None and extraction.enabled:
        from ..eval.extraction import check_settings as check_extraction

        check_extraction(extraction, int(cfg.data.resolution))


class DataStage:
    def __init__(self, cfg):
        self.cfg = cfg
        self.dedup_node = cfg.get("dedup")
        self.raw_records: list[Record] = []
        self.dedup_result: dedup.DedupResult | None = None
        self.dedup_report: dict | None = None
        self.canaries: CanarySet | None = None
        self.duplicated: dict[str, int] = {}
        self.rows_info: dict = {}

    @property
    def dedup_on(self) -> bool:
        return bool(self.dedup_node is not None and self.dedup_node.enabled)

    def before_split(self, source: LoadedSource) -> LoadedSource:
        """Deduplicate the source when `dedup.enabled` (a no-op otherwise)."""
        self.raw_records = source.records
        source, self.dedup_report, self.dedup_result = dedup.apply(source, self.dedup_node)
        if self.dedup_report:
            print(f"privtune: dedup kept {self.dedup_report['n_kept']} of {self.dedup_report['n_input']} images "
                  f"({self.dedup_report['n_groups']} near-duplicate groups)")
        return source

    def duplicate(self, rows: list[Record], members: list[Record]) -> list[Record]:
        node = self.cfg.data.get("duplicate")
        if node is None or int(node.members) == 0:
            return rows
        k, repeats = int(node.members), int(node.repeats)
        if k < 0 or k > len(members) or repeats < 1:
            raise ConfigError(f"data.duplicate needs 0 <= members <= data.members ({len(members)}) and repeats >= 1 "
                              f"(got members={k}, repeats={repeats})")
        pick = numpy_rng(self.cfg.seed, "duplicates").choice(len(members), size=k, replace=False)
        chosen = [members[i] for i in sorted(pick.tolist())]
        self.duplicated = {r.id: repeats for r in chosen}
        copies = [replace(r, id=f"{r.id}{DUP_MARK}{j}") for r in chosen for j in range(1, repeats)]
        return rows + copies

    def after_split(self, rows: list[Record], split) -> list[Record]:
        """The training rows: `rows` plus duplicates (deduplicated when dedup is on) plus canaries."""
        rows = list(rows)
        n_base = len(rows)
        rows = self.duplicate(rows, split.members)
        info: dict = {}
        if self.duplicated:
            info["duplicated"] = dict(self.duplicated)
            info["duplicate_rows_added"] = len(rows) - n_base
            if self.dedup_on:
                result = dedup.deduplicate(rows, dedup.DedupSettings.from_config(self.dedup_node))
                info["duplicate_rows_removed_by_dedup"] = len(rows) - len(result.records)
                rows = result.records
        self.canaries = make_canaries(self.cfg.get("canaries"), int(self.cfg.seed), int(self.cfg.data.resolution))
        if self.canaries is not None:
            canary_rows = self.canaries.rows()
            info["canary_rows"] = len(canary_rows)
            rows += canary_rows
        if info:
            info["n_rows"] = len(rows)
            split.training_rows = info
        self.rows_info = info
        return rows

    def rebuild(self, split) -> None:
        """The duplicated members and the canaries of a finished run (for evaluation), from its config and split."""
        self.duplicate([], split.members)
        self.canaries = make_canaries(self.cfg.get("canaries"), int(self.cfg.seed), int(self.cfg.data.resolution))

    def write(self, run_dir: Path) -> None:
        """dedup.json + its contact sheet, and canaries.json, in the run folder."""
        if self.dedup_report is not None:
            report = dict(self.dedup_report)
            if "duplicate_rows_removed_by_dedup" in self.rows_info:
                keys = ("duplicated", "duplicate_rows_added", "duplicate_rows_removed_by_dedup")
                report["training_rows"] = {k: self.rows_info[k] for k in keys}
            dedup.write(run_dir, self.raw_records, self.dedup_result, report, int(self.dedup_node.get("sheet_groups", 8)))
        if self.canaries is not None:
            atomic_write_json(Path(run_dir) / CANARIES_JSON, self.canaries.manifest())
