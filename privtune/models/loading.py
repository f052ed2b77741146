"""Load the Stable Diffusion components from one config key, the same way for every checkpoint.

`model.base=embedded` is the tiny SD shipped in the package; any local diffusers folder or hub id
(e.g. SD v1.5) goes through exactly the same calls. An SDXL checkpoint (a `text_encoder_2/`) also loads its
second tokenizer and text encoder, and its UNet takes packed conditioning (models.conditioning). Weights load
from safetensors only unless the user sets `model.allow_unsafe_weights=true`; remote code is never trusted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..embedded import DEFAULT, EMBEDDED, embedded, is_embedded
from ..errors import ModelError

EMBEDDED_MODEL = EMBEDDED[DEFAULT].model


@dataclass
class Components:
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object
    path: str
    tokenizer_2: object = None
    text_encoder_2: torch.nn.Module | None = None

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    def modules(self) -> list[torch.nn.Module]:
        """Every network of the pipeline (VAE, text encoder(s), UNet), for freezing and device moves."""
        return [m for m in (self.vae, self.text_encoder, self.text_encoder_2, self.unet) if m is not None]


def resolve_base(base: str) -> str:
    if is_embedded(base):
        model = embedded(base).model
        if not (model / "model_index.json").is_file():
            raise ModelError(f"the embedded model is missing at {model}; rebuild it with scripts/build_tiny_sd.py")
        return str(model)
    path = Path(base).expanduser()
    if base.startswith((".", "/", "~")) and not path.exists():
        raise ModelError(f"model.base {base!r} does not exist; pass a diffusers folder, a hub id, or 'embedded'")
    if path.is_dir():
        parts = ["tokenizer", "text_encoder", "vae", "unet", "scheduler"]
        if (path / "text_encoder_2").is_dir() or (path / "tokenizer_2").is_dir():
            parts += ["tokenizer_2", "text_encoder_2"]
        missing = [part for part in parts if not (path / part).is_dir()]
        if missing:
            what = "is empty" if not any(path.iterdir()) else f"lacks {', '.join(missing)}"
            raise ModelError(f"model.base folder {base!r} {what}: a Stable Diffusion checkpoint in diffusers layout needs "
                             "tokenizer/, text_encoder/, vae/, unet/ and scheduler/ (save one with pipe.save_pretrained(folder)), "
                             "or pass a hub id or 'embedded'")
    return str(path) if path.exists() else base


def load_components(model_cfg, dtype: torch.dtype = torch.float32) -> Components:
    """Tokenizer, text encoder, VAE, UNet (in `dtype`) and the DDPM training scheduler of `model.base`."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from .conditioning import is_sdxl, pack_conditioning

    path = resolve_base(str(model_cfg.base))
    common = {"revision": model_cfg.revision}
    weights = {"use_safetensors": not model_cfg.allow_unsafe_weights, "variant": model_cfg.variant, "torch_dtype": dtype}
    try:
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **common)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", use_safetensors=weights["use_safetensors"],
                                                     variant=model_cfg.variant, dtype=dtype, **common)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **weights, **common)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **weights, **common)
        noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **common)
        tokenizer_2 = text_encoder_2 = None
        if is_sdxl(unet):
            tokenizer_2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **common)
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
                path, subfolder="text_encoder_2", use_safetensors=weights["use_safetensors"], variant=model_cfg.variant,
                dtype=dtype, **common)
            pack_conditioning(unet, tokenizer.model_max_length, text_encoder_2.config.projection_dim)
    except (OSError, ValueError, EnvironmentError) as exc:
        hint = (
            " It may ship only pickle (.bin) weights: set model.allow_unsafe_weights=true if you trust it."
            if "safetensors" in str(exc).lower() and not model_cfg.allow_unsafe_weights else ""
        )
        raise ModelError(f"cannot load the Stable Diffusion checkpoint {path!r}: {exc}.{hint}") from exc
    return Components(tokenizer, text_encoder, vae, unet, noise_scheduler, path, tokenizer_2, text_encoder_2)


def freeze(*modules: torch.nn.Module) -> None:
    for module in modules:
        module.requires_grad_(False)
        module.eval()
