"""Loss terms: the denoising loss every trainer uses, and each defense's extra term."""

from .denoising import add_noise_and_target, denoising_loss
from .membership import loss_map, member_ce, mi_gain, mp_objective, smp_objective

__all__ = ["add_noise_and_target", "denoising_loss", "loss_map", "member_ce", "mi_gain", "mp_objective", "smp_objective"]
