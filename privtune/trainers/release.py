"""What a run leaves for its users: validation images during training, then the export and the evaluation.

`Release` works on a trainer's parts (components, split, run folder) and calls back the trainer's own
`validate`, `export`, `release_plan` and `privacy_summary`, so a defense with several adapters or a formal
guarantee changes only those.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import export as exporter
from .. import tracking


class Release:
    def __init__(self, trainer):
        self.trainer = trainer
        self._held_out_prompts: list[str] | None = None
        self._warned_no_prompts = False

    def pipeline(self):
        """A StableDiffusionPipeline over the current (LoRA-adapted) components, for sampling."""
        from ..eval.stage import pipeline_for
        from ..memorization.sampling import apply_sampling_options

        t = self.trainer
        comps = t.components
        unet, text_encoder = t.accelerator.unwrap_model(comps.unet), t.accelerator.unwrap_model(comps.text_encoder)
        text_encoder_2 = t.accelerator.unwrap_model(comps.text_encoder_2) if comps.sdxl else None
        return apply_sampling_options(pipeline_for(comps, unet, text_encoder, text_encoder_2), t.cfg.sampling)

    def validation_prompts(self) -> list[str]:
        """The user's `train.validation_prompts`, else (up to) four held-out captions that are no training
        caption: source rows in neither split, or only when there are none, non-members (privtune.tracking)."""
        t = self.trainer
        prompts = t.cfg.train.validation_prompts
        if prompts:
            return [str(p) for p in prompts]
        if self._held_out_prompts is None:
            trained = [*t.train_records, *(getattr(t, "encoded_records", None) or [])]
            self._held_out_prompts = tracking.held_out_prompts(t.source.records, t.split.members, t.split.nonmembers, trained,
                                                               n=4, separator=t.caption_separator())
        return self._held_out_prompts

    def validate(self, step: int) -> Path | None:
        """A grid of validation images at `step` (main process), logged to the trackers."""
        t = self.trainer
        acc, cfg = t.accelerator, t.cfg
        if not t.is_main:
            acc.wait_for_everyone()
            return None
        prompts = self.validation_prompts()
        if not prompts:
            if not self._warned_no_prompts:
                print("privtune: no validation images: no held-out caption that is not also a training caption; "
                      "set train.validation_prompts")
                self._warned_no_prompts = True
            acc.wait_for_everyone()
            return None
        unet = acc.unwrap_model(t.components.unet)
        unet.eval()
        with torch.no_grad():
            images = t.pipeline()(
                prompts, num_inference_steps=cfg.train.validation_inference_steps,
                guidance_scale=cfg.train.validation_guidance_scale,
                generator=torch.Generator().manual_seed(cfg.seed),
                height=cfg.data.resolution, width=cfg.data.resolution,
            ).images
        unet.train()
        path = exporter.save_image_grid(images, prompts, t.run_dir / "validation" / f"step-{step:06d}.png")
        tracking.log_images(acc, "validation", images, tracking.tracker_captions(cfg, prompts), step)
        acc.wait_for_everyone()
        return path

    def finish(self) -> None:
        """Final validation images, the export and memorization.json, then the evaluation."""
        t = self.trainer
        acc = t.accelerator
        acc.wait_for_everyone()
        if getattr(t, "ema", None) is not None:  # the EMA is what ships, is attacked and is measured
            t.ema.copy_to_weights()
        if t.cfg.train.validation_every:
            t.validate(t.state.step)
        if t.is_main:
            t.export()
            self.write_hygiene_stats()
        acc.wait_for_everyone()
        t.after_export()
        acc.end_training()

    def write_hygiene_stats(self) -> None:
        """memorization.json: realised caption-randomization rate and filter statistics (when either is on)."""
        t = self.trainer
        stats = {}
        if t.captions.active:
            stats["captions"] = t.captions.stats()
        if t.sample_filter is not None:
            stats["memorization_filter"] = t.sample_filter.stats()
        if stats:
            from ..io import atomic_write_json

            atomic_write_json(t.run_dir / "memorization.json", stats)

    def export_lora(self) -> None:
        exporter.export_lora(self.trainer)

    def evaluate(self, plan: dict, privacy: dict | None) -> None:
        """The evaluation stage (eval.enabled): attacks on what ships, utility, report and privacy card."""
        t = self.trainer
        if not t.cfg.eval.enabled:
            return
        from ..eval.stage import evaluate_model

        t.report = evaluate_model(
            cfg=t.cfg, components=t.components, unet=t.accelerator.unwrap_model(t.components.unet),
            split=t.split, run_dir=t.run_dir, accelerator=t.accelerator,
            lora_dir=t.run_dir / exporter.LORA_DIR, privacy=privacy, **plan,
        )
