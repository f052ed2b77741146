"""A trainer's run folder: what it may do to the folder, the files it writes, its checkpoints and resume.

The decisions (may this run start, resume or replace one?) live in `privtune.rundir`, as pure functions of
the folder and the config; this object carries them out for one run under Accelerate: it claims the folder,
writes the resolved config, saves checkpoints atomically (only the trainable weights) and restores them.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from ..config import to_yaml
from ..errors import ConfigError
from ..io import apply_umask, atomic_write_text
from .. import rundir

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TRAINABLE_FILE = "trainable.safetensors"


class RunFolder:
    """One run's folder; nothing is written before `claim`."""

    def __init__(self, cfg, path: Path):
        self.cfg = cfg
        self.path = Path(path)
        self.resume_changes: dict = {}
        self.replaces: Path | None = None

    # ------------------------------------------------------------------ decide (nothing written)
    def check(self) -> None:
        """Refuse to clobber a run unless asked, refuse a resume that would change the model, and note a
        folder to move aside."""
        cfg, path = self.cfg, self.path
        rundir.check_output_folder(path)
        held, begun = rundir.holds_run(path), rundir.started(path)
        if held and cfg.resume is None and not cfg.overwrite:
            raise ConfigError(
                f"run folder {path} already holds a run; pass resume=latest to continue it, "
                f"output_dir=<new folder> to start another, or overwrite=true to replace it (the old run is moved aside)"
            )
        if cfg.resume is not None and not begun and cfg.resume == "latest":
            raise ConfigError(f"resume=latest but {path} holds no run to resume; drop resume= to start fresh")
        self.resume_changes = rundir.check_resume(path, cfg) if cfg.resume is not None else {}
        self.replaces = path if cfg.resume is None and begun else None

    # ------------------------------------------------------------------ write
    def claim(self, accelerator) -> None:
        """Move a replaced (overwrite=true) or stale run folder aside whole, before the first file is written."""
        if self.replaces is not None and accelerator.is_main_process and self.replaces.exists():
            moved = rundir.move_aside(self.replaces)
            print(f"privtune: the previous run in {self.replaces} was moved aside to {moved}")
        self.replaces = None
        accelerator.wait_for_everyone()

    def write_config(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / rundir.CONFIG, to_yaml(self.cfg))

    # ------------------------------------------------------------------ checkpoints
    def checkpoints(self) -> list[Path]:
        root = self.path / "checkpoints"
        found = [(int(m.group(1)), p) for p in root.glob("checkpoint-*") if (m := CHECKPOINT_RE.match(p.name))]
        return [p for _, p in sorted(found)]

    def save_checkpoint(self, accelerator, step: int) -> None:
        """accelerate's state under checkpoints/checkpoint-<step>, written aside and renamed into place."""
        main = accelerator.is_main_process
        final = self.path / "checkpoints" / f"checkpoint-{step}"
        tmp = final.with_name(final.name + ".partial")
        if main and tmp.exists():
            shutil.rmtree(tmp)
        if main:
            tmp.parent.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if main:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            limit = self.cfg.train.checkpoints_total_limit
            if limit:
                for old in self.checkpoints()[:-limit]:
                    shutil.rmtree(old)
        accelerator.wait_for_everyone()

    def resume(self, accelerator, state) -> None:
        """Load the checkpoint `resume=` names (latest: the newest one, else start from step 0)."""
        resume = self.cfg.resume
        if resume is None:
            return
        main = accelerator.is_main_process
        if resume == "latest":
            found = self.checkpoints()
            if not found:
                if main:
                    print(f"privtune: no checkpoint in {self.path / 'checkpoints'}; starting from step 0")
                    self.record_changes(state.step)
                return
            path = found[-1]
        else:
            path = Path(resume)
            if not (path / TRAINABLE_FILE).is_file():
                raise ConfigError(f"resume={resume!r} is not a privtune checkpoint folder; use resume=latest or a "
                                  "checkpoints/checkpoint-<step> path")
        accelerator.load_state(str(path))
        if main:
            print(f"privtune: resumed from {path} at step {state.step}")
            self.record_changes(state.step)

    def record_changes(self, step: int) -> None:
        if self.resume_changes:
            rundir.record_changes(self.path, self.resume_changes, step)
            print(f"privtune: resumed with changed settings {sorted(self.resume_changes)} (recorded in {rundir.CHANGES})")


class TrainableCheckpoint:
    """accelerate save/load hooks that checkpoint only the trainable parameters, not a copy of the base model."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        accelerator.register_save_state_pre_hook(self.save)
        accelerator.register_load_state_pre_hook(self.load)

    def save(self, models, weights, output_dir) -> None:
        from safetensors.torch import save_file

        tagged = {}
        for i, m in enumerate(models):
            for n, p in self.accelerator.unwrap_model(m).named_parameters():
                if p.requires_grad:
                    tagged[f"{i}/{n}"] = p.detach().cpu().contiguous()
        save_file(tagged, os.path.join(output_dir, TRAINABLE_FILE))
        apply_umask(os.path.join(output_dir, TRAINABLE_FILE))  # safetensors writes 0600
        while weights:
            weights.pop()

    def load(self, models, input_dir) -> None:
        from safetensors.torch import load_file

        tagged = load_file(os.path.join(input_dir, TRAINABLE_FILE))
        loaded = list(models)
        while models:
            models.pop()
        for i, m in enumerate(loaded):
            params = dict(self.accelerator.unwrap_model(m).named_parameters())
            for key, value in tagged.items():
                idx, name = key.split("/", 1)
                if int(idx) == i:
                    params[name].data.copy_(value.to(params[name].device, params[name].dtype))
