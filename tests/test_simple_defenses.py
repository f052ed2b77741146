"""SecMI's simple defenses as keys: Cutout, RandAugment (and flip), weight decay on LoRA only; never on attack queries."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from privtune.export import LORA_FILE
from privtune.train import main

from .conftest import prepare_trainer, train_args
from .test_dualmd import dual_args, reset_accelerate
from .test_eval_stage import FAST_EVAL

torch.set_num_threads(1)


def test_cutout_and_randaugment_are_seeded_per_image():
    from privtune.data.augment import Augmentation

    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 0.9 + 0.05  # no exact zeros
    cut = Augmentation(cutout_size=8)
    out = cut(pixels, seed=1, micro_step=4, rows=[5, 6, 7])
    for img, src in zip(out, pixels):
        hole = (img == 0).all(dim=0)
        ys, xs = hole.nonzero(as_tuple=True)
        assert 0 < hole.sum() <= 64
        assert hole.sum() == (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)  # one axis-aligned rectangle
        assert torch.equal(img[:, ~hole], src[:, ~hole])
    assert torch.equal(out, cut(pixels, 1, 4, [5, 6, 7]))
    assert not torch.equal(out, cut(pixels, 1, 5, [5, 6, 7]))
    both = Augmentation(cutout_size=8, randaugment_ops=3, randaugment_magnitude=9)
    full = both(pixels, 2, 0, [5, 6, 7])
    assert torch.equal(full[1:2], both(pixels[1:2], 2, 0, [6])), "an image's augmentation must not depend on its batch"
    assert not torch.equal(full, both(pixels, 3, 0, [5, 6, 7]))
    assert full.min() >= -1 and full.max() <= 1


def test_augmentations_reach_training_batches_never_attack_queries(tmp_path, base_model, monkeypatch, capsys):
    import privtune.eval.stage as stage
    from privtune.data import augment

    state = {"in_eval": False, "train_calls": 0, "eval_calls": 0}
    call = augment.Augmentation.__call__

    def spy(self, pixels, seed, micro_step, rows):
        state["eval_calls" if state["in_eval"] else "train_calls"] += 1
        return call(self, pixels, seed, micro_step, rows)

    evaluate = stage.evaluate_model

    def guarded(**kwargs):
        state["in_eval"] = True
        try:
            return evaluate(**kwargs)
        finally:
            state["in_eval"] = False

    monkeypatch.setattr(augment.Augmentation, "__call__", spy)
    monkeypatch.setattr(stage, "evaluate_model", guarded)
    run = tmp_path / "run"
    assert main(train_args(run, f"model.base={base_model}", "data.cutout=16", "data.randaugment=2", "data.random_flip=true",
                           *FAST_EVAL, "eval.utility=false", steps=2)) == 0
    assert "latent caching off" in capsys.readouterr().out
    assert state["train_calls"] == 2 and state["eval_calls"] == 0
    report = json.loads((run / "report.json").read_text())
    data = report["defense"]["settings"]["data"]
    assert data["cutout"] == 16 and data["randaugment"] == 2 and data["random_flip"] is True


def test_random_augmentation_turns_caching_off(tmp_path, base_model):
    from privtune.config import load_config
    from privtune.trainers import get_trainer

    cfg = load_config("lora", train_args(tmp_path / "r", f"model.base={base_model}", "data.cutout=8")[1:])
    trainer = prepare_trainer(get_trainer("lora")(cfg))
    assert trainer.cache is None and trainer.augmentation is not None
    seen = []
    augment = trainer.augmentation
    trainer.inputs.augmentation = lambda pixels, seed, step, rows: seen.append(rows) or augment(pixels, seed, step, rows)
    batch = trainer.micro_batch(3)
    assert len(seen) == 1 and list(seen[0]) == batch.rows.tolist()


@pytest.mark.parametrize("recipe", ["lora", "dualmd"])
def test_weight_decay_reaches_only_lora_parameter_groups(tmp_path, base_model, recipe):
    from privtune.config import load_config
    from privtune.trainers import get_trainer

    args = train_args(tmp_path / "r", f"model.base={base_model}", "optim.weight_decay=5e-4")[1:]
    trainer = prepare_trainer(get_trainer(recipe)(load_config(recipe, args)))
    unet = trainer.accelerator.unwrap_model(trainer.components.unet)
    names = {id(p): n for n, p in unet.named_parameters()}
    grouped = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    assert all(g["weight_decay"] == 5e-4 for g in trainer.optimizer.param_groups)
    assert grouped and all("lora_" in names[id(p)] for p in grouped)
    assert {id(p) for p in grouped} == {id(p) for n, p in unet.named_parameters() if "lora_" in n}
    for module in (trainer.components.vae, trainer.components.text_encoder):
        assert not {id(p) for p in module.parameters()} & {id(p) for p in grouped}


def test_lora_resume_with_augmentations_equals_uninterrupted(tmp_path, base_model):
    full, part = tmp_path / "full", tmp_path / "part"
    common = (f"model.base={base_model}", "data.cutout=12", "data.randaugment=2", "data.random_flip=true")
    assert main(train_args(full, *common, steps=4)) == 0
    reset_accelerate()
    assert main(train_args(part, *common, steps=2)) == 0
    reset_accelerate()
    assert main(train_args(part, *common, "resume=latest", steps=4)) == 0
    a, b = load_file(str(full / "lora" / LORA_FILE)), load_file(str(part / "lora" / LORA_FILE))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("args, message", [
    (["data.cutout=-1"], "data.cutout must be 0"),
    (["data.cutout=64"], "data.cutout must be 0"),
    (["data.randaugment=-2"], "data.randaugment must be 0"),
    (["data.randaugment=1", "data.randaugment_magnitude=31"], "randaugment_magnitude must be in [0, 30]"),
])
def test_bad_augmentation_settings(tmp_path, base_model, capsys, args, message):
    assert main(train_args(tmp_path / "run", f"model.base={base_model}", *args)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_dualmd_recipe_keys_validate(tmp_path, base_model, capsys):
    assert main(dual_args(tmp_path / "run", f"model.base={base_model}", "dualmd.inference_steps=0")) == 2
    assert "dualmd.inference_steps must be >= 1" in capsys.readouterr().err
