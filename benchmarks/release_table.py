"""Per attack and released model: the spec-direction AUC, the oriented AUC (direction fitted on the
calibration half) with its CI, TPR@1%FPR, NFE per sample, wall time (calibration + report scoring), and
the card's best attack, from finished runs' report.json.

    python benchmarks/release_table.py LoRA=/work/evidence/lora-s0 DualMD=/work/evidence/dualmd-s0

Arguments are NAME=RUN_DIR[,RUN_DIR...]; unfinished runs (no report.json) are listed at the end. Prints a
markdown table (one row per attack entry) and one line per run with its best attack, the number the privacy
card reports.
"""

from __future__ import annotations

import sys

from common import print_markdown_table, print_missing, run_reports, wants_help


def fmt_ci(metric: dict) -> str:
    ci = metric.get("ci") or []
    return f"{metric['value']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if len(ci) == 2 else "")


def main(argv: list[str]) -> int:
    if wants_help(argv, __doc__):
        return 0
    runs, missing = run_reports(argv)
    rows, best = [], []
    for name, reports in runs.items():
        for report in reports:
            for entry, a in report["attacks"].items():
                spec = (a.get("metrics_spec") or a["metrics"])["auc"]["value"]
                inverted = (a.get("orientation") or {}).get("inverted", False)
                rows.append([name, entry, a.get("release", "-"), f"{spec:.3f}", fmt_ci(a["metrics"]["auc"]),
                             "yes" if inverted else "no", fmt_ci(a["metrics"]["tpr@1%fpr"]),
                             f"{a['nfe_per_sample']:g}" if "nfe_per_sample" in a else "-",
                             f"{a['seconds']:.0f}" if "seconds" in a else "-"])
            b = report["summary"]["best_attack"]
            best.append(f"- {name}: best attack **{b['name']}** AUC {fmt_ci(b['auc'])}, TPR@1%FPR {fmt_ci(b['tpr@1%fpr'])}"
                        + (f"; privacy {eps:.3f}-DP" if isinstance(eps := (report.get("privacy") or {}).get("epsilon"),
                                                                          (int, float)) else ""))
    cols = ["run", "attack entry", "release", "spec-direction AUC", "oriented AUC [95% CI]", "inverted", "TPR@1%FPR [95% CI]",
            "NFE/sample", "seconds"]
    print_markdown_table(cols, rows)
    print()
    print("\n".join(best))
    print_missing(missing)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
