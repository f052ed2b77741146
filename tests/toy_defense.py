"""A loss-only defense added the way a user adds one: this file plus its one registry line.

Loss truncation: each row's denoising loss is capped at `CAP`, so a row the model already fits far worse than
the rest (an outlier it would memorize to fit) cannot dominate the update. Everything else (run folder,
inputs, accumulation, checkpoints, resume, export, evaluation) comes from the composed `Trainer`.
"""

from __future__ import annotations

import torch

from privtune.losses import denoising_loss
from privtune.trainers import capabilities
from privtune.trainers.base import Batch, Trainer
from privtune.trainers.registry import TRAINERS

CAP = 0.5


@TRAINERS.register("toy_truncated_loss")
class TruncatedLossTrainer(Trainer):
    name = "toy_truncated_loss"
    supports = capabilities.ALL - {"memorization_filter"}
    unsupported_reasons = {"memorization_filter": "its loss replaces the filtered denoising loss"}
    calls = 0

    def compute_loss(self, batch: Batch) -> tuple[torch.Tensor, dict]:
        type(self).calls += 1
        noise, timesteps = self.sample_noise(batch.latents)
        per_sample = denoising_loss(self.components.unet, self.components.noise_scheduler, batch.latents,
                                    batch.encoder_hidden_states, noise, timesteps)
        loss = per_sample.clamp(max=CAP).mean()
        return loss, {"loss": loss.detach().item()}
