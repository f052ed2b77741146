import numpy as np
import pytest
import torch

from privtune.errors import ConfigError
from privtune.eval.primitives import (
    NFECounter,
    UNetPredictor,
    add_noise,
    ddim_invert,
    ddim_trajectory,
    ddim_transfer,
    seeded_noise,
    single_step_loss,
)

from .oracles import ConstantEps


def test_transfer_to_same_step_is_identity(alphas_cumprod):
    x = torch.randn(3, 4, 8, 8)
    pred = lambda x, t, c: torch.randn_like(x)  # noqa: E731
    for s in (0, 140, 999):
        assert torch.equal(ddim_transfer(pred, x, s, s, torch.zeros(3, 2, 2), alphas_cumprod), x)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_inversion_then_denoising_returns_start_with_constant_eps(alphas_cumprod, dtype, tol):
    x0 = torch.randn(5, 4, 8, 8, dtype=dtype)
    pred = ConstantEps(torch.randn(1, 4, 8, 8, dtype=dtype))
    cond = torch.zeros(5, 2, 2)
    xt = ddim_invert(pred, x0, 200, 10, cond, alphas_cumprod)
    back = ddim_trajectory(pred, xt, 200, 0, 10, cond, alphas_cumprod)
    assert torch.allclose(back, x0, atol=tol, rtol=0)
    assert not torch.allclose(xt, x0)


def test_transfer_matches_x0_form_and_per_sample_steps(alphas_cumprod):
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    eps = torch.randn_like(x)
    s, s2 = torch.tensor([10, 300]), torch.tensor([20, 100])
    out = ddim_transfer(lambda x_, t, c: eps, x, s, s2, None, alphas_cumprod)
    ac = alphas_cumprod.double()
    for i in range(2):
        a, a2 = ac[s[i]], ac[s2[i]]
        x0_hat = (x[i] - (1 - a).sqrt() * eps[i]) / a.sqrt()
        assert torch.allclose(out[i], a2.sqrt() * x0_hat + (1 - a2).sqrt() * eps[i], atol=1e-10)


def test_trajectory_rejects_bad_stride(alphas_cumprod):
    with pytest.raises(ConfigError):
        ddim_trajectory(ConstantEps(torch.zeros(1)), torch.zeros(1, 1, 1, 1), 0, 25, 10, None, alphas_cumprod)


def test_single_step_loss_is_zero_for_exact_predictor(alphas_cumprod):
    x0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([50, 100, 200, 500])
    xt = add_noise(x0, noise, t, alphas_cumprod)
    pred = lambda x, tt, c: noise if torch.equal(x, xt) else torch.zeros_like(x)  # noqa: E731
    assert torch.allclose(single_step_loss(pred, x0, t, noise, None, alphas_cumprod), torch.zeros(4))
    zero = lambda x, tt, c: torch.zeros_like(x)  # noqa: E731
    summed = single_step_loss(zero, x0, t, noise, None, alphas_cumprod, "sum")
    mean = single_step_loss(zero, x0, t, noise, None, alphas_cumprod, "mean")
    assert torch.allclose(summed, noise.pow(2).flatten(1).sum(1)) and torch.allclose(mean, summed / 256)


def test_seeded_noise_depends_only_on_id():
    a = seeded_noise((4, 8, 8), 0, "s", ["x", "y", "z"])
    b = seeded_noise((4, 8, 8), 0, "s", ["z", "x"])
    assert torch.equal(a[0], b[1]) and torch.equal(a[2], b[0]) and not torch.equal(a[0], a[1])
    assert not torch.equal(a[0], seeded_noise((4, 8, 8), 1, "s", ["x"])[0])
    assert torch.equal(seeded_noise((2, 2), 3, "d0"), seeded_noise((2, 2), 3, "d0"))


def _tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8,
    ).eval()


def test_unet_predictor_guidance_and_nfe():
    unet = _tiny_unet()
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([1, 10, 100])
    cond, uncond = torch.randn(3, 8, 16), torch.randn(1, 8, 16)
    plain = NFECounter(UNetPredictor(unet))
    e1 = plain(x, t, cond)
    with torch.no_grad():
        ref_c = unet(x, t, encoder_hidden_states=cond).sample
        ref_u = unet(x, t, encoder_hidden_states=uncond.expand(3, -1, -1)).sample
    assert torch.allclose(e1, ref_c, atol=1e-5) and plain.total == 3
    cfg = NFECounter(UNetPredictor(unet, guidance_scale=7.5, uncond=uncond))
    e2 = cfg(x, t, cond)
    assert torch.allclose(e2, ref_u + 7.5 * (ref_c - ref_u), atol=1e-4)
    assert cfg.total == 6 and cfg.per_sample(3) == 2.0
    cfg.reset()
    assert cfg.total == 0
    with pytest.raises(ConfigError):
        UNetPredictor(unet, guidance_scale=3.0)


def test_attack_nfe_doubles_under_cfg_with_real_unet(alphas_cumprod):
    from privtune.eval.attacks import ATTACKS, AttackTarget, EncodedSamples

    unet = _tiny_unet()
    samples = EncodedSamples(torch.randn(3, 4, 8, 8), torch.randn(3, 8, 16), ["a", "b", "c"])
    pia = ATTACKS.get("pia")(timesteps=[200])
    plain = pia.score(AttackTarget(UNetPredictor(unet), alphas_cumprod), samples, progress=False)
    cfg = UNetPredictor(unet, guidance_scale=7.5, uncond=torch.zeros(1, 8, 16))
    guided = pia.score(AttackTarget(cfg, alphas_cumprod), samples, progress=False)
    assert plain.nfe_per_sample == 2 and guided.nfe_per_sample == 4
    assert not np.allclose(plain.scores, guided.scores)
