"""The two closed-form noise predictors of specs/attacks.md §0.4, as NoisePredictors.

* MemorizingOracle: the exact ε-optimum for the empirical distribution of a training set, so every
  attack must separate its training points from fresh ones (AUC ≈ 1).
* GaussianOracle: the exact ε-optimum for N(μ, s²I), which memorizes nothing (AUC ≈ 0.5).

Both compute in float64 and return x's dtype. Beside them, the stand-ins an attack with requirements
needs around an oracle: a text encoder (captions -> states), a decoder (latents -> pixels) and a
parametric network (for gradients).
"""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import torch
from torch import Tensor, nn


def _coeffs(alphas_cumprod: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    ac = alphas_cumprod.to(dtype=torch.float64, device=t.device)[t].reshape(-1, 1, 1, 1)
    return ac.sqrt(), (1.0 - ac).sqrt()


class MemorizingOracle:
    """ε*(x_t, t) = (x_t − sqrt(ᾱ_t)·m)/σ_t, m the posterior mean over the training points with
    weights ∝ exp(−‖x_t − sqrt(ᾱ_t)x_i‖²/(2σ_t²)). With `conds` given, only training points whose
    condition equals the query's are used; with no match (∅ or an unseen caption) all are."""

    def __init__(self, train: Tensor, alphas_cumprod: Tensor, conds: Tensor | None = None):
        self.train = train.to(torch.float64)
        self.conds = conds
        self.alphas_cumprod = alphas_cumprod

    def __call__(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        a, sig = _coeffs(self.alphas_cumprod, t)
        xd = x.to(torch.float64)
        flat_x = xd.flatten(1)
        flat_s = self.train.flatten(1)
        a2, sig2 = a.reshape(-1, 1), sig.reshape(-1, 1)
        d2 = (flat_x.pow(2).sum(1, keepdim=True) - 2 * a2 * flat_x @ flat_s.T + a2.pow(2) * flat_s.pow(2).sum(1))
        logits = -d2 / (2 * sig2.pow(2))
        if self.conds is not None:
            match = (cond.flatten(1)[:, None, :] == self.conds.flatten(1)[None, :, :]).all(-1)
            match = torch.where(match.any(1, keepdim=True), match, torch.ones_like(match))
            logits = logits.masked_fill(~match, float("-inf"))
        m = (torch.softmax(logits, dim=1) @ flat_s).reshape(xd.shape)
        return ((xd - a * m) / sig).to(x.dtype)


class GaussianOracle:
    """ε̂ for data ~ N(μ, s²I): E[x0|x_t] = μ + sqrt(ᾱ)s²/(ᾱs² + σ²)·(x_t − sqrt(ᾱ)μ)."""

    def __init__(self, mean: float | Tensor, std: float, alphas_cumprod: Tensor):
        self.mean = torch.as_tensor(mean, dtype=torch.float64)
        self.var = float(std) ** 2
        self.alphas_cumprod = alphas_cumprod

    def __call__(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        a, sig = _coeffs(self.alphas_cumprod, t)
        xd = x.to(torch.float64)
        x0 = self.mean + a * self.var / (a.pow(2) * self.var + sig.pow(2)) * (xd - a * self.mean)
        return ((xd - a * x0) / sig).to(x.dtype)


class ConstantEps:
    """Returns a fixed ε regardless of x, t and cond: DDIM transfers then compose exactly."""

    def __init__(self, eps: Tensor):
        self.eps = eps

    def __call__(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        return self.eps.expand_as(x).to(x.dtype)


class DoubledNFE:
    """Declares 2 NFE per call, like a UNetPredictor under classifier-free guidance."""

    nfe_per_call = 2

    def __init__(self, predictor):
        self.predictor = predictor

    def __call__(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        return self.predictor(x, t, cond)


class TextEncoder:
    """A deterministic caption -> [8, 16] state (one seeded vector per string); counts the prompts it encodes."""

    def __init__(self):
        self.prompts = 0

    def __call__(self, prompts):
        self.prompts += len(prompts)
        out = []
        for p in prompts:
            seed = int.from_bytes(hashlib.blake2b(p.encode(), digest_size=8).digest(), "little") & (2**63 - 1)
            out.append(torch.randn(8, 16, generator=torch.Generator().manual_seed(seed)))
        return torch.stack(out)


def upsample_decode(latents):
    """A fixed stand-in for the VAE decoder: the first 3 latent channels, halved, nearest-upsampled ×4
    and clamped to [-1, 1] ([N,4,8,8] -> [N,3,32,32])."""
    x = (0.5 * latents[:, :3]).repeat_interleave(4, dim=-2).repeat_interleave(4, dim=-1)
    return x.clamp(-1, 1)


class OracleUNet(nn.Module):
    """A parametric noise predictor: a closed-form oracle between two 1×1 convolutions initialised at the
    identity, so ε is the oracle's while the convolutions' weights have (per-sample) gradients. Called
    like a diffusers UNet: net(x, t, encoder_hidden_states=c).sample."""

    def __init__(self, oracle, channels: int = 4):
        super().__init__()
        self.oracle = oracle
        self.pre, self.head = nn.Conv2d(channels, channels, 1), nn.Conv2d(channels, channels, 1)
        with torch.no_grad():
            for conv in (self.pre, self.head):
                conv.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))
                conv.bias.zero_()

    def forward(self, x, t, encoder_hidden_states):
        return SimpleNamespace(sample=self.head(self.oracle(self.pre(x), t, encoder_hidden_states)))


class MemorizingGenerator:
    """A black-box release that memorized its training images (no network at all): a training caption generates
    its own image plus small seeded noise, any other caption a seeded random training image (what it learned is its
    training set); a variation is pulled toward the nearest training image (more the larger t) plus noise.
    Images [N,3,H,W] in [-1, 1]."""

    def __init__(self, images: Tensor, captions, noise: float = 0.1, pull: bool = True):
        self.images, self.noise, self.pull = images.float(), float(noise), pull
        self.by_caption = {c: i for i, c in enumerate(captions)}

    def _noise(self, shape, seed):
        return torch.randn(shape, generator=torch.Generator().manual_seed(int(seed) % 2**63))

    def generate(self, prompts, seeds):
        out = []
        for p, s in zip(prompts, seeds):
            i = self.by_caption.get(p)
            if i is None and self.pull:
                key = int.from_bytes(hashlib.blake2b(f"{p}|{s}".encode(), digest_size=8).digest(), "little")
                i = key % len(self.images)
            base = self.images[i] if i is not None else 0.5 * self._noise(self.images.shape[1:], s + 1)
            out.append((base + self.noise * self._noise(base.shape, s)).clamp(-1, 1))
        return torch.stack(out)

    def vary(self, images, prompts, t, stride, seeds):
        w = min(1.0, t / 100.0)
        flat = images.flatten(1)
        nearest = self.images[torch.cdist(flat, self.images.flatten(1)).argmin(1)]
        pulled = images + w * (nearest - images) if self.pull else images
        noise = torch.stack([self._noise(images.shape[1:], s + 7 * k) for k, s in enumerate(seeds)])
        return (pulled + w * noise).clamp(-1, 1)


class IgnorantGenerator(MemorizingGenerator):
    """A release whose generator ignores its training set: every caption draws a random image, and a variation is the
    image plus noise, with no pull toward any training image."""

    def __init__(self, images: Tensor, captions, noise: float = 0.1):
        super().__init__(images, captions, noise, pull=False)
        self.by_caption = {}


def pooled_embed(images):
    """A fixed stand-in for an image encoder: 4x4 average-pooled pixels, flattened ([N, 48])."""
    return torch.nn.functional.adaptive_avg_pool2d(images.float(), 4).flatten(1).numpy()


def image_samples(n, prefix, seed):
    """n query samples for black-box attacks: smooth random images [n,3,32,32] in [-1,1] with distinct captions
    (latents and conditions are zeros: a black-box attack must not read them)."""
    from privtune.eval.attacks import EncodedSamples

    g = torch.Generator().manual_seed(seed)
    pixels = (0.6 * torch.randn(n, 3, 8, 8, generator=g)).repeat_interleave(4, -2).repeat_interleave(4, -1).clamp(-1, 1)
    captions = [f"{prefix} portrait number {i}" for i in range(n)]
    return EncodedSamples(torch.zeros(n, 4, 8, 8), torch.zeros(n, 8, 16), [f"{prefix}{i}" for i in range(n)],
                          captions=captions, pixels=pixels)


class NoNoisePredictions:
    """A predictor that fails the test if called: what a black-box attack's target is given."""

    def __call__(self, x, t, cond):
        raise AssertionError("a black-box attack queried a noise prediction")


def blackbox_target(generator, alphas_cumprod=None, passes_per_image: int = 50):
    """A target exposing only a generation API over `generator` (no UNet, decoder or text encoder)."""
    from privtune.eval.attacks import AttackTarget
    from privtune.eval.generation import GenerationAPI

    api = GenerationAPI(generate=generator.generate, vary=generator.vary, embed=pooled_embed, encoder="pooled pixels",
                        passes_per_image=passes_per_image)
    alphas = torch.linspace(0.999, 0.01, 1000, dtype=torch.float64) if alphas_cumprod is None else alphas_cumprod
    return AttackTarget(NoNoisePredictions(), alphas, generation=api)
