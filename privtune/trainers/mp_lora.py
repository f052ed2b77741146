"""MP-LoRA and SMP-LoRA: LoRA trained against a proxy membership-inference attacker in a min-max game.

Luo et al., "Privacy-Preserving Low-Rank Adaptation against Membership Inference Attacks for Latent
Diffusion Models", AAAI 2025 (arXiv 2402.11989; reference code WilliamLUO0/StablePrivateLoRA); spec:
defenses.md section 1.

Every training step alternates, in the reference code's order (LoRA first):
1. `mp.lora_steps` LoRA updates with the attacker frozen (its weights take no gradient and no step):
   L_ada from one (t, eps) draw, the attack term CE = CE(h(loss map), member) from an independent
   draw (both draws go through the UNet as one batch of 2B rows, which equals two forwards), then
   MP-LoRA: L_ada - lambda * CE, or SMP-LoRA: L_ada / (beta + lambda * CE + delta); clipped to
   train.max_grad_norm; only the LoRA optimizer steps.
2. `mp.attacker_steps` attacker updates with the UNet frozen (no_grad): a batch of D_aux^m (label 1)
   and D_aux^nm (label 0) rows, CE on the attacker's logits, Adam on the attacker only.

D_aux (the attacker's split, `attacker_split.json`) is drawn from rows outside the evaluation split;
the LoRA trains on the evaluation members plus D_aux^m. The attacker, its optimizer and the per-step
history (accuracy, gain G = -CE, ...) are checkpointed, so `resume=latest` continues exactly.
Written to the run folder: `proxy_attacker.csv` (every step) and `proxy_attacker.png`.

Deviations from the paper (the recipe defaults): 32 + 32 auxiliary rows (paper 200 + 200), 1,000 steps at
lr 1e-3 and attacker lr 1e-4 (paper about 173k steps at 1e-4 / 1e-5), UNet-only rank 16 (paper rank 64 with
the text encoder). Levers beyond the paper, all off by default, each measured on the portraits benchmark
(benchmarks/README.md, "SMP-LoRA levers"): `mp.proxy_timesteps` / `mp.proxy_draws` (the attack features at
fixed timesteps, averaged over noise draws: a stronger proxy, but the LoRA then hides membership at exactly
those t and nowhere else), `mp.privacy_gradient_scale` (the attack term's gradient times a factor, the
objective's value unchanged: rebalances the ratio form's L/D^2 against 1/D, but above 1 the LoRA can trade
its denoising loss for the attacker's error) and `mp.cap_at_chance` (a row's CE counts up to log 2 only, so
members are not pushed past chance).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from ..defenses.attacker_split import (check_attacker_disjoint, load_attacker_split, make_attacker_split,
                                       save_attacker_manifest)
from ..defenses.proxy_attacker import AttackerState, build_attacker
from ..errors import ConfigError
from ..io import atomic_write_bytes, atomic_write_text
from ..losses.membership import MEMBER, NONMEMBER, OBJECTIVES, loss_map, member_ce, mi_gain
from . import capabilities
from .base import Batch, Trainer
from .registry import TRAINERS
from .sampling import BatchSchedule

ATTACK_KEY = 1 << 40  # random-crop keys of attacker batches never collide with training micro-steps
FORMULAS = {"mp": "L_ada - lambda * CE(h(l(x)), member)", "smp": "L_ada / (beta + lambda * CE(h(l(x)), member) + delta)"}
TITLES = {"mp": "MP-LoRA", "smp": "SMP-LoRA"}


@TRAINERS.register("mp_lora")
class MPLoRATrainer(Trainer):
    """MP-LoRA: min over LoRA of L_ada - lambda * CE against a proxy attacker fitted on D_aux."""

    name = "mp_lora"
    form = "mp"
    supports = capabilities.ALL - {"memorization_filter", "snr_gamma"}
    unsupported_reasons = {"memorization_filter": "its loss is the min-max objective",
                           "snr_gamma": "its adaptation loss and the proxy's loss maps share one unweighted forward"}

    # ------------------------------------------------------------------ checks
    def validate_config(self) -> None:
        super().validate_config()
        cfg = self.cfg
        if "mp" not in cfg:
            raise ConfigError(f"trainer {self.name} needs an mp: section; use recipe={self.name} (or inherit from it)")
        mp = cfg.mp
        lam, beta, delta = float(mp["lambda"]), float(mp.beta), float(mp.delta)
        if not (math.isfinite(lam) and lam >= 0):
            raise ConfigError(f"mp.lambda must be a finite number >= 0 (got {mp['lambda']}); 0 trains plain LoRA, 1 is the paper's value")
        if self.form == "smp" and not (math.isfinite(beta + delta) and beta + delta > 0):
            raise ConfigError(f"mp.beta + mp.delta must be > 0 so the SMP-LoRA denominator stays positive "
                              f"(got beta={beta:g}, delta={delta:g}); the paper uses beta=1, delta=1e-5")
        for key, value in (("data.auxiliary_members", cfg.data.auxiliary_members), ("mp.attacker_nonmembers", mp.attacker_nonmembers)):
            if int(value) < 1:
                raise ConfigError(f"{key} must be >= 1 (got {value}): the proxy attacker's split would be empty "
                                  f"and it could not be trained; the recipe default is 32")
        for key in ("lora_steps", "attacker_steps"):
            if int(mp[key]) < 1:
                raise ConfigError(f"mp.{key} must be >= 1 (got {mp[key]})")
        if mp.attacker_batch_size is not None and int(mp.attacker_batch_size) < 1:
            raise ConfigError(f"mp.attacker_batch_size must be >= 1 or null (= train.batch_size) (got {mp.attacker_batch_size})")
        if not float(mp.attacker_lr) > 0:
            raise ConfigError(f"mp.attacker_lr must be > 0 (got {mp.attacker_lr})")
        if float(mp.attacker_weight_decay) < 0:
            raise ConfigError(f"mp.attacker_weight_decay must be >= 0 (got {mp.attacker_weight_decay})")
        if not 0 <= float(mp.attacker_dropout) < 1:
            raise ConfigError(f"mp.attacker_dropout must be in [0, 1) (got {mp.attacker_dropout})")
        if not mp.attacker_hidden or any(int(h) < 1 for h in mp.attacker_hidden):
            raise ConfigError(f"mp.attacker_hidden must be a non-empty list of layer widths >= 1 (got {mp.attacker_hidden})")
        n_steps = 1000  # num_train_timesteps of every SD scheduler; the model is not loaded yet
        timesteps = mp.get("proxy_timesteps")
        if timesteps is not None:
            listed = [timesteps] if isinstance(timesteps, int) else list(timesteps) if OmegaConf.is_list(timesteps) else None
            if (not listed or any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < n_steps for t in listed)):
                raise ConfigError(f"mp.proxy_timesteps must be null (a random t per row, as the paper), a timestep or a "
                                  f"non-empty list of timesteps in [0, {n_steps}) (got {timesteps!r}); the loss attack's "
                                  "candidates are 50-500")
            if mp.shared_forward:
                raise ConfigError("mp.shared_forward=true reuses L_ada's random (t, eps) draw, so it cannot be combined with "
                                  "mp.proxy_timesteps; set one of them")
        if int(mp.get("proxy_draws", 1)) < 1:
            raise ConfigError(f"mp.proxy_draws must be >= 1 (got {mp.get('proxy_draws')})")
        scale = float(mp.get("privacy_gradient_scale", 1.0))
        if not (math.isfinite(scale) and scale >= 0):
            raise ConfigError(f"mp.privacy_gradient_scale must be a finite number >= 0 (got {scale}); 1 is the paper's objective")

    @property
    def lam(self) -> float:
        return float(self.cfg.mp["lambda"])

    @property
    def proxy_timesteps(self) -> list[int] | None:
        timesteps = self.cfg.mp.get("proxy_timesteps")
        if timesteps is None:
            return None
        return [int(timesteps)] if isinstance(timesteps, int) else [int(t) for t in timesteps]

    @property
    def proxy_draws(self) -> int:
        return int(self.cfg.mp.get("proxy_draws", 1))

    # ------------------------------------------------------------------ data: D_tr = D_te^m + D_aux^m
    def training_records(self):
        mp = self.cfg.mp
        if self.resumed_split:
            self.attacker_split = load_attacker_split(self.run_dir, self.source.records)
            check_attacker_disjoint(self.split, self.attacker_split)
        else:
            self.attacker_split = make_attacker_split(self.source.records, self.split, int(self.cfg.data.auxiliary_members),
                                                      int(mp.attacker_nonmembers), int(self.cfg.seed))
        self.split.auxiliary = self.attacker_split.members
        return self.split.members + self.attacker_split.members

    def input_records(self):
        """Training rows, then D_aux^nm (scored by the attacker, never trained on)."""
        return self.train_records + self.attacker_split.nonmembers

    def write_run_files(self) -> None:
        if self.is_main and not self.resumed_split:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_attacker_manifest(self.attacker_split, self.run_dir)
        super().write_run_files()

    # ------------------------------------------------------------------ model, attacker and its optimizer
    def setup_model(self) -> None:
        super().setup_model()
        cfg = self.cfg
        comps = self.components
        side = cfg.data.resolution // (2 ** (len(comps.vae.config.block_out_channels) - 1))
        in_features = int(comps.unet.config.in_channels) * side * side * len(self.proxy_timesteps or [None])
        self.attacker = build_attacker(in_features, list(cfg.mp.attacker_hidden), float(cfg.mp.attacker_dropout),
                                       int(cfg.seed)).to(self.device)
        self.attacker.train()

    def setup_optimizer(self) -> None:
        super().setup_optimizer()
        mp = self.cfg.mp
        self.attacker_optimizer = torch.optim.Adam(self.attacker.parameters(), lr=float(mp.attacker_lr),
                                                   weight_decay=float(mp.attacker_weight_decay))

    def lr_schedule_steps(self) -> int:
        return self.cfg.train.max_steps * int(self.cfg.mp.lora_steps)

    def prepare(self) -> None:
        super().prepare()
        cfg, acc = self.cfg, self.accelerator
        self.attacker_state = AttackerState(self.attacker, self.attacker_optimizer)
        acc.register_for_checkpointing(self.attacker_state)
        size = int(cfg.mp.attacker_batch_size or cfg.train.batch_size)
        seed = int(cfg.seed)
        self.aux_member_schedule = BatchSchedule(len(self.attacker_split.members), size, seed, acc.process_index,
                                                 acc.num_processes, cfg.data.random_flip, stream="mp-aux-members")
        self.aux_nonmember_schedule = BatchSchedule(len(self.attacker_split.nonmembers), size, seed, acc.process_index,
                                                    acc.num_processes, cfg.data.random_flip, stream="mp-aux-nonmembers")

    # ------------------------------------------------------------------ the LoRA step (attacker frozen)
    def attack_term(self, features: torch.Tensor) -> torch.Tensor:
        """CE of the (frozen, dropout-active) attacker labelling the training rows as members.

        With mp.cap_at_chance each row's CE counts up to log 2 only: a row the attacker already takes for a
        non-member earns the LoRA nothing more, so it is not pushed past chance (an inverted, still detectable,
        signal) at the cost of the denoising loss."""
        if not self.cfg.mp.get("cap_at_chance", False):
            return member_ce(self.attacker(features))
        logits = self.attacker(features).float()
        labels = torch.full((logits.shape[0],), MEMBER, dtype=torch.long, device=logits.device)
        return F.cross_entropy(logits, labels, reduction="none").clamp(max=math.log(2)).mean()

    def objective(self, l_ada: torch.Tensor, ce: torch.Tensor) -> torch.Tensor:
        mp = self.cfg.mp
        scale = float(mp.get("privacy_gradient_scale", 1.0))
        if scale != 1.0:
            ce = ce.detach() + scale * (ce - ce.detach())  # same value, the attack term's gradient times `scale`
        if self.form == "smp":
            return OBJECTIVES["smp"](l_ada, ce, self.lam, float(mp.beta), float(mp.delta))
        return OBJECTIVES["mp"](l_ada, ce, self.lam)

    def proxy_draw(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (noise, t) rows of the attack features: one random draw per row (the paper), or, with
        mp.proxy_timesteps, `proxy_draws` noises at each listed t (row-major: row, t, draw)."""
        if self.proxy_timesteps is None:
            return self.sample_noise(latents)
        reps = len(self.proxy_timesteps) * self.proxy_draws
        expanded = latents.repeat_interleave(reps, dim=0)
        noise, _ = self.sample_noise(expanded)
        per_row = torch.tensor(self.proxy_timesteps, device=latents.device).repeat_interleave(self.proxy_draws)
        return noise, per_row.repeat(latents.shape[0])

    def proxy_features(self, maps: torch.Tensor, n: int) -> torch.Tensor:
        """Attack features of n rows from their loss maps: the map itself, or the per-t mean over the draws
        of every listed t, concatenated along the channels."""
        if self.proxy_timesteps is None:
            return maps
        c, h, w = maps.shape[1:]
        return maps.view(n, len(self.proxy_timesteps), self.proxy_draws, c, h, w).mean(dim=2).reshape(n, -1, h, w)

    def proxy_rows(self, latents: torch.Tensor, states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        reps = 1 if self.proxy_timesteps is None else len(self.proxy_timesteps) * self.proxy_draws
        noise, timesteps = self.proxy_draw(latents)
        return latents.repeat_interleave(reps, dim=0), states.repeat_interleave(reps, dim=0), noise, timesteps

    def compute_loss(self, batch: Batch) -> tuple[torch.Tensor, dict]:
        """The defended loss of one micro-batch: L_ada and the attack term from independent (t, eps) draws."""
        comps = self.components
        n = batch.latents.shape[0]
        noise, timesteps = self.sample_noise(batch.latents)
        if self.cfg.mp.shared_forward:
            maps = loss_map(comps.unet, comps.noise_scheduler, batch.latents, batch.encoder_hidden_states, noise, timesteps)
            ada_maps, features = maps, maps
        else:
            latents2, states2, noise2, timesteps2 = self.proxy_rows(batch.latents, batch.encoder_hidden_states)
            maps = loss_map(comps.unet, comps.noise_scheduler, torch.cat([batch.latents, latents2]),
                            torch.cat([batch.encoder_hidden_states, states2]), torch.cat([noise, noise2]),
                            torch.cat([timesteps, timesteps2]))
            ada_maps, features = maps[:n], self.proxy_features(maps[n:], n)
        l_ada = ada_maps.mean()
        ce = self.attack_term(features)
        loss = self.objective(l_ada, ce)
        return loss, {"loss": loss.detach().item(), "l_ada": l_ada.detach().item(), "member_ce": ce.detach().item()}

    # ------------------------------------------------------------------ the attacker step (UNet frozen)
    def attacker_batch(self, index: int) -> tuple[Batch, torch.Tensor]:
        """D_aux^m rows (label 1) and D_aux^nm rows (label 0) of attacker update `index`."""
        rows_m, flips_m = self.aux_member_schedule.rows(index)
        rows_n, flips_n = self.aux_nonmember_schedule.rows(index)
        rows = np.concatenate([rows_m + len(self.split.members), rows_n + len(self.train_records)])
        batch = self.batch_for(rows, np.concatenate([flips_m, flips_n]), ATTACK_KEY + index)
        labels = torch.tensor([MEMBER] * len(rows_m) + [NONMEMBER] * len(rows_n), device=self.device)
        return batch, labels

    def attacker_features(self, batch: Batch) -> torch.Tensor:
        comps = self.components
        latents, states, noise, timesteps = self.proxy_rows(batch.latents, batch.encoder_hidden_states)
        with torch.no_grad():
            maps = loss_map(comps.unet, comps.noise_scheduler, latents, states, noise, timesteps)
        return self.proxy_features(maps, batch.latents.shape[0])

    def attacker_update(self, index: int) -> dict:
        """One Adam step of the attacker on CE; returns its accuracy and gain on this batch."""
        batch, labels = self.attacker_batch(index)
        features = self.attacker_features(batch)
        logits = self.attacker(features)
        ce = F.cross_entropy(logits.float(), labels)
        self.attacker_optimizer.zero_grad(set_to_none=True)
        ce.backward()
        if self.accelerator.num_processes > 1:
            for p in self.attacker.parameters():
                p.grad = self.accelerator.reduce(p.grad, reduction="mean")
        self.attacker_optimizer.step()
        self.attacker_optimizer.zero_grad(set_to_none=True)
        accuracy = (logits.detach().argmax(dim=1) == labels).float().mean()
        return {"attacker_accuracy": accuracy.item(), "attacker_gain": mi_gain(logits.detach(), labels).item()}

    def lora_phase(self, step: int) -> dict:
        """`mp.lora_steps` LoRA updates on the defended loss; the attacker takes no gradient and no step."""
        lora_steps, accum = int(self.cfg.mp.lora_steps), self.cfg.train.gradient_accumulation_steps
        self.attacker.requires_grad_(False)
        try:
            for j in range(lora_steps):
                logs = super().optimizer_step((step * lora_steps + j) * accum)
        finally:
            self.attacker.requires_grad_(True)
        return logs

    def attacker_phase(self, step: int) -> dict:
        """`mp.attacker_steps` attacker updates; the UNet runs under no_grad and its optimizer does not step."""
        attacker_steps = int(self.cfg.mp.attacker_steps)
        for j in range(attacker_steps):
            logs = self.attacker_update(step * attacker_steps + j)
        return logs

    def optimizer_step(self, micro_step: int) -> dict:
        """One min-max step: the LoRA phase (attacker frozen), then the attacker phase (UNet frozen)."""
        step = self.state.step
        logs = self.lora_phase(step)
        logs.update(self.attacker_phase(step))
        names = ("attacker_accuracy", "attacker_gain", "member_ce", "l_ada", "loss")
        values = torch.tensor([logs[k] for k in names], device=self.device)
        if self.accelerator.num_processes > 1:
            values = self.accelerator.reduce(values, reduction="mean")
        row = (float(step + 1), *values.tolist())
        self.attacker_state.history.append(row)
        logs.update(zip(names, row[1:]))
        self.accelerator.log({"proxy/accuracy": row[1], "proxy/gain": row[2]}, step=step + 1)
        return logs

    # ------------------------------------------------------------------ run files and report
    def history_summary(self) -> dict:
        """Mean attacker accuracy / gain (and losses) over the last 10% of steps."""
        hist = np.asarray(self.attacker_state.history, dtype=float).reshape(-1, len(AttackerState.COLUMNS))
        if not len(hist):
            return {}
        tail = hist[-max(1, len(hist) // 10):]
        return {f"final_{k}": float(v) for k, v in zip(AttackerState.COLUMNS[1:], tail[:, 1:].mean(axis=0))}

    def write_attacker_log(self) -> None:
        """proxy_attacker.csv (every step) and proxy_attacker.png (accuracy, gain and losses over training)."""
        hist = np.asarray(self.attacker_state.history, dtype=float).reshape(-1, len(AttackerState.COLUMNS))
        lines = [",".join(AttackerState.COLUMNS)] + [f"{int(r[0])}," + ",".join(f"{v:.6g}" for v in r[1:]) for r in hist]
        atomic_write_text(self.run_dir / "proxy_attacker.csv", "\n".join(lines) + "\n")
        if len(hist):
            atomic_write_bytes(self.run_dir / "proxy_attacker.png", self.plot_history(hist))

    def plot_history(self, hist: np.ndarray) -> bytes:
        import io

        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(10, 3.2))
        FigureCanvasAgg(fig)
        window = max(1, len(hist) // 50)

        def smooth(y):
            return np.convolve(y, np.ones(window) / window, mode="valid")

        x = hist[window - 1:, 0]
        panels = (("proxy attacker accuracy", [(1, "accuracy")], 0.5),
                  ("MI gain G = -CE (chance -log 2)", [(2, "gain")], -math.log(2)),
                  ("LoRA losses", [(4, "L_ada"), (3, "member CE"), (5, "defended loss")], None))
        for i, (title, series, chance) in enumerate(panels):
            ax = fig.add_subplot(1, 3, i + 1)
            for col, label in series:
                ax.plot(x, smooth(hist[:, col]), label=label)
            if chance is not None:
                ax.axhline(chance, color="grey", ls="--", lw=0.8, label="chance")
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step")
            ax.legend(fontsize=7)
        fig.suptitle(f"{TITLES[self.form]} (lambda={self.lam:g}); moving average over {window} steps", fontsize=9)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        return buf.getvalue()

    def after_export(self) -> None:
        if self.is_main:
            self.write_attacker_log()
        super().after_export()

    def privacy_summary(self) -> dict:
        mp = self.cfg.mp
        out = {
            "formal_guarantee": "none: an empirical defense (min-max training against a proxy membership attacker); "
                                "the attacks are the evidence",
            "defense": f"{TITLES[self.form]} (Luo et al., AAAI 2025)",
            "objective": FORMULAS[self.form],
            "lambda": self.lam,
        }
        if self.form == "smp":
            out.update({"smp_beta": float(mp.beta), "smp_delta": float(mp.delta)})  # "delta" alone reads as DP delta
        out["attacker_split"] = (f"{len(self.attacker_split.members)} members (also trained on) / "
                                 f"{len(self.attacker_split.nonmembers)} non-members, disjoint from the evaluation split")
        out.update({f"proxy_attacker_{k}": v for k, v in self.history_summary().items()})
        return out


@TRAINERS.register("smp_lora")
class SMPLoRATrainer(MPLoRATrainer):
    """SMP-LoRA: min over LoRA of L_ada / (beta + lambda * CE + delta), the stable ratio form."""

    name = "smp_lora"
    form = "smp"
