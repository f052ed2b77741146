"""The benchmark scripts keep working on their shared setup (`benchmarks/common.py`): --help, and the report tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from privtune.eval.report import build_report

from .conftest import REPO
from .eval.test_report import fake_attacks

SCRIPTS = ("attacks", "dedup", "defense_table", "dp_step", "property_inference", "release_table", "side", "sweep_archive", "train_step")


def _run(script: str, *args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / f"{script}.py"), *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=300)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script, tmp_path):
    out = _run(script, "--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    doc_head = (REPO / "benchmarks" / f"{script}.py").read_text().split('"""')[1].split()[:4]
    assert " ".join(doc_head) in " ".join(out.stdout.split())


def test_report_tables(tmp_path):
    for seed in (0, 1):
        run = tmp_path / f"lora-s{seed}"
        run.mkdir()
        report = build_report(config={"trainer": "lora", "seed": seed}, attacks_result=fake_attacks({"loss": 1.0, "pia": 0.2}, seed=seed),
                              utility={"heldout_denoising_loss": 0.3}, privacy=None, split_sizes={"members": 40, "nonmembers": 40},
                              command="privtune train recipe=lora", defense={"trainer": "lora"}, baseline=None)
        (run / "report.json").write_text(json.dumps(report))
    runs = f"LoRA={tmp_path / 'lora-s0'},{tmp_path / 'lora-s1'},{tmp_path / 'unfinished'}"
    table = _run("defense_table", runs)
    assert table.returncode == 0, table.stderr[-2000:]
    lines = table.stdout.splitlines()
    assert lines[0].startswith("| method | seeds |") and lines[2].startswith("| LoRA | 2 |")
    assert f"not finished (no report.json): {tmp_path / 'unfinished'}" in table.stdout
    releases = _run("release_table", f"LoRA={tmp_path / 'lora-s0'}")
    assert releases.returncode == 0, releases.stderr[-2000:]
    assert "| LoRA | loss | " in releases.stdout and "- LoRA: best attack **loss**" in releases.stdout


def test_sweep_archive_round_trip_keeps_the_frontier_and_drops_sample_ids(tmp_path):
    """save keeps finished reports without per-sample ids / scores; restore gives folders the sweep treats as finished."""
    from privtune.sweep.frontier import run_metrics
    from privtune.sweep.runs import FINISHED, run_state

    root = tmp_path / "runs" / "sw"
    for seed in (0, 1):
        run = root / f"lora__seed={seed}"
        run.mkdir(parents=True)
        report = build_report(config={"trainer": "lora", "seed": seed}, attacks_result=fake_attacks({"loss": 1.0}, seed=seed),
                              utility={"style_accuracy": 0.8}, privacy=None, split_sizes={"members": 40, "nonmembers": 40},
                              command="privtune train recipe=lora", defense={"trainer": "lora"}, baseline=None)
        (run / "report.json").write_text(json.dumps(report))
    (root / "unfinished").mkdir()
    (root / "unfinished" / "config.yaml").write_text("seed: 0\n")
    archive, back = tmp_path / "archive", tmp_path / "back" / "sw"
    assert _run("sweep_archive", "save", str(root), str(archive)).returncode == 0
    assert sorted(p.name for p in archive.iterdir()) == ["lora__seed=0", "lora__seed=1"]
    assert "ids" not in (archive / "lora__seed=0" / "report.json").read_text()
    assert _run("sweep_archive", "restore", str(archive), str(back)).returncode == 0
    for seed in (0, 1):
        assert run_state(back / f"lora__seed={seed}") == FINISHED
        assert run_metrics(back / f"lora__seed={seed}") == run_metrics(root / f"lora__seed={seed}")
