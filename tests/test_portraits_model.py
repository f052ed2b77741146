"""The embedded portraits base model draws what held-out caption combinations ask for.

`base_heldout` pairs a hair colour with a shirt colour the base never saw together in pre-training
(CLEVR-CoGenT style). Its generations, read by the shipped attribute classifier, must get every slot
well above chance: at least 2x chance, or, where 2x chance is out of reach (a binary slot's chance is
0.5), at least halfway from chance to perfect.
"""

from __future__ import annotations

import pytest
import torch

from privtune.embedded import EMBEDDED


@pytest.fixture(scope="module")
def generations():
    import datasets
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from privtune.models import recognition

    bench = EMBEDDED["portraits"]
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline.from_pretrained(str(bench.model), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    held = datasets.Dataset.from_parquet(str(bench.data)).filter(lambda s: s == "base_heldout", input_columns="subset")
    held = held.select(range(96))
    images = recognition.generate(pipe, list(held["caption"]), steps=25, guidance=3.5, seed=0)
    return images, list(held["caption"]), list(held["image"])


DRAWN = ("style", "hair_color", "hair_length", "skin_tone", "background_color")
NOT_YET = ("eyewear", "shirt_color")  # benchmarks/README.md, "Portraits benchmark": the base misses these


@pytest.fixture(scope="module")
def scores(generations):
    from privtune.eval.portraits import portrait_utility

    images, captions, real = generations
    return portrait_utility(images, captions, real)


def floor(chance: float) -> float:
    return min(2 * chance, chance + (1 - chance) / 2)


def test_base_model_draws_held_out_combinations(scores):
    for slot in DRAWN:
        acc, chance = scores["slot_accuracy"][slot], scores["slot_chance"][slot]
        assert acc >= floor(chance), (slot, acc, chance, scores["slot_accuracy"])
    assert scores["style_accuracy"] <= 0.05  # the private style is not in the base model


@pytest.mark.xfail(strict=True, reason="the shipped base does not compose shirt colour with an unseen hair colour "
                                       "(0.04, below chance) and draws eyewear at 0.67 (floor 0.72): issue 14 is open")
def test_base_model_draws_shirt_and_eyewear_of_held_out_combinations(scores):
    for slot in NOT_YET:
        acc, chance = scores["slot_accuracy"][slot], scores["slot_chance"][slot]
        assert acc >= floor(chance), (slot, acc, chance)
