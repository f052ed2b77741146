"""SecMI of Duan, Kong, Wang, Shi & Xu, "Are Diffusion Models Vulnerable to Membership Inference
Attacks?" (ICML 2023, arXiv 2302.01316); specs/attacks.md §2.

t-error: DDIM-invert x0 from step 0 to t_sec − k with stride k (giving x̃), take one deterministic
step up to t_sec and one back down (giving x̂), and compare at t_sec − k, the index convention of
the official code. Members re-trace their trajectory better, so ‖x̂ − x̃‖² is smaller.
NFE = (t_sec − k)/k + 2 = t_sec/k + 1.

Defaults t_sec = 150, k = 10: the SecMI-LDM setting for Stable Diffusion, which compares x̃_140
with the denoised x̃_150 (16 NFE); the pixel-space DDPM setting would be t_sec = 100.

* `secmi` (SecMI_stat): raw = summed squared t-error, score = −raw; nothing is fitted.
* `secmi_nn` (SecMI_NNs): a classifier on log |x̂ − x̃| maps. The official ResNet-18 is replaced by
  a three-layer CNN with global pooling (~60k weights, independent of resolution): the maps are
  spatial (4×64×64 for SD), calibration sets hold hundreds of samples, and an MLP on 16k flattened
  entries would overfit them. It is trained with BCE (official: MSE onto {0,1}) only on the
  calibration split, whose 25% is held out to pick the epoch (official: best epoch on the
  evaluation split) and is returned for the runner's threshold fit. score = raw = logit.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ...errors import ConfigError
from ..primitives import ddim_trajectory, ddim_transfer
from .base import ATTACKS, Attack, AttackScores, AttackTarget, EncodedSamples, map_batches, stratified_holdout


@ATTACKS.register("secmi")
class SecMI(Attack):
    name = "secmi"
    statistic, members_lower = "t-error", True

    def __init__(self, t_sec: int = 150, k: int = 10, seed: int = 0):
        super().__init__(seed)
        self.t_sec, self.k = int(t_sec), int(k)
        if self.k <= 0 or self.t_sec < self.k or self.t_sec % self.k:
            raise ConfigError(f"secmi needs k > 0 and t_sec a positive multiple of k; got t_sec={t_sec}, k={k}")

    def error_map(self, target: AttackTarget, batch: EncodedSamples) -> Tensor:
        """|x̂_{t_sec−k} − x̃_{t_sec−k}| per entry, [B,C,H,W]."""
        t_cmp = self.t_sec - self.k
        ac = target.alphas_cumprod
        x_tilde = ddim_trajectory(target.predictor, batch.latents, 0, t_cmp, self.k, batch.cond, ac)
        x_up = ddim_transfer(target.predictor, x_tilde, t_cmp, self.t_sec, batch.cond, ac)
        x_hat = ddim_transfer(target.predictor, x_up, self.t_sec, t_cmp, batch.cond, ac)
        return (x_hat - x_tilde).abs()

    def _score_batch(self, target, batch):
        raw = self.error_map(target, batch).float().pow(2).flatten(1).sum(1)
        return {"score": -raw, "raw": raw}

    def params(self) -> dict[str, Any]:
        return {"t_sec": self.t_sec, "k": self.k, "compared_at": self.t_sec - self.k, "reduction": "sum", "seed": self.seed}


class _MapClassifier(nn.Module):
    """Three 3×3 conv layers (the last two with stride 2), global average pooling, one logit."""

    def __init__(self, channels: int, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(1)


@ATTACKS.register("secmi_nn")
class SecMINN(SecMI):
    name = "secmi_nn"
    learned = True
    statistic, members_lower = "classifier logit", False

    def __init__(
        self, t_sec: int = 150, k: int = 10, epochs: int = 30, lr: float = 1e-3, weight_decay: float = 1e-4,
        train_batch_size: int = 64, val_fraction: float = 0.25, seed: int = 0,
    ):
        super().__init__(t_sec, k, seed)
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"secmi_nn: val_fraction must be in (0, 1), got {val_fraction}")
        self.epochs, self.lr, self.weight_decay = int(epochs), float(lr), float(weight_decay)
        self.train_batch_size, self.val_fraction = int(train_batch_size), float(val_fraction)
        self.model: _MapClassifier | None = None
        self.fit_ids: list[str] = []
        self.val_ids: list[str] = []
        self.best_epoch: int | None = None
        self.val_auc: float | None = None
        self._device: torch.device | None = None

    def _features(self, maps: Tensor) -> Tensor:
        return (maps.float().clamp_min(1e-8).log() - self._mean) / self._std

    def fit_features(self, target, samples, batch_size, progress):
        self._device = samples.latents.device if target.device is None else torch.device(target.device)
        out, nfe = map_batches(
            target, samples, lambda tg, b: {"map": self.error_map(tg, b)}, batch_size, progress, "secmi_nn/maps"
        )
        return {"map": out["map"]}, nfe

    def fit(self, features, labels, ids) -> AttackScores:
        from ..metrics import auc

        train_idx, val_idx = stratified_holdout(labels, self.val_fraction, np.random.default_rng(self.seed), "secmi_nn")
        self.fit_ids = [ids[i] for i in train_idx]
        self.val_ids = [ids[i] for i in val_idx]

        device = self._device or torch.device("cpu")
        maps = torch.from_numpy(features["map"]).to(device)
        y = torch.from_numpy(labels).float().to(device)
        logs = maps[train_idx].clamp_min(1e-8).log()
        self._mean = logs.mean(dim=(0, 2, 3), keepdim=True)[0]
        self._std = logs.std(dim=(0, 2, 3), keepdim=True)[0].clamp_min(1e-6)
        x_tr, y_tr = self._features(maps[train_idx]), y[train_idx]
        x_val, y_val = self._features(maps[val_idx]), labels[val_idx]

        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            model = _MapClassifier(maps.shape[1]).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        gen = torch.Generator().manual_seed(self.seed)
        best = (-1.0, None, 0)
        for epoch in range(1, self.epochs + 1):
            model.train()
            for sl in torch.randperm(len(train_idx), generator=gen).split(self.train_batch_size):
                sl = sl.to(device)
                loss = nn.functional.binary_cross_entropy_with_logits(model(x_tr[sl]), y_tr[sl])
                opt.zero_grad()
                loss.backward()
                opt.step()
            model.eval()
            with torch.no_grad():
                val_auc = auc(model(x_val).cpu().numpy(), y_val)
            if val_auc > best[0]:
                best = (val_auc, copy.deepcopy(model.state_dict()), epoch)
        model.load_state_dict(best[1])
        model.eval()
        self.model, self.val_auc, self.best_epoch = model, best[0], best[2]
        with torch.no_grad():
            val_logits = model(x_val).cpu().numpy()
        return AttackScores(val_logits, val_logits, 0.0, ids=self.val_ids, labels=y_val)

    def _score_batch(self, target, batch):
        if self.model is None:
            raise ConfigError("secmi_nn: call calibrate() first (it trains the classifier on the calibration split)")
        maps = self.error_map(target, batch)
        with torch.no_grad():
            logit = self.model(self._features(maps).to(next(self.model.parameters()).device))
        return {"score": logit, "raw": logit}

    def params(self) -> dict[str, Any]:
        return {
            **super().params(), "classifier": "cnn3-gap", "features": "standardized log|x_hat - x_tilde|",
            "loss": "bce", "epochs": self.epochs, "best_epoch": self.best_epoch, "lr": self.lr,
            "weight_decay": self.weight_decay, "val_fraction": self.val_fraction, "val_auc": self.val_auc,
            "n_fit": len(self.fit_ids), "n_val": len(self.val_ids),
        }
