"""Memorized-prompt detection from cross-attention entropy, Ren et al., "Unveiling and Mitigating
Memorization in Text-to-Image Diffusion Models through Cross Attention" (ECCV 2024, arXiv 2403.11052);
spec: defenses.md §4.

The conditional-branch cross-attention probabilities are recorded by an explicit-softmax attention
processor (privtune.memorization.attention) during CFG sampling from a seeded x_T (shared by every
prompt), averaged over heads and queries into ā_{t,l}(j), and turned into the entropy
E_{t,l} = −Σ_j ā log ā. Memorized prompts spread attention over trigger tokens instead of the BOS
sink: higher entropy = memorized = member (score = raw).

* `ren` (mode E): E at the first sampling step in layer `layer` (the reference uses the 4th of SD1.x's
  16 cross-attention layers, index 3 in hook order; a small UNet has fewer, so it is a parameter);
  one conditional NFE per sample.
* `ren_trajectory` (mode D): per step, the mean over all layers of E_{t,l}; score =
  mean over the last `last` steps of E_t + (mean over the last steps of E^pad_t − E^pad at step 0),
  where E^pad is the same entropy sum restricted to positions j ≥ L − 1 (L = tokenised prompt length
  incl. BOS and the first EOS: the first EOS and the padding "summary" tokens), not renormalised.
  Needs the target's `token_lengths` by sample id; 2 NFE per step (spec: 50 steps, last 10).
"""

from __future__ import annotations

from typing import Any

import torch

from ...errors import ConfigError
from ...memorization.attention import check_layers, entropy, install_probe, partial_entropy
from ...memorization.wen import sampling_timesteps
from ..primitives import seeded_noise, transfer_with_eps
from .base import ATTACKS, Attack, base_predictor


def _unet(target):
    unet = getattr(base_predictor(target.predictor), "unet", None)
    if unet is None:
        raise ConfigError("Ren et al.'s attacks need a UNet-backed target (UNetPredictor) to record cross-attention")
    return unet


class _Probed:
    """Install the probe on the target's UNet for one batch; restore its processors afterwards."""

    def __init__(self, unet):
        self.unet = unet

    def __enter__(self):
        self.saved = dict(self.unet.attn_processors)
        self.probe = install_probe(self.unet)
        return self.probe

    def __exit__(self, *exc):
        self.unet.set_attn_processor(self.saved)


@ATTACKS.register("ren")
class RenAttack(Attack):
    name = "ren"
    statistic, members_lower = "cross-attention entropy", False

    def __init__(self, layer: int = 3, seed: int = 0):
        super().__init__(seed)
        self.layer = int(layer)

    def _first_step_probs(self, target, batch, probe) -> torch.Tensor:
        x0 = batch.latents
        x_T = seeded_noise(x0.shape[1:], self.seed, f"{self.name}/x_T", None, x0.device, x0.dtype).expand_as(x0)
        t = torch.full((len(x0),), len(target.alphas_cumprod) - 1, dtype=torch.long, device=x0.device)
        probe.recording = True
        target.predictor(x_T, t, batch.cond)
        probe.recording = False
        return probe.take(len(x0))

    def _score_batch(self, target, batch):
        with _Probed(_unet(target)) as probe:
            layer = check_layers([self.layer], probe)[0]
            raw = entropy(self._first_step_probs(target, batch, probe)[layer])
        return {"score": raw, "raw": raw}

    def params(self) -> dict[str, Any]:
        return {"mode": "E", "layer": self.layer, "step": "first", "seed": self.seed}


@ATTACKS.register("ren_trajectory")
class RenTrajectoryAttack(Attack):
    name = "ren_trajectory"
    statistic, members_lower = "cross-attention entropy score", False

    def __init__(self, steps: int = 50, last: int = 10, guidance: float = 7.5, seed: int = 0):
        super().__init__(seed)
        if not 1 <= int(last) <= int(steps):
            raise ConfigError(f"ren_trajectory needs 1 <= last <= steps (got last={last}, steps={steps})")
        self.steps, self.last, self.guidance = int(steps), int(last), float(guidance)

    def _score_batch(self, target, batch):
        if target.uncond is None or target.token_lengths is None:
            raise ConfigError("ren_trajectory needs the empty-prompt embedding and token lengths on the AttackTarget")
        missing = [i for i in batch.ids if i not in target.token_lengths]
        if missing:
            raise ConfigError(f"ren_trajectory: no token length for samples {missing[:3]}")
        x0 = batch.latents
        b = len(x0)
        start = torch.tensor([target.token_lengths[i] - 1 for i in batch.ids], device=x0.device)
        uncond = target.uncond.to(device=x0.device, dtype=batch.cond.dtype).expand(b, *target.uncond.shape[1:])
        grid = sampling_timesteps(len(target.alphas_cumprod), self.steps)
        x = seeded_noise(x0.shape[1:], self.seed, f"{self.name}/x_T", None, x0.device, x0.dtype).expand_as(x0)
        ent, pad = [], []
        with _Probed(_unet(target)) as probe:
            for i, t in enumerate(grid):
                tt = torch.full((b,), t, dtype=torch.long, device=x0.device)
                probe.recording = True
                eps_c = target.predictor(x, tt, batch.cond)
                probe.recording = False
                probs = probe.take(b)
                ent.append(entropy(probs).mean(0))
                pad.append(partial_entropy(probs, start).mean(0))
                if i + 1 < len(grid):
                    eps_u = target.predictor(x, tt, uncond)
                    eps = eps_u + self.guidance * (eps_c - eps_u)
                    nxt = torch.full((b,), grid[i + 1], dtype=torch.long, device=x0.device)
                    x = transfer_with_eps(x, eps, tt, nxt, target.alphas_cumprod)
        ent, pad = torch.stack(ent), torch.stack(pad)
        raw = ent[-self.last:].mean(0) + (pad[-self.last:].mean(0) - pad[0])
        return {"score": raw, "raw": raw}

    def params(self) -> dict[str, Any]:
        return {"mode": "D", "sampling_steps": self.steps, "last_steps": self.last, "guidance": self.guidance,
                "layers": "all (mean of per-layer entropies)", "padding_positions": "j >= L - 1", "seed": self.seed}
