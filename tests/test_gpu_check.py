"""benchmarks/gpu_check.py: its --dry-run (tiny sizes, CPU) writes the JSON and Markdown with every row either measured or
skipped with a reason, and without --dry-run it refuses to run on a machine without CUDA."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from .conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def _run(*args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": "", "HF_HUB_OFFLINE": "1",
           "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def test_dry_run_writes_every_row(tmp_path):
    """The whole dry run (about 45 s on one CPU core, so not marked slow)."""
    out = _run("--dry-run", "--out", str(tmp_path))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["mode"] == "dry-run"
    env = report["environment"]
    for key in ("torch", "diffusers", "peft", "transformers", "accelerate", "opacus", "bitsandbytes", "device", "cuda_version"):
        assert key in env, key
    cuda = env["device_type"] == "cuda"

    rows = {r["name"]: r for r in report["train_rows"]}
    for name in ("lora fp32", "lora bf16", "lora fp16 +GradScaler", "lora fp32 +gc", "lora bf16 +gc", "lora bf16 +adam8bit",
                 "lora bf16 +gc +adam8bit", "dpsgd fp32", "dpsgd bf16", "dpsgd bf16 K=8"):
        assert name in rows, name
    for name, r in rows.items():
        if r["status"] == "ok":
            for key in ("ms_per_step", "img_per_s", "peak_mib", "step_mib", "loss"):
                assert _number(r[key]), (name, key, r[key])
            assert r["ms_per_step"] > 0 and r["peak_mib"] > 0
            ev = r["evidence"]
            assert ev["text_states"] == [77, 768 // 8] and ev["latents"] == [4, 8, 8], ev  # 77-token states, 64 px -> 8x8
            assert ev["gradient_checkpointing"] == r["gradient_checkpointing"]
            assert ev["frozen_dtype"] == {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}[r["mixed_precision"]]
        else:
            assert r["status"] == "skipped" and r["reason"].startswith("skipped: "), (name, r)
    if not cuda:  # what a CPU cannot run is skipped, not failed; everything else ran
        for name in ("lora fp16 +GradScaler", "lora bf16 +adam8bit", "lora bf16 +gc +adam8bit"):
            assert rows[name]["reason"].startswith("skipped: needs CUDA"), rows[name]
        needs_cuda = {"lora fp16 +GradScaler", "lora bf16 +adam8bit", "lora bf16 +gc +adam8bit"}
        assert {n for n, r in rows.items() if r["status"] == "ok"} == set(rows) - needs_cuda
    k8 = rows["dpsgd bf16 K=8"]["evidence"]
    assert k8["noise_multiplicity"] == 8 and k8["unet_rows_per_step"] == 8 * report["settings"]["batch_size"]

    ratios = {r["row"]: r for r in report["ratios"]}
    for name in ("dpsgd fp32", "dpsgd bf16", "dpsgd bf16 K=8"):
        assert ratios[name]["status"] == "ok" and _number(ratios[name]["time_ratio"]), ratios[name]
        assert _number(ratios[name]["peak_memory_ratio"])
    assert ratios["dpsgd fp32"]["reference"] == "lora fp32" and ratios["dpsgd bf16"]["reference"] == "lora bf16"

    attacks = {a["name"]: a for a in report["attacks"]}
    assert set(attacks) == {"loss", "secmi", "pia", "unet forward"}
    for name, a in attacks.items():
        assert a["status"] == "ok", a
        assert _number(a["samples_per_s"]) and a["samples_per_s"] > 0 and a["nfe_per_sample"] > 0
    assert attacks["secmi"]["inputs"] == "latents [4, 8, 8], text states [77, 96]"

    table = (tmp_path / "gpu_check.md").read_text()
    assert "| check | variant | time | throughput | peak MiB | step MiB | vs reference | status |" in table
    for name in (*rows, *attacks):
        assert f"| {name} |" in table, name


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_dry_run_needs_cuda(tmp_path):
    out = _run("--out", str(tmp_path), timeout=120)
    assert out.returncode == 2
    assert "needs an NVIDIA GPU" in out.stderr and "--dry-run" in out.stderr
    assert not (tmp_path / "gpu_check.json").exists()


def test_help_and_shell_syntax():
    out = _run("--help", timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--dry-run" in out.stdout and "bash benchmarks/gpu_check.sh" in out.stdout
    assert subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu_check.sh")]).returncode == 0
