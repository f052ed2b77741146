"""The training state every trainer checkpoints, and the micro-batch it hands to its objective."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..rng import seeded


class TrainState:
    """The step, checkpointed, and this process's generator for latent sampling, noise and timesteps.

    The generator is re-seeded from the named stream ("train", process index, step, micro-batch) before
    every micro-batch (and at the start of every step), so its draws are a pure function of the step: a
    resumed run draws exactly what an uninterrupted one would, with nothing per-process to checkpoint
    (accelerate saves custom state from the main process only).
    """

    def __init__(self, seed: int, rank: int):
        self.seed = seed
        self.rank = rank
        self.step = 0
        self.generator = torch.Generator()
        self.reseed()

    def reseed(self, micro: int = 0, rank: int | None = None) -> None:
        """Seed the generator for micro-batch `micro` of the current step (`rank` overrides the process index)."""
        self.generator.manual_seed(seeded(self.seed, "train", self.rank if rank is None else rank, self.step, micro))

    def state_dict(self) -> dict:
        return {"step": torch.tensor(self.step)}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


@dataclass
class Batch:
    """One micro-batch, already on the device: latents (sampled), text conditioning, row indices."""

    latents: torch.Tensor
    encoder_hidden_states: torch.Tensor
    rows: torch.Tensor
