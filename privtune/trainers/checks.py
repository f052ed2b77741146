"""The checks a run passes before anything is written that the typed schema (privtune.schema, run at load time)
cannot make: registries (attack names), files (the baseline, a CLIP folder), the hardware (CUDA-only options)
and the checks that need the tokenizer or the data settings together."""

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
    if cfg.lora.method == "dora" and cfg.export.kohya:
        raise ConfigError("export.kohya=true with lora.method=dora: no kohya file reproduces peft's DoRA, which normalizes "
                          "each output row of W + dW; ComfyUI divides an output-axis dora_scale by the base weight's norm and "
                          "A1111 normalizes input columns; set export.kohya=false (the diffusers file carries the magnitudes)")
    if cfg.lora.method in ("lokr", "loha") and cfg.lora.text_encoder:
        raise ConfigError(f"lora.text_encoder=true with lora.method={cfg.lora.method}: the text encoder's adapter would be "
                          "a LoRA in a LyCORIS file, which the diffusers loaders do not read together; set "
                          "lora.text_encoder=false or lora.method=lora")
    check_attacks(cfg.eval.attacks)
    check_max_members(cfg.eval.get("max_members"))
    if cfg.eval.enabled:
        load_baseline(cfg.eval.baseline)
        if cfg.eval.utility and cfg.eval.get("clip_model"):
            from ..eval.clip_metrics import check_clip_folder

            check_clip_folder(cfg.eval.clip_model)
    if cfg.optim.use_8bit and not torch.cuda.is_available():
        raise ConfigError("optim.use_8bit=true needs a CUDA GPU (bitsandbytes 8-bit AdamW); set optim.use_8bit=false on this machine")
    if cfg.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.mixed_precision=fp16 needs a CUDA GPU; use bf16 or no on CPU")
    check_captions(cfg.captions)
    check_filter(cfg.memorization_filter)
    check_sampling(cfg.sampling)
