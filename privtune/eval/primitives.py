"""Noise-predictor primitives shared by every gray-box attack: the predictor protocol, a UNet
wrapper with optional classifier-free guidance, an NFE counter, the deterministic DDIM transfer
Φ of specs/attacks.md §0.2, the single-step diffusion loss, and seeded noise that depends only on
(seed, sample id, draw), never on batching or sharding.

All functions are batched over samples. `alphas_cumprod` is the 1-D tensor ᾱ_t (length T) of the
target's own scheduler; coefficients are computed in float64 and cast to the data's dtype.
"""

from __future__ import annotations

import hashlib
from typing import Protocol, Sequence, Union

import torch
from torch import Tensor

from ..errors import ConfigError

Timestep = Union[int, Tensor]


class NoisePredictor(Protocol):
    """ε-prediction: (x [B,C,H,W], t LongTensor [B], cond [B,L,D]) -> ε [B,C,H,W]."""

    def __call__(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor: ...


class UNetPredictor:
    """Wraps a diffusers UNet2DConditionModel as a NoisePredictor, without gradients.

    Inputs are cast to the UNet's device and dtype and the output back to x's. With
    `guidance_scale != 1` each call evaluates the conditional and unconditional branch in one
    doubled batch (2 NFE per row) and returns ε_∅ + w (ε_c − ε_∅); `uncond` [1,L,D] is the
    empty-prompt embedding.
    """

    def __init__(self, unet: torch.nn.Module, guidance_scale: float = 1.0, uncond: Tensor | None = None):
        if guidance_scale != 1.0 and uncond is None:
            raise ConfigError("guidance_scale != 1 needs the unconditional embedding `uncond` [1,L,D]")
        self.unet = unet
        self.guidance_scale = float(guidance_scale)
        self.uncond = uncond
        self.nfe_per_call = 1 if self.guidance_scale == 1.0 else 2

    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        p = next(self.unet.parameters())
        return p.device, p.dtype

    @torch.no_grad()
    def __call__(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        device, dtype = self._device_dtype()
        xin = x.to(device=device, dtype=dtype)
        tin = t.to(device=device)
        cin = cond.to(device=device, dtype=dtype)
        if self.nfe_per_call == 1:
            eps = self.unet(xin, tin, encoder_hidden_states=cin).sample
        else:
            unc = self.uncond.to(device=device, dtype=dtype).expand(x.shape[0], *self.uncond.shape[1:])
            out = self.unet(
                torch.cat([xin, xin]), torch.cat([tin, tin]), encoder_hidden_states=torch.cat([unc, cin])
            ).sample
            eps_u, eps_c = out.chunk(2)
            eps = eps_u + self.guidance_scale * (eps_c - eps_u)
        return eps.to(device=x.device, dtype=x.dtype)


class NFECounter:
    """Counts UNet evaluations: each call adds batch rows × the wrapped predictor's `nfe_per_call`
    (1 unless it says otherwise, 2 under CFG). Read `.total`, `.per_sample(n)`; `.reset()` between runs.
    """

    def __init__(self, predictor: NoisePredictor):
        self.predictor = predictor
        self.nfe_per_call = getattr(predictor, "nfe_per_call", 1)
        self.total = 0

    def __call__(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        self.total += int(x.shape[0]) * self.nfe_per_call
        return self.predictor(x, t, cond)

    def reset(self) -> None:
        self.total = 0

    def per_sample(self, n_samples: int) -> float:
        return self.total / max(int(n_samples), 1)


def as_timesteps(t: Timestep, batch: int, device: torch.device) -> Tensor:
    """An int or a [B] tensor -> LongTensor [B] on `device`."""
    if isinstance(t, Tensor):
        t = t.to(device=device, dtype=torch.long).reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch)
        if t.numel() != batch:
            raise ConfigError(f"got {t.numel()} timesteps for a batch of {batch}")
        return t
    return torch.full((batch,), int(t), dtype=torch.long, device=device)


def _schedule(alphas_cumprod: Tensor, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """(sqrt(ᾱ_t), σ_t) in float64, shaped [B,1,...] to broadcast over `like`."""
    ac = alphas_cumprod.to(device=t.device, dtype=torch.float64)[t]
    shape = (-1,) + (1,) * (like.dim() - 1)
    return ac.sqrt().reshape(shape), (1.0 - ac).sqrt().reshape(shape)


def ddim_transfer(
    predictor: NoisePredictor,
    x: Tensor,
    s: Timestep,
    s_next: Timestep,
    cond: Tensor,
    alphas_cumprod: Tensor,
) -> Tensor:
    """Deterministic DDIM step Φ(x, s→s_next), one NFE at the source step s; inversion when
    s_next > s, denoising when s_next < s. Written as x' = r·x + (σ' − r·σ)·ε with
    r = sqrt(ᾱ')/sqrt(ᾱ), which equals sqrt(ᾱ')·x̂0 + σ'·ε and is exactly x when s_next == s.
    """
    b = x.shape[0]
    s = as_timesteps(s, b, x.device)
    s_next = as_timesteps(s_next, b, x.device)
    eps = predictor(x, s, cond)
    return transfer_with_eps(x, eps, s, s_next, alphas_cumprod)


def transfer_with_eps(x: Tensor, eps: Tensor, s: Tensor, s_next: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Φ's update for a given ε (no NFE); `s`, `s_next` are LongTensors [B]."""
    a, sig = _schedule(alphas_cumprod, s, x)
    a2, sig2 = _schedule(alphas_cumprod, s_next, x)
    r = a2 / a
    return (r.to(x.dtype) * x + (sig2 - r * sig).to(x.dtype) * eps.to(x.dtype))


def ddim_trajectory(
    predictor: NoisePredictor,
    x: Tensor,
    t_from: int,
    t_to: int,
    stride: int,
    cond: Tensor,
    alphas_cumprod: Tensor,
) -> Tensor:
    """Runs Φ from t_from to t_to in steps of `stride` (either direction); |t_to − t_from|/stride NFE."""
    if stride <= 0 or (t_to - t_from) % stride:
        raise ConfigError(f"stride {stride} must be positive and divide t_to - t_from = {t_to - t_from}")
    step = stride if t_to >= t_from else -stride
    for s in range(t_from, t_to, step):
        x = ddim_transfer(predictor, x, s, s + step, cond, alphas_cumprod)
    return x


def ddim_invert(
    predictor: NoisePredictor, x0: Tensor, t: int, stride: int, cond: Tensor, alphas_cumprod: Tensor
) -> Tensor:
    """DDIM inversion of clean x0 (taken as step 0) to step t with stride k: t/k NFE."""
    return ddim_trajectory(predictor, x0, 0, t, stride, cond, alphas_cumprod)


def add_noise(x0: Tensor, noise: Tensor, t: Timestep, alphas_cumprod: Tensor) -> Tensor:
    """q(x_t | x0): sqrt(ᾱ_t)·x0 + σ_t·noise."""
    tt = as_timesteps(t, x0.shape[0], x0.device)
    a, sig = _schedule(alphas_cumprod, tt, x0)
    return a.to(x0.dtype) * x0 + sig.to(x0.dtype) * noise.to(x0.dtype)


def single_step_loss(
    predictor: NoisePredictor,
    x0: Tensor,
    t: Timestep,
    noise: Tensor,
    cond: Tensor,
    alphas_cumprod: Tensor,
    reduction: str = "sum",
) -> Tensor:
    """Per-sample diffusion loss ‖noise − ε_θ(x_t, t, c)‖² (sum or mean over entries); one NFE."""
    if reduction not in ("sum", "mean"):
        raise ConfigError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    tt = as_timesteps(t, x0.shape[0], x0.device)
    eps = predictor(add_noise(x0, noise, tt, alphas_cumprod), tt, cond)
    sq = (noise.to(eps.dtype) - eps).float().pow(2).flatten(1)
    return sq.sum(1) if reduction == "sum" else sq.mean(1)


def sample_seed(seed: int, sample_id: str, stream: str) -> int:
    """A 63-bit generator seed from (seed, sample id, stream name), stable across processes."""
    digest = hashlib.blake2b(f"{seed}\x1f{sample_id}\x1f{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def seeded_noise(
    shape: Sequence[int],
    seed: int,
    stream: str,
    ids: Sequence[str] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal noise [len(ids), *shape] that depends only on (seed, id, stream).

    With `ids=None` one tensor of `shape` is drawn from (seed, stream) alone: the same noise for
    every sample (common random numbers, shared by members and non-members). Drawn on the CPU so
    results do not depend on the device.
    """
    if ids is None:
        g = torch.Generator().manual_seed(sample_seed(seed, "", stream))
        return torch.randn(tuple(shape), generator=g).to(device=device, dtype=dtype)
    out = torch.empty((len(ids), *shape))
    g = torch.Generator()
    for i, sid in enumerate(ids):
        g.manual_seed(sample_seed(seed, sid, stream))
        out[i] = torch.randn(tuple(shape), generator=g)
    return out.to(device=device, dtype=dtype)
