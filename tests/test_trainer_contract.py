"""The contract every registered trainer keeps, tested over the registry (and a loss-only test defense):

- interrupted after step 3 of 4 (checkpoint at 2), `resume=latest` ends with exactly the weights of an
  uninterrupted 4-step run, and the interrupt is one line with the resume command, exit 130;
- the memorization filter either works the same way (a fully filtered step moves no weight, AdamW's weight
  decay included) or is refused before anything is written;
- options a trainer does not declare in `supports` are refused with its reason.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from privtune.train import main
from privtune.trainers import capabilities
from privtune.trainers.registry import TRAINERS

from . import toy_defense
from .conftest import prepare_trainer, train_args

torch.set_num_threads(1)

RECIPES = {"lora": "lora", "dpsgd": "dpsgd", "mp_lora": "mp_lora", "smp_lora": "smp_lora", "dualmd": "dualmd",
           "distillmd": "distillmd", "toy_truncated_loss": "lora"}
EXTRA = {
    "dpsgd": ["dp.sampling_seed=1", "dp.noise_seed=2"],  # the two runs compared must share their DP secrets
    "mp_lora": ["data.auxiliary_members=4", "mp.attacker_nonmembers=4"],
    "smp_lora": ["data.auxiliary_members=4", "mp.attacker_nonmembers=4"],
    "distillmd": ["distill.teacher_steps=2"],
    "toy_truncated_loss": ["trainer=toy_truncated_loss"],
}


def test_every_trainer_is_covered():
    assert set(TRAINERS.names()) == set(RECIPES), "a new trainer needs its recipe here so the contract covers it"


def args(name, run_dir, base_model, *extra, steps=4):
    return [f"recipe={RECIPES[name]}", *train_args(run_dir, f"model.base={base_model}", steps=steps)[1:],
            *EXTRA.get(name, []), *extra]


def weights(run_dir):
    files = sorted((run_dir / "lora").rglob("*.safetensors"))
    assert files, f"no exported weights in {run_dir / 'lora'}"
    return {f"{f.relative_to(run_dir)}/{k}": v for f in files for k, v in load_file(f).items()}


class InterruptAt:
    """A tqdm stand-in for the trainer's progress bar that raises KeyboardInterrupt once the bar of `desc` reaches `at`."""

    def __init__(self, desc, at, real):
        self.desc, self.at, self.real = desc, at, real

    def __call__(self, *a, **kw):
        bar = self.real(*a, **kw)
        if kw.get("desc") != self.desc:
            return bar
        at, update = self.at, bar.update

        def interrupting(n=1):
            update(n)
            if bar.n >= at:
                raise KeyboardInterrupt

        bar.update = interrupting
        return bar


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_interrupt_then_resume_equals_uninterrupted(tmp_path, base_model, name, monkeypatch, capsys):
    import privtune.trainers.steps as base

    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert main(args(name, straight, base_model)) == 0
    monkeypatch.setattr(base, "tqdm", InterruptAt(f"train {name}", 3, base.tqdm))
    capsys.readouterr()
    assert main(args(name, broken, base_model, "train.checkpoint_every=2")) == 130
    err = capsys.readouterr().err
    assert "interrupted at step 3" in err and "checkpoint-2" in err and "resume=latest" in err, err
    assert "Traceback" not in err
    monkeypatch.undo()
    assert not (broken / "lora").exists()
    assert main(args(name, broken, base_model, "train.checkpoint_every=2", "resume=latest")) == 0
    a, b = weights(straight), weights(broken)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{name}: {key} differs after interrupt + resume"


def filter_args(name, run_dir, base_model):
    return args(name, run_dir, base_model, "memorization_filter.method=wen", "memorization_filter.threshold=1e-6",
                "memorization_filter.calibration_rows=4", "optim.weight_decay=0.1", steps=2)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_memorization_filter_skips_or_is_refused_in_every_trainer(tmp_path, base_model, name, capsys):
    from privtune.config import load_config
    from privtune.trainers import get_trainer

    run = tmp_path / "run"
    cls = TRAINERS.get(name)
    if "memorization_filter" not in cls.supports:
        assert main(filter_args(name, run, base_model)) == 2
        assert "does not support the memorization filter" in capsys.readouterr().err
        assert not run.exists()
        return
    a = filter_args(name, run, base_model)
    trainer = prepare_trainer(get_trainer(name)(load_config(a[0].split("=", 1)[1], a[1:])))
    before = [p.detach().clone() for p in trainer.trainable]
    trainer.optimizer_step(0)
    assert trainer.sample_filter.kept == 0 and trainer.sample_filter.total > 0
    for b, p in zip(before, trainer.trainable):
        assert torch.equal(b, p.detach()), f"{name}: a fully filtered step moved a weight"
    trainer.sample_filter.tau = float("inf")  # every row kept (an absolute threshold is never recalibrated)
    trainer.optimizer_step(1)
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, trainer.trainable))


def test_loss_only_defense_is_one_file_and_one_line(tmp_path, base_model):
    from privtune.config import load_config
    from privtune.trainers import get_trainer

    source = open(toy_defense.__file__).read()
    assert source.count("TRAINERS.register(") == 1
    assert "def compute_loss" in source and "def optimizer_step" not in source
    a = args("toy_truncated_loss", tmp_path / "run", base_model, "optim.lr=0.5", steps=2)
    trainer = prepare_trainer(get_trainer("toy_truncated_loss")(load_config("lora", a[1:])))
    calls = toy_defense.TruncatedLossTrainer.calls
    before = [p.detach().clone() for p in trainer.trainable]
    logs = trainer.optimizer_step(0)
    assert toy_defense.TruncatedLossTrainer.calls == calls + 1  # the standard step ran the defense's own loss
    assert logs["loss"] <= toy_defense.CAP
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, trainer.trainable))


@pytest.mark.parametrize("name,option,override", [
    ("dpsgd", "text_encoder", "lora.text_encoder=true"),
    ("dpsgd", "gradient_checkpointing", "train.gradient_checkpointing=true"),
    ("dualmd", "text_encoder", "lora.text_encoder=true"),
    ("distillmd", "text_encoder", "lora.text_encoder=true"),
])
def test_undeclared_options_are_refused_with_the_reason(tmp_path, base_model, name, option, override, capsys):
    run = tmp_path / "run"
    assert option not in TRAINERS.get(name).supports
    assert main(args(name, run, base_model, override)) == 2
    err = capsys.readouterr().err
    assert f"trainer {name} does not support {capabilities.OPTIONS[option].describe}" in err
    assert TRAINERS.get(name).unsupported_reasons[option] in err
    assert not run.exists()


def test_unknown_capability_is_a_programming_error():
    from omegaconf import OmegaConf

    with pytest.raises(ValueError, match="unknown capabilities"):
        capabilities.check(OmegaConf.create({}), "x", frozenset({"teleport"}), {})
