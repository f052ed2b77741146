"""The evaluation report of one run: `report.json` (machine-readable), `report.md` (for people),
ROC and score-histogram plots, and the same numbers logged to the Accelerate trackers.

The report keeps everything needed to audit or re-plot a run (config, protocol, per-sample report
scores); the public model card (`card.py`) is built from it and strips what must not leave the
machine.
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from .. import __version__, tracking
from ..io import atomic_path, atomic_write_json, atomic_write_text

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PLOTS_DIR = "plots"
ROC_PNG = "roc.png"
METRICS = ("auc", "asr", "tpr@1%fpr", "tpr@0.1%fpr")
SUMMARY_METRICS = ("auc", "tpr@1%fpr", "tpr@0.1%fpr")
METRIC_LABELS = {"auc": "AUC", "asr": "ASR", "tpr@1%fpr": "TPR@1%FPR", "tpr@0.1%fpr": "TPR@0.1%FPR"}


def _jsonable(obj: Any) -> Any:
    """A detached, JSON-safe copy, so the report never aliases or chokes on the caller's objects."""
    return json.loads(json.dumps(obj, default=str))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def flat_numbers(obj: Any, prefix: str = "") -> dict[str, float]:
    """Dotted key -> number of every numeric leaf of a nested dict (utility and privacy numbers)."""
    out: dict[str, float] = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            out.update(flat_numbers(v, f"{prefix}{k}."))
    elif _is_number(obj):
        out[prefix[:-1]] = float(obj)
    return out


def fmt(v: Any, digits: int = 3) -> str:
    """A metric value with fixed decimals; n/a when missing or not finite."""
    if not _is_number(v) or not math.isfinite(v):
        return "n/a"
    return f"{v:.{digits}f}"


def fmt_num(v: Any) -> str:
    """A free-range number (utility, epsilon, delta) with 4 significant digits."""
    if isinstance(v, bool) or not _is_number(v):
        return "n/a" if v is None else str(v)
    return f"{v:.4g}"


def fmt_delta(v: Any) -> str:
    return "n/a" if not _is_number(v) or not math.isfinite(v) else f"{v:+.4g}"


def fmt_ci(metric: Mapping[str, Any] | None, digits: int = 3) -> str:
    """`value [lo, hi]` of a metrics entry, or just the value when it has no CI."""
    if not metric:
        return "n/a"
    text = fmt(metric.get("value"), digits)
    ci = metric.get("ci")
    if ci and len(ci) == 2:
        text += f" [{fmt(ci[0], digits)}, {fmt(ci[1], digits)}]"
    return text


def fmt_settings(settings: Mapping[str, Any] | None) -> str:
    """`k=v, k=v` of a flat or nested settings dict; `none` when empty."""
    if not settings:
        return "none"
    parts = []
    for k, v in settings.items():
        if isinstance(v, Mapping):
            parts.extend(f"{k}.{kk}={vv}" for kk, vv in v.items())
        else:
            parts.append(f"{k}={fmt_num(v) if _is_number(v) else v}")
    return ", ".join(parts)


def md_cell(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def md_table(columns: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(md_cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


ROOT_RECIPE = "lora"
NOT_DEFENSE_KEYS = ("recipe", "inherits", "trainer", "seed", "output_dir", "resume", "overwrite", "tracking", "tracker_project",
                    "tracking_log_captions", "model", "eval", "export", "train.log_every", "train.checkpoint_every",
                    "train.checkpoints_total_limit", "train.validation_every", "train.validation_prompts",
                    "train.validation_inference_steps", "train.validation_guidance_scale", "train.num_workers",
                    "train.cache_latents", "train.gradient_checkpointing")


def _is_local_path(value: Any) -> bool:
    """A string that names a file or folder (an absolute or relative path, or one that exists here)."""
    import os

    return isinstance(value, str) and (os.sep in value or value.startswith(".") or os.path.exists(value))


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> leaf (lists kept whole) of a nested dict."""
    if not isinstance(node, Mapping):
        return {prefix[:-1]: node}
    out: dict[str, Any] = {}
    for k, v in node.items():
        out.update(_leaves(v, f"{prefix}{k}."))
    return out


def defense_settings(config: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """What defines a run's defense, by section: the defense's own sections (those the root `lora` recipe's
    `defaults` lack, e.g. `dp` or `mp`) whole, and every other training key whose value differs from `defaults`
    (what the recipe chain and the command line changed); run bookkeeping, model, eval and export keys never."""
    out: dict[str, Any] = {"trainer": config.get("trainer")}
    for name, section in config.items():
        if name not in defaults and name not in NOT_DEFENSE_KEYS:
            out[name] = {k: v for k, v in section.items() if not _is_local_path(v)} if isinstance(section, Mapping) else section
    base = _leaves(defaults)
    for key, value in _leaves({k: v for k, v in config.items() if k in defaults}).items():
        if key.split(".")[0] in NOT_DEFENSE_KEYS or key in NOT_DEFENSE_KEYS or (key in base and base[key] == value):
            continue
        if _is_local_path(value):
            continue  # a data or teacher folder: the release never names where the training data lives
        section, _, rest = key.partition(".")
        if rest:
            out.setdefault(section, {})[rest] = value
        else:
            out[section] = value
    return out


def _defense(defense: Mapping[str, Any] | None, config: Mapping[str, Any]) -> dict[str, Any]:
    """`{"name", "settings"}` from `{"name", "settings"}` or a flat settings dict; the name
    defaults to the settings' or the config's trainer."""
    defense = dict(defense or {})
    trainer = defense.pop("trainer", None)
    name = defense.pop("name", None) or trainer or config.get("trainer") or "none"
    settings = defense.pop("settings", None)
    if settings is None:
        settings = defense
    return {"name": str(name), "settings": dict(settings)}


def _summary(attacks: Mapping[str, Any]) -> dict[str, Any]:
    """The attack with the highest oriented report-split AUC over every attacked release: the run's
    headline privacy number."""
    scored = [(n, a) for n, a in attacks.items() if _is_number(a.get("metrics", {}).get("auc", {}).get("value"))]
    if not scored:
        return {"best_attack": None, "n_attacks": len(attacks)}
    name, best = max(scored, key=lambda item: item[1]["metrics"]["auc"]["value"])
    entry: dict[str, Any] = {"name": name, "attack": best.get("attack", name), "release": best.get("release"),
                             "inverted": bool((best.get("orientation") or {}).get("inverted"))}
    for m in SUMMARY_METRICS:
        metric = best["metrics"].get(m) or {}
        entry[m] = {"value": metric.get("value"), "ci": metric.get("ci")}
    return {"best_attack": entry, "n_attacks": len(attacks)}


def best_attack(report: Mapping[str, Any]) -> dict[str, Any]:
    """`summary.best_attack` ({name, auc, tpr@1%fpr, tpr@0.1%fpr}), or {} when no attack ran."""
    return (report.get("summary") or {}).get("best_attack") or {}


def _delta(run: Any, base: Any) -> float | None:
    return run - base if _is_number(run) and _is_number(base) else None


def compare(report: Mapping[str, Any], baseline: Mapping[str, Any]) -> dict[str, Any]:
    """Best AUC and every utility number of `report` against `baseline` (another report), with deltas."""
    run_best, base_best = best_attack(report), best_attack(baseline)
    run_auc = (run_best.get("auc") or {}).get("value")
    base_auc = (base_best.get("auc") or {}).get("value")
    run_u, base_u = flat_numbers(report.get("utility") or {}), flat_numbers(baseline.get("utility") or {})
    utility = {}
    for key in [*run_u, *(k for k in base_u if k not in run_u)]:
        utility[key] = {"run": run_u.get(key), "baseline": base_u.get(key), "delta": _delta(run_u.get(key), base_u.get(key))}
    return {
        "baseline": {
            "defense": (baseline.get("defense") or {}).get("name"),
            "created": baseline.get("created"),
            "privtune_version": baseline.get("privtune_version"),
        },
        "best_auc": {
            "run": run_auc, "baseline": base_auc, "delta": _delta(run_auc, base_auc),
            "run_attack": run_best.get("name"), "baseline_attack": base_best.get("name"),
            "run_ci": (run_best.get("auc") or {}).get("ci"), "baseline_ci": (base_best.get("auc") or {}).get("ci"),
        },
        "utility": utility,
    }


def build_report(
    *,
    config: dict,
    attacks_result: dict,
    utility: dict | None,
    privacy: dict | None,
    split_sizes: dict,
    command: str,
    defense: dict,
    baseline: dict | None,
) -> dict:
    """The machine-readable report of one run; `baseline` (another run's report.json) adds `comparison`."""
    config = _jsonable(config)
    attacks = _jsonable(attacks_result.get("attacks") or {})
    report: dict[str, Any] = {
        "privtune_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "defense": _defense(_jsonable(defense), config),
        "config": config,
        "split_sizes": _jsonable(split_sizes),
        "protocol": _jsonable(attacks_result.get("protocol")),
        "attacks": attacks,
        "utility": _jsonable(utility),
        "privacy": _jsonable(privacy),
        "summary": _summary(attacks),
    }
    if baseline is not None:
        report["comparison"] = compare(report, baseline)
    return report


def attack_rows(report: Mapping[str, Any], calibrated: bool = True) -> tuple[list[str], list[list[str]]]:
    """Columns and formatted rows of the attack table (shared by report.md and the model card).

    Metrics are the oriented ones (direction fitted on calibration); an attack whose fitted direction
    flipped the spec's is marked "(inverted)", and report.md (`calibrated`) adds the spec-direction AUC.
    """
    ci_level = next(iter((report.get("attacks") or {}).values()), {}).get("metrics", {}).get("ci_level", 0.95)
    pct = f"{100 * ci_level:g}% CI"
    columns = ["Attack", f"AUC [{pct}]", "ASR", f"TPR@1%FPR [{pct}]", f"TPR@0.1%FPR [{pct}]"]
    if calibrated:
        columns += ["Spec-direction AUC", "Calibrated-threshold acc."]
    columns.append("NFE/sample")
    rows = []
    for name, a in (report.get("attacks") or {}).items():
        m = a.get("metrics") or {}
        label = f"{name} (inverted)" if (a.get("orientation") or {}).get("inverted") else name
        row = [label, fmt_ci(m.get("auc")), fmt((m.get("asr") or {}).get("value")),
               fmt_ci(m.get("tpr@1%fpr")), fmt_ci(m.get("tpr@0.1%fpr"))]
        if calibrated:
            spec = (a.get("metrics_spec") or {}).get("auc")
            row += [fmt((spec or {}).get("value")), fmt((a.get("calibrated_threshold") or {}).get("accuracy"))]
        row.append(fmt_num(a.get("nfe_per_sample")))
        rows.append(row)
    return columns, rows


def inversion_lines(report: Mapping[str, Any]) -> list[str]:
    """One line per attack whose fitted score direction is the reverse of the spec's."""
    out = []
    for name, a in (report.get("attacks") or {}).items():
        o = a.get("orientation") or {}
        if o.get("inverted"):
            spec = ((a.get("metrics_spec") or {}).get("auc") or {}).get("value")
            out.append(f"**{name}**: {o.get('note') or 'inverted on this model'} (spec-direction AUC {fmt(spec)} on the "
                       f"report half, {fmt(o.get('calibration_auc_spec'))} on calibration; the oriented AUC is reported)")
    return out


def warning_lines(report: Mapping[str, Any]) -> list[str]:
    """Each distinct metric warning once, prefixed by the attacks it applies to."""
    by_text: dict[str, list[str]] = {}
    for name, a in (report.get("attacks") or {}).items():
        for w in (a.get("metrics") or {}).get("warnings") or []:
            by_text.setdefault(w, []).append(name)
    return [f"{', '.join(names)}: {text}" for text, names in by_text.items()]


def summary_line(report: Mapping[str, Any]) -> str:
    s = best_attack(report)
    if not s:
        return "No attack was run."
    return (
        f"Best attack by AUC: **{s['name']}**{' (direction inverted)' if s.get('inverted') else ''}: AUC {fmt_ci(s.get('auc'))}, "
        f"TPR@1%FPR {fmt_ci(s.get('tpr@1%fpr'))}, TPR@0.1%FPR {fmt_ci(s.get('tpr@0.1%fpr'))}"
    )


def console_summary(report: Mapping[str, Any], run_dir) -> list[str]:
    """The few lines a finished run prints: the strongest attack and, when measured, what the LoRA learned."""
    lines = [f"privtune: {summary_line(report).replace('**', '')}"]
    u = report.get("utility") or {}
    if "style_accuracy" in u:
        base = u.get("base_model") or {}
        slots = u.get("slot_accuracy") or {}
        mean = sum(v for k, v in slots.items() if k != "style") / max(1, len([k for k in slots if k != "style"]))
        base_slots = base.get("slot_accuracy") or {}
        base_mean = sum(v for k, v in base_slots.items() if k != "style") / max(1, len([k for k in base_slots if k != "style"]))
        lines.append(f"privtune: utility on {u.get('n_generations')} held-out captions: style accuracy "
                     f"{fmt(base.get('style_accuracy'))} (base) -> {fmt(u['style_accuracy'])} (LoRA); mean slot accuracy "
                     f"{fmt(base_mean)} -> {fmt(mean)}; FD {fmt_num(u.get('frechet_distance'))}, KID {fmt_num(u.get('kid'))}")
        codec = u.get("vae_round_trip") or {}
        if codec:
            codec_slots = [v for k, v in (codec.get("slot_accuracy") or {}).items() if k != "style"]
            lines.append(f"privtune: reference (the same held-out images, encoded and decoded by the frozen VAE): style accuracy "
                         f"{fmt(codec.get('style_accuracy'))}, mean slot accuracy {fmt(sum(codec_slots) / max(1, len(codec_slots)))}")
        if u.get("grid"):
            lines.append(f"privtune: held-out image | base | LoRA grid: {Path(run_dir) / PLOTS_DIR / u['grid']}")
    elif "heldout_denoising_loss" in u:
        lines.append(f"privtune: held-out / member denoising loss {fmt_num(u['heldout_denoising_loss'])} / "
                     f"{fmt_num(u.get('member_denoising_loss'))}")
    return lines


def utility_section(report: Mapping[str, Any], run_name: str = "This run", baseline_name: str = "Baseline") -> str | None:
    """The utility table, with the baseline and change columns when a comparison exists."""
    comp = (report.get("comparison") or {}).get("utility")
    if comp:
        rows = [[k, fmt_num(v["run"]), fmt_num(v["baseline"]), fmt_delta(v["delta"])] for k, v in comp.items()]
        return md_table(["Metric", run_name, baseline_name, "Change"], rows)
    values = flat_numbers(report.get("utility") or {})
    if not values:
        return None
    return md_table(["Metric", "Value"], [[k, fmt_num(v)] for k, v in values.items()])


def privacy_lines(privacy: Mapping[str, Any] | None) -> list[str]:
    """The DP guarantee in words, or the statement that there is none."""
    if not privacy:
        return ["No formal privacy guarantee: no differentially private trainer ran."]
    eps, delta = privacy.get("epsilon"), privacy.get("delta")
    lines = []
    if eps is not None:
        head = f"(ε = {fmt_num(eps)}, δ = {fmt_num(delta)})-differential privacy"
        if privacy.get("accountant"):
            head += f" (accountant: {privacy['accountant']})"
        lines.append(head)
    rest = {k: v for k, v in privacy.items() if k not in ("epsilon", "delta", "accountant", "caveats", "secret_sampling", "secret_noise")}
    lines += [f"{k}: {fmt_num(v) if _is_number(v) else v}" for k, v in rest.items()]
    if privacy.get("secret_sampling") and privacy.get("secret_noise"):
        lines.append("Poisson sampling and noise seeds: drawn from OS entropy, kept only in the private checkpoints")
    lines += [f"Caveat: {c}" for c in privacy.get("caveats") or []]
    return lines


def _defense_line(settings: Mapping[str, Any] | None) -> str:
    return fmt_settings(settings) if settings else f"every setting at the {ROOT_RECIPE} recipe's defaults"


def _header_lines(report: Mapping[str, Any]) -> list[str]:
    cfg = report.get("config") or {}
    lora = cfg.get("lora") or {}
    d = report.get("defense") or {}
    protocol = report.get("protocol") or {}
    lines = [
        f"- **Defense:** {d.get('name')} ({_defense_line(d.get('settings'))})",
        f"- **Trainer:** {cfg.get('trainer', 'n/a')}; LoRA rank {lora.get('rank', 'n/a')}, alpha {lora.get('alpha', 'n/a')}, "
        f"targets {lora.get('targets', 'n/a')}",
        f"- **Split sizes:** {fmt_settings(report.get('split_sizes'))}",
    ]
    if protocol:
        cal, rep = protocol.get("n_calibration") or {}, protocol.get("n_report") or {}
        lines.append(
            f"- **Attack protocol:** calibration fraction {protocol.get('calibration_fraction')}, seed {protocol.get('seed')}; "
            f"calibration {cal.get('members')} members / {cal.get('nonmembers')} non-members, "
            f"report {rep.get('members')} members / {rep.get('nonmembers')} non-members; {protocol.get('score_orientation', '')}"
        )
    attacked = protocol.get("members_attacked") or {}
    if attacked and attacked.get("attacked") != attacked.get("of"):
        lines.append(f"- **Members attacked:** {attacked['attacked']} of {attacked['of']} ({attacked['choice']}; "
                     "AUC and TPR stay unbiased, their intervals are wider than with every member)")
    if protocol.get("threat_model"):
        lines.append(f"- **Threat model:** {protocol['threat_model']}")
    lines.append(f"- **Created:** {report.get('created')} with privtune {report.get('privtune_version')}")
    return lines


def render_markdown(report: Mapping[str, Any]) -> str:
    """report.md: header, summary, attacks, warnings, utility, privacy, comparison, reproduce."""
    d = report.get("defense") or {}
    out = [f"# privtune evaluation report: {d.get('name')}", "", *_header_lines(report), ""]
    out += ["## Summary", "", summary_line(report), ""]
    out += ["## Attacks", ""]
    columns, rows = attack_rows(report)
    out += [md_table(columns, rows) if rows else "No attack was run.", ""]
    inverted = inversion_lines(report)
    if inverted:
        out += ["Score directions fitted on the calibration half that reverse the spec's:", "", *[f"- {x}" for x in inverted], ""]
    params = [f"- **{n}**: {fmt_settings(a.get('params'))}" for n, a in (report.get("attacks") or {}).items()]
    if params:
        out += ["Attack settings:", "", *params, ""]
    skipped = (report.get("protocol") or {}).get("attacks_skipped") or {}
    if skipped:
        out += ["Attacks not run (their requirements are not met by this release):", "",
                *[f"- **{n}**: {why}" for n, why in skipped.items()], ""]
    seconds = [(n, a.get("seconds")) for n, a in (report.get("attacks") or {}).items() if a.get("seconds") is not None]
    if seconds:
        out += ["Wall time per attack (calibration + report scoring): "
                + ", ".join(f"{n} {fmt_num(t)} s" for n, t in seconds), ""]
    warnings = warning_lines(report)
    out += ["## Warnings", "", *([f"- {w}" for w in warnings] or ["None."]), ""]
    util = utility_section(report)
    out += ["## Utility", "", util or "No utility numbers were computed.", ""]
    out += ["## Privacy", "", *[f"- {line}" for line in privacy_lines(report.get("privacy"))], ""]
    out += memorization_lines(report)
    out += threat_lines(report)
    comp = report.get("comparison")
    if comp:
        b, base = comp.get("best_auc") or {}, comp.get("baseline") or {}
        out += [f"## Comparison with baseline ({base.get('defense')}, {base.get('created')})", ""]
        rows = [[
            "best AUC", f"{fmt(b.get('run'))} ({b.get('run_attack')})", f"{fmt(b.get('baseline'))} ({b.get('baseline_attack')})",
            "n/a" if b.get("delta") is None else f"{b['delta']:+.3f}",
        ]]
        rows += [[k, fmt_num(v["run"]), fmt_num(v["baseline"]), fmt_delta(v["delta"])] for k, v in (comp.get("utility") or {}).items()]
        out += [md_table(["Metric", "This run", "Baseline", "Change"], rows), ""]
    plots = ["![ROC curves](plots/roc.png)", *[f"![{n} scores](plots/{score_plot_name(n)})" for n in report.get("attacks") or {}]]
    if (report.get("utility") or {}).get("grid"):
        plots.insert(0, f"![held-out image | base model | LoRA, same held-out captions](plots/{report['utility']['grid']})")
    out += ["## Plots", "", *plots, ""]
    out += ["## Reproduce", "", "```bash", str(report.get("command", "")), "```", ""]
    if report.get("evaluation_command"):
        out += ["This report was re-made by:", "", "```bash", str(report["evaluation_command"]), "```", ""]
    return "\n".join(out)


def _exposure(level: Mapping[str, Any]) -> str:
    """A canary level's mean exposure with its 95% CI when there is one."""
    ci = level["ci95"]
    return f"{level['mean_exposure']:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def memorization_lines(report: Mapping[str, Any]) -> list[str]:
    """The extraction and canary-audit sections of report.md, when those evaluations ran."""
    out: list[str] = []
    ex = report.get("extraction")
    if ex:
        out += ["## Extraction (Carlini et al. generate-and-filter)", "",
                f"{ex['n_extracted']} members extracted ({', '.join(ex['extracted_members']) or 'none'}) from {ex['n_captions']} "
                f"member captions; {ex['n_flagged']} flagged by a clique of >= {ex['settings'].get('clique')} generations; "
                f"duplicated members: {', '.join(ex['duplicated_members']) or 'none'}.", ""]
        reference = ex["settings"].get("reference", "reconstruction")
        rows = [[r["id"], r["repeats"], r["clique_size"], fmt(r["distance"]), fmt(r["image_distance"]), r["extracted"]]
                for r in ex["per_caption"]]
        out += [f"Confirmation: a clique image within tiled l2 {ex['settings'].get('delta')} of the caption's training "
                f"image{' as the VAE reconstructs it' if reference == 'reconstruction' else ''}.", "",
                md_table(["Member", "Repeats", "Largest clique", f"Tiled l2 to {reference}", "Tiled l2 to image", "Extracted"], rows), ""]
    ca = report.get("canaries")
    if ca:
        eps = ca["empirical_epsilon"]
        out += ["## Canary audit", "", f"Exposure in bits (max {ca['max_exposure_bits']:.2f}, never-inserted expectation 1.44); "
                f"empirical epsilon lower bound {eps['epsilon_lb']:.3f} ({eps.get('method', '')}).", ""]
        out += [md_table(["Repetitions", "Canaries", "Mean exposure [95% CI]"],
                         [[lv["repeats"], lv["n"], _exposure(lv)] for lv in ca["by_repetitions"]]), ""]
        if ca.get("one_run_audit"):
            out += [f"One-run audit (Steinke et al. 2023): epsilon >= {ca['one_run_audit']['epsilon_lb']:.3f}", ""]
        if ca.get("plot"):
            out += [f"![canary exposure]({ca['plot']})", ""]
    return out


def score_plot_name(attack: str) -> str:
    return f"scores_{re.sub(r'[^A-Za-z0-9_.-]+', '_', attack)}.png"


def _samples(attack: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
    s = attack.get("samples") or {}
    if not s.get("scores") or not s.get("labels"):
        return None
    scores, labels = np.asarray(s["scores"], dtype=np.float64), np.asarray(s["labels"], dtype=np.int64)
    if scores.shape != labels.shape or labels.min() == labels.max() or not np.isfinite(scores).all():
        return None
    return scores, labels


def _figure(width: float, height: float):
    """A pyplot-free Agg figure: no global backend state, safe in threads and headless jobs."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=150, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def plot_roc(report: Mapping[str, Any], path: Path) -> Path | None:
    """All attacks' ROC curves on log-log axes with the chance diagonal; None when nothing to plot."""
    from sklearn.metrics import roc_curve

    curves = []
    for name, a in (report.get("attacks") or {}).items():
        data = _samples(a)
        if data is not None:
            fpr, tpr, _ = roc_curve(data[1], data[0], drop_intermediate=False)
            n = (int((data[1] == 1).sum()), int((data[1] == 0).sum()))
            curves.append((name, fpr, tpr, (a.get("metrics") or {}).get("auc"), n))
    if not curves:
        return None
    n_mem, n_non = max(c[4][0] for c in curves), max(c[4][1] for c in curves)
    lo = 10.0 ** math.floor(math.log10(min(1e-3, 0.5 / n_non)))
    fig = _figure(6.0, 5.4)
    ax = fig.add_subplot()
    ax.plot([lo, 1.0], [lo, 1.0], ls="--", color="0.55", lw=1.2, label="chance (AUC 0.500)")
    styles = ("-", "--", "-.", ":")
    for i, (name, fpr, tpr, auc_entry, _) in enumerate(curves):
        # identical curves (e.g. two attacks at AUC 1.0) stay visible: thinner and differently dashed on top
        ax.plot(np.clip(fpr, lo, 1.0), np.clip(tpr, lo, 1.0), lw=max(1.2, 3.6 - 0.8 * i), ls=styles[i % len(styles)],
                label=f"{name} (AUC {fmt_ci(auc_entry)})", clip_on=False, zorder=3 + i)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, 1.25)  # a margin past 1, so a curve along TPR = 1 (AUC 1.0) is not hidden by the frame
    ax.set_ylim(lo, 1.25)
    for x in (1e-2, 1e-3):
        if x > lo:
            ax.axvline(x, color="0.75", lw=0.8, ls=":", zorder=0)
    ax.grid(True, which="major", alpha=0.35)
    ax.set_xlabel("False positive rate (non-members flagged as members)")
    ax.set_ylabel("True positive rate (members detected)")
    d = report.get("defense") or {}
    ax.set_title(f"Membership-inference ROC, defense: {d.get('name')}\n"
                 f"{n_mem} members vs {n_non} non-members (report split)", fontsize=11)
    ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
    return _save(fig, path)


def plot_scores(name: str, attack: Mapping[str, Any], path: Path) -> Path | None:
    """Overlaid histograms of member and non-member scores, with the calibrated threshold."""
    data = _samples(attack)
    if data is None:
        return None
    scores, labels = data
    edges = np.histogram_bin_edges(scores, bins="auto")
    if edges.size > 51:
        edges = np.histogram_bin_edges(scores, bins=50)
    fig = _figure(6.4, 4.2)
    ax = fig.add_subplot()
    for value, label, color in ((1, "members", "C3"), (0, "non-members", "C0")):
        part = scores[labels == value]
        ax.hist(part, bins=edges, alpha=0.5, color=color, edgecolor=color, linewidth=0.8, label=f"{label} (n={part.size})")
    tau = (attack.get("calibrated_threshold") or {}).get("threshold")
    if _is_number(tau) and math.isfinite(tau) and edges[0] <= tau <= edges[-1]:
        acc = (attack.get("calibrated_threshold") or {}).get("accuracy")
        ax.axvline(tau, color="0.2", ls="--", lw=1.2, label=f"calibrated threshold (acc. {fmt(acc)})")
    ax.set_xlabel("Attack score (higher = more likely member)")
    ax.set_ylabel("Samples")
    ax.set_title(f"{name}: member vs non-member scores (AUC {fmt_ci((attack.get('metrics') or {}).get('auc'))})", fontsize=11)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, framealpha=0.9)
    return _save(fig, path)


THREATS_DIR = "threats"


def attach_threats(run_dir, report: dict) -> dict:
    """report["threats"] from `run_dir/threats/*.json`, the results of the standalone attacks (gradient inversion,
    property inference, SIDE: `{"title", "markdown": [lines], "card": line}` each), so a re-evaluation keeps them."""
    found = {}
    for path in sorted((Path(run_dir) / THREATS_DIR).glob("*.json")):
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(entry, dict) and isinstance(entry.get("markdown"), list) and isinstance(entry.get("card"), str):
            found[path.stem] = {"title": entry.get("title", path.stem), "markdown": entry["markdown"], "card": entry["card"]}
    if found:
        report["threats"] = found
    else:
        report.pop("threats", None)
    return report


def threat_lines(report: Mapping[str, Any]) -> list[str]:
    """report.md sections of the standalone attacks, after the membership-inference ones."""
    out = []
    for entry in (report.get("threats") or {}).values():
        out += [*entry["markdown"], ""]
    return out


def write_report(run_dir, report: dict) -> dict[str, Path]:
    """report.json, report.md and plots/*.png under `run_dir`, each written atomically; the standalone attacks'
    results in `run_dir/threats/` join the report first (`attach_threats`).

    Returns {"report_json", "report_md", "roc", "scores_<attack>"...: path}; plots that cannot be
    drawn (no per-sample scores) are left out. Histograms of attacks no longer in the report are removed.
    """
    run_dir = Path(run_dir)
    plots_dir = run_dir / PLOTS_DIR
    paths: dict[str, Path] = {}
    attach_threats(run_dir, report)
    atomic_write_json(run_dir / REPORT_JSON, report)
    paths["report_json"] = run_dir / REPORT_JSON
    atomic_write_text(run_dir / REPORT_MD, render_markdown(report))
    paths["report_md"] = run_dir / REPORT_MD
    roc = plot_roc(report, plots_dir / ROC_PNG)
    if roc is not None:
        paths["roc"] = roc
    for name, attack in (report.get("attacks") or {}).items():
        file = score_plot_name(name)
        written = plot_scores(name, attack, plots_dir / file)
        if written is not None:
            paths[Path(file).stem] = written
    if plots_dir.is_dir():
        keep = {p.name for p in paths.values()}
        for stale in plots_dir.glob("scores_*.png"):
            if stale.name not in keep:
                stale.unlink()
    return paths


def _scalars(report: Mapping[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, a in (report.get("attacks") or {}).items():
        m = a.get("metrics") or {}
        for key in METRICS:
            entry = m.get(key) or {}
            out[f"eval/{name}/{key}"] = entry.get("value")
            if entry.get("ci"):
                out[f"eval/{name}/{key}_ci_low"], out[f"eval/{name}/{key}_ci_high"] = entry["ci"]
        out[f"eval/{name}/calibrated_accuracy"] = (a.get("calibrated_threshold") or {}).get("accuracy")
        out[f"eval/{name}/nfe_per_sample"] = a.get("nfe_per_sample")
    best = best_attack(report)
    for key in SUMMARY_METRICS:
        out[f"eval/best/{key}"] = (best.get(key) or {}).get("value")
    out.update({f"utility/{k}": v for k, v in flat_numbers(report.get("utility") or {}).items()})
    out.update({f"privacy/{k}": v for k, v in flat_numbers(report.get("privacy") or {}).items()})
    return {k: float(v) for k, v in out.items() if _is_number(v) and math.isfinite(v)}


def log_report(accelerator, report: Mapping[str, Any], plot_paths: Mapping[str, Any] | Iterable, step: int | None = None) -> None:
    """Logs the attack table, the scalar metrics (`eval/<attack>/<metric>`) and the PNG plots to the trackers."""
    from PIL import Image

    columns = ["attack", *METRICS, "auc_ci_low", "auc_ci_high", "calibrated_accuracy", "nfe_per_sample"]
    rows = []
    for name, a in (report.get("attacks") or {}).items():
        m = a.get("metrics") or {}
        ci = (m.get("auc") or {}).get("ci") or [None, None]
        rows.append([
            name, *[(m.get(k) or {}).get("value") for k in METRICS], ci[0], ci[1],
            (a.get("calibrated_threshold") or {}).get("accuracy"), a.get("nfe_per_sample"),
        ])
    tracking.log_table(accelerator, "eval/attacks", columns, rows, step=step)
    accelerator.log(_scalars(report), step=step)
    items = plot_paths.items() if isinstance(plot_paths, Mapping) else ((Path(p).stem, p) for p in plot_paths)
    for key, path in items:
        path = Path(path)
        if path.suffix.lower() != ".png" or not path.is_file():
            continue
        with Image.open(path) as im:
            image = im.convert("RGB")
        tracking.log_images(accelerator, f"eval/plots/{key}", [image], [key.replace("_", " ")], step or 0)
