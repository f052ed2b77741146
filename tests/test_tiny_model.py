"""The shipped tiny base model: standard diffusers layout, offline loading, recognisable generations; build smoke test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from privtune.models import recognition, tiny

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "privtune" / "assets" / "tiny-sd"
DATA = ROOT / "privtune" / "assets" / "emoji" / "emoji.parquet"
N_QUERIES = 64
MIN_TOP10_X_CHANCE = 5.0  # measured ~12-16x on the shipped model (BUILD.md); margin for platform drift


def _load_pipeline(path: Path):
    """Load a pipeline folder offline, the way privtune's trainers do."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(path), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    """The shipped pipeline; one thread, which is much faster than two on a shared 2-core CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield _load_pipeline(MODEL)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base_rows():
    import datasets

    ds = datasets.Dataset.from_parquet(str(DATA))
    base = ds.filter(lambda s: s == "base", input_columns="subset")
    return recognition.to_uint8(list(base["image"])), list(base["caption"])


def test_standard_layout_safetensors_only():
    index = json.loads((MODEL / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    assert index["requires_safety_checker"] is False
    for part in ("unet", "vae", "text_encoder"):
        assert list((MODEL / part).glob("*.safetensors")), part
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (MODEL / "tokenizer" / name).is_file()
    assert (MODEL / "scheduler" / "scheduler_config.json").is_file()
    assert (MODEL / "BUILD.md").is_file()
    files = [f for f in MODEL.rglob("*") if f.is_file()]
    assert not [f for f in files if f.suffix in {".bin", ".pt", ".pth", ".ckpt"}]
    assert sum(f.stat().st_size for f in files) < 20 * 2**20


def test_components_match_tiny_config(pipe):
    from diffusers import DDIMScheduler, DDPMScheduler

    assert pipe.unet.config.sample_size == tiny.TINY.latent_size
    assert tuple(pipe.unet.config.block_out_channels) == tiny.TINY.unet_channels
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.vae_scale_factor * tiny.TINY.latent_size == tiny.TINY.image_size
    assert pipe.tokenizer.model_max_length == pipe.text_encoder.config.max_position_embeddings
    assert pipe.tokenizer.pad_token == tiny.EOS and pipe.tokenizer.bos_token == tiny.BOS
    assert isinstance(pipe.scheduler, DDIMScheduler)
    ddpm = DDPMScheduler.from_config(pipe.scheduler.config)
    assert ddpm.config.beta_schedule == "scaled_linear" and ddpm.config.num_train_timesteps == 1000
    assert ddpm.config.prediction_type == "epsilon"
    assert 0.1 < pipe.vae.config.scaling_factor < 10


def test_tokenizer_knows_every_caption_word(pipe, base_rows):
    import datasets

    captions = list(datasets.Dataset.from_parquet(str(DATA))["caption"])
    backend = pipe.tokenizer.backend_tokenizer
    for caption in captions[::7]:
        words = backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(caption))
        assert len(pipe.tokenizer.tokenize(caption)) == len(words), caption
    assert pipe.tokenizer.tokenize("qzxv") and pipe.tokenizer.unk_token_id not in pipe.tokenizer("qzxv").input_ids[1:-1]


def test_generates_32px_image(pipe):
    out = pipe("red apple", num_inference_steps=5, guidance_scale=recognition.DEFAULT_GUIDANCE,
               height=32, width=32, generator=torch.Generator().manual_seed(0))
    assert out.images[0].size == (32, 32)


def test_generations_are_recognisable(pipe, base_rows):
    images, captions = base_rows
    query = recognition.sample_indices(len(captions), N_QUERIES, seed=1)
    scores, generated = recognition.evaluate(pipe, images, captions, query, seed=1)
    assert generated.shape == (N_QUERIES, 32, 32, 3)
    assert scores["top10_x_chance"] > MIN_TOP10_X_CHANCE, scores


def test_build_script_smoke(tmp_path):
    out = tmp_path / "tiny-sd"
    cmd = [sys.executable, str(ROOT / "scripts" / "build_tiny_sd.py"), "--out", str(out), "--vae-steps", "2",
           "--unet-steps", "2", "--limit", "64", "--vae-batch", "8", "--unet-batch", "8", "--eval-captions", "4",
           "--eval-steps", "2", "--eval-guidance", "3", "5", "--log-every", "1"]
    subprocess.run(cmd, check=True, cwd=tmp_path, capture_output=True, timeout=300)
    summary = json.loads((out / "build_summary.json").read_text())
    assert summary["recognition"]["n_queries"] == 4
    assert set(summary["recognition"]["guidance_sweep_first64"]) == {"3.0", "5.0"}
    assert (out / "BUILD.md").is_file() and (out / "contact_sheet.png").is_file()
    assert not list(out.rglob("*.bin"))
    pipe = _load_pipeline(out)
    image = pipe("red apple", num_inference_steps=2, height=32, width=32, output_type="np").images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()
