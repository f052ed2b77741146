"""Inference-time mitigations: Ren et al.'s summary-token mask and BOS re-weighting, Wen et al.'s prompt-embedding
optimisation, and the pipeline wrapper that applies them; plus the attacks through the normal evaluation stage."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from privtune.memorization.attention import entropy, install_probe, partial_entropy
from privtune.memorization.sampling import MitigatedPipeline, apply_sampling_options, prompt_lengths
from privtune.memorization.wen import optimize_prompt_embeds, scaled_target

from .conftest import encode_prompts, load_tiny, train_args

torch.set_num_threads(1)

PROMPTS = ["pixel art portrait, red long hair, light skin, glasses, blue shirt, pink background",
           "micah portrait, black short hair, dark skin, no glasses, green shirt, grey background"]


@pytest.fixture(scope="module")
def comps(base_model):
    return load_tiny(base_model)


encode = encode_prompts


def cfg_batch(comps, seed=0):
    n = len(PROMPTS)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, comps.unet.config.in_channels, 8, 8, generator=g)
    cond, unc = encode(comps, PROMPTS), encode(comps, [""] * n)
    return torch.cat([x, x]), torch.full((2 * n,), 500), torch.cat([unc, cond])


def recorded(comps, bos_scale=1.0, lengths=None):
    saved = dict(comps.unet.attn_processors)
    probe = install_probe(comps.unet)
    probe.bos_scale, probe.mask_lengths, probe.recording = bos_scale, lengths, True
    x, t, c = cfg_batch(comps)
    with torch.no_grad():
        out = comps.unet(x, t, encoder_hidden_states=c).sample
    probs = probe.take()
    comps.unet.set_attn_processor(saved)
    return probs, out


def test_probe_without_mitigation_equals_default_attention(comps):
    x, t, c = cfg_batch(comps)
    with torch.no_grad():
        ref = comps.unet(x, t, encoder_hidden_states=c).sample
    probs, out = recorded(comps)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    layers = sum(name.endswith("attn2.processor") for name in comps.unet.attn_processors)
    assert probs.shape[:2] == (layers, 4)  # every cross-attention layer, 2 CFG halves x 2 prompts
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:2]), rtol=1e-5, atol=1e-5)
    ent = entropy(probs)
    assert (ent > 0).all() and (ent <= np.log(probs.shape[-1]) + 1e-5).all()
    start = torch.tensor([3, 5, 3, 5])
    assert (partial_entropy(probs, start) < ent).all()


def test_summary_mask_and_bos_reweighting(comps):
    lengths = prompt_lengths(comps.tokenizer, PROMPTS)
    assert lengths.tolist() == [len(comps.tokenizer(p).input_ids) for p in PROMPTS]
    masked, _ = recorded(comps, 1.0, lengths)
    n = len(PROMPTS)
    for row in range(2 * n):  # both CFG halves use the conditional prompt's L; positions >= L get exactly 0
        assert (masked[:, row, int(lengths[row % n]):] == 0).all()
        assert (masked[:, row, :int(lengths[row % n])] > 0).all()
    scaled, _ = recorded(comps, 1.25, lengths)
    assert torch.equal(scaled[:, :n], masked[:, :n])  # BOS re-weighting touches the conditional half only
    assert not torch.allclose(scaled[:, n:, 0], masked[:, n:, 0])
    only_bos, _ = recorded(comps, 1.25, None)  # no mask: a batch of any size is all conditional when no lengths are set
    assert not torch.allclose(only_bos[:, :, 0], recorded(comps)[0][:, :, 0])


def test_wen_prompt_optimisation_lowers_magnitude_keeps_bos(comps):
    x = torch.randn(2, comps.unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    cond, unc = encode(comps, PROMPTS), encode(comps, [""])
    unc_before = unc.clone()
    emb, hist = optimize_prompt_embeds(comps.unet, x, 999, cond, unc, target_loss=1e-6, lr=0.05, iters=5)
    assert hist.shape == (6, 2) and (hist[-1] < hist[0]).all()
    torch.testing.assert_close(emb[:, 0], cond[:, 0], rtol=0, atol=0)
    assert not torch.allclose(emb[:, 1:], cond[:, 1:])
    assert torch.equal(unc, unc_before)
    assert all(p.grad is None for p in comps.unet.parameters())
    # early stop: a row at or under the target is never changed
    target = float((hist[0, 0] + hist[0, 1]) / 2) if hist[0, 0] != hist[0, 1] else float(hist[0, 0])
    emb2, hist2 = optimize_prompt_embeds(comps.unet, x, 999, cond, unc, target_loss=target, lr=0.05, iters=5)
    low = int(hist[0].argmin())
    torch.testing.assert_close(emb2[low], cond[low], rtol=0, atol=0)
    assert scaled_target(3.0, (4, 64, 64)) == 3.0 and abs(scaled_target(2.0, (4, 8, 8)) - 0.25) < 1e-12


def sampling_cfg(**kw):
    base = dict(wen_prompt_optimization=False, wen_target_loss=None, wen_lr=0.05, wen_iters=10, ren_mitigation=False,
                ren_bos_scale=1.25, ren_mask_summary=True)
    base.update(kw)
    return OmegaConf.create(base)


def test_pipeline_options(comps):
    from privtune.eval.stage import pipeline_for

    pipe = pipeline_for(comps, comps.unet)
    assert apply_sampling_options(pipe, sampling_cfg()) is pipe

    def run(p):
        return p(PROMPTS, num_inference_steps=4, guidance_scale=3.0, generator=torch.Generator().manual_seed(1), output_type="np").images

    plain = run(pipe)
    before = {k: type(v) for k, v in comps.unet.attn_processors.items()}
    ren = run(apply_sampling_options(pipe, sampling_cfg(ren_mitigation=True)))
    assert {k: type(v) for k, v in comps.unet.attn_processors.items()} == before  # installed for the call only
    assert not np.allclose(ren, plain)
    same = run(apply_sampling_options(pipe, sampling_cfg(wen_prompt_optimization=True, wen_iters=0)))
    np.testing.assert_allclose(same, plain, atol=1e-5)  # same seed -> same x_T; zero iterations -> same image
    wrapped = apply_sampling_options(pipe, sampling_cfg(wen_prompt_optimization=True, wen_target_loss=1e-6, wen_iters=3))
    assert isinstance(wrapped, MitigatedPipeline)
    wen = run(wrapped)
    assert not np.allclose(wen, plain) and (wrapped.last_wen_losses[-1] < wrapped.last_wen_losses[0]).all()


def test_attacks_and_sampling_options_through_the_evaluation_stage(tmp_path, base_model):
    from privtune.train import main

    run = tmp_path / "run"
    attack_params = ("eval.attack_params={wen: {generations: 1}, wen_trajectory: {steps: 4, generations: 1}, "
                     "ren_trajectory: {steps: 4, last: 2}}")
    assert main(train_args(run, f"model.base={base_model}", "eval.enabled=true", "eval.attacks=[wen,wen_trajectory,ren,ren_trajectory]",
                           attack_params, "eval.utility=false", "eval.bootstrap=20",
                           "sampling.ren_mitigation=true", "sampling.wen_prompt_optimization=true", "sampling.wen_iters=2",
                           "captions.p=0.5", "captions.insert_tokens=1", steps=2)) == 0
    report = json.loads((run / "report.json").read_text())
    text = json.dumps(report)
    for name in ("wen", "wen_trajectory", "ren", "ren_trajectory"):
        assert f'"{name}"' in text
    assert "memorization_filter" in text and "insert_tokens" in text and "ren_mitigation" in text
