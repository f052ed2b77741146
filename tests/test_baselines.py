"""Like-for-like baselines: a defended run and its baseline must train on the same rows, and
`eval.baseline` refuses one that did not (before anything is written)."""

from __future__ import annotations

import json

import pytest

from privtune.train import main

from .conftest import train_args


def data_stage(recipe, run_dir, base_model, *overrides):
    """A trainer of `recipe` up to its data stage (split, auxiliary rows, fingerprint)."""
    from privtune.config import load_config
    from privtune.trainers import get_trainer

    args = [*train_args(run_dir)[1:], f"model.base={base_model}", "mp.attacker_nonmembers=4", *overrides] if "mp" in recipe \
        else [*train_args(run_dir)[1:], f"model.base={base_model}", *overrides]
    cfg = load_config(recipe, args)
    trainer = get_trainer(cfg.trainer)(cfg)
    trainer.validate_config()
    trainer.setup_accelerator()
    trainer.setup_data()
    return trainer


@pytest.mark.parametrize("recipe", ["mp_lora", "smp_lora"])
def test_proxy_defense_and_its_lora_baseline_train_on_the_same_rows(tmp_path, base_model, recipe):
    defended = data_stage(recipe, tmp_path / "d", base_model, "data.auxiliary_members=6")
    baseline = data_stage("lora", tmp_path / "b", base_model, "data.auxiliary_members=6")
    plain = data_stage("lora", tmp_path / "p", base_model)
    ids = lambda t: sorted(r.id for r in t.train_records)  # noqa: E731
    assert ids(defended) == ids(baseline) and len(ids(defended)) == 8 + 6
    assert {r.id for r in defended.attacker_split.members} == {r.id for r in baseline.split.auxiliary}
    assert defended.split.training_fingerprint == baseline.split.training_fingerprint
    assert plain.split.training_fingerprint != defended.split.training_fingerprint
    assert [r.id for r in defended.split.members] == [r.id for r in plain.split.members]  # same evaluation split


def test_manifests_record_the_training_rows(tmp_path, base_model):
    run = tmp_path / "run"
    assert main(train_args(run, f"model.base={base_model}", "data.auxiliary_members=3", steps=1)) == 0
    manifest = json.loads((run / "split.json").read_text())
    assert manifest["training_fingerprint"]["rows"] == 8 + 3
    aux = {r["id"] for r in manifest["auxiliary_members"]}
    assert len(aux) == 3 and not aux & {r["id"] for r in manifest["members"] + manifest["nonmembers"]}


def test_baseline_trained_on_other_rows_is_refused_before_anything_is_written(tmp_path, base_model, capsys):
    baseline = tmp_path / "baseline"
    assert main(train_args(baseline, f"model.base={base_model}", steps=1)) == 0  # 8 rows
    (baseline / "report.json").write_text(json.dumps({"summary": {}}))
    run = tmp_path / "defended"
    args = train_args(run, f"model.base={base_model}", "data.auxiliary_members=4", "eval.enabled=true",
                      f"eval.baseline={baseline}", steps=1)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "trained on other rows" in err and "data.auxiliary_members" in err
    assert not run.exists() or not any(run.iterdir())


def test_check_baseline_accepts_the_same_rows_and_refuses_unverifiable_ones(tmp_path):
    from privtune.errors import ConfigError
    from privtune.eval.stage import check_baseline

    fp = {"rows": 96, "sha256": "ab" * 32}
    folder = tmp_path / "b"
    folder.mkdir()
    (folder / "report.json").write_text(json.dumps({"training_data": fp}))
    check_baseline(folder, dict(fp))
    (folder / "report.json").write_text(json.dumps({"summary": {}}))
    with pytest.raises(ConfigError, match="older privtune"):
        check_baseline(folder, fp)
