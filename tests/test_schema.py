"""The typed schema (privtune.schema): every key typed and documented, every simple check at load time, before
anything is written, and the resolved configs of the shipped recipes unchanged by it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from privtune import schema
from privtune.config import RECIPES_DIR, available_recipes, load_config, to_container, to_yaml
from privtune.errors import ConfigError
from privtune.train import main

RESOLVED = Path(__file__).resolve().parent / "resolved_recipes"


# ---------------------------------------------------------------- the shipped recipes
def test_every_shipped_recipe_has_a_recorded_resolution():
    assert sorted(p.stem for p in RESOLVED.glob("*.yaml")) == available_recipes()


@pytest.mark.parametrize("name", available_recipes())
def test_shipped_recipe_resolves_to_its_recorded_config(name):
    """tests/resolved_recipes/<name>.yaml is `to_yaml(load_config(name))` from before the schema existed (keys,
    order, values and their types); after an intended change to a recipe, write the new resolution there."""
    assert to_yaml(load_config(name)) == (RESOLVED / f"{name}.yaml").read_text()


def test_schema_defaults_are_the_values_of_lora_yaml():
    shipped = OmegaConf.to_container(OmegaConf.load(RECIPES_DIR / "lora.yaml"))
    defaults = schema.defaults()
    assert defaults.pop("recipe") is None
    assert repr(defaults) == repr(shipped)  # same keys in the same order, same values of the same types


@pytest.mark.parametrize("f", schema.defense_fields(), ids=lambda f: f.name)
def test_defense_section_defaults_are_the_values_of_the_recipe_that_adds_it(f):
    node = OmegaConf.load(RECIPES_DIR / f"{f.metadata['recipe']}.yaml")
    section = schema.lookup(f.name).section
    assert repr(OmegaConf.to_container(node[f.name])) == repr(schema.defaults(section))


def test_every_schema_key_has_one_line_of_help():
    specs = list(schema.iter_paths())
    assert len(specs) > 150
    for spec in specs:
        assert isinstance(spec.help, str) and spec.help.strip() and "\n" not in spec.help, spec.path


def test_schema_choices_match_the_code_that_reads_them():
    from privtune.eval.extraction import REFERENCES
    from privtune.memorization.filter import METHODS
    from privtune.models.lora import TARGET_PRESETS
    from privtune.schema.evaluation import EXTRACTION_REFERENCES
    from privtune.schema.training import FILTER_METHODS, LORA_PRESETS

    assert set(LORA_PRESETS) == set(TARGET_PRESETS)
    assert FILTER_METHODS == METHODS and EXTRACTION_REFERENCES == REFERENCES


def test_a_plain_lora_config_holds_no_defense_section():
    defenses = {f.name for f in schema.defense_fields()}
    assert not defenses & set(load_config("lora"))
    assert defenses & set(load_config("dpsgd")) == {"dp"}
    assert defenses & set(load_config("distillmd")) == {"dualmd", "distill"}


def test_defense_keys_on_a_recipe_without_the_section_say_which_recipe_has_it():
    with pytest.raises(ConfigError, match=r"unknown key 'dp' in the command line: this recipe has no dp: section.*recipe=dpsgd"):
        load_config("lora", ["dp.target_epsilon=4"])
    with pytest.raises(ConfigError, match="trainer dpsgd needs the dp: section; use recipe=dpsgd"):
        load_config("lora", ["trainer=dpsgd"])


def test_the_loaded_config_stays_read_only_and_struct_locked():
    cfg = load_config("dpsgd")
    with pytest.raises(Exception):
        cfg.train.max_steps = 3
    with pytest.raises(Exception):
        cfg.train.new_key  # noqa: B018


# ---------------------------------------------------------------- types
@pytest.mark.parametrize("recipe, override, message", [
    ("lora", "train.batch_size=many", "train.batch_size=many in the command line: expected an integer (the default is 16)"),
    ("lora", "seed=1.5", "seed=1.5 in the command line: expected an integer"),
    ("lora", "train.max_steps=null", "train.max_steps=null in the command line: expected an integer"),
    ("lora", "optim.eps=tiny", "optim.eps=tiny in the command line: expected a number"),
    ("lora", "lora.text_encoder=maybe", "lora.text_encoder=maybe in the command line: expected true or false"),
    ("lora", "dedup.flip=0", "dedup.flip=0 in the command line: expected true or false"),
    ("lora", "optim.betas=0.9", "optim.betas=0.9 in the command line: expected a list of numbers"),
    ("lora", "optim.betas=[0.9,high]", "optim.betas=[0.9, high] in the command line: expected a list of numbers"),
    ("lora", "canaries.repetitions=[1,2.5]", "expected a list of integers"),
    ("lora", "eval.max_members=lots", "eval.max_members=lots in the command line: expected an integer or null"),
    ("lora", "eval.attack_params=[loss]", "eval.attack_params=[loss] in the command line: expected a mapping"),
    ("lora", "lora.targets=[[to_q]]", "lora.targets=[[to_q]] in the command line: expected a string or a list of strings"),
    ("lora", "tracking=true", "tracking=true in the command line: expected a string (the default is none); YAML reads a bare yes"),
    ("dpsgd", "dp.target_epsilon=high", "dp.target_epsilon=high in the command line: expected a number or null (the default is 10.0)"),
    ("dpsgd", "dp.poisson=1", "dp.poisson=1 in the command line: expected true or false"),
    ("mp_lora", "mp.proxy_timesteps=[1.5]", "expected an integer, a list of integers"),
])
def test_a_value_of_the_wrong_type_names_the_key_and_the_type(recipe, override, message):
    with pytest.raises(ConfigError) as error:
        load_config(recipe, [override])
    assert message in str(error.value)


def test_values_are_parsed_to_their_keys_types():
    cfg = load_config("dpsgd", ["dp.noise_multiplier=1", "train.max_steps=1e3", "train.mixed_precision=no",
                                "model.revision=123", "optim.betas=[0,0]"])
    assert isinstance(cfg.dp.noise_multiplier, float) and cfg.dp.noise_multiplier == 1.0
    assert cfg.train.max_steps == 1000 and isinstance(cfg.train.max_steps, int)
    assert cfg.train.mixed_precision == "no"  # YAML reads a bare `no` as false
    assert cfg.model.revision == "123"
    assert list(cfg.optim.betas) == [0.0, 0.0] and all(isinstance(b, float) for b in cfg.optim.betas)


def test_recipe_files_are_checked_with_their_name(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("inherits: lora\ntrain:\n  batch_size: big\n")
    with pytest.raises(ConfigError, match=f"train.batch_size=big in {bad}: expected an integer"):
        load_config(str(bad))


def test_a_defense_section_a_user_recipe_adds_is_typed_and_completed(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("inherits: lora\ntrainer: dpsgd\ntrain:\n  max_grad_norm: 0\ndp:\n  target_epsilon: 3\n")
    cfg = load_config(str(mine))
    assert cfg.dp.target_epsilon == 3.0 and cfg.dp.accountant == "rdp" and list(cfg.dp) == list(schema.defaults(schema.DP))
    typo = tmp_path / "typo.yaml"
    typo.write_text("inherits: lora\ntrainer: dpsgd\ndp:\n  target_epsilom: 3\n")
    with pytest.raises(ConfigError, match=f"unknown key 'dp.target_epsilom' in {typo}; did you mean 'dp.target_epsilon'"):
        load_config(str(typo))
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("inherits: lora\ntrainer: dpsgd\ndp:\n  poisson: sometimes\n")
    with pytest.raises(ConfigError, match=f"dp.poisson=sometimes in {wrong}: expected true or false"):
        load_config(str(wrong))


def test_a_free_form_mapping_takes_any_keys():
    cfg = load_config("lora", ["eval.attack_params={loss: {draws: 3}, secmi: {t_sec: 50}}"])
    assert to_container(cfg.eval.attack_params) == {"loss": {"draws": 3}, "secmi": {"t_sec": 50}}


# ---------------------------------------------------------------- ranges, before anything is written
@pytest.mark.parametrize("recipe, args, message", [
    ("lora", ["train.max_steps=0"], "train.max_steps must be >= 1 (got 0)"),
    ("lora", ["train.batch_size=0"], "train.batch_size must be >= 1"),
    ("lora", ["train.gradient_accumulation_steps=0"], "train.gradient_accumulation_steps must be >= 1"),
    ("lora", ["train.mixed_precision=fp8"], "train.mixed_precision must be one of no, fp16, bf16 (got 'fp8')"),
    ("lora", ["tracking=mlflow"], "tracking must be one of none, wandb, tensorboard"),
    ("lora", ["lora.rank=0"], "lora.rank must be >= 1"),
    ("lora", ["lora.targets=everything"], "lora.targets must be a preset (attn, full)"),
    ("lora", ["eval.enabled=false", "eval.calibration_fraction=0"], "eval.calibration_fraction must be in (0, 1)"),
    ("lora", ["eval.enabled=false", "eval.max_members=1"], "eval.max_members must be null (attack every member) or an integer >= 2"),
    ("lora", ["data.randaugment_magnitude=31"], "data.randaugment_magnitude must be in [0, 30]"),
    ("lora", ["data.cutout=33"], "data.cutout must be 0 (off) or a hole size in pixels up to data.resolution=32"),
    ("lora", ["seed=-1"], "seed must be >= 0"),
    ("lora", ["eval.extraction.enabled=true", "eval.extraction.tiles=3"],
     "eval.extraction.tiles must be >= 1 and divide data.resolution=32"),
    ("lora", ["memorization_filter.percentile=100"], "memorization_filter.percentile must be in (0, 100)"),
    ("dpsgd", ["dp.target_epsilon=0"], "dp.target_epsilon must be > 0"),
    ("dpsgd", ["dp.delta=1"], "dp.delta must be in (0, 1)"),
    ("dpsgd", ["dp.accountant=moments"], "dp.accountant must be one of rdp, prv, gdp"),
    ("dpsgd", ["dp.target_epsilon=null"], "set dp.target_epsilon (sigma is calibrated) or dp.noise_multiplier"),
    ("mp_lora", ["mp.attacker_dropout=1"], "mp.attacker_dropout must be in [0, 1)"),
    ("mp_lora", ["data.auxiliary_members=0"], "data.auxiliary_members must be >= 1 (got 0): the proxy attacker's split would be empty"),
    ("smp_lora", ["mp.beta=0", "mp.delta=0"], "mp.beta + mp.delta must be > 0"),
    ("dualmd", ["train.batch_size=3"], "dualmd splits train.batch_size evenly between adapters A and B"),
    ("distillmd", ["distill.teacher_steps=0"], "distill.teacher_steps must be >= 1"),
    ("distillmd", ["train.batch_size=5"], "distillmd trains its teachers with train.batch_size split between A and B"),
    ("lora", ["trainer=mp_lora"], "trainer mp_lora needs the mp: section"),
])
def test_an_out_of_range_value_fails_before_any_file_is_written(tmp_path, capsys, recipe, args, message):
    run = tmp_path / "run"
    assert main([f"recipe={recipe}", f"output_dir={run}", *args]) == 2
    assert message in capsys.readouterr().err
    assert not run.exists()


# ---------------------------------------------------------------- --print-config
def test_print_config_prints_every_key_with_its_help_as_valid_yaml(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["--print-config", "recipe=dpsgd", f"output_dir={run}", "train.max_steps=7"]) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out) == to_container(load_config("dpsgd", [f"output_dir={run}", "train.max_steps=7"]))
    assert "  max_steps: 7  # optimizer steps to train for\n" in out
    assert f"  target_epsilon: 10.0  # {schema.help_at('dp.target_epsilon')}\n" in out
    assert "  mixed_precision: 'no'  # no | fp16 (CUDA only) | bf16\n" in out
    assert all("  # " in line for line in out.splitlines()[1:])  # each key carries its help
    assert not run.exists()


def test_print_config_is_accepted_anywhere_and_keeps_checking(tmp_path, capsys):
    assert main(["recipe=lora", "lora.rank=4", "--print-config"]) == 0
    assert "  rank: 4  # LoRA rank r\n" in capsys.readouterr().out
    assert main(["recipe=lora", "--print-config", "lora.rank=0"]) == 2
    assert "lora.rank must be >= 1" in capsys.readouterr().err
