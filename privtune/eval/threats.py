"""Publishing a standalone attack's result into a run folder: `threats/<name>.json`, then the report and card.

The membership-inference stage writes report.json and the card; attacks that run later on a finished run
(gradient inversion, property inference, SIDE) add their section through here, so report.md and the card
describe every attack run on the model, and a re-evaluation keeps them (`report.attach_threats`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from ..io import atomic_write_json, atomic_write_text
from .report import REPORT_JSON, REPORT_MD, THREATS_DIR, attach_threats, render_markdown


def publish_threat(run_dir, name: str, title: str, result: dict, markdown: Sequence[str], card: str, *,
                   lora_dir=None, base_model: str | None = None, license: str = "other", forbidden: Sequence[str] = ()) -> Path:
    """Write `run_dir/threats/<name>.json`; when `run_dir` holds a report, re-write report.json / report.md with the
    section, and when `lora_dir` holds a card, re-render it (scrubbed of `forbidden`, like the stage's card)."""
    run_dir = Path(run_dir)
    path = run_dir / THREATS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"title": title, "markdown": list(markdown), "card": card, "result": result})
    report_path = run_dir / REPORT_JSON
    if report_path.is_file():
        report = attach_threats(run_dir, json.loads(report_path.read_text()))
        atomic_write_json(report_path, report)
        atomic_write_text(run_dir / REPORT_MD, render_markdown(report))
        if lora_dir is not None and (Path(lora_dir) / "README.md").is_file() and base_model:
            from .card import write_model_card

            write_model_card(lora_dir, report, base_model=base_model, license=license,
                             repro_command=str(report.get("command", "")), forbidden=list(forbidden))
    return path
