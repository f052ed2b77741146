"""What reaches a tracker (W&B, TensorBoard): no training caption, sample id or local path by default.

The end-to-end runs train on an image folder whose captions carry a marker (`zqxcap`) that no
library writes, so a byte search over every tracker file (the binary `.wandb` log included) cannot
miss a caption nor hit one by chance; the opt-in run proves the same search does find what it looks for.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from privtune import tracking
from privtune.data.sources import Record
from privtune.train import main

from .conftest import make_image_folder, train_args

MARK = "zqxcap"
FAST = ("train.validation_every=2", "train.validation_inference_steps=2")
FAST_EVAL = ("eval.enabled=true", "eval.attacks=[loss]", "eval.utility=false", "eval.bootstrap=20",
             "eval.attack_params={loss: {timesteps: [100], draws: 1}}")


def _data(tmp_path: Path) -> Path:
    """24 rows: 8 members, 8 non-members, 8 held out (the default validation prompts)."""
    return make_image_folder(tmp_path / "data", n=24, captions=[f"{MARK}{i:03d} private words" for i in range(24)])


def _split(run: Path) -> dict:
    return json.loads((run / "split.json").read_text())


def _wandb_done() -> None:
    """W&B's run.finish() may return before its service has written the last records of the `.wandb`
    log; tearing the service down waits for them."""
    import wandb

    wandb.teardown()


def _files(root: Path) -> dict[Path, bytes]:
    files = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert files, f"no tracker files under {root}"
    return files


def _assert_clean(files: dict[Path, bytes], run: Path, data: Path, allowed_dir: Path | None = None) -> None:
    """No caption (of any row: the marker), no sample id, no run / data path in any file. W&B's own
    local debug logs (never synced) name their folder; only that mention of the run path is allowed."""
    ids = [r["id"] for key in ("members", "nonmembers") for r in _split(run)[key]]
    for path, raw in files.items():
        if allowed_dir is not None and path.name.startswith("debug"):
            raw = raw.replace(str(allowed_dir).encode(), b"")
        assert MARK.encode() not in raw, path
        assert not [i for i in ids if i.encode() in raw], path
        for secret in {str(run), str(run.resolve()), str(data), str(data.resolve())}:
            assert secret.encode() not in raw, (path, secret)


def test_wandb_offline_run_sends_no_captions_ids_or_paths(tmp_path, base_model, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    data, run = _data(tmp_path), tmp_path / "run"
    assert main(train_args(run, f"model.base={base_model}", f"data.source={data}", "tracking=wandb", *FAST, *FAST_EVAL,
                           steps=2)) == 0
    _wandb_done()
    assert list((run / "validation").glob("step-*.png")) and (run / "report.json").is_file()
    files = _files(run / "wandb")
    _assert_clean(files, run, data, allowed_dir=run / "wandb")
    log = b"".join(raw for p, raw in files.items() if p.suffix == ".wandb")
    assert b"validation prompt 1" in log and b"<local path>" in log  # images and hparams did reach the tracker
    assert b"eval/attacks" in log  # and so did the evaluation (attack table, metrics, plots)
    assert not list((run / "wandb").rglob("output.log"))  # no captured console


def test_wandb_opt_in_sends_prompts_and_paths(tmp_path, base_model, monkeypatch):
    """`tracking_log_captions=true`: the same byte search finds the prompts and the data path (it can fail),
    and the default prompts are still held-out captions, never a member's."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    data, run = _data(tmp_path), tmp_path / "run"
    assert main(train_args(run, f"model.base={base_model}", f"data.source={data}", "tracking=wandb", *FAST,
                           "tracking_log_captions=true", steps=2)) == 0
    _wandb_done()
    log = b"".join(_files(run / "wandb").values())
    split = _split(run)
    used = {r["caption"] for key in ("members", "nonmembers") for r in split[key]}
    held_out = [f"{MARK}{i:03d} private words" for i in range(24) if f"{MARK}{i:03d} private words" not in used]
    assert any(c.encode() in log for c in held_out)
    assert str(data).encode() in log
    assert not any(r["caption"].encode() in log for r in split["members"])


def test_tensorboard_gets_no_captions_ids_or_paths(tmp_path, base_model):
    data, run = _data(tmp_path), tmp_path / "run"
    assert main(train_args(run, f"model.base={base_model}", f"data.source={data}", "tracking=tensorboard", *FAST,
                           steps=2)) == 0
    files = _files(run / "logs")
    assert any(p.name.startswith("events.out.tfevents") for p in files)
    _assert_clean(files, run, data)
    assert any(b"<local path>" in raw for raw in files.values())


# ---------------------------------------------------------------------- default validation prompts
def _rec(rid: str, caption: str, group: str | None = None, captions=()) -> Record:
    return Record(rid, caption, None, group or rid, f"sha-{rid}", list(captions))


def test_held_out_prompts_are_never_training_captions():
    members = [_rec("m1", "red apple"), _rec("m2", "blue car", captions=["blue car", "a blue automobile"])]
    nonmembers = [_rec("n1", "green tree")]
    canary = _rec("c1", "canary phrase")
    trained = [*members, _rec("m1#dup1", "red apple", group="m1"), canary]
    source = [
        *members, *nonmembers,
        _rec("u1", "Red  Apple"),                    # shares a member's caption (case / spacing aside)
        _rec("u2", "sibling", group="m1"),           # same group as a member (a near-duplicate)
        _rec("u3", "a blue automobile"),             # a member's second caption
        _rec("u4", "canary phrase"),                 # a canary's caption (a training row, not a member)
        _rec("u5", "green tree"),                    # a non-member's caption
        _rec("u6", "yellow bird"), _rec("u7", "yellow bird"), _rec("u8", "white cloud", captions=["white cloud", "red apple"]),
        _rec("u9", "grey stone"), _rec("u10", "pink shell"), _rec("u11", "black cat"),
    ]
    prompts = tracking.held_out_prompts(source, members, nonmembers, trained, n=4)
    assert prompts == ["yellow bird", "grey stone", "pink shell", "black cat"]
    banned = {tracking.normalize(c) for r in trained for c in tracking.record_captions(r)}
    assert not banned & {tracking.normalize(p) for p in prompts}


def test_held_out_prompts_fall_back_to_nonmembers_then_nothing():
    members = [_rec("m1", "red apple")]
    nonmembers = [_rec("n1", "red apple"), _rec("n2", "green tree"), _rec("n3", "blue sky")]
    source = [*members, *nonmembers, _rec("u1", "RED APPLE")]
    assert tracking.held_out_prompts(source, members, nonmembers, members, n=4) == ["green tree", "blue sky"]
    assert tracking.held_out_prompts([*members, *nonmembers[:1], source[-1]], members, nonmembers[:1], members, n=4) == []
    split_caption = [_rec("m2", "x|orange fruit")]
    nm = [_rec("n4", "orange fruit"), _rec("n5", "plum")]
    assert tracking.held_out_prompts(split_caption + nm, split_caption, nm, split_caption, separator="|") == ["plum"]


def test_trainer_validation_prompts(tmp_path):
    """The trainer's default: held-out source rows, never a member caption even where a held-out row
    shares one; the user's prompts as given."""
    from privtune.config import load_config
    from privtune.trainers import get_trainer

    captions = [f"caption {i % 24}" for i in range(32)]  # rows 24-31 repeat the captions of rows 0-7
    data = make_image_folder(tmp_path / "data", n=32, captions=captions)

    def trainer(*extra):
        t = get_trainer("lora")(load_config("lora", train_args(tmp_path / "run", f"data.source={data}", *extra)[1:]))
        for stage in ("validate_config", "setup_accelerator", "check_run_dir", "setup_data"):
            getattr(t, stage)()
        return t

    t = trainer()
    prompts = t.release.validation_prompts()
    training = {r.caption for r in t.train_records}
    split_ids = {r.id for r in t.split.members + t.split.nonmembers}
    unused = [r for r in t.source.records if r.id not in split_ids]
    assert any(r.caption in training for r in unused)  # the case under test: a held-out row with a member's caption
    assert len(prompts) == 4 and not training & set(prompts)
    assert set(prompts) <= {r.caption for r in unused}
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    t = trainer("train.validation_prompts=[caption 0,my own words]")
    assert t.release.validation_prompts() == ["caption 0", "my own words"]


def test_tracker_captions_are_neutral_unless_the_users_or_opted_in():
    cfg = OmegaConf.create({"train": {"validation_prompts": None}, "tracking_log_captions": False})
    assert tracking.tracker_captions(cfg, ["a", "b"]) == ["validation prompt 1", "validation prompt 2"]
    cfg.tracking_log_captions = True
    assert tracking.tracker_captions(cfg, ["a", "b"]) == ["a", "b"]
    cfg = OmegaConf.create({"train": {"validation_prompts": ["a", "b"]}, "tracking_log_captions": False})
    assert tracking.tracker_captions(cfg, ["a", "b"]) == ["a", "b"]


# ---------------------------------------------------------------------- hyper-parameters
def test_tracker_hparams_scrub_paths_captions_and_ids(tmp_path, monkeypatch):
    from privtune.config import load_config

    model = tmp_path / "my-model"
    model.mkdir()
    (tmp_path / "reldata").mkdir()
    (tmp_path / "privtune").mkdir()  # a folder named like the tracker project: the project is still no path
    monkeypatch.chdir(tmp_path)
    private = tracking.private_strings([_rec("img007.png", "red apple")], [_rec("row3", "blue car")])
    overrides = [f"output_dir={tmp_path / 'run'}", f"model.base={model}", "data.source=reldata",
                 "train.validation_prompts=[a red apple on a table,a fine day]", "eval.baseline=runs/missing",
                 "resume=checkpoints/checkpoint-5"]
    hp = tracking.tracker_hparams(load_config("lora", overrides), private)
    assert hp["output_dir"] == hp["model.base"] == hp["data.source"] == hp["resume"] == hp["eval.baseline"] == "<local path>"
    assert hp["tracker_project"] == "privtune" and hp["trainer"] == "lora" and hp["data.subset"] == "pool"
    assert "red apple" not in hp["train.validation_prompts"] and "a fine day" in hp["train.validation_prompts"]
    text = json.dumps(hp)
    assert str(tmp_path) not in text and "reldata" not in text
    hub = tracking.tracker_hparams(load_config("lora", ["model.base=org/some-model", "data.source=org/some-data"]), private)
    assert hub["model.base"] == "org/some-model" and hub["data.source"] == "org/some-data"
    scrubbed = tracking.scrub_config({"note": "img007.png", "tag": "row3", "other": "row30", "n": 3}, private)
    assert scrubbed == {"note": "<local path>", "tag": "<redacted>", "other": "row30", "n": 3}
    opted = tracking.tracker_hparams(load_config("lora", [*overrides, "tracking_log_captions=true"]), private)
    assert opted["model.base"] == str(model) and "red apple" in opted["train.validation_prompts"]


def test_wandb_settings_capture_nothing_local_by_default():
    pytest.importorskip("wandb")
    settings = tracking.wandb_settings(OmegaConf.create({"tracking_log_captions": False}))
    assert settings.console == "off" and settings.x_disable_meta and settings.disable_git and settings.disable_code
    assert tracking.wandb_settings(OmegaConf.create({"tracking_log_captions": True})) is None
