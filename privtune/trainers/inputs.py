"""The input pipeline: training rows to micro-batches of latents and text conditioning.

Caches VAE posteriors (both orientations when flipping) and text embeddings when the VAE and text encoder
are frozen and nothing draws new pixels per step; otherwise crops, augments and encodes each micro-batch.
Caption randomization (privtune.data.captions) is applied on top, per row and step. Every draw comes from a
named stream keyed by the micro-batch, so a resumed run sees the batches an uninterrupted one would.
"""

from __future__ import annotations

import torch

from ..data.transforms import preprocess
from ..models import conditioning
from ..rng import numpy_rng
from .state import Batch


class InputPipeline:
    """Prepared inputs for `records` (the training rows, then any rows a defense only scores)."""

    def __init__(self, cfg, components, records, captions, augmentation, device, weight_dtype, announce: bool):
        self.cfg = cfg
        self.components = components
        self.records = records
        self.captions = captions
        self.augmentation = augmentation
        self.device = device
        self.weight_dtype = weight_dtype
        self.base_captions = [captions.base(r) for r in records]
        self.input_ids = self.tokenize(self.base_captions)
        self._empty = None
        self.cache = None
        if cfg.train.cache_latents and augmentation is not None and announce:
            print(f"privtune: latent caching off: {augmentation.describe()} draws new pixels every step "
                  "(train.cache_latents=true is ignored while data.cutout / data.randaugment are on)")
        if caches(cfg, augmentation):
            self.cache = self.build_cache()

    def build_cache(self) -> dict:
        cfg, records, comps = self.cfg, self.records, self.components
        flips = (False, True) if cfg.data.random_flip else (False,)
        moments = {}
        with torch.no_grad():
            for flip in flips:
                chunks = []
                for i in range(0, len(records), 32):
                    pixels = torch.stack([preprocess(r.image, cfg.data.resolution, True, flip) for r in records[i:i + 32]])
                    dist = comps.vae.encode(pixels.to(self.device, self.weight_dtype)).latent_dist
                    chunks.append(torch.stack([dist.mean, dist.std]).float())
                moments[flip] = torch.cat(chunks, dim=1)
            states = torch.cat([self.encode_text(self.input_ids[i:i + 64]) for i in range(0, len(records), 64)])
        return {"moments": moments, "text": states}

    def empty_state(self) -> torch.Tensor:
        """The empty caption's condition with frozen text encoders, encoded once (caption dropout)."""
        if self._empty is None:
            with torch.no_grad():
                self._empty = self.encode_text(self.tokenize([""]))
        return self._empty

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        return conditioning.tokenize(self.components, captions)

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return conditioning.encode(self.components, input_ids)

    def batch(self, rows, flips, key: int, generator: torch.Generator) -> Batch:
        """The batch of rows `rows` (flipped where `flips`); `key` (the micro-batch) keys crops, augmentations and captions."""
        if self.cache is not None:
            latents, states = self.cached(rows, flips, generator)
        else:
            latents, states = self.encoded(rows, flips, key, generator)
        latents = (latents * self.components.scaling_factor).to(self.device)
        states = self.randomize_captions(key, rows, states)
        return Batch(latents, states.to(self.device, self.weight_dtype), torch.as_tensor(rows))

    def cached(self, rows, flips, generator):
        index, flip_t = torch.as_tensor(rows), torch.as_tensor(flips)
        mean, std = self.cache["moments"][False][:, index]
        if flip_t.any():
            fmean, fstd = self.cache["moments"][True][:, index]
            sel = flip_t.view(-1, 1, 1, 1).to(mean.device)
            mean, std = torch.where(sel, fmean, mean), torch.where(sel, fstd, std)
        eps = torch.randn(mean.shape, generator=generator).to(mean.device)
        return mean + std * eps, self.cache["text"][index]

    def encoded(self, rows, flips, key: int, generator):
        cfg = self.cfg
        pixels = torch.stack([
            preprocess(self.records[r].image, cfg.data.resolution, cfg.data.center_crop, bool(f),
                       numpy_rng(cfg.seed, "crop", key, int(r)))
            for r, f in zip(rows, flips)
        ])
        if self.augmentation is not None:
            pixels = self.augmentation(pixels, cfg.seed, key, rows)
        with torch.no_grad():
            dist = self.components.vae.encode(pixels.to(self.device, self.weight_dtype)).latent_dist
            eps = torch.randn(dist.mean.shape, generator=generator).to(self.device)
            latents = (dist.mean + dist.std * eps).float()
        ids = self.input_ids[torch.as_tensor(rows)]
        with torch.set_grad_enabled(bool(cfg.lora.text_encoder)):
            states = self.encode_text(ids)
        return latents, states

    def randomize_captions(self, key: int, rows, states: torch.Tensor) -> torch.Tensor:
        """Re-encode the rows whose randomized caption changed, then add embedding noise (privtune.data.captions)."""
        rz = self.captions
        if not rz.active:
            return states
        if rz.text_active:
            draws = [rz.draw(self.records[int(r)], key, int(r)) for r in rows]
            changed = [i for i, (d, r) in enumerate(zip(draws, rows)) if d.caption != self.base_captions[int(r)]]
            empty = [i for i in changed if draws[i].caption == "" and not self.cfg.lora.text_encoder]
            changed = [i for i in changed if i not in empty]
            if changed or empty:
                states = states.clone()
            if empty:  # caption dropout with frozen text encoders: the empty caption's states, encoded once
                states[torch.as_tensor(empty, device=states.device)] = self.empty_state().to(states.device, states.dtype)
            if changed:
                ids = self.tokenize([draws[i].caption for i in changed])
                with torch.set_grad_enabled(bool(self.cfg.lora.text_encoder)):
                    fresh = self.encode_text(ids)
                states[torch.as_tensor(changed, device=states.device)] = fresh.to(states.device, states.dtype)
        if rz.noise:
            states = states + rz.embedding_noise(states.shape, key, rows).to(states.device, states.dtype)
        return states


def caches(cfg, augmentation) -> bool:
    """Latents and text embeddings are cached when nothing that shapes them changes from step to step."""
    return bool(cfg.train.cache_latents and not cfg.lora.text_encoder and cfg.data.center_crop and augmentation is None)
