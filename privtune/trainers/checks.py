"""The checks every run passes before anything is written: data settings, evaluation settings (whatever
`eval.enabled` says, a later `privtune.evaluate` uses them), hardware-bound options, hygiene options."""

from __future__ import annotations

import torch

from ..data.stage import check_settings as check_data_settings
from ..errors import ConfigError


def check_run_config(cfg) -> None:
    """ConfigError naming the key and the fix for the first bad setting."""
    from ..data.captions import check_config as check_captions
    from ..eval.stage import check_attacks, check_max_members, load_baseline
    from ..memorization.filter import check_config as check_filter
    from ..memorization.sampling import check_config as check_sampling

    check_data_settings(cfg)
    check_attacks(cfg.eval.attacks)
    check_max_members(cfg.eval.get("max_members"))
    if not 0 < float(cfg.eval.calibration_fraction) < 1:
        raise ConfigError(f"eval.calibration_fraction must be in (0, 1) (got {cfg.eval.calibration_fraction}): that share "
                          "of members and non-members fits the attacks, the rest is reported; 0.5 is the default")
    if cfg.eval.enabled:
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
    check_captions(cfg.captions)
    check_filter(cfg.memorization_filter)
    check_sampling(cfg.sampling)
