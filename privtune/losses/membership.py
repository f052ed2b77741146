"""Loss terms of membership-privacy-preserving LoRA (Luo et al., "Privacy-Preserving Low-Rank Adaptation
against Membership Inference Attacks for Latent Diffusion Models", AAAI 2025, arXiv 2402.11989;
spec: defenses.md section 1).

- `loss_map`: the per-element squared noise-prediction error of each sample, the proxy attacker's input.
- `member_ce`: the attacker's cross-entropy when every row is labelled member (label 1).
- `mi_gain`: the attacker's log-likelihood of the true labels, G = -CE (<= 0; larger = stronger attack).
- `mp_objective`: MP-LoRA, L_ada - lambda * CE (unbounded below: the instability the paper reports; not clamped).
- `smp_objective`: SMP-LoRA, L_ada / (beta + lambda * CE + delta) (the reference code's form).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .denoising import add_noise_and_target

MEMBER = 1
NONMEMBER = 0


def loss_map(unet, noise_scheduler, latents: torch.Tensor, encoder_hidden_states: torch.Tensor,
             noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """(prediction - target)^2 per latent element, shape [B, C, H, W], in float32."""
    noisy, target = add_noise_and_target(noise_scheduler, latents, noise, timesteps)
    pred = unet(noisy, timesteps, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
    return (pred.float() - target.float()) ** 2


def member_ce(logits: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the attacker's logits [B, 2] against label 1 (member) for every row."""
    labels = torch.full((logits.shape[0],), MEMBER, dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits.float(), labels)


def mi_gain(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """G = mean log-likelihood of the true labels = -CE (0 for a perfect attacker, -log 2 at chance)."""
    return -F.cross_entropy(logits.float(), labels)


def mp_objective(l_ada: torch.Tensor, ce: torch.Tensor, lam: float) -> torch.Tensor:
    """MP-LoRA: L_ada - lambda * CE(h(l(x)), member)."""
    return l_ada - lam * ce


def smp_objective(l_ada: torch.Tensor, ce: torch.Tensor, lam: float, beta: float, delta: float) -> torch.Tensor:
    """SMP-LoRA: L_ada / (beta + lambda * CE(h(l(x)), member) + delta)."""
    return l_ada / (beta + lam * ce + delta)


OBJECTIVES = {"mp": mp_objective, "smp": smp_objective}
