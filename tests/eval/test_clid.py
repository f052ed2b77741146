"""CLiD (clid_th, clid_vec): conditional-likelihood discrepancy against the closed-form oracles."""

import numpy as np
import pytest
import torch

from privtune.errors import ConfigError
from privtune.eval.attacks import ATTACKS, AttackTarget, EncodedSamples, missing_requirements
from privtune.eval.attacks.base import member_labels
from privtune.eval.attacks.clid import diminished_captions
from privtune.eval.metrics import auc

from .oracles import DoubledNFE, GaussianOracle, MemorizingOracle, TextEncoder


def samples(n, prefix, seed, encode):
    g = torch.Generator().manual_seed(seed)
    captions = [f"a {prefix} portrait number {i} with glasses" for i in range(n)]
    return EncodedSamples(torch.randn(n, 4, 8, 8, generator=g), encode(captions), [f"{prefix}{i}" for i in range(n)],
                          captions=captions)


@pytest.fixture
def setup(alphas_cumprod):
    encode = TextEncoder()
    members, nonmembers = samples(32, "m", 1, encode), samples(32, "n", 2, encode)
    return encode, members, nonmembers


def calibrated(name, target, members, nonmembers, **params):
    attack = ATTACKS.get(name)(**params)
    cal = attack.calibrate(target, members.subset(range(16)), nonmembers.subset(range(16)), batch_size=8, progress=False)
    report = EncodedSamples.concat([members.subset(range(16, 32)), nonmembers.subset(range(16, 32))])
    res = attack.score(target, report, batch_size=8, progress=False)
    return attack, cal, res, auc(res.scores, member_labels(16, 16))


def test_diminished_captions_are_thirds_and_empty():
    assert diminished_captions("abcdefghi") == ["abc", "def", "ghi", ""]
    assert len(diminished_captions("")) == 4


@pytest.mark.parametrize("name", ["clid_th", "clid_vec"])
def test_conditional_memorization_is_detected_and_role_swap_inverts(name, alphas_cumprod, setup):
    """The conditional memorizing oracle (members denoised from their own caption's training point) is found."""
    encode, members, nonmembers = setup
    oracle = MemorizingOracle(members.latents, alphas_cumprod, conds=members.cond)
    target = AttackTarget(oracle, alphas_cumprod, encode_text=encode)
    _, _, res, value = calibrated(name, target, members, nonmembers)
    assert value >= 0.9
    assert auc(res.scores, 1 - member_labels(16, 16)) == pytest.approx(1 - value)


@pytest.mark.parametrize("name", ["clid_th", "clid_vec"])
def test_generalizing_oracle_is_chance(name, alphas_cumprod, setup):
    encode, members, nonmembers = setup
    target = AttackTarget(GaussianOracle(0.0, 1.0, alphas_cumprod), alphas_cumprod, encode_text=encode)
    _, _, _, value = calibrated(name, target, members, nonmembers)
    assert abs(value - 0.5) <= 0.2


def test_discrepancy_is_positive_for_members_and_zero_for_unconditional(alphas_cumprod, setup):
    """D_k > 0 where the caption matters; a predictor that ignores the caption gives D = 0 exactly (shared draws).
    Late timesteps, where the caption-blind posterior mixes the training points, so the caption changes the prediction."""
    encode, members, nonmembers = setup
    attack = ATTACKS.get("clid_th")(timesteps=[850, 900, 950])
    oracle = MemorizingOracle(members.latents, alphas_cumprod, conds=members.cond)
    feats, _ = attack.features(AttackTarget(oracle, alphas_cumprod, encode_text=encode), members, 8, False, "")
    assert (feats[:, 1:].mean(axis=1) > 0).mean() >= 0.9
    blind = MemorizingOracle(members.latents, alphas_cumprod)
    feats, _ = attack.features(AttackTarget(blind, alphas_cumprod, encode_text=encode), members, 8, False, "")
    np.testing.assert_allclose(feats[:, 1:], 0.0, atol=1e-6)


def test_nfe_and_text_encoder_passes(alphas_cumprod, setup):
    encode, members, _ = setup
    oracle = GaussianOracle(0.0, 1.0, alphas_cumprod)
    attack = ATTACKS.get("clid_th")()
    attack.calibrate(AttackTarget(oracle, alphas_cumprod, encode_text=encode), members.subset(range(8)),
                     members.subset(range(8, 16)), progress=False)
    encode.prompts = 0
    res = attack.score(AttackTarget(oracle, alphas_cumprod, encode_text=encode), members, batch_size=5, progress=False)
    assert res.nfe_per_sample == 3 * (1 + 4) == 15
    assert encode.prompts == 4 * len(members)
    doubled = attack.score(AttackTarget(DoubledNFE(oracle), alphas_cumprod, encode_text=encode), members, progress=False)
    assert doubled.nfe_per_sample == 30


def test_scores_do_not_depend_on_batching(alphas_cumprod, setup):
    encode, members, nonmembers = setup
    target = AttackTarget(MemorizingOracle(members.latents, alphas_cumprod, conds=members.cond), alphas_cumprod,
                          encode_text=encode)
    attack = ATTACKS.get("clid_th")()
    attack.calibrate(target, members.subset(range(16)), nonmembers.subset(range(16)), progress=False)
    full = attack.score(target, members, batch_size=32, progress=False)
    idx = [30, 3, 17, 8]
    part = attack.score(target, members.subset(idx), batch_size=3, progress=False)
    np.testing.assert_allclose(part.scores, full.scores[idx], rtol=1e-5, atol=1e-6)


def test_vec_fits_only_calibration_and_holds_out_part(alphas_cumprod, setup):
    encode, members, nonmembers = setup
    target = AttackTarget(MemorizingOracle(members.latents, alphas_cumprod, conds=members.cond), alphas_cumprod,
                          encode_text=encode)
    attack, cal, res, _ = calibrated("clid_vec", target, members, nonmembers)
    cal_ids = set(members.ids[:16]) | set(nonmembers.ids[:16])
    assert set(attack.fit_ids) | set(attack.val_ids) == cal_ids and not set(attack.fit_ids) & set(attack.val_ids)
    assert set(cal.ids) == set(attack.val_ids) and not set(attack.fit_ids) & set(res.ids)


def test_needs_captions_and_a_text_encoder(alphas_cumprod, setup):
    encode, members, _ = setup
    plain = EncodedSamples(members.latents, members.cond, members.ids)
    target = AttackTarget(GaussianOracle(0.0, 1.0, alphas_cumprod), alphas_cumprod)
    cls = ATTACKS.get("clid_th")
    assert missing_requirements(cls, target, members) and missing_requirements(cls, None, plain)
    assert "captions" in missing_requirements(cls, target)[0]
    assert missing_requirements(cls, AttackTarget(target.predictor, alphas_cumprod, encode_text=encode), members) == []
    with pytest.raises(ConfigError, match="calibrate"):
        cls().score(target, members, progress=False)
