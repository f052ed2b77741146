"""The DP-SGD trainer: per-example clipping, noise multiplicity, noise scale, accounting, Poisson sampling, resume."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from privtune.export import LORA_FILE
from privtune.train import main

from .conftest import prepare_trainer, train_args

torch.set_num_threads(1)


def dp_args(run_dir, *extra, steps=4):
    return ["recipe=dpsgd", *train_args(run_dir, steps=steps)[1:], *extra]


def make_trainer(run_dir, *overrides, steps=4):
    from privtune.config import load_config
    from privtune.trainers import get_trainer

    return get_trainer("dpsgd")(load_config("dpsgd", dp_args(run_dir, *overrides, steps=steps)[1:]))


def prepared(run_dir, *overrides):
    return prepare_trainer(make_trainer(run_dir, *overrides))


def lora_weights(run_dir):
    return load_file(str(run_dir / "lora" / LORA_FILE))


def test_per_example_gradients_are_k_draw_means_clipped(tmp_path, base_model):
    """Hooks + K-row aggregation + clipping equal a per-example, per-draw loop of plain autograd."""
    k, c = 3, 0.05
    trainer = prepared(tmp_path / "run", f"model.base={base_model}", "dp.target_epsilon=null", "dp.noise_multiplier=0",
                       f"dp.max_grad_norm={c}", f"dp.noise_multiplicity={k}", "dp.poisson=false", "train.batch_size=3")
    batch = trainer.micro_batch(0)
    n = len(batch.rows)
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn((n * k, *batch.latents.shape[1:]), generator=gen)
    timesteps = torch.randint(0, 1000, (n * k,), generator=gen)
    trainer.sample_noise = lambda latents: (noise[:len(latents)], timesteps[:len(latents)])
    loss, _ = trainer.compute_loss(batch)
    loss.backward()
    grads = trainer.per_example_grads(n)
    clipped, norms = trainer.clip(grads)
    total = [torch.zeros(p.shape) for p in trainer.trainable]
    trainer.add_clipped_sum(total, grads)  # what the step aggregates: the sum of the clipped gradients
    for t, g in zip(total, clipped):
        torch.testing.assert_close(t, g.sum(dim=0), rtol=1e-5, atol=1e-8)

    trainer.grad_sampler.disable_hooks()
    from privtune.losses import denoising_loss

    comps = trainer.components
    for i in range(n):
        draws = []
        for j in range(k):
            r = i * k + j
            row = denoising_loss(comps.unet, comps.noise_scheduler, batch.latents[i:i + 1],
                                 batch.encoder_hidden_states[i:i + 1], noise[r:r + 1], timesteps[r:r + 1])
            draws.append(torch.autograd.grad(row.sum(), trainer.trainable, allow_unused=True))
        ref = [torch.stack([d[p] if d[p] is not None else torch.zeros_like(trainer.trainable[p]) for d in draws]).mean(0)
               for p in range(len(trainer.trainable))]
        for got, want in zip(grads, ref):
            torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-7)
        ref_norm = torch.sqrt(sum((w ** 2).sum() for w in ref))
        assert torch.isclose(norms[i], ref_norm, rtol=1e-4)
        clipped_norm = torch.sqrt(sum((g[i] ** 2).sum() for g in clipped))
        assert clipped_norm <= c * (1 + 1e-5)
        scale = min(1.0, c / float(ref_norm))
        for got, want in zip(clipped, ref):
            torch.testing.assert_close(got[i], want * scale, rtol=1e-4, atol=1e-8)
    assert (norms > c).any(), "the clipping norm should bind for some example"


def test_noise_std_and_only_lora_changes(tmp_path, base_model):
    """With a tiny C the gradient is noise of std sigma*C / E|B| per coordinate; base weights never move."""
    sigma, c = 2.0, 1e-6
    trainer = prepared(tmp_path / "run", f"model.base={base_model}", "dp.target_epsilon=null",
                       f"dp.noise_multiplier={sigma}", f"dp.max_grad_norm={c}", "dp.noise_seed=5", "dp.noise_multiplicity=2")
    unet = trainer.accelerator.unwrap_model(trainer.components.unet)
    base = {n: p.detach().clone() for n, p in unet.named_parameters() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}
    assert base and lora and all("lora_" in n for n in lora)
    seen = []
    step = trainer.optimizer.step

    def record(*args, **kwargs):
        seen.append(torch.cat([p.grad.flatten() for p in trainer.trainable]) * trainer.expected_batch)
        return step(*args, **kwargs)

    trainer.optimizer.step = record
    for s in range(2):
        trainer.optimizer_step(s)
        trainer.state.step += 1
    noise = torch.cat(seen)
    assert noise.numel() > 20000
    assert abs(noise.std().item() / (sigma * c) - 1) < 0.03
    assert abs(noise.mean().item()) < 0.03 * sigma * c
    for n, p in unet.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n
    assert any(not torch.equal(p, lora[n]) for n, p in unet.named_parameters() if n in lora)
    assert trainer.privacy_summary()["steps"] == 2
    empty = next(s for s in range(2, 10000) if trainer.schedule.num_chunks(s) == 0)
    trainer.state.step = empty
    assert trainer.optimizer_step(0)["batch_size"] == 0.0
    assert abs(seen[-1].std().item() / (sigma * c) - 1) < 0.05
    assert trainer.privacy_summary()["steps"] == 3


@pytest.mark.parametrize("batch", [["train.batch_size=4"], ["train.batch_size=2", "train.gradient_accumulation_steps=2"]])
def test_no_noise_no_clipping_is_plain_lora(tmp_path, base_model, batch):
    lora_run, dp_run = tmp_path / "lora", tmp_path / "dp"
    assert main(train_args(lora_run, f"model.base={base_model}", "train.max_grad_norm=0", *batch, steps=3)) == 0
    assert main(dp_args(dp_run, f"model.base={base_model}", "dp.target_epsilon=null", "dp.noise_multiplier=0",
                        "dp.max_grad_norm=.inf", "dp.noise_multiplicity=1", "dp.poisson=false", "dp.sampling_seed=0",
                        *batch, steps=3)) == 0  # the shuffled batches of plain LoRA's seed=0
    a, b = lora_weights(lora_run), lora_weights(dp_run)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_poisson_schedule():
    from privtune.trainers.dpsgd import DPSchedule

    sched = DPSchedule(200, 10, 4, seed=3, poisson=True, random_flip=True)
    sizes = np.array([len(sched.logical(s)[0]) for s in range(3000)])
    assert abs(sizes.mean() - 10) < 0.25
    assert abs(sizes.var() - 200 * 0.05 * 0.95) < 1.0
    again = DPSchedule(200, 10, 4, seed=3, poisson=True, random_flip=True)
    for s in (0, 17, 2999):
        rows, flips = sched.logical(s)
        assert np.array_equal(rows, again.logical(s)[0]) and np.array_equal(flips, again.logical(s)[1])
        chunks = [sched.rows(s * sched.chunks_per_step + c)[0] for c in range(sched.num_chunks(s))]
        assert all(len(ch) <= 4 for ch in chunks)
        assert np.array_equal(np.concatenate(chunks) if chunks else np.array([], dtype=int), rows)
    assert not np.array_equal(sched.logical(1)[0], DPSchedule(200, 10, 4, seed=4, poisson=True, random_flip=False).logical(1)[0])


def opacus_epsilon(accountant, sigma, q, steps, delta):
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = [(sigma, q, steps)]
    return acc.get_epsilon(delta=delta)


@pytest.mark.parametrize("accountant", ["rdp", "gdp", "prv"])
def test_calibrated_budget_matches_opacus(accountant):
    from omegaconf import OmegaConf

    from privtune.privacy import plan_budget

    dp = OmegaConf.create({"target_epsilon": 4.0, "delta": None, "noise_multiplier": None, "max_grad_norm": 1.0,
                           "accountant": accountant})
    budget = plan_budget(dp, 500, 25, 200)
    assert budget.sample_rate == 25 / 500 and budget.delta == 1 / 5000
    eps = opacus_epsilon(accountant, budget.noise_multiplier, budget.sample_rate, 200, budget.delta)
    assert 4.0 - 0.05 <= eps <= 4.0


def test_epsilon_reported_and_target_stops_training(tmp_path, base_model):
    """A fixed sigma with a target: training stops before the step that would exceed it; epsilon is Opacus'."""
    q, sigma, delta = 4 / 8, 1.5, 1e-3
    target = opacus_epsilon("rdp", sigma, q, 2, delta) * 1.001
    trainer = make_trainer(tmp_path / "run", f"model.base={base_model}", f"dp.target_epsilon={target}",
                           f"dp.noise_multiplier={sigma}", f"dp.delta={delta}", "dp.noise_multiplicity=2", "train.validation_every=1",
                           "train.validation_inference_steps=2", "eval.enabled=true", "eval.attacks=[loss]", "eval.utility=false",
                           "eval.bootstrap=20", "eval.attack_params={loss: {timesteps: [100], draws: 1}}", steps=6)
    trainer.run()
    summary = trainer.privacy_summary()
    assert trainer.state.step == 2 and summary["steps"] == 2
    assert summary["epsilon"] == pytest.approx(opacus_epsilon("rdp", sigma, q, 2, delta), rel=1e-12)
    assert summary["epsilon"] <= target
    assert {"epsilon", "delta", "noise_multiplier", "sample_rate", "steps", "accountant", "max_grad_norm",
            "noise_multiplicity"} <= summary.keys()
    for name in (f"lora/{LORA_FILE}", "validation/step-000001.png", "validation/step-000002.png"):
        assert (tmp_path / "run" / name).is_file(), name
    assert not hasattr(trainer.grad_sampler, "autograd_grad_sample_hooks")
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["privacy"]["epsilon"] == pytest.approx(summary["epsilon"])
    assert report["privacy"]["noise_multiplicity"] == summary["noise_multiplicity"]


def test_silent_failures_are_errors(tmp_path, base_model):
    """No weight moving after the first step, or LoRA modules without per-example gradients, stop the run."""
    from privtune.trainers.dpsgd import DPSGDError

    trainer = prepared(tmp_path / "run", f"model.base={base_model}", "dp.target_epsilon=null", "dp.noise_multiplier=1",
                       "dp.noise_seed=1", "dp.noise_multiplicity=2")
    trainer.optimizer.step = lambda *args, **kwargs: None
    with pytest.raises(DPSGDError, match="did not change"):
        trainer.optimizer_step(0)
    trainer.grad_sampler.remove_hooks()
    with pytest.raises(DPSGDError, match="no per-example gradient"):
        trainer.optimizer_step(0)


def test_tiny_target_epsilon_is_said_before_training():
    """A budget the accountant can meet only with overwhelming noise (epsilon then reads 0) gets a warning."""
    from omegaconf import OmegaConf

    from privtune.privacy import plan_budget
    from privtune.privacy.accounting import budget_warnings

    dp = OmegaConf.create({"accountant": "rdp", "delta": None, "target_epsilon": 1e-6, "max_grad_norm": 1.0,
                           "noise_multiplier": None})
    tiny = plan_budget(dp, 8, 4, 4)
    (line,) = budget_warnings(tiny)
    assert "learn next to nothing" in line and "dp.target_epsilon=1e-06" in line
    assert budget_warnings(plan_budget(OmegaConf.merge(dp, {"target_epsilon": 8}), 8, 4, 4)) == []


@pytest.mark.parametrize("args, message", [
    (["dp.target_epsilon=0"], "target_epsilon must be > 0"),
    (["dp.target_epsilon=-1"], "target_epsilon must be > 0"),
    (["dp.delta=1"], "dp.delta must be in (0, 1)"),
    (["dp.delta=0.2"], "not below 1/N"),
    (["dp.target_epsilon=1", "train.max_steps=20000"], "noise multiplier above 100"),
    (["dp.target_epsilon=1e-6", "dp.noise_multiplier=5"], "in its first step"),
    (["dp.accountant=moments"], "dp.accountant must be one of"),
    (["dp.target_epsilon=null"], "set dp.target_epsilon"),
    (["dp.max_grad_norm=.inf"], "unbounded sensitivity"),
    (["dp.noise_multiplicity=0"], "noise_multiplicity must be >= 1"),
    (["dp.sampling_seed=-1"], "dp.sampling_seed must be null"),
    (["dp.noise_seed=0.5"], "dp.noise_seed=0.5 in the command line: expected an integer or null"),
    (["train.max_grad_norm=1.0"], "train.max_grad_norm=0"),
    (["train.batch_size=16"], "exceeds the 8 training examples"),
])
def test_bad_budgets_fail_before_training(tmp_path, base_model, capsys, args, message):
    run = tmp_path / "run"
    assert main(dp_args(run, f"model.base={base_model}", *args)) == 2
    assert message in capsys.readouterr().err
    assert not (run / "config.yaml").exists()


def test_resume_equals_uninterrupted(tmp_path, base_model):
    full, part = tmp_path / "full", tmp_path / "part"
    common = (f"model.base={base_model}", "dp.target_epsilon=null", "dp.noise_multiplier=0.8", "dp.noise_multiplicity=2",
              "dp.noise_seed=7", "dp.sampling_seed=11", "lora.dropout=0.1")
    a = make_trainer(full, *common, steps=4)
    a.run()
    make_trainer(part, *common, steps=2).run()
    b = make_trainer(part, *common, "resume=latest", steps=4)
    b.run()
    wa, wb = lora_weights(full), lora_weights(part)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6)
    assert b.accountant.history == a.accountant.history
    assert b.privacy_summary() == a.privacy_summary()
    assert math.isfinite(a.privacy_summary()["epsilon"])


def dp_secrets(run_dir):
    """The DP state accelerate checkpointed (custom_checkpoint_<i>.pkl) in the run's latest checkpoint."""
    latest = max((run_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    states = [torch.load(f, weights_only=False) for f in sorted(latest.glob("custom_checkpoint_*.pkl"))]
    found = [s for s in states if isinstance(s, dict) and "sampling_seed" in s]
    assert len(found) == 1, [list(s) for s in states]
    return int(found[0]["sampling_seed"]), int(found[0]["noise_seed"])


def logical_batches(trainer, steps=5):
    return [tuple(a.tolist() for a in trainer.schedule.logical(s)) for s in range(steps)]


def test_sampling_seed_is_secret_per_run_unless_fixed(tmp_path, base_model):
    """The same run seed draws different Poisson batches (and flips) in two runs; dp.sampling_seed fixes them, with caveats."""
    from privtune.trainers.dpsgd import DPSchedule

    common = (f"model.base={base_model}", "seed=3", "data.random_flip=true")
    a, b = (prepared(tmp_path / name, *common) for name in ("a", "b"))
    assert logical_batches(a) != logical_batches(b)
    assert a.dp_state.sampling_seed != b.dp_state.sampling_seed and a.dp_state.noise_seed != b.dp_state.noise_seed
    assert a.schedule.seed == a.dp_state.sampling_seed
    shuffled = [DPSchedule(8, 4, 4, seed=t.dp_state.sampling_seed, poisson=False, random_flip=True) for t in (a, b)]
    assert [shuffled[0].logical(s)[0].tolist() for s in range(5)] != [shuffled[1].logical(s)[0].tolist() for s in range(5)]
    summary = a.privacy_summary()
    assert summary["secret_sampling"] is True and summary["secret_noise"] is True and summary["caveats"] == []

    c, d = (prepared(tmp_path / name, *common, "dp.sampling_seed=123") for name in ("c", "d"))
    assert logical_batches(c) == logical_batches(d)
    assert c.dp_state.sampling_seed == 123 and c.dp_state.noise_seed != d.dp_state.noise_seed
    summary = c.privacy_summary()
    assert summary["secret_sampling"] is False and summary["secret_noise"] is True
    assert len(summary["caveats"]) == 1 and "dp.sampling_seed" in summary["caveats"][0]
    assert "123" not in " ".join(summary["caveats"])

    e = prepared(tmp_path / "e", *common, "dp.noise_seed=5")
    summary = e.privacy_summary()
    assert summary["secret_sampling"] is True and summary["secret_noise"] is False
    assert len(summary["caveats"]) == 1 and "dp.noise_seed" in summary["caveats"][0]
    assert "removes the noise" in summary["caveats"][0]


def test_checkpoint_without_sampling_seed_falls_back_to_run_seed(tmp_path, base_model):
    """An older checkpoint (no sampling seed) resumes exactly on the public run seed it used, flagged as not secret."""
    from privtune.trainers.dpsgd import DPSchedule, DPSGDError

    trainer = prepared(tmp_path / "run", f"model.base={base_model}", "seed=4")
    old = {k: v for k, v in trainer.dp_state.state_dict().items() if k in ("history", "noise_seed")}
    with pytest.warns(UserWarning, match="predates secret sampling seeds"):
        trainer.dp_state.load_state_dict(old)
    assert trainer.schedule.seed == trainer.dp_state.sampling_seed == 4
    legacy = DPSchedule(len(trainer.train_records), trainer.expected_batch, 4, seed=4, poisson=True, random_flip=False)
    assert logical_batches(trainer) == [tuple(a.tolist() for a in legacy.logical(s)) for s in range(5)]
    summary = trainer.privacy_summary()
    assert summary["secret_sampling"] is False and summary["secret_noise"] is True
    assert len(summary["caveats"]) == 1 and "before sampling seeds were kept secret" in summary["caveats"][0]
    with pytest.raises(DPSGDError, match="no noise seed"):
        trainer.dp_state.load_state_dict({"history": old["history"]})


def test_dp_secrets_only_in_checkpoints(tmp_path, base_model, capfd):
    """After a real run (eval, card, tensorboard), no file outside checkpoints/ and no log line holds either DP seed."""
    run = tmp_path / "run"
    assert main(dp_args(run, f"model.base={base_model}", "dp.target_epsilon=null", "dp.noise_multiplier=1",
                        "dp.noise_multiplicity=1", "tracking=tensorboard", "eval.enabled=true", "eval.attacks=[loss]",
                        "eval.utility=false", "eval.bootstrap=20", "eval.attack_params={loss: {timesteps: [100], draws: 1}}",
                        steps=2)) == 0
    out, err = capfd.readouterr()
    sampling, noise = dp_secrets(run)
    assert sampling != noise
    privacy = json.loads((run / "privacy.json").read_text())
    assert privacy["secret_sampling"] is True and privacy["secret_noise"] is True and privacy["caveats"] == []
    files = [p for p in run.rglob("*") if p.is_file() and "checkpoints" not in p.relative_to(run).parts]
    names = {p.relative_to(run).as_posix() for p in files}
    assert {"config.yaml", "report.json", "privacy.json", "lora/README.md", f"lora/{LORA_FILE}"} <= names, names
    assert any(n.startswith("logs/") for n in names), names
    for seed in (sampling, noise):
        needles = [str(seed).encode(), f"{seed:x}".encode(), f"{seed:X}".encode(), seed.to_bytes(8, "little"),
                   seed.to_bytes(8, "big")]
        for path in files:
            data = path.read_bytes()
            for needle in needles:
                assert needle not in data, f"{path.relative_to(run)} holds a DP seed ({needle!r})"
        for needle in needles[:3]:
            assert needle.decode() not in out + err


def test_resume_restores_secret_sampling_seed(tmp_path, base_model, monkeypatch):
    """A resumed run with secret seeds draws, after resuming, the batches the interrupted run would have drawn, and
    ends bit-exactly where an uninterrupted run with the same (checkpointed) seeds ends."""
    from privtune.trainers.dpsgd import DPSGDTrainer

    seen = []
    step = DPSGDTrainer.optimizer_step

    def record(self, micro_step):
        seen.append((self.state.step, tuple(a.tolist() for a in self.schedule.logical(self.state.step))))
        return step(self, micro_step)

    monkeypatch.setattr(DPSGDTrainer, "optimizer_step", record)
    common = (f"model.base={base_model}", "dp.target_epsilon=null", "dp.noise_multiplier=0.8", "dp.noise_multiplicity=2",
              "data.random_flip=true", "lora.dropout=0.1")
    part = tmp_path / "part"
    first = make_trainer(part, *common, steps=2)
    first.run()
    sampling, noise = dp_secrets(part)
    assert (sampling, noise) == (first.dp_state.sampling_seed, first.dp_state.noise_seed)
    would = [tuple(a.tolist() for a in first.schedule.logical(s)) for s in (2, 3)]
    seen.clear()
    resumed = make_trainer(part, *common, "resume=latest", steps=4)
    resumed.run()
    assert (resumed.dp_state.sampling_seed, resumed.dp_state.noise_seed) == (sampling, noise)
    assert seen == [(2, would[0]), (3, would[1])]
    assert resumed.privacy_summary()["secret_sampling"] is True and resumed.privacy_summary()["caveats"] == []

    full = tmp_path / "full"
    make_trainer(full, *common, f"dp.sampling_seed={sampling}", f"dp.noise_seed={noise}", steps=4).run()
    assert [s for s, _ in seen[2:]] == [0, 1, 2, 3] and [b for _, b in seen[4:]] == would
    wa, wb = lora_weights(full), lora_weights(part)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path, base_model):
    """Two `accelerate launch --cpu` processes train the same model, with the same epsilon, as one process
    with the same logical batch: the clipped sums are all-reduced and the noise enters once per step."""
    from .conftest import launch_two_processes

    common = (f"model.base={base_model}", "dp.target_epsilon=null", "dp.noise_multiplier=0.8", "dp.noise_multiplicity=2",
              "dp.noise_seed=7", "dp.sampling_seed=7", "train.batch_size=2")
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(dp_args(one, *common, "train.gradient_accumulation_steps=2", steps=3)) == 0
    out = launch_two_processes("privtune.train", dp_args(two, *common, steps=3))
    assert "on 2 processes (MULTI_CPU" in out.stdout
    wa, wb = lora_weights(one), lora_weights(two)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-6)
    pa, pb = (json.loads((run / "privacy.json").read_text()) for run in (one, two))
    assert pa == pb
    n = len(json.loads((two / "split.json").read_text())["members"])
    assert pb["sample_rate"] == pytest.approx(4 / n)
    assert pb["epsilon"] == pytest.approx(opacus_epsilon("rdp", 0.8, 4 / n, 3, pb["delta"]), rel=1e-9)


@pytest.mark.slow
def test_bf16_autocast_runs(tmp_path, base_model):
    """bf16 autocast (CPU bf16 is slow, hence slow-marked): clipping in fp32, finite LoRA weights, epsilon accounted."""
    run = tmp_path / "bf16"
    assert main(dp_args(run, f"model.base={base_model}", "train.mixed_precision=bf16", "dp.target_epsilon=null",
                        "dp.noise_multiplier=1", steps=2)) == 0
    weights = lora_weights(run)
    assert weights and all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())
    assert json.loads((run / "privacy.json").read_text())["steps"] == 2
