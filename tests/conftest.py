"""Shared fixtures: the embedded tiny model, a fresh Accelerate state per run, small image folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `-n 2`: the workers share the cores, one thread each (subprocesses too)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps process-global state; reset it so in-process runs do not leak settings."""
    yield
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def make_image_folder(root: Path, n: int = 12, size: int = 32, captions=None, seed: int = 0) -> Path:
    """A diffusers-style image folder: n PNGs of random blocks plus metadata.jsonl."""
    import numpy as np

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        pixels = (rng.random((4, 4, 3)) * 255).astype("uint8")
        Image.fromarray(pixels).resize((size, size), Image.NEAREST).save(root / f"img{i:03d}.png")
        caption = captions[i] if captions is not None else f"a picture number {i}"
        lines.append(json.dumps({"file_name": f"img{i:03d}.png", "caption": caption}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def train_args(run_dir: Path, *extra: str, steps: int = 6) -> list[str]:
    """Arguments for a fast in-process training run on the embedded defaults."""
    return [
        "recipe=lora", f"output_dir={run_dir}", f"train.max_steps={steps}", "train.batch_size=4",
        "data.members=8", "data.nonmembers=8", "lora.rank=4", "lora.alpha=4",
        "train.validation_every=0", "train.checkpoint_every=0", "train.log_every=1", "eval.enabled=false", *extra,
    ]


@pytest.fixture(scope="session")
def base_model(tmp_path_factory) -> str:
    """The shipped tiny SD; a randomly initialised one of the same architecture if it is not built yet."""
    from privtune.models.loading import EMBEDDED_MODEL

    if (EMBEDDED_MODEL / "model_index.json").is_file():
        return str(EMBEDDED_MODEL)
    import datasets
    from diffusers import StableDiffusionPipeline

    from privtune.data.sources import EMBEDDED_DATA
    from privtune.models import tiny

    out = tmp_path_factory.mktemp("tiny-sd")
    tok = tiny.build_tokenizer(datasets.Dataset.from_parquet(str(EMBEDDED_DATA))["caption"])
    pipe = StableDiffusionPipeline(
        vae=tiny.build_vae(), text_encoder=tiny.build_text_encoder(len(tok), tok.bos_token_id, tok.eos_token_id),
        tokenizer=tok, unet=tiny.build_unet(), scheduler=tiny.build_sample_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out)
    return str(out)


SETUP_STAGES = ("validate_config", "setup_accelerator", "check_run_dir", "setup_data", "setup_model", "setup_optimizer", "prepare")


def prepare_trainer(trainer):
    """Run a trainer's setup stages (no training), for tests that drive single steps."""
    for stage in SETUP_STAGES:
        getattr(trainer, stage)()
    return trainer


def launch_two_processes(module: str, args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    """Run `python -m module args` as two real CPU processes (a gloo group) under `accelerate launch`.

    accelerate's `launch --cpu --num_processes 2` starts ONE process (its multi-CPU path needs mpirun);
    `--multi_gpu` with ACCELERATE_USE_CPU=true goes through torchrun and gives two CPU processes.
    """
    import socket

    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:  # a free rendezvous port: launches of parallel test workers must not share one
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), "-m", module, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def load_tiny(base_model: str):
    """Fresh components of the base model with the UNet in eval mode, for tests that only run forwards."""
    from omegaconf import OmegaConf

    from privtune.models.loading import load_components

    comps = load_components(OmegaConf.create({"base": base_model, "revision": None, "variant": None,
                                              "allow_unsafe_weights": False}))
    comps.unet.eval()
    return comps


def encode_prompts(comps, prompts: list[str]) -> torch.Tensor:
    """The UNet condition of `prompts` (privtune.models.conditioning: SD's text states, SDXL's packed ones)."""
    from privtune.models.conditioning import encode, tokenize

    with torch.no_grad():
        return encode(comps, tokenize(comps, list(prompts)))
