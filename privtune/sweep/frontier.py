"""The privacy / utility frontier of a sweep: metrics of its runs, the Pareto front, frontier.md and frontier.png."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..io import atomic_path, atomic_write_text
from .runs import finished_report
from .spec import Setting, Sweep

FRONTIER_MD = "frontier.md"
FRONTIER_PNG = "frontier.png"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _ci(metric: Any) -> tuple[float, float] | None:
    ci = metric.get("ci") if isinstance(metric, dict) else None
    if isinstance(ci, list) and len(ci) == 2 and all(_number(c) is not None for c in ci):
        return float(ci[0]), float(ci[1])
    return None


def run_metrics(run_dir: Path) -> dict[str, Any] | None:
    """The frontier's numbers of one finished run (None when its report.json is missing or incomplete):
    the best attack's oriented AUC and TPR@1%FPR (with their bootstrap CIs) and name, the style accuracy,
    the mean slot accuracy over the content slots (style excluded: it has its own column), FD, KID, and
    epsilon for DP runs (privacy.json, else the report's privacy section)."""
    report = finished_report(Path(run_dir))
    if report is None:
        return None
    best = report["summary"].get("best_attack") or {}
    utility = report.get("utility") or {}
    slots = utility.get("slot_accuracy") if isinstance(utility.get("slot_accuracy"), dict) else {}
    content = [v for k, v in slots.items() if k != "style" and _number(v) is not None]
    privacy = report.get("privacy") or {}
    try:
        privacy = json.loads((Path(run_dir) / "privacy.json").read_text())
    except (OSError, ValueError):
        pass
    return {
        "auc": _number((best.get("auc") or {}).get("value")), "auc_ci": _ci(best.get("auc")),
        "tpr": _number((best.get("tpr@1%fpr") or {}).get("value")), "tpr_ci": _ci(best.get("tpr@1%fpr")),
        "attack": best.get("name"),
        "style_accuracy": _number(utility.get("style_accuracy")),
        "slot_accuracy": statistics.fmean(content) if content else None,
        "frechet_distance": _number(utility.get("frechet_distance")), "kid": _number(utility.get("kid")),
        "epsilon": _number(privacy.get("epsilon")) if isinstance(privacy, dict) else None,
    }


@dataclass(frozen=True)
class Stat:
    """A metric over a setting's seeds: mean and sample std (n >= 2), or one run's value and bootstrap CI."""

    mean: float | None
    std: float | None = None
    ci: tuple[float, float] | None = None
    n: int = 0

    @classmethod
    def over(cls, values: Sequence[float | None], cis: Sequence[tuple[float, float] | None] = ()) -> Stat:
        kept = [(v, cis[i] if i < len(cis) else None) for i, v in enumerate(values) if v is not None]
        if not kept:
            return cls(None)
        if len(kept) == 1:
            return cls(kept[0][0], None, kept[0][1], 1)
        numbers = [v for v, _ in kept]
        return cls(statistics.fmean(numbers), statistics.stdev(numbers), None, len(numbers))

    def text(self, digits: int = 3) -> str:
        if self.mean is None:
            return "n/a"
        out = f"{self.mean:.{digits}f}"
        if self.std is not None:
            return f"{out} ± {self.std:.{digits}f}"
        if self.ci is not None:
            return f"{out} [{self.ci[0]:.{digits}f}, {self.ci[1]:.{digits}f}]"
        return out

    def errors(self) -> tuple[float, float] | None:
        """(below, above) error-bar lengths: the std over seeds, else the CI; None without either."""
        if self.mean is None:
            return None
        if self.std is not None:
            return self.std, self.std
        if self.ci is not None:
            return max(0.0, self.mean - self.ci[0]), max(0.0, self.ci[1] - self.mean)
        return None


METRIC_KEYS = ("auc", "tpr", "style_accuracy", "slot_accuracy", "frechet_distance", "kid", "epsilon")


@dataclass
class FrontierRow:
    """One setting of the frontier: its runs' metrics over seeds."""

    setting: Setting
    planned: int
    finished: int
    stats: dict[str, Stat]
    attacks: list[str]
    on_front: bool = False

    @property
    def strongest(self) -> str:
        """The best attack of its runs: one name when they agree, else each name with its count."""
        if not self.attacks:
            return "n/a"
        counts = {a: self.attacks.count(a) for a in dict.fromkeys(self.attacks)}
        if len(counts) == 1:
            return self.attacks[0]
        return ", ".join(f"{a} ({n}/{len(self.attacks)})" for a, n in sorted(counts.items(), key=lambda kv: -kv[1]))

    @property
    def point(self) -> tuple[float, float] | None:
        """(style accuracy, best-attack AUC), or None when either is missing."""
        x, y = self.stats["style_accuracy"].mean, self.stats["auc"].mean
        return None if x is None or y is None else (x, y)


def frontier_row(setting: Setting, metrics: Sequence[dict[str, Any] | None]) -> FrontierRow:
    """Group one setting's runs (their `run_metrics`, None for unfinished ones) into a frontier row."""
    done = [m for m in metrics if m is not None]
    stats = {key: Stat.over([m[key] for m in done], [m.get(f"{key}_ci") for m in done]) for key in METRIC_KEYS}
    attacks = [str(m["attack"]) for m in done if m.get("attack")]
    return FrontierRow(setting, len(metrics), len(done), stats, attacks)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (utility, risk) points no other point dominates (higher-or-equal utility and
    lower-or-equal risk, one of them strictly), in input order."""
    front = []
    for i, (u, r) in enumerate(points):
        dominated = any(u2 >= u and r2 <= r and (u2 > u or r2 < r) for j, (u2, r2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


def frontier_rows(sweep: Sweep) -> list[FrontierRow]:
    """Every setting of the sweep with its finished runs' metrics, Pareto-front membership marked."""
    rows = [frontier_row(setting, [run_metrics(r.dir) for r in runs]) for setting, runs in sweep.settings()]
    plotted = [row for row in rows if row.point is not None]
    for i in pareto_front([row.point for row in plotted]):
        plotted[i].on_front = True
    return rows


def render_frontier_md(sweep: Sweep, rows: Sequence[FrontierRow]) -> str:
    """frontier.md: the table of settings, its column notes and what could not be plotted."""
    header = ["setting", "seeds", "best-attack AUC", "TPR@1%FPR", "style acc.", "mean slot acc.", "FD", "KID", "epsilon",
              "strongest attack", "Pareto front"]
    lines = [f"# Privacy / utility frontier: {sweep.name}", "",
             f"Sweep file `{sweep.source}`, runs under `{sweep.root}`. One row per setting (its runs grouped over seeds).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        s = row.stats
        seeds = str(row.finished) if row.finished == row.planned else f"{row.finished} of {row.planned}"
        cells = [row.setting.display + (" (undefended)" if row.setting.undefended and not row.setting.label else ""), seeds,
                 s["auc"].text(), s["tpr"].text(), s["style_accuracy"].text(), s["slot_accuracy"].text(),
                 s["frechet_distance"].text(2), s["kid"].text(2), s["epsilon"].text(2) if s["epsilon"].mean is not None else "-",
                 row.strongest, "yes" if row.on_front else ""]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += ["",
              ("- best-attack AUC / TPR@1%FPR: the strongest attack of each run (oriented AUC on the report split); "
               "mean ± std over seeds, or the bootstrap 95% CI when one seed finished. 0.5 = chance."),
              ("- style acc.: generations from held-out captions in the fine-tuned style (shipped attribute classifier); "
               "mean slot acc.: its mean over the content slots (style excluded). FD / KID: Frechet distance / kernel "
               "inception distance of the generations in the classifier's feature space (lower = closer)."),
              "- epsilon: the DP guarantee (privacy.json); - for undefended or non-DP runs.",
              ("- Pareto front: no other setting is at least as good on both axes (AUC as low, style accuracy as high) "
               "and better on one (frontier.png).")]
    missing = [row.setting.display for row in rows if row.finished and row.point is None]
    pending = [row.setting.display for row in rows if row.finished < row.planned]
    if missing:
        lines += ["", "Not in frontier.png (no style accuracy or no attack AUC in their reports): " + "; ".join(missing) + "."]
    if pending:
        lines += ["", "Settings with unfinished runs: " + "; ".join(pending) + "."]
    return "\n".join(lines) + "\n"


LABEL_HEIGHT = 0.032  # a 7-pt label's height, as a fraction of the axes' height in an 8 x 6 in figure
LABEL_CHAR = 0.0085   # one character's width, as a fraction of the axes' width
LABEL_OFFSETS = [(0.01, 0.008), (0.01, -0.04), (-0.01, 0.008), (-0.01, -0.04)] + [
    (dx, dy * LABEL_HEIGHT) for step in range(1, 12) for dy in (step + 0.25, -step - 1.25) for dx in (0.01, -0.01)]


def place_labels(points: Sequence[tuple[float, float]], texts: Sequence[str]) -> list[tuple[float, float, str]]:
    """(x, y, horizontal alignment) in axes fractions for each label near its point (given in axes fractions), the
    first of `LABEL_OFFSETS` whose box overlaps no label placed before it and stays inside the axes: settings that
    land on one spot (the AUC-1.0 cluster) get a stacked column of labels instead of one illegible blot."""
    placed: list[tuple[float, float, float, float]] = []
    out = []
    for (px, py), text in zip(points, texts):
        width = LABEL_CHAR * len(text)
        choice = None
        for dx, dy in LABEL_OFFSETS:
            left = px + dx if dx >= 0 else px + dx - width
            box = (left, py + dy, left + width, py + dy + LABEL_HEIGHT)
            inside = box[0] >= 0 and box[2] <= 1 and box[1] >= 0 and box[3] <= 1
            if inside and not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
                choice = (box, "left" if dx >= 0 else "right", px + dx, py + dy)
                break
        if choice is None:  # nowhere free: the first offset, overlapping
            dx, dy = LABEL_OFFSETS[0]
            choice = ((px + dx, py + dy, px + dx + width, py + dy + LABEL_HEIGHT), "left", px + dx, py + dy)
        placed.append(choice[0])
        out.append((choice[2], choice[3], choice[1]))
    return out


def plot_frontier(rows: Sequence[FrontierRow], path: Path, title: str = "") -> Path:
    """frontier.png: style accuracy (x) against best-attack AUC (y), error bars, the Pareto front as a step
    line, the undefended LoRA marked, chance (AUC 0.5) dashed; settings without both numbers are listed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 6), dpi=150, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    plotted = [row for row in rows if row.point is not None]
    lows = [0.5]
    highs = [0.5]
    for row in plotted:
        x, y = row.point
        xe, ye = row.stats["style_accuracy"].errors(), row.stats["auc"].errors()
        base = row.setting.undefended
        ax.errorbar(x, y, xerr=None if xe is None else [[xe[0]], [xe[1]]], yerr=None if ye is None else [[ye[0]], [ye[1]]],
                    fmt="*" if base else "o", markersize=14 if base else 7, color="crimson" if base else "C0",
                    ecolor="0.6", elinewidth=1, capsize=3, zorder=3, label="undefended LoRA" if base else None)
        lows.append(y - (ye[0] if ye else 0.0))
        highs.append(y + (ye[1] if ye else 0.0))
    front = sorted((row.point for row in plotted if row.on_front), key=lambda p: p[0])
    if front:
        ax.step([p[0] for p in front], [p[1] for p in front], where="pre", color="C1", lw=1.5, zorder=2,
                label="Pareto front (lower AUC, higher style accuracy)")
    ax.axhline(0.5, color="0.3", ls="--", lw=1, zorder=1, label="chance (AUC 0.5)")
    ax.set_ylim(min(lows) - 0.02, min(1.02, max(highs) + 0.03) + 0.03 * min(len(plotted), 8))  # room for stacked labels
    ax.margins(x=0.12)
    if plotted:
        x0, x1 = ax.get_xlim()
        y0, y1 = ax.get_ylim()
        fractions = [((row.point[0] - x0) / (x1 - x0), (row.point[1] - y0) / (y1 - y0)) for row in plotted]
        for row, (fx, fy), (lx, ly, align) in zip(plotted, fractions, place_labels(fractions, [r.setting.display for r in plotted])):
            ax.annotate(row.setting.display, (fx, fy), xytext=(lx, ly), xycoords="axes fraction", textcoords="axes fraction",
                        fontsize=7, ha=align, va="bottom", arrowprops={"arrowstyle": "-", "color": "0.55", "lw": 0.6,
                                                                        "shrinkA": 0, "shrinkB": 4})
    ax.set_xlabel("Utility: style accuracy of generations (higher = better)")
    ax.set_ylabel("Privacy risk: best-attack AUC (lower = better)")
    ax.set_title(title or "Privacy / utility frontier", fontsize=11)
    left_out = [row.setting.display for row in rows if row.finished and row.point is None]
    if not plotted:
        ax.text(0.5, 0.6, "no finished run with both a best-attack AUC and a style accuracy", ha="center",
                transform=ax.transAxes, fontsize=9)
    if left_out:
        ax.text(0.01, 0.01, "not plotted (no style accuracy or AUC): " + "; ".join(left_out), transform=ax.transAxes,
                fontsize=7, va="bottom", wrap=True)
    ax.grid(True, alpha=0.3)
    fig.legend(fontsize=8, loc="outside lower center", ncols=3, framealpha=0.9)  # below the axes: clear of every label
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def write_frontier(sweep: Sweep) -> tuple[Path, Path]:
    """Write <root>/frontier.md and <root>/frontier.png from the sweep's finished runs."""
    rows = frontier_rows(sweep)
    sweep.root.mkdir(parents=True, exist_ok=True)
    md = sweep.root / FRONTIER_MD
    atomic_write_text(md, render_frontier_md(sweep, rows))
    png = plot_frontier(rows, sweep.root / FRONTIER_PNG, title=f"Privacy / utility frontier: {sweep.name}")
    return md, png
