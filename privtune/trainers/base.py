"""The Accelerate training loop every defense reuses.

Responsibilities: the run folder (resolved config, split manifest, checkpoints, validation images,
the exported LoRA), mixed precision, gradient accumulation, gradient checkpointing, optimizers
(8-bit AdamW through bitsandbytes on CUDA), LR schedules, exact resume (`resume=latest`), trackers,
and latent / text-embedding caching when the VAE and text encoder are frozen. A defense subclasses
`Trainer` and overrides `compute_loss` (and, where it needs to, the setup hooks).
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import to_yaml
from ..data.augment import build_augmentation
from ..data.sources import load_source
from ..data.split import Split, fingerprint, load_manifest, make_split, save_manifest, split_from_manifest
from ..data.stage import DataStage, check_settings as check_data_settings
from ..data.transforms import preprocess
from ..errors import ConfigError
from ..io import apply_umask, atomic_write_text
from ..losses import denoising_loss
from ..models.loading import Components, freeze, load_components
from ..models.lora import add_lora, lora_config
from .sampling import BatchSchedule
from .. import export as exporter
from .. import rundir, tracking

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class TrainState:
    """The step, checkpointed, and this process's generator for latent sampling, noise and timesteps.

    The generator is re-seeded from (seed, process index, step, micro-batch) before every micro-batch
    (and at the start of every step, for trainers with their own `optimizer_step`), so its draws are a
    pure function of the step: a resumed run draws exactly what an uninterrupted one would, with nothing
    per-process to checkpoint (accelerate saves custom state from the main process only).
    """

    def __init__(self, seed: int, rank: int):
        self.seed = seed
        self.rank = rank
        self.step = 0
        self.generator = torch.Generator()
        self.reseed()

    def reseed(self, micro: int = 0, rank: int | None = None) -> None:
        """Seed the generator for micro-batch `micro` of the current step (`rank` overrides the process index)."""
        self.generator.manual_seed(step_seed(self.seed, self.rank if rank is None else rank, self.step, micro))

    def state_dict(self) -> dict:
        return {"step": torch.tensor(self.step)}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def step_seed(*keys: int) -> int:
    """A 63-bit seed derived from integer keys (numpy's SeedSequence mixes them well)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> 1)


@dataclass
class Batch:
    """One micro-batch, already on the device: latents (sampled), text conditioning, row indices."""

    latents: torch.Tensor
    encoder_hidden_states: torch.Tensor
    rows: torch.Tensor


class Trainer:
    """Plain LoRA training; defenses override `compute_loss` or the hooks around it."""

    name = "base"
    augmentation = None

    def __init__(self, cfg):
        self.cfg = cfg
        self.run_dir = Path(cfg.output_dir)
        self.accelerator = None
        self.components: Components | None = None
        self.split: Split | None = None
        self.metrics: dict = {}

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
        """Checks that need no model or data; subclasses add theirs (before anything is written)."""
        cfg = self.cfg
        check_data_settings(cfg)
        if cfg.eval.enabled:
            from ..eval.stage import check_attacks, check_max_members, load_baseline

            check_attacks(cfg.eval.attacks)
            check_max_members(cfg.eval.get("max_members"))
            if not 0 < float(cfg.eval.calibration_fraction) < 1:
                raise ConfigError(f"eval.calibration_fraction must be in (0, 1) (got {cfg.eval.calibration_fraction}): that share "
                                  "of members and non-members fits the attacks, the rest is reported; 0.5 is the default")
            load_baseline(cfg.eval.baseline)
            if cfg.eval.utility and cfg.eval.get("clip_model"):
                from ..eval.clip_metrics import check_clip_folder

                check_clip_folder(cfg.eval.clip_model)
        if cfg.optim.use_8bit and not torch.cuda.is_available():
            raise ConfigError("optim.use_8bit=true needs a CUDA GPU (bitsandbytes 8-bit AdamW); set optim.use_8bit=false on this machine")
        if cfg.train.max_steps < 1 or cfg.train.batch_size < 1 or cfg.train.gradient_accumulation_steps < 1:
            raise ConfigError("train.max_steps, train.batch_size and train.gradient_accumulation_steps must be >= 1")
        if cfg.train.mixed_precision not in ("no", "fp16", "bf16"):
            raise ConfigError(f"train.mixed_precision must be no, fp16 or bf16 (got {cfg.train.mixed_precision!r})")
        if cfg.tracking not in ("none", "wandb", "tensorboard"):
            raise ConfigError(f"tracking must be none, wandb or tensorboard (got {cfg.tracking!r})")
        if cfg.train.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise ConfigError("train.mixed_precision=fp16 needs a CUDA GPU; use bf16 or no on CPU")
        self.augmentation = build_augmentation(cfg.data)
        self.validate_hygiene()

    def validate_hygiene(self) -> None:
        """Caption randomization, the memorization filter and the sampling options (all off by default)."""
        from ..data.captions import check_config as check_captions
        from ..memorization.filter import check_config as check_filter
        from ..memorization.sampling import check_config as check_sampling

        cfg = self.cfg
        check_captions(cfg.captions)
        check_filter(cfg.memorization_filter)
        check_sampling(cfg.sampling)
        if cfg.memorization_filter.method != "none" and type(self).compute_loss is not Trainer.compute_loss:
            raise ConfigError(f"memorization_filter is applied in the base loss; trainer {cfg.trainer!r} has its own loss "
                              f"and does not support it: set memorization_filter.method=none")

    def setup_accelerator(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        cfg = self.cfg
        log_with = tracking.prepare(cfg.tracking)
        self.accelerator = Accelerator(
            mixed_precision=cfg.train.mixed_precision,
            gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
            log_with=log_with,
            project_config=ProjectConfiguration(project_dir=str(self.run_dir), logging_dir=str(self.run_dir / "logs")),
        )
        set_seed(cfg.seed, device_specific=True)
        self.device = self.accelerator.device
        if self.is_main:
            n = self.accelerator.num_processes
            print(f"privtune: {self.name} on {n} process{'es' if n > 1 else ''} ({self.accelerator.distributed_type.value}, {self.device})")

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def check_run_dir(self) -> None:
        """Decide what this run does to its folder (nothing is written yet): refuse to clobber a run unless
        asked, refuse a resume that would change the model, and note a folder to move aside (rundir)."""
        cfg = self.cfg
        rundir.check_output_folder(self.run_dir)
        held, begun = rundir.holds_run(self.run_dir), rundir.started(self.run_dir)
        if held and cfg.resume is None and not cfg.overwrite:
            raise ConfigError(
                f"run folder {self.run_dir} already holds a run; pass resume=latest to continue it, "
                f"output_dir=<new folder> to start another, or overwrite=true to replace it (the old run is moved aside)"
            )
        if cfg.resume is not None and not begun and cfg.resume == "latest":
            raise ConfigError(f"resume=latest but {self.run_dir} holds no run to resume; drop resume= to start fresh")
        self.resume_changes = rundir.check_resume(self.run_dir, cfg) if cfg.resume is not None else {}
        self.replaces = self.run_dir if cfg.resume is None and begun else None

    def claim_run_dir(self) -> None:
        """Move a replaced (overwrite=true) or stale run folder aside whole, before the first file is written."""
        if self.replaces is not None and self.is_main and self.replaces.exists():
            moved = rundir.move_aside(self.replaces)
            print(f"privtune: the previous run in {self.replaces} was moved aside to {moved}")
        self.replaces = None
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def write_run_files(self) -> None:
        """The resolved config and the split manifest, once inputs are known to be good."""
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.yaml", to_yaml(self.cfg))
            if not self.resumed_split:
                save_manifest(self.split, self.run_dir)
            self.data_stage.write(self.run_dir)
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ data
    def setup_data(self) -> None:
        cfg = self.cfg
        self.data_stage = DataStage(cfg)
        source = self.data_stage.before_split(load_source(cfg.data))  # dedup before any split
        self.source = source
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
        """The rows the model trains on: the members plus `data.auxiliary_members` rows from outside the
        evaluation split; defenses that reshape the training set override this."""
        from ..defenses.attacker_split import draw_auxiliary_members

        self.split.auxiliary = draw_auxiliary_members(self.source.records, self.split, int(self.cfg.data.auxiliary_members),
                                                      int(self.cfg.seed))
        return self.split.members + self.split.auxiliary

    def check_training_rows(self, manifest_path: Path) -> None:
        """A resume must train on the rows the run started with, and `eval.baseline` must have trained on the same rows."""
        if self.resumed_split:
            recorded = load_manifest(manifest_path).get("training_fingerprint")
            if recorded and recorded != self.split.training_fingerprint:
                raise ConfigError(f"resume would train on other rows than {manifest_path} records ({self.split.training_fingerprint['rows']} "
                                  f"rows now, {recorded['rows']} then): use the data settings the run started with")
        if self.cfg.eval.enabled and self.cfg.eval.baseline:
            from ..eval.stage import check_baseline

            check_baseline(self.cfg.eval.baseline, self.split.training_fingerprint)

    # ------------------------------------------------------------------ model
    def setup_model(self) -> None:
        cfg = self.cfg
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.train.mixed_precision, torch.float32)
        self.weight_dtype = dtype
        comps = load_components(cfg.model, dtype)
        self.components = comps
        freeze(comps.vae, comps.text_encoder, comps.unet)
        for module in (comps.vae, comps.text_encoder, comps.unet):
            module.to(self.device)
        self.lora_config = lora_config(cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets)
        self.trainable = self.add_unet_adapters()
        self.text_lora_config = None
        if cfg.lora.text_encoder:
            self.text_lora_config = lora_config(cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, list(cfg.lora.text_encoder_targets))
            self.trainable += add_lora(comps.text_encoder, self.text_lora_config)
        for p in self.trainable:
            p.data = p.data.float()
        if cfg.train.gradient_checkpointing:
            comps.unet.enable_gradient_checkpointing()
            if cfg.lora.text_encoder:
                comps.text_encoder.gradient_checkpointing_enable()
        comps.unet.train()
        from ..data.captions import CaptionRandomizer

        self.captions = CaptionRandomizer(cfg.captions, cfg.seed, comps.tokenizer)
        self.setup_inputs()

    def input_records(self):
        """Rows whose inputs are prepared (cached): the training rows, then any rows a defense only scores
        (e.g. a proxy attacker's non-members), addressed by `batch_for` with indices past the training rows."""
        return self.train_records

    def add_unet_adapters(self) -> list[torch.nn.Parameter]:
        """Attach the trainable UNet adapter(s); returns their parameters. DualMD / DistillMD attach several."""
        return add_lora(self.components.unet, self.lora_config)

    @property
    def caches(self) -> bool:
        cfg = self.cfg
        return bool(cfg.train.cache_latents and not cfg.lora.text_encoder and cfg.data.center_crop and self.augmentation is None)

    def setup_inputs(self) -> None:
        """Cache VAE posteriors (both orientations when flipping) and text embeddings, or prepare to encode per step."""
        cfg = self.cfg
        records = self.encoded_records = self.input_records()
        comps = self.components
        self.base_captions = [self.captions.base(r) for r in records]
        self.input_ids = self.tokenize(self.base_captions)
        self.cache = None
        if cfg.train.cache_latents and self.augmentation is not None and self.is_main:
            print(f"privtune: latent caching off: {self.augmentation.describe()} draws new pixels every step "
                  "(train.cache_latents=true is ignored while data.cutout / data.randaugment are on)")
        if not self.caches:
            return
        flips = (False, True) if cfg.data.random_flip else (False,)
        moments = {}
        with torch.no_grad():
            for flip in flips:
                chunks = []
                for i in range(0, len(records), 32):
                    pixels = torch.stack([preprocess(r.image, cfg.data.resolution, True, flip) for r in records[i:i + 32]])
                    dist = comps.vae.encode(pixels.to(self.device, self.weight_dtype)).latent_dist
                    chunks.append(torch.stack([dist.mean, dist.std]).float())
                moments[flip] = torch.cat(chunks, dim=1)
            states = torch.cat([self.encode_text(self.input_ids[i:i + 64]) for i in range(0, len(records), 64)])
        self.cache = {"moments": moments, "text": states}

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        tok = self.components.tokenizer
        return tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.components.text_encoder(input_ids.to(self.device), return_dict=False)[0]

    # ------------------------------------------------------------------ optimizer
    def optimizer_groups(self) -> list[dict]:
        """Parameter groups; weight decay reaches only the trainable (LoRA) parameters."""
        return [{"params": self.trainable, "weight_decay": self.cfg.optim.weight_decay}]

    def setup_optimizer(self) -> None:
        from diffusers.optimization import get_scheduler

        cfg = self.cfg
        kwargs = dict(lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
        if cfg.optim.use_8bit:
            import bitsandbytes as bnb

            self.optimizer = bnb.optim.AdamW8bit(self.optimizer_groups(), **kwargs)
        else:
            self.optimizer = torch.optim.AdamW(self.optimizer_groups(), **kwargs)
        try:
            self.lr_scheduler = get_scheduler(
                cfg.optim.scheduler, optimizer=self.optimizer,
                num_warmup_steps=cfg.optim.warmup_steps * self.accelerator.num_processes,
                num_training_steps=self.lr_schedule_steps() * self.accelerator.num_processes,
            )
        except ValueError as exc:
            raise ConfigError(f"optim.scheduler: {exc}") from exc

    def lr_schedule_steps(self) -> int:
        """Optimizer updates the LR schedule spans; a defense making several updates per step overrides this."""
        return self.cfg.train.max_steps

    def prepare(self) -> None:
        acc = self.accelerator
        comps = self.components
        if self.cfg.lora.text_encoder:
            comps.unet, comps.text_encoder, self.optimizer, self.lr_scheduler = acc.prepare(
                comps.unet, comps.text_encoder, self.optimizer, self.lr_scheduler)
        else:
            comps.unet, self.optimizer, self.lr_scheduler = acc.prepare(comps.unet, self.optimizer, self.lr_scheduler)
        self.state = TrainState(self.cfg.seed, acc.process_index)
        acc.register_for_checkpointing(self.state)
        acc.register_save_state_pre_hook(self._save_hook)
        acc.register_load_state_pre_hook(self._load_hook)
        self.schedule = BatchSchedule(len(self.train_records), self.cfg.train.batch_size, self.cfg.seed,
                                      acc.process_index, acc.num_processes, self.cfg.data.random_flip)
        self.setup_sample_filter()
        if self.is_main:
            tracking.start(acc, self.cfg, self.run_dir, self.tracker_hparams())

    def tracker_hparams(self) -> dict:
        """The resolved config for the trackers: local paths, captions and sample ids of the split and the
        training rows scrubbed out unless `tracking_log_captions` (privtune.tracking)."""
        rows = (self.split.members, self.split.nonmembers, self.train_records, getattr(self, "encoded_records", None))
        return tracking.tracker_hparams(self.cfg, tracking.private_strings(*rows, separator=self.caption_separator()))

    def caption_separator(self) -> str | None:
        """`captions.separator` when captions.multiple splits a caption into several, else None."""
        node = self.cfg.get("captions")
        return str(node.separator) if node is not None and node.get("multiple") and node.get("separator") else None

    # ------------------------------------------------------------------ checkpoints
    def _save_hook(self, models, weights, output_dir) -> None:
        """Checkpoint only the trainable parameters, not a full copy of the base model."""
        tagged = {}
        for i, m in enumerate(models):
            for n, p in self.accelerator.unwrap_model(m).named_parameters():
                if p.requires_grad:
                    tagged[f"{i}/{n}"] = p.detach().cpu().contiguous()
        from safetensors.torch import save_file

        save_file(tagged, os.path.join(output_dir, "trainable.safetensors"))
        apply_umask(os.path.join(output_dir, "trainable.safetensors"))  # safetensors writes 0600
        while weights:
            weights.pop()

    def _load_hook(self, models, input_dir) -> None:
        from safetensors.torch import load_file

        tagged = load_file(os.path.join(input_dir, "trainable.safetensors"))
        loaded = list(models)
        while models:
            models.pop()
        for i, m in enumerate(loaded):
            params = dict(self.accelerator.unwrap_model(m).named_parameters())
            for key, value in tagged.items():
                idx, name = key.split("/", 1)
                if int(idx) == i:
                    params[name].data.copy_(value.to(params[name].device, params[name].dtype))

    def checkpoints(self) -> list[Path]:
        root = self.run_dir / "checkpoints"
        found = [(int(m.group(1)), p) for p in root.glob("checkpoint-*") if (m := CHECKPOINT_RE.match(p.name))]
        return [p for _, p in sorted(found)]

    def save_checkpoint(self) -> None:
        acc = self.accelerator
        final = self.run_dir / "checkpoints" / f"checkpoint-{self.state.step}"
        tmp = final.with_name(final.name + ".partial")
        if self.is_main and tmp.exists():
            shutil.rmtree(tmp)
        if self.is_main:
            tmp.parent.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if self.is_main:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            limit = self.cfg.train.checkpoints_total_limit
            if limit:
                for old in self.checkpoints()[:-limit]:
                    shutil.rmtree(old)
        acc.wait_for_everyone()

    def resume_if_asked(self) -> None:
        resume = self.cfg.resume
        if resume is None:
            return
        if resume == "latest":
            found = self.checkpoints()
            if not found:
                if self.is_main:
                    print(f"privtune: no checkpoint in {self.run_dir / 'checkpoints'}; starting from step 0")
                    self.record_resume_changes()
                return
            path = found[-1]
        else:
            path = Path(resume)
            if not (path / "trainable.safetensors").is_file():
                raise ConfigError(f"resume={resume!r} is not a privtune checkpoint folder; use resume=latest or a checkpoints/checkpoint-<step> path")
        self.accelerator.load_state(str(path))
        if self.is_main:
            print(f"privtune: resumed from {path} at step {self.state.step}")
            self.record_resume_changes()

    def record_resume_changes(self) -> None:
        if self.resume_changes:
            rundir.record_changes(self.run_dir, self.resume_changes, self.state.step)
            print(f"privtune: resumed with changed settings {sorted(self.resume_changes)} (recorded in {rundir.CHANGES})")

    # ------------------------------------------------------------------ batches and loss
    def micro_batch(self, micro_step: int, schedule=None) -> Batch:
        """The batch of `micro_step` under `schedule` (default: the trainer's own batch schedule)."""
        rows, flips = (schedule or self.schedule).rows(micro_step)
        return self.batch_for(rows, flips, micro_step)

    def batch_for(self, rows, flips, key: int) -> Batch:
        """The batch of `input_records()` rows `rows` (flipped where `flips`); `key` seeds crops and augmentations."""
        gen = self.state.generator
        if self.cache is not None:
            index = torch.as_tensor(rows)
            flip_t = torch.as_tensor(flips)
            mean, std = self.cache["moments"][False][:, index]
            if flip_t.any():
                fmean, fstd = self.cache["moments"][True][:, index]
                sel = flip_t.view(-1, 1, 1, 1).to(mean.device)
                mean, std = torch.where(sel, fmean, mean), torch.where(sel, fstd, std)
            eps = torch.randn(mean.shape, generator=gen).to(mean.device)
            latents = mean + std * eps
            states = self.cache["text"][index]
        else:
            cfg = self.cfg
            pixels = torch.stack([
                preprocess(self.encoded_records[r].image, cfg.data.resolution, cfg.data.center_crop, bool(f),
                           np.random.default_rng([cfg.seed, key, int(r)]))
                for r, f in zip(rows, flips)
            ])
            if self.augmentation is not None:
                pixels = self.augmentation(pixels, cfg.seed, key, rows)
            with torch.no_grad():
                dist = self.components.vae.encode(pixels.to(self.device, self.weight_dtype)).latent_dist
                eps = torch.randn(dist.mean.shape, generator=gen).to(self.device)
                latents = (dist.mean + dist.std * eps).float()
            ids = self.input_ids[torch.as_tensor(rows)]
            if self.cfg.lora.text_encoder:
                states = self.encode_text(ids)
            else:
                with torch.no_grad():
                    states = self.encode_text(ids)
        latents = (latents * self.components.scaling_factor).to(self.device)
        states = self.randomize_captions(key, rows, states)
        return Batch(latents, states.to(self.device, self.weight_dtype), torch.as_tensor(rows))

    def randomize_captions(self, key: int, rows, states: torch.Tensor) -> torch.Tensor:
        """Caption randomization (privtune.data.captions): re-encode the rows whose caption changed, add embedding noise."""
        rz = self.captions
        if not rz.active:
            return states
        if rz.text_active:
            draws = [rz.draw(self.encoded_records[int(r)], key, int(r)) for r in rows]
            changed = [i for i, (d, r) in enumerate(zip(draws, rows)) if d.caption != self.base_captions[int(r)]]
            if changed:
                ids = self.tokenize([draws[i].caption for i in changed])
                with torch.set_grad_enabled(bool(self.cfg.lora.text_encoder)):
                    fresh = self.encode_text(ids)
                states = states.clone()
                states[torch.as_tensor(changed, device=states.device)] = fresh.to(states.device, states.dtype)
        if rz.noise:
            states = states + rz.embedding_noise(states.shape, key, rows).to(states.device, states.dtype)
        return states

    def sample_noise(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gen = self.state.generator
        n_steps = self.components.noise_scheduler.config.num_train_timesteps
        noise = torch.randn(latents.shape, generator=gen).to(latents.device)
        timesteps = torch.randint(0, n_steps, (latents.shape[0],), generator=gen).to(latents.device)
        return noise, timesteps

    def compute_loss(self, batch: Batch) -> tuple[torch.Tensor, dict]:
        """The training objective for one micro-batch; defenses override this."""
        noise, timesteps = self.sample_noise(batch.latents)
        if self.sample_filter is not None:
            return self.sample_filter.loss(self, batch, noise, timesteps)
        per_sample = denoising_loss(self.components.unet, self.components.noise_scheduler, batch.latents,
                                    batch.encoder_hidden_states, noise, timesteps)
        loss = per_sample.mean()
        return loss, {"loss": loss.detach().item()}

    # ------------------------------------------------------------------ loop
    def optimizer_step(self, micro_step: int) -> dict:
        """One optimizer step over `gradient_accumulation_steps` micro-batches."""
        acc = self.accelerator
        logs: dict = {}
        accum = self.cfg.train.gradient_accumulation_steps
        for a in range(accum):
            self.state.reseed(a)
            batch = self.micro_batch(micro_step + a)
            with acc.accumulate(self.components.unet):
                loss, logs = self.compute_loss(batch)
                acc.backward(loss)
                if acc.sync_gradients and self.cfg.train.max_grad_norm:
                    acc.clip_grad_norm_(self.trainable, self.cfg.train.max_grad_norm)
                skipped = acc.sync_gradients and self.skip_optimizer_step()
                if not skipped:
                    self.optimizer.step()
                with warnings.catch_warnings():
                    if skipped:  # the schedule still follows the step count; torch warns when no step came first
                        warnings.filterwarnings("ignore", message="Detected call of")
                    self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
        return logs

    sample_filter = None

    def setup_sample_filter(self) -> None:
        """The memorization filter (privtune.memorization.filter), when `memorization_filter.method` is set."""
        if self.cfg.memorization_filter.method != "none":
            from ..memorization.filter import SampleFilter

            self.sample_filter = SampleFilter(self.cfg.memorization_filter, self)
            self.accelerator.register_for_checkpointing(self.sample_filter)

    def skip_optimizer_step(self) -> bool:
        """True when the memorization filter kept no row of the global batch: the update must not move any weight."""
        return self.sample_filter is not None and self.sample_filter.skip_step(self.accelerator)

    def train(self) -> None:
        cfg = self.cfg
        acc = self.accelerator
        start = self.state.step
        bar = tqdm(total=cfg.train.max_steps, initial=start, desc=f"train {self.name}", disable=not self.is_main, dynamic_ncols=True)
        try:
            while self.state.step < cfg.train.max_steps:
                self.state.reseed()
                logs = self.optimizer_step(self.state.step * cfg.train.gradient_accumulation_steps)
                self.state.step += 1
                step = self.state.step
                logs["lr"] = self.lr_scheduler.get_last_lr()[0]
                logs.update(self.step_logs())
                bar.update(1)
                if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                    bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if isinstance(v, float)})
                    acc.log({f"train/{k}": v for k, v in logs.items()}, step=step)
                if self.should_stop():
                    if self.is_main:
                        print(f"privtune: stopping at step {step}: {self.stop_reason}")
                    break
                if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and step < cfg.train.max_steps:
                    self.save_checkpoint()
                if cfg.train.validation_every and step % cfg.train.validation_every == 0 and step < cfg.train.max_steps:
                    self.validate(step)
        finally:
            bar.close()  # also on Ctrl-C, so the interrupt line starts on its own line
        self.save_checkpoint()

    stop_reason = ""

    def step_logs(self) -> dict:
        """Extra per-step numbers a defense wants logged (e.g. epsilon spent)."""
        return {}

    def should_stop(self) -> bool:
        """A defense may end training early (a spent privacy budget); everything is still saved."""
        return False

    # ------------------------------------------------------------------ validation and export
    def pipeline(self):
        """A StableDiffusionPipeline over the current (LoRA-adapted) components, for sampling."""
        from ..eval.stage import pipeline_for

        from ..memorization.sampling import apply_sampling_options

        comps = self.components
        text_encoder = self.accelerator.unwrap_model(comps.text_encoder)
        return apply_sampling_options(pipeline_for(comps, self.accelerator.unwrap_model(comps.unet), text_encoder), self.cfg.sampling)

    def validation_prompts(self) -> list[str]:
        """The user's `train.validation_prompts`, else (up to) four held-out captions that are no training
        caption: source rows in neither split, or only when there are none, non-members (privtune.tracking)."""
        prompts = self.cfg.train.validation_prompts
        if prompts:
            return [str(p) for p in prompts]
        if getattr(self, "_held_out_prompts", None) is None:
            trained = [*self.train_records, *(getattr(self, "encoded_records", None) or [])]
            self._held_out_prompts = tracking.held_out_prompts(
                self.source.records, self.split.members, self.split.nonmembers, trained, n=4,
                separator=self.caption_separator())
        return self._held_out_prompts

    def validate(self, step: int) -> Path | None:
        if not self.is_main:
            self.accelerator.wait_for_everyone()
            return None
        cfg = self.cfg
        prompts = self.validation_prompts()
        if not prompts:
            if not getattr(self, "_warned_no_prompts", False):
                print("privtune: no validation images: no held-out caption that is not also a training caption; set train.validation_prompts")
                self._warned_no_prompts = True
            self.accelerator.wait_for_everyone()
            return None
        unet = self.accelerator.unwrap_model(self.components.unet)
        unet.eval()
        with torch.no_grad():
            images = self.pipeline()(
                prompts, num_inference_steps=cfg.train.validation_inference_steps,
                guidance_scale=cfg.train.validation_guidance_scale,
                generator=torch.Generator().manual_seed(cfg.seed),
                height=cfg.data.resolution, width=cfg.data.resolution,
            ).images
        unet.train()
        path = exporter.save_image_grid(images, prompts, self.run_dir / "validation" / f"step-{step:06d}.png")
        tracking.log_images(self.accelerator, "validation", images, tracking.tracker_captions(cfg, prompts), step)
        self.accelerator.wait_for_everyone()
        return path

    def finish(self) -> None:
        """Final validation images, then the LoRA export; defenses may add their reports."""
        acc = self.accelerator
        acc.wait_for_everyone()
        if self.cfg.train.validation_every:
            self.validate(self.state.step)
        if self.is_main:
            self.export()
            self.write_hygiene_stats()
        acc.wait_for_everyone()
        self.after_export()
        acc.end_training()

    def write_hygiene_stats(self) -> None:
        """memorization.json: realised caption-randomization rate and filter statistics (when either is on)."""
        stats = {}
        if self.captions.active:
            stats["captions"] = self.captions.stats()
        if self.sample_filter is not None:
            stats["memorization_filter"] = self.sample_filter.stats()
        if stats:
            from ..io import atomic_write_json

            atomic_write_json(self.run_dir / "memorization.json", stats)

    def export(self) -> None:
        """Write the trained adapter(s) to run_dir/lora (main process only); defenses with several adapters override."""
        exporter.export_lora(self)

    def after_export(self) -> None:
        """The evaluation stage (eval.enabled): attacks, utility, report and the LoRA's privacy card."""
        if not self.cfg.eval.enabled:
            return
        from ..eval.stage import evaluate_model

        self.report = evaluate_model(
            cfg=self.cfg, components=self.components, unet=self.accelerator.unwrap_model(self.components.unet),
            split=self.split, run_dir=self.run_dir, accelerator=self.accelerator,
            lora_dir=self.run_dir / exporter.LORA_DIR, privacy=self.privacy_summary(), **self.release_plan(),
        )

    def release_plan(self) -> dict:
        """What the run ships, as `evaluate_model` keywords (releases, combinations, threat_model); {} = the one LoRA."""
        return {}

    def privacy_summary(self) -> dict | None:
        """Formal guarantees for the report (epsilon, delta, accountant); None for undefended training."""
        return None

