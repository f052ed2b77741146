"""The run folder's states and transitions: what may start, resume or replace a run, decided before writing.

A folder is *empty* (absent, or holding nothing), *stale* (files of a run that failed before it saved a model
or a checkpoint: reusable), or *holds a run* (a checkpoint, `lora/` or `report.json`). A new run in a folder
that holds one needs `overwrite=true`, and then the old run is moved aside whole (`<folder>.replaced-<time>`)
before the first new file is written, so no file of the old run can describe the new model. A resume must
keep every key that shapes the model or its data; keys that only steer logging, checkpointing, evaluation,
export or sampling may change, and each change is recorded in `config_changes.jsonl`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from omegaconf import OmegaConf

from .config import flatten, to_container
from .errors import ConfigError

CONFIG = "config.yaml"
CHANGES = "config_changes.jsonl"
PHASES = ("teachers",)  # sub-runs a trainer writes inside its folder (DistillMD's phase 1); nothing else is looked into

# Keys (or whole sections, ending in ".") a resumed run may change: none alters the trained weights.
RESUME_SAFE = (
    "output_dir", "resume", "overwrite", "recipe", "tracking", "tracking_log_captions", "tracker_project",
    "train.log_every", "train.checkpoint_every", "train.checkpoints_total_limit", "train.num_workers",
    "train.validation_every", "train.validation_prompts", "train.validation_inference_steps",
    "train.validation_guidance_scale", "eval.", "export.", "sampling.",
)


def holds_run(folder: Path) -> bool:
    """True when the folder holds something a new run would destroy: a model, a report or a checkpoint."""
    return ((folder / "lora").exists() or (folder / "report.json").exists()
            or any(folder.glob("checkpoints/checkpoint-*"))
            or any(any((folder / phase).glob("checkpoints/checkpoint-*")) for phase in PHASES))


def started(folder: Path) -> bool:
    """True when a privtune run began here (its config.yaml, or a DistillMD phase 1's), finished or not."""
    return ((folder / CONFIG).is_file() or any((folder / phase / CONFIG).is_file() for phase in PHASES)
            or holds_run(folder))


def check_output_folder(folder: Path) -> None:
    """output_dir must be (or be creatable as) a writable folder; said before any training."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"output_dir={str(folder)!r} is a file, not a folder; pass output_dir=<a folder path>")
    probe = folder if folder.exists() else next((p for p in folder.parents if p.exists()), Path("."))
    if not probe.is_dir():
        raise ConfigError(f"output_dir={str(folder)!r} cannot be created: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir={str(folder)!r} is not writable ({probe} is read-only); pass output_dir=<a writable folder>")


def resume_safe(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUME_SAFE)


def config_differences(old: dict, new: dict) -> dict[str, tuple]:
    """Flattened keys whose values differ between two resolved configs: key -> (old, new)."""
    a, b = flatten(old), flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def max_steps_is_safe(old: dict) -> bool:
    """train.max_steps changes only when training stops, unless a schedule or a DP budget is spread over it."""
    if (old.get("optim") or {}).get("scheduler", "constant") != "constant":
        return False
    dp = old.get("dp") or {}
    return not (old.get("trainer") == "dpsgd" and dp.get("target_epsilon") is not None)


def check_resume(folder: Path, cfg) -> dict[str, tuple]:
    """Refuse a resume whose config would change the model or its data; returns the safe changes."""
    path = folder / CONFIG
    if not path.is_file():
        return {}
    old = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    new = to_container(cfg)
    diffs = config_differences(old, new)
    from . import schema

    defaults, recorded = flatten(schema.defaults()), flatten(old)
    diffs = {k: v for k, v in diffs.items()  # a key added to privtune after the run started, at its default: no change
             if k in recorded or k not in defaults or v[1] != defaults[k]}
    safe_steps = max_steps_is_safe(old)
    refused = {k: v for k, v in diffs.items()
               if not (resume_safe(k) or (k == "train.max_steps" and safe_steps))}
    if refused:
        listed = "; ".join(f"{k}: {v[0]!r} in the run, {v[1]!r} now" for k, v in list(refused.items())[:8])
        more = f" (and {len(refused) - 8} more)" if len(refused) > 8 else ""
        why = (" (train.max_steps also sets the LR schedule or the DP noise here)" if "train.max_steps" in refused else "")
        raise ConfigError(f"resume would change the model this run folder holds: {listed}{more}{why}. Resume with the run's "
                          f"values (see {path}), or start a new run with output_dir=<new folder> (or overwrite=true)")
    return {k: v for k, v in diffs.items() if k not in ("resume", "overwrite")}


def record_changes(folder: Path, changes: dict[str, tuple], step: int | None = None) -> None:
    """Append the keys a resume changed (old -> new) to config_changes.jsonl."""
    if not changes:
        return
    line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "resumed_at_step": step,
                       "changed": {k: {"was": v[0], "now": v[1]} for k, v in changes.items()}}, default=str)
    with open(folder / CHANGES, "a") as fh:
        fh.write(line + "\n")


def move_aside(folder: Path) -> Path:
    """Rename the folder to `<folder>.replaced-<time>` (a free name) and return where it went."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = folder.with_name(f"{folder.name}.replaced-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = folder.with_name(f"{folder.name}.replaced-{stamp}-{n}")
    shutil.move(str(folder), str(target))
    return target
