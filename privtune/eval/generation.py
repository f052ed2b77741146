"""The black-box attacker's view of a release (specs/attacks.md §8): a generation API and an offline image encoder.

A `GenerationAPI` is everything the black-box attacks may call: `images(prompts, seeds)` (text-to-image, one public
seed per image), `variations(images, prompts, t, stride, seeds)` (img2img: noise the image to step t, denoise it with
the model; REDIFFUSE's API) and `embed(images)` (the attacker's own, offline image encoder). Images are float
[N, 3, H, W] in [-1, 1] on the CPU. The attacks never see a noise prediction, a latent or a weight: an AttackTarget
whose predictor raises still serves them (tests/eval/test_blackbox.py). The API counts what it was asked for, so
every attack reports generations per query.

The encoder is what is available without a download (the papers' DeiT / ResNet-18 / CLIP are not): on the embedded
portraits benchmark the shipped attribute classifier's penultimate features, on the embedded emoji set the fixed
training-free features of privtune.models.recognition, for real checkpoints a local CLIP folder (`eval.clip_model`);
otherwise a ConfigError names the missing weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, DataError

Images = Tensor  # float [N, 3, H, W] in [-1, 1]


@dataclass
class GenerationAPI:
    """A release as a black-box attacker holds it, with the UNet passes each call costs (for the report's NFE)."""

    generate: Callable[[Sequence[str], Sequence[int]], Images]
    embed: Callable[[Images], np.ndarray]
    vary: Callable[[Images, Sequence[str], int, int, Sequence[int]], Images] | None = None
    encoder: str = ""
    passes_per_image: float = 0.0  # UNet passes of one generate() image: sampler steps (x 2 with guidance)
    counts: dict[str, int] = field(default_factory=lambda: {"images": 0, "variations": 0, "passes": 0})
    cache_bytes: int = 512 * 2**20  # generations kept by (prompt, seed): attacks asking the same image share it
    _cache: dict = field(default_factory=dict, repr=False)

    def images(self, prompts: Sequence[str], seeds: Sequence[int]) -> Images:
        """One image per (prompt, seed). Counts are what was asked (an attack's cost), even when the image was already
        generated for another attack with the same public seed and is served from the cache."""
        if len(prompts) != len(seeds):
            raise DataError(f"generate: {len(prompts)} prompts and {len(seeds)} seeds; one seed per image")
        keys = [(str(p), int(s)) for p, s in zip(prompts, seeds)]
        todo = [k for k in dict.fromkeys(keys) if k not in self._cache]
        fresh = {}
        if todo:
            made = _checked(self.generate([p for p, _ in todo], [s for _, s in todo]), len(todo), "generate")
            fresh = dict(zip(todo, made))
            used = sum(v.numel() * 4 for v in self._cache.values())
            for k, v in fresh.items():
                if used + v.numel() * 4 <= self.cache_bytes:
                    self._cache[k] = v
                    used += v.numel() * 4
        out = torch.stack([fresh[k] if k in fresh else self._cache[k] for k in keys])
        self.counts["images"] += len(prompts)
        self.counts["passes"] += int(round(self.passes_per_image * len(prompts)))
        return out

    def clear_cache(self) -> None:
        """Forget cached generations: the runner calls it before each release, which may be another model."""
        self._cache.clear()

    def variations(self, images: Images, prompts: Sequence[str], t: int, stride: int, seeds: Sequence[int]) -> Images:
        if self.vary is None:
            raise ConfigError("this release offers no image-variation (img2img) API")
        if stride <= 0 or t <= 0 or t % stride:
            raise ConfigError(f"variations: t={t} must be a positive multiple of stride={stride}")
        if not len(images) == len(prompts) == len(seeds):
            raise DataError(f"variations: {len(images)} images, {len(prompts)} prompts, {len(seeds)} seeds")
        out = _checked(self.vary(images, list(prompts), int(t), int(stride), [int(s) for s in seeds]), len(images), "vary")
        self.counts["variations"] += len(images)
        self.counts["passes"] += (t // stride) * len(images)
        return out

    def features(self, images: Images, batch_size: int = 256) -> np.ndarray:
        return np.concatenate([np.asarray(self.embed(images[i:i + batch_size]), np.float64)
                               for i in range(0, len(images), batch_size)])


def _checked(images: Tensor, n: int, what: str) -> Tensor:
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[0] != n or images.shape[1] != 3:
        raise DataError(f"{what} must return float images [N={n}, 3, H, W] in [-1, 1]")
    return images.detach().float().cpu()


# ---------------------------------------------------------------------------------------- encoders
def to_uint8(images: Images) -> np.ndarray:
    """[-1, 1] images [N,3,H,W] -> uint8 [N,H,W,3]."""
    x = ((images.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def attribute_encoder(classifier_dir=None) -> tuple[Callable[[Images], np.ndarray], str]:
    """The portraits attribute classifier's penultimate features (it ships with the package)."""
    from ..models.attributes import load_classifier

    model, config = load_classifier(*([classifier_dir] if classifier_dir else []))
    res = int(config["resolution"])
    model.eval()

    @torch.no_grad()
    def embed(images: Images) -> np.ndarray:
        x = (images.float().clamp(-1, 1) + 1.0) / 2.0
        if x.shape[-1] != res:
            x = torch.nn.functional.interpolate(x, size=(res, res), mode="area")
        return model.features(x).numpy()

    return embed, "penultimate features of the shipped portraits attribute classifier"


def recognition_encoder() -> tuple[Callable[[Images], np.ndarray], str]:
    from ..models import recognition

    return (lambda images: recognition.features(to_uint8(images)),
            "fixed training-free features (coarse RGB + colour histogram, privtune.models.recognition)")


def clip_encoder(folder) -> tuple[Callable[[Images], np.ndarray], str]:
    from .clip_metrics import image_embeddings, load_local_clip

    model, processor = load_local_clip(folder)
    return (lambda images: image_embeddings(model, processor, to_uint8(images)),
            f"CLIP image embeddings of the local folder {folder}")


def image_encoder(benchmark: str | None, clip_model=None) -> tuple[Callable[[Images], np.ndarray], str]:
    """The offline encoder for a run: a local CLIP folder when given, else the embedded benchmark's own features."""
    if clip_model:
        return clip_encoder(clip_model)
    if benchmark == "portraits":
        return attribute_encoder()
    if benchmark is not None:
        return recognition_encoder()
    raise ConfigError("the black-box attacks need an offline image encoder and none ships for this data: set "
                      "eval.clip_model=<a local CLIP folder> (CLIPModel + CLIPProcessor; nothing is downloaded)")


# ---------------------------------------------------------------------------------------- a pipeline as an API
def pipeline_api(pipe, components, predictor, embed, encoder: str, *, steps: int, guidance: float,
                 device) -> GenerationAPI:
    """A diffusers text-to-image pipeline (and its VAE and the release's noise predictor, for img2img) behind a
    GenerationAPI: what a release behind a generation service exposes."""
    from .primitives import add_noise, ddim_trajectory, seeded_noise
    from .encode import text_encoder_fn

    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    encode_text = text_encoder_fn(components, device)
    alphas = components.noise_scheduler.alphas_cumprod.to(torch.float64)

    @torch.no_grad()
    def generate(prompts, seeds):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        out = pipe(list(prompts), num_inference_steps=int(steps), guidance_scale=float(guidance), height=size,
                   width=size, generator=gens, output_type="pt")
        return out.images.float() * 2.0 - 1.0

    @torch.no_grad()
    def vary(images, prompts, t, stride, seeds):
        vae = components.vae
        p = next(vae.parameters())
        latents = vae.encode(images.to(p.device, p.dtype)).latent_dist.mean * components.scaling_factor
        latents = latents.float()
        ids = [str(s) for s in seeds]
        noise = seeded_noise(latents.shape[1:], 0, "variation", ids, latents.device, latents.dtype)
        xt = add_noise(latents, noise, t, alphas.to(latents.device))
        cond = encode_text(prompts).to(latents.device)
        x0 = ddim_trajectory(predictor, xt, t, 0, stride, cond, alphas.to(latents.device))
        return vae.decode(x0.to(p.dtype) / components.scaling_factor).sample.float().clamp(-1, 1)

    passes = int(steps) * (2 if float(guidance) > 1.0 else 1)
    return GenerationAPI(generate, embed, vary, encoder=encoder, passes_per_image=passes)
