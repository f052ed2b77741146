"""Training-time memorization filters: rows flagged as memorized are masked out of the loss.

* `wen` (Wen et al., ICLR 2024, `--hard_threshold`): after the conditional forward, one extra no-grad
  UNet forward on the same (z_t, t) with the empty-prompt embedding (from the same, possibly
  LoRA-adapted, text encoder); a row is flagged when ||eps(z_t, c) - eps(z_t, empty)||_2 >= tau.
* `ren` (Ren et al., ECCV 2024, training mitigation): the cross-attention probabilities of the
  training forward itself are recorded (no extra UNet call); a row is flagged when the entropy of its
  mean attention (averaged over the chosen layers) is >= tau: high entropy = memorization-prone.

tau is `threshold` when given (absolute; for wen the paper's tau = 2 applies to SD v1.4 at 512 px
only), or else the `percentile` of the same metric, at random training timesteps, on *known
non-members*, recalibrated every `recalibrate_every` steps on the current model:

* `calibration: unused` (default): source rows in neither the training set nor the evaluation split
  (the defender's own held-out data; the attacks' non-members are never touched);
* `calibration: nonmembers`: the calibration half of the evaluation non-members, the part the attack
  runner also fits its thresholds on (same seeded permutation as privtune.eval.runner.split_calibration);
  the report half is never used.

The base loop (privtune.trainers.base) calls `loss` instead of the plain mean; an all-filtered batch
gives a zero loss that still back-propagates (all processes run the same collectives), and the base
loop skips the optimizer step when no row of the global batch was kept (AdamW's weight decay and
momentum would otherwise still move the weights on a zero gradient).
"""

from __future__ import annotations

from dataclasses import replace

import math
from collections import Counter

import numpy as np
import torch

from ..errors import ConfigError
from ..losses import denoising_loss
from .attention import check_layers, entropy, install_probe
from .wen import magnitude
from ..rng import numpy_rng, torch_generator

METHODS = ("none", "wen", "ren")


def check_config(cfg, max_length: int | None = None) -> None:
    """Range checks that need no model (max_length, when known, bounds the entropy threshold)."""
    if cfg.method not in METHODS:
        raise ConfigError(f"memorization_filter.method must be one of {', '.join(METHODS)} (got {cfg.method!r})")
    if cfg.method == "none":
        return
    if cfg.threshold is not None:
        tau = float(cfg.threshold)
        if not math.isfinite(tau) or tau <= 0:
            raise ConfigError(f"memorization_filter.threshold must be a positive number (got {cfg.threshold}); or null to calibrate it")
        if cfg.method == "ren" and max_length is not None and tau > math.log(max_length):
            raise ConfigError(
                f"memorization_filter.threshold={tau} is outside the range of an attention entropy over {max_length} tokens "
                f"(0, {math.log(max_length):.4f}] nats; lower it or set it to null to calibrate it")
    elif not 0.0 < float(cfg.percentile) < 100.0:
        raise ConfigError(f"memorization_filter.percentile must be in (0, 100) (got {cfg.percentile})")
    if cfg.calibration not in ("unused", "nonmembers"):
        raise ConfigError(f"memorization_filter.calibration must be 'unused' or 'nonmembers' (got {cfg.calibration!r})")
    if int(cfg.calibration_rows) < 2 or int(cfg.calibration_draws) < 1 or int(cfg.recalibrate_every) < 0:
        raise ConfigError("memorization_filter needs calibration_rows >= 2, calibration_draws >= 1 and recalibrate_every >= 0")


def calibration_records(trainer, cfg) -> list:
    """The known non-members tau is calibrated on (see the module docstring)."""
    split = trainer.split
    n_rows = int(cfg.calibration_rows)
    if cfg.calibration == "nonmembers":
        n = len(split.nonmembers)
        fraction = float(trainer.cfg.eval.calibration_fraction)
        from ..eval.runner import calibration_order

        perm = calibration_order(int(trainer.cfg.seed), 1, n)  # the attacks' calibration non-members, never reported ones
        pool = [split.nonmembers[i] for i in np.sort(perm[:int(round(fraction * n))])]
    else:
        used = {r.id for r in split.members} | {r.id for r in split.nonmembers}
        groups = {r.group for r in split.members} | {r.group for r in split.nonmembers}
        pool = [r for r in trainer.source.records if r.id not in used and r.group not in groups]
    if len(pool) < 2:
        raise ConfigError(
            f"memorization_filter.calibration={cfg.calibration} leaves {len(pool)} known non-members to calibrate tau on; "
            f"use calibration=nonmembers, a larger data source, or an absolute memorization_filter.threshold")
    order = numpy_rng(trainer.cfg.seed, "filter-calibration-pool").permutation(len(pool))
    return [pool[i] for i in order[:n_rows]]


class SampleFilter:
    """Flags memorized training rows (wen | ren) and masks them out of the loss."""

    def __init__(self, cfg, trainer):
        self.cfg = cfg
        self.method = str(cfg.method)
        self.tau = float(cfg.threshold) if cfg.threshold is not None else None
        self.calibrated_at: int | None = None
        self.history: list[dict] = []
        self.kept = 0
        self.total = 0
        self.kept_in_step = 0
        self.flagged: Counter = Counter()
        self.probe = None
        self.layers: list[int] = []
        self.calibration = None
        if self.method == "ren":
            self.probe = install_probe(trainer.components.unet)
            self.layers = check_layers(cfg.ren_layers, self.probe)
        max_length = trainer.components.tokenizer.model_max_length
        check_config(cfg, max_length)
        if self.tau is None:
            self.calibration = calibration_records(trainer, cfg)

    # ------------------------------------------------------------------ metric
    def _uncond(self, trainer, n: int) -> torch.Tensor:
        ids = trainer.tokenize([""])
        with torch.no_grad():
            state = trainer.encode_text(ids)
        return state.to(trainer.device, trainer.weight_dtype).expand(n, *state.shape[1:])

    def metric(self, trainer, noisy, timesteps, states, pred) -> torch.Tensor:
        """The per-row statistic of the forward that produced `pred` (for ren: the probe's last record)."""
        if self.method == "wen":
            unet = trainer.accelerator.unwrap_model(trainer.components.unet)
            with torch.no_grad():
                eps_u = unet(noisy, timesteps, encoder_hidden_states=self._uncond(trainer, len(noisy)), return_dict=False)[0]
            return magnitude(pred.detach(), eps_u)
        probs = self.probe.take()[self.layers]
        return entropy(probs).mean(0)

    # ------------------------------------------------------------------ calibration
    @torch.no_grad()
    def calibrate(self, trainer) -> float:
        """tau = percentile of the metric on the calibration non-members at seeded random (t, noise)."""
        from ..eval.encode import encode_records

        comps = trainer.components
        unet = trainer.accelerator.unwrap_model(comps.unet)
        text_encoder = trainer.accelerator.unwrap_model(comps.text_encoder)
        view = replace(comps, text_encoder=text_encoder, unet=unet)
        enc = encode_records(view, self.calibration, trainer.cfg.data.resolution, trainer.device)
        k = int(self.cfg.calibration_draws)
        latents = enc.latents.repeat_interleave(k, 0)
        states = enc.cond.repeat_interleave(k, 0).to(trainer.weight_dtype)
        g = torch_generator(trainer.cfg.seed, "filter-calibration-noise")
        noise = torch.randn(latents.shape, generator=g).to(latents.device)
        t = torch.randint(0, comps.noise_scheduler.config.num_train_timesteps, (len(latents),), generator=g).to(latents.device)
        values = []
        was_training = unet.training
        unet.eval()
        for lo in range(0, len(latents), 64):
            sl = slice(lo, lo + 64)
            if self.probe is not None:
                self.probe.recording = True
            _, pred, noisy = denoising_loss(unet, comps.noise_scheduler, latents[sl].to(trainer.weight_dtype), states[sl],
                                            noise[sl], t[sl], return_pred=True)
            values.append(self.metric(trainer, noisy, t[sl], states[sl], pred).float().cpu())
            if self.probe is not None:
                self.probe.recording = False
        unet.train(was_training)
        tau = float(np.percentile(torch.cat(values).numpy(), float(self.cfg.percentile)))
        self.calibrated_at = trainer.state.step
        self.history.append({"step": trainer.state.step, "tau": tau})
        return tau

    def maybe_calibrate(self, trainer) -> None:
        every = int(self.cfg.recalibrate_every)
        if self.calibration is None:
            return
        step = trainer.state.step
        if self.calibrated_at is None or (every and step - self.calibrated_at >= every):
            self.tau = self.calibrate(trainer)

    # ------------------------------------------------------------------ loss
    def loss(self, trainer, batch, noise, timesteps) -> tuple[torch.Tensor, dict]:
        """The mean denoising loss over the kept rows (zero, still connected to the graph, if none is kept)."""
        self.maybe_calibrate(trainer)
        comps = trainer.components
        if self.probe is not None:
            self.probe.recording = True
        try:
            per_sample, pred, noisy = denoising_loss(comps.unet, comps.noise_scheduler, batch.latents,
                                                     batch.encoder_hidden_states, noise, timesteps, return_pred=True,
                                                     snr_gamma=trainer.cfg.train.snr_gamma)
        finally:
            if self.probe is not None:
                self.probe.recording = False
        values = self.metric(trainer, noisy, timesteps, batch.encoder_hidden_states, pred)
        keep = (values < self.tau).to(per_sample.dtype)
        n_kept = int(keep.sum().item())
        self.kept += n_kept
        self.total += len(keep)
        self.kept_in_step += n_kept
        for row, k in zip(batch.rows.tolist(), keep.tolist()):
            if not k:
                self.flagged[trainer.train_records[int(row)].id] += 1
        loss = (per_sample * keep).sum() / keep.sum().clamp_min(1.0)
        return loss, {"loss": loss.detach().item(), "filter/kept": n_kept / len(keep), "filter/tau": self.tau,
                      "filter/metric": values.float().mean().item()}

    def state_dict(self) -> dict:
        """Checkpointed with the run, so a resumed run filters with the tau an uninterrupted one would."""
        return {"tau": torch.tensor(float("nan") if self.tau is None else self.tau, dtype=torch.float64),
                "calibrated_at": torch.tensor(-1 if self.calibrated_at is None else self.calibrated_at),
                "kept": torch.tensor(self.kept), "total": torch.tensor(self.total)}

    def load_state_dict(self, state: dict) -> None:
        tau = float(state["tau"])
        self.tau = None if math.isnan(tau) else tau
        at = int(state["calibrated_at"])
        self.calibrated_at = None if at < 0 else at
        self.kept, self.total = int(state["kept"]), int(state["total"])

    def skip_step(self, accelerator) -> bool:
        """True when no process kept a row since the last optimizer step (a collective on every process)."""
        kept = torch.tensor([float(self.kept_in_step)], device=accelerator.device)
        self.kept_in_step = 0
        return float(accelerator.reduce(kept, reduction="sum").item()) == 0.0

    def stats(self) -> dict:
        return {"method": self.method, "tau": self.tau, "threshold": "absolute" if self.calibration is None else
                f"percentile {float(self.cfg.percentile)} on {self.cfg.calibration} non-members",
                "calibration_rows": [r.id for r in self.calibration] if self.calibration else [],
                "tau_history": self.history, "rows_seen": self.total, "rows_kept": self.kept,
                "kept_fraction": self.kept / self.total if self.total else None,
                "most_flagged": dict(self.flagged.most_common(20)),
                "layers": [self.probe.layers[i] for i in self.layers] if self.probe else None}
