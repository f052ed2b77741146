"""What LoRA-trainer users expect, privacy-aware: min-SNR weighting (before DP clipping), EMA of the LoRA weights
(exported, resumed exactly, free under DP), caption dropout with a cached empty caption, tag shuffle / dropout."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from privtune.export import LORA_FILE
from privtune.losses.denoising import min_snr_weights
from privtune.train import main

from .conftest import prepare_trainer, train_args

torch.set_num_threads(1)


def _trainer(run, recipe, *overrides, steps=4):
    from privtune.config import load_config
    from privtune.trainers import get_trainer

    return get_trainer(recipe)(load_config(recipe, train_args(run, *overrides, steps=steps)[1:]))


# ---------------------------------------------------------------------------- min-SNR-gamma
@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_min_snr_weights_follow_the_paper(kind):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=kind)
    t = torch.tensor([0, 50, 300, 999])
    a = sched.alphas_cumprod[t].double()
    snr = a / (1 - a)
    want = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / (snr if kind == "epsilon" else snr + 1)
    got = min_snr_weights(sched, t, 5.0)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    assert got[0] < 0.01 and (got <= 1 + 1e-6).all()  # low-noise steps (huge SNR) are down-weighted


def test_dp_min_snr_weights_each_example_before_clipping(tmp_path, base_model):
    """Under DP-SGD each draw's loss carries its min-SNR weight inside the per-example gradient, then clipping."""
    from privtune.losses import denoising_loss

    k, c, gamma = 2, 0.05, 0.5
    trainer = prepare_trainer(_trainer(tmp_path / "run", "dpsgd", f"model.base={base_model}", "dp.target_epsilon=null",
                                       "dp.noise_multiplier=0", f"dp.max_grad_norm={c}", f"dp.noise_multiplicity={k}",
                                       "dp.poisson=false", "train.batch_size=3", f"train.snr_gamma={gamma}"))
    batch = trainer.micro_batch(0)
    n = len(batch.rows)
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn((n * k, *batch.latents.shape[1:]), generator=gen)
    timesteps = torch.tensor([5, 900, 40, 600, 10, 300])  # small t: SNR >> gamma, weight << 1
    trainer.sample_noise = lambda latents: (noise[:len(latents)], timesteps[:len(latents)])
    loss, _ = trainer.compute_loss(batch)
    loss.backward()
    grads = trainer.per_example_grads(n)
    clipped, norms = trainer.clip(grads)
    trainer.grad_sampler.disable_hooks()
    comps = trainer.components
    weights = min_snr_weights(comps.noise_scheduler, timesteps, gamma)
    assert weights.min() < 0.05 and weights.max() > 0.4
    for i in range(n):
        weighted, plain = [], []
        for j in range(k):
            r = i * k + j
            row = denoising_loss(comps.unet, comps.noise_scheduler, batch.latents[i:i + 1], batch.encoder_hidden_states[i:i + 1],
                                 noise[r:r + 1], timesteps[r:r + 1])
            g = torch.autograd.grad(row.sum(), trainer.trainable, allow_unused=True)
            g = [x if x is not None else torch.zeros_like(p) for x, p in zip(g, trainer.trainable)]
            weighted.append([weights[r] * x for x in g])
            plain.append(g)
        ref = [torch.stack([d[p] for d in weighted]).mean(0) for p in range(len(trainer.trainable))]
        unweighted = [torch.stack([d[p] for d in plain]).mean(0) for p in range(len(trainer.trainable))]
        for got, want in zip(grads, ref):
            torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-7)
        assert not all(torch.allclose(got[i], u, rtol=1e-3) for got, u in zip(grads, unweighted))
        ref_norm = torch.sqrt(sum((w ** 2).sum() for w in ref))
        assert torch.isclose(norms[i], ref_norm, rtol=1e-4)  # the weighted gradient is what gets clipped
        assert torch.sqrt(sum((g[i] ** 2).sum() for g in clipped)) <= c * (1 + 1e-5)


def test_min_snr_refused_where_the_loss_ignores_it(tmp_path, base_model, capsys):
    run = tmp_path / "run"
    assert main(["recipe=mp_lora", *train_args(run, f"model.base={base_model}", "train.snr_gamma=5")[1:]]) == 2
    assert "does not support train.snr_gamma" in capsys.readouterr().err
    assert not (run / "config.yaml").exists()


def test_min_snr_changes_the_trained_lora(tmp_path, base_model):
    a, b = tmp_path / "a", tmp_path / "b"
    main(train_args(a, f"model.base={base_model}", steps=3))
    main(train_args(b, f"model.base={base_model}", "train.snr_gamma=1", steps=3))
    wa, wb = load_file(str(a / "lora" / LORA_FILE)), load_file(str(b / "lora" / LORA_FILE))
    assert any(not torch.allclose(wa[k], wb[k]) for k in wa)


# ---------------------------------------------------------------------------- EMA
def test_ema_is_exported_and_resume_equals_uninterrupted(tmp_path, base_model):
    common = (f"model.base={base_model}", "train.ema.decay=0.5", "train.ema.start=1", "train.checkpoint_every=2",
              "lora.dropout=0.1")
    full, part, raw = tmp_path / "full", tmp_path / "part", tmp_path / "raw"
    main(train_args(full, *common, steps=4))
    main(train_args(part, *common, steps=2))
    main(train_args(part, *common, "resume=latest", steps=4))
    main(train_args(raw, f"model.base={base_model}", "train.checkpoint_every=2", "lora.dropout=0.1", steps=4))
    wa, wb, wr = (load_file(str(d / "lora" / LORA_FILE)) for d in (full, part, raw))
    assert wa.keys() == wb.keys() == wr.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-7)
    # the raw iterate at step 4 is the same in both (EMA does not touch training); what ships is the average
    assert any(not torch.allclose(wa[k], wr[k], atol=1e-7) for k in wa if "lora_B" in k)


def test_ema_under_dp_is_post_processing_on_the_card(tmp_path, base_model):
    run = tmp_path / "run"
    main(["recipe=dpsgd", *train_args(run, f"model.base={base_model}", "train.ema.decay=0.9", "dp.target_epsilon=8",
                                      "eval.enabled=false", steps=2)[1:]])
    privacy = json.loads((run / "privacy.json").read_text())
    assert "post-processing" in privacy["ema"] and privacy["epsilon"] <= 8


# ---------------------------------------------------------------------------- captions
def test_caption_dropout_uses_the_cached_empty_caption(tmp_path, base_model):
    trainer = prepare_trainer(_trainer(tmp_path / "run", "lora", f"model.base={base_model}", "captions.dropout=1.0"))
    inputs = trainer.inputs
    assert inputs.cache is not None
    calls = []
    encode = inputs.encode_text
    inputs.encode_text = lambda ids: calls.append(ids.shape[0]) or encode(ids)
    empty = encode(inputs.tokenize([""]))
    for step in range(3):
        batch = trainer.micro_batch(step)
        states = batch.encoder_hidden_states
        torch.testing.assert_close(states, empty.expand_as(states).to(states))
    assert calls == [1]  # the empty caption encoded once, then reused


def test_caption_dropout_rate_and_seeded_draws():
    from omegaconf import OmegaConf

    from privtune.data.captions import CaptionRandomizer

    cfg = OmegaConf.create({"p": 0.1, "multiple": False, "separator": "|", "insert_tokens": 0, "repeat_words": 0,
                            "embedding_noise": 0.0, "dropout": 0.3, "shuffle_tags": False, "keep_tags": 0, "tag_dropout": 0.0})
    rz = CaptionRandomizer(cfg, seed=0)
    draws = [rz.draw("pixel art portrait, glasses", step, row).caption for step in range(50) for row in range(20)]
    rate = sum(d == "" for d in draws) / len(draws)
    assert 0.25 < rate < 0.35
    assert draws == [CaptionRandomizer(cfg, seed=0).draw("pixel art portrait, glasses", s, r).caption
                     for s in range(50) for r in range(20)]  # a pure function of (seed, step, row): resume-exact


def test_tag_shuffle_and_dropout_keep_the_first_tags():
    from omegaconf import OmegaConf

    from privtune.data.captions import CaptionRandomizer

    cfg = OmegaConf.create({"p": 0.1, "multiple": False, "separator": "|", "insert_tokens": 0, "repeat_words": 0,
                            "embedding_noise": 0.0, "dropout": 0.0, "shuffle_tags": True, "keep_tags": 1, "tag_dropout": 0.3})
    rz = CaptionRandomizer(cfg, seed=0)
    caption = "pixel art portrait, black hair, glasses, red shirt, blue background"
    tags = [t.strip() for t in caption.split(",")]
    outs = [rz.draw(caption, s, 0).caption for s in range(200)]
    assert all(o.startswith("pixel art portrait") for o in outs)
    split = [o.split(", ")[1:] for o in outs]
    assert all(set(s) <= set(tags[1:]) for s in split)
    kept = sum(len(s) for s in split) / (200 * 4)
    assert 0.6 < kept < 0.8  # each later tag dropped with probability 0.3
    full = [s for s in split if len(s) == 4]
    assert len({tuple(s) for s in full}) > 3  # and the order changes from step to step


# ---------------------------------------------------------------------------- DoRA
def test_dora_exports_magnitudes_that_vanilla_diffusers_loads_exactly(tmp_path, base_model):
    """lora.method=dora trains magnitude vectors; the diffusers file carries them and a vanilla pipeline loaded from
    it predicts exactly what privtune's trained UNet predicts."""
    from diffusers import StableDiffusionPipeline

    from privtune.models.lora import load_lora
    from .conftest import load_tiny

    run = tmp_path / "run"
    assert main(train_args(run, f"model.base={base_model}", "lora.method=dora", "lora.targets=attn", steps=3)) == 0
    saved = load_file(str(run / "lora" / LORA_FILE))
    magnitudes = [k for k in saved if "lora_magnitude_vector" in k]
    assert magnitudes and len(magnitudes) * 2 == sum("lora_A" in k or "lora_B" in k for k in saved)
    pipe = StableDiffusionPipeline.from_pretrained(base_model, use_safetensors=True, safety_checker=None)
    pipe.load_lora_weights(str(run / "lora"))
    comps = load_tiny(base_model)
    load_lora(comps, run / "lora")
    x = torch.randn(2, comps.unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    t, cond = torch.tensor([50, 700]), torch.randn(2, 32, comps.unet.config.cross_attention_dim)
    with torch.no_grad():
        ours = comps.unet(x, t, encoder_hidden_states=cond).sample
        theirs = pipe.unet(x, t, encoder_hidden_states=cond).sample
        base = StableDiffusionPipeline.from_pretrained(base_model, use_safetensors=True, safety_checker=None).unet(
            x, t, encoder_hidden_states=cond).sample
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ours, base, atol=1e-4)  # the DoRA adapter changes the model
