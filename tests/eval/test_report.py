"""Report (json / markdown / plots / tracker logging) and the privacy model card, on fake attack results."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from privtune import __version__
from privtune.eval.card import CardLeakError, scrub, scrub_command, write_model_card
from privtune.eval.metrics import calibrated_accuracy, evaluate_scores
from privtune.eval.report import build_report, log_report, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CAPTIONS = ["a grinning face with sweat", "purple unicorn holding a taco"]
HUB_BASE = "runwayml/stable-diffusion-v1-5"


def fake_attacks(shifts: dict[str, float], seed: int = 0, n: int = 40, prefix: str = "emoji_") -> dict:
    """run_attacks-shaped result: members' scores shifted up by `shifts[name]`."""
    rng = np.random.default_rng(seed)
    labels = np.r_[np.ones(n), np.zeros(n)].astype(int)
    ids = [f"{prefix}{i:04d}" for i in range(2 * n)]
    attacks = {}
    for name, shift in shifts.items():
        scores = np.r_[rng.normal(shift, 1.0, n), rng.normal(0.0, 1.0, n)]
        cal = np.r_[rng.normal(shift, 1.0, n), rng.normal(0.0, 1.0, n)]
        attacks[name] = {
            "params": {"timestep": 100},
            "nfe_per_sample": 2,
            "calibration_nfe_per_sample": 2,
            "metrics": evaluate_scores(scores, labels, n_resamples=50),
            "calibrated_threshold": {**calibrated_accuracy(cal, labels, scores, labels), "n_threshold_fit": 2 * n},
            "samples": {"ids": ids, "labels": labels.tolist(), "scores": scores.tolist(), "raw": (-scores).tolist()},
            "seconds": 0.1,
        }
    return {
        "protocol": {
            "score_orientation": "higher score = more likely member", "calibration_fraction": 0.5, "seed": 0,
            "batch_size": 8, "n_calibration": {"members": n, "nonmembers": n}, "n_report": {"members": n, "nonmembers": n},
        },
        "attacks": attacks,
    }


def make_config(tmp_path: Path, trainer: str = "lora") -> dict:
    data_dir = tmp_path / "secret_data"
    data_dir.mkdir(exist_ok=True)
    return {
        "trainer": trainer, "seed": 0, "output_dir": str(tmp_path / "runs" / "private_run"),
        "model": {"base": "embedded"}, "data": {"source": str(data_dir), "members": 80, "nonmembers": 80, "resolution": 32},
        "lora": {"rank": 4, "alpha": 8, "targets": "attn"},
        "train": {"max_steps": 10, "batch_size": 4, "validation_prompts": CAPTIONS},
        "optim": {"lr": 1e-3},
        **({"dp": {"noise_multiplier": 1.1, "max_grad_norm": 1.0}} if trainer == "dp" else {}),
    }


def make_report(tmp_path: Path, baseline: dict | None = None, privacy: dict | None = None, shifts=None) -> dict:
    trainer = "dp" if privacy else "lora"
    cfg = make_config(tmp_path, trainer)
    return build_report(
        config=cfg,
        attacks_result=fake_attacks(shifts or {"loss": 0.3, "pia": 1.5}),
        utility={"fid": 40.0, "clip_score": 0.25},
        privacy=privacy,
        split_sizes={"members": 80, "nonmembers": 80},
        command=f"privtune train recipe={trainer} data.source={cfg['data']['source']} output_dir={cfg['output_dir']}",
        defense={"name": trainer, "settings": cfg.get("dp", {})},
        baseline=baseline,
    )


def test_build_and_write_report(tmp_path):
    report = make_report(tmp_path)
    paths = write_report(tmp_path / "run", report)
    loaded = json.loads((tmp_path / "run" / "report.json").read_text())
    assert loaded["privtune_version"] == __version__
    assert loaded["config"]["lora"]["rank"] == 4
    assert set(loaded["attacks"]) == {"loss", "pia"}
    for attack in loaded["attacks"].values():
        for metric in ("auc", "asr", "tpr@1%fpr", "tpr@0.1%fpr"):
            lo, hi = attack["metrics"][metric]["ci"]
            assert lo <= attack["metrics"][metric]["value"] <= hi
        assert attack["calibrated_threshold"]["n_threshold_fit"] == 80
        assert len(attack["samples"]["scores"]) == 80
    best = max(loaded["attacks"], key=lambda n: loaded["attacks"][n]["metrics"]["auc"]["value"])
    assert best == "pia"
    summary = loaded["summary"]["best_attack"]
    assert summary["name"] == "pia"
    for metric in ("auc", "tpr@1%fpr", "tpr@0.1%fpr"):
        assert summary[metric] == {k: loaded["attacks"]["pia"]["metrics"][metric][k] for k in ("value", "ci")}
        assert set(summary[metric]) == {"value", "ci"}
    assert "comparison" not in loaded and loaded["privacy"] is None

    md = (tmp_path / "run" / "report.md").read_text()
    for name in ("loss", "pia"):
        auc = loaded["attacks"][name]["metrics"]["auc"]
        assert f"| {name} | {auc['value']:.3f} [{auc['ci'][0]:.3f}, {auc['ci'][1]:.3f}] |" in md
    assert "tpr@0.1%fpr is unreliable" in md
    assert "No formal privacy guarantee" in md
    assert report["command"] in md

    plots = tmp_path / "run" / "plots"
    for name in ("roc.png", "scores_loss.png", "scores_pia.png"):
        assert (plots / name).read_bytes()[:8] == PNG_MAGIC
    assert paths["roc"] == plots / "roc.png" and paths["scores_pia"] == plots / "scores_pia.png"


def test_baseline_comparison_holds_deltas(tmp_path):
    baseline = make_report(tmp_path, shifts={"loss": 2.5, "pia": 3.0})
    baseline["utility"] = {"fid": 30.0, "clip_score": 0.30}
    report = make_report(tmp_path, baseline=baseline)
    comp = report["comparison"]
    b = comp["best_auc"]
    assert b["baseline"] == baseline["summary"]["best_attack"]["auc"]["value"]
    assert b["delta"] == pytest.approx(b["run"] - b["baseline"]) and b["delta"] < 0
    assert comp["utility"]["fid"] == {"run": 40.0, "baseline": 30.0, "delta": pytest.approx(10.0)}
    assert comp["utility"]["clip_score"]["delta"] == pytest.approx(-0.05)
    write_report(tmp_path / "run", report)
    assert "Comparison with baseline" in (tmp_path / "run" / "report.md").read_text()


def test_rewrite_is_atomic_and_drops_stale_plots(tmp_path):
    run = tmp_path / "run"
    write_report(run, make_report(tmp_path, shifts={"loss": 0.3, "pia": 1.5, "secmi": 1.0}))
    second = make_report(tmp_path, shifts={"loss": 0.1, "pia": 0.2})
    write_report(run, second)
    assert json.loads((run / "report.json").read_text())["summary"] == second["summary"]
    assert not list(run.rglob("*.tmp")) and not [p for p in run.rglob(".*") if p.is_file()]
    assert sorted(p.name for p in (run / "plots").iterdir()) == ["roc.png", "scores_loss.png", "scores_pia.png"]


class _Writer:
    def __init__(self):
        self.texts, self.images = {}, {}

    def add_text(self, key, text, step):
        self.texts[key] = text

    def add_images(self, key, stack, step, dataformats):
        self.images[key] = stack.shape


class _Tracker:
    name = "tensorboard"

    def __init__(self):
        self.writer = _Writer()


class _Accelerator:
    def __init__(self):
        self.trackers = [_Tracker()]
        self.logged = {}

    def log(self, values, step=None):
        self.logged.update(values)


def test_log_report_to_trackers(tmp_path):
    report = make_report(tmp_path, privacy={"epsilon": 8.0, "delta": 1e-5, "accountant": "rdp"})
    paths = write_report(tmp_path / "run", report)
    acc = _Accelerator()
    log_report(acc, report, paths)
    assert acc.logged["eval/pia/auc"] == report["attacks"]["pia"]["metrics"]["auc"]["value"]
    assert "eval/loss/tpr@1%fpr" in acc.logged and acc.logged["privacy/epsilon"] == 8.0
    assert acc.logged["utility/fid"] == 40.0
    writer = acc.trackers[0].writer
    assert "pia" in writer.texts["eval/attacks"]
    assert set(writer.images) == {"eval/plots/roc", "eval/plots/scores_loss", "eval/plots/scores_pia"}


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def test_card_front_matter_and_privacy_numbers(tmp_path):
    baseline = make_report(tmp_path, shifts={"loss": 2.5, "pia": 3.0})
    baseline["utility"] = {"fid": 30.0, "clip_score": 0.30}
    report = make_report(tmp_path, baseline=baseline)
    path = write_model_card(tmp_path / "lora", report, base_model=HUB_BASE, repro_command=report["command"])
    text = path.read_text()
    meta = _front_matter(text)
    assert meta["base_model"] == HUB_BASE and meta["license"] == "other" and meta["library_name"] == "diffusers"
    assert meta["tags"] == ["stable-diffusion", "lora", "privtune", "text-to-image", "diffusers"]
    auc = report["summary"]["best_attack"]["auc"]
    assert f"**{auc['value']:.3f} [{auc['ci'][0]:.3f}, {auc['ci'][1]:.3f}]**" in text
    assert "load_lora_weights" in text and "No formal guarantee" in text
    assert "Undefended baseline" in text and "| fid | 40 | 30 | +10 |" in text
    assert not list((tmp_path / "lora").glob(".*"))


def test_card_never_leaks_captions_ids_or_paths(tmp_path):
    report = make_report(tmp_path)
    ids = report["attacks"]["loss"]["samples"]["ids"]
    cfg = report["config"]
    command = report["command"] + " model.base=" + str(tmp_path) + " train.max_steps=10"
    forbidden = [*CAPTIONS, *ids, "emoji_0007.png", cfg["data"]["source"], cfg["output_dir"]]
    text = write_model_card(
        tmp_path / "lora", report, base_model=str(tmp_path), repro_command=command, forbidden=forbidden
    ).read_text()
    for secret in [*forbidden, str(tmp_path), "secret_data", "private_run"]:
        assert secret not in text
    assert "base_model" not in _front_matter(text)
    assert "data.source=<path>" in text and "output_dir=<path>" in text and "train.max_steps=10" in text


def test_card_shows_dp_epsilon(tmp_path):
    report = make_report(tmp_path, privacy={"epsilon": 7.93, "delta": 1e-5, "accountant": "rdp"})
    path = write_model_card(tmp_path / "lora", report, base_model=HUB_BASE, license="openrail", repro_command="privtune train recipe=dp")
    text = path.read_text()
    assert "ε = 7.93" in text and "δ = 1e-05" in text and "rdp" in text
    assert "`dp` settings" in text and "noise_multiplier=1.1" in text
    assert "dp" in _front_matter(text)["tags"] and _front_matter(text)["license"] == "openrail"


def test_scrub_and_leak_check(tmp_path):
    assert scrub({"A Secret": ["x a secret y", 3]}, ["a secret"]) == {"<redacted>": ["x <redacted> y", 3]}
    text = "library_name: diffusers; training; privtune train recipe=u231a.png"
    assert scrub(text, ["libra", "train", "u231a"]) == "library_name: diffusers; training; privtune <redacted> recipe=<redacted>.png"
    command = "privtune train recipe=x.yaml out=/abs/dir lr=0.1 ./data"
    assert scrub_command(command) == "privtune train recipe=<path> out=<path> lr=0.1 <path>"
    with pytest.raises(CardLeakError):
        write_model_card(tmp_path / "lora", make_report(tmp_path), base_model=HUB_BASE, repro_command="x",
                         forbidden=["privtune", "redacted"])
    assert not (tmp_path / "lora" / "README.md").exists()


def _defense_report(tmp_path: Path, recipe: str, overrides: list[str]) -> tuple[dict, str]:
    """A report on fake attacks for `recipe` + `overrides`, with the defense summarised as the stage does."""
    from privtune.config import load_config, to_container
    from privtune.eval.stage import defense_summary

    cfg = load_config(recipe, overrides)
    report = build_report(config=to_container(cfg), attacks_result=fake_attacks({"loss": 0.3}), utility=None, privacy=None,
                          split_sizes={"members": 40, "nonmembers": 40}, command=f"privtune train recipe={recipe}",
                          defense=defense_summary(cfg), baseline=None)
    write_report(tmp_path / "run", report)
    line = next(li for li in (tmp_path / "run" / "report.md").read_text().splitlines() if li.startswith("- **Defense:**"))
    return report, line


def test_defense_line_names_changed_keys_only(tmp_path):
    report, line = _defense_report(tmp_path, "lora", ["optim.lr=0.005", "seed=3", "train.log_every=2"])
    assert report["defense"] == {"name": "lora", "settings": {"optim": {"lr": 0.005}}}
    assert line == "- **Defense:** lora (optim.lr=0.005)"
    _, line = _defense_report(tmp_path / "plain", "lora", [])
    assert line == "- **Defense:** lora (every setting at the lora recipe's defaults)"


def test_defense_line_lists_the_defense_section_and_recipe_changes(tmp_path):
    report, line = _defense_report(tmp_path, "dpsgd", ["dp.noise_multiplier=1.5", "lora.rank=4"])
    settings = report["defense"]["settings"]
    assert report["defense"]["name"] == "dpsgd" and set(settings) == {"dp", "train", "lora"}
    assert settings["dp"]["noise_multiplier"] == 1.5 and settings["dp"]["accountant"] == "rdp"  # the whole dp section
    assert settings["train"] == {"max_grad_norm": 0} and settings["lora"] == {"rank": 4}  # the recipe's and the command's changes
    assert "dp.accountant=rdp" in line and "train.max_grad_norm=0" in line and "lora.rank=4" in line
    for unchanged in ("captions.", "memorization_filter.", "lora.alpha", "optim.lr", "eval.", " seed=", "(seed="):
        assert unchanged not in line
    card = write_model_card(tmp_path / "lora", report, base_model=HUB_BASE, repro_command="privtune train recipe=dpsgd").read_text()
    assert "`dp` settings" in card and "`captions` settings" not in card and "lora.rank=4" in card


def test_defense_line_never_names_a_local_data_or_teacher_path(tmp_path):
    from privtune.eval.report import defense_settings

    defaults = {"trainer": "lora", "data": {"source": "embedded", "members": 64}}
    config = {"trainer": "distillmd", "data": {"source": str(tmp_path / "faces"), "members": 32},
              "distill": {"teachers": str(tmp_path / "teachers"), "teacher_steps": 5}}
    out = defense_settings(config, defaults)
    assert out["data"] == {"members": 32} and out["distill"] == {"teacher_steps": 5}
    assert str(tmp_path) not in str(out)
