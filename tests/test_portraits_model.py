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


SLOTS = ("style", "hair_color", "hair_length", "skin_tone", "eyewear", "shirt_color", "background_color")


@pytest.fixture(scope="module")
def scores(generations):
    from privtune.eval.portraits import portrait_utility

    images, captions, real = generations
    return portrait_utility(images, captions, real)


def test_base_vae_reconstructs_the_private_style():
    """The frozen VAE is the codec every LoRA works through: if it cannot reproduce pixel art, no LoRA can learn it
    (the 4-channel VAE of the first base read its reconstructions back as pixel art 0.63 of the time)."""
    import datasets
    import numpy as np
    from diffusers import AutoencoderKL
    from PIL import Image

    from privtune.models.attributes import load_classifier, to_tensor

    bench = EMBEDDED["portraits"]
    vae = AutoencoderKL.from_pretrained(str(bench.model), subfolder="vae").eval()
    pool = datasets.Dataset.from_parquet(str(bench.data)).filter(lambda s: s == "pool", input_columns="subset")
    pool = pool.select(range(128))
    x = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
                     for im in pool["image"]])
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    images = ((rec.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().astype(np.uint8)
    model, config = load_classifier()
    pred, _ = model.predict(to_tensor([Image.fromarray(a) for a in images], config["resolution"]))
    style = config["slots"]["style"]
    assert np.mean([style[i] == "pixel art" for i in pred["style"]]) >= 0.8


def floor(chance: float) -> float:
    return min(2 * chance, chance + (1 - chance) / 2)


def test_base_model_draws_held_out_combinations(scores):
    for slot in SLOTS:
        acc, chance = scores["slot_accuracy"][slot], scores["slot_chance"][slot]
        assert acc >= floor(chance), (slot, acc, chance, scores["slot_accuracy"])
    assert scores["style_accuracy"] <= 0.05  # the private style is not in the base model
