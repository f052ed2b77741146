"""privtune.attack_threats: SIDE and property inference run on a finished run and land in its report and card."""

import json

from omegaconf import OmegaConf

from privtune import attack_threats
from privtune import train as train_mod
from privtune.eval.portraits import parse_caption
from privtune.evaluate import _split, with_current_defaults

from .conftest import train_args

FAST_EVAL = ["eval.enabled=true", "eval.attacks=[loss]", "eval.utility=false", "eval.bootstrap=20",
             "eval.attack_params={loss: {timesteps: [100], draws: 1}}"]
SIDE = ["attack=side", "generations=6", "pool=4", "clusters=2", "steps=2", "classifier_steps=5", "hidden=8"]
PROPERTY = ["attack=property", "generations=8", "steps=2", "bootstrap=20"]


def test_bad_input_is_refused_before_anything_is_written(tmp_path, base_model):
    run = tmp_path / "run"
    assert train_mod.main(train_args(run, f"model.base={base_model}", *FAST_EVAL, steps=2)) == 0
    before = (run / "lora" / "README.md").read_text()
    assert attack_threats.main([f"run={run}", "attack=dlg"]) == 2
    assert attack_threats.main([f"run={run}", "attack=side", "slot=eyewear"]) == 2        # a property key
    assert attack_threats.main([f"run={run}", *SIDE, "clusters=9"]) == 2                   # clusters > pool
    assert attack_threats.main([f"run={run}", *SIDE, "pool=x"]) == 2
    assert attack_threats.main([f"run={run}", *PROPERTY, "slot=hat"]) == 2
    assert attack_threats.main([f"run={run}", *PROPERTY, "true_proportion=1.5"]) == 2
    assert attack_threats.main([f"run={tmp_path / 'nope'}", *SIDE]) == 2
    assert not (run / "threats").exists()
    assert (run / "lora" / "README.md").read_text() == before


def test_side_and_property_publish_into_report_and_card(tmp_path, base_model):
    aux = tmp_path / "aux"
    assert train_mod.main(train_args(aux, f"model.base={base_model}", "seed=7", steps=2)) == 0
    run = tmp_path / "run"
    assert train_mod.main(train_args(run, f"model.base={base_model}", *FAST_EVAL, "sampling.prisampler.lam=0.5",
                                     f"sampling.prisampler.aux={aux / 'lora'}", "sampling.prisampler.target_proportion=0.5",
                                     steps=2)) == 0
    assert attack_threats.main([f"run={run}", *SIDE]) == 0
    side = json.loads((run / "threats" / "side.json").read_text())["result"]
    assert side["side"]["generations"] == side["unguided"]["generations"] == 6  # equal budgets
    assert attack_threats.main([f"run={run}", *PROPERTY]) == 0
    prop = json.loads((run / "threats" / "property_inference.json").read_text())["result"]
    assert set(prop["arms"]) == {"release", "prisampler"}  # a PriSampler run: the file plainly, and as served
    assert prop["arms"]["prisampler"]["prisampler"]["lam"] == 0.5 and prop["arms"]["release"]["prisampler"]["lam"] == 0

    members = _split(with_current_defaults(OmegaConf.load(run / "config.yaml")), {}, run).members
    captions = [r.caption for r in members]
    share = sum(parse_caption(c)["eyewear"] in ("glasses", "sunglasses") for c in captions) / len(captions)
    assert prop["arms"]["release"]["p_true"] == share and prop["true_proportion_source"] == "members' captions"

    report = (run / "report.md").read_text()
    assert "SIDE extraction" in report and "Property inference" in report and "served through this run's PriSampler" in report
    card = (run / "lora" / "README.md").read_text()
    assert "### Other attacks" in card and "SIDE extraction:" in card and "Property inference:" in card
    assert "Served through PriSampler" in card
    assert f"{share:.3f}" not in card  # the training data's true share stays in the private report
    assert not any(c in card for c in captions)
    assert set(json.loads((run / "report.json").read_text())["threats"]) == {"side", "property_inference"}
