"""Utility for real checkpoints from a local CLIP folder: CLIP score and CLIP-space FD / KID, never a download."""

from __future__ import annotations

import math

import numpy as np

import pytest

from privtune.errors import ConfigError
from privtune.eval.clip_metrics import CLIP_SKIPPED, INCEPTION_SKIPPED, check_clip_folder, clip_metrics

from .conftest import load_tiny, train_args


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, base_model):
    """A random-weight CLIP (tiny widths) with a CLIP tokenizer and image processor, saved as a local folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(f"{base_model}/tokenizer")
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=tok.model_max_length,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                        image_size=32, patch_size=8), projection_dim=16)
    out = tmp_path_factory.mktemp("clip")
    CLIPModel(cfg).save_pretrained(out, safe_serialization=True)
    image = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image, tokenizer=tok).save_pretrained(out)
    return out


def records(n: int):
    from privtune.data.sources import load_source
    from privtune.config import load_config

    return load_source(load_config("lora").data).records[:n]


def test_clip_metrics_from_a_local_folder(clip_dir, base_model):
    from privtune.eval.stage import pipeline_for

    comps = load_tiny(base_model)
    pipe = pipeline_for(comps, comps.unet)
    out = clip_metrics(pipe, records(8), n=6, steps=2, guidance=1.0, seed=0, clip_model=str(clip_dir))
    assert math.isfinite(out["clip_score"]) and out["clip_score"] >= 0
    assert out["clip_frechet_distance"] >= 0 and math.isfinite(out["clip_kid"])
    assert out["n_generations"] == 6 and out["n_reference"] == 8
    assert CLIP_SKIPPED not in out.get("skipped", [])


def test_without_clip_the_report_says_what_was_skipped(base_model):
    out = clip_metrics(None, records(2), n=2, steps=2, guidance=1.0, seed=0, clip_model=None)
    assert CLIP_SKIPPED in out["skipped"] and "clip_score" not in out
    assert INCEPTION_SKIPPED in out["skipped"]  # torch-fidelity is not a dependency


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "nowhere", "not a local folder"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "no .safetensors"),
    (lambda p: "openai/clip-vit-large-patch14", "never downloads"),
])
def test_bad_clip_folder_is_refused_before_training(tmp_path, base_model, capsys, make, message):
    from privtune.train import main

    target = make(tmp_path)
    with pytest.raises(ConfigError, match=message):
        check_clip_folder(target)
    run = tmp_path / "run"
    assert main(train_args(run, f"model.base={base_model}", "eval.enabled=true", f"eval.clip_model={target}")) == 2
    assert message in capsys.readouterr().err and not (run / "config.yaml").exists()


def test_black_box_attacks_embed_with_a_local_clip_folder_on_a_real_checkpoint_path(clip_dir, base_model):
    """A real checkpoint (no embedded benchmark): the generation API's encoder is the named local CLIP folder, and
    pipeline generations and img2img variations come back as images it can embed."""
    import torch

    from privtune.eval.generation import image_encoder, pipeline_api
    from privtune.eval.primitives import UNetPredictor
    from privtune.eval.stage import pipeline_for

    comps = load_tiny(base_model)
    embed, what = image_encoder(None, str(clip_dir))
    assert "CLIP" in what
    api = pipeline_api(pipeline_for(comps, comps.unet), comps, UNetPredictor(comps.unet), embed, what, steps=2,
                       guidance=2.0, device="cpu")
    images = api.images(["a portrait", "a portrait"], [1, 2])
    assert images.shape[:2] == (2, 3) and images.min() >= -1 and images.max() <= 1
    assert not torch.equal(images[0], images[1])  # two seeds, two images
    varied = api.variations(images, ["a portrait"] * 2, t=20, stride=10, seeds=[3, 3])
    assert varied.shape == images.shape
    feats = api.features(torch.cat([images, varied]))
    assert feats.shape == (4, 16) and np.allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-4)
    assert api.counts == {"images": 2, "variations": 2, "passes": 2 * 2 * 2 + 2 * 2}


def test_black_box_attacks_without_an_offline_encoder_name_the_missing_weights():
    from privtune.eval.attacks import ATTACKS, AttackTarget, missing_requirements
    from privtune.eval.generation import image_encoder

    import torch

    with pytest.raises(ConfigError, match="eval.clip_model"):
        image_encoder(None, None)
    gray = AttackTarget(lambda x, t, c: x, torch.linspace(0.99, 0.01, 10))
    assert any("eval.clip_model" in m for m in missing_requirements(ATTACKS.get("pang_wang"), gray))
