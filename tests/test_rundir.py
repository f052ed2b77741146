"""The run folder never describes a model it does not hold: refused resumes, overwrite, stale folders, interrupts."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from privtune.export import LORA_FILE
from privtune.train import main

from .conftest import train_args

torch.set_num_threads(1)


def digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def finished(tmp_path, base_model):
    run = tmp_path / "run"
    assert main(train_args(run, f"model.base={base_model}", "train.checkpoint_every=1", steps=2)) == 0
    return run


@pytest.mark.parametrize("change, key", [
    ("lora.rank=8", "lora.rank"),
    ("data.members=6", "data.members"),
    ("seed=3", "seed"),
    ("optim.lr=0.5", "optim.lr"),
])
def test_resume_that_changes_the_model_is_refused_and_writes_nothing(finished, base_model, capsys, change, key):
    before = digest(finished)
    assert main(train_args(finished, f"model.base={base_model}", "train.checkpoint_every=1", "resume=latest", change, steps=2)) == 2
    err = capsys.readouterr().err
    assert "resume would change the model" in err and key in err and "Traceback" not in err
    assert digest(finished) == before


def test_resume_of_a_run_from_before_a_new_key_accepts_its_default_only(finished, base_model, capsys):
    """A run started before privtune had train.ema resumes at the key's default; turning the new option on is refused."""
    import yaml

    config = finished / "config.yaml"
    recorded = yaml.safe_load(config.read_text())
    del recorded["train"]["ema"]
    config.write_text(yaml.safe_dump(recorded, sort_keys=False))
    before = digest(finished)
    assert main(train_args(finished, f"model.base={base_model}", "train.checkpoint_every=1", "resume=latest",
                           "train.ema.decay=0.9", steps=3)) == 2
    assert "train.ema.decay" in capsys.readouterr().err and digest(finished) == before
    assert main(train_args(finished, f"model.base={base_model}", "train.checkpoint_every=1", "resume=latest", steps=3)) == 0


def test_max_steps_with_a_schedule_is_model_changing(tmp_path, base_model, capsys):
    run = tmp_path / "run"
    args = (f"model.base={base_model}", "optim.scheduler=cosine", "train.checkpoint_every=1")
    assert main(train_args(run, *args, steps=2)) == 0
    before = digest(run)
    assert main(train_args(run, *args, "resume=latest", steps=4)) == 2
    assert "train.max_steps also sets the LR schedule" in capsys.readouterr().err
    assert digest(run) == before


def test_safe_changes_on_resume_are_allowed_and_recorded(finished, base_model):
    assert main(train_args(finished, f"model.base={base_model}", "train.checkpoint_every=1", "resume=latest",
                           "train.log_every=2", steps=3)) == 0
    lines = (finished / "config_changes.jsonl").read_text().splitlines()
    change = json.loads(lines[-1])
    assert change["resumed_at_step"] == 2
    assert change["changed"]["train.max_steps"] == {"was": 2, "now": 3}
    assert change["changed"]["train.log_every"] == {"was": 1, "now": 2}


def test_overwrite_moves_the_old_run_aside_before_writing(finished, base_model, capsys):
    old = digest(finished)
    assert any(name.startswith("checkpoints/checkpoint-2") for name in old)
    assert main(train_args(finished, f"model.base={base_model}", "overwrite=true", "lora.rank=2", "lora.alpha=2", steps=1)) == 0
    assert "moved aside" in capsys.readouterr().out
    new = digest(finished)
    assert not any(name.startswith("checkpoints/checkpoint-2") for name in new)  # nothing of the old run survives
    assert "rank: 2" in (finished / "config.yaml").read_text()
    aside = [p for p in finished.parent.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and digest(aside[0]) == old  # and nothing of it is lost
    assert load_file(finished / "lora" / LORA_FILE)


def test_resume_after_overwrite_cannot_reach_the_old_checkpoints(finished, base_model):
    """The issue's story: overwrite, fail late, resume: the resume must not continue the old run."""
    assert main(train_args(finished, f"model.base={base_model}", "overwrite=true", "data.source=/nonexistent", steps=1)) == 2
    assert (finished / "checkpoints").is_dir()  # a failure before writing leaves the old run untouched
    assert main(train_args(finished, f"model.base={base_model}", "overwrite=true", steps=3)) == 0
    assert not (finished / "checkpoints" / "checkpoint-2").exists()


def test_a_folder_left_before_the_first_checkpoint_is_reusable(tmp_path, base_model):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("trainer: lora\n")
    (run / "split.json").write_text("{}")
    assert main(train_args(run, f"model.base={base_model}", steps=1)) == 0
    assert (run / "lora" / LORA_FILE).is_file()
    assert json.loads((run / "split.json").read_text())["members"]


def test_output_dir_that_is_a_file_is_a_clear_error(tmp_path, base_model, capsys):
    target = tmp_path / "file.txt"
    target.write_text("keep me")
    assert main(train_args(target, f"model.base={base_model}", steps=1)) == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and "Traceback" not in err
    assert target.read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_read_only_output_dir_is_a_clear_error(tmp_path, base_model, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        assert main(train_args(parent / "run", f"model.base={base_model}", steps=1)) == 2
        assert "is not writable" in capsys.readouterr().err
    finally:
        parent.chmod(0o755)


def test_interrupt_prints_the_resume_line_and_resume_equals_uninterrupted(tmp_path, base_model, capsys, monkeypatch):
    from privtune.trainers.base import Trainer

    common = (f"model.base={base_model}", "train.checkpoint_every=2")
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(train_args(full, *common, steps=4)) == 0
    original = Trainer.optimizer_step

    def interrupted(self, micro_step):
        if self.state.step == 3:
            raise KeyboardInterrupt
        return original(self, micro_step)

    monkeypatch.setattr(Trainer, "optimizer_step", interrupted)
    assert main(train_args(part, *common, steps=4)) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = [ln for ln in err.splitlines() if ln.startswith("privtune: interrupted")]
    assert len(line) == 1, err
    assert "at step 3" in line[0] and "checkpoint-2" in line[0] and line[0].endswith("resume=latest")
    monkeypatch.setattr(Trainer, "optimizer_step", original)
    assert main(train_args(part, *common, "resume=latest", steps=4)) == 0
    a, b = load_file(full / "lora" / LORA_FILE), load_file(part / "lora" / LORA_FILE)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_a_parent_of_other_runs_is_never_moved_aside(tmp_path, base_model):
    """output_dir pointed at a folder that merely contains run folders: nothing of theirs moves."""
    parent = tmp_path / "runs"
    (parent / "old").mkdir(parents=True)
    (parent / "old" / "config.yaml").write_text("trainer: lora\n")
    assert main(train_args(parent, f"model.base={base_model}", steps=1)) == 0
    assert (parent / "old" / "config.yaml").read_text() == "trainer: lora\n"
    assert not any(p.name.startswith("runs.replaced-") for p in tmp_path.iterdir())
