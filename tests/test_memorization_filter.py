"""The Wen / Ren training filter: flagged rows leave the loss, an all-filtered batch moves nothing (one and two
processes), calibration uses only known non-members, thresholds outside their range are clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from privtune.errors import ConfigError
from privtune.export import LORA_FILE
from privtune.losses import denoising_loss
from privtune.train import main

from .conftest import launch_two_processes, prepare_trainer, train_args

torch.set_num_threads(1)


def args(run_dir, base_model, recipe, *extra, steps=2):
    return [f"recipe={recipe}", *train_args(run_dir, f"model.base={base_model}", steps=steps)[1:],
            "memorization_filter.calibration_rows=8", "memorization_filter.calibration_draws=2", *extra]


def make(run_dir, base_model, recipe, *extra):
    from privtune.config import load_config
    from privtune.trainers import get_trainer

    a = args(run_dir, base_model, recipe, *extra)
    cfg = load_config(recipe, a[1:])
    return prepare_trainer(get_trainer(cfg.trainer)(cfg))


def fixed_noise(trainer, batch, seed=5):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch.latents.shape, generator=g)
    t = torch.randint(100, 900, (len(batch.latents),), generator=g)
    trainer.sample_noise = lambda latents: (noise, t)
    return noise, t


@pytest.mark.parametrize("recipe", ["wen_mitigation", "ren_mitigation"])
def test_flagged_rows_leave_the_loss(tmp_path, base_model, recipe):
    trainer = make(tmp_path / "run", base_model, recipe)
    comps = trainer.components
    batch = trainer.micro_batch(0)
    noise, t = fixed_noise(trainer, batch)
    flt = trainer.sample_filter
    flt.probe and setattr(flt.probe, "recording", True)
    with torch.no_grad():
        per_sample, pred, noisy = denoising_loss(comps.unet, comps.noise_scheduler, batch.latents, batch.encoder_hidden_states,
                                                 noise, t, return_pred=True)
        if recipe == "wen_mitigation":  # independent computation of Wen's magnitude
            empty = trainer.encode_text(trainer.tokenize([""])).expand_as(batch.encoder_hidden_states)
            eps_u = comps.unet(noisy, t, encoder_hidden_states=empty).sample
            values = (pred - eps_u).flatten(1).norm(dim=1)
        else:
            values = flt.metric(trainer, noisy, t, batch.encoder_hidden_states, pred)
    flt.probe and setattr(flt.probe, "recording", False)
    order = values.sort().values
    flt.tau = float((order[1] + order[2]) / 2)  # two rows kept, two flagged
    flt.calibration = None
    loss, logs = trainer.compute_loss(batch)
    keep = values < flt.tau
    assert keep.sum() == 2 and logs["filter/kept"] == 0.5
    flagged = {trainer.train_records[int(r)].id for r, k in zip(batch.rows, keep) if not k}
    assert set(flt.stats()["most_flagged"]) == flagged
    torch.testing.assert_close(loss.detach(), per_sample[keep].mean(), rtol=1e-5, atol=1e-7)
    loss.backward()  # the gradient is that of the kept rows only
    got = [p.grad.clone() for p in trainer.trainable if p.grad is not None]
    trainer.optimizer.zero_grad(set_to_none=True)
    ref = denoising_loss(comps.unet, comps.noise_scheduler, batch.latents[keep], batch.encoder_hidden_states[keep],
                         noise[keep], t[keep]).mean()
    ref.backward()
    want = [p.grad for p in trainer.trainable if p.grad is not None]
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("recipe", ["wen_mitigation", "ren_mitigation"])
def test_all_filtered_batch_changes_no_parameter(tmp_path, base_model, recipe):
    trainer = make(tmp_path / "run", base_model, recipe, "memorization_filter.threshold=1e-6", "optim.weight_decay=0.1")
    before = [p.detach().clone() for p in trainer.trainable]
    for step in range(2):
        batch = trainer.micro_batch(step)
        loss, logs = trainer.compute_loss(batch)
        assert logs["filter/kept"] == 0.0 and loss.item() == 0.0 and torch.isfinite(loss)
    trainer.optimizer_step(2)
    for a, b in zip(before, trainer.trainable):
        assert torch.equal(a, b.detach())
    # control: the same update with rows kept does move the weights (AdamW + weight decay)
    trainer.sample_filter.tau = 1e9
    trainer.optimizer_step(3)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, trainer.trainable))


def test_all_filtered_run_exports_the_initial_lora(tmp_path, base_model):
    run = tmp_path / "run"
    assert main(args(run, base_model, "wen_mitigation", "memorization_filter.threshold=1e-6", "optim.weight_decay=0.1")) == 0
    init = make(tmp_path / "init", base_model, "lora")
    from privtune.models.lora import lora_state_dict

    want = lora_state_dict(init.accelerator.unwrap_model(init.components.unet))
    got = load_file(str(run / "lora" / LORA_FILE))
    assert len(got) == len(want)
    for key, value in want.items():
        match = [k for k in got if k.endswith(key.split("base_model.model.")[-1].replace(".weight", "") + ".weight")]
        assert len(match) == 1, key
        assert torch.equal(got[match[0]], value.to(got[match[0]].dtype))


def test_resume_equals_uninterrupted(tmp_path, base_model):
    """tau and its calibration step are checkpointed: a resumed run filters exactly like an uninterrupted one."""
    full, part = tmp_path / "full", tmp_path / "part"
    common = ("memorization_filter.recalibrate_every=2", "train.checkpoint_every=3")
    assert main(args(full, base_model, "wen_mitigation", *common, steps=5)) == 0
    assert main(args(part, base_model, "wen_mitigation", *common, steps=3)) == 0
    assert main(args(part, base_model, "wen_mitigation", *common, "resume=latest", steps=5)) == 0
    a, b = load_file(str(full / "lora" / LORA_FILE)), load_file(str(part / "lora" / LORA_FILE))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    import json

    sa, sb = (json.loads((d / "memorization.json").read_text())["memorization_filter"] for d in (full, part))
    assert sa["tau"] == pytest.approx(sb["tau"], rel=1e-6) and sa["rows_seen"] == sb["rows_seen"]


@pytest.mark.slow
def test_all_filtered_batch_two_processes_no_hang(tmp_path, base_model):
    """Two real CPU processes (gloo): no deadlock, and the all-filtered LoRA equals the one-process export."""
    extra = ("memorization_filter.threshold=1e-6", "optim.weight_decay=0.1")
    one = tmp_path / "one"
    assert main(args(one, base_model, "wen_mitigation", *extra, steps=3)) == 0
    two = tmp_path / "two"
    out = launch_two_processes("privtune.train", args(two, base_model, "wen_mitigation", *extra, steps=3), timeout=600)
    assert "on 2 processes" in out.stdout + out.stderr
    a, b = load_file(str(one / "lora" / LORA_FILE)), load_file(str(two / "lora" / LORA_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # partly filtered (processes disagree on which rows are kept) also finishes
    out = launch_two_processes("privtune.train", args(tmp_path / "part", base_model, "ren_mitigation", steps=3), timeout=600)
    assert "on 2 processes" in out.stdout + out.stderr


def test_calibration_uses_only_known_nonmembers(tmp_path, base_model):
    from privtune.eval.attacks import EncodedSamples
    from privtune.eval.runner import split_calibration

    trainer = make(tmp_path / "a", base_model, "wen_mitigation")
    split = trainer.split
    cal = {r.id for r in trainer.sample_filter.calibration}
    assert len(cal) == 8 and not cal & ({r.id for r in split.members} | {r.id for r in split.nonmembers})
    trainer = make(tmp_path / "b", base_model, "wen_mitigation", "memorization_filter.calibration=nonmembers")
    n = len(trainer.split.nonmembers)
    fake = EncodedSamples(torch.zeros(n, 1, 1, 1), torch.zeros(n, 1, 1), [r.id for r in trainer.split.nonmembers])
    parts = split_calibration(fake, fake.subset(np.arange(n)), float(trainer.cfg.eval.calibration_fraction), trainer.cfg.seed)
    cal = {r.id for r in trainer.sample_filter.calibration}
    assert cal and cal <= set(parts.calibration_nonmembers.ids) and not cal & set(parts.report_nonmembers.ids)
    assert trainer.sample_filter.tau is None
    batch = trainer.micro_batch(0)
    trainer.compute_loss(batch)
    assert trainer.sample_filter.tau > 0 and trainer.sample_filter.history[0]["step"] == 0


@pytest.mark.parametrize("recipe,extra,match", [
    ("ren_mitigation", ["memorization_filter.threshold=10"], "outside the range"),
    ("wen_mitigation", ["memorization_filter.threshold=-1"], "positive"),
    ("wen_mitigation", ["memorization_filter.percentile=100"], "percentile"),
    ("wen_mitigation", ["memorization_filter.method=bogus"], "method"),
    ("wen_mitigation", ["memorization_filter.calibration=members"], "calibration"),
    ("dpsgd", ["memorization_filter.method=wen"], "does not support"),
    ("ren_mitigation", ["memorization_filter.ren_layers=[7]"], "out of range"),
])
def test_bad_thresholds_are_clear_errors(tmp_path, base_model, recipe, extra, match):
    with pytest.raises(ConfigError, match=match):
        make(tmp_path / "run", base_model, recipe, *extra)
