"""The latent-diffusion denoising loss (Ho et al. 2020; Rombach et al. 2022), per sample.

Returned per sample (mean over latent entries) so that defenses can weight, filter or clip
individual examples before the batch mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def add_noise_and_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
    """Forward-noise `latents` at `timesteps`; return (noisy latents, regression target)."""
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction_type {kind!r} (epsilon or v_prediction)")
    return noisy, target


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al., "Efficient Diffusion Training via Min-SNR Weighting Strategy", ICCV
    2023), one per sample: min(SNR_t, gamma) / SNR_t for epsilon prediction, min(SNR_t, gamma) / (SNR_t + 1) for
    v-prediction (its loss already carries SNR_t + 1); SNR from diffusers' `compute_snr`."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps).float()
    clipped = torch.clamp(snr, max=float(gamma))
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return clipped / snr
    if kind == "v_prediction":
        return clipped / (snr + 1)
    raise ValueError(f"min-SNR weighting supports epsilon and v_prediction, not {kind!r}")


def denoising_loss(unet, noise_scheduler, latents: torch.Tensor, encoder_hidden_states: torch.Tensor,
                   noise: torch.Tensor, timesteps: torch.Tensor, return_pred: bool = False, snr_gamma: float | None = None):
    """Per-sample MSE between the UNet's prediction and its target, shape [B] (times its min-SNR weight with
    `snr_gamma`); with `return_pred`, also the prediction and the noisy latents (for filters that inspect them,
    e.g. Wen et al.'s)."""
    noisy, target = add_noise_and_target(noise_scheduler, latents, noise, timesteps)
    pred = unet(noisy, timesteps, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.ndim)))
    if snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(noise_scheduler, timesteps, snr_gamma).to(per_sample.device)
    return (per_sample, pred, noisy) if return_pred else per_sample
