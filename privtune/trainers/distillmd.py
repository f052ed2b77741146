"""DistillMD: a student LoRA distilled from two DualMD teachers, each sample taught by the teacher that never saw it.

Tran, Nguyen, Tran & Tran, "Dual-Model Defense: Safeguarding Diffusion Models from Membership
Inference Attacks through Disjoint Data Splitting" (arXiv 2410.16657; specs/defenses.md section 2):

    for x in D_i (i in {1, 2}):  target = stopgrad(eps_{theta_{3-i}}(x_t, t, c)),
    L(phi) = E || target - eps_phi(x_t, t, c) ||^2

The student adapter ("default") trains on all members; its regression target for a member of half
A is teacher B's prediction on the identical (noisy latent, timestep, noise, caption) and vice
versa, so the student never regresses onto a member's true noise. Teachers A and B are frozen LoRA
adapters of the same base UNet, run in eval mode under no_grad; only the student is exported.

Phase 1 trains the teachers as a DualMD run in `<output_dir>/teachers` (same data, seed, split and
halves), unless `distill.teachers` names a finished DualMD run. `resume=latest` resumes phase 1 if
it was interrupted, then phase 2 from its own checkpoints (which hold only the student).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from ..errors import ConfigError
from ..export import LORA_DIR, LORA_FILE
from ..models.lora import load_adapter, lora_config, use_adapter
from ..models.dualmd import ADAPTERS, EXPORT_DIRS
from . import capabilities
from .base import Batch, Trainer
from .dualmd import HALVES_FILE, TWO_ADAPTER_LIMITS, DualMDTrainer, PromptDiversification, check_two_adapter_config, halves_from_file
from .registry import TRAINERS

STUDENT = "default"
TEACHERS_DIR = "teachers"


def regression_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The distillation loss: mean squared error between the student's prediction and the teacher target."""
    return F.mse_loss(pred.float(), target.float())


def teacher_config(cfg, folder: Path, resume: str | None):
    """The phase-1 DualMD config: this run's settings, its own folder, no evaluation."""
    data = OmegaConf.to_container(cfg, resolve=True)
    data.pop("distill")
    data.update(trainer="dualmd", output_dir=str(folder), resume=resume, overwrite=bool(cfg.overwrite))
    data["train"]["max_steps"] = int(cfg.distill.teacher_steps)
    data["eval"]["enabled"] = False
    out = OmegaConf.create(data)
    OmegaConf.set_struct(out, True)
    OmegaConf.set_readonly(out, True)
    return out


def finished_teachers(folder: Path) -> bool:
    return all((Path(folder) / LORA_DIR / sub / LORA_FILE).is_file() for sub in EXPORT_DIRS.values())


@TRAINERS.register("distillmd")
class DistillMDTrainer(PromptDiversification, Trainer):
    """The student adapter regresses onto the unseen teacher's prediction; teachers A / B stay frozen."""

    name = "distillmd"
    supports = capabilities.ALL - {"memorization_filter", "snr_gamma", *TWO_ADAPTER_LIMITS}
    unsupported_reasons = {**TWO_ADAPTER_LIMITS, "memorization_filter": "its loss regresses onto the teachers, not the data",
                           "snr_gamma": "its loss regresses onto the teachers, not the data"}

    def validate_config(self) -> None:
        super().validate_config()
        cfg = self.cfg
        check_two_adapter_config(cfg, "distillmd")
        if "distill" not in cfg:
            raise ConfigError("trainer distillmd needs a distill: section; use recipe=distillmd (or inherit from it)")
        if cfg.distill.teachers:
            folder = Path(cfg.distill.teachers)
            if not finished_teachers(folder) or not (folder / HALVES_FILE).is_file():
                raise ConfigError(f"distill.teachers={folder} is not a finished dualmd run folder (needs lora/adapter_a, "
                                  f"lora/adapter_b and {HALVES_FILE}); train one with recipe=dualmd or set distill.teachers=null")
        elif int(cfg.distill.teacher_steps) < 1:
            raise ConfigError(f"distill.teacher_steps must be >= 1 (got {cfg.distill.teacher_steps})")
        if not cfg.distill.teachers and (cfg.train.batch_size < 2 or cfg.train.batch_size % 2):
            raise ConfigError(f"distillmd trains its teachers with train.batch_size split between A and B; make it even and >= 2 "
                              f"(got {cfg.train.batch_size})")

    def check_run_dir(self) -> None:
        """A run interrupted in phase 1 has only teachers/ yet; resume=latest must accept it."""
        cfg = self.cfg
        phase_1_only = not (self.run_dir / "config.yaml").exists() and (self.run_dir / TEACHERS_DIR / "config.yaml").exists()
        if cfg.resume == "latest" and phase_1_only:
            self.folder.resume_changes, self.folder.replaces = {}, None
            return
        super().check_run_dir()
        self.claim_run_dir()  # phase 1 writes teachers/ during setup_data, so a replaced folder goes aside now

    # ------------------------------------------------------------------ phase 1
    def ensure_teachers(self) -> Path:
        """The teachers' run folder: the one named by distill.teachers, or phase 1 trained (or resumed) here."""
        cfg = self.cfg
        if cfg.distill.teachers:
            return Path(cfg.distill.teachers)
        folder = self.run_dir / TEACHERS_DIR
        fresh = cfg.resume is None and cfg.overwrite
        if finished_teachers(folder) and not fresh:
            if self.is_main:
                print(f"privtune: distillmd phase 1 already done; using the teachers in {folder}")
            return folder
        resume = "latest" if cfg.resume is not None and (folder / "config.yaml").exists() else None
        if self.is_main:
            print(f"privtune: distillmd phase 1: training teachers A and B ({cfg.distill.teacher_steps} steps) in {folder}")
        DualMDTrainer(teacher_config(cfg, folder, resume)).run()
        return folder

    # ------------------------------------------------------------------ data
    def setup_data(self) -> None:
        from accelerate.utils import set_seed

        self.teachers_dir = self.ensure_teachers()
        set_seed(self.cfg.seed, device_specific=True)
        super().setup_data()
        from ..data.split import load_manifest

        theirs = load_manifest(self.teachers_dir)
        for key, ours in (("members", self.split.members), ("nonmembers", self.split.nonmembers)):
            if sorted(r["id"] for r in theirs[key]) != sorted(r.id for r in ours):
                raise ConfigError(f"the teachers in {self.teachers_dir} were trained on another {key} split; a teacher must "
                                  "never have seen a non-member. Use the teachers' seed, data and data.members / data.nonmembers")
        halves = halves_from_file(self.teachers_dir / HALVES_FILE, self.train_records)
        self.row_half = np.zeros(len(self.train_records), dtype=np.int64)
        self.row_half[halves[1]] = 1
        self.halves = halves
        self.setup_caption_choices()

    # ------------------------------------------------------------------ model
    def setup_model(self) -> None:
        super().setup_model()
        unet = self.components.unet
        tcfg = OmegaConf.load(self.teachers_dir / "config.yaml").lora
        teacher_lora = lora_config(tcfg.rank, tcfg.alpha, tcfg.dropout, tcfg.targets)
        self.teacher_params = []
        for name in ADAPTERS:
            self.teacher_params += load_adapter(unet, self.teachers_dir / LORA_DIR / EXPORT_DIRS[name] / LORA_FILE, teacher_lora, name)
        for p in self.teacher_params:
            p.requires_grad_(False)
        for p in self.trainable:
            p.requires_grad_(True)
        use_adapter(unet, STUDENT)

    @property
    def unet(self):
        return self.accelerator.unwrap_model(self.components.unet)

    # ------------------------------------------------------------------ loss
    def teacher_predict(self, name: str, noisy: torch.Tensor, timesteps: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """Teacher `name`'s prediction (eval mode, no gradients)."""
        use_adapter(self.unet, name)
        return self.unet(noisy, timesteps, encoder_hidden_states=states, return_dict=False)[0]

    def teacher_targets(self, noisy: torch.Tensor, timesteps: torch.Tensor, states: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Per row, the prediction of the teacher whose half does not contain the row; detached."""
        half = torch.as_tensor(self.row_half[rows.cpu().numpy()], device=noisy.device)
        target = torch.empty_like(noisy, dtype=torch.float32)
        unet = self.unet
        was_training = unet.training
        unet.eval()
        try:
            with torch.no_grad():
                for k, name in enumerate(ADAPTERS):
                    unseen = half != k
                    if unseen.any():
                        target[unseen] = self.teacher_predict(name, noisy[unseen], timesteps[unseen], states[unseen]).float()
        finally:
            use_adapter(unet, STUDENT)
            unet.train(was_training)
        return target.detach()

    def compute_loss(self, batch: Batch) -> tuple[torch.Tensor, dict]:
        noise, timesteps = self.sample_noise(batch.latents)
        noisy = self.components.noise_scheduler.add_noise(batch.latents, noise, timesteps)
        target = self.teacher_targets(noisy, timesteps, batch.encoder_hidden_states, batch.rows)
        pred = self.components.unet(noisy, timesteps, encoder_hidden_states=batch.encoder_hidden_states, return_dict=False)[0]
        loss = regression_loss(pred, target)
        return loss, {"loss": loss.detach().item()}


__all__ = ["DistillMDTrainer", "regression_loss", "teacher_config"]
