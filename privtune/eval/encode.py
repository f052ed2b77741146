"""Encode records into the attacked model's input space: VAE posterior-mode latents and caption states.

The posterior mode (not a sample) makes every attack deterministic (specs/attacks.md §0.2); the
choice is recorded in the report.
"""

from __future__ import annotations

import torch

from ..data.transforms import preprocess
from .attacks import EncodedSamples

LATENT_CHOICE = "vae posterior mode x scaling_factor"


@torch.no_grad()
def encode_records(components, records, resolution: int, device, batch_size: int = 32) -> EncodedSamples:
    vae, text_encoder, tok = components.vae, components.text_encoder, components.tokenizer
    dtype = next(vae.parameters()).dtype
    latents, conds = [], []
    for lo in range(0, len(records), batch_size):
        chunk = records[lo:lo + batch_size]
        pixels = torch.stack([preprocess(r.image, resolution) for r in chunk]).to(device, dtype)
        latents.append(vae.encode(pixels).latent_dist.mode().float() * components.scaling_factor)
        ids = tok([r.caption for r in chunk], padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids.to(device)
        conds.append(text_encoder(ids, return_dict=False)[0].float())
    return EncodedSamples(torch.cat(latents), torch.cat(conds), [r.id for r in records])


@torch.no_grad()
def empty_prompt_state(components, device) -> torch.Tensor:
    tok = components.tokenizer
    ids = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids.to(device)
    return components.text_encoder(ids, return_dict=False)[0].float()
