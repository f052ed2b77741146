import json

import pytest

from privtune.errors import ConfigError, DataError
from privtune.eval.attacks import AttackTarget, EncodedSamples
from privtune.eval.runner import CalibrationSplit, run_attacks, split_calibration

from .oracles import MemorizingOracle


def test_split_is_disjoint_deterministic_and_covering(members, nonmembers):
    a = split_calibration(members, nonmembers, 0.25, seed=5)
    b = split_calibration(members, nonmembers, 0.25, seed=5)
    assert a.calibration_members.ids == b.calibration_members.ids
    assert len(a.calibration_members) == 8 and len(a.report_nonmembers) == 24
    assert not set(a.calibration_members.ids) & set(a.report_members.ids)
    assert set(a.calibration_members.ids) | set(a.report_members.ids) == set(members.ids)
    assert split_calibration(members, nonmembers, 0.25, seed=6).calibration_members.ids != a.calibration_members.ids
    with pytest.raises(ConfigError):
        split_calibration(members, nonmembers, 1.0)


def test_run_attacks_result_layout(alphas_cumprod, members, nonmembers):
    target = AttackTarget(MemorizingOracle(members.latents, alphas_cumprod), alphas_cumprod)
    out = run_attacks(
        target, members, nonmembers, ["loss", "secmi", "pia"],
        {"loss": {"timesteps": [100, 200], "draws": 1}, "secmi": {"t_sec": 60, "k": 20}},
        batch_size=16, n_bootstrap=50, progress=False,
    )
    json.dumps(out)
    assert out["protocol"]["n_report"] == {"members": 16, "nonmembers": 16}
    split = split_calibration(members, nonmembers, 0.5, 0)
    report_ids = split.report_members.ids + split.report_nonmembers.ids
    for name, res in out["attacks"].items():
        assert res["samples"]["ids"] == report_ids
        assert res["samples"]["labels"] == [1] * 16 + [0] * 16
        assert res["metrics"]["auc"]["value"] >= 0.95
        assert res["metrics"]["warnings"]
        assert set(res["calibrated_threshold"]) >= {"threshold", "accuracy", "tpr", "fpr"}
    assert out["attacks"]["loss"]["nfe_per_sample"] == 1
    assert out["attacks"]["loss"]["calibration_nfe_per_sample"] == 2
    assert out["attacks"]["secmi"]["nfe_per_sample"] == 4
    assert out["attacks"]["pia"]["nfe_per_sample"] == 2
    assert out["attacks"]["pia"]["params"]["t"] in (100, 200, 300, 500)


def test_run_attacks_secmi_nn_threshold_uses_held_out_calibration(alphas_cumprod, members, nonmembers):
    target = AttackTarget(MemorizingOracle(members.latents, alphas_cumprod), alphas_cumprod)
    out = run_attacks(
        target, members, nonmembers, ["secmi_nn"], {"secmi_nn": {"t_sec": 40, "k": 20, "epochs": 5}},
        n_bootstrap=20, progress=False,
    )
    res = out["attacks"]["secmi_nn"]
    assert res["calibrated_threshold"]["n_threshold_fit"] == 8
    assert res["params"]["n_fit"] == 24


def test_overlapping_ids_are_rejected(alphas_cumprod, members, nonmembers):
    target = AttackTarget(MemorizingOracle(members.latents, alphas_cumprod), alphas_cumprod)
    clash = EncodedSamples(nonmembers.latents, nonmembers.cond, members.ids[:1] + nonmembers.ids[1:])
    with pytest.raises(DataError, match="both members and non-members"):
        run_attacks(target, members, clash, ["pia"], progress=False)
    split = split_calibration(members, nonmembers, 0.5, 0)
    leaky = CalibrationSplit(
        split.calibration_members, split.calibration_nonmembers,
        EncodedSamples.concat([split.report_members, split.calibration_members.subset([0])]),
        split.report_nonmembers,
    )
    with pytest.raises(DataError, match="calibration and the report"):
        run_attacks(target, members, nonmembers, ["pia"], split=leaky, progress=False)
    dup = EncodedSamples(members.latents, members.cond, members.ids[:-1] + members.ids[:1])
    with pytest.raises(DataError, match="duplicate"):
        run_attacks(target, dup, nonmembers, ["pia"], progress=False)


def test_unknown_attack_or_setting(alphas_cumprod, members, nonmembers):
    target = AttackTarget(MemorizingOracle(members.latents, alphas_cumprod), alphas_cumprod)
    with pytest.raises(ConfigError, match="secmi_nn"):
        run_attacks(target, members, nonmembers, ["lossy"], progress=False)
    with pytest.raises(ConfigError, match="valid settings"):
        run_attacks(target, members, nonmembers, ["pia"], {"pia": {"tt": 3}}, progress=False)


def test_all_runs_what_the_target_allows_and_says_what_it_skipped(alphas_cumprod, members, nonmembers):
    from privtune.eval.attacks import ATTACKS, missing_requirements
    from privtune.eval.runner import select_attacks

    bare = AttackTarget(MemorizingOracle(members.latents, alphas_cumprod), alphas_cumprod)
    chosen, skipped = select_attacks(["all"], bare, members)
    assert {"loss", "secmi", "pia"} <= set(chosen) and {"clid_th", "clid_vec"} <= set(skipped)
    assert set(chosen) | set(skipped) == set(ATTACKS.names()) and not set(chosen) & set(skipped)
    assert all(not missing_requirements(ATTACKS.get(n), bare, members) for n in chosen)
    assert "captions" in skipped["clid_th"]
    assert select_attacks(["loss", "all"], bare, members)[0][0] == "loss"  # named first, no duplicates
    with pytest.raises(ConfigError, match="clid_th.*cannot run on this target.*captions"):
        select_attacks(["clid_th"], bare, members)
    out = run_attacks(bare, members, nonmembers, ["loss"], {"loss": {"timesteps": [100], "draws": 1}}, batch_size=16,
                      n_bootstrap=20, progress=False)
    assert out["protocol"]["attacks_skipped"] == {}


def test_shadow_fits_learned_parts_on_disjoint_data_only(alphas_cumprod, members, nonmembers):
    """`<attack>~shadow`: the classifier is fitted on a shadow model's own members and non-members, transfers to the
    target, and a shadow that shares a sample with the target's split is refused."""
    from privtune.eval.attacks.base import CalibrationPart
    from privtune.eval.runner import ShadowData

    from .conftest import make_samples
    from .oracles import OracleUNet

    def target_for(train):
        oracle = MemorizingOracle(train.latents, alphas_cumprod)
        return AttackTarget(oracle, alphas_cumprod, unet=OracleUNet(oracle).eval().requires_grad_(False))

    shadow_m, shadow_n = make_samples(32, "sm", 21), make_samples(32, "sn", 22)
    shadow = ShadowData([CalibrationPart(target_for(shadow_m), shadow_m, shadow_n)], "a memorizing twin")
    out = run_attacks(target_for(members), members, nonmembers, ["loss", "gsa1"],
                      {"loss": {"timesteps": [100], "draws": 1}, "gsa1": {"n_timesteps": 3}}, batch_size=16,
                      n_bootstrap=20, progress=False, shadow=shadow)
    assert set(out["attacks"]) == {"loss", "gsa1", "gsa1~shadow"}  # only learned attacks get a shadow entry
    entry = out["attacks"]["gsa1~shadow"]
    assert entry["params"]["fitted_on"].startswith("shadow model") and entry["metrics"]["auc"]["value"] >= 0.9
    cal = set(entry["calibration_samples"]["ids"])  # the target's calibration half: direction and threshold only
    assert cal <= {*members.ids, *nonmembers.ids} and not cal & set(entry["samples"]["ids"])
    assert out["protocol"]["shadow"]["members"] == 32 and out["protocol"]["shadow"]["models"] == 1
    twin = shadow.models[0].target
    leaky = ShadowData([CalibrationPart(twin, shadow_m, shadow_n),
                        CalibrationPart(twin, EncodedSamples.concat([make_samples(8, "s2", 23), members.subset([0])]), shadow_n)])
    with pytest.raises(DataError, match="shadow-model samples are also target samples"):
        run_attacks(target_for(members), members, nonmembers, ["gsa1"], {"gsa1": {"n_timesteps": 3}}, progress=False,
                    shadow=leaky)


def test_cached_generations_never_cross_from_one_release_to_another(alphas_cumprod):
    """Two releases behind one generation API (DualMD's adapters switch in their contexts): each release's black-box
    attack sees its own model's images, never the other's from the cache."""
    from contextlib import contextmanager

    from privtune.eval.attacks import AttackTarget
    from privtune.eval.generation import GenerationAPI
    from privtune.eval.runner import Release, run_release_attacks

    from .oracles import IgnorantGenerator, MemorizingGenerator, image_samples, pooled_embed

    members, nonmembers = image_samples(16, "m", 91), image_samples(16, "n", 92)
    models = {"memorizing": MemorizingGenerator(members.pixels, members.captions),
              "ignorant": IgnorantGenerator(members.pixels, members.captions)}
    live = {"model": "memorizing"}
    api = GenerationAPI(generate=lambda p, s: models[live["model"]].generate(p, s), embed=pooled_embed)
    target = AttackTarget(lambda x, t, c: None, alphas_cumprod, generation=api)

    @contextmanager
    def using(name):
        before, live["model"] = live["model"], name
        try:
            yield
        finally:
            live["model"] = before

    releases = [Release(n, target, context=lambda n=n: using(n)) for n in ("memorizing", "ignorant")]
    out = run_release_attacks(releases, members, nonmembers, ["pang_wang"], {"pang_wang": {"model": "threshold"}},
                              n_bootstrap=20, progress=False)
    assert out["attacks"]["pang_wang@memorizing"]["metrics"]["auc"]["value"] >= 0.9
    assert out["attacks"]["pang_wang@ignorant"]["metrics"]["auc"]["value"] <= 0.8
