"""Run folders (finished / interrupted / new, config drift) and the execution of a sweep's runs."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..config import flatten, to_container
from ..errors import ConfigError
from .spec import Run, Sweep

FINISHED, INTERRUPTED, NEW = "finished", "interrupted", "new"
CONFIG_DRIFT_IGNORED = ("output_dir", "resume", "overwrite")


def finished_report(run_dir: Path) -> dict | None:
    """The run's report.json when it is complete (written atomically, with its summary), else None."""
    try:
        report = json.loads((run_dir / "report.json").read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) and isinstance(report.get("summary"), dict) else None


def run_state(run_dir: Path, eval_enabled: bool = True) -> str:
    """`finished`, `interrupted` or `new`, as the sweep must treat the run folder.

    finished: a complete report.json (with eval.enabled=false: an exported lora/). interrupted: what
    privtune.train treats as a run (config.yaml or lora/, or DistillMD's teachers/config.yaml), which
    `resume=latest` continues from its last checkpoint, or from step 0 on the recorded split when none
    was written. new: anything else, including a folder left by a run that failed before config.yaml;
    train starts it afresh (it only refuses folders holding config.yaml or lora/)."""
    run_dir = Path(run_dir)
    if finished_report(run_dir) is not None:
        return FINISHED
    lora = run_dir / "lora"
    if not eval_enabled and lora.is_dir() and any(lora.rglob("*.safetensors")):
        return FINISHED
    if (run_dir / "config.yaml").is_file() or lora.exists() or (run_dir / "teachers" / "config.yaml").is_file():
        return INTERRUPTED
    return NEW


def state_of(run: Run) -> str:
    return run_state(run.dir, bool(run.config.eval.enabled))


def config_drift(run: Run) -> list[str]:
    """Keys whose value in the run folder's config.yaml differs from what the sweep asks for now."""
    path = run.dir / "config.yaml"
    if not path.is_file():
        return []
    try:
        old = flatten(OmegaConf.to_container(OmegaConf.load(path), resolve=True))
    except (OmegaConfBaseException, OSError, ValueError):
        return ["config.yaml (unreadable)"]
    new = flatten(to_container(run.config))
    return sorted(k for k in old.keys() & new.keys() if k not in CONFIG_DRIFT_IGNORED and old[k] != new[k])


def check_existing(sweep: Sweep) -> list[str]:
    """One line per existing run folder that was trained with other settings than the sweep's now."""
    problems = []
    for run in sweep.runs:
        drift = config_drift(run)
        if drift:
            shown = ", ".join(drift[:6]) + (", ..." if len(drift) > 6 else "")
            problems.append(f"{run.dir} differs in {shown}")
    return problems


def shell_command(run: Run, resume: bool = False, python: str = "python") -> str:
    """One runnable shell line that trains `run` (what `--print-commands` prints)."""
    return shlex.join([python, "-m", "privtune.train", *run.train_args(resume)])


def child_env(jobs: int, environ: Mapping[str, str] | None = None, cpus: int | None = None) -> dict[str, str]:
    """The environment of the training subprocesses: with several jobs, OMP_NUM_THREADS shares the CPUs
    among them (unless already set), so concurrent runs do not oversubscribe the cores."""
    env = dict(os.environ if environ is None else environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if jobs > 1 and "OMP_NUM_THREADS" not in env:
        if cpus is None:
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        env["OMP_NUM_THREADS"] = str(max(1, cpus // jobs))
    return env


@dataclass(frozen=True)
class Outcome:
    """How one run of an execution ended."""

    run: Run
    action: str  # skip | run | resume
    returncode: int
    log: Path | None
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return self.returncode != 0


def execute(sweep: Sweep, jobs: int = 1, echo: Callable[[str], None] = print) -> list[Outcome]:
    """Train every run that is not finished (`jobs` at a time); a failed run does not stop the others."""
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1 (got {jobs})")
    problems = check_existing(sweep)
    if problems:
        raise ConfigError("run folders from other settings are in the way (the sweep's settings changed since they ran): "
                          + "; ".join(problems) + ". Delete them, or pick another root with output_dir=<folder>")
    total = len(sweep.runs)
    lock = threading.Lock()

    def say(text: str) -> None:
        with lock:
            echo(text)

    outcomes: list[Outcome] = []
    todo: list[tuple[int, Run, bool]] = []
    for i, run in enumerate(sweep.runs, 1):
        state = state_of(run)
        if state == FINISHED:
            say(f"[{i}/{total}] skip {run.name}: finished")
            outcomes.append(Outcome(run, "skip", 0, None))
        else:
            todo.append((i, run, state == INTERRUPTED))
    if not todo:
        return outcomes
    sweep.logs_dir.mkdir(parents=True, exist_ok=True)
    env = child_env(jobs)

    def train(i: int, run: Run, resume: bool) -> Outcome:
        log = sweep.log_path(run)
        action = "resume" if resume else "run"
        cmd = [sys.executable, "-m", "privtune.train", *run.train_args(resume)]
        say(f"[{i}/{total}] {action} {run.name} (log: {log})")
        start = time.monotonic()
        with open(log, "a", encoding="utf-8") as handle:
            handle.write(f"# privtune.sweep {time.strftime('%Y-%m-%d %H:%M:%S')} {action}: {shlex.join(cmd)}\n")
            handle.flush()
            code = subprocess.run(cmd, check=False, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env).returncode
        seconds = time.monotonic() - start
        if code == 0:
            say(f"[{i}/{total}] done {run.name} ({seconds:.0f} s)")
        else:
            say(f"[{i}/{total}] FAILED {run.name} (exit {code}); log: {log}")
        return Outcome(run, action, code, log, seconds)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        outcomes += list(pool.map(lambda item: train(*item), todo))
    return outcomes
