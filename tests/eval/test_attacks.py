import numpy as np
import pytest
import torch

from privtune.errors import ConfigError
from privtune.eval.attacks import ATTACKS, AttackTarget, EncodedSamples
from privtune.eval.attacks.base import member_labels
from privtune.eval.metrics import auc

from .oracles import DoubledNFE, GaussianOracle, MemorizingOracle

FAST = {"loss": {"draws": 2}, "secmi": {}, "pia": {}, "pian": {}}


def _calibrated_auc(name, target, members, nonmembers, **params):
    """Calibrate on the first half of each class, report AUC on the second half."""
    attack = ATTACKS.get(name)(**params)
    attack.calibrate(target, members.subset(range(16)), nonmembers.subset(range(16)), progress=False)
    report = EncodedSamples.concat([members.subset(range(16, 32)), nonmembers.subset(range(16, 32))])
    res = attack.score(target, report, batch_size=8, progress=False)
    return auc(res.scores, member_labels(16, 16)), res, attack


def test_registered_names():
    assert set(ATTACKS.names()) >= {"loss", "secmi", "secmi_nn", "pia", "pian"}
    with pytest.raises(ConfigError, match="valid attacks"):
        ATTACKS.get("nope")


# The memorizing / generalizing oracle tests of every attack are in test_every_attack.py.


def test_conditional_memorizing_oracle_uses_captions(alphas_cumprod, members, nonmembers):
    captions = torch.arange(32, dtype=torch.float32)[:, None, None].expand(32, 8, 16) % 4
    m = EncodedSamples(members.latents, captions, members.ids)
    oracle = MemorizingOracle(members.latents, alphas_cumprod, conds=captions)
    target = AttackTarget(oracle, alphas_cumprod)
    value, _, _ = _calibrated_auc("pia", target, m, nonmembers, timesteps=[200])
    assert value >= 0.95


@pytest.mark.parametrize(
    "name,params,expected",
    [
        ("loss", {"timesteps": [100], "draws": 1}, 1),
        ("loss", {"timesteps": [100], "draws": 3}, 3),
        ("secmi", {"t_sec": 100, "k": 10}, 11),
        ("secmi", {"t_sec": 150, "k": 10}, 16),
        ("secmi", {"t_sec": 60, "k": 20}, 4),
        ("pia", {"timesteps": [200]}, 2),
        ("pian", {"timesteps": [200]}, 2),
    ],
)
def test_nfe_per_sample(name, params, expected, alphas_cumprod, members):
    oracle = GaussianOracle(0.0, 1.0, alphas_cumprod)
    attack = ATTACKS.get(name)(**params)
    assert attack.score(AttackTarget(oracle, alphas_cumprod), members, batch_size=5, progress=False).nfe_per_sample == expected
    cfg = attack.score(AttackTarget(DoubledNFE(oracle), alphas_cumprod), members, batch_size=5, progress=False)
    assert cfg.nfe_per_sample == 2 * expected


def test_calibration_nfe_counts_every_candidate(alphas_cumprod, members, nonmembers):
    target = AttackTarget(GaussianOracle(0.0, 1.0, alphas_cumprod), alphas_cumprod)
    cal = ATTACKS.get("pia")().calibrate(target, members, nonmembers, progress=False)
    assert cal.nfe_per_sample == 1 + 4
    cal = ATTACKS.get("loss")(draws=4).calibrate(target, members, nonmembers, progress=False)
    assert cal.nfe_per_sample == 4 * 5


@pytest.mark.parametrize(
    "name,params",
    [
        ("loss", {"timesteps": [100], "draws": 2}),
        ("loss", {"timesteps": [100], "draws": 2, "noise": "per_sample"}),
        ("secmi", {}),
        ("pia", {"timesteps": [200]}),
    ],
)
def test_scores_do_not_depend_on_batching_or_subsets(name, params, alphas_cumprod, members):
    target = AttackTarget(GaussianOracle(0.5, 1.3, alphas_cumprod), alphas_cumprod)
    attack = ATTACKS.get(name)(**params)
    full = attack.score(target, members, batch_size=32, progress=False)
    idx = [30, 3, 17, 8, 0]
    part = attack.score(target, members.subset(idx), batch_size=2, progress=False)
    np.testing.assert_allclose(part.scores, full.scores[idx], rtol=1e-5, atol=1e-6)
    assert part.ids == [members.ids[i] for i in idx]


def test_loss_per_sample_noise_differs_between_samples(alphas_cumprod):
    x = torch.zeros(2, 4, 8, 8)
    s = EncodedSamples(x, torch.zeros(2, 8, 16), ["a", "b"])
    target = AttackTarget(GaussianOracle(0.0, 1.0, alphas_cumprod), alphas_cumprod)
    shared = ATTACKS.get("loss")(timesteps=[100], draws=1).score(target, s, progress=False)
    per = ATTACKS.get("loss")(timesteps=[100], draws=1, noise="per_sample").score(target, s, progress=False)
    assert shared.raw[0] == shared.raw[1] and per.raw[0] != per.raw[1]


def test_uncalibrated_multi_t_attack_refuses_to_score(alphas_cumprod, members):
    target = AttackTarget(GaussianOracle(0.0, 1.0, alphas_cumprod), alphas_cumprod)
    with pytest.raises(ConfigError, match="calibrate"):
        ATTACKS.get("pia")().score(target, members, progress=False)
    with pytest.raises(ConfigError):
        ATTACKS.get("secmi")(t_sec=25, k=10)


def test_secmi_nn_fits_only_on_calibration_ids(alphas_cumprod, members, nonmembers):
    target = AttackTarget(MemorizingOracle(members.latents, alphas_cumprod), alphas_cumprod)
    value, res, attack = _calibrated_auc("secmi_nn", target, members, nonmembers, t_sec=60, k=20, epochs=15)
    cal_ids = set(members.ids[:16]) | set(nonmembers.ids[:16])
    assert set(attack.fit_ids) | set(attack.val_ids) == cal_ids
    assert not set(attack.fit_ids) & set(attack.val_ids)
    assert not set(attack.fit_ids) & set(res.ids)
    assert value >= 0.9
    assert attack.params()["n_fit"] == 24 and res.nfe_per_sample == 4
