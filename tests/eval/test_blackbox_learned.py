"""The learned black-box attacks (wu, pang_wang) against generator stand-ins: they see generated images and an
offline encoder only (the target's predictor raises), detect a memorizing release, transfer to a twin trained on the
other half with the inverse AUC, are chance on a release that ignores its training set and fit on calibration only."""

import numpy as np
import pytest
import torch

from privtune.errors import ConfigError
from privtune.eval.attacks import ATTACKS, AttackTarget, EncodedSamples, missing_requirements
from privtune.eval.attacks.base import CalibrationPart, member_labels
from privtune.eval.metrics import auc

from . import oracles
from .oracles import IgnorantGenerator, MemorizingGenerator, image_samples

PASSES_PER_IMAGE = 50
CASES = {
    "wu": {},
    "pang_wang/classifier": {"model": "classifier"},
    "pang_wang/distribution": {"model": "distribution"},
    "pang_wang/diagonal": {"model": "distribution", "covariance": "diagonal"},
    "pang_wang/threshold": {"model": "threshold"},
}


def _attack(case, **extra):
    return ATTACKS.get(case.split("/")[0])(**CASES[case], **extra)


def blackbox_target(generator):
    return oracles.blackbox_target(generator, passes_per_image=PASSES_PER_IMAGE)


@pytest.fixture(scope="module")
def data():
    return image_samples(64, "m", 61), image_samples(64, "n", 62)


def calibrated(case, target, members, nonmembers, half):
    attack = _attack(case)
    cal = attack.calibrate(target, members.subset(range(half)), nonmembers.subset(range(half)), batch_size=16,
                           progress=False)
    report = EncodedSamples.concat([members.subset(range(half, 2 * half)), nonmembers.subset(range(half, 2 * half))])
    return attack, cal, report, member_labels(half, half)


@pytest.mark.parametrize("case", sorted(CASES))
def test_detects_a_memorizing_release_and_the_twin_inverts(case, data):
    members, nonmembers = data
    half = 32
    target = blackbox_target(MemorizingGenerator(members.pixels, members.captions))
    assert missing_requirements(ATTACKS.get(case.split("/")[0]), target, members) == []
    attack, cal, report, y = calibrated(case, target, members, nonmembers, half)
    res = attack.score(target, report, batch_size=16, progress=False)
    value = auc(res.scores, y)
    assert value >= 0.9, f"{case}: AUC {value:.3f} against a generator that memorized its members"
    # role swap: the fitted attack on a twin release trained on the non-members
    twin = blackbox_target(MemorizingGenerator(nonmembers.pixels, nonmembers.captions))
    swapped = auc(attack.score(twin, report, batch_size=16, progress=False).scores, y)
    assert swapped == pytest.approx(1 - value, abs=0.1)
    # cost: n generations per query, n x passes_per_image UNet passes, all counted by the API
    n = attack.n
    assert n == 3
    assert res.nfe_per_sample == cal.nfe_per_sample == n * PASSES_PER_IMAGE
    params = attack.params()
    assert params["images_per_query"] == n and params["passes_per_query"] == n * PASSES_PER_IMAGE
    assert params["variations_per_query"] == 0
    # fitted on calibration only; returned scores (with labels) only on samples the learned part did not see
    cal_ids = set(members.ids[:half] + nonmembers.ids[:half])
    assert attack.fit_ids and set(attack.fit_ids) <= cal_ids and set(cal.ids) <= cal_ids
    assert cal.labels is not None and len(cal.labels) == len(cal.ids) == len(cal.scores)
    if case != "pang_wang/threshold":
        assert not set(cal.ids) & set(attack.fit_ids)


@pytest.mark.parametrize("case", sorted(CASES))
def test_chance_on_a_release_that_ignores_its_training_set(case, data):
    members, nonmembers = data
    target = blackbox_target(IgnorantGenerator(members.pixels, members.captions))
    attack, _, report, y = calibrated(case, target, members, nonmembers, 32)
    value = auc(attack.score(target, report, batch_size=16, progress=False).scores, y)
    assert abs(value - 0.5) <= 0.15, f"{case} separates members of a generator that ignores them (AUC {value:.3f})"


@pytest.mark.parametrize("name", ["wu", "pang_wang"])
def test_shadow_fit_transfers_and_generations_share_seeds(name):
    """Pooled shadow releases fit the learned part; the fitted attack detects the target's own members."""
    parts = []
    for k in range(2):
        m, nm = image_samples(16, f"s{k}m", 80 + 2 * k), image_samples(16, f"s{k}n", 81 + 2 * k)
        parts.append(CalibrationPart(blackbox_target(MemorizingGenerator(m.pixels, m.captions)), m, nm))
    attack = ATTACKS.get(name)()
    cal = attack.calibrate_pooled(parts, batch_size=16, progress=False)
    assert cal.nfe_per_sample == 3 * PASSES_PER_IMAGE
    assert all(set(attack.fit_ids) & {*p.members.ids, *p.nonmembers.ids} for p in parts)
    members, nonmembers = image_samples(16, "tm", 90), image_samples(16, "tn", 91)
    seen = []

    class Recording(MemorizingGenerator):
        def generate(self, prompts, seeds):
            seen.append(list(seeds))
            return super().generate(prompts, seeds)

    target = blackbox_target(Recording(members.pixels, members.captions))
    res = attack.score(target, EncodedSamples.concat([members, nonmembers]), batch_size=8, progress=False)
    assert auc(res.scores, member_labels(16, 16)) >= 0.9
    assert all(len(set(s)) == 1 for s in seen)  # one public seed per generation index, shared by every query
    assert len({s[0] for s in seen}) == 3


@pytest.mark.parametrize("name", ["wu", "pang_wang"])
def test_runner_entry(name, data):
    from privtune.eval.runner import run_attacks

    members, nonmembers = data
    target = blackbox_target(MemorizingGenerator(members.pixels[:24], members.captions[:24]))
    out = run_attacks(target, members.subset(range(24)), nonmembers.subset(range(24)), [name], {name: {"n": 2}},
                      n_bootstrap=20, progress=False)
    entry = out["attacks"][name]
    assert entry["metrics"]["auc"]["value"] >= 0.9 and entry["metrics"]["n_members"] == 12
    assert entry["nfe_per_sample"] == 2 * PASSES_PER_IMAGE
    assert entry["params"]["passes_per_query"] == 2 * PASSES_PER_IMAGE


def test_settings_are_checked():
    for name, bad in [("wu", {"n": 0}), ("wu", {"features": ["faithfulness"]}), ("wu", {"val_fraction": 1.0}),
                      ("pang_wang", {"model": "svm"}), ("pang_wang", {"covariance": "full"}), ("pang_wang", {"n": 0})]:
        with pytest.raises(ConfigError):
            ATTACKS.get(name)(**bad)
    gray = AttackTarget(oracles.NoNoisePredictions(), torch.linspace(0.999, 0.01, 1000))
    for name in ("wu", "pang_wang"):
        assert any("generation API" in m for m in missing_requirements(ATTACKS.get(name), gray, image_samples(2, "x", 0)))
        with pytest.raises(ConfigError):
            ATTACKS.get(name)().score(blackbox_target(IgnorantGenerator(torch.zeros(1, 3, 32, 32), ["a"])),
                                      image_samples(2, "x", 0), progress=False)


def test_wu_single_feature_attacks_and_resized_generations():
    """The pixel-level and semantic-level attacks alone; generations of another size are resized to the query's."""
    members, nonmembers = image_samples(24, "m", 5), image_samples(24, "n", 6)

    class Larger(MemorizingGenerator):
        def generate(self, prompts, seeds):
            return super().generate(prompts, seeds).repeat_interleave(2, -2).repeat_interleave(2, -1)

    for features in (["pixel"], ["semantic"]):
        target = blackbox_target(Larger(members.pixels, members.captions))
        attack = ATTACKS.get("wu")(features=features)
        attack.calibrate(target, members.subset(range(12)), nonmembers.subset(range(12)), progress=False)
        report = EncodedSamples.concat([members.subset(range(12, 24)), nonmembers.subset(range(12, 24))])
        res = attack.score(target, report, progress=False)
        assert auc(res.scores, member_labels(12, 12)) >= 0.9
        assert np.isfinite(res.scores).all()
