"""Quantile-regression MIA (Tang et al., specs/attacks.md §4): FPR calibration of the per-example
α-test on known non-members, oracle AUCs, the fit split and NFE."""

import json

import numpy as np
import pytest
import torch

from privtune.errors import ConfigError, DataError
from privtune.eval.attacks import ATTACKS, AttackTarget, EncodedSamples
from privtune.eval.attacks.base import member_labels
from privtune.eval.attacks.quantile import BaggedQuantileRegressor, latent_features
from privtune.eval.metrics import auc

from .conftest import make_samples
from .oracles import DoubledNFE, GaussianOracle, MemorizingOracle

FAST = {"t_sec": 60, "k": 20, "n_models": 3}  # 4 NFE per sample


def _heteroscedastic(n, rng):
    """s = location(x) + spread(x)·noise, the spread growing 6-fold across x[:, 2]'s range."""
    x = rng.normal(size=(n, 6))
    s = x[:, 0] + 0.5 * x[:, 1] ** 2 + np.exp(0.6 * x[:, 2]) * rng.normal(size=n)
    return x, s, np.digitize(x[:, 2], [-0.43, 0.43])  # terciles of the spread


def test_alpha_rule_fpr_on_held_out_nonmembers():
    """Fit on 1,000 known non-members, test "member iff s < mean_b q_b" on 4,000 fresh ones:
    empirical FPR within [0.3%, 2%] of α = 1% overall (observed 0.85%) and in [0.1%, 2%] in every
    spread tercile (observed 0.5 / 0.8 / 1.2%), where one global 1% threshold flags no low-spread
    sample at all (0 / 0.1 / 1.1%)."""
    rng = np.random.default_rng(0)
    x, s, _ = _heteroscedastic(1000, rng)
    xt, st, tercile = _heteroscedastic(4000, rng)
    bag = BaggedQuantileRegressor(alpha=0.01, n_models=10, seed=0).fit(x, s)
    q = bag.predict(xt)
    assert q.shape == (10, 4000)
    flagged = st < q.mean(0)
    assert 0.003 <= flagged.mean() <= 0.02
    per_tercile = [flagged[tercile == i].mean() for i in range(3)]
    assert all(0.001 <= f <= 0.02 for f in per_tercile)
    global_flag = st < np.quantile(s, 0.01)
    assert global_flag[tercile == 0].mean() < 0.001
    vote = ((st[None] < q).mean(0) > 0.5).mean()
    assert 0.003 <= vote <= 0.02


def test_pinball_regressor_runs_and_is_deterministic():
    rng = np.random.default_rng(1)
    x, s, _ = _heteroscedastic(300, rng)
    a = BaggedQuantileRegressor(alpha=0.05, n_models=3, seed=4, regressor="pinball").fit(x, s).predict(x)
    b = BaggedQuantileRegressor(alpha=0.05, n_models=3, seed=4, regressor="pinball").fit(x, s).predict(x)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (3, 300) and 0.0 < np.mean(s < a.mean(0)) < 0.2


class Wobbly:
    """A Gaussian oracle plus a high-frequency deterministic term: the t-error then varies between
    samples in a way the pooled features cannot predict, as a real UNet's does."""

    def __init__(self, base):
        self.base = base

    def __call__(self, x, t, cond):
        return self.base(x, t, cond) + 0.3 * torch.sin(37.0 * x)


def _scaled(n, prefix, seed):
    s = make_samples(n, prefix, seed, shape=(1, 16, 16), cond_dim=(2, 4))
    scale = torch.exp(torch.rand(n, generator=torch.Generator().manual_seed(seed + 100)) * 1.5 - 0.75)
    return EncodedSamples(s.latents * scale[:, None, None, None], s.cond, s.ids)


def test_end_to_end_fpr_on_fresh_nonmembers(alphas_cumprod):
    """Through the attack: calibrate on 4 members + 1,000 non-members of varying scale (700 fit),
    then on 2,000 fresh non-members the α = 1% rule (score > 0) flags between 0.3% and 2%."""
    target = AttackTarget(Wobbly(GaussianOracle(0.0, 1.0, alphas_cumprod)), alphas_cumprod)
    attack = ATTACKS.get("quantile")(t_sec=60, k=20, n_models=10)
    cal = attack.calibrate(target, _scaled(4, "m", 1), _scaled(1000, "n", 2), batch_size=500, progress=False)
    assert len(attack.fit_ids) == 700 and sorted(cal.labels.tolist()) == [0] * 300 + [1] * 4
    fresh = attack.score(target, _scaled(2000, "f", 3), batch_size=500, progress=False)
    assert 0.003 <= np.mean(fresh.scores > 0) <= 0.02
    p = attack.params()
    assert p["alpha"] == 0.01 and p["n_models"] == 10 and p["n_fit"] == 700 and p["n_heldout"] == 300
    assert 0.0 <= p["heldout_fpr"] <= 0.04 and p["heldout_fpr_vote"] is not None
    json.dumps(p)


def _calibrated(target, members, nonmembers, **params):
    attack = ATTACKS.get("quantile")(**{**FAST, **params})
    cal = attack.calibrate(target, members.subset(range(16)), nonmembers.subset(range(16)), progress=False)
    report = EncodedSamples.concat([members.subset(range(16, 32)), nonmembers.subset(range(16, 32))])
    res = attack.score(target, report, batch_size=8, progress=False)
    return auc(res.scores, member_labels(16, 16)), res, cal, attack


def test_memorizing_oracle_is_detected(alphas_cumprod, members, nonmembers):
    target = AttackTarget(MemorizingOracle(members.latents, alphas_cumprod), alphas_cumprod)
    value, res, cal, _ = _calibrated(target, members, nonmembers)
    assert value >= 0.9
    assert auc(cal.scores, cal.labels) >= 0.9
    report = EncodedSamples.concat([members.subset(range(16, 32)), nonmembers.subset(range(16, 32))])
    secmi = ATTACKS.get("secmi")(t_sec=60, k=20).score(target, report, progress=False)
    np.testing.assert_allclose(res.raw, np.log(secmi.raw), rtol=1e-5, atol=1e-5)


def test_generalizing_oracle_is_chance(alphas_cumprod):
    members, nonmembers = make_samples(32, "a", 11), make_samples(32, "b", 12)
    target = AttackTarget(GaussianOracle(0.0, 1.0, alphas_cumprod), alphas_cumprod)
    value, _, _, _ = _calibrated(target, members, nonmembers)
    assert abs(value - 0.5) <= 0.2


def test_regressors_see_only_calibration_nonmembers(alphas_cumprod, members, nonmembers):
    target = AttackTarget(MemorizingOracle(members.latents, alphas_cumprod), alphas_cumprod)
    _, res, cal, attack = _calibrated(target, members, nonmembers)
    cal_non = set(nonmembers.ids[:16])
    assert set(attack.fit_ids) <= cal_non and len(attack.fit_ids) == 11
    assert not set(attack.fit_ids) & (set(members.ids) | set(res.ids))
    assert set(attack.heldout_ids) == cal_non - set(attack.fit_ids)
    # the threshold-fit scores: every calibration member plus the held-out non-members, labelled
    assert set(cal.ids) == set(members.ids[:16]) | set(attack.heldout_ids)
    assert not set(cal.ids) & set(attack.fit_ids)
    assert cal.labels.tolist() == [1] * 16 + [0] * 5
    other = ATTACKS.get("quantile")(**FAST, seed=1)
    other.calibrate(target, members.subset(range(16)), nonmembers.subset(range(16)), progress=False)
    assert set(other.fit_ids) != set(attack.fit_ids)


def test_runner_accepts_the_fit_split(alphas_cumprod, members, nonmembers):
    from privtune.eval.runner import Release, run_release_attacks

    target = AttackTarget(MemorizingOracle(members.latents, alphas_cumprod), alphas_cumprod)
    out = run_release_attacks([Release("r", target)], members, nonmembers, ["quantile"],
                              attack_params={"quantile": FAST}, n_bootstrap=20, progress=False)
    entry = out["attacks"]["quantile"]
    assert entry["metrics"]["auc"]["value"] >= 0.9 and entry["nfe_per_sample"] == 4
    json.dumps(entry["params"])


def test_needs_a_fit_and_a_held_out_part(alphas_cumprod, members, nonmembers):
    target = AttackTarget(GaussianOracle(0.0, 1.0, alphas_cumprod), alphas_cumprod)
    with pytest.raises(ConfigError, match="calibrate"):
        ATTACKS.get("quantile")(**FAST).score(target, members, progress=False)
    with pytest.raises(ConfigError):
        ATTACKS.get("quantile")(regressor="resnet")
    with pytest.raises(DataError, match="held-out"):
        ATTACKS.get("quantile")(**FAST).calibrate(target, members.subset(range(4)), nonmembers.subset(range(2)), progress=False)


@pytest.mark.parametrize("t_sec,k,expected", [(60, 20, 4), (100, 10, 11), (150, 10, 16)])
def test_nfe_per_sample(t_sec, k, expected, alphas_cumprod, members, nonmembers):
    oracle = GaussianOracle(0.0, 1.0, alphas_cumprod)
    attack = ATTACKS.get("quantile")(t_sec=t_sec, k=k, n_models=2)
    cal = attack.calibrate(AttackTarget(oracle, alphas_cumprod), members.subset(range(8)), nonmembers.subset(range(10)),
                           batch_size=5, progress=False)
    assert cal.nfe_per_sample == expected
    assert attack.score(AttackTarget(oracle, alphas_cumprod), members, batch_size=5, progress=False).nfe_per_sample == expected
    cfg = attack.score(AttackTarget(DoubledNFE(oracle), alphas_cumprod), members, batch_size=5, progress=False)
    assert cfg.nfe_per_sample == 2 * expected


def test_scores_do_not_depend_on_batching(alphas_cumprod, members, nonmembers):
    target = AttackTarget(GaussianOracle(0.5, 1.3, alphas_cumprod), alphas_cumprod)
    attack = ATTACKS.get("quantile")(**FAST)
    attack.calibrate(target, members.subset(range(8)), nonmembers, batch_size=7, progress=False)
    full = attack.score(target, members, batch_size=32, progress=False)
    idx = [30, 3, 17, 8, 0]
    part = attack.score(target, members.subset(idx), batch_size=2, progress=False)
    np.testing.assert_allclose(part.scores, full.scores[idx], rtol=1e-5, atol=1e-5)
    assert part.ids == [members.ids[i] for i in idx]


def test_features_are_small_for_sd_latents():
    latents, cond = torch.randn(2, 4, 64, 64), torch.randn(2, 77, 32)
    assert latent_features(latents).shape == (2, 4 * 8 * 8 + 8)
    assert latent_features(latents, cond).shape == (2, 4 * 8 * 8 + 8 + 32)
    assert latent_features(torch.randn(3, 4, 4, 4)).shape == (3, 4 * 4 * 4 + 8)
