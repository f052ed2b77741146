"""What a defense cost: held-out denoising loss, prompt fidelity and a Frechet distance of generations.

Held-out loss works on any checkpoint. The generation metrics use a fixed, training-free feature
space (privtune.models.recognition: coarse pixels + a foreground colour histogram) suited to the
embedded 32x32 emoji set; for real checkpoints FID/KID/CLIP need Inception / CLIP weights, which
privtune never downloads, so the report says they were skipped and why.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import linalg

from ..models import recognition
from .attacks import EncodedSamples
from .primitives import single_step_loss, seeded_noise

LOSS_TIMESTEPS = (100, 300, 500, 700, 900)


@torch.no_grad()
def denoising_loss(predictor, samples: EncodedSamples, alphas_cumprod, seed: int = 0, batch_size: int = 32) -> float:
    """Mean per-entry epsilon MSE over fixed timesteps and per-sample seeded noise."""
    total, count = 0.0, 0
    for batch in samples.batches(batch_size):
        for t in LOSS_TIMESTEPS:
            noise = seeded_noise(tuple(batch.latents.shape[1:]), seed, f"utility-{t}", ids=batch.ids).to(batch.latents)
            loss = single_step_loss(predictor, batch.latents, t, noise, batch.cond, alphas_cumprod, reduction="mean")
            total += float(loss.sum())
            count += len(batch)
    return total / max(count, 1)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (the FID formula)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def generation_metrics(pipe, records, n: int, steps: int, guidance: float, seed: int = 0) -> dict:
    """Generate for the first n captions; fidelity = retrieval of each caption's own image, FD vs the real images."""
    chosen = records[:n]
    real = recognition.to_uint8([r.image.resize((pipe.unet.config.sample_size * pipe.vae_scale_factor,) * 2) for r in records])
    generated = recognition.generate(pipe, [r.caption for r in chosen], steps=steps, guidance=guidance, seed=seed)
    ranks = recognition.retrieval_ranks(recognition.features(generated), recognition.features(real), list(range(len(chosen))))
    fid = recognition.retrieval_scores(ranks, len(real))
    return {
        "prompt_fidelity_top10": fid["top10"],
        "prompt_fidelity_top10_chance": fid["top10_chance"],
        "frechet_distance": frechet_distance(recognition.features(generated), recognition.features(real[: len(chosen)])),
        "n_generations": len(chosen),
        "feature_space": "fixed: coarse RGB + foreground colour histogram (privtune.models.recognition)",
    }


def compute_utility(*, predictor, members: EncodedSamples, nonmembers: EncodedSamples, alphas_cumprod, pipe,
                    nonmember_records, eval_cfg, embedded: bool, seed: int = 0) -> dict:
    out = {
        "heldout_denoising_loss": denoising_loss(predictor, nonmembers, alphas_cumprod, seed),
        "member_denoising_loss": denoising_loss(predictor, members, alphas_cumprod, seed),
        "loss_timesteps": list(LOSS_TIMESTEPS),
    }
    out["generalization_gap"] = out["heldout_denoising_loss"] - out["member_denoising_loss"]
    if embedded and pipe is not None and nonmember_records:
        out.update(generation_metrics(pipe, nonmember_records, int(eval_cfg.utility_generations),
                                      int(eval_cfg.utility_inference_steps), float(eval_cfg.utility_guidance_scale), seed))
    elif not embedded:
        out["skipped"] = ("FID/KID and CLIP score need Inception and CLIP weights on disk; privtune never downloads "
                          "weights, so only the denoising losses are reported for this checkpoint")
    return out
