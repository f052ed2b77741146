"""Wen, Liu, Chen & Lyu, "Detecting, Explaining, and Mitigating Memorization in Diffusion Models"
(ICLR 2024; code YuxinWenRick/diffusion_memorization); specs: defenses.md section 3, attacks.md 9.2.

The text-conditional noise magnitude ||eps(x_t, c) - eps(x_t, empty)||_2 (over the whole latent) is
large for memorized prompts: the prompt, not the noisy image, decides the prediction. Here:

* `magnitude`: the per-sample L2 norm of the guidance direction;
* `sampling_magnitudes`: the detection metric along a deterministic DDIM sampling trajectory with
  classifier-free guidance from seeded x_T (first step only, or every step);
* `optimize_prompt_embeds`: the inference-time mitigation: AdamW on the prompt embedding to lower the
  first-step magnitude, early-stopping at `target_loss`, BOS row and unconditional embedding fixed;
* `scaled_target`: the paper's absolute values (tau = 2 for the training filter, l_target = 3) are for
  SD v1.4's 4x64x64 latent; they are rescaled by sqrt(latent size / 16384) (the spec's first guess).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ..errors import ConfigError

SD_LATENT_NUMEL = 4 * 64 * 64


def magnitude(eps_cond: Tensor, eps_uncond: Tensor) -> Tensor:
    """||eps_c - eps_empty||_2 per sample, over the flattened latent: [B]."""
    return (eps_cond.float() - eps_uncond.float()).flatten(1).norm(dim=1)


def scaled_target(value_at_sd: float, latent_shape) -> float:
    """A threshold from the paper (SD v1.4, 4x64x64 latent) rescaled to another latent size."""
    return float(value_at_sd) * math.sqrt(math.prod(latent_shape) / SD_LATENT_NUMEL)


def sampling_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """A DDIM grid from the last training step down ("trailing" spacing): T-1, T-1-T/n, ..."""
    if not 1 <= steps <= num_train_timesteps:
        raise ConfigError(f"sampling steps must be in [1, {num_train_timesteps}] (got {steps})")
    stride = num_train_timesteps // steps
    return [num_train_timesteps - 1 - i * stride for i in range(steps)]


def sampling_magnitudes(predict: Callable[[Tensor, Tensor, Tensor], Tensor], x_T: Tensor, cond: Tensor, uncond: Tensor,
                        alphas_cumprod: Tensor, steps: int, record: int, guidance: float) -> Tensor:
    """Magnitudes [record, B] at the first `record` of `steps` DDIM steps of CFG sampling from x_T.

    `predict(x, t, c)` is an epsilon predictor; two calls (conditional, unconditional) per step.
    """
    from ..eval.primitives import transfer_with_eps

    grid = sampling_timesteps(len(alphas_cumprod), steps)
    b = x_T.shape[0]
    unc = uncond.expand(b, *uncond.shape[1:]).to(cond.dtype)
    x = x_T
    out = []
    for i, t in enumerate(grid[:record]):
        tt = torch.full((b,), t, dtype=torch.long, device=x.device)
        eps_c, eps_u = predict(x, tt, cond), predict(x, tt, unc)
        out.append(magnitude(eps_c, eps_u))
        if i + 1 < record:
            eps = eps_u + guidance * (eps_c - eps_u)
            nxt = torch.full((b,), grid[i + 1], dtype=torch.long, device=x.device)
            x = transfer_with_eps(x, eps, tt, nxt, alphas_cumprod)
    return torch.stack(out)


def optimize_prompt_embeds(unet, latents: Tensor, timestep: Tensor | int, prompt_embeds: Tensor, uncond_embeds: Tensor,
                           target_loss: float, lr: float = 0.05, iters: int = 10) -> tuple[Tensor, Tensor]:
    """Wen et al.'s inference-time mitigation on the first sampling step, one prompt per row.

    Minimises L_i(e_i) = ||eps(x_T,i, e_i) - eps(x_T,i, empty)||_2 with AdamW (lr 0.05), at most `iters`
    iterations; a row stops (and is frozen) as soon as L_i <= target_loss. The reference optimises one
    norm over the n images of a single prompt; rows here are independent prompts, so each has its own
    norm and its own early stop. The gradient of token 0 (BOS) is zeroed and weight decay is off, so BOS
    never changes; the unconditional embedding is a fixed input. Runs in float32; gradients reach only
    the embedding (never the UNet's .grad). Returns the optimised embeddings and the loss history
    [iterations + 1, B] (row 0 = the unoptimised losses).
    """
    if iters < 0 or lr <= 0:
        raise ConfigError(f"prompt optimisation needs iters >= 0 and lr > 0 (got {iters}, {lr})")
    b = latents.shape[0]
    dtype = next(unet.parameters()).dtype
    t = torch.as_tensor(timestep, device=latents.device).long().reshape(-1).expand(b)
    x = latents.to(dtype)
    with torch.no_grad():
        eps_u = unet(x, t, encoder_hidden_states=uncond_embeds.expand(b, *uncond_embeds.shape[1:]).to(dtype)).sample.float()
    emb = prompt_embeds.detach().float().clone().requires_grad_(True)
    opt = torch.optim.AdamW([emb], lr=lr, weight_decay=0.0)
    history = []
    active = torch.ones(b, dtype=torch.bool, device=emb.device)
    for i in range(iters + 1):
        eps_c = unet(x, t, encoder_hidden_states=emb.to(dtype)).sample.float()
        losses = (eps_c - eps_u).flatten(1).norm(dim=1)
        history.append(losses.detach().cpu())
        active = active & (losses.detach() > target_loss)
        if not active.any() or i == iters:
            break
        (grad,) = torch.autograd.grad((losses * active).sum(), [emb])
        grad[:, 0] = 0
        emb.grad = grad
        frozen = emb.detach()[~active].clone()
        opt.step()
        with torch.no_grad():
            emb[~active] = frozen
    return emb.detach().to(prompt_embeds.dtype), torch.stack(history)
