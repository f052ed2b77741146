"""The optimizer (AdamW; bitsandbytes' 8-bit AdamW on CUDA) and its LR schedule (diffusers' schedulers)."""

from __future__ import annotations

import torch

from ..errors import ConfigError


def build_optimizer(cfg, groups: list[dict], schedule_steps: int, num_processes: int):
    """(optimizer, lr_scheduler) for parameter `groups`; the schedule spans `schedule_steps` updates per process."""
    from diffusers.optimization import get_scheduler

    kwargs = dict(lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    if cfg.optim.use_8bit:
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(groups, **kwargs)
    else:
        optimizer = torch.optim.AdamW(groups, **kwargs)
    try:
        scheduler = get_scheduler(cfg.optim.scheduler, optimizer=optimizer, num_warmup_steps=cfg.optim.warmup_steps * num_processes,
                                  num_training_steps=schedule_steps * num_processes)
    except ValueError as exc:
        raise ConfigError(f"optim.scheduler: {exc}") from exc
    return optimizer, scheduler
