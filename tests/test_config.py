"""Recipes, overrides and the CLI's errors."""

import pytest

from privtune.config import available_recipes, load_config, parse_overrides
from privtune.errors import ConfigError
from privtune.train import main


def test_recipe_defaults_and_override():
    cfg = load_config("lora", ["train.max_steps=7", "lora.targets=attn"])
    assert cfg.trainer == "lora" and cfg.train.max_steps == 7 and cfg.lora.targets == "attn"
    assert cfg.output_dir == "runs/lora"


def test_unknown_recipe_lists_valid_ones():
    with pytest.raises(ConfigError, match="unknown recipe 'nope'.*lora"):
        load_config("nope")


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown key 'train.max_step'.*train.max_steps"):
        load_config("lora", ["train.max_step=3"])
    with pytest.raises(ConfigError, match="unknown key 'bogus'"):
        load_config("lora", ["bogus=1"])


def test_user_yaml_inherits_and_is_checked(tmp_path):
    good = tmp_path / "mine.yaml"
    good.write_text("inherits: lora\ntrain:\n  max_steps: 42\n")
    assert load_config(str(good)).train.max_steps == 42
    bad = tmp_path / "bad.yaml"
    bad.write_text("inherits: lora\ntrain:\n  maxsteps: 42\n")
    with pytest.raises(ConfigError, match="unknown key 'train.maxsteps'"):
        load_config(str(bad))


def test_overrides_need_key_value():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["max_steps"])


def test_help_lists_recipes_and_keys(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in available_recipes():
        assert name in out
    assert "model.base" in out and "train.max_steps" in out


def test_cli_reports_bad_input_without_traceback(capsys):
    assert main(["recipe=nope"]) == 2
    assert "unknown recipe" in capsys.readouterr().err


def test_8bit_on_cpu_is_a_clear_error(tmp_path, capsys):
    assert main(["recipe=lora", f"output_dir={tmp_path / 'run'}", "optim.use_8bit=true"]) == 2
    err = capsys.readouterr().err
    assert "optim.use_8bit" in err and "CUDA" in err
    assert not (tmp_path / "run").exists()


def test_child_recipe_may_add_a_section_which_is_then_strict(tmp_path):
    child = tmp_path / "defense.yaml"
    child.write_text("inherits: lora\ntrainer: lora\nmydefense:\n  strength: 2\n")
    assert load_config(str(child), ["mydefense.strength=3"]).mydefense.strength == 3
    with pytest.raises(ConfigError, match="unknown key 'mydefense.strenght'"):
        load_config(str(child), ["mydefense.strenght=3"])
    with pytest.raises(ConfigError, match="unknown key 'mydefense'"):
        load_config("lora", ["mydefense.strength=3"])


@pytest.mark.parametrize("override, message", [
    ("train.max_steps=abc", "train.max_steps=abc in the command line: expected an integer"),
    ("optim.lr=fast", "optim.lr=fast in the command line: expected a number"),
    ("export.kohya=flase", "export.kohya=flase in the command line: expected true or false"),
    ("data.random_flip=1", "data.random_flip=1 in the command line: expected true or false"),
    ("eval.attacks=loss", "eval.attacks=loss in the command line: expected a list"),
    ("train.max_steps=2.5", "expected an integer"),
])
def test_wrong_value_types_are_named_before_anything_runs(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("lora", [override])


def test_values_of_the_right_type_pass_and_unknown_keys_suggest_the_closest():
    cfg = load_config("dpsgd", ["dp.target_epsilon=4", "lora.targets=[to_q,to_k]", "dp.delta=null", "export.kohya=true"])
    assert cfg.dp.target_epsilon == 4 and list(cfg.lora.targets) == ["to_q", "to_k"] and cfg.export.kohya is True
    with pytest.raises(ConfigError, match=r"did you mean 'optim.weight_decay'"):
        load_config("lora", ["optim.weight_decy=0.1"])


def test_calibration_fraction_out_of_range_fails_before_training(tmp_path, capsys):
    from privtune.train import main

    run = tmp_path / "run"
    assert main(["recipe=lora", f"output_dir={run}", "eval.calibration_fraction=1.5"]) == 2
    assert "eval.calibration_fraction must be in (0, 1)" in capsys.readouterr().err
    assert not run.exists()
