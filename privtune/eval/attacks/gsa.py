"""GSA, the gradient membership-inference attack of Pang, Wang et al., "White-box Membership
Inference Attacks against Diffusion Models" (arXiv 2308.06405, PoPETs 2025); specs/attacks.md §6.
Official code: py85252876/GSA (`DDPM/gen_l2_gradients_DDPM.py`).

What and why: a model that memorized a sample sits near a minimum of that sample's diffusion loss,
so the loss's gradient with respect to the weights is small for members and larger for non-members,
and the pattern of per-layer gradient sizes is a richer signal than the loss alone. Per query sample:

1. K timesteps t_k = k·T/K − 1 (k = 1..K; {99, 199, …, 999} for K = 10, T = 1000), one seeded noise
   ε_k per (sample id, t_k), x_{t_k} = sqrt(ᾱ)x0 + σε_k;
   ℓ_k = mean over entries of ‖ε_k − ε_θ(x_{t_k}, t_k, c)‖² (the per-pixel mean of the official code).
2. `gsa1`: the gradient of (1/K) Σ_k ℓ_k; feature = one L2 norm per parameter tensor
   ("layer-wise aggregation"). `gsa2`: the per-tensor norms of each ∇ℓ_k, averaged over the K
   timesteps.
3. A gradient-boosted tree classifier on the standardized log norms; score = raw = its member
   log-odds (the decision function, which does not saturate the way a probability does).

Parameters: the adapter tensors (LoRA, DoRA, LoKr or LoHa: privtune.models.methods) of the adapters active in
enabled, unmerged adapter layers when there are any (`params()["parameters"] == "lora"`), otherwise every other
parameter of the UNet ("all", as in the paper). `requires_grad` is set on exactly those tensors
while the features are computed and every flag is restored afterwards; the weights never change.

Deviations from the paper and its code:
* The classifier is scikit-learn's HistGradientBoostingClassifier (max_iter = 200, as the paper's
  XGBoost n_estimators = 200), the gradient-boosting implementation of this project's dependencies;
  `min_samples_leaf` defaults to n_fit // 10 clipped to [1, 20] (sklearn's 20 forbids any split on a
  calibration split of tens of samples).
* The classifier is fitted on the target's own calibration split (members and non-members of known
  membership), a stronger attacker than one holding only shadow models; with eval.shadow.enabled the
  runner also fits a copy on the pooled shadow models' members and non-members (`gsa1~shadow`, the paper's
  setting, which pools 5).
  A seeded `val_fraction` of each class is held out of the fit and its scores are
  returned for the runner's threshold and orientation fit, so no sample is scored by a classifier
  that saw it (the CopyMark pitfall of §14); `fit_ids` / `val_ids` list the two parts.
* The K noisy copies run as K batched forward + backward passes of B rows (one per timestep), not as
  one graph of B·K rows: the memory of a B-row batch, and GSA1 is still exact because the gradient of
  the mean loss is the mean of the per-timestep gradients. The UNet is called directly with the
  sample's condition (no classifier-free guidance); the SNR-weighted loss of the code is not offered.

Memory: each batch row holds one gradient per attacked tensor (GSA1 also their running sum), i.e. the
size of the attacked parameters per row: small for a LoRA, the whole network for "all" on a full-size
UNet, where `max_batch_size` caps this attack's batches below the runner's `eval.batch_size`.

Cost (per sample): K UNet forwards (`nfe_per_sample` = K; the attack bypasses the NoisePredictor, so
it counts them itself) and K backward rows. `params()["backward_per_sample"]` is the paper's count of
gradients per sample, 1 for GSA1 and K for GSA2; both run as the same K per-timestep backward passes
here (≈ 3K forward-equivalents either way).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from ...errors import ConfigError
from ..primitives import add_noise, seeded_noise
from .base import ATTACKS, Attack, AttackScores, AttackTarget, EncodedSamples, map_batches, stratified_holdout

OPACUS_PARAM_ATTRS = ("grad_sample", "_forward_counter", "_current_grad_sample", "_norm_sample")
OPACUS_MODULE_ATTRS = ("activations", "max_batch_len", "ft_compute_sample_grad", "autograd_grad_sample_hooks")


def gsa_timesteps(n_timesteps: int, num_train_timesteps: int) -> list[int]:
    """t_k = k·T/K − 1 for k = 1..K (the official code's uniform subsample)."""
    return [k * num_train_timesteps // n_timesteps - 1 for k in range(1, n_timesteps + 1)]


def attacked_parameters(unet: nn.Module) -> tuple[str, list[tuple[str, nn.Parameter]]]:
    """("lora", the LoRA tensors of active adapters in enabled, unmerged LoRA layers) when there are any,
    else ("all", every parameter that is no adapter tensor: the network an unused adapter leaves)."""
    from ...models.methods import is_adapter_param

    named = list(unet.named_parameters())
    if any(is_adapter_param(n) for n, _ in named):
        from peft.tuners.tuners_utils import BaseTunerLayer

        keep: dict[int, str] = {}
        for mname, module in unet.named_modules():
            if not isinstance(module, BaseTunerLayer) or module.disable_adapters or module.merged:
                continue
            active = list(module.active_adapters)
            for pname, p in module.named_parameters():
                hit = next((a for a in active if f".{a}." in f".{pname}."), None)
                if is_adapter_param(pname) and hit is not None:  # named without the adapter: shadows load under their own
                    keep[id(p)] = f"{mname}.{f'.{pname}.'.replace(f'.{hit}.', '.*.').strip('.')}"
        lora = [(keep[id(p)], p) for _, p in named if id(p) in keep]
        if lora:
            return "lora", lora
    return "all", [(n, p) for n, p in named if not is_adapter_param(n)]


@contextmanager
def per_sample_gradients(unet: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
    """Opacus per-sample-gradient hooks on the modules owning `params`, for the duration of the block:
    after a backward pass of a summed per-row loss, each p.grad_sample is [rows, *p.shape].

    Why Opacus rather than torch.func (functional_call + vmap(grad)): both gave exact per-sample
    gradients on the tiny diffusers UNet2DConditionModel with peft LoRA layers, in LoRA and all-parameter
    mode (tests/eval/test_gsa.py checks the hooks against a loop of plain autograd), but the hooks run
    the unmodified batched forward, so every op of the UNet may be one without a vmap rule (a custom
    attention kernel, say), they are the per-example-gradient engine DP-SGD (trainers/dpsgd.py) already
    runs on these LoRA layers, and they were the faster of the two on the tiny UNet on a CPU. Opacus
    records activations only in train mode, so `training` is set on the hooked layers alone (types with
    an Opacus grad sampler: Linear, Conv, GroupNorm, LayerNorm, Embedding…, whose forward ignores the
    flag; strict mode rejects layers with buffers such as BatchNorm); dropout and every other module
    keep eval mode. Gradient checkpointing (which would re-run forwards, and so the hooks, inside the
    backward pass) is off for the block.
    Everything is restored on exit: requires_grad flags, train flags, checkpointing flags, and no
    hook or Opacus attribute is left on the modules or parameters."""
    from opacus import GradSampleModule

    chosen = {id(p) for p in params}
    flags = [(p, p.requires_grad) for p in unet.parameters()]
    checkpointing = [(m, m.gradient_checkpointing) for m in unet.modules() if isinstance(getattr(m, "gradient_checkpointing", None), bool)]
    if hasattr(unet, "autograd_grad_sample_hooks"):
        raise ConfigError("gsa: the UNet already carries Opacus per-sample-gradient hooks (a DP-SGD trainer still "
                          "attached?); remove them before attacking it")
    modes: list[tuple[nn.Module, bool]] = []
    gsm = None
    try:
        for p in unet.parameters():
            p.requires_grad_(id(p) in chosen)
        for m, _ in checkpointing:
            m.gradient_checkpointing = False
        hooked = [m for m in unet.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
        unsupported = sorted({type(m).__name__ for m in hooked if type(m) not in GradSampleModule.GRAD_SAMPLERS})
        if unsupported:
            raise ConfigError(f"gsa: no Opacus per-sample-gradient rule for the layer type(s) {unsupported} holding "
                              "attacked parameters; their forward might depend on train mode, which the hooks need")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                gsm = GradSampleModule(unet, batch_first=True, loss_reduction="sum", strict=True)
            except NotImplementedError as exc:
                raise ConfigError(f"gsa: per-sample gradients are undefined for this UNet: {exc}") from exc
        for m in hooked:
            modes.append((m, m.training))
            m.training = True
        yield
    finally:
        if gsm is not None:
            gsm.remove_hooks()
        for m in unet.modules():
            for attr in OPACUS_MODULE_ATTRS:
                if attr in m.__dict__:
                    delattr(m, attr)
        for p in unet.parameters():
            for attr in OPACUS_PARAM_ATTRS:
                if hasattr(p, attr):
                    delattr(p, attr)
        for m, mode in modes:
            m.training = mode
        for m, flag in checkpointing:
            m.gradient_checkpointing = flag
        for p, flag in flags:
            p.requires_grad_(flag)


@ATTACKS.register("gsa1")
class GSA1(Attack):
    name = "gsa1"
    learned = True
    statistic, members_lower = "classifier logit", False
    requires = ("white_box",)
    per_timestep = False  # GSA2: norms of each timestep's gradient, averaged

    def __init__(
        self, n_timesteps: int = 10, val_fraction: float = 0.3, max_iter: int = 200, learning_rate: float = 0.1,
        min_samples_leaf: int | None = None, max_batch_size: int | None = None, seed: int = 0,
    ):
        super().__init__(seed)
        if int(n_timesteps) < 1:
            raise ConfigError(f"{self.name}: n_timesteps must be >= 1, got {n_timesteps}")
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"{self.name}: val_fraction must be in (0, 1), got {val_fraction}")
        self.n_timesteps, self.val_fraction = int(n_timesteps), float(val_fraction)
        self.max_iter, self.learning_rate = int(max_iter), float(learning_rate)
        self.min_samples_leaf = None if min_samples_leaf is None else int(min_samples_leaf)
        if max_batch_size is not None and int(max_batch_size) < 1:
            raise ConfigError(f"{self.name}: max_batch_size must be >= 1, got {max_batch_size}")
        self.max_batch_size = None if max_batch_size is None else int(max_batch_size)
        self.timesteps: list[int] = []
        self.parameter_set: str | None = None
        self.tensor_names: list[str] = []
        self.model = None
        self.fit_ids: list[str] = []
        self.val_ids: list[str] = []
        self.val_auc: float | None = None
        self._leaf: int | None = None

    # ------------------------------------------------------------------ features
    def features(self, target: AttackTarget, samples: EncodedSamples, batch_size: int = 32, progress: bool = True) -> np.ndarray:
        """Per-tensor gradient norms [N, #tensors] (not logged, not standardized); batches of
        min(batch_size, max_batch_size) samples, each row holding one gradient per attacked tensor."""
        if target.unet is None:
            raise ConfigError(f"{self.name} needs the attacked network itself (target.unet) for its gradients")
        if torch.is_inference_mode_enabled():
            raise ConfigError(f"{self.name} takes gradients: run it outside torch.inference_mode()")
        batch_size = min(int(batch_size), self.max_batch_size or int(batch_size))
        unet = target.unet
        self.timesteps = gsa_timesteps(self.n_timesteps, int(target.alphas_cumprod.shape[0]))
        kind, named = attacked_parameters(unet)
        if not named:
            raise ConfigError(f"{self.name}: the UNet has no parameters to take gradients of")
        self.parameter_set, self.tensor_names = kind, [n for n, _ in named]
        params = [p for _, p in named]
        with torch.enable_grad(), per_sample_gradients(unet, params), warnings.catch_warnings():
            # the first hooked layer's inputs need no gradient; torch then hooks its outputs, which is what we need
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            out, _ = map_batches(target, samples, lambda tg, b: {"norms": self._norms(tg, b, params)},
                                 batch_size, progress, f"{self.name}/gradients")
        return out["norms"]

    def _norms(self, target: AttackTarget, batch: EncodedSamples, params: list[nn.Parameter]) -> Tensor:
        ref = params[0]
        x0, cond = batch.latents, batch.cond.to(device=ref.device, dtype=ref.dtype)
        b, k_total = len(batch), len(self.timesteps)
        summed = [None] * len(params)  # GSA1: Σ_k per-sample ∇ℓ_k
        norms = torch.zeros(b, len(params), device=ref.device)  # GSA2: Σ_k per-tensor ‖∇ℓ_k‖
        for t in self.timesteps:
            noise = seeded_noise(x0.shape[1:], self.seed, f"gsa/t{t}", batch.ids, x0.device, x0.dtype)
            xt = add_noise(x0, noise, t, target.alphas_cumprod).to(device=ref.device, dtype=ref.dtype)
            tt = torch.full((b,), t, dtype=torch.long, device=ref.device)
            eps = target.unet(xt, tt, encoder_hidden_states=cond).sample
            loss = (noise.to(device=ref.device, dtype=torch.float32) - eps.float()).pow(2).flatten(1).mean(1)
            torch.autograd.grad(loss.sum(), params, allow_unused=True)
            for j, p in enumerate(params):
                g = getattr(p, "grad_sample", None)
                p.grad_sample = None
                if g is None:  # the tensor took no part in this forward: its gradient is zero
                    continue
                g = g.detach().float()
                if self.per_timestep:
                    norms[:, j] += g.flatten(1).norm(dim=1)
                else:
                    summed[j] = g if summed[j] is None else summed[j] + g
        if self.per_timestep:
            return norms / k_total
        for j, g in enumerate(summed):
            if g is not None:
                norms[:, j] = g.flatten(1).norm(dim=1) / k_total
        return norms

    def _design(self, norms: np.ndarray) -> np.ndarray:
        return (np.log(np.maximum(norms, 1e-30)) - self._mean) / self._std

    # ------------------------------------------------------------------ calibration and scoring
    def fit_features(self, target, samples, batch_size, progress):
        return {"norms": self.features(target, samples, batch_size, progress)}, float(self.n_timesteps)

    def fit(self, features, labels, ids) -> AttackScores:
        from sklearn.ensemble import HistGradientBoostingClassifier

        from ..metrics import auc

        norms = features["norms"]
        fit_idx, val_idx = stratified_holdout(labels, self.val_fraction, np.random.default_rng(self.seed), self.name)
        self.fit_ids = [ids[i] for i in fit_idx]
        self.val_ids = [ids[i] for i in val_idx]
        logs = np.log(np.maximum(norms[fit_idx], 1e-30))
        self._mean, self._std = logs.mean(0), np.maximum(logs.std(0), 1e-6)
        self._leaf = self.min_samples_leaf or int(np.clip(len(fit_idx) // 10, 1, 20))
        model = HistGradientBoostingClassifier(max_iter=self.max_iter, learning_rate=self.learning_rate,
                                               min_samples_leaf=self._leaf, early_stopping=False, random_state=self.seed)
        model.fit(self._design(norms[fit_idx]), labels[fit_idx])
        self.model = model
        self._names = list(self.tensor_names)
        val = model.decision_function(self._design(norms[val_idx]))
        self.val_auc = auc(val, labels[val_idx])
        return AttackScores(val, val, float(self.n_timesteps), ids=list(self.val_ids), labels=labels[val_idx])

    def score(self, target, samples, batch_size=32, progress=True) -> AttackScores:
        if self.model is None:
            raise ConfigError(f"{self.name}: call calibrate() first (it fits the classifier on the calibration split)")
        norms = self.features(target, samples, batch_size, progress)
        if self.tensor_names != self._names:
            raise ConfigError(f"{self.name}: the UNet's attacked parameters changed since calibrate() "
                              f"({len(self._names)} tensors then, {len(self.tensor_names)} now)")
        logit = self.model.decision_function(self._design(norms))
        return AttackScores(logit, logit, float(self.n_timesteps), ids=list(samples.ids))

    def params(self) -> dict[str, Any]:
        k = self.n_timesteps
        return {
            "n_timesteps": k, "timesteps": list(self.timesteps), "parameters": self.parameter_set,
            "n_tensors": len(self.tensor_names) or None,
            "features": "standardized log per-tensor L2 norms of per-sample loss gradients",
            "aggregation": "mean over timesteps of per-timestep norms" if self.per_timestep else "norm of the timestep-mean gradient",
            "loss": "per-pixel mean squared error", "forward_per_sample": k,
            "backward_per_sample": k if self.per_timestep else 1, "backward_rows_per_sample": k,
            "classifier": "sklearn HistGradientBoostingClassifier", "max_iter": self.max_iter,
            "learning_rate": self.learning_rate, "min_samples_leaf": self._leaf or self.min_samples_leaf,
            "fitted_on": "the target's calibration split", "val_fraction": self.val_fraction,
            "max_batch_size": self.max_batch_size,
            "val_auc": self.val_auc, "n_fit": len(self.fit_ids), "n_val": len(self.val_ids), "seed": self.seed,
        }


@ATTACKS.register("gsa2")
class GSA2(GSA1):
    name = "gsa2"
    per_timestep = True
