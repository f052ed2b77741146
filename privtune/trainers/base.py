"""The Accelerate training run every defense reuses, composed of parts with one job each.

- the run folder (`run_folder.RunFolder`): what the run may do to its folder, config, checkpoints, resume;
- the input pipeline (`inputs.InputPipeline`): rows to micro-batches, latent / text caching, augmentation,
  caption randomization;
- the objective (`compute_loss`): the denoising loss, or the memorization filter wrapping it;
- the step strategy (`optimizer_step`, built on `steps.apply_update`): how gradients become one update;
- validation images and the export (`release.Release`).

`Trainer.run()` orchestrates them. A defense declares what it supports (`supports`, checked by
`capabilities.check`) and replaces the part it changes: a loss-only defense overrides `compute_loss`, a new
step strategy overrides `optimizer_step` and still updates through `steps.apply_update`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ..data.augment import build_augmentation
from ..data.sources import load_source
from ..data.split import Split, exclude_rows, fingerprint, load_manifest, make_split, save_manifest, split_from_manifest
from ..data.stage import DataStage
from ..errors import ConfigError
from ..losses import denoising_loss
from ..models.conditioning import check_supported
from ..models.loading import Components, freeze, load_components
from ..models.lora import add_lora, lora_config
from . import capabilities, checks, steps
from .inputs import InputPipeline
from .optim import build_optimizer
from .release import Release
from .ema import build_ema
from .run_folder import RunFolder, TrainableCheckpoint
from .sampling import BatchSchedule
from .state import Batch, TrainState
from .. import tracking

__all__ = ["Batch", "Trainer", "TrainState"]


class Trainer:
    """Plain LoRA training; defenses override the part they change."""

    name = "base"
    supports: frozenset = capabilities.ALL
    unsupported_reasons: dict[str, str] = {}
    augmentation = None
    sample_filter = None
    stop_reason = ""

    def __init__(self, cfg):
        self.cfg = cfg
        self.run_dir = Path(cfg.output_dir)
        self.folder = RunFolder(cfg, self.run_dir)
        self.release = Release(self)
        self.accelerator = None
        self.components: Components | None = None
        self.split: Split | None = None
        self.inputs: InputPipeline | None = None
        self.state: TrainState | None = None
        self.metrics: dict = {}
        self.ema = None

    # ------------------------------------------------------------------ lifecycle
    def run(self) -> Path:
        """Train, export and return the run folder."""
        self.validate_config()
        self.setup_accelerator()
        self.check_run_dir()
        self.setup_data()
        self.setup_model()
        self.claim_run_dir()
        self.write_run_files()
        self.setup_optimizer()
        self.prepare()
        self.resume_if_asked()
        self.train()
        self.finish()
        return self.run_dir

    def validate_config(self) -> None:
        """Checks that need no model or data, before anything is written; defenses add theirs."""
        capabilities.check(self.cfg, self.cfg.trainer, self.supports, self.unsupported_reasons)
        checks.check_run_config(self.cfg)
        self.augmentation = build_augmentation(self.cfg.data)

    def setup_accelerator(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        cfg = self.cfg
        self.accelerator = Accelerator(
            mixed_precision=cfg.train.mixed_precision,
            gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
            log_with=tracking.prepare(cfg.tracking),
            project_config=ProjectConfiguration(project_dir=str(self.run_dir), logging_dir=str(self.run_dir / "logs")),
        )
        capabilities.check_processes(self.accelerator.num_processes, cfg.trainer, self.supports, self.unsupported_reasons)
        set_seed(cfg.seed, device_specific=True)
        self.device = self.accelerator.device
        if self.is_main:
            n = self.accelerator.num_processes
            print(f"privtune: {self.name} on {n} process{'es' if n > 1 else ''} ({self.accelerator.distributed_type.value}, {self.device})")

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def check_run_dir(self) -> None:
        self.folder.check()

    def claim_run_dir(self) -> None:
        self.folder.claim(self.accelerator)

    def write_run_files(self) -> None:
        """The resolved config and the split manifest, once inputs are known to be good; defenses add theirs."""
        if self.is_main:
            self.folder.write_config()
            if not self.resumed_split:
                save_manifest(self.split, self.run_dir)
            self.data_stage.write(self.run_dir)
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ data
    def setup_data(self) -> None:
        cfg = self.cfg
        self.data_stage = DataStage(cfg)
        self.source = source = self.data_stage.before_split(load_source(cfg.data))  # dedup before any split
        if cfg.data.exclude:
            kept = exclude_rows(source.records, load_manifest(cfg.data.exclude))
            if self.is_main:
                print(f"privtune: data.exclude: {len(source.records) - len(kept)} rows of {cfg.data.exclude} left out")
            self.source = source = replace(source, records=kept)
        manifest_path = self.run_dir / "split.json"
        self.resumed_split = cfg.resume is not None and manifest_path.exists()
        if self.resumed_split:
            self.split = split_from_manifest(load_manifest(manifest_path), source.records)
        else:
            self.split = make_split(source.records, cfg.data.members, cfg.data.nonmembers, cfg.seed, source.description,
                                    one_per_group=bool(cfg.data.one_per_group))
        if source.skipped and self.is_main:
            print(f"privtune: skipped {len(source.skipped)} bad samples (data.on_bad_sample=skip)")
        self.train_records = self.data_stage.after_split(self.training_records(), self.split)  # + duplicates, canaries
        self.split.training_fingerprint = fingerprint(self.train_records)
        self.check_training_rows(manifest_path)

    def training_records(self):
        """The members plus `data.auxiliary_members` rows from outside the evaluation split; defenses that
        reshape the training set override this."""
        from ..defenses.attacker_split import draw_auxiliary_members

        self.split.auxiliary = draw_auxiliary_members(self.source.records, self.split, int(self.cfg.data.auxiliary_members),
                                                      int(self.cfg.seed))
        return self.split.members + self.split.auxiliary

    def check_training_rows(self, manifest_path: Path) -> None:
        """A resume must train on the rows the run started with, and `eval.baseline` must have trained on the same rows."""
        if self.resumed_split:
            recorded = load_manifest(manifest_path).get("training_fingerprint")
            if recorded and recorded != self.split.training_fingerprint:
                rows = self.split.training_fingerprint["rows"]
                raise ConfigError(f"resume would train on other rows than {manifest_path} records ({rows} "
                                  f"rows now, {recorded['rows']} then): use the data settings the run started with")
        if self.cfg.eval.enabled and self.cfg.eval.baseline:
            from ..eval.stage import check_baseline

            check_baseline(self.cfg.eval.baseline, self.split.training_fingerprint)

    # ------------------------------------------------------------------ model and inputs
    def setup_model(self) -> None:
        cfg = self.cfg
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.train.mixed_precision, torch.float32)
        self.components = comps = load_components(cfg.model, self.weight_dtype)
        check_supported(cfg, comps)
        freeze(*comps.modules())
        for module in comps.modules():
            module.to(self.device)
        self.lora_config = lora_config(cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets, cfg.lora.method)
        self.trainable = self.add_unet_adapters()
        self.text_lora_config = None
        if cfg.lora.text_encoder:
            self.text_lora_config = lora_config(cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, list(cfg.lora.text_encoder_targets))
            self.trainable += add_lora(comps.text_encoder, self.text_lora_config)
            if comps.sdxl:  # SDXL: both text encoders, as diffusers' SDXL LoRA script trains them
                self.trainable += add_lora(comps.text_encoder_2, self.text_lora_config)
        for p in self.trainable:
            p.data = p.data.float()
        if cfg.train.gradient_checkpointing:
            comps.unet.enable_gradient_checkpointing()
            if cfg.lora.text_encoder:
                comps.text_encoder.gradient_checkpointing_enable()
                if comps.sdxl:
                    comps.text_encoder_2.gradient_checkpointing_enable()
        comps.unet.train()
        from ..data.captions import CaptionRandomizer

        self.captions = CaptionRandomizer(cfg.captions, cfg.seed, comps.tokenizer)
        self.setup_inputs()

    def add_unet_adapters(self) -> list[torch.nn.Parameter]:
        """Attach the trainable UNet adapter(s); returns their parameters. DualMD / DistillMD attach several."""
        return add_lora(self.components.unet, self.lora_config)

    def input_records(self):
        """Rows whose inputs are prepared: the training rows, then any rows a defense only scores (e.g. a proxy
        attacker's non-members), addressed by `batch_for` with indices past the training rows."""
        return self.train_records

    def setup_inputs(self) -> None:
        self.encoded_records = self.input_records()
        self.inputs = InputPipeline(self.cfg, self.components, self.encoded_records, self.captions, self.augmentation,
                                    self.device, self.weight_dtype, announce=self.is_main)

    @property
    def cache(self):
        return self.inputs.cache

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        return self.inputs.tokenize(captions)

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.inputs.encode_text(input_ids)

    # ------------------------------------------------------------------ optimizer, schedule, state
    def optimizer_groups(self) -> list[dict]:
        """Parameter groups; weight decay reaches only the trainable (LoRA) parameters."""
        return [{"params": self.trainable, "weight_decay": self.cfg.optim.weight_decay}]

    def setup_optimizer(self) -> None:
        self.optimizer, self.lr_scheduler = build_optimizer(self.cfg, self.optimizer_groups(), self.lr_schedule_steps(),
                                                            self.accelerator.num_processes)

    def lr_schedule_steps(self) -> int:
        """Optimizer updates the LR schedule spans; a defense making several updates per step overrides this."""
        return self.cfg.train.max_steps

    def prepare(self) -> None:
        acc, comps, cfg = self.accelerator, self.components, self.cfg
        if cfg.lora.text_encoder and comps.sdxl:
            comps.unet, comps.text_encoder, comps.text_encoder_2, self.optimizer, self.lr_scheduler = acc.prepare(
                comps.unet, comps.text_encoder, comps.text_encoder_2, self.optimizer, self.lr_scheduler)
        elif cfg.lora.text_encoder:
            comps.unet, comps.text_encoder, self.optimizer, self.lr_scheduler = acc.prepare(
                comps.unet, comps.text_encoder, self.optimizer, self.lr_scheduler)
        else:
            comps.unet, self.optimizer, self.lr_scheduler = acc.prepare(comps.unet, self.optimizer, self.lr_scheduler)
        self.state = TrainState(cfg.seed, acc.process_index)
        acc.register_for_checkpointing(self.state)
        self.checkpoint_hooks = TrainableCheckpoint(acc)
        self.schedule = BatchSchedule(len(self.train_records), cfg.train.batch_size, cfg.seed,
                                      acc.process_index, acc.num_processes, cfg.data.random_flip)
        if cfg.memorization_filter.method != "none":
            from ..memorization.filter import SampleFilter

            self.sample_filter = SampleFilter(cfg.memorization_filter, self)
            acc.register_for_checkpointing(self.sample_filter)
        self.ema = build_ema(cfg, self.trainable)
        if self.ema is not None:
            acc.register_for_checkpointing(self.ema)
        if self.is_main:
            rows = (self.split.members, self.split.nonmembers, self.train_records, self.encoded_records)
            hparams = tracking.tracker_hparams(cfg, tracking.private_strings(*rows, separator=self.caption_separator()))
            tracking.start(acc, cfg, self.run_dir, hparams)

    def caption_separator(self) -> str | None:
        """`captions.separator` when captions.multiple splits a caption into several, else None."""
        node = self.cfg.get("captions")
        return str(node.separator) if node is not None and node.get("multiple") and node.get("separator") else None

    def checkpoints(self) -> list[Path]:
        return self.folder.checkpoints()

    def save_checkpoint(self) -> None:
        self.folder.save_checkpoint(self.accelerator, self.state.step)

    def resume_if_asked(self) -> None:
        self.folder.resume(self.accelerator, self.state)

    # ------------------------------------------------------------------ batches, objective, step
    def micro_batch(self, micro_step: int, schedule=None) -> Batch:
        """The batch of `micro_step` under `schedule` (default: the trainer's own batch schedule)."""
        rows, flips = (schedule or self.schedule).rows(micro_step)
        return self.batch_for(rows, flips, micro_step)

    def batch_for(self, rows, flips, key: int) -> Batch:
        """The batch of `input_records()` rows `rows` (flipped where `flips`); `key` keys crops and augmentations."""
        return self.inputs.batch(rows, flips, key, self.state.generator)

    def sample_noise(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gen = self.state.generator
        n_steps = self.components.noise_scheduler.config.num_train_timesteps
        noise = torch.randn(latents.shape, generator=gen).to(latents.device)
        timesteps = torch.randint(0, n_steps, (latents.shape[0],), generator=gen).to(latents.device)
        return noise, timesteps

    def compute_loss(self, batch: Batch) -> tuple[torch.Tensor, dict]:
        """The objective for one micro-batch: the denoising loss, or the memorization filter's kept-row loss."""
        noise, timesteps = self.sample_noise(batch.latents)
        if self.sample_filter is not None:
            return self.sample_filter.loss(self, batch, noise, timesteps)
        per_sample = denoising_loss(self.components.unet, self.components.noise_scheduler, batch.latents,
                                    batch.encoder_hidden_states, noise, timesteps, snr_gamma=self.cfg.train.snr_gamma)
        loss = per_sample.mean()
        return loss, {"loss": loss.detach().item()}

    def optimizer_step(self, micro_step: int) -> dict:
        """One optimizer step over `gradient_accumulation_steps` micro-batches (the standard strategy)."""
        return steps.standard_step(self, micro_step)

    def clip_groups(self) -> list[list[torch.nn.Parameter]]:
        """Parameter groups clipped separately by `train.max_grad_norm` (one per adapter where there are several)."""
        return [self.trainable]

    def skip_optimizer_step(self) -> bool:
        """True when the memorization filter kept no row of the global batch: the update must not move any weight."""
        return self.sample_filter is not None and self.sample_filter.skip_step(self.accelerator)

    def train(self) -> None:
        steps.train_loop(self)

    def step_logs(self) -> dict:
        """Extra per-step numbers a defense wants logged (e.g. epsilon spent)."""
        return {}

    def should_stop(self) -> bool:
        """A defense may end training early (a spent privacy budget); everything is still saved."""
        return False

    # ------------------------------------------------------------------ validation, export, evaluation
    def pipeline(self):
        return self.release.pipeline()

    def validate(self, step: int) -> Path | None:
        return self.release.validate(step)

    def finish(self) -> None:
        """Final validation images, the export, then the evaluation (the release part)."""
        self.release.finish()

    def export(self) -> None:
        """Write the trained adapter(s) to run_dir/lora (main process only); defenses with several adapters override."""
        self.release.export_lora()

    def after_export(self) -> None:
        """The evaluation stage (eval.enabled): attacks, utility, report and the LoRA's privacy card."""
        self.release.evaluate(self.release_plan(), self.privacy_summary())

    def release_plan(self) -> dict:
        """What the run ships, as `evaluate_model` keywords (releases, combinations, threat_model); {} = the one LoRA."""
        return {}

    def privacy_summary(self) -> dict | None:
        """Formal guarantees for the report (epsilon, delta, accountant); None for undefended training."""
        return None
