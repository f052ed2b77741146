"""Encode records into the attacked model's input space: VAE posterior-mode latents and caption states.

The posterior mode (not a sample) makes every attack deterministic (specs/attacks.md §0.2); the
choice is recorded in the report.
"""

from __future__ import annotations

import torch

from ..data.transforms import preprocess
from ..models import conditioning
from .attacks import EncodedSamples

LATENT_CHOICE = "vae posterior mode x scaling_factor"


@torch.no_grad()
def encode_records(components, records, resolution: int, device, batch_size: int = 32) -> EncodedSamples:
    """Latents and caption states of `records`, with their captions and preprocessed pixels (kept on the CPU)."""
    vae = components.vae
    dtype = next(vae.parameters()).dtype
    encode = text_encoder_fn(components, device)
    latents, conds, images = [], [], []
    for lo in range(0, len(records), batch_size):
        chunk = records[lo:lo + batch_size]
        pixels = torch.stack([preprocess(r.image, resolution) for r in chunk])
        latents.append(vae.encode(pixels.to(device, dtype)).latent_dist.mode().float() * components.scaling_factor)
        conds.append(encode([r.caption for r in chunk]))
        images.append(pixels.float())
    return EncodedSamples(torch.cat(latents), torch.cat(conds), [r.id for r in records],
                          captions=[r.caption for r in records], pixels=torch.cat(images))


def text_encoder_fn(components, device):
    """prompts -> condition states [B,L,D] (float32, on `device`) through the target's own tokenizer and text encoder."""
    @torch.no_grad()
    def encode(prompts) -> torch.Tensor:
        return conditioning.encode(components, conditioning.tokenize(components, list(prompts))).to(device).float()

    return encode


def decoder_fn(components):
    """scaled latents -> pixels in [-1, 1] (float32, on the latents' device) through the target's VAE."""
    vae = components.vae

    @torch.no_grad()
    def decode(latents: torch.Tensor) -> torch.Tensor:
        p = next(vae.parameters())
        out = vae.decode(latents.to(p.device, p.dtype) / components.scaling_factor).sample
        return out.float().clamp(-1, 1).to(latents.device)

    return decode


@torch.no_grad()
def empty_prompt_state(components, device) -> torch.Tensor:
    return text_encoder_fn(components, device)([""])
