"""DualMD: two LoRA adapters trained on disjoint halves of the members, alternated at sampling time.

Tran, Nguyen, Tran & Tran, "Dual-Model Defense: Safeguarding Diffusion Models from Membership
Inference Attacks through Disjoint Data Splitting" (arXiv 2410.16657, ICLR 2025 submission;
specs/defenses.md section 2). The members (after deduplication, which runs in the data stage before
any split) are cut into two disjoint, seeded halves, whole groups at a time so near-duplicates never
straddle them; adapter A trains on one half and adapter B on the other, over one frozen base UNet, in
one run. The deployed model alternates them across DDIM steps (A even, B odd; `models.alternation`),
so no single model has seen every member; the evaluation stage attacks exactly that alternating
noise predictor. Prompt diversification: a member with several captions (e.g. merged by
deduplication, `Record.captions`) gets one at random each step.

Each optimizer step draws `train.batch_size / 2` rows from each half, so a step costs what a plain
LoRA step costs and each member is seen as often as in plain LoRA training. Gradient clipping is
per adapter (they are independent models). Single process: the two adapters' forwards leave half
the LoRA parameters unused per forward, which DDP would reject.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .. import export as exporter
from ..errors import ConfigError, DataError
from ..io import atomic_write_json
from ..models.alternation import AdapterAlternation, ddim_timesteps
from ..models.dualmd import ADAPTERS, EXPORT_DIRS, dualmd_release_plan, export_dualmd, rewrite_card_usage
from ..models.lora import add_lora, use_adapter
from ..rng import numpy_rng
from . import capabilities, steps
from .base import Batch, Trainer
from .registry import TRAINERS
from .sampling import BatchSchedule

HALVES_FILE = "dualmd_halves.json"


def split_halves(records, seed: int) -> tuple[list[int], list[int]]:
    """Row indices of two disjoint halves covering `records`, whole groups at a time, seeded.

    Groups are shuffled by `seed` and each goes to the currently smaller half, so the halves differ
    in size by at most the largest group.
    """
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(r.group, []).append(i)
    order = sorted(groups)
    order = [order[i] for i in numpy_rng(seed, "dualmd-halves").permutation(len(order))]
    halves: tuple[list[int], list[int]] = ([], [])
    for g in order:
        halves[0 if len(halves[0]) <= len(halves[1]) else 1].extend(groups[g])
    if not halves[0] or not halves[1]:
        raise DataError(f"DualMD needs members from at least two groups to split them into two halves (got {len(records)} "
                        "rows in one group); add members or set data.group_column=null")
    return sorted(halves[0]), sorted(halves[1])


class HalfSchedule:
    """A BatchSchedule over one half's rows, returning row indices of the full training set."""

    def __init__(self, index, batch_size: int, seed: int, random_flip: bool, stream: str):
        self.index = np.asarray(index, dtype=np.int64)
        self.inner = BatchSchedule(len(self.index), batch_size, seed, 0, 1, random_flip, stream=stream)

    def rows(self, micro_step: int) -> tuple[np.ndarray, np.ndarray]:
        rows, flips = self.inner.rows(micro_step)
        return self.index[rows], flips


class PromptDiversification:
    """Mixin: when members carry several captions (`Record.captions`), one is drawn per (step, row)."""

    def setup_caption_choices(self) -> None:
        enabled = bool(self.cfg.dualmd.prompt_diversification)
        choices = [list(dict.fromkeys([r.caption, *(getattr(r, "captions", None) or [])])) for r in self.train_records]
        self.caption_choices = choices if enabled and any(len(c) > 1 for c in choices) else None
        if self.caption_choices is not None and self.is_main:
            n = sum(len(c) > 1 for c in choices)
            print(f"privtune: prompt diversification: {n} members have several captions; one is drawn per step")

    def micro_batch(self, micro_step: int, schedule=None) -> Batch:
        batch = super().micro_batch(micro_step, schedule)
        if getattr(self, "caption_choices", None) is None:
            return batch
        captions = []
        for r in batch.rows.tolist():
            options = self.caption_choices[r]
            captions.append(options[int(numpy_rng(self.cfg.seed, "caption-choice", micro_step, r).integers(len(options)))])
        with torch.no_grad():
            states = self.encode_text(self.tokenize(captions))
        return replace(batch, encoder_hidden_states=states.to(self.device, self.weight_dtype))


TWO_ADAPTER_LIMITS = {"text_encoder": "it trains UNet adapters only",
                      "adapter_method": "its adapters are loaded back and compared as LoRA tensors",
                      "multi_process": "the two adapters' forwards would leave DDP with unused parameters"}


def check_two_adapter_config(cfg, name: str) -> None:
    if "dualmd" not in cfg:
        raise ConfigError(f"trainer {name} needs a dualmd: section; use recipe={name} (or inherit from it)")
    if int(cfg.dualmd.inference_steps) < 1:
        raise ConfigError(f"dualmd.inference_steps must be >= 1 (got {cfg.dualmd.inference_steps})")


@TRAINERS.register("dualmd")
class DualMDTrainer(PromptDiversification, Trainer):
    """Adapters A and B on disjoint halves of the members; deployed and attacked as the alternating sampler."""

    name = "dualmd"
    supports = capabilities.ALL - set(TWO_ADAPTER_LIMITS)
    unsupported_reasons = TWO_ADAPTER_LIMITS

    def validate_config(self) -> None:
        super().validate_config()
        cfg = self.cfg
        check_two_adapter_config(cfg, "dualmd")
        if cfg.train.batch_size < 2 or cfg.train.batch_size % 2:
            raise ConfigError(f"dualmd splits train.batch_size evenly between adapters A and B; make it even and >= 2 "
                              f"(got {cfg.train.batch_size})")

    # ------------------------------------------------------------------ data
    @property
    def split_seed(self) -> int:
        s = self.cfg.dualmd.split_seed
        return int(self.cfg.seed if s is None else s)

    def setup_data(self) -> None:
        super().setup_data()
        path = self.run_dir / HALVES_FILE
        if self.resumed_split and path.is_file():
            self.halves = halves_from_file(path, self.train_records)
        else:
            self.halves = split_halves(self.train_records, self.split_seed)
        self.setup_caption_choices()

    def write_run_files(self) -> None:
        super().write_run_files()
        if self.is_main:
            atomic_write_json(self.run_dir / HALVES_FILE, {
                "format": "privtune-dualmd-halves-v1", "seed": self.split_seed,
                **{name: [self.train_records[i].id for i in half] for name, half in zip(ADAPTERS, self.halves)},
            })
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ model
    def add_unet_adapters(self) -> list[torch.nn.Parameter]:
        unet = self.components.unet
        self.adapter_params = {name: add_lora(unet, self.lora_config, name) for name in ADAPTERS}
        params = [p for name in ADAPTERS for p in self.adapter_params[name]]
        for p in params:
            p.requires_grad_(True)
        return params

    def prepare(self) -> None:
        super().prepare()
        half_batch = self.cfg.train.batch_size // 2
        self.half_schedules = [HalfSchedule(half, half_batch, int(self.cfg.seed), self.cfg.data.random_flip, f"dualmd-half-{name}")
                               for name, half in zip(ADAPTERS, self.halves)]

    @property
    def unet(self):
        return self.accelerator.unwrap_model(self.components.unet)

    # ------------------------------------------------------------------ step
    def optimizer_step(self, micro_step: int) -> dict:
        """Both adapters' denoising losses on their own halves' rows, then one update (steps.apply_update)."""

        def backward(m: int) -> dict:
            logs = {}
            for name, schedule in zip(ADAPTERS, self.half_schedules):
                use_adapter(self.unet, name)
                loss, _ = self.compute_loss(self.micro_batch(m, schedule))
                self.accelerator.backward(loss)
                logs[f"loss_{name.lower()}"] = loss.detach().item()
            logs["loss"] = (logs["loss_a"] + logs["loss_b"]) / 2
            return logs

        return steps.accumulated_step(self, micro_step, backward)

    def clip_groups(self) -> list[list[torch.nn.Parameter]]:
        """Clipped per adapter: they are independent models."""
        return [self.adapter_params[name] for name in ADAPTERS]

    # ------------------------------------------------------------------ sampling, export, evaluation
    def alternation(self, num_inference_steps: int) -> AdapterAlternation:
        """The alternating A/B predictor of the deployed DDIM sampler with `num_inference_steps` steps."""
        return AdapterAlternation(self.unet, ddim_timesteps(self.components.noise_scheduler.config, num_inference_steps), ADAPTERS)

    def validate(self, step: int):
        with self.alternation(self.cfg.train.validation_inference_steps):
            return super().validate(step)

    def export(self) -> None:
        export_dualmd(self.run_dir / exporter.LORA_DIR, self.unet, self.lora_config, kohya=self.cfg.export.kohya,
                      inference_steps=int(self.cfg.dualmd.inference_steps))

    def release_plan(self) -> dict:
        return dualmd_release_plan(self.unet, self.components.noise_scheduler.config, int(self.cfg.dualmd.inference_steps))

    def after_export(self) -> None:
        if not self.cfg.eval.enabled:
            return
        super().after_export()
        if self.is_main:
            from ..eval.stage import base_model_name

            rewrite_card_usage(self.run_dir / exporter.LORA_DIR, base_model_name(self.cfg), int(self.cfg.dualmd.inference_steps))


def halves_from_file(path: Path, records) -> tuple[list[int], list[int]]:
    """The halves recorded in a run's dualmd_halves.json, as row indices of `records` (checked to cover them)."""
    data = json.loads(Path(path).read_text())
    index = {r.id: i for i, r in enumerate(records)}
    halves = []
    for name in ADAPTERS:
        missing = [i for i in data.get(name, []) if i not in index]
        if missing:
            raise DataError(f"{path} names member {missing[0]!r} that is not a training member of this run; "
                            "the teachers were trained on other data (use the same data, seed and members)")
        halves.append(sorted(index[i] for i in data[name]))
    if set(halves[0]) & set(halves[1]) or len(halves[0]) + len(halves[1]) != len(records):
        raise DataError(f"{path}: the halves must be disjoint and cover all {len(records)} training members")
    return halves[0], halves[1]


__all__ = ["DualMDTrainer", "split_halves", "ADAPTERS", "EXPORT_DIRS", "HALVES_FILE"]
