"""DistillMD: target routing to the unseen teacher, frozen no-grad teachers, no true noise for the student, resume."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from privtune.export import LORA_FILE
from privtune.train import main

from .conftest import prepare_trainer, train_args
from .test_dualmd import dual_args, reset_accelerate

torch.set_num_threads(1)


def distill_args(run_dir, *extra, steps=3):
    return ["recipe=distillmd", *train_args(run_dir, steps=steps)[1:], *extra]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, base_model):
    run = tmp_path_factory.mktemp("teachers") / "run"
    assert main(dual_args(run, f"model.base={base_model}", "optim.lr=1e-2", steps=3)) == 0
    reset_accelerate()
    return run


def make_trainer(run_dir, *overrides):
    from privtune.config import load_config
    from privtune.trainers import get_trainer

    return get_trainer("distillmd")(load_config("distillmd", distill_args(run_dir, *overrides)[1:]))


def prepared(run_dir, teachers, base_model, *overrides):
    return prepare_trainer(make_trainer(run_dir, f"model.base={base_model}", f"distill.teachers={teachers}", *overrides))


def test_targets_come_from_the_teacher_that_did_not_see_the_sample(tmp_path, teachers, base_model, monkeypatch):
    import privtune.trainers.distillmd as distillmd

    trainer = prepared(tmp_path / "run", teachers, base_model, "train.batch_size=8")
    constants = {"A": 1.0, "B": -1.0}
    monkeypatch.setattr(trainer, "teacher_predict", lambda name, x, t, c: torch.full_like(x, constants[name]))
    seven = 7.0  # the "true noise" every entry of which is 7
    monkeypatch.setattr(trainer, "sample_noise", lambda latents: (torch.full_like(latents, seven), torch.arange(len(latents)) * 100))
    captured = []
    real_loss = distillmd.regression_loss
    monkeypatch.setattr(distillmd, "regression_loss", lambda pred, target: captured.append((pred, target)) or real_loss(pred, target))

    batch = trainer.micro_batch(0)
    half = trainer.row_half[batch.rows.numpy()]
    assert set(half.tolist()) == {0, 1}, "the batch should mix both halves"
    loss, _ = trainer.compute_loss(batch)
    pred, target = captured[0]
    want = torch.tensor([constants["B"] if h == 0 else constants["A"] for h in half]).view(-1, 1, 1, 1).expand_as(target)
    assert torch.equal(target, want)  # half A (0) -> teacher B, half B (1) -> teacher A
    assert not target.requires_grad and target.grad_fn is None
    assert not torch.isclose(target, torch.full_like(target, seven)).any(), "the student regressed onto the true noise"
    torch.testing.assert_close(loss, F.mse_loss(pred.float(), want))
    loss.backward()
    assert all(p.grad is None for p in trainer.teacher_params)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.trainable)


def test_teachers_frozen_no_grad_eval_same_inputs(tmp_path, teachers, base_model):
    from privtune.models.lora import active_adapter

    trainer = prepared(tmp_path / "run", teachers, base_model, "lora.dropout=0.1", "optim.weight_decay=5e-4")
    unet = trainer.unet
    calls = []
    unet.register_forward_pre_hook(lambda m, args, kwargs: calls.append(
        (active_adapter(m), m.training, torch.is_grad_enabled(), args[0].detach().clone(), args[1].clone())), with_kwargs=True)
    teacher_before = [p.detach().clone() for p in trainer.teacher_params]
    student_before = [p.detach().clone() for p in trainer.trainable]
    for s in range(3):
        calls.clear()
        trainer.optimizer_step(s)
        teacher_calls = [c for c in calls if c[0] in ("A", "B")]
        student_calls = [c for c in calls if c[0] == "default"]
        assert teacher_calls and len(student_calls) == 1
        assert all(not training and not grad for _, training, grad, _, _ in teacher_calls)
        _, training, grad, x, t = student_calls[0]
        assert training and grad
        rows_x = torch.cat([c[3] for c in teacher_calls])
        rows_t = torch.cat([c[4] for c in teacher_calls])
        assert sorted(map(tuple, rows_x.flatten(1).tolist())) == sorted(map(tuple, x.flatten(1).tolist()))  # identical z_t
        assert sorted(rows_t.tolist()) == sorted(t.tolist())
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, trainer.teacher_params))
    assert any(not torch.equal(a, b) for a, b in zip(student_before, trainer.trainable))
    exported = load_file(str(teachers / "lora" / "adapter_a" / LORA_FILE))
    assert any(v.abs().sum() > 0 for v in exported.values())
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert optimized == {id(p) for p in trainer.trainable}
    assert not optimized & {id(p) for p in trainer.teacher_params}
    assert all(g["weight_decay"] == 5e-4 for g in trainer.optimizer.param_groups)  # weight decay: student LoRA only


def test_student_export_is_a_normal_lora(tmp_path, teachers, base_model):
    run = tmp_path / "run"
    assert main(distill_args(run, f"model.base={base_model}", f"distill.teachers={teachers}", steps=2)) == 0
    student = load_file(str(run / "lora" / LORA_FILE))
    teacher = load_file(str(teachers / "lora" / "adapter_a" / LORA_FILE))
    assert student.keys() == teacher.keys()
    assert not (run / "lora" / "adapter_a").exists()


def test_teachers_from_another_split_are_refused(tmp_path, teachers, base_model, capsys):
    assert main(distill_args(tmp_path / "run", f"model.base={base_model}", f"distill.teachers={teachers}", "seed=1")) == 2
    assert "another members split" in capsys.readouterr().err


class Interrupt(Exception):
    pass


def test_resume_across_both_phases_equals_uninterrupted(tmp_path, base_model, monkeypatch):
    """Stop in phase 1 (teachers), resume; stop in phase 2 (student), resume: same teachers and student."""
    from privtune.trainers.distillmd import DistillMDTrainer
    from privtune.trainers.dualmd import DualMDTrainer

    common = (f"model.base={base_model}", "lora.dropout=0.1", "train.checkpoint_every=1", "distill.teacher_steps=3")
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(distill_args(full, *common, steps=3)) == 0
    reset_accelerate()

    def stop_at(cls, step):
        monkeypatch.setattr(cls, "step_logs", lambda self: (_ for _ in ()).throw(Interrupt()) if self.state.step == step else {})

    stop_at(DualMDTrainer, 2)
    with pytest.raises(Interrupt):
        make_trainer(part, *common).run()
    assert not (part / "teachers" / "lora").exists()
    monkeypatch.undo()
    reset_accelerate()
    stop_at(DistillMDTrainer, 2)
    with pytest.raises(Interrupt):
        make_trainer(part, *common, "resume=latest").run()
    assert (part / "teachers" / "lora" / "adapter_b" / LORA_FILE).is_file()
    monkeypatch.undo()
    reset_accelerate()
    assert main(distill_args(part, *common, "resume=latest", steps=3)) == 0
    for rel in ("teachers/lora/adapter_a", "teachers/lora/adapter_b", "lora"):
        a, b = load_file(str(full / rel / LORA_FILE)), load_file(str(part / rel / LORA_FILE))
        assert a.keys() == b.keys(), rel
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=f"{rel} {key}")
