"""Experiment tracking through Accelerate's trackers (W&B, TensorBoard) or none."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


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


def start(accelerator, cfg, run_dir: Path, hparams: dict) -> None:
    if cfg.tracking == "none":
        return
    init_kwargs = {"wandb": {"dir": str(run_dir), "name": f"{cfg.recipe}"}} if cfg.tracking == "wandb" else {}
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
