"""SIDE: surrogate-conditional extraction of Chen, Wang, Zou, Ma, "Extracting Training Data from Unconditional
Diffusion Models" (arXiv 2410.02467); specs/attacks.md 9.3 and the SIDE row of section 14.

The model is sampled unconditionally (the empty caption's state for a text-to-image model). (a) A pool of
`pool` generations (their final latents kept); (b) each is embedded (decoded pixels or latents) and k-means
(scikit-learn) splits them into `clusters` surrogate conditions; (c) a time-dependent classifier
p_phi(y | x_t, t) is trained on noisy latents add_noise(z0, eps, t) of the pool at random t (the paper's
time-dependent knowledge distillation); (d) each cluster y is sampled by classifier-guided DDIM,
eps~ = eps_theta(x_t, t) - s * sigma_t * grad log p_phi(y | x_t, t); (e) every decoded generation is confirmed
as in Carlini et al.'s path (privtune.eval.extraction): an extraction is a generation within tiled l2 `delta`
of a member's reference image (the VAE reconstruction). UMS-like = unique members extracted, AMS-like =
matched generations. (f) Budget: the pool counts toward SIDE's `generations`; unguided sampling gets the same
number of generations (`generations - pool` are guided, split evenly over the clusters).

A standalone function (`run_side`, model-agnostic over a noise predictor and a decoder; `side_on_pipeline`
for a privtune model); no schema section.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.similarity import check_tiles, tiled_l2_matrix
from ..errors import ConfigError
from .primitives import add_noise

EMBEDDINGS = ("pixels", "latents")


@dataclass
class SideConfig:
    generations: int = 64        # total generations of each arm (SIDE's pool counts toward it)
    pool: int = 32               # unguided pool clustered into surrogate conditions
    clusters: int = 4            # k-means clusters = surrogate conditions
    embedding: str = "pixels"    # what k-means clusters: decoded pixels or final latents
    guidance: float = 3.0        # classifier guidance scale s
    steps: int = 20              # DDIM steps per generation
    classifier_steps: int = 400  # optimiser steps of the time-dependent classifier
    hidden: int = 128            # classifier MLP width
    delta: float = 0.1           # tiled-l2 threshold of a confirmed extraction
    tiles: int = 4
    batch_size: int = 64
    seed: int = 0

    def check(self, resolution: int | None = None) -> None:
        for key in ("generations", "pool", "clusters", "steps", "classifier_steps", "hidden", "batch_size"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"side.{key} must be >= 1 (got {getattr(self, key)})")
        if self.clusters < 2 or self.clusters > self.pool:
            raise ConfigError(f"side.clusters={self.clusters} must be in [2, side.pool={self.pool}]: k-means needs at least "
                              "one pool sample per cluster")
        if self.pool >= self.generations:
            raise ConfigError(f"side.pool={self.pool} must be < side.generations={self.generations}: the pool counts toward "
                              "the budget and guided sampling needs the rest")
        if self.embedding not in EMBEDDINGS:
            raise ConfigError(f"side.embedding={self.embedding!r} is not one of {', '.join(EMBEDDINGS)}")
        if not self.guidance >= 0:
            raise ConfigError(f"side.guidance={self.guidance} must be >= 0 (0 = unguided)")
        if not 0.0 < self.delta <= 1.0:
            raise ConfigError(f"side.delta={self.delta} is outside (0, 1] (tiled l2 on [0, 1] pixels)")
        if resolution is not None:
            check_tiles(int(resolution), int(self.tiles))


class TimeClassifier(nn.Module):
    """p_phi(y | x_t, t): an MLP on the flattened latent concatenated with a sinusoidal timestep embedding."""

    def __init__(self, dim: int, classes: int, hidden: int = 128, t_dim: int = 32, T: int = 1000):
        super().__init__()
        self.t_dim, self.T = t_dim, T
        self.net = nn.Sequential(nn.Linear(dim + t_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, classes))

    def embed_t(self, t: torch.Tensor) -> torch.Tensor:
        half = self.t_dim // 2
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device) / half)
        a = t.float()[:, None] * freqs[None]
        return torch.cat([a.sin(), a.cos()], 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x.flatten(1), self.embed_t(t)], 1))


def train_time_classifier(z0: torch.Tensor, labels: np.ndarray, alphas: torch.Tensor, *, steps: int, hidden: int,
                          seed: int, batch_size: int = 64, progress: bool = False) -> TimeClassifier:
    """Fit p_phi(y | x_t, t) on x_t = add_noise(z0, eps, t) at uniform random t, classes drawn balanced."""
    g = torch.Generator().manual_seed(seed)
    y = torch.as_tensor(labels, dtype=torch.long)
    k = int(y.max()) + 1
    with torch.random.fork_rng(devices=[]):  # the initial weights from `seed` too, not from the global stream
        torch.manual_seed(seed)
        model = TimeClassifier(z0[0].numel(), k, hidden, T=len(alphas))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    weights = (1.0 / torch.bincount(y, minlength=k).float())[y]
    z0 = z0.float()
    for _ in tqdm(range(steps), desc="side classifier", disable=not progress, dynamic_ncols=True):
        idx = torch.multinomial(weights, batch_size, replacement=True, generator=g)
        t = torch.randint(0, len(alphas), (batch_size,), generator=g)
        xt = add_noise(z0[idx], torch.randn(z0[idx].shape, generator=g), t, alphas)
        loss = nn.functional.cross_entropy(model(xt, t), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def ddim_sample(predictor, cond: torch.Tensor, alphas: torch.Tensor, noise: torch.Tensor, steps: int,
                classifier: TimeClassifier | None = None, label: int = 0, guidance: float = 0.0) -> torch.Tensor:
    """Deterministic DDIM from pure noise to x0 (eta 0), optionally classifier-guided towards `label`."""
    T = len(alphas)
    grid = np.linspace(T - 1, 0, steps).round().astype(int)
    x = noise.float()
    ac = alphas.to(torch.float64)
    for i, s in enumerate(grid):
        t = torch.full((len(x),), int(s), dtype=torch.long)
        eps = predictor(x, t, cond.expand(len(x), *cond.shape[1:])).float()
        a, sig = float(ac[s].sqrt()), float((1 - ac[s]).sqrt())
        if classifier is not None and guidance > 0:
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                logp = torch.log_softmax(classifier(xg, t), 1)[:, label].sum()
                grad = torch.autograd.grad(logp, xg)[0]
            eps = eps - guidance * sig * grad
        x0 = (x - sig * eps) / a
        if i == len(grid) - 1:
            return x0
        n = int(grid[i + 1])
        x = float(ac[n].sqrt()) * x0 + float((1 - ac[n]).sqrt()) * eps
    return x


def confirm(pixels: np.ndarray, references: np.ndarray, member_ids, delta: float, tiles: int) -> dict:
    """Carlini-style confirmation: each generation's nearest member under tiled l2, matched when <= delta."""
    d = tiled_l2_matrix(pixels, references, tiles)
    near, dist = d.argmin(1), d.min(1)
    hit = dist <= delta
    ids = sorted({member_ids[j] for j in near[hit]})
    return {"generations": int(len(pixels)), "matched_generations": int(hit.sum()), "unique_members": len(ids),
            "extracted_members": ids}


def run_side(predictor, alphas: torch.Tensor, cond: torch.Tensor, decode, references: np.ndarray, member_ids,
             latent_shape, cfg: SideConfig, progress: bool = True) -> dict:
    """SIDE vs unguided sampling at equal generations. `decode`: latents -> [N, H, W, 3] pixels in [0, 1];
    `references`: the members' reference pixels (same shape), `member_ids` their ids."""
    cfg.check(references.shape[1])
    from sklearn.cluster import KMeans

    def noise(stream: int, n: int) -> torch.Tensor:
        return torch.randn((n, *latent_shape), generator=torch.Generator().manual_seed(cfg.seed * 1000 + stream))

    def sample(stream, n, **guide):
        z = noise(stream, n)
        return torch.cat([ddim_sample(predictor, cond, alphas, z[lo:lo + cfg.batch_size], cfg.steps, **guide)
                          for lo in range(0, n, cfg.batch_size)])

    start = time.perf_counter()
    unguided = sample(1, cfg.generations)
    unguided_s = time.perf_counter() - start
    start = time.perf_counter()
    pool = sample(2, cfg.pool)
    pool_px = decode(pool)
    emb = pool_px.reshape(len(pool), -1) if cfg.embedding == "pixels" else pool.flatten(1).numpy()
    labels = KMeans(cfg.clusters, n_init=10, random_state=cfg.seed).fit_predict(emb)
    clf = train_time_classifier(pool, labels, alphas, steps=cfg.classifier_steps, hidden=cfg.hidden, seed=cfg.seed,
                                progress=progress)
    guided_n = cfg.generations - cfg.pool
    per = [guided_n // cfg.clusters + (y < guided_n % cfg.clusters) for y in range(cfg.clusters)]
    guided = [sample(10 + y, n, classifier=clf, label=y, guidance=cfg.guidance)
              for y, n in tqdm(list(enumerate(per)), desc="side guided", disable=not progress) if n > 0]
    side_px = np.concatenate([pool_px, decode(torch.cat(guided))])
    side_s = time.perf_counter() - start
    ref = np.asarray(references, np.float32)
    out_side = {**confirm(side_px, ref, list(member_ids), cfg.delta, cfg.tiles), "seconds": round(side_s, 2),
                "pool": cfg.pool, "guided": guided_n, "cluster_sizes": np.bincount(labels, minlength=cfg.clusters).tolist()}
    out_ung = {**confirm(decode(unguided), ref, list(member_ids), cfg.delta, cfg.tiles), "seconds": round(unguided_s, 2)}
    return {"method": "SIDE (Chen et al. 2024): k-means surrogate conditions + time-dependent classifier guidance, "
                      "tiled-l2 confirmation against the members' references",
            "budget": "equal generations per arm; SIDE's pool counts toward its budget",
            "settings": asdict(cfg), "n_members": len(member_ids), "side": out_side, "unguided": out_ung}


def side_on_pipeline(components, unet, members, cfg: SideConfig, resolution: int, progress: bool = True, prompt: str = "") -> dict:
    """SIDE on a privtune model (base + LoRA UNet), sampled under one fixed `prompt` (default the empty caption: the
    model as an unconditional one), the members' VAE reconstructions as references."""
    from .encode import decoder_fn, text_encoder_fn
    from .extraction import autoencoded
    from .primitives import UNetPredictor
    from .stage import pipeline_for

    device = next(unet.parameters()).device
    dec = decoder_fn(components)
    refs = autoencoded(pipeline_for(components, unet), [r.image for r in members], resolution)
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)

    def decode(z):
        return ((dec(z.to(device)) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()

    alphas = components.noise_scheduler.alphas_cumprod.to(torch.float64)
    cond = text_encoder_fn(components, device)([prompt]).cpu()
    return run_side(UNetPredictor(unet), alphas, cond, decode, refs,
                    [r.id for r in members], shape, cfg, progress)


def markdown_lines(result: dict) -> list[str]:
    s, u = result["side"], result["unguided"]
    return ["| arm | generations | unique members extracted | matched generations | seconds |", "|---|---|---|---|---|",
            f"| SIDE (pool {s['pool']} + guided {s['guided']}) | {s['generations']} | {s['unique_members']} | "
            f"{s['matched_generations']} | {s['seconds']} |",
            f"| unguided | {u['generations']} | {u['unique_members']} | {u['matched_generations']} | {u['seconds']} |",
            f"Budget: {result['budget']}; tiled l2 <= {result['settings']['delta']}."]


def card_line(result: dict) -> str:
    s, u = result["side"], result["unguided"]
    return (f"SIDE extraction: {s['unique_members']} unique members of {result['n_members']} extracted "
            f"({s['matched_generations']} matched generations) vs {u['unique_members']} unguided, "
            f"{s['generations']} generations each")
