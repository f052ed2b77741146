"""Structural MIA (Li et al., specs/attacks.md §7): oracle AUCs with a fixed stand-in decoder, NFE,
batching, requirements, the VAE floor, and one run through the shipped tiny SD's VAE and UNet."""

import json

import numpy as np
import pytest
import torch

from privtune.errors import ConfigError, DataError
from privtune.eval.attacks import ATTACKS, AttackTarget, EncodedSamples, missing_requirements
from privtune.eval.attacks.base import member_labels
from privtune.eval.attacks.structural import ssim
from privtune.eval.metrics import auc

from .conftest import make_samples
from .oracles import DoubledNFE, GaussianOracle, MemorizingOracle, upsample_decode

FAST = {"timesteps": [40]}  # 2 NFE per sample (stride 20)


def with_pixels(samples: EncodedSamples) -> EncodedSamples:
    return EncodedSamples(samples.latents, samples.cond, samples.ids, pixels=upsample_decode(samples.latents))


def _target(predictor, alphas_cumprod, decode=upsample_decode):
    return AttackTarget(predictor, alphas_cumprod, decode=decode)


def _calibrated(target, members, nonmembers, **params):
    attack = ATTACKS.get("structural")(**params)
    cal = attack.calibrate(target, members.subset(range(16)), nonmembers.subset(range(16)), progress=False)
    report = EncodedSamples.concat([members.subset(range(16, 32)), nonmembers.subset(range(16, 32))])
    res = attack.score(target, report, batch_size=8, progress=False)
    return auc(res.scores, member_labels(16, 16)), res, cal, attack


@pytest.mark.parametrize("params", [FAST, {}])
def test_memorizing_oracle_is_detected(params, alphas_cumprod, members, nonmembers):
    m, n = with_pixels(members), with_pixels(nonmembers)
    target = _target(MemorizingOracle(members.latents, alphas_cumprod), alphas_cumprod)
    value, res, cal, attack = _calibrated(target, m, n, **params)
    assert value >= 0.9
    np.testing.assert_array_equal(res.scores, res.raw)
    p = attack.params()
    assert p["vae_floor_ssim"]["all"] == pytest.approx(1.0, abs=1e-4)  # pixels are the clean decodes here
    assert p["calibration_mean_ssim_at_t"]["members"] > p["calibration_mean_ssim_at_t"]["nonmembers"]
    if params == {}:
        assert p["t"] in (20, 40, 60, 100) and set(p["calibration_auc"]) == {"20", "40", "60", "100"}
    json.dumps(p)


def test_generalizing_oracle_is_chance(alphas_cumprod):
    m, n = with_pixels(make_samples(32, "a", 11)), with_pixels(make_samples(32, "b", 12))
    target = _target(GaussianOracle(0.0, 1.0, alphas_cumprod), alphas_cumprod)
    value, _, _, _ = _calibrated(target, m, n, **FAST)
    assert abs(value - 0.5) <= 0.2


def test_decodes_the_noisy_inverted_latent_without_denoising(alphas_cumprod, members):
    """With ε ≡ 0 one DDIM step 0 → t only rescales: z_t = sqrt(ᾱ_t / ᾱ_0)·z0, so the score must be
    SSIM(x, Dec(that)), not SSIM(x, Dec(z0)) (= 1)."""
    s = with_pixels(members.subset(range(4)))
    target = _target(lambda x, t, c: torch.zeros_like(x), alphas_cumprod)
    res = ATTACKS.get("structural")(timesteps=[100], stride=100).score(target, s, progress=False)
    ratio = (alphas_cumprod[100] / alphas_cumprod[0]).sqrt()
    expected = ssim(upsample_decode(ratio * s.latents), s.pixels).numpy()
    np.testing.assert_allclose(res.scores, expected, rtol=1e-5)
    assert (res.scores < 0.999).all()


@pytest.mark.parametrize("timesteps,stride,expected", [([40], 20, 2), ([100], 20, 5), ([100], 10, 10), ([60], 60, 1)])
def test_nfe_per_sample(timesteps, stride, expected, alphas_cumprod, members):
    oracle = GaussianOracle(0.0, 1.0, alphas_cumprod)
    s = with_pixels(members)
    attack = ATTACKS.get("structural")(timesteps=timesteps, stride=stride)
    assert attack.score(_target(oracle, alphas_cumprod), s, batch_size=5, progress=False).nfe_per_sample == expected
    cfg = attack.score(_target(DoubledNFE(oracle), alphas_cumprod), s, batch_size=5, progress=False)
    assert cfg.nfe_per_sample == 2 * expected
    assert attack.params()["nfe_inversion"] == expected


def test_calibration_reads_every_candidate_off_one_trajectory(alphas_cumprod, members, nonmembers):
    target = _target(GaussianOracle(0.0, 1.0, alphas_cumprod), alphas_cumprod)
    cal = ATTACKS.get("structural")().calibrate(target, with_pixels(members), with_pixels(nonmembers), progress=False)
    assert cal.nfe_per_sample == 100 / 20
    assert cal.labels.tolist() == [1] * 32 + [0] * 32


def test_scores_do_not_depend_on_batching(alphas_cumprod, members):
    s = with_pixels(members)
    target = _target(GaussianOracle(0.5, 1.3, alphas_cumprod), alphas_cumprod)
    attack = ATTACKS.get("structural")(timesteps=[60])
    full = attack.score(target, s, batch_size=32, progress=False)
    idx = [30, 3, 17, 8, 0]
    part = attack.score(target, s.subset(idx), batch_size=2, progress=False)
    np.testing.assert_allclose(part.scores, full.scores[idx], rtol=1e-5, atol=1e-6)
    assert part.ids == [s.ids[i] for i in idx]


def test_requires_pixels_and_a_decoder(alphas_cumprod, members):
    oracle = GaussianOracle(0.0, 1.0, alphas_cumprod)
    cls = ATTACKS.get("structural")
    assert cls.requires == ("pixels",)
    missing = missing_requirements(cls, _target(oracle, alphas_cumprod), members)
    assert len(missing) == 1 and "pixels" in missing[0] and missing[0].startswith("structural needs")
    assert missing_requirements(cls, _target(oracle, alphas_cumprod), with_pixels(members)) == []
    assert missing_requirements(cls, AttackTarget(oracle, alphas_cumprod), with_pixels(members)) != []
    with pytest.raises(DataError, match="pixels"):
        cls(**FAST).score(_target(oracle, alphas_cumprod), members, progress=False)


def test_settings_are_checked(alphas_cumprod, members):
    with pytest.raises(ConfigError):
        ATTACKS.get("structural")(timesteps=[30], stride=20)
    with pytest.raises(ConfigError, match="calibrate"):
        ATTACKS.get("structural")().score(_target(GaussianOracle(0.0, 1.0, alphas_cumprod), alphas_cumprod),
                                          with_pixels(members), progress=False)
    assert ATTACKS.get("structural")(timesteps=40).params()["t"] == 40


def test_runner_skips_or_runs_by_requirements(alphas_cumprod, members, nonmembers):
    from privtune.eval.runner import Release, run_release_attacks, select_attacks

    bare = AttackTarget(GaussianOracle(0.0, 1.0, alphas_cumprod), alphas_cumprod)
    chosen, skipped = select_attacks(["all"], bare, members)
    assert "structural" not in chosen and "pixels" in skipped["structural"]
    with pytest.raises(ConfigError, match="structural"):
        select_attacks(["structural"], bare, members)
    target = _target(MemorizingOracle(members.latents, alphas_cumprod), alphas_cumprod)
    out = run_release_attacks([Release("r", target)], with_pixels(members), with_pixels(nonmembers), ["structural"],
                              attack_params={"structural": FAST}, n_bootstrap=20, progress=False)
    entry = out["attacks"]["structural"]
    assert entry["metrics"]["auc"]["value"] >= 0.9 and entry["nfe_per_sample"] == 2


def test_tiny_sd_vae_floor_and_scores(base_model):
    """The shipped tiny SD: real VAE decoder and UNet, a few random-block images."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from privtune.eval.primitives import UNetPredictor

    vae = AutoencoderKL.from_pretrained(base_model, subfolder="vae").eval()
    unet = UNet2DConditionModel.from_pretrained(base_model, subfolder="unet").eval()
    ac = DDPMScheduler.from_pretrained(base_model, subfolder="scheduler").alphas_cumprod
    factor = vae.config.scaling_factor
    size = 8 * 2 ** (len(vae.config.block_out_channels) - 1)
    g = torch.Generator().manual_seed(0)
    blocks = torch.rand(8, 3, 4, 4, generator=g) * 2 - 1
    pixels = torch.nn.functional.interpolate(blocks, size=(size, size), mode="nearest")
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mode() * factor

    def decode(z):
        with torch.no_grad():
            return vae.decode(z / factor).sample.float().clamp(-1, 1)

    cond = torch.zeros(8, 77, unet.config.cross_attention_dim)
    samples = EncodedSamples(latents, cond, [f"x{i}" for i in range(8)], pixels=pixels)
    target = AttackTarget(UNetPredictor(unet), ac, decode=decode)
    attack = ATTACKS.get("structural")(timesteps=[20, 40])
    cal = attack.calibrate(target, samples.subset(range(4)), samples.subset(range(4, 8)), batch_size=4, progress=False)
    floor = attack.params()["vae_floor_ssim"]["all"]
    assert -1.0 <= floor <= 1.0 and np.isfinite(cal.scores).all()
    direct = ssim(decode(latents), pixels).mean().item()
    assert floor == pytest.approx(direct, abs=1e-5)
    assert cal.nfe_per_sample == 2
