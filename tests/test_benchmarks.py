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

SCRIPTS = ("attacks", "dedup", "defense_table", "dp_step", "release_table", "train_step")


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
