"""Step strategies: the one place an optimizer update happens.

`apply_update` is what follows the backward of every micro-batch in every trainer: batch-level clipping at a
synchronising micro-batch, the memorization filter's skip (a global batch with no kept row moves no weight:
no AdamW step, no weight decay), the optimizer and LR-schedule step, zeroed gradients. A strategy decides
only how gradients are produced (one loss, two adapters' losses, DP-SGD's noisy clipped sum), so it cannot
forget accumulation, clipping, the scheduler step or the skip.
"""

from __future__ import annotations

import warnings
from typing import Callable

from tqdm.auto import tqdm


def apply_update(trainer, clip_groups=None) -> bool:
    """Clip, skip or step the optimizer, step the schedule, zero the gradients; True when the filter skipped."""
    acc, cfg = trainer.accelerator, trainer.cfg
    if acc.sync_gradients and cfg.train.max_grad_norm:
        for group in (clip_groups if clip_groups is not None else trainer.clip_groups()):
            acc.clip_grad_norm_(group, cfg.train.max_grad_norm)
    skipped = acc.sync_gradients and trainer.skip_optimizer_step()
    if not skipped:
        trainer.optimizer.step()
        if acc.sync_gradients and getattr(trainer, "ema", None) is not None:
            trainer.ema.step()
    with warnings.catch_warnings():
        if skipped:  # the schedule still follows the step count; torch warns when no optimizer step came first
            warnings.filterwarnings("ignore", message="Detected call of")
        trainer.lr_scheduler.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return skipped


def accumulated_step(trainer, micro_step: int, backward: Callable[[int], dict]) -> dict:
    """One optimizer step over `train.gradient_accumulation_steps` micro-batches; `backward(m)` runs micro-batch
    m's forward and `accelerator.backward` and returns its logs."""
    acc = trainer.accelerator
    logs: dict = {}
    for a in range(trainer.cfg.train.gradient_accumulation_steps):
        trainer.state.reseed(a)
        with acc.accumulate(trainer.components.unet):
            logs = backward(micro_step + a)
            apply_update(trainer)
    return logs


def standard_step(trainer, micro_step: int) -> dict:
    """The plain strategy: the trainer's objective on its own batch schedule."""

    def backward(m: int) -> dict:
        loss, logs = trainer.compute_loss(trainer.micro_batch(m))
        trainer.accelerator.backward(loss)
        return logs

    return accumulated_step(trainer, micro_step, backward)


def train_loop(t) -> None:
    """Steps until `train.max_steps` (or the defense stops early), logging, checkpointing and validating on
    schedule; the final checkpoint is always written."""
    cfg, acc = t.cfg, t.accelerator
    bar = tqdm(total=cfg.train.max_steps, initial=t.state.step, desc=f"train {t.name}", disable=not t.is_main,
               dynamic_ncols=True)
    try:
        while t.state.step < cfg.train.max_steps:
            t.state.reseed()
            logs = t.optimizer_step(t.state.step * cfg.train.gradient_accumulation_steps)
            t.state.step += 1
            step = t.state.step
            logs["lr"] = t.lr_scheduler.get_last_lr()[0]
            logs.update(t.step_logs())
            bar.update(1)
            if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if isinstance(v, float)})
                acc.log({f"train/{k}": v for k, v in logs.items()}, step=step)
            if t.should_stop():
                if t.is_main:
                    print(f"privtune: stopping at step {step}: {t.stop_reason}")
                break
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and step < cfg.train.max_steps:
                t.save_checkpoint()
            if cfg.train.validation_every and step % cfg.train.validation_every == 0 and step < cfg.train.max_steps:
                t.validate(step)
    finally:
        bar.close()  # also on Ctrl-C, so the interrupt line starts on its own line
    t.save_checkpoint()
