"""The LoRA trainer end to end: run folder, resume equivalence, export, tracking, protection of results."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from privtune.export import KOHYA_FILE, LORA_FILE
from privtune.train import main

from .conftest import launch_two_processes, make_image_folder, prepare_trainer, train_args


def lora_weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "lora" / LORA_FILE))


def test_run_folder_contents(tmp_path, base_model):
    run = tmp_path / "run"
    assert main(train_args(run, f"model.base={base_model}", "train.validation_every=3", "export.kohya=true")) == 0
    for name in ("config.yaml", "split.json", f"lora/{LORA_FILE}", f"lora/{KOHYA_FILE}",
                 "validation/step-000003.png", "validation/step-000006.png", "checkpoints/checkpoint-6/trainable.safetensors"):
        assert (run / name).is_file(), name
    manifest = json.loads((run / "split.json").read_text())
    assert len(manifest["members"]) == 8 and len(manifest["nonmembers"]) == 8
    weights = lora_weights(run)
    assert weights and all(k.startswith("unet.") and ".lora" in k for k in weights)
    assert any(w.abs().sum() > 0 for k, w in weights.items() if "lora.up" in k or "lora_B" in k)
    kohya = load_file(str(run / "lora" / KOHYA_FILE))
    assert all(k.startswith("lora_unet_") for k in kohya)
    assert any(k.endswith(".lora_down.weight") for k in kohya) and any(k.endswith(".alpha") for k in kohya)
    assert all(float(v) == 4.0 for k, v in kohya.items() if k.endswith(".alpha"))


def test_no_training_facts_in_safetensors_metadata(tmp_path, base_model):
    run = tmp_path / "run"
    assert main(train_args(run, f"model.base={base_model}", "export.kohya=true", steps=2)) == 0
    from safetensors import safe_open

    captions = [r["caption"] for r in json.loads((run / "split.json").read_text())["members"]]
    for name in (LORA_FILE, KOHYA_FILE):
        with safe_open(str(run / "lora" / name), "pt") as f:
            meta = json.dumps(f.metadata() or {})
        assert str(tmp_path) not in meta
        assert not any(c in meta for c in captions)


def test_resume_equals_uninterrupted(tmp_path, base_model):
    full, part = tmp_path / "full", tmp_path / "part"
    common = (f"model.base={base_model}", "lora.dropout=0.1")
    assert main(train_args(full, *common, steps=6)) == 0
    assert main(train_args(part, *common, steps=3)) == 0
    assert main(train_args(part, *common, "resume=latest", steps=6)) == 0
    a, b = lora_weights(full), lora_weights(part)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def _prepared_trainer(run_dir, *overrides):
    from privtune.config import load_config
    from privtune.trainers import get_trainer

    return prepare_trainer(get_trainer("lora")(load_config("lora", train_args(run_dir, *overrides)[1:])))


def test_cached_inputs_equal_uncached(tmp_path, base_model):
    """Caching stores the VAE posterior and samples it per step: the same batches as encoding every step."""
    cached = _prepared_trainer(tmp_path / "a", f"model.base={base_model}", "data.random_flip=true")
    assert cached.cache is not None
    first, losses = [], []
    for i in range(3):  # batches and losses interleaved: both draw from the same generator
        first.append(cached.micro_batch(i))
        losses.append(cached.compute_loss(first[-1])[0].item())
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    plain = _prepared_trainer(tmp_path / "b", f"model.base={base_model}", "data.random_flip=true", "train.cache_latents=false")
    assert plain.cache is None
    for i, ref in enumerate(first):
        batch = plain.micro_batch(i)
        assert torch.equal(batch.rows, ref.rows)
        torch.testing.assert_close(batch.latents, ref.latents, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(batch.encoder_hidden_states, ref.encoder_hidden_states)
        assert abs(plain.compute_loss(batch)[0].item() - losses[i]) < 1e-4


def test_existing_run_is_not_clobbered(tmp_path, base_model, capsys):
    run = tmp_path / "run"
    assert main(train_args(run, f"model.base={base_model}", steps=2)) == 0
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in run.rglob("*") if p.is_file()}
    assert main(train_args(run, f"model.base={base_model}", steps=2)) == 2
    assert "resume=latest" in capsys.readouterr().err
    bad = make_image_folder(tmp_path / "bad", n=4)
    (bad / "img001.png").write_bytes(b"garbage")
    assert main(train_args(run, f"model.base={base_model}", f"data.source={bad}", "overwrite=true", steps=2)) == 2
    assert "corrupt image" in capsys.readouterr().err
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in run.rglob("*") if p.is_file()}
    assert before == after


@pytest.mark.parametrize("args, message", [
    (["data.source=/no/such/folder"], "does not exist"),
    (["data.members=1000", "data.nonmembers=20"], "exceeds the 1004 usable samples"),
])
def test_bad_data_is_reported(tmp_path, base_model, capsys, args, message):
    run = tmp_path / "run"
    assert main(train_args(run, f"model.base={base_model}", *args)) == 2
    assert message in capsys.readouterr().err
    assert not (run / "config.yaml").exists()


def test_image_folder_source_trains(tmp_path, base_model):
    folder = make_image_folder(tmp_path / "data", n=12)
    run = tmp_path / "run"
    assert main(train_args(run, f"model.base={base_model}", f"data.source={folder}", "data.members=6", "data.nonmembers=6", steps=2)) == 0
    assert (run / "lora" / LORA_FILE).is_file()


def test_wandb_offline_writes_run_files(tmp_path, base_model, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    assert main(train_args(run, f"model.base={base_model}", "tracking=wandb", "train.validation_every=2", steps=2)) == 0
    offline = list((run / "wandb").glob("offline-run-*"))
    assert offline and list(offline[0].glob("*.wandb"))


def test_tensorboard_writes_events(tmp_path, base_model):
    run = tmp_path / "run"
    assert main(train_args(run, f"model.base={base_model}", "tracking=tensorboard", steps=2)) == 0
    assert list((run / "logs").rglob("events.out.tfevents.*"))


VANILLA = r"""
import sys, torch
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1], safety_checker=None, requires_safety_checker=False)
pipe.set_progress_bar_config(disable=True)
def gen():
    out = pipe("red apple", num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="np", height=32, width=32)
    return torch.from_numpy(out.images)
before = gen()
pipe.load_lora_weights(sys.argv[2])
from safetensors.torch import load_file
n_file = len(load_file(sys.argv[2] + "/pytorch_lora_weights.safetensors"))
n_loaded = sum(1 for n, _ in pipe.unet.named_parameters() if "lora_" in n)
assert n_loaded == n_file, (n_loaded, n_file)
after = gen()
assert "privtune" not in sys.modules
print("DIFF", float((after - before).abs().mean()))
"""


def test_exported_lora_loads_in_vanilla_diffusers(tmp_path, base_model):
    run = tmp_path / "run"
    assert main(train_args(run, f"model.base={base_model}", "optim.lr=1e-2", steps=6)) == 0
    script = tmp_path / "vanilla.py"
    script.write_text(VANILLA)
    out = subprocess.run([sys.executable, str(script), base_model, str(run / "lora")], capture_output=True, text=True,
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    diff = float(out.stdout.split("DIFF")[1])
    assert diff > 1e-3


@pytest.mark.slow
def test_accelerate_two_processes(tmp_path, base_model):
    run = tmp_path / "run"
    out = launch_two_processes("privtune.train", train_args(run, f"model.base={base_model}", steps=4))
    assert "on 2 processes (MULTI_CPU" in out.stdout
    weights = lora_weights(run)
    assert weights and all(torch.isfinite(w).all() for w in weights.values())


def test_card_usage_snippet_runs_as_printed_for_the_embedded_base(tmp_path):
    run = tmp_path / "run"
    assert main([*train_args(run, steps=2)[:-1], "model.base=embedded", "eval.enabled=true", "eval.attacks=[loss]",
                 "eval.utility=false", "eval.bootstrap=20"]) == 0
    card = (run / "lora" / "README.md").read_text()
    front = card.split("---")[1]
    assert "base_model" not in front  # not a hub id
    code = card.split("```python\n")[1].split("```")[0].replace("path/to/this/lora", str(run / "lora"))
    assert "from privtune.embedded import embedded" in code
    out = subprocess.run([sys.executable, "-c", code + "\nprint('SIZE', image.size)"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "SIZE (32, 32)" in out.stdout


def test_evaluation_metrics_reach_the_tracker_at_the_final_step(tmp_path, base_model):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert main([*train_args(run, f"model.base={base_model}", steps=3)[:-1], "tracking=tensorboard", "eval.enabled=true",
                 "eval.attacks=[loss]", "eval.utility=false", "eval.bootstrap=20"]) == 0
    steps = {}
    for events in (run / "logs").rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            steps[tag] = {e.step for e in acc.Scalars(tag)}
    evaluated = {tag: s for tag, s in steps.items() if tag.startswith("eval/")}
    assert evaluated and all(s == {3} for s in evaluated.values()), evaluated
