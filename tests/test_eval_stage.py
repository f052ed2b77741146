"""The evaluation stage wired into training and the standalone `privtune.evaluate`."""

import json

import pytest
from safetensors.torch import load_file, save_file

from privtune.evaluate import main as evaluate_main
from privtune.export import LORA_FILE
from privtune.train import main as train_main

from .conftest import launch_two_processes, train_args

FAST_EVAL = (
    "eval.enabled=true", "eval.attacks=[loss,secmi,pia]", "eval.bootstrap=50",
    "eval.attack_params={loss: {timesteps: [100, 300], draws: 1}, secmi: {t_sec: 50, k: 10}, pia: {timesteps: [100, 300]}}",
    "eval.utility_generations=4", "eval.utility_inference_steps=4",
)


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory, base_model):
    run = tmp_path_factory.mktemp("eval") / "run"
    assert train_main(train_args(run, f"model.base={base_model}", *FAST_EVAL, steps=4)) == 0
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    return run


def test_report_and_card_after_training(evaluated_run):
    report = json.loads((evaluated_run / "report.json").read_text())
    assert set(report["attacks"]) == {"loss", "secmi", "pia"}
    for name, attack in report["attacks"].items():
        auc = attack["metrics"]["auc"]
        assert 0.0 <= auc["value"] <= 1.0 and len(auc["ci"]) == 2, name
        assert attack["nfe_per_sample"] > 0
    assert attack["metrics"]["n_members"] == 4  # the report half of 8 members
    assert report["utility"]["heldout_denoising_loss"] > 0
    assert (evaluated_run / "plots" / "roc.png").is_file()
    assert "| loss" in (evaluated_run / "report.md").read_text() or "loss" in (evaluated_run / "report.md").read_text()
    card = (evaluated_run / "lora" / "README.md").read_text()
    assert card.startswith("---") and "base_model" in card
    assert "privacy" in card.lower() and "AUC" in card
    captions = [r["caption"] for r in json.loads((evaluated_run / "split.json").read_text())["members"]]
    assert not any(c in card for c in captions)
    assert str(evaluated_run) not in card


def test_standalone_evaluate_matches_automatic_stage(evaluated_run, tmp_path, base_model):
    out = tmp_path / "again"
    card = (evaluated_run / "lora" / "README.md").read_bytes()
    assert evaluate_main([f"run={evaluated_run}", f"out={out}"]) == 0
    assert (evaluated_run / "lora" / "README.md").read_bytes() == card  # a report elsewhere leaves the run's card alone
    first = json.loads((evaluated_run / "report.json").read_text())
    again = json.loads((out / "report.json").read_text())
    for name in first["attacks"]:
        a, b = first["attacks"][name]["samples"], again["attacks"][name]["samples"]
        assert a["ids"] == b["ids"]
        assert max(abs(x - y) for x, y in zip(a["scores"], b["scores"])) <= 1e-3 * max(1.0, max(abs(x) for x in a["scores"]))


def test_external_lora_mode(evaluated_run, tmp_path, base_model):
    out = tmp_path / "ext"
    args = [f"model={base_model}", f"lora={evaluated_run / 'lora'}", f"members={evaluated_run / 'split.json'}", f"out={out}",
            "eval.attacks=[pia]", "eval.utility=false", "eval.bootstrap=20"]
    assert evaluate_main(args) == 0
    assert "pia" in json.loads((out / "report.json").read_text())["attacks"]


def test_unknown_attack_is_a_clear_error(tmp_path, base_model, capsys):
    assert train_main(train_args(tmp_path / "run", f"model.base={base_model}", "eval.enabled=true", "eval.attacks=[loss,nope]")) == 2
    err = capsys.readouterr().err
    assert "unknown attack 'nope'" in err and "secmi" in err
    assert not (tmp_path / "run").exists()


def test_lora_that_does_not_fit_is_a_clear_error(evaluated_run, tmp_path, base_model, capsys):
    weights = load_file(str(evaluated_run / "lora" / LORA_FILE))
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    save_file({k.replace("down_blocks", "no_such_blocks"): v for k, v in weights.items()}, str(renamed / LORA_FILE))
    reshaped = tmp_path / "reshaped"
    reshaped.mkdir()
    save_file({k: (v[:, :-1].contiguous() if v.ndim >= 2 and "lora_A" in k else v) for k, v in weights.items()}, str(reshaped / LORA_FILE))
    for bad in (renamed, reshaped):
        args = [f"model={base_model}", f"lora={bad}", f"members={evaluated_run / 'split.json'}", f"out={tmp_path / 'o'}",
                "eval.attacks=[pia]"]
        assert evaluate_main(args) == 2
        assert "does not fit the base model" in capsys.readouterr().err


def test_overlapping_manifest_is_refused(evaluated_run, tmp_path, base_model, capsys):
    manifest = json.loads((evaluated_run / "split.json").read_text())
    manifest["nonmembers"][0] = manifest["members"][0]
    bad = tmp_path / "split.json"
    bad.write_text(json.dumps(manifest))
    args = [f"model={base_model}", f"lora={evaluated_run / 'lora'}", f"members={bad}", f"out={tmp_path / 'o'}"]
    assert evaluate_main(args) == 2
    assert "overlap" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_give_the_same_scores(evaluated_run, tmp_path):
    out = tmp_path / "two"
    launch_two_processes("privtune.evaluate", [f"run={evaluated_run}", f"out={out}"])
    one = json.loads((evaluated_run / "report.json").read_text())
    two = json.loads((out / "report.json").read_text())
    for name in one["attacks"]:
        a, b = one["attacks"][name]["samples"]["scores"], two["attacks"][name]["samples"]["scores"]
        assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-3 * max(1.0, max(abs(x) for x in a))


def test_reevaluation_refuses_to_overwrite_and_keeps_the_training_command(evaluated_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(evaluated_run, run)
    before = (run / "report.json").read_bytes()
    assert evaluate_main([f"run={run}"]) == 2
    assert "overwrite=true" in capsys.readouterr().err
    assert (run / "report.json").read_bytes() == before
    trained_by = json.loads(before)["command"]
    config = (run / "config.yaml").read_text()  # a run written before a key existed takes its current default
    (run / "config.yaml").write_text("\n".join(line for line in config.splitlines() if "auxiliary_members" not in line) + "\n")
    assert evaluate_main([f"run={run}", "overwrite=true", "eval.attacks=[loss]", "eval.utility=false", "eval.bootstrap=20"]) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["command"] == trained_by and "privtune.train" in trained_by
    assert "privtune.evaluate" in report["evaluation_command"]
    assert "privtune.train" in (run / "lora" / "README.md").read_text().split("### Reproduce")[1]


def test_training_command_is_rebuilt_from_the_config_when_no_report_exists(tmp_path, base_model):
    from omegaconf import OmegaConf

    from privtune.evaluate import training_command

    run = tmp_path / "run"
    assert train_main(train_args(run, f"model.base={base_model}", "optim.lr=0.002", steps=1)) == 0
    command = training_command(OmegaConf.load(run / "config.yaml"), run)
    assert command.startswith("python -m privtune.train recipe=lora ")
    assert "optim.lr=0.002" in command and "train.max_steps=1" in command and "optim.betas" not in command


def test_reevaluating_a_dp_run_keeps_its_guarantee(tmp_path, base_model):
    run = tmp_path / "dp"
    fast = ("eval.enabled=true", "eval.attacks=[loss]", "eval.bootstrap=20", "eval.utility=false",
            "eval.attack_params={loss: {timesteps: [100], draws: 1}}")
    args = ["recipe=dpsgd", *train_args(run, f"model.base={base_model}", *fast, steps=2)[1:]]
    assert train_main(args) == 0
    eps = json.loads((run / "privacy.json").read_text())["epsilon"]
    card = (run / "lora" / "README.md").read_text()
    assert "differential privacy" in card and "No formal guarantee" not in card
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    assert evaluate_main([f"run={run}", "overwrite=true"]) == 0
    card = (run / "lora" / "README.md").read_text()
    assert "No formal guarantee" not in card and f"ε = {eps:.4g}" in card
    assert json.loads((run / "report.json").read_text())["privacy"]["epsilon"] == pytest.approx(eps)


def test_privacy_record_of_an_older_dp_run_gets_its_caveat(tmp_path):
    from privtune.evaluate import read_privacy

    (tmp_path / "privacy.json").write_text(json.dumps({"epsilon": 8.0, "delta": 1e-3, "accountant": "rdp"}))
    privacy = read_privacy(tmp_path)
    assert privacy["epsilon"] == 8.0 and not privacy["secret_sampling"]
    assert any("public run seed" in c for c in privacy["caveats"])
    (tmp_path / "privacy.json").write_text(json.dumps({"epsilon": 8.0, "secret_sampling": True, "caveats": []}))
    assert read_privacy(tmp_path)["caveats"] == []
    assert read_privacy(None) is None


def test_every_attack_runs_on_a_real_run(evaluated_run, tmp_path):
    """eval.attacks=[all] on the tiny SD run: every registered attack gets what it requires (captions and the text
    encoder, pixels and the VAE, the UNet's LoRA weights) and none is skipped."""
    from privtune.eval.attacks import ATTACKS

    out = tmp_path / "all"
    cheap = ("{loss: {timesteps: [100], draws: 1}, secmi: {t_sec: 40, k: 20}, secmi_nn: {t_sec: 40, k: 20, epochs: 2}, "
             "pia: {timesteps: [100]}, pian: {timesteps: [100]}, quantile: {t_sec: 40, k: 20, n_models: 2}, "
             "clid_th: {timesteps: [450]}, clid_vec: {timesteps: [450]}, gsa1: {n_timesteps: 2}, gsa2: {n_timesteps: 2}, "
             "structural: {timesteps: [40]}, wen: {generations: 1, steps: 4}, wen_trajectory: {generations: 1, steps: 4}, "
             "ren: {}, ren_trajectory: {steps: 4, last: 2}, rediffuse: {n: 2}, miagm: {per_prompt: 1}, "
             "wu: {n: 1}, pang_wang: {n: 1}}")
    assert evaluate_main([f"run={evaluated_run}", f"out={out}", "eval.attacks=[all]", f"eval.attack_params={cheap}",
                          "eval.utility=false", "eval.bootstrap=20", "eval.utility_inference_steps=4"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["attacks"]) == set(ATTACKS.names()) and report["protocol"]["attacks_skipped"] == {}
    gsa = report["attacks"]["gsa1"]["params"]
    assert gsa["parameters"] == "lora" and gsa["n_tensors"] > 0
    assert report["attacks"]["structural"]["params"]["vae_floor_ssim"]
    assert report["attacks"]["rediffuse"]["params"]["variations_per_query"] == 2  # black box: generation API only
    assert report["attacks"]["rediffuse"]["nfe_per_sample"] == 2  # t / stride = 1 UNet pass per variation
    assert report["attacks"]["miagm"]["params"]["generated_images"] > 0
    for name, attack in report["attacks"].items():
        assert 0.0 <= attack["metrics"]["auc"]["value"] <= 1.0 and attack["seconds"] >= 0, name
    assert "Wall time per attack" in (out / "report.md").read_text()


def test_shadow_models_are_trained_once_on_disjoint_rows_and_pooled_for_the_learned_attacks(evaluated_run, tmp_path,
                                                                                         capsys):
    """eval.shadow.count=2: the run's recipe is trained again in <run>/shadows/shadow-0 and shadow-1 (seeds 1000 and
    1001, their own splits) on rows disjoint from the run's split (ids, groups, images); clid_vec~shadow and
    gsa1~shadow are fitted once on both shadows' samples; a second evaluation reuses both shadows, and one whose shadow
    recipe differs from a cached shadow's is refused."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(evaluated_run, run)
    args = [f"run={run}", "eval.shadow.enabled=true", "eval.shadow.count=2", "eval.attacks=[loss,clid_vec,gsa1]",
            "eval.utility=false", "eval.bootstrap=20",
            "eval.attack_params={loss: {timesteps: [100], draws: 1}, clid_vec: {timesteps: [450]}, gsa1: {n_timesteps: 2}}"]
    assert evaluate_main([*args, f"out={tmp_path / 'a'}"]) == 0
    ours = json.loads((run / "split.json").read_text())
    rows = [r for part in ("members", "nonmembers") for r in ours[part]]
    theirs = []
    for i in (0, 1):
        shadow = run / "shadows" / f"shadow-{i}"
        assert (shadow / "lora" / LORA_FILE).is_file() and not (shadow / "report.json").exists()
        theirs.append(json.loads((shadow / "split.json").read_text()))
        shadow_rows = [r for part in ("members", "nonmembers") for r in theirs[-1][part]]
        for key in ("id", "group", "sha256"):
            assert not {r[key] for r in rows} & {r[key] for r in shadow_rows}, key
    assert {r["id"] for r in theirs[0]["members"]} != {r["id"] for r in theirs[1]["members"]}  # their own seeds
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert set(report["attacks"]) == {"loss", "clid_vec", "clid_vec~shadow", "gsa1", "gsa1~shadow"}
    entry = report["attacks"]["gsa1~shadow"]["params"]
    assert entry["fitted_on"].startswith("shadow model: shadows/shadow-0..1 (2 models, seeds 1000, 1001")
    assert entry["parameters"] == "lora" and entry["n_tensors"] == report["attacks"]["gsa1"]["params"]["n_tensors"]
    assert entry["n_fit"] + entry["n_val"] == 2 * (len(theirs[0]["members"]) + len(theirs[0]["nonmembers"]))
    protocol = report["protocol"]["shadow"]
    assert protocol["models"] == 2 and protocol["members"] == 2 * len(ours["members"])
    logs = [(run / "shadows" / f"shadow-{i}.log").read_text() for i in (0, 1)]
    assert evaluate_main([*args, f"out={tmp_path / 'b'}"]) == 0
    assert [(run / "shadows" / f"shadow-{i}.log").read_text() for i in (0, 1)] == logs  # reused, not trained again
    capsys.readouterr()
    assert evaluate_main([*args, "eval.shadow.seed=7", f"out={tmp_path / 'c'}"]) == 2  # a cached shadow of another seed
    assert "trained with seed=1000 (now 7)" in capsys.readouterr().err and not (tmp_path / "c" / "report.json").exists()


def test_data_exclude_leaves_out_every_row_of_a_split(evaluated_run):
    from privtune.data.split import exclude_rows, load_manifest
    from privtune.data.sources import Record

    manifest = load_manifest(evaluated_run)
    m = manifest["members"][0]
    records = [Record(m["id"], "c", None, "g-new", "h-new"), Record("other", "c", None, m["group"], "h2"),
               Record("other2", "c", None, "g3", m["sha256"]), Record("free", "c", None, "g4", "h4")]
    assert [r.id for r in exclude_rows(records, manifest)] == ["free"]


def test_shadow_recipe_is_the_targets_own_and_multi_adapter_trainers_are_refused(tmp_path):
    from privtune.config import load_config
    from privtune.errors import ConfigError
    from privtune.eval.shadow import shadow_config

    cfg = load_config("smp_lora", ["seed=3", "mp.lambda=0.7"])
    shadow = shadow_config(cfg, tmp_path / "run")
    assert shadow["trainer"] == "smp_lora" and shadow["mp"]["lambda"] == 0.7 and shadow["seed"] == 1000
    assert shadow["data"]["exclude"] == str(tmp_path / "run") and shadow["eval"]["enabled"] is False
    assert shadow["output_dir"] == str(tmp_path / "run" / "shadows" / "shadow-0")
    second = shadow_config(cfg, tmp_path / "run", index=1)
    assert second["seed"] == 1001 and second["output_dir"] == str(tmp_path / "run" / "shadows" / "shadow-1")
    for name in ("dualmd", "distillmd"):
        with pytest.raises(ConfigError, match="not supported yet"):
            shadow_config(load_config(name), tmp_path / "run")
