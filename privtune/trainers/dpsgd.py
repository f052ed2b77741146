"""DP-SGD on the LoRA parameters, with DPDM noise multiplicity.

Abadi et al., "Deep Learning with Differential Privacy", CCS 2016 (per-example clipping, Gaussian
noise, Poisson subsampling, moments accountant); Dockhorn, Cao, Vahdat & Kreis, "Differentially
Private Diffusion Models", TMLR 2023 (noise multiplicity: each example's loss is averaged over K
(timestep, noise) draws before its gradient is clipped, which lowers gradient variance at no
privacy cost); Lyu et al., "Differentially Private Latent Diffusion Models" (DP-LDM), arXiv
2305.15759 (DP fine-tuning of a publicly pre-trained latent diffusion model).

Per-example gradients come from Opacus' `GradSampleModule` hooks, attached only to the LoRA
modules (everything else is frozen), or, with `dp.grad_sample=vmap` (needed by DoRA, LoKr and
LoHa, whose layers Opacus has no formula for), from torch.func over the whole UNet
(`per_sample.per_example_grads`). Each example is repeated K times in the batch; its K rows of
per-sample gradients are summed (the loss is the per-example mean over the K draws) before the
clipping to `dp.max_grad_norm`, so sensitivity and accounting are those of one example. Clipping
and noise are applied here rather than by Opacus' DPOptimizer because of that K-row aggregation;
the Opacus accountants (rdp | prv | gdp) and `get_noise_multiplier` give the budget.

Under `accelerate launch` the logical batch (Poisson over the whole training set, expected size
train.batch_size x gradient_accumulation_steps x processes) is cut into chunks dealt round-robin to
the processes; each process sums its clipped per-example gradients, one all-reduce sums them, and
every process adds the *same* Gaussian draw (a generator seeded identically everywhere), so noise
enters exactly once per logical step and the processes stay in lockstep. The UNet is used outside
its DDP wrapper because processes run different numbers of chunks. Each chunk's latent, timestep
and diffusion-noise draws are seeded from (seed, step, chunk), so a run gives the same model on any
number of processes; they do not depend on the data, so the public `seed` may seed them.

Two secrets carry the guarantee: the *sampling seed* (the Poisson batches, the shuffled batches of
`dp.poisson=false` and the random flips of DP batches) and the *noise seed* (the Gaussian noise). Both
come from OS entropy per run (`secrets.randbits(63)`), are broadcast so every process holds the same
ones, and are stored only in the checkpoints (`DPState`), never in config.yaml, report.json,
privacy.json, the card, the logs or `lora/`. Amplification by subsampling holds only while the batches
are secret, and the noise protects nothing once its seed is known. `dp.sampling_seed` / `dp.noise_seed`
fix them for debugging; they are then written to config.yaml and `privacy_summary()` says so in its
`caveats`. Resuming restores both seeds from the checkpoint, so a resumed run draws exactly the batches
and noise of an uninterrupted one.
"""

from __future__ import annotations

import math
import secrets
import warnings

import numpy as np
import torch

from ..errors import ConfigError, PrivtuneError
from ..io import atomic_write_json
from ..losses import denoising_loss
from ..privacy import epsilon_spent, make_accountant, plan_budget
from ..privacy.accounting import budget_warnings
from ..rng import numpy_rng, seeded
from . import capabilities, steps
from .base import Batch, Trainer
from .registry import TRAINERS
from .sampling import BatchSchedule


class DPSGDError(PrivtuneError):
    """DP-SGD training went wrong in a way that would silently void the guarantee or the training."""


class DPSchedule:
    """The logical batch of every step (Poisson or shuffled) cut into chunks of `chunk` rows.

    A pure function of (sampling seed, step): a resumed run, once `reseed` gives it the checkpoint's
    sampling seed, draws exactly the batches of an uninterrupted one. The sampling seed is a DP secret
    (see the module docstring). Chunk c of a step goes to process c % world_size; micro-step
    `step * chunks_per_step + c` addresses chunk c of step `step`.
    """

    def __init__(self, num_rows: int, expected: int, chunk: int, seed: int, poisson: bool, random_flip: bool,
                 rank: int = 0, world_size: int = 1):
        self.num_rows = num_rows
        self.expected = expected
        self.sample_rate = expected / num_rows
        self.chunk = chunk
        self.poisson = poisson
        self.random_flip = random_flip
        self.rank = rank
        self.world_size = world_size
        self.chunks_per_step = math.ceil(num_rows / chunk)
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        """Draw every batch from sampling seed `seed` from now on (drops the cached step)."""
        self.seed = int(seed)
        # the plain schedule's stream, under the secret seed
        self._shuffle = BatchSchedule(self.num_rows, self.expected, self.seed, 0, 1, self.random_flip)
        self._cached: tuple[int, tuple[np.ndarray, np.ndarray]] | None = None

    def logical(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """All rows (and flip flags) of step `step`, over all processes."""
        if self._cached is not None and self._cached[0] == step:
            return self._cached[1]
        if self.poisson:
            rows = np.flatnonzero(numpy_rng(self.seed, "dp-poisson", step).random(self.num_rows) < self.sample_rate)
            if self.random_flip:
                flips = numpy_rng(self.seed, "dp-flip", step).random(self.num_rows)[rows] < 0.5
            else:
                flips = np.zeros(len(rows), dtype=bool)
            out = (rows, flips)
        else:
            out = self._shuffle.rows(step)
        self._cached = (step, out)
        return out

    def num_chunks(self, step: int) -> int:
        """Chunks of the whole logical batch of `step`."""
        return math.ceil(len(self.logical(step)[0]) / self.chunk)

    def local_chunks(self, step: int) -> range:
        """The chunk indices this process computes at `step`."""
        return range(self.rank, self.num_chunks(step), self.world_size)

    def rows(self, micro_step: int) -> tuple[np.ndarray, np.ndarray]:
        step, c = divmod(micro_step, self.chunks_per_step)
        rows, flips = self.logical(step)
        return rows[c * self.chunk:(c + 1) * self.chunk], flips[c * self.chunk:(c + 1) * self.chunk]


class DPState:
    """Checkpointed DP state: the accountant's history and the two DP secrets, the same on every process.

    The noise seed seeds the Gaussian noise (step t draws from a generator seeded with (noise seed, t));
    the sampling seed seeds the batches (`DPSchedule`, which `load_state_dict` re-seeds). Resuming needs
    only the seeds, and every process draws the identical batches and noise. `sampling_secret` /
    `noise_secret` record whether each seed came from OS entropy (False: fixed in the config, or a
    checkpoint that predates secret sampling seeds).

    A checkpoint without a sampling seed (written before it was kept secret) drew its batches from the
    public run seed; resuming it goes on with that seed (`legacy_sampling_seed`), so the run stays exact,
    and marks the sampling as not secret.
    """

    def __init__(self, accountant, noise_seed: int, sampling_seed: int, schedule: DPSchedule | None = None,
                 noise_secret: bool = True, sampling_secret: bool = True, legacy_sampling_seed: int | None = None):
        self.accountant = accountant
        self.noise_seed = int(noise_seed)
        self.sampling_seed = int(sampling_seed)
        self.noise_secret = bool(noise_secret)
        self.sampling_secret = bool(sampling_secret)
        self.legacy_sampling = False
        self.legacy_sampling_seed = legacy_sampling_seed
        self.schedule = schedule
        self.generator = torch.Generator()
        if schedule is not None:
            schedule.reseed(self.sampling_seed)

    def begin_step(self, step: int) -> None:
        self.generator.manual_seed(seeded(self.noise_seed, "dp-noise", step))

    def state_dict(self) -> dict:
        history = torch.tensor([list(h) for h in self.accountant.history], dtype=torch.float64).reshape(-1, 3)
        return {"history": history, "noise_seed": torch.tensor(self.noise_seed, dtype=torch.int64),
                "sampling_seed": torch.tensor(self.sampling_seed, dtype=torch.int64),
                "noise_secret": torch.tensor(self.noise_secret), "sampling_secret": torch.tensor(self.sampling_secret)}

    def load_state_dict(self, state: dict) -> None:
        if "noise_seed" not in state:
            raise DPSGDError("the checkpoint's DP state has no noise seed: it cannot be resumed exactly; start a new run")
        self.accountant.history = [(float(s), float(q), int(n)) for s, q, n in state["history"].tolist()]
        self.noise_seed = int(state["noise_seed"])
        if "noise_secret" in state:
            self.noise_secret = bool(state["noise_secret"])
        if "sampling_seed" in state:
            self.sampling_seed = int(state["sampling_seed"])
            self.sampling_secret = bool(state.get("sampling_secret", torch.tensor(True)))
            self.legacy_sampling = False
        else:
            if self.legacy_sampling_seed is None:
                raise DPSGDError("the checkpoint's DP state has no sampling seed and no run seed to fall back on")
            warnings.warn("privtune: this checkpoint predates secret sampling seeds: its Poisson batches were drawn from "
                          "the public run seed (`seed` in config.yaml), and the resumed run keeps drawing them from it so "
                          "that it stays exact. Epsilon's amplification by subsampling does not hold for this run; "
                          "privacy.json lists the caveat. Start a new run for secret batches.", stacklevel=2)
            self.sampling_seed = int(self.legacy_sampling_seed)
            self.sampling_secret = False
            self.legacy_sampling = True
        if self.schedule is not None:
            self.schedule.reseed(self.sampling_seed)


SAMPLING_SEED_CAVEAT = ("dp.sampling_seed is fixed and written to config.yaml: epsilon assumes the Poisson batches stay "
                        "secret; anyone who knows the seed knows every batch, and the budget without amplification by "
                        "subsampling is several times larger")
LEGACY_SAMPLING_CAVEAT = ("this run resumed from a checkpoint written before sampling seeds were kept secret: its Poisson "
                          "batches follow the public run seed in config.yaml, so anyone who knows it knows every batch, "
                          "and the budget without amplification by subsampling is several times larger")
SAMPLING_NOT_SECRET_CAVEAT = ("the Poisson sampling seed of this run is not secret (dp.sampling_seed fixed it when the run "
                              "started, or it is the public run seed of a checkpoint that predates secret sampling seeds): "
                              "epsilon assumes the batches stay secret; anyone who knows the seed knows every batch, and "
                              "the budget without amplification by subsampling is several times larger")
NOISE_SEED_CAVEAT = ("dp.noise_seed is fixed and written to config.yaml: epsilon assumes the Gaussian noise stays secret; "
                     "anyone who knows the seed can regenerate the noise and subtract it, which removes the noise "
                     "entirely and leaves no differential privacy guarantee")
NOISE_NOT_SECRET_CAVEAT = ("the Gaussian noise seed of this run was fixed in its configuration (dp.noise_seed) when it "
                           "started: anyone who knows the seed can regenerate the noise and subtract it, which removes "
                           "the noise entirely and leaves no differential privacy guarantee")


def check_seed(dp, key: str) -> int | None:
    """dp.<key>: null (OS entropy) or an integer in [0, 2**63)."""
    value = dp.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2 ** 63:
        raise ConfigError(f"dp.{key} must be null (a secret seed from OS entropy) or an integer in [0, 2**63) (got {value!r})")
    return int(value)


@TRAINERS.register("dpsgd")
class DPSGDTrainer(Trainer):
    """DP-SGD (per-example clipping + Gaussian noise + accountant) on the UNet's LoRA parameters."""

    name = "dpsgd"
    supports = capabilities.ALL - {"memorization_filter", "text_encoder", "gradient_checkpointing", "fp16", "max_grad_norm"}
    unsupported_reasons = {
        "memorization_filter": "its loss is the per-example DP loss",
        "text_encoder": "a text-encoder LoRA would share the budget",
        "gradient_checkpointing": "Opacus hooks would see each forward twice",
        "fp16": "it would scale per-example gradients before clipping",
        "max_grad_norm": "it clips per example with dp.max_grad_norm",
    }

    # ------------------------------------------------------------------ checks and budget
    def validate_config(self) -> None:
        super().validate_config()
        cfg = self.cfg
        if "dp" not in cfg:
            raise ConfigError("trainer dpsgd needs a dp: section; use recipe=dpsgd (or inherit from it)")
        dp = cfg.dp  # value ranges: privtune.schema.defenses.DP, checked at load time
        check_seed(dp, "noise_seed")
        check_seed(dp, "sampling_seed")
        if cfg.lora.method != "lora" and dp.grad_sample != "vmap":
            raise ConfigError(f"lora.method={cfg.lora.method} under DP-SGD needs dp.grad_sample=vmap: Opacus' per-layer "
                              f"gradients (dp.grad_sample={dp.grad_sample}) cover nn.Linear / nn.Conv2d only, not DoRA's "
                              "magnitude vectors or LoKr / LoHa factors; set dp.grad_sample=vmap")

    @property
    def expected_batch(self) -> int:
        """Expected logical batch over all processes (train.batch_size is per process, as everywhere)."""
        return self.cfg.train.batch_size * self.cfg.train.gradient_accumulation_steps * self.accelerator.num_processes

    def setup_data(self) -> None:
        super().setup_data()
        self.budget = plan_budget(self.cfg.dp, len(self.train_records), self.expected_batch, self.cfg.train.max_steps)
        if self.is_main:
            for line in budget_warnings(self.budget):
                print(f"privtune: warning: {line}")

    # ------------------------------------------------------------------ model hooks and state
    def prepare(self) -> None:
        from accelerate.utils import broadcast_object_list
        from opacus import GradSampleModule

        super().prepare()
        cfg = self.cfg
        acc = self.accelerator
        self.components.unet = acc.unwrap_model(self.components.unet)
        self.grad_sampler = None  # dp.grad_sample=vmap: torch.func, no hooks
        if cfg.dp.grad_sample != "vmap":
            self.grad_sampler = GradSampleModule(self.components.unet, batch_first=True, loss_reduction="sum", strict=True,
                                                 force_functorch=cfg.dp.grad_sample == "functorch")
        # The DP secrets: OS entropy unless fixed for debugging, the main process's on every process. A resumed
        # run replaces both with the checkpoint's when `resume_if_asked` loads DPState (which re-seeds the schedule).
        fixed = [check_seed(cfg.dp, "noise_seed"), check_seed(cfg.dp, "sampling_seed")]
        seeds = [secrets.randbits(63) if s is None else s for s in fixed]
        if acc.num_processes > 1:
            broadcast_object_list(seeds)
        self.schedule = DPSchedule(len(self.train_records), self.expected_batch, cfg.train.batch_size, seeds[1],
                                   bool(cfg.dp.poisson), cfg.data.random_flip, acc.process_index, acc.num_processes)
        self.dp_state = DPState(make_accountant(self.budget.accountant), seeds[0], seeds[1], schedule=self.schedule,
                                noise_secret=fixed[0] is None, sampling_secret=fixed[1] is None,
                                legacy_sampling_seed=int(cfg.seed))
        self.accelerator.register_for_checkpointing(self.dp_state)
        self._update_checked = False
        if not cfg.dp.poisson and self.is_main:
            print("privtune: dp.poisson=false: shuffled fixed-size batches; the reported epsilon assumes Poisson sampling")

    def resume_if_asked(self) -> None:
        """Resume; the DP secrets (and the secrecy flags) are the checkpoint's, whatever the config now fixes."""
        super().resume_if_asked()
        if self.cfg.resume is None or not self.is_main:
            return
        for key, restored in (("sampling_seed", self.dp_state.sampling_seed), ("noise_seed", self.dp_state.noise_seed)):
            fixed = self.cfg.dp.get(key)
            if fixed is not None and int(fixed) != restored:
                print(f"privtune: dp.{key}={fixed} is not used: the resumed run keeps its checkpoint's {key.replace('_', ' ')}")

    @property
    def accountant(self):
        return self.dp_state.accountant

    # ------------------------------------------------------------------ loss and step
    def draws(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each example's latent and condition repeated K times, with the K (noise, timestep) draws of each."""
        k = int(self.cfg.dp.noise_multiplicity)
        latents = batch.latents.repeat_interleave(k, dim=0)
        noise, timesteps = self.sample_noise(latents)
        return latents, batch.encoder_hidden_states.repeat_interleave(k, dim=0), noise, timesteps

    def compute_loss(self, batch: Batch) -> tuple[torch.Tensor, dict]:
        """Sum over examples of each example's denoising loss averaged over K (timestep, noise) draws; with
        train.snr_gamma each draw's loss carries its min-SNR weight, so the weighting is inside every per-example
        gradient before it is clipped."""
        k = int(self.cfg.dp.noise_multiplicity)
        latents, states, noise, timesteps = self.draws(batch)
        rows = denoising_loss(self.components.unet, self.components.noise_scheduler, latents, states, noise, timesteps,
                              snr_gamma=self.cfg.train.snr_gamma)
        per_example = rows.view(-1, k).mean(dim=1)
        return per_example.sum(), {"loss": per_example.mean().detach().item()}

    def example_grads(self, batch: Batch) -> tuple[list[torch.Tensor], float]:
        """Per-example gradients [n, *shape] of the trainable parameters (each the mean over its K draws) and the
        mean loss: from Opacus' hooks, or from torch.func (`dp.grad_sample=vmap`) with the same draws."""
        if self.grad_sampler is not None:
            loss, logs = self.compute_loss(batch)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss.backward()
            return self.per_example_grads(len(batch.rows)), logs["loss"]
        from .per_sample import per_example_grads

        k, n = int(self.cfg.dp.noise_multiplicity), len(batch.rows)
        latents, states, noise, timesteps = self.draws(batch)
        unet, scheduler, gamma = self.components.unet, self.components.noise_scheduler, self.cfg.train.snr_gamma
        names = {id(p): name for name, p in unet.named_parameters()}
        params = {names[id(p)]: p for p in self.trainable}

        def example_loss(call, lat, st, nz, ts):
            return denoising_loss(call, scheduler, lat, st, nz, ts, snr_gamma=gamma).mean()

        per_example = [t.reshape(n, k, *t.shape[1:]) for t in (latents, states, noise, timesteps)]
        grads, losses = per_example_grads(unet, params, example_loss, *per_example)
        return [grads[name].float() for name in params], float(losses.mean())

    def per_example_grads(self, n: int) -> list[torch.Tensor]:
        """Per-example gradients [n, *shape] (fp32) from the hooks' K rows per example; clears them."""
        k = int(self.cfg.dp.noise_multiplicity)
        grads = []
        for p in self.trainable:
            sample = getattr(p, "grad_sample", None)
            if sample is None:
                raise DPSGDError("Opacus computed no per-example gradient for a LoRA parameter: its hooks are not on the "
                                 "modules the optimizer trains, so DP-SGD would update nothing (or leak unclipped gradients)")
            sample = sample.float().view(n, k, *p.shape)
            grads.append(sample[:, 0] if k == 1 else sample.sum(dim=1))
            p.grad_sample = None
            p.grad = None
        return grads

    def clip_factors(self, grads: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example scale min(1, C / norm) and the norms before clipping."""
        norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads]).norm(dim=0)
        return (float(self.cfg.dp.max_grad_norm) / (norms + 1e-6)).clamp(max=1.0), norms

    def clip(self, grads: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Each example's gradient scaled to norm <= C; returns the scaled gradients and the norms before."""
        factor, norms = self.clip_factors(grads)
        return [g * factor.view(-1, *([1] * (g.ndim - 1))) for g in grads], norms

    def add_clipped_sum(self, total: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
        """total += sum_i min(1, C/|g_i|) g_i, as one contraction per parameter (no clipped copies); returns the norms."""
        factor, norms = self.clip_factors(grads)
        for t, g in zip(total, grads):
            t.add_(torch.tensordot(factor, g, dims=1))
        return norms

    def noise(self, like: torch.Tensor) -> torch.Tensor:
        if self.budget.noise_multiplier == 0:
            return torch.zeros_like(like)
        std = self.budget.noise_multiplier * float(self.cfg.dp.max_grad_norm)
        return (torch.randn(like.shape, generator=self.dp_state.generator, dtype=torch.float32) * std).to(like.device)

    def optimizer_step(self, micro_step: int) -> dict:
        """One DP-SGD step: per-example grads over the logical batch, clip, sum, noise, divide by E|B|.

        `loss.backward()`, not `accelerator.backward`: the latter divides by the accumulation steps, which
        would scale the per-example gradients before clipping (fp16 loss scaling is refused for the same reason).
        """
        step = self.state.step
        total = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in self.trainable]
        stats = torch.zeros(4, dtype=torch.float64)  # rows, loss sum, grad-norm sum, clipped rows
        for c in self.schedule.local_chunks(step):
            self.state.reseed(c, rank=0)  # chunk c's draws do not depend on which process computes it
            batch = self.micro_batch(step * self.schedule.chunks_per_step + c)
            grads, loss = self.example_grads(batch)
            norms = self.add_clipped_sum(total, grads)
            stats += torch.tensor([len(batch.rows), loss * len(batch.rows), float(norms.sum()),
                                   float((norms > float(self.cfg.dp.max_grad_norm)).sum())], dtype=torch.float64)
        total, stats = self.sum_over_processes(total, stats)
        self.dp_state.begin_step(step)
        before = None if self._update_checked else [p.detach().clone() for p in self.trainable]
        for p, t in zip(self.trainable, total):
            p.grad = ((t + self.noise(t)) / self.expected_batch).to(p.dtype)
        moves = self.optimizer.param_groups[0]["lr"] > 0 and any(bool(p.grad.abs().sum() > 0) for p in self.trainable)
        steps.apply_update(self, clip_groups=[])  # clipping happened per example above
        self.accountant.step(noise_multiplier=self.budget.noise_multiplier, sample_rate=self.budget.sample_rate)
        if before is not None:
            self._check_update(before, moves)
        size, loss_sum, norm_sum, clipped = stats.tolist()
        logs = {"batch_size": size}
        if size:
            logs.update(loss=loss_sum / size, grad_norm=norm_sum / size, clipped_fraction=clipped / size)
        return logs

    def sum_over_processes(self, total: list[torch.Tensor], stats: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Sum the clipped gradient sums and the log statistics of all processes (one all-reduce each)."""
        if self.accelerator.num_processes == 1:
            return total, stats
        flat = self.accelerator.reduce(torch.cat([t.flatten() for t in total]), reduction="sum")
        stats = self.accelerator.reduce(stats.to(self.device), reduction="sum").cpu()
        out, offset = [], 0
        for t in total:
            out.append(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
        return out, stats

    def _check_update(self, before: list[torch.Tensor], moves: bool) -> None:
        """The known silent failure: the optimizer stepped with a non-zero gradient and lr, but no LoRA weight moved."""
        if not moves:
            return
        if all(torch.equal(b, p.detach()) for b, p in zip(before, self.trainable)):
            raise DPSGDError("the LoRA weights did not change after the first DP-SGD step although the noisy gradient is "
                             "non-zero: the optimizer does not hold the parameters Opacus computes gradients for")
        self._update_checked = True

    # ------------------------------------------------------------------ budget
    def epsilon(self, history=None) -> float:
        accountant = self.accountant if history is None else make_accountant(self.budget.accountant, history)
        return epsilon_spent(accountant, self.budget.delta)

    def step_logs(self) -> dict:
        return {"epsilon": self.epsilon()}

    def should_stop(self) -> bool:
        """Stop before a step that would take epsilon past dp.target_epsilon."""
        target = self.budget.target_epsilon
        if target is None or self.state.step >= self.cfg.train.max_steps:
            return False
        nxt = make_accountant(self.budget.accountant, self.accountant.history)
        nxt.step(noise_multiplier=self.budget.noise_multiplier, sample_rate=self.budget.sample_rate)
        eps = self.epsilon(nxt.history)
        if eps > target:
            self.stop_reason = f"one more step would spend epsilon={eps:.4g} > dp.target_epsilon={target:g}"
            return True
        return False

    def privacy_summary(self) -> dict:
        dp = self.cfg.dp
        steps = sum(n for _, _, n in self.accountant.history)
        ema = {}
        if self.ema is not None:
            ema = {"ema": f"the released LoRA is the EMA (decay {float(self.cfg.train.ema.decay):g}) of the DP-SGD iterates: "
                          "post-processing, it costs no epsilon"}
        return {**ema,
            "epsilon": self.epsilon(), "delta": self.budget.delta, "noise_multiplier": self.budget.noise_multiplier,
            "sample_rate": self.budget.sample_rate, "steps": steps, "accountant": self.budget.accountant,
            "max_grad_norm": float(dp.max_grad_norm), "noise_multiplicity": int(dp.noise_multiplicity),
            "target_epsilon": self.budget.target_epsilon, "poisson": bool(dp.poisson),
            "secret_sampling": self.dp_state.sampling_secret and dp.get("sampling_seed") is None,
            "secret_noise": self.dp_state.noise_secret and dp.get("noise_seed") is None,
            "caveats": self.caveats(),
        }

    def caveats(self) -> list[str]:
        """Plain-English limits of the reported epsilon: a DP secret that is not secret (never the seeds themselves)."""
        dp, state = self.cfg.dp, self.dp_state
        out = []
        if dp.get("sampling_seed") is not None:
            out.append(SAMPLING_SEED_CAVEAT)
        elif state.legacy_sampling:
            out.append(LEGACY_SAMPLING_CAVEAT)
        elif not state.sampling_secret:
            out.append(SAMPLING_NOT_SECRET_CAVEAT)
        if dp.get("noise_seed") is not None:
            out.append(NOISE_SEED_CAVEAT)
        elif not state.noise_secret:
            out.append(NOISE_NOT_SECRET_CAVEAT)
        return out

    # ------------------------------------------------------------------ evaluation without hooks
    def validate(self, step: int):
        if self.grad_sampler is None:
            return super().validate(step)
        self.grad_sampler.disable_hooks()
        try:
            return super().validate(step)
        finally:
            self.grad_sampler.enable_hooks()

    def finish(self) -> None:
        """Write privacy.json (the guarantee, even with eval off); remove the Opacus hooks before export and evaluation."""
        if self.grad_sampler is not None:
            self.grad_sampler.remove_hooks()
            for module in self.grad_sampler.modules():
                if hasattr(module, "activations"):
                    del module.activations
        for p in self.trainable:
            for attr in ("grad_sample", "_forward_counter"):
                if hasattr(p, attr):
                    delattr(p, attr)
        if self.is_main:
            atomic_write_json(self.run_dir / "privacy.json", self.privacy_summary())
        super().finish()
