"""The portraits utility: the shipped attribute classifier reads real renders it never trained on, and
the FD / KID / slot metrics behave (full-rank FD at small n, unbiased KID, style accuracy)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from privtune.embedded import EMBEDDED

PORTRAITS = EMBEDDED["portraits"].data


@pytest.fixture(scope="module")
def rows():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_parquet(str(PORTRAITS))
    return ds


def subset(ds, name, n, seed=0):
    part = ds.filter(lambda s: s == name, input_columns="subset")
    idx = np.random.default_rng(seed).permutation(len(part))[:n]
    return part.select(sorted(idx.tolist()))


def test_classifier_reads_unseen_renders_well_above_chance(rows):
    """Every head on held-out-combination base renders and private-style pool renders (never trained on)."""
    from privtune.models.attributes import load_classifier, to_tensor

    model, config = load_classifier()
    part = subset(rows, "pool", 150)
    held = subset(rows, "base_heldout", 150)
    for ds in (part, held):
        pred, _ = model.predict(to_tensor(list(ds["image"]), config["resolution"]))
        for slot, values in config["slots"].items():
            truth = np.array([values.index(v) for v in ds[slot]])
            acc = float((pred[slot] == truth).mean())
            chance = config["chance"][slot]
            assert acc >= max(0.8, 1.5 * chance), (slot, acc, chance)
    for slot, acc in config["heldout_accuracy"].items():  # the recorded ceiling
        assert acc >= 0.85, (slot, acc)


def test_style_accuracy_separates_the_private_style(rows):
    from privtune.eval.portraits import portrait_utility

    pool, base = subset(rows, "pool", 64, 1), subset(rows, "base_heldout", 64, 1)
    reference = list(subset(rows, "pool", 64, 2)["image"])
    own = portrait_utility(list(pool["image"]), list(pool["caption"]), reference)
    other = portrait_utility(list(base["image"]), list(pool["caption"]), reference)
    assert own["style_accuracy"] >= 0.95 and other["style_accuracy"] <= 0.05
    assert own["all_slots_correct"] >= 0.6
    assert own["frechet_distance"] < other["frechet_distance"] and own["kid"] < other["kid"]


def test_frechet_is_full_rank_at_small_n_and_kid_is_unbiased():
    from privtune.eval.distances import frechet_distance, kernel_inception_distance

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(32, 128)), rng.normal(size=(32, 128))  # n < d: the plain covariance is singular
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = frechet_distance(a, b)
        shifted = frechet_distance(a, b + 1.0)
    assert np.isfinite(same) and shifted > same + 100
    kids = [kernel_inception_distance(rng.normal(size=(24, 16)), rng.normal(size=(24, 16))) for _ in range(200)]
    assert abs(np.mean(kids)) < 3 * np.std(kids) / np.sqrt(len(kids))  # unbiased: centred on 0 for one distribution
    assert kernel_inception_distance(rng.normal(size=(24, 16)), rng.normal(size=(24, 16)) + 1.0) > 0.3


def test_captions_parse_back_to_their_slots(rows):
    from privtune.eval.portraits import parse_caption

    part = subset(rows, "utility", 200)
    for row in part.select_columns(["caption", "style", "hair_color", "hair_length", "skin_tone", "eyewear",
                                    "shirt_color", "background_color"]):
        slots = parse_caption(row.pop("caption"))
        assert slots == row
    assert parse_caption("a red apple") is None


def test_adapters_disabled_gives_the_base_model_back(base_model):
    import torch

    from privtune.models.lora import adapters_disabled, add_lora, lora_config

    from .conftest import load_tiny

    comps = load_tiny(base_model)
    unet = comps.unet
    x = torch.randn(2, unet.config.in_channels, 8, 8)
    t = torch.tensor([10, 500])
    cond = torch.randn(2, comps.tokenizer.model_max_length, unet.config.cross_attention_dim)
    with torch.no_grad():
        base = unet(x, t, cond).sample
        params = add_lora(unet, lora_config(4, 4, 0.0, "attn"))
        for p in params:
            p.data.normal_(0, 0.5)
        adapted = unet(x, t, cond).sample
        with adapters_disabled(unet):
            bypassed = unet(x, t, cond).sample
        again = unet(x, t, cond).sample
    assert not torch.allclose(adapted, base, atol=1e-4)
    torch.testing.assert_close(bypassed, base)
    torch.testing.assert_close(again, adapted)


def test_console_summary_shows_what_the_lora_learned(tmp_path):
    from privtune.eval.report import console_summary

    report = {"summary": {"best_attack": {"name": "pia", "auc": {"value": 1.0, "ci": [1.0, 1.0]}}},
              "utility": {"style_accuracy": 0.9, "slot_accuracy": {"style": 0.9, "hair_color": 0.8, "shirt_color": 0.6},
                          "base_model": {"style_accuracy": 0.0, "slot_accuracy": {"style": 0.0, "hair_color": 0.7,
                                                                                 "shirt_color": 0.5}},
                          "frechet_distance": 12.5, "kid": 0.8, "n_generations": 128, "grid": "generations.png",
                          "vae_round_trip": {"style_accuracy": 0.95, "slot_accuracy": {"style": 0.95, "hair_color": 0.9,
                                                                                       "shirt_color": 0.8}}}}
    lines = console_summary(report, tmp_path)
    assert "pia" in lines[0] and "1.000" in lines[0]
    assert "style accuracy 0.000 (base) -> 0.900 (LoRA)" in lines[1] and "0.600 -> 0.700" in lines[1]
    assert "decoded by the frozen VAE" in lines[2] and "style accuracy 0.950, mean slot accuracy 0.850" in lines[2]
    assert lines[3].endswith("plots/generations.png")


def test_vae_round_trip_keeps_what_the_classifier_reads(rows, base_model):
    """The codec reference reported beside the LoRA: held-out renders encoded and decoded by the frozen VAE."""
    import numpy as np

    from privtune.eval.portraits import portrait_utility
    from privtune.eval.stage import pipeline_for
    from privtune.eval.utility import vae_round_trip

    from .conftest import load_tiny

    comps = load_tiny(base_model)
    pick = subset(rows, "utility", 300)
    pick = pick.filter(lambda s: s == "pixel art", input_columns="style").select(range(32))
    images = list(pick["image"])
    out = vae_round_trip(pipeline_for(comps, comps.unet), images)
    real = np.stack([np.asarray(im.convert("RGB")) for im in images])
    assert out.shape == real.shape and out.dtype == np.uint8
    assert 0 < np.abs(out.astype(float) - real).mean() < 40  # lossy, but an image of the same thing
    scores = portrait_utility(out, list(pick["caption"]), images)
    assert scores["style_accuracy"] >= 0.75
