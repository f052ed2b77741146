"""Summarise finished runs (report.json) into a markdown table: mean ± std over seeds per defense.

    python benchmarks/defense_table.py NAME=RUN_DIR[,RUN_DIR...] ...

Per defense: number of seeds, best-attack AUC (mean ± std over seeds; each seed's bootstrap 95% CI
and attack name listed), per-attack AUCs, held-out / member denoising loss, prompt fidelity top-10
and the Frechet distance of generations. Only numbers present in the reports are shown.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def load(run: str) -> dict:
    return json.loads((Path(run) / "report.json").read_text())


def mean_std(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def row(name: str, runs: list[str]) -> list[str]:
    reports = [load(r) for r in runs]
    best = [r["summary"]["best_attack"] for r in reports]
    per_seed = "; ".join(f"{b['name']} {b['auc']['value']:.3f} [{b['auc']['ci'][0]:.2f}, {b['auc']['ci'][1]:.2f}]" for b in best)
    attacks = sorted({a for r in reports for a in r["attacks"]})
    per_attack = ", ".join(f"{a} {mean_std([r['attacks'][a]['metrics']['auc']['value'] for r in reports if a in r['attacks']])}"
                           for a in attacks)
    util = [r.get("utility") or {} for r in reports]
    return [name, str(len(runs)), mean_std([b["auc"]["value"] for b in best]), per_seed, per_attack,
            mean_std([u.get("heldout_denoising_loss") for u in util]), mean_std([u.get("member_denoising_loss") for u in util]),
            mean_std([u.get("prompt_fidelity_top10") for u in util]), mean_std([u.get("frechet_distance") for u in util])]


def main(argv: list[str]) -> None:
    header = ["defense", "seeds", "best-attack AUC", "per seed: best attack, AUC [95% CI]", "AUC per attack",
              "held-out loss", "member loss", "fidelity top-10", "Frechet dist."]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for arg in argv:
        name, _, runs = arg.partition("=")
        print("| " + " | ".join(row(name, runs.split(","))) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
