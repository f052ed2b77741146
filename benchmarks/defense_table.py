"""Mean ± std over seeds of finished runs' report.json: best-attack AUC (with each seed's CI), per-attack AUC, utility.

    python benchmarks/defense_table.py LoRA=/work/main/runs/evidence/lora-s{0,1,2} SMP-LoRA=/work/evidence/smp_lora-s{0,1,2}

Arguments are NAME=RUN_DIR[,RUN_DIR...] (or repeat a name once per seed); missing or unfinished runs are listed, not guessed.
Prints a markdown table.
"""

from __future__ import annotations

import statistics
import sys

from common import print_markdown_table, print_missing, run_reports, wants_help

UTILITY = (("heldout_denoising_loss", "held-out loss", 4), ("member_denoising_loss", "member loss", 4),
           ("generalization_gap", "gap (held-out − member)", 4), ("prompt_fidelity_top10", "fidelity top-10", 3),
           ("frechet_distance", "Fréchet", 1))


def mean_std(values: list[float], digits: int) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main(argv: list[str]) -> int:
    if wants_help(argv, __doc__):
        return 0
    runs, missing = run_reports(argv)
    attacks = sorted({a for reports in runs.values() for r in reports for a in r["attacks"]})
    extraction = any(r.get("extraction") for reports in runs.values() for r in reports)
    cols = ["method", "seeds", "best-attack AUC (mean ± std)", "per seed: best attack, AUC [95% CI]",
            *[f"{a} AUC" for a in attacks], *[label for _, label, _ in UTILITY],
            *(["extracted members (duplicated of those), per seed", "captions flagged"] if extraction else [])]
    rows = []
    for name, reports in runs.items():
        best = [r["summary"]["best_attack"] for r in reports]
        per_seed = "; ".join(f"s{r['config']['seed']}: {b['name']} {b['auc']['value']:.3f} "
                             f"[{b['auc']['ci'][0]:.3f}, {b['auc']['ci'][1]:.3f}]" for r, b in zip(reports, best))
        row = [name, str(len(reports)), mean_std([b["auc"]["value"] for b in best], 3), per_seed]
        row += [mean_std([r["attacks"][a]["metrics"]["auc"]["value"] for r in reports if a in r["attacks"]], 3) for a in attacks]
        row += [mean_std([r["utility"][k] for r in reports if (r.get("utility") or {}).get(k) is not None], d) for k, _, d in UTILITY]
        if extraction:
            ex = [r.get("extraction") for r in reports]
            row += ["; ".join(f"{e['n_extracted']} ({e['extracted_duplicated']} of {len(e['duplicated_members'])}) of {e['n_captions']}"
                              if e else "n/a" for e in ex),
                    "; ".join(str(e["n_flagged"]) if e else "n/a" for e in ex)]
        rows.append(row)
    print_markdown_table(cols, rows)
    print_missing(missing)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
