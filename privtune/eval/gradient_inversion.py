"""Gradient inversion of a shared LoRA update: GIDM and GIDM+ (Huang, Hong, Chen, Roos, arXiv 2405.20380).

Threat (specs/attacks.md section 10): an honest-but-curious server in federated fine-tuning knows the global
weights (base + current LoRA) and receives one client's LoRA gradient for a small batch; it reconstructs the
batch by gradient matching. privtune's version:

- **What is shared.** `client_update`: the mean denoising-loss gradient of the batch over the trainable LoRA
  tensors (plain federated LoRA), or DP-SGD's update of the same batch: every per-sample gradient clipped to
  norm C, summed, Gaussian noise N(0, (sigma C)^2 I) added, divided by the batch size (one draw of (t, eps) per
  sample, K = 1). The noise comes from OS entropy unless a generator is passed (tests, benchmarks).
- **What is reconstructed.** The batch's latents z0 (posterior mean x scaling factor, what the loss sees),
  decoded by the public VAE and scored against the decoded true latents (the VAE reconstruction: the best any
  attacker on this model can reach) with PSNR and SSIM (torchmetrics); the batch is matched to the truth by
  the assignment that maximises PSNR (a batch-mean gradient does not order its samples).
- **GIDM** knows each sample's (t, eps) and caption. **GIDM+** knows only the captions: eps is optimised
  jointly with z0 from an independent N(0, I) draw, and each sample's t is chosen by screening `t_candidates`
  values (a few iterations each, coordinate-wise, the lowest matching loss kept), never from the truth. The
  public code starts from the true noise and picks t through an argmax without gradient (attacks.md section
  14); neither is done here. The captions are given to both: an attacker gets every advantage the threat
  allows, and in federated text-to-image fine-tuning the prompts are often public or guessable.
- **Matching loss** D = sum over LoRA tensors of (1 - cos(grad_hat, grad)), by double backpropagation through
  the UNet, Adam on z0 (and eps). Deviation from the paper: no phase 1 through the sampler (the generative
  prior); the optimisation runs in latent space directly from N(0, I) latents, which the tiny UNet's 8x8x8
  latents allow. Cosine matching is invariant to the gradient's scale, so clipping alone does not protect:
  only the noise does, which is what the DP rows show.

The attention kernel is forced to the math backend while the attack runs: PyTorch's fused CPU attention has no
double backward.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch

from ..errors import ConfigError
from ..losses.denoising import denoising_loss

MODES = ("gidm", "gidm+")


@dataclass
class InversionConfig:
    """Attack settings; `check()` names the bad value and its fix."""

    mode: str = "gidm"              # gidm: (t, eps) known; gidm+: both unknown
    iterations: int = 300           # Adam steps of the final optimisation
    lr: float = 0.1                 # Adam learning rate on z0 (and eps)
    t_candidates: int = 5           # GIDM+: timesteps screened per sample
    screen_iterations: int = 25     # GIDM+: Adam steps per screened candidate
    seed: int = 0                   # the attacker's own initialisation (never the client's draws)

    def check(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"gradient inversion mode {self.mode!r} is not one of {', '.join(MODES)}")
        for key in ("iterations", "t_candidates", "screen_iterations"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"gradient inversion {key} must be >= 1 (got {getattr(self, key)})")
        if not self.lr > 0:
            raise ConfigError(f"gradient inversion lr must be > 0 (got {self.lr})")


@dataclass
class DPSetting:
    """How the client protects its update: clipping norm C (None = no clipping) and noise multiplier sigma."""

    name: str = "none"
    max_grad_norm: float | None = None
    noise_multiplier: float = 0.0
    epsilon: float | None = None

    def check(self) -> None:
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"{self.name}: max_grad_norm must be > 0 or None (got {self.max_grad_norm})")
        if self.noise_multiplier < 0 or (self.noise_multiplier > 0 and self.max_grad_norm is None):
            raise ConfigError(f"{self.name}: noise needs a clipping norm (sigma is relative to C), and sigma must be >= 0")


@contextmanager
def _math_attention():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


def lora_parameters(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The LoRA tensors the client trains (and shares gradients of), made trainable."""
    from ..models.methods import is_adapter_param

    params = [p for n, p in unet.named_parameters() if is_adapter_param(n)]
    if not params:
        raise ConfigError("the UNet has no LoRA tensors; load the run's lora/ folder before attacking its gradients")
    for p in params:
        p.requires_grad_(True)
    return params


def _grads(unet, scheduler, z0, states, noise, t, params, create_graph=False) -> list[torch.Tensor]:
    loss = denoising_loss(unet, scheduler, z0, states, noise, t).mean()
    return list(torch.autograd.grad(loss, params, create_graph=create_graph))


def client_update(unet, scheduler, z0, states, noise, t, params, dp: DPSetting | None = None,
                  generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """What the client shares for this batch: the mean gradient, or DP-SGD's clipped, noised mean."""
    dp = dp or DPSetting()
    dp.check()
    if dp.max_grad_norm is None:
        return [g.detach() for g in _grads(unet, scheduler, z0, states, noise, t, params)]
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(z0)):
        g = _grads(unet, scheduler, z0[i:i + 1], states[i:i + 1], noise[i:i + 1], t[i:i + 1], params)
        norm = torch.sqrt(sum((x.double() ** 2).sum() for x in g)).item()
        scale = min(1.0, dp.max_grad_norm / (norm + 1e-12))
        for acc, x in zip(total, g):
            acc.add_(x.detach() * scale)
    if dp.noise_multiplier > 0:
        gen = generator if generator is not None else torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))
        for acc in total:
            acc.add_(torch.randn(acc.shape, generator=gen) * dp.noise_multiplier * dp.max_grad_norm)
    return [acc / len(z0) for acc in total]


def match_loss(grads: Sequence[torch.Tensor], target: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum over tensors of 1 - cos(grad, target); tensors whose target is exactly zero are skipped."""
    terms = [1 - torch.nn.functional.cosine_similarity(g.flatten(), s.flatten(), dim=0, eps=1e-12)
             for g, s in zip(grads, target) if s.abs().sum() > 0]
    if not terms:
        raise ConfigError("the shared gradient is zero everywhere; nothing can be matched")
    return torch.stack(terms).sum()


def _optimise(unet, scheduler, states, target, params, z, eps, t, iterations, lr, learn_eps, bar: str | None = None) -> float:
    from tqdm.auto import tqdm

    leaves = [z, eps] if learn_eps else [z]
    opt = torch.optim.Adam(leaves, lr=lr)
    loss = torch.tensor(float("nan"))
    for _ in tqdm(range(iterations), desc=bar, disable=bar is None, leave=False, dynamic_ncols=True):
        opt.zero_grad()
        loss = match_loss(_grads(unet, scheduler, z, states, eps, t, params, create_graph=True), target)
        loss.backward()
        opt.step()
    return float(loss.detach())


def invert(unet, scheduler, states: torch.Tensor, target: Sequence[torch.Tensor], latent_shape, cfg: InversionConfig,
           noise: torch.Tensor | None = None, timesteps: torch.Tensor | None = None, bar: str | None = None) -> dict:
    """Reconstructed latents of a batch from its shared gradient. GIDM needs `noise` and `timesteps`; GIDM+
    ignores them. Returns latents, the noise / timesteps it used and the final matching loss."""
    cfg.check()
    params = lora_parameters(unet)
    b = len(states)
    gen = torch.Generator().manual_seed(cfg.seed)
    z = torch.randn((b, *latent_shape), generator=gen).requires_grad_(True)
    T = int(scheduler.config.num_train_timesteps)
    with _math_attention():
        if cfg.mode == "gidm":
            if noise is None or timesteps is None:
                raise ConfigError("GIDM needs the client's noise and timesteps; use mode=gidm+ when they are unknown")
            eps, t = noise.detach(), timesteps.detach().long()
            loss = _optimise(unet, scheduler, states, target, params, z, eps, t, cfg.iterations, cfg.lr, False, bar)
        else:
            eps = torch.randn((b, *latent_shape), generator=gen).requires_grad_(True)
            grid = torch.linspace(0, T - 1, cfg.t_candidates + 2)[1:-1].round().long()
            t = torch.full((b,), int(grid[len(grid) // 2]), dtype=torch.long)
            start_z, start_eps = z.detach().clone(), eps.detach().clone()
            screened = []
            for i in range(b):  # coordinate-wise: sample i's t screened with the others at their current choice
                best = (math.inf, int(t[i]))
                for cand in grid.tolist():
                    trial = t.clone()
                    trial[i] = cand
                    zi, ei = start_z.clone().requires_grad_(True), start_eps.clone().requires_grad_(True)
                    lval = _optimise(unet, scheduler, states, target, params, zi, ei, trial, cfg.screen_iterations, cfg.lr, True,
                                     None if bar is None else f"{bar}: screen t={cand} (sample {i})")
                    screened.append({"sample": i, "t": int(cand), "loss": lval})
                    best = min(best, (lval, int(cand)))
                t[i] = best[1]
            loss = _optimise(unet, scheduler, states, target, params, z, eps, t, cfg.iterations, cfg.lr, True, bar)
    out = {"latents": z.detach(), "noise": eps.detach(), "timesteps": t.detach(), "match_loss": loss}
    if cfg.mode == "gidm+":
        out["screened"] = screened
    return out


def image_scores(reconstructed: torch.Tensor, truth: torch.Tensor) -> dict:
    """PSNR / SSIM (torchmetrics, images in [0, 1], [B,3,H,W]) after the PSNR-maximising assignment."""
    from scipy.optimize import linear_sum_assignment
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    def psnr(a, b):
        return float(peak_signal_noise_ratio(a[None], b[None], data_range=1.0))

    table = np.array([[psnr(r, x) for x in truth] for r in reconstructed])
    rows, cols = linear_sum_assignment(-table)
    order = [int(r) for r in rows[np.argsort(cols)]]  # reconstruction assigned to truth j
    rec = reconstructed[order]
    ssim = [float(structural_similarity_index_measure(rec[j:j + 1], truth[j:j + 1], data_range=1.0, kernel_size=7))
            for j in range(len(truth))]
    psnrs = [table[order[j], j] for j in range(len(truth))]
    return {"psnr": float(np.mean(psnrs)), "ssim": float(np.mean(ssim)), "psnr_per_image": [float(x) for x in psnrs],
            "ssim_per_image": ssim, "assignment": order}


@dataclass
class InversionRow:
    """One attacked update: the defense, the attack mode, and how well the batch came back."""

    defense: dict
    mode: str
    psnr: float
    ssim: float
    match_loss: float
    chance_psnr: float
    chance_ssim: float
    seconds: float
    extra: dict = field(default_factory=dict)


def attack_batch(components, unet, z0: torch.Tensor, states: torch.Tensor, defenses: Sequence[DPSetting],
                 modes: Sequence[str] = ("gidm",), cfg: InversionConfig | None = None, seed: int = 0,
                 progress=None) -> tuple[list[InversionRow], dict]:
    """Every (defense, mode) pair against one batch whose (t, eps) are drawn here (seeded, like a client's step).
    Also returns the decoded truth and reconstructions, for a picture."""
    import time

    from .encode import decoder_fn

    cfg = cfg or InversionConfig()
    params = lora_parameters(unet)
    gen = torch.Generator().manual_seed(10_000 + seed)
    noise = torch.randn(z0.shape, generator=gen)
    T = int(components.noise_scheduler.config.num_train_timesteps)
    t = torch.randint(0, T, (len(z0),), generator=gen)
    decode = decoder_fn(components)

    def pixels(z):
        return ((decode(z) + 1) / 2).clamp(0, 1)

    truth = pixels(z0)
    chance = image_scores(pixels(torch.randn(z0.shape, generator=torch.Generator().manual_seed(cfg.seed))), truth)
    rows, images = [], {"truth": truth}
    for dp in defenses:
        shared = client_update(unet, components.noise_scheduler, z0, states, noise, t, params, dp,
                               generator=torch.Generator().manual_seed(20_000 + seed))
        for mode in modes:
            start = time.perf_counter()
            run = invert(unet, components.noise_scheduler, states, shared, z0.shape[1:], InversionConfig(**{**asdict(cfg), "mode": mode}),
                         noise=noise, timesteps=t, bar=f"{dp.name} / {mode}" if progress else None)
            rec = pixels(run["latents"])
            s = image_scores(rec, truth)
            extra = {"psnr_per_image": s["psnr_per_image"], "ssim_per_image": s["ssim_per_image"]}
            if mode == "gidm+":
                extra.update(true_t=t.tolist(), chosen_t=run["timesteps"].tolist(),
                             noise_cos=float(torch.nn.functional.cosine_similarity(run["noise"].flatten(), noise.flatten(), dim=0)))
            rows.append(InversionRow(asdict(dp), mode, s["psnr"], s["ssim"], run["match_loss"], chance["psnr"], chance["ssim"],
                                     round(time.perf_counter() - start, 1), extra))
            images[f"{dp.name}/{mode}"] = rec[s["assignment"]]
            if progress:
                progress(rows[-1])
    return rows, images


def calibrated_defenses(epsilons: Sequence[float], max_grad_norm: float, sample_rate: float, steps: int, delta: float,
                        accountant: str = "rdp") -> list[DPSetting]:
    """none, clip-only and one DP setting per epsilon, sigma calibrated (Opacus) for `steps` at `sample_rate`."""
    from ..privacy.accounting import _calibrated_sigma

    out = [DPSetting("none"), DPSetting("clip only", max_grad_norm, 0.0)]
    for e in epsilons:
        out.append(DPSetting(f"DP eps={e:g}", max_grad_norm, _calibrated_sigma(float(e), delta, sample_rate, int(steps), accountant),
                             float(e)))
    return out


def to_dict(rows: Sequence[InversionRow], settings: dict) -> dict:
    return {"method": "GIDM / GIDM+ gradient matching (Huang et al., arXiv 2405.20380), 1 - cos over LoRA tensors, "
                      "latent-space Adam; scored against the VAE reconstruction", "settings": settings,
            "rows": [asdict(r) for r in rows]}


def markdown_lines(result: dict) -> list[str]:
    s = result["settings"]
    lines = ["## Gradient inversion of a shared update (GIDM / GIDM+, Huang et al., arXiv 2405.20380)", "",
             f"A server that sees one client's LoRA gradient for a batch of {s.get('batch')} members (and knows the global "
             "weights and the captions) reconstructs the images by gradient matching. PSNR / SSIM against the VAE "
             "reconstruction of each image (higher = more recovered); chance = a random latent decoded.", "",
             "| shared update | attack | PSNR (dB) | SSIM | chance PSNR | chance SSIM | matching loss | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        d = r["defense"]
        what = d["name"] + (f" (C={d['max_grad_norm']:g}, sigma={d['noise_multiplier']:.3g})" if d.get("max_grad_norm") else "")
        lines.append(f"| {what} | {r['mode'].upper()} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['chance_psnr']:.2f} | "
                     f"{r['chance_ssim']:.3f} | {r['match_loss']:.3f} | {r['seconds']:.0f} |")
    return lines


def card_line(result: dict) -> str:
    """What a gradient-inversion attacker recovers from this run's own update (its DP step, else the plain update),
    under the mode that recovers most."""
    rows = result["rows"]
    mine = [r for r in rows if r["defense"]["name"] == result["settings"].get("own")] or rows[:1]
    own = max(mine, key=lambda r: r["psnr"])  # the strongest attack mode on the run's own update
    d = own["defense"]
    if d.get("noise_multiplier"):
        how = f"clipped to C={d['max_grad_norm']:g} and noised at sigma={d['noise_multiplier']:.3g}" + \
            (f" (epsilon {float(d['epsilon']):.3g})" if d.get("epsilon") is not None else "")
    elif d.get("max_grad_norm"):
        how = f"clipped to C={d['max_grad_norm']:g}, no noise"
    else:
        how = "shared as is, no clipping or noise"
    return (f"Gradient inversion ({own['mode'].upper()}): from one shared update of {result['settings'].get('batch')} "
            f"images, {how}, a server reconstructs them at PSNR {own['psnr']:.1f} dB / SSIM "
            f"{own['ssim']:.2f} (chance {own['chance_psnr']:.1f} dB / {own['chance_ssim']:.2f}).")
