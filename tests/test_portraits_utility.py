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
    from privtune.eval.portraits import frechet_distance, kernel_inception_distance

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
