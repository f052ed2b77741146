"""Caption conditioning for every architecture, as one tensor: SD's text states, or SDXL's packed into them.

SD v1.x / 2.x: the text encoder's last hidden states [B, 77, D] are the UNet's whole condition.

SDXL (Podell et al. 2023) conditions its UNet on three things: both text encoders' penultimate hidden states
concatenated [B, 77, 768 + 1280], the second encoder's pooled projection [B, 1280] (`text_embeds`) and six
size / crop numbers (`time_ids`). privtune's trainers, defenses and attacks pass one condition tensor around
(cached, indexed by row, repeated per DP draw, concatenated for guidance, noised by caption randomization),
so for SDXL the pooled projection rides along as one extra token row (zero-padded to the state width):
states [B, 78, 2048]. `pack_conditioning(unet)` installs a forward pre-hook on the SDXL UNet that splits
that row back off into `added_cond_kwargs` and fills `time_ids` from the latent size (original = target
size, no crop: what StableDiffusionXLPipeline does by default). A call that passes 77-token states with
its own `added_cond_kwargs` (the vanilla SDXL pipeline's) goes through untouched, so one UNet serves both.

Two consequences to know: caption randomization's embedding noise (captions.embedding_noise) also reaches the
pooled row, which is a text embedding too; and the unconditional state of privtune's own guidance and attacks is
the encoded empty caption, where StableDiffusionXLPipeline's default negative prompt is zeros
(force_zeros_for_empty_prompt); the released pipeline for sampling keeps the SDXL default.
"""

from __future__ import annotations

import torch

VAE_DOWNSCALE = 8


def is_sdxl(unet) -> bool:
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def tokenizers(components) -> list:
    return [t for t in (components.tokenizer, getattr(components, "tokenizer_2", None)) if t is not None]


def tokenize(components, captions: list[str]) -> torch.Tensor:
    """Token ids [B, L] (SD) or [B, 2, L] (SDXL: one row per tokenizer), padded to the tokenizer length."""
    ids = [t(list(captions), padding="max_length", max_length=t.model_max_length, truncation=True,
             return_tensors="pt").input_ids for t in tokenizers(components)]
    return ids[0] if len(ids) == 1 else torch.stack(ids, dim=1)


def encode(components, input_ids: torch.Tensor, text_encoder=None, text_encoder_2=None) -> torch.Tensor:
    """The UNet condition for `input_ids` (from `tokenize`): [B, L, D] for SD, packed [B, L + 1, D] for SDXL."""
    te = text_encoder if text_encoder is not None else components.text_encoder
    device = next(te.parameters()).device
    if input_ids.ndim == 2:
        return te(input_ids.to(device), return_dict=False)[0]
    te2 = text_encoder_2 if text_encoder_2 is not None else components.text_encoder_2
    first = te(input_ids[:, 0].to(device), output_hidden_states=True)
    second = te2(input_ids[:, 1].to(device), output_hidden_states=True)
    states = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    pooled = second.text_embeds.to(states.dtype)
    if pooled.shape[-1] > states.shape[-1]:
        raise ValueError(f"SDXL pooled width {pooled.shape[-1]} exceeds the state width {states.shape[-1]}")
    row = torch.nn.functional.pad(pooled, (0, states.shape[-1] - pooled.shape[-1]))
    return torch.cat([states, row[:, None]], dim=1)


def time_ids(sample: torch.Tensor) -> torch.Tensor:
    h, w = sample.shape[-2] * VAE_DOWNSCALE, sample.shape[-1] * VAE_DOWNSCALE
    return torch.tensor([h, w, 0, 0, h, w], dtype=sample.dtype, device=sample.device).expand(sample.shape[0], 6)


def pack_conditioning(unet, tokens: int, pooled_width: int) -> None:
    """Make the SDXL `unet` accept packed states of `tokens` + 1 rows (idempotent)."""
    if getattr(unet, "_privtune_packed", None) is not None:
        return

    def hook(module, args, kwargs):
        states = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        if states is None or states.shape[1] != tokens + 1 or kwargs.get("added_cond_kwargs"):
            return None
        sample = kwargs.get("sample", args[0] if args else None)
        kwargs = dict(kwargs)
        kwargs["encoder_hidden_states"] = states[:, :tokens]
        kwargs["added_cond_kwargs"] = {"text_embeds": states[:, tokens, :pooled_width],
                                       "time_ids": time_ids(sample).to(states.dtype)}
        return args[:2], kwargs

    unet._privtune_packed = unet.register_forward_pre_hook(hook, with_kwargs=True)


def check_supported(cfg, components) -> None:
    """Refuse, before anything is written, the options whose SDXL path privtune does not have (yet)."""
    if not components.sdxl:
        return
    from ..errors import ConfigError

    unsupported = {
        "export.kohya=true (kohya's SDXL files use the original SGM block names)": bool(cfg.export.kohya),
        "sampling.wen_prompt_optimization=true": bool(cfg.sampling.wen_prompt_optimization),
        "sampling.ren_mitigation=true": bool(cfg.sampling.ren_mitigation),
        f"memorization_filter.method={cfg.memorization_filter.method}": cfg.memorization_filter.method != "none",
    }
    named = [k for k, on in unsupported.items() if on]
    if named:
        raise ConfigError(f"model.base {components.path!r} is an SDXL checkpoint, and privtune does not support "
                          f"{', '.join(named)} on SDXL; turn {'it' if len(named) == 1 else 'them'} off (the UNet LoRA, "
                          "DP-SGD, the attacks and the diffusers export do support SDXL)")
