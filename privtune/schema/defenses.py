"""The defenses' own sections (dp:, mp:, dualmd:, distill:), each present only in the recipes that declare it.

Their defaults are the values of the recipe that introduces the section (dpsgd.yaml, mp_lora.yaml, dualmd.yaml,
distillmd.yaml); an interpolation default such as `${train.max_steps}` is resolved like any recipe value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Union

from ..errors import ConfigError
from ..privacy.accounting import ACCOUNTANTS
from .base import Section, option

TRAIN_TIMESTEPS = 1000  # num_train_timesteps of every SD scheduler (the model is not loaded when the config is)
SEED_LIMIT = 2 ** 63
EMPTY_ATTACKER_SPLIT = "the proxy attacker's split would be empty and it could not be trained; the recipe default is 32"


@dataclass
class DP(Section):
    target_epsilon: Optional[float] = option(10.0, "calibrate the noise to spend at most this epsilon over train.max_steps; "
                                                   "null = report the epsilon of dp.noise_multiplier")
    delta: Optional[float] = option(None, "null = 1 / (10 N); must be < 1 / N")
    noise_multiplier: Optional[float] = option(None, "set instead of (or as well as, then target_epsilon caps it) target_epsilon")
    max_grad_norm: float = option(0.05, "per-example clipping norm C (DP-LDM uses a tiny C: clipping acts as normalisation); "
                                        ".inf = no clipping")
    grad_sample: str = option("hooks", "hooks (Opacus per-layer formulas, fastest here) | functorch (Opacus, vmap per layer) "
                                       "| vmap (torch.func over the whole UNet: every lora.method, DoRA / LoKr / LoHa too)",
                              choices=("hooks", "functorch", "vmap"))
    noise_multiplicity: int = option(8, "K (timestep, noise) draws averaged per example before clipping (DPDM)")
    accountant: str = option("rdp", "rdp | prv | gdp (Opacus accountants)", choices=ACCOUNTANTS)
    poisson: bool = option(True, "Poisson sampling: true DP batches of variable size")
    noise_seed: Optional[int] = option(None, "null = a secret seed from OS entropy for the Gaussian noise (kept only in "
                                             "checkpoints/); a fixed seed is written to config.yaml and voids the guarantee")
    sampling_seed: Optional[int] = option(None, "null = a secret seed from OS entropy for the Poisson batches and their flips; "
                                                "a fixed seed reveals every batch (no amplification by subsampling)")

    def check(self) -> None:
        self.require(self.target_epsilon is None or 0 < self.target_epsilon < math.inf, "target_epsilon", "> 0 and finite")
        self.within("delta", 0, 1, "()")
        self.require(self.noise_multiplier is None or 0 <= self.noise_multiplier < math.inf, "noise_multiplier",
                     "a finite number >= 0")
        self.require(self.max_grad_norm > 0, "max_grad_norm", "> 0", ".inf disables clipping")
        if math.isinf(self.max_grad_norm) and self.noise_multiplier != 0:
            raise ConfigError("dp.max_grad_norm=inf (no clipping) has unbounded sensitivity: it only works with "
                              "dp.noise_multiplier=0 and dp.target_epsilon=null, i.e. non-private training")
        if self.target_epsilon is None and self.noise_multiplier is None:
            raise ConfigError("set dp.target_epsilon (sigma is calibrated) or dp.noise_multiplier (epsilon is only reported)")
        self.at_least(1, "noise_multiplicity")
        for name in ("noise_seed", "sampling_seed"):
            value = getattr(self, name)
            self.require(value is None or 0 <= value < SEED_LIMIT, name,
                         "null (a secret seed from OS entropy) or an integer in [0, 2**63)")


@dataclass
class MP(Section):
    lambda_: float = option(1.0, "trade-off lambda (param_alpha in the reference code; the paper: 1); 0 = plain LoRA",
                            key="lambda")
    beta: float = option(1.0, "SMP-LoRA only: denominator offset beta (the paper: 1)")
    delta: float = option(1.0e-5, "SMP-LoRA only: denominator epsilon delta (the paper: 1e-5)")
    attacker_nonmembers: int = option(32, "D_aux^nm: local non-members (the paper: 200), drawn outside the evaluation split")
    attacker_batch_size: Optional[int] = option(None, "rows per side per attacker step; null = train.batch_size (the paper: 1 + 1)")
    attacker_lr: float = option(1.0e-4, "Adam lr of the attacker (10x the paper's 1e-5, which trains ~173k steps)")
    attacker_weight_decay: float = option(1.0e-4, "Adam weight decay of the attacker (the paper: 1e-4)")
    attacker_hidden: List[int] = option([512, 256], "attacker MLP widths (the paper: latent C*H*W -> 512 -> 256 -> 2)")
    attacker_dropout: float = option(0.5, "dropout after each hidden layer of the attacker (the paper: 0.5)")
    lora_steps: int = option(1, "LoRA updates per step, attacker frozen (the paper: 1)")
    attacker_steps: int = option(1, "attacker updates per step, UNet frozen (the paper's k_steps = 1)")
    proxy_timesteps: Optional[Union[int, List[int]]] = option(
        None, "null = one random t per row (the paper); a list (e.g. [100]) = the attack features are the loss maps at "
              "these fixed t, each averaged over proxy_draws noises")
    proxy_draws: int = option(1, "noise draws averaged per listed timestep (only with proxy_timesteps)")
    cap_at_chance: bool = option(False, "true: each training row's attack CE counts up to log 2 only (no reward for pushing a "
                                        "member past chance); false = the paper")
    privacy_gradient_scale: float = option(1.0, "multiplies the attack term's gradient (value unchanged); 1 = the paper's objective")
    shared_forward: bool = option(False, "true reuses L_ada's (t, eps) draw for the attack term (cheaper; the paper draws twice)")

    def check(self) -> None:
        self.require(math.isfinite(self.lambda_) and self.lambda_ >= 0, "lambda_", "a finite number >= 0",
                     "0 trains plain LoRA, 1 is the paper's value")
        self.require(self.attacker_nonmembers >= 1, "attacker_nonmembers", ">= 1", EMPTY_ATTACKER_SPLIT)
        self.at_least(1, "attacker_batch_size", "lora_steps", "attacker_steps", "proxy_draws")
        self.positive("attacker_lr")
        self.at_least(0, "attacker_weight_decay")
        self.within("attacker_dropout", 0, 1, "[)")
        self.require(bool(self.attacker_hidden) and min(self.attacker_hidden) >= 1, "attacker_hidden",
                     "a non-empty list of layer widths >= 1")
        if self.proxy_timesteps is not None:
            listed = [self.proxy_timesteps] if isinstance(self.proxy_timesteps, int) else self.proxy_timesteps
            self.require(bool(listed) and all(0 <= t < TRAIN_TIMESTEPS for t in listed), "proxy_timesteps",
                         f"null (a random t per row, as the paper), a timestep or a non-empty list of timesteps in "
                         f"[0, {TRAIN_TIMESTEPS})", "the loss attack's candidates are 50-500")
            if self.shared_forward:
                raise ConfigError("mp.shared_forward=true reuses L_ada's random (t, eps) draw, so it cannot be combined with "
                                  "mp.proxy_timesteps; set one of them")
        self.require(math.isfinite(self.privacy_gradient_scale) and self.privacy_gradient_scale >= 0, "privacy_gradient_scale",
                     "a finite number >= 0", "1 is the paper's objective")


@dataclass
class DualMD(Section):
    split_seed: Optional[int] = option(None, "seed of the disjoint halves; null = seed")
    prompt_diversification: bool = option(True, "members with several captions (e.g. merged by dedup) get a random one per step")
    inference_steps: int = option("${eval.utility_inference_steps}", "DDIM steps of the deployed alternating sampler "
                                                                     "(the paper: 50); the attacks query its A/B assignment")

    def check(self) -> None:
        self.at_least(0, "split_seed")
        self.at_least(1, "inference_steps")


@dataclass
class Distill(Section):
    teachers: Optional[str] = option(None, "a finished dualmd run folder (same data, seed and members); null = train the "
                                           "teachers first")
    teacher_steps: int = option("${train.max_steps}", "phase 1 length when the teachers are trained here")

    def check(self) -> None:
        self.at_least(1, "teacher_steps")
