"""Property inference (confusion-corrected proportion estimate) and the PriSampler defense (Hu & Pang, arXiv 2306.05208)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from privtune.errors import ConfigError, DataError
from privtune.eval import property_inference as pi

from .conftest import load_tiny

SPEC = pi.PropertySpec()


def _synthetic_labels(p: float, tpr: float, fpr: float, n: int, rng) -> np.ndarray:
    truth = rng.random(n) < p
    return np.where(truth, rng.random(n) < tpr, rng.random(n) < fpr)


def test_correction_recovers_p_and_raw_estimate_is_biased():
    rng = np.random.default_rng(0)
    tpr, fpr = 0.85, 0.15
    cal = pi.Calibration(rng.random(20000) < tpr, rng.random(20000) < fpr)
    for p in (0.2, 0.5, 0.8):
        est = pi.estimate(_synthetic_labels(p, tpr, fpr, 20000, rng), cal, true_proportion=p, bootstrap=500)
        assert est["error_p_corr"] < 0.02, est
        assert est["p_corr_ci"][0] <= p <= est["p_corr_ci"][1]
        if p != 0.5:  # the raw estimate is pulled toward 0.5 by (1 - TPR) and FPR: 0.2 -> 0.29, 0.8 -> 0.71
            assert est["error_p_hat"] > 0.07, est


def test_shadow_calibration_removes_a_compressing_bias():
    """A model that pulls its marginal halfway to 0.55 (p_corr = 0.55 + 0.5 (p - 0.55)): two shadows undo it."""
    def biased(p):
        return 0.55 + 0.5 * (p - 0.55)

    assert pi.shadow_calibrated(biased(0.2), [(biased(0.5), 0.5), (biased(0.8), 0.8)]) == pytest.approx(0.2)
    assert pi.shadow_calibrated(0.1, [(biased(0.5), 0.5), (biased(0.8), 0.8)]) == 0.0  # -0.35, clipped
    with pytest.raises(DataError, match="two shadow models"):
        pi.shadow_calibrated(0.3, [(0.4, 0.5)])


def test_correction_is_clipped_and_needs_a_useful_classifier():
    assert pi.corrected(0.01, tpr=0.9, fpr=0.1) == 0.0
    assert pi.corrected(0.99, tpr=0.9, fpr=0.1) == 1.0
    with pytest.raises(DataError, match="does not separate"):
        pi.corrected(0.5, tpr=0.3, fpr=0.3)
    with pytest.raises(DataError, match="no generations"):
        pi.estimate(np.array([], bool), pi.Calibration(np.ones(3, bool), np.zeros(3, bool)))


def test_training_folder_has_the_proportion_and_no_property_clause(tmp_path):
    rows = pi.portraits_rows(pi.TRAINING_SUBSET)
    chosen = pi.choose_rows(rows, SPEC, 0.25, 40, seed=3)
    assert pi.has_property(chosen, SPEC).sum() == 10
    again = pi.choose_rows(rows, SPEC, 0.25, 40, seed=4, exclude_ids=chosen["id"])
    assert not set(again["id"]) & set(chosen["id"])
    folder = pi.write_property_folder(chosen, tmp_path / "data", SPEC)
    lines = [json.loads(x) for x in (folder / "metadata.jsonl").read_text().splitlines()]
    assert len(lines) == 40 and all((folder / x["file_name"]).is_file() for x in lines)
    assert not any("glasses" in x["caption"] for x in lines)
    assert all(x["caption"].startswith("pixel art portrait, ") and x["caption"].endswith(" background") for x in lines)
    assert json.loads((folder / "property.json").read_text())["proportion"] == 0.25
    assert pi.strip_clause("micah portrait, black long hair, brown skin, glasses, blue shirt, pink background", "hair_color") == \
        "micah portrait, long hair, brown skin, glasses, blue shirt, pink background"


def test_estimate_tracks_p_with_the_shipped_classifier():
    """A controlled generator that reproduces its training marginal (real dp_pool renders at proportion p), read by
    the shipped classifier calibrated on the disjoint pool renders: p_hat rises with p, p_corr lands near p."""
    rows = pi.portraits_rows(pi.TRAINING_SUBSET)
    cal = pi.calibrate(SPEC)
    assert cal.tpr > 0.9 and cal.fpr < 0.1
    with pytest.raises(DataError, match="disjoint"):
        pi.calibrate(SPEC, rows=rows.iloc[:20], exclude_ids=rows["id"].iloc[:5])
    hats, corrs = [], []
    for i, p in enumerate((0.2, 0.5, 0.8)):
        generated = pi.decode_images(pi.choose_rows(rows, SPEC, p, 200, seed=i))
        est = pi.estimate(pi.classify(generated, SPEC), cal, true_proportion=p)
        hats.append(est["p_hat"])
        corrs.append(est["p_corr"])
        assert est["error_p_corr"] < 0.06, est
    assert hats[0] < hats[1] < hats[2]
    assert corrs[0] < corrs[1] < corrs[2]


def _two_adapter_pipeline(base_model):
    from privtune.eval.stage import pipeline_for
    from privtune.models.lora import add_lora, lora_config, use_adapter

    comps = load_tiny(base_model)
    gen = torch.Generator().manual_seed(0)
    for name in (pi.TARGET_ADAPTER, pi.AUX_ADAPTER):
        for p in add_lora(comps.unet, lora_config(4, 4, 0.0, "attn"), name):
            p.requires_grad_(False)
            p.data.add_(torch.randn(p.shape, generator=gen) * 0.3)
    use_adapter(comps.unet, pi.TARGET_ADAPTER)
    return pipeline_for(comps, comps.unet)


def test_prisampler_lam0_is_the_target_sampler_bit_for_bit(base_model):
    from privtune.models import recognition
    from privtune.models.lora import active_adapter, use_adapter

    pipe = _two_adapter_pipeline(base_model)
    prompts = ["pixel art portrait, black short hair, light skin, red shirt, blue background"] * 2
    kw = dict(steps=4, guidance=3.0, seed=1)
    plain = recognition.generate(pipe, prompts, **kw)
    assert np.array_equal(pi.generate(pipe, prompts, lam=0.0, **kw), plain)
    half = pi.generate(pipe, prompts, lam=0.5, **kw)
    use_adapter(pipe.unet, pi.AUX_ADAPTER)
    aux_only = recognition.generate(pipe, prompts, **kw)
    use_adapter(pipe.unet, pi.TARGET_ADAPTER)
    assert np.array_equal(pi.generate(pipe, prompts, lam=1.0, **kw), aux_only)
    assert not np.array_equal(half, plain) and not np.array_equal(half, aux_only) and not np.array_equal(plain, aux_only)
    # one forward under the mix is the convex combination of the two adapters' predictions; restored afterwards
    cfg = pipe.unet.config
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    t, c = torch.tensor([500, 500]), torch.randn(2, pipe.tokenizer.model_max_length, cfg.cross_attention_dim)
    with torch.no_grad():
        eps_t = pipe.unet(x, t, encoder_hidden_states=c).sample
        use_adapter(pipe.unet, pi.AUX_ADAPTER)
        eps_a = pipe.unet(x, t, encoder_hidden_states=c).sample
        use_adapter(pipe.unet, pi.TARGET_ADAPTER)
        with pi.prisampler(pipe.unet, 0.25):
            mixed = pipe.unet(x, t, encoder_hidden_states=c, return_dict=False)[0]
    torch.testing.assert_close(mixed, 0.75 * eps_t + 0.25 * eps_a)
    assert "forward" not in vars(pipe.unet) and active_adapter(pipe.unet) == pi.TARGET_ADAPTER


class _EmpiricalDenoiser:
    """The exact ε-prediction of a model that learned the empirical distribution of `images` (pixel space)."""

    def __init__(self, images: torch.Tensor, alphas_cumprod: torch.Tensor):
        self.x = images.flatten(1)
        self.ab = alphas_cumprod

    def __call__(self, x, t, cond):
        ab = self.ab[t[0]]  # one timestep per batch (the DDIM loop below)
        flat = x.flatten(1)
        logits = -torch.cdist(flat, ab.sqrt() * self.x) ** 2 / (2 * (1 - ab))
        x0 = torch.softmax(logits, dim=1) @ self.x
        return ((flat - ab.sqrt() * x0) / (1 - ab).sqrt()).view_as(x)


def _ddim(predictor, n: int, ab: torch.Tensor, steps: int = 40, seed: int = 0) -> np.ndarray:
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ts = torch.linspace(len(ab) - 1, 0, steps).long()
    for i, t in enumerate(ts):
        tt = t.repeat(n)
        eps = predictor(x, tt, None)
        x0 = (x - (1 - ab[t]).sqrt() * eps) / ab[t].sqrt()
        ab_prev = ab[ts[i + 1]] if i + 1 < steps else torch.tensor(1.0, dtype=torch.float64)
        x = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_prisampler_moves_the_estimate_toward_the_owner_target():
    """Target and auxiliary denoisers know disjoint renders at p = 0.9 and p* = 0.1; mixing their predictions with
    growing lam walks the adversary's estimate from p to p*."""
    from privtune.models.attributes import to_tensor

    rows = pi.portraits_rows(pi.TRAINING_SUBSET)
    target_rows = pi.choose_rows(rows, SPEC, 0.9, 40, seed=0)
    aux_rows = pi.choose_rows(rows, SPEC, 0.1, 40, seed=1, exclude_ids=target_rows["id"])
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    ab = torch.cumprod(1 - betas, 0)
    target, aux = (_EmpiricalDenoiser(to_tensor(pi.decode_images(r), 32).double() * 2 - 1, ab) for r in (target_rows, aux_rows))
    cal = pi.Calibration(np.ones(100, bool), np.zeros(100, bool))  # a perfect reader: p_corr = p_hat
    hats = [pi.estimate(pi.classify(_ddim(pi.MixedPredictor(target, aux, lam), 60, ab), SPEC), cal)["p_hat"]
            for lam in (0.0, 0.5, 1.0)]
    assert hats[0] > 0.75 and hats[2] < 0.25, hats
    assert hats[0] > hats[1] > hats[2], hats


def test_bad_options_are_clear_errors(tmp_path):
    for lam in (-0.1, 1.5):
        with pytest.raises(ConfigError, match=r"sampling.prisampler.lam must be in \[0, 1\]"):
            pi.PriSamplerOptions(lam=lam)
    with pytest.raises(ConfigError, match="target_proportion must be null or a proportion"):
        pi.PriSamplerOptions(lam=0.5, aux=str(tmp_path), target_proportion=1.2)
    with pytest.raises(ConfigError, match="aux must be the auxiliary run's lora/ folder"):
        pi.PriSamplerOptions(lam=0.5)
    with pytest.raises(ConfigError, match="is not a folder"):
        pi.check_prisampler(pi.PriSamplerOptions(lam=0.5, aux=str(tmp_path / "missing")))
    pi.check_prisampler(pi.PriSamplerOptions(lam=0.5, aux=str(tmp_path)))
    pi.check_prisampler(pi.PriSamplerOptions())  # off by default
    rows = pi.portraits_rows(pi.TRAINING_SUBSET)
    with pytest.raises(ConfigError, match="proportion must be in"):
        pi.choose_rows(rows, SPEC, 1.5, 10)
    with pytest.raises(DataError, match="only"):
        pi.choose_rows(rows, SPEC, 1.0, 3000)
    slots = {"style": ["a"], "eyewear": ["glasses", "no glasses", "sunglasses"]}
    with pytest.raises(ConfigError, match="not a portraits caption slot"):
        pi.PropertySpec(slot="hat").check(slots)
    with pytest.raises(ConfigError, match="not values of slot"):
        pi.PropertySpec(positive=("monocle",)).check(slots)
    with pytest.raises(ConfigError, match="leave at least one negative"):
        pi.PropertySpec(positive=("glasses", "no glasses", "sunglasses")).check(slots)
    with pytest.raises(ConfigError, match="not a portraits column"):
        pi.has_property(rows, pi.PropertySpec(slot="hat"))


def test_report_and_card_lines():
    cal = pi.Calibration(np.array([True] * 9 + [False]), np.array([True] + [False] * 9))
    est = pi.estimate(np.array([True] * 7 + [False] * 3), cal, true_proportion=0.8, bootstrap=200)
    result = pi.PropertyInferenceResult(SPEC, est, pi.PriSamplerOptions(lam=0.5, aux=".", target_proportion=0.5),
                                        {"style_accuracy": 0.9, "other_slots_accuracy": 0.8, "frechet_distance": 3.0})
    text = "\n".join(pi.markdown_lines(result))
    assert "p_corr" in text and "0.750" in text and "lam = 0.5" in text and "style accuracy 0.900" in text
    line = pi.card_line(result)
    assert "0.75" in line and "within 0.05 of the true share" in line and "PriSampler lam=0.5" in line
    assert "0.80" not in line and "0.8 " not in line  # the card never states the training data's true share
    assert pi.error_band(0.15) == "within 0.2 of the true share" and pi.error_band(0.3).startswith("more than 0.2")


@pytest.mark.slow  # reason: two real tiny-SD LoRA trainings (1000 steps) plus 2 x 128 generations, ~10 min on one core
def test_real_targets_p_hat_tracks_p(tmp_path, base_model):
    """The benchmark's setting (benchmarks/README.md, issue 19: p 0.2 -> 0.34, 0.8 -> 0.65): the estimate orders them."""
    from privtune import train as train_mod

    rows = pi.portraits_rows(pi.TRAINING_SUBSET)
    cal = pi.calibrate(SPEC)
    prompts = pi.portraits_rows(pi.CALIBRATION_SUBSET).sample(n=128, random_state=0).reset_index(drop=True)
    used, hats = [], []
    for p in (0.2, 0.8):
        chosen = pi.choose_rows(rows, SPEC, p, 256, seed=int(p * 10), exclude_ids=used)
        used += chosen["id"].tolist()
        folder = pi.write_property_folder(chosen, tmp_path / f"data{p}", SPEC)
        run = tmp_path / f"run{p}"
        argv = ["recipe=lora", f"output_dir={run}", f"model.base={base_model}", f"data.source={folder}", "data.subset=null",
                "data.members=256", "data.nonmembers=0", "train.max_steps=1000", "train.validation_every=0",
                "train.checkpoint_every=0", "eval.enabled=false"]
        assert train_mod.main(argv) == 0
        pipe = pi.load_pipeline(base_model, run / "lora")
        hats.append(pi.property_inference(pipe, prompts, SPEC, cal, true_proportion=p).estimate["p_corr"])
    assert hats[1] - hats[0] > 0.15, hats


def test_sampling_prisampler_option_in_a_run(tmp_path, base_model):
    """`sampling.prisampler` mixes the auxiliary LoRA into the run's sampling (lam = 1 is the auxiliary model alone),
    a missing auxiliary folder is refused before the run folder exists, and the export never carries the aux adapter."""
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    from privtune import train as train_mod
    from privtune.eval.stage import pipeline_for
    from privtune.memorization.sampling import apply_sampling_options
    from privtune.models import recognition
    from privtune.models.lora import load_lora

    from .conftest import train_args

    aux = tmp_path / "aux"
    assert train_mod.main(train_args(aux, f"model.base={base_model}", "optim.lr=0.05", steps=2)) == 0
    bad = tmp_path / "bad"
    assert train_mod.main(train_args(bad, f"model.base={base_model}", "sampling.prisampler.lam=0.5",
                                     f"sampling.prisampler.aux={tmp_path / 'missing'}", steps=2)) == 2
    assert not bad.exists()
    run = tmp_path / "run"
    assert train_mod.main(train_args(run, f"model.base={base_model}", "sampling.prisampler.lam=0.5",
                                     f"sampling.prisampler.aux={aux / 'lora'}", "train.validation_every=2", "seed=1", steps=2)) == 0
    assert not any("prisampler" in k for k in load_file(run / "lora" / "pytorch_lora_weights.safetensors"))

    prompts = ["pixel art portrait, black short hair, light skin, red shirt, blue background"] * 2
    kw = dict(steps=3, guidance=3.0, seed=0)

    def sampled(lora, lam):
        comps = load_tiny(base_model)
        load_lora(comps, lora)
        cfg = OmegaConf.create({"wen_prompt_optimization": False, "ren_mitigation": False,
                                "prisampler": {"lam": lam, "aux": str(aux / "lora"), "target_proportion": 0.5}})
        return recognition.generate(apply_sampling_options(pipeline_for(comps, comps.unet), cfg), prompts, **kw)

    assert np.array_equal(sampled(run / "lora", 1.0), sampled(aux / "lora", 0.0))
    assert not np.array_equal(sampled(run / "lora", 0.5), sampled(run / "lora", 0.0))
