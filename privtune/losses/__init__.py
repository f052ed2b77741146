"""Loss terms: the denoising loss every trainer uses, and each defense's extra term."""

from .denoising import add_noise_and_target, denoising_loss

__all__ = ["add_noise_and_target", "denoising_loss"]
