"""Wen et al. and Ren et al. detection as attacks: orientation on a conditional memorizing oracle, exact entropy
plumbing on the tiny UNet, clear errors, and (slow) higher scores on the captions of a toy model over-fit on 4 members."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from privtune.errors import ConfigError
from privtune.eval.attacks import ATTACKS, AttackTarget, EncodedSamples
from privtune.eval.metrics import auc
from privtune.eval.primitives import UNetPredictor, seeded_noise
from privtune.memorization.attention import entropy, install_probe

from .conftest import encode_prompts, load_tiny, make_image_folder

torch.set_num_threads(1)


class ConditionalOracle:
    """specs/attacks.md §0.4: the exact denoiser of the training pairs whose caption equals c (all pairs otherwise)."""

    def __init__(self, images, captions, alphas):
        self.images, self.captions, self.alphas = images, captions, alphas

    def __call__(self, x, t, cond):
        a = self.alphas[t].to(x.dtype).view(-1, 1, 1, 1)
        out = []
        for i in range(len(x)):
            match = [j for j, c in enumerate(self.captions) if torch.equal(c, cond[i])]
            pool = self.images[match] if match else self.images
            d = ((x[i] - a[i].sqrt() * pool) ** 2).flatten(1).sum(1)
            w = torch.softmax(-d / (2 * (1 - a[i])), 0).view(-1, 1, 1, 1)
            out.append((x[i] - a[i].sqrt() * (w * pool).sum(0)) / (1 - a[i]).sqrt())
        return torch.stack(out)


@pytest.mark.parametrize("name", ["wen", "wen_trajectory"])
def test_wen_scores_memorized_prompts_higher_on_the_oracle(name):
    from diffusers import DDPMScheduler

    g = torch.Generator().manual_seed(0)
    alphas = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod.double()
    images = torch.randn(4, 4, 8, 8, generator=g)
    conds = torch.randn(10, 6, 8, generator=g)
    oracle = ConditionalOracle(images, list(conds[:4]), alphas)
    target = AttackTarget(oracle, alphas, uncond=torch.zeros(1, 6, 8))
    samples = EncodedSamples(torch.zeros(10, 4, 8, 8), conds, [f"s{i}" for i in range(10)])
    scores = ATTACKS.get(name)(generations=2, steps=5).score(target, samples, progress=False)
    assert auc(scores.scores, np.r_[np.ones(4), np.zeros(6)]) == 1.0
    assert np.allclose(scores.raw[4:], 0.0, atol=1e-6) and (scores.raw[:4] > 0.05).all()
    assert scores.nfe_per_sample == 2 * 2 * (1 if name == "wen" else 5)


@pytest.fixture(scope="module")
def tiny(base_model):
    return load_tiny(base_model)


encode = encode_prompts


def test_ren_mode_e_is_the_entropy_of_the_recorded_layer(tiny):
    prompts = ["watch", "alarm clock", "black up-pointing double triangle"]
    cond = encode(tiny, prompts)
    alphas = tiny.noise_scheduler.alphas_cumprod.double()
    target = AttackTarget(UNetPredictor(tiny.unet), alphas, uncond=encode(tiny, [""]),
                          token_lengths={f"p{i}": len(tiny.tokenizer(p).input_ids) for i, p in enumerate(prompts)})
    samples = EncodedSamples(torch.zeros(3, tiny.unet.config.in_channels, 8, 8), cond, ["p0", "p1", "p2"])
    before = {k: type(v) for k, v in tiny.unet.attn_processors.items()}
    got = ATTACKS.get("ren")(layer=3, seed=0).score(target, samples, progress=False)
    assert {k: type(v) for k, v in tiny.unet.attn_processors.items()} == before  # probe removed after scoring
    saved = dict(tiny.unet.attn_processors)
    probe = install_probe(tiny.unet)
    probe.recording = True
    c = tiny.unet.config.in_channels
    x = seeded_noise((c, 8, 8), 0, "ren/x_T", None).expand(3, c, 8, 8)
    with torch.no_grad():
        tiny.unet(x, torch.full((3,), 999), encoder_hidden_states=cond)
    want = entropy(probe.take()[3]).numpy()
    tiny.unet.set_attn_processor(saved)
    np.testing.assert_allclose(got.raw, want, rtol=1e-5)
    assert got.nfe_per_sample == 1
    d = ATTACKS.get("ren_trajectory")(steps=4, last=2).score(target, samples, progress=False)
    assert np.isfinite(d.raw).all() and d.nfe_per_sample == 4 + 3
    with pytest.raises(ConfigError, match="out of range"):
        ATTACKS.get("ren")(layer=9).score(target, samples, progress=False)
    with pytest.raises(ConfigError, match="token length"):
        ATTACKS.get("ren_trajectory")(steps=4, last=2).score(
            AttackTarget(target.predictor, alphas, uncond=target.uncond, token_lengths={}), samples, progress=False)
    with pytest.raises(ConfigError, match="last"):
        ATTACKS.get("ren_trajectory")(steps=4, last=5)
    with pytest.raises(ConfigError, match="empty-prompt"):
        ATTACKS.get("wen")().score(AttackTarget(target.predictor, alphas), samples, progress=False)


@pytest.fixture(scope="module")
def overfit(tmp_path_factory, base_model):
    """A LoRA over-fit on 4 captioned images (random-block pictures, emoji names as captions), 12 held out."""
    import datasets

    from privtune.config import load_config
    from privtune.data.sources import EMBEDDED_DATA
    from privtune.eval.encode import empty_prompt_state, encode_records
    from privtune.eval.stage import token_lengths
    from privtune.trainers import get_trainer

    root = tmp_path_factory.mktemp("overfit")
    captions = datasets.Dataset.from_parquet(str(EMBEDDED_DATA))["caption"][:16]
    make_image_folder(root / "data", n=16, captions=captions, seed=0)
    cfg = load_config("lora", [f"output_dir={root / 'run'}", f"model.base={base_model}", f"data.source={root / 'data'}",
                               "data.members=4", "data.nonmembers=12", "train.max_steps=150", "train.batch_size=4",
                               "lora.rank=8", "lora.alpha=8", "optim.lr=3e-3", "train.validation_every=0",
                               "train.checkpoint_every=0", "eval.enabled=false"])
    trainer = get_trainer("lora")(cfg)
    trainer.run()
    comps = trainer.components
    unet = trainer.accelerator.unwrap_model(comps.unet).eval()
    split = trainer.split
    samples = EncodedSamples.concat([encode_records(comps, split.members, 32, "cpu"), encode_records(comps, split.nonmembers, 32, "cpu")])
    target = AttackTarget(UNetPredictor(unet), comps.noise_scheduler.alphas_cumprod.double(), uncond=empty_prompt_state(comps, "cpu"),
                          token_lengths=token_lengths(comps.tokenizer, split.members + split.nonmembers))
    return target, samples, np.r_[np.ones(4), np.zeros(12)]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["wen", "ren"])
def test_overfit_captions_score_higher_than_heldout(overfit, name):
    target, samples, labels = overfit
    scores = ATTACKS.get(name)().score(target, samples, progress=False).scores
    assert scores[labels == 1].mean() > scores[labels == 0].mean()
    assert auc(scores, labels) >= 0.6
