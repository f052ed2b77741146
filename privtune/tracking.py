"""Experiment tracking through Accelerate's trackers (W&B, TensorBoard) or none.

A tracker is a third party, so by default it gets what the privacy card would show and no more:
validation images captioned "validation prompt 1", ... (the prompts themselves only when they are
the user's own `train.validation_prompts`), hyper-parameters with every local path replaced by
`<local path>` and every training / evaluation caption and sample id by `<redacted>`, and (W&B)
no captured console output, code, git state or system metadata (program, arguments, folders).
`tracking_log_captions=true` opts in to sending all of it. The local run folder is not affected.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

NEUTRAL_CAPTION = "validation prompt {}"
REDACTED = "<redacted>"
# always a local folder when set (output_dir, resume, eval.baseline, distill.teachers), even one not there yet
PATH_KEYS = {"output_dir", "resume", "baseline", "teachers"}
# keys whose bare names (no "/") are checked against the file system: elsewhere a word such as
# tracker_project=privtune is not a path just because the working folder holds one of that name
NAME_PATH_KEYS = {"base", "source"}


def prepare(kind: str):
    """The `log_with` value for Accelerator; W&B without credentials runs offline rather than prompting."""
    if kind == "none":
        return None
    if kind == "wandb":
        has_login = os.environ.get("WANDB_API_KEY") or (Path.home() / ".netrc").exists()
        if not os.environ.get("WANDB_MODE") and not has_login:
            os.environ["WANDB_MODE"] = "offline"
            print("privtune: no W&B credentials found; logging offline (sync later with `wandb sync`)")
        os.environ.setdefault("WANDB_SILENT", "true")
    return kind


def logs_captions(cfg) -> bool:
    """`tracking_log_captions`: true sends validation prompts, data paths and ids to the tracker."""
    return bool(cfg.get("tracking_log_captions", False))


# ---------------------------------------------------------------------- what trackers may see
def normalize(caption: str) -> str:
    return " ".join(str(caption).split()).casefold()


def record_captions(record, separator: str | None = None) -> list[str]:
    """Every caption a row may train with: its caption, its `captions` list and (with `separator`) the parts."""
    out = [record.caption, *(getattr(record, "captions", None) or [])]
    if separator:
        out += [part for c in list(out) for part in str(c).split(separator)]
    return [c for c in out if isinstance(c, str) and c.strip()]


def held_out_prompts(source_records, members, nonmembers, trained, n: int = 4, separator: str | None = None) -> list[str]:
    """Up to `n` distinct validation prompts that are no training caption.

    Captions of source rows in neither the member nor the non-member split (nor trained on: duplicates,
    canaries, rows a defense adds), sharing no id, group or image with them; only when there are none,
    non-member captions (held out by construction). Either way a prompt equal to any training caption
    (case and spacing ignored; two rows can share a caption) is never chosen. [] when nothing qualifies.
    """
    members, nonmembers, trained = list(members), list(nonmembers), list(trained)
    split_rows = members + nonmembers + trained
    ids = {r.id for r in split_rows}
    groups = {r.group for r in split_rows}
    hashes = {r.sha256 for r in split_rows}
    training = {normalize(c) for r in members + trained for c in record_captions(r, separator)}
    evaluated = {normalize(c) for r in nonmembers for c in record_captions(r, separator)}

    def pick(rows, banned) -> list[str]:
        out, seen = [], set()
        for r in rows:
            key = normalize(r.caption)
            if not key or key in seen or any(normalize(c) in banned for c in record_captions(r, separator)):
                continue
            seen.add(key)
            out.append(r.caption)
            if len(out) == n:
                break
        return out

    unused = [r for r in source_records if r.id not in ids and r.group not in groups and r.sha256 not in hashes]
    prompts = pick(unused, training | evaluated) or pick(nonmembers, training)
    assert not any(normalize(p) in training for p in prompts)
    return prompts


def tracker_captions(cfg, prompts: list[str]) -> list[str]:
    """Captions of validation images sent to trackers: the prompts when they are the user's own
    `train.validation_prompts` (or with `tracking_log_captions`), else "validation prompt 1", ..."""
    if cfg.train.get("validation_prompts") or logs_captions(cfg):
        return list(prompts)
    return [NEUTRAL_CAPTION.format(i + 1) for i in range(len(prompts))]


def private_strings(*record_lists: Iterable, separator: str | None = None) -> dict[str, list[str]]:
    """{"captions": ..., "ids": ...} of the given rows (members, non-members, training rows), for `tracker_hparams`."""
    captions, ids = set(), set()
    for rows in record_lists:
        for r in rows or ():
            captions.update(c.strip() for c in record_captions(r, separator))
            ids.add(str(r.id))
    return {"captions": sorted(captions), "ids": sorted(ids)}


def _caption_pattern(captions: Iterable[str]) -> re.Pattern | None:
    """Case-insensitive; a caption matches only where no letter or digit continues it (as the model card's scrub)."""
    items = sorted({c.strip() for c in captions if c and c.strip()}, key=len, reverse=True)
    if not items:
        return None
    return re.compile(rf"(?<![^\W_])(?:{'|'.join(re.escape(c) for c in items)})(?![^\W_])", re.IGNORECASE)


def scrub_config(container: Any, private: Mapping[str, Iterable[str]] | None = None) -> Any:
    """A copy of a resolved config (plain dicts / lists) with path-like strings as `<local path>` and
    caption / sample id strings as `<redacted>`."""
    from .eval.card import BUILTIN_VALUES, LOCAL_PATH, looks_like_path

    private = private or {}
    pattern = _caption_pattern(private.get("captions") or ())
    ids = {str(i) for i in private.get("ids") or ()}

    def walk(node: Any, key: str = "") -> Any:
        if isinstance(node, Mapping):
            return {k: walk(v, str(k)) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return [walk(v, key) for v in node]
        if not isinstance(node, str):
            return node
        if key in PATH_KEYS and node.strip().lower() not in BUILTIN_VALUES:
            return LOCAL_PATH
        check = "/" in node or key in NAME_PATH_KEYS or key.endswith(("_dir", "_path", "_file", "folder"))
        if looks_like_path(node, check_exists=check):
            return LOCAL_PATH
        if node in ids or node.strip() in ids:
            return REDACTED
        return pattern.sub(REDACTED, node) if pattern is not None else node

    return walk(container)


def flatten(container: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted keys -> scalars (privtune.config.flatten), for trackers that want a flat table."""
    from .config import flatten as flatten_container

    return flatten_container(dict(container))


def tracker_hparams(cfg, private: Mapping[str, Iterable[str]] | None = None) -> dict[str, Any]:
    """The hyper-parameters trackers get: the whole resolved config, scrubbed unless `tracking_log_captions`."""
    from .config import to_container

    container = to_container(cfg)
    return flatten(container if logs_captions(cfg) else scrub_config(container, private))


def wandb_settings(cfg):
    """W&B settings without console capture, code, git state or system metadata (paths, arguments, host)
    unless `tracking_log_captions`; None = W&B's defaults."""
    if logs_captions(cfg):
        return None
    import wandb

    wanted = {"console": "off", "x_disable_meta": True, "x_disable_machine_info": True, "disable_git": True,
              "disable_code": True, "save_code": False, "x_save_requirements": False}
    known = getattr(wandb.Settings, "model_fields", None)
    return wandb.Settings(**{k: v for k, v in wanted.items() if known is None or k in known})


# ---------------------------------------------------------------------- trackers
def start(accelerator, cfg, run_dir: Path, hparams: dict) -> None:
    """Start the trackers; `hparams` should come from `tracker_hparams` (already scrubbed)."""
    if cfg.tracking == "none":
        return
    init_kwargs = {}
    if cfg.tracking == "wandb":
        init_kwargs = {"wandb": {"dir": str(run_dir), "name": f"{cfg.recipe}"}}
        settings = wandb_settings(cfg)
        if settings is not None:
            init_kwargs["wandb"]["settings"] = settings
    if cfg.tracking == "tensorboard":
        hparams = {k: (v if v is not None else "null") for k, v in hparams.items()}
    accelerator.init_trackers(cfg.tracker_project, config=hparams, init_kwargs=init_kwargs)


def log_images(accelerator, key: str, images, captions, step: int) -> None:
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            import wandb

            tracker.log({key: [wandb.Image(im, caption=c) for im, c in zip(images, captions)]}, step=step)
        elif tracker.name == "tensorboard":
            stack = np.stack([np.asarray(im) for im in images])
            tracker.writer.add_images(key, stack, step, dataformats="NHWC")


def log_table(accelerator, key: str, columns: list[str], rows: list[list], step: int | None = None) -> None:
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            import wandb

            tracker.log({key: wandb.Table(columns=columns, data=rows)}, step=step)
        elif tracker.name == "tensorboard":
            text = "\n".join(" | ".join(str(v) for v in row) for row in [columns, *rows])
            tracker.writer.add_text(key, text, step or 0)
