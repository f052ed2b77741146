"""Keep a sweep's finished results across machines: `save` copies each finished run's report (without the
per-sample scores and ids) and privacy record into the repository; `restore` puts them back as finished run
folders, which `privtune.sweep` then skips, so a sweep longer than one sitting gathers its evidence over several.

    python benchmarks/sweep_archive.py save runs/sweeps/all_defenses benchmarks/sweeps/all_defenses
    python benchmarks/sweep_archive.py restore benchmarks/sweeps/all_defenses runs/sweeps/all_defenses
    python -m privtune.sweep sweep=all_defenses     # trains only what is missing, then the frontier over all

The sweep log (`<root>.log`, one line per run with its wall time) is kept beside the reports.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
PER_SAMPLE = ("samples", "calibration_samples")


def stripped(report: dict) -> dict:
    """The report without what names or scores single training rows (ids, per-sample scores)."""
    out = dict(report)
    out["attacks"] = {name: {k: v for k, v in a.items() if k not in PER_SAMPLE} for name, a in (report.get("attacks") or {}).items()}
    return out


def save(root: Path, archive: Path) -> int:
    from privtune.sweep.runs import finished_report

    n = 0
    for run in sorted(p for p in root.iterdir() if p.is_dir()):
        report = finished_report(run)
        if report is None:
            continue
        dest = archive / run.name
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "report.json").write_text(json.dumps(stripped(report), indent=1))
        if (run / "privacy.json").is_file():
            shutil.copy2(run / "privacy.json", dest / "privacy.json")
        n += 1
    log = root.parent / f"{root.name}.log"
    if log.is_file():  # one log per sitting: an earlier sitting's sweep.log is never overwritten
        sittings = sorted(archive.glob("sweep*.log"))
        kept = [f for f in sittings if f.read_bytes() and log.read_bytes().startswith(f.read_bytes()[:200])]
        shutil.copy2(log, kept[-1] if kept else archive / f"sweep_sitting{len(sittings) + 1}.log")
    return n


def restore(archive: Path, root: Path) -> int:
    n = 0
    for src in sorted(p for p in archive.iterdir() if (p / "report.json").is_file()):
        dest = root / src.name
        if (dest / "report.json").is_file() or (dest / "config.yaml").is_file():
            continue  # never replace a run folder that is there
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("report.json", "privacy.json"):
            if (src / name).is_file():
                shutil.copy2(src / name, dest / name)
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=("save", "restore"))
    ap.add_argument("source", type=Path)
    ap.add_argument("dest", type=Path)
    args = ap.parse_args()
    if not args.source.is_dir():
        sys.exit(f"{args.source} is not a folder")
    n = save(args.source, args.dest) if args.action == "save" else restore(args.source, args.dest)
    print(f"{args.action}: {n} finished runs {args.source} -> {args.dest}")


if __name__ == "__main__":
    main()
