"""The Hugging Face model card (`<lora_dir>/README.md`) of an exported LoRA, with a privacy card.

The card is public, so it is built only from aggregate numbers and settings: config values that
are local paths become `<local path>`, paths in the reproduce command become `<path>`, and
`scrub` removes every caller-named forbidden string (captions, sample ids, file names, paths) as
well as the report's own sample ids. A final check raises rather than write a card that leaks.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from ..errors import PrivtuneError
from ..export import LORA_FILE
from ..io import atomic_write_text
from ..models import methods
from .report import attack_rows, best_attack, fmt, fmt_ci, fmt_num, fmt_settings, md_table, privacy_lines, utility_section, warning_lines

CARD_FILE = "README.md"
REDACTED = "<redacted>"
LOCAL_PATH = "<local path>"
COMMAND_PATH = "<path>"
UNDEFENDED = {"lora", "none", "undefended"}
BUILTIN_VALUES = {"embedded", "none", "null", "latest", ""}
ALWAYS_PATH_KEYS = {"output_dir", "resume", "output-dir"}
GENERIC_SECTIONS = {"model", "data", "lora", "train", "optim", "export", "eval", "trainer"}
PATH_SUFFIXES = (
    ".yaml", ".yml", ".json", ".jsonl", ".csv", ".parquet", ".txt", ".py", ".png", ".jpg", ".jpeg", ".webp",
    ".gif", ".bmp", ".safetensors", ".bin", ".pt", ".pth", ".ckpt",
)
TRAIN_KEYS = (("train", "max_steps"), ("train", "batch_size"), ("train", "gradient_accumulation_steps"),
              ("optim", "lr"), ("data", "resolution"))  # no seed: with public data it names the members


class CardLeakError(PrivtuneError):
    """The model card would contain a forbidden string (caption, sample id, file name or path)."""


def looks_like_path(value: Any, check_exists: bool = True) -> bool:
    """True for absolute, home, ./ or ../ paths, file names with a data/model suffix, Windows paths,
    and (with `check_exists`) any string naming an existing file or folder."""
    if not isinstance(value, str):
        return False
    v = value.strip()
    if v.lower() in BUILTIN_VALUES:
        return False
    if v.startswith(("/", "~", "./", "../", ".\\", "..\\")) or "\\" in v or re.match(r"^[A-Za-z]:[\\/]", v):
        return True
    if v.lower().endswith(PATH_SUFFIXES):
        return True
    if check_exists:
        try:
            return Path(v).expanduser().exists()
        except OSError:
            return False
    return False


def _strip_paths(obj: Any) -> Any:
    """A copy of a config section with every path-like string replaced by `<local path>`."""
    if isinstance(obj, Mapping):
        return {k: _strip_paths(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strip_paths(v) for v in obj]
    return LOCAL_PATH if looks_like_path(obj) else obj


def scrub_command(command: str) -> str:
    """The command with path-valued `key=value` arguments (and bare absolute/relative paths) as `<path>`."""
    try:
        tokens = shlex.split(command)
    except ValueError:
        tokens = command.split()
    out = []
    for tok in tokens:
        key, sep, value = tok.partition("=")
        if sep and key:
            always = key.lstrip("-") in ALWAYS_PATH_KEYS and value.lower() not in BUILTIN_VALUES
            out.append(f"{key}={COMMAND_PATH}" if always or looks_like_path(value) else tok)
        else:
            out.append(COMMAND_PATH if looks_like_path(tok, check_exists=False) else tok)
    return " ".join(shlex.quote(t) if t != COMMAND_PATH and not t.endswith("=" + COMMAND_PATH) else t for t in out)


def _pattern(forbidden: Iterable[str]) -> re.Pattern | None:
    """One case-insensitive regex of all forbidden strings, longest first, each matched only where
    no letter or digit continues it: caption "libra" is not inside "library_name", "train" is not
    inside "training", but `u231a` is caught in `u231a.png`."""
    items = sorted({f.strip() for f in forbidden if isinstance(f, str) and f.strip()}, key=len, reverse=True)
    if not items:
        return None
    body = "|".join(re.escape(f) for f in items)
    return re.compile(rf"(?<![^\W_])(?:{body})(?![^\W_])", re.IGNORECASE)


def scrub(obj: Any, forbidden: list[str]) -> Any:
    """`obj` (a string, or dicts / lists of them, keys included) with every occurrence of a forbidden
    string, in any letter case and not part of a longer word, replaced by `<redacted>`."""
    pattern = _pattern(forbidden)
    if pattern is None:
        return obj

    def walk(x: Any) -> Any:
        if isinstance(x, str):
            return pattern.sub(REDACTED, x)
        if isinstance(x, Mapping):
            return {walk(k): walk(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v) for v in x]
        return x

    return walk(obj)


def _leaks(text: str, forbidden: Iterable[str]) -> list[str]:
    """The forbidden strings still found in `text`, by the same rule `scrub` removes them."""
    return [f for f in forbidden if (p := _pattern([f])) is not None and p.search(text)]


def _report_forbidden(report: Mapping[str, Any], lora_dir: Path) -> list[str]:
    """Sample ids of the report, local paths of the config, and the LoRA folder itself."""
    out = [str(lora_dir.resolve())]
    if len(lora_dir.parts) > 1:
        out.append(str(lora_dir))
    for a in (report.get("attacks") or {}).values():
        for part in ("samples", "calibration_samples"):
            out += [str(i) for i in (a.get(part) or {}).get("ids") or []]
    cfg = report.get("config") or {}
    candidates = [cfg.get("output_dir"), cfg.get("resume"), _get(cfg, ("model", "base")), _get(cfg, ("data", "source"))]
    out += [c for c in candidates if looks_like_path(c)]
    if cfg.get("output_dir"):
        out.append(str(cfg["output_dir"]))
    return out


def _get(cfg: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    node: Any = cfg
    for k in keys:
        if not isinstance(node, Mapping) or k not in node:
            return None
        node = node[k]
    return node


def _defense_rows(report: Mapping[str, Any], base_model: str) -> list[list[str]]:
    cfg = report.get("config") or {}
    d = report.get("defense") or {}
    lora = cfg.get("lora") or {}
    data = cfg.get("data") or {}
    targets = lora.get("targets")
    settings = d.get("settings") or {}
    sections = {k: v for k, v in settings.items() if k not in GENERIC_SECTIONS}
    if not any(isinstance(v, Mapping) for v in settings.values()):  # a flat settings dict: every defense section of the config
        for name, section in cfg.items():
            if isinstance(section, Mapping) and name not in GENERIC_SECTIONS:
                sections.setdefault(name, section)
    changed = {k: v for k, v in settings.items() if k in GENERIC_SECTIONS and isinstance(v, Mapping)}
    scalars = {k: v for k, v in sections.items() if not isinstance(v, Mapping)}
    rows = [
        ["Defense", "none (plain LoRA)" if str(d.get("name", "none")).lower() in UNDEFENDED else d.get("name")],
        ["Defense settings", fmt_settings(_strip_paths(scalars))],
        ["Trainer", cfg.get("trainer", "n/a")],
        ["Base model", base_model],
        ["LoRA", f"rank {lora.get('rank', 'n/a')}, alpha {lora.get('alpha', 'n/a')}, targets "
                 f"{', '.join(targets) if isinstance(targets, list) else targets}"
                 + (", text encoder too" if lora.get("text_encoder") else "")],
    ]
    for name, section in sections.items():
        if isinstance(section, Mapping):
            rows.append([f"`{name}` settings", fmt_settings(_strip_paths(section))])
    if changed:
        rows.append(["Changed from plain LoRA", fmt_settings(_strip_paths(changed))])
    train = [f"{keys[-1]}={fmt_num(v)}" for keys in TRAIN_KEYS if (v := _get(cfg, keys)) is not None]
    if train:
        rows.append(["Training", ", ".join(train)])
    source = data.get("source")
    if source is not None:
        rows.append(["Training data", LOCAL_PATH if looks_like_path(source) else str(source)])
    return rows


def _guarantee(privacy: Mapping[str, Any] | None) -> str:
    if not privacy or privacy.get("epsilon") is None:
        return "**No formal guarantee** (no differentially private training): the attacks below are the only evidence."
    line = f"**(ε = {fmt_num(privacy['epsilon'])}, δ = {fmt_num(privacy.get('delta'))})-differential privacy**"
    if privacy.get("accountant"):
        line += f", {privacy['accountant']} accountant"
    for caveat in privacy.get("caveats") or []:
        line += f"\n\n**Caveat:** {caveat}"
    return line


def render_card(report: Mapping[str, Any], *, base_model: str, license: str, repro_command: str) -> str:
    """The card text before scrubbing: front matter, usage, privacy card, reproduce command."""
    d = report.get("defense") or {}
    defense = str(d.get("name") or "none")
    tag = re.sub(r"[^a-z0-9-]+", "-", defense.lower()).strip("-") or "none"
    from ..embedded import is_embedded

    packaged = is_embedded(base_model)
    shown_base = (f"{base_model} (privtune's tiny SD, installed with the package)" if packaged
                  else LOCAL_PATH if looks_like_path(base_model) else base_model)
    tags = list(dict.fromkeys(["stable-diffusion", "lora", "privtune", tag, "text-to-image", "diffusers"]))
    front = {"tags": tags, "license": license,
             "library_name": "diffusers"}
    if shown_base != LOCAL_PATH and not packaged:  # base_model must be a hub id
        front = {"base_model": base_model, **front}
    summary = best_attack(report)
    privacy = report.get("privacy")
    split = report.get("split_sizes") or {}
    protocol = report.get("protocol") or {}
    load_base = base_model if shown_base != LOCAL_PATH else "path/to/base-model"
    pipeline = report.get("pipeline") or "StableDiffusionPipeline"  # SDXL runs record StableDiffusionXLPipeline
    method_imports, load_lines = methods.usage(report.get("adapter_method") or "lora", LORA_FILE)
    imports = [*method_imports, f"from diffusers import {pipeline}"]
    if packaged:
        imports.append("from privtune.embedded import embedded")
        load_expr = f'str(embedded("{base_model}").model)'
    else:
        load_expr = f'"{load_base}"'

    out = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", ""]
    undefended = defense.lower() in UNDEFENDED
    out += [f"# privtune LoRA ({'no defense' if undefended else defense})", ""]
    how = "with **no privacy defense** (plain LoRA)" if undefended else f"under the **{defense}** defense"
    out += [f"A LoRA adapter for `{shown_base}` fine-tuned with privtune {how}, "
            "then audited with membership-inference attacks (MIAs) that try to tell its training images "
            "from held-out images of the same distribution.", ""]
    out += ["## Usage", "", "```python", *imports, "",
            f'pipe = {pipeline}.from_pretrained({load_expr})',
            *load_lines,
            'image = pipe("a prompt", num_inference_steps=25).images[0]', "```", ""]
    out += ["## Privacy card", "", md_table(["Setting", "Value"], _defense_rows(report, shown_base)), ""]
    out += ["### Guarantee", "", _guarantee(privacy), ""]
    extra = privacy_lines(privacy)[1:] if privacy and privacy.get("epsilon") is not None else []
    extra = [line for line in extra if not line.startswith("Caveat: ")]
    out += [*[f"- {line}" for line in extra], *([""] if extra else [])]
    out += ["### Membership-inference attacks", ""]
    threat = protocol.get("threat_model")
    if threat:
        out += [f"Threat model: {threat}", ""]
    if summary:
        flipped = " (score direction fitted on calibration data, reversed from the paper's)" if summary.get("inverted") else ""
        out += [f"Strongest attack: **{summary['name']}**{flipped}", "",
                f"- AUC: **{fmt_ci(summary.get('auc'))}** (0.5 = cannot tell members from non-members)",
                f"- TPR@1%FPR: **{fmt_ci(summary.get('tpr@1%fpr'))}**",
                f"- TPR@0.1%FPR: **{fmt_ci(summary.get('tpr@0.1%fpr'))}**", ""]
        columns, rows = attack_rows(report, calibrated=False)
        out += [md_table(columns, rows), ""]
        notes = warning_lines(report)
        if notes:
            out += ["Caveats:", "", *[f"- {w}" for w in notes], ""]
    else:
        out += ["No attack was run.", ""]
    comp = report.get("comparison")
    if comp:
        b = comp.get("best_auc") or {}
        base_name = (comp.get("baseline") or {}).get("defense") or "baseline"
        out += [f"Against the undefended baseline ({base_name}): best AUC {fmt(b.get('run'))} vs "
                f"{fmt(b.get('baseline'))} (change {'n/a' if b.get('delta') is None else format(b['delta'], '+.3f')}).", ""]
    threats = [entry["card"] for entry in (report.get("threats") or {}).values()]
    if threats:
        out += ["### Other attacks", "", *[f"- {line}" for line in threats], ""]
    util = utility_section(report, run_name="This model", baseline_name="Undefended baseline")
    out += ["### Utility", "", util or "No utility numbers were computed.", ""]
    out += ["### Evaluation data", "", f"- Split sizes: {fmt_settings(split)}"]
    if protocol:
        cal, rep = protocol.get("n_calibration") or {}, protocol.get("n_report") or {}
        out.append(f"- Attacks calibrated on {cal.get('members')} members / {cal.get('nonmembers')} non-members, "
                   f"reported on a disjoint {rep.get('members')} members / {rep.get('nonmembers')} non-members")
    out += [f"- privtune {report.get('privtune_version')}, evaluated {report.get('created')}", ""]
    out += ["### Reproduce", "", "```bash", scrub_command(repro_command), "```", ""]
    return "\n".join(out)


def write_model_card(
    lora_dir,
    report: Mapping[str, Any],
    *,
    base_model: str,
    license: str = "other",
    repro_command: str,
    forbidden: list[str] | None = None,
) -> Path:
    """Writes `lora_dir/README.md` atomically; raises CardLeakError if a forbidden string survives scrubbing.

    `forbidden` names what must never appear (training captions, sample ids, file names, paths);
    the report's sample ids and the config's local paths are added to it.
    """
    lora_dir = Path(lora_dir)
    banned = [*(forbidden or []), *_report_forbidden(report, lora_dir)]
    text = scrub(render_card(report, base_model=base_model, license=license, repro_command=repro_command), banned)
    leaks = _leaks(text, banned)
    if leaks:
        raise CardLeakError(
            f"the model card would contain {len(leaks)} forbidden string(s) even after scrubbing; "
            "not writing it (a forbidden string may overlap a placeholder such as <redacted>)"
        )
    path = lora_dir / CARD_FILE
    atomic_write_text(path, text)
    return path
