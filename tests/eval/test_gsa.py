"""GSA1 / GSA2 (privtune.eval.attacks.gsa): detection on a memorizing predictor, chance on a generalizing
one, batched per-sample gradients equal to a loop of plain autograd on the tiny SD UNet, calibration-only
fitting, an untouched UNet, and the cost bookkeeping."""


import numpy as np
import pytest
import torch

from privtune.errors import ConfigError
from privtune.eval.attacks import ATTACKS, REQUIREMENTS, AttackTarget, EncodedSamples, missing_requirements
from privtune.eval.attacks.base import member_labels
from privtune.eval.attacks.gsa import attacked_parameters, gsa_timesteps
from privtune.eval.metrics import auc
from privtune.eval.primitives import add_noise, seeded_noise

from .conftest import make_samples
from .oracles import GaussianOracle, MemorizingOracle, OracleUNet

FAST = {"gsa1": {"n_timesteps": 5}, "gsa2": {"n_timesteps": 5}}


def oracle_target(oracle, alphas_cumprod) -> AttackTarget:
    net = OracleUNet(oracle).eval().requires_grad_(False)
    return AttackTarget(oracle, alphas_cumprod, unet=net)


def _calibrated_auc(name, target, members, nonmembers, half=16, **params):
    """Calibrate on the first `half` of each class, report AUC on the next `half`."""
    attack = ATTACKS.get(name)(**{**FAST[name], **params})
    cal = attack.calibrate(target, members.subset(range(half)), nonmembers.subset(range(half)), batch_size=16, progress=False)
    report = EncodedSamples.concat([members.subset(range(half, 2 * half)), nonmembers.subset(range(half, 2 * half))])
    res = attack.score(target, report, batch_size=16, progress=False)
    return auc(res.scores, member_labels(half, half)), res, attack, cal


@pytest.mark.parametrize("name", ["gsa1", "gsa2"])
def test_memorizing_predictor_is_detected(name, alphas_cumprod, members, nonmembers):
    target = oracle_target(MemorizingOracle(members.latents, alphas_cumprod), alphas_cumprod)
    value, res, attack, _ = _calibrated_auc(name, target, members, nonmembers)
    assert value >= 0.9
    y = member_labels(16, 16)
    assert auc(res.scores, 1 - y) == pytest.approx(1 - value)
    # role swap: the classifier fitted on this target, applied to the twin that memorized the non-members
    twin = oracle_target(MemorizingOracle(nonmembers.latents, alphas_cumprod), alphas_cumprod)
    report = EncodedSamples.concat([members.subset(range(16, 32)), nonmembers.subset(range(16, 32))])
    swapped = auc(attack.score(twin, report, batch_size=16, progress=False).scores, y)
    assert swapped <= 0.1
    assert attack.params()["parameters"] == "all" and attack.params()["n_tensors"] == 4


@pytest.mark.parametrize("name", ["gsa1", "gsa2"])
def test_generalizing_predictor_is_chance(name, alphas_cumprod):
    # 32 + 32 reported: a fitted classifier's chance AUC has a standard deviation of about 0.07 here
    # (about 0.1 with 16 + 16, where a 0.5 ± 0.2 band would fail one seed in twenty)
    members, nonmembers = make_samples(64, "a", 11), make_samples(64, "b", 12)
    target = oracle_target(GaussianOracle(0.0, 1.0, alphas_cumprod), alphas_cumprod)
    value, _, _, _ = _calibrated_auc(name, target, members, nonmembers, half=32)
    assert abs(value - 0.5) <= 0.2


def _loop_features(unet, params, samples, timesteps, alphas_cumprod, seed=0):
    """GSA1 and GSA2 features by one plain autograd call per (sample, timestep), no hooks, no batching."""
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    gsa1, gsa2 = [], []
    for i in range(len(samples)):
        x0, cond, sid = samples.latents[i:i + 1], samples.cond[i:i + 1], samples.ids[i:i + 1]
        grads = []
        for t in timesteps:
            noise = seeded_noise(x0.shape[1:], seed, f"gsa/t{t}", sid)
            eps = unet(add_noise(x0, noise, t, alphas_cumprod), torch.tensor([t]), encoder_hidden_states=cond).sample
            g = torch.autograd.grad((noise - eps).pow(2).mean(), params, allow_unused=True)
            grads.append([torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, params)])
        gsa1.append(torch.stack([sum(gk[j] for gk in grads).norm() / len(timesteps) for j in range(len(params))]))
        gsa2.append(torch.stack([sum(gk[j].norm() for gk in grads) / len(timesteps) for j in range(len(params))]))
    for p, flag in zip(params, flags):
        p.requires_grad_(flag)
    return torch.stack(gsa1).numpy(), torch.stack(gsa2).numpy()


def _state(unet):
    return ({n: p.detach().clone() for n, p in unet.named_parameters()},
            {n: p.requires_grad for n, p in unet.named_parameters()}, {n: m.training for n, m in unet.named_modules()})


def _assert_untouched(unet, before):
    weights, flags, modes = _state(unet)
    assert flags == before[1] and modes == before[2]
    assert all(torch.equal(weights[n], before[0][n]) for n in weights)
    for p in unet.parameters():
        assert p.grad is None and not any(hasattr(p, a) for a in ("grad_sample", "_forward_counter", "_current_grad_sample"))
    for m in unet.modules():
        assert not m._forward_hooks and not m._backward_hooks
        assert not any(hasattr(m, a) for a in ("activations", "max_batch_len", "autograd_grad_sample_hooks"))


def test_batched_features_equal_a_per_sample_autograd_loop(base_model):
    from diffusers import UNet2DConditionModel

    from privtune.models.lora import adapters_disabled, add_lora, lora_config, use_adapter

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(base_model, subfolder="unet").eval().requires_grad_(False)
    c, s, d = unet.config.in_channels, unet.config.sample_size, unet.config.cross_attention_dim
    g = torch.Generator().manual_seed(3)
    samples = EncodedSamples(torch.randn(2, c, s, s, generator=g), torch.randn(2, 6, d, generator=g), ["p", "q"])
    ac = torch.linspace(0.999, 0.01, 1000, dtype=torch.float64)
    target = AttackTarget(lambda x, t, cond: x, ac, unet=unet)
    timesteps = gsa_timesteps(2, 1000)
    assert timesteps == [499, 999] and gsa_timesteps(10, 1000) == list(range(99, 1000, 100))

    def check(kind, n_tensors):
        before = _state(unet)
        got = {name: ATTACKS.get(name)(n_timesteps=2) for name in ("gsa1", "gsa2")}
        feats = {name: a.features(target, samples, batch_size=2, progress=False) for name, a in got.items()}
        _assert_untouched(unet, before)
        ref1, ref2 = _loop_features(unet, [p for _, p in attacked_parameters(unet)[1]], samples, timesteps, ac)
        for name, ref in (("gsa1", ref1), ("gsa2", ref2)):
            assert feats[name].shape == (2, n_tensors) and got[name].params()["parameters"] == kind
            assert (ref > 0).mean() > 0.9
            np.testing.assert_allclose(feats[name], ref, rtol=1e-4, atol=1e-7 * ref.max())
        assert not np.allclose(feats["gsa1"], feats["gsa2"])

    check("all", len(list(unet.parameters())))
    lora = add_lora(unet, lora_config(2, 2, 0.0, "attn"))
    with torch.no_grad():
        for p in lora:
            p.normal_(0.0, 0.05)  # lora_B starts at zero, which would zero every lora_A gradient
    unet.requires_grad_(False)
    lora[0].requires_grad_(True)  # a mixed set of flags, to check they come back as they were
    check("lora", len(lora))
    add_lora(unet, lora_config(2, 2, 0.0, "attn"), adapter_name="other")
    use_adapter(unet, "default")
    kind, named = attacked_parameters(unet)
    assert kind == "lora" and [id(p) for _, p in named] == [id(p) for p in lora]  # the active adapter's tensors
    assert all(".*." in n and ".default." not in n for n, _ in named)  # named without the adapter (shadows)
    with adapters_disabled(unet):
        kind, named = attacked_parameters(unet)
        assert kind == "all" and not any("lora_" in n for n, _ in named)


def test_fits_only_calibration_ids_and_leaves_the_unet_untouched(alphas_cumprod, members, nonmembers):
    target = oracle_target(MemorizingOracle(members.latents, alphas_cumprod), alphas_cumprod)
    target.unet.head.weight.requires_grad_(True)
    before = _state(target.unet)
    value, res, attack, cal = _calibrated_auc("gsa1", target, members, nonmembers, n_timesteps=4)
    _assert_untouched(target.unet, before)
    cal_ids = set(members.ids[:16]) | set(nonmembers.ids[:16])
    assert set(attack.fit_ids) | set(attack.val_ids) == cal_ids
    assert not set(attack.fit_ids) & set(attack.val_ids)
    assert not (set(attack.fit_ids) | set(attack.val_ids)) & set(res.ids)
    assert cal.ids == attack.val_ids and len(cal.labels) == len(cal.ids) == 10 and cal.labels.sum() == 5
    assert attack.params()["n_fit"] == 22 and attack.params()["n_val"] == 10
    no_unet = AttackTarget(MemorizingOracle(members.latents, alphas_cumprod), alphas_cumprod)
    for name in ("gsa1", "gsa2"):
        assert missing_requirements(ATTACKS.get(name), no_unet) == [f"{name} needs {REQUIREMENTS['white_box']}"]
        assert missing_requirements(ATTACKS.get(name), target) == []
    with pytest.raises(ConfigError, match="target.unet"):
        ATTACKS.get("gsa1")().features(no_unet, members, progress=False)
    with torch.inference_mode(), pytest.raises(ConfigError, match="inference_mode"):
        attack.score(target, members, progress=False)
    with pytest.raises(ConfigError, match="calibrate"):
        ATTACKS.get("gsa2")().score(target, members, progress=False)


@pytest.mark.parametrize("name", ["gsa1", "gsa2"])
def test_features_do_not_depend_on_batching_or_subsets(name, alphas_cumprod, members):
    target = oracle_target(GaussianOracle(0.5, 1.3, alphas_cumprod), alphas_cumprod)
    attack = ATTACKS.get(name)(n_timesteps=3)
    full = attack.features(target, members, batch_size=32, progress=False)
    idx = [30, 3, 17, 8, 0]
    part = ATTACKS.get(name)(n_timesteps=3, max_batch_size=2).features(target, members.subset(idx), progress=False)
    np.testing.assert_allclose(part, full[idx], rtol=1e-5)
    assert full.shape == (32, 4) and (full > 0).all()


@pytest.mark.parametrize("name,backward", [("gsa1", 1), ("gsa2", 4)])
def test_nfe_and_backward_counts(name, backward, alphas_cumprod, members, nonmembers):
    target = oracle_target(GaussianOracle(0.0, 1.0, alphas_cumprod), alphas_cumprod)
    attack = ATTACKS.get(name)(n_timesteps=4)
    cal = attack.calibrate(target, members.subset(range(8)), nonmembers.subset(range(8)), batch_size=5, progress=False)
    res = attack.score(target, members.subset(range(8)), batch_size=3, progress=False)
    assert cal.nfe_per_sample == res.nfe_per_sample == 4
    p = attack.params()
    assert p["forward_per_sample"] == 4 and p["backward_per_sample"] == backward and p["backward_rows_per_sample"] == 4
    assert p["timesteps"] == [249, 499, 749, 999]
