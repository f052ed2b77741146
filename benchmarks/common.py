"""What the benchmark scripts share: an offline environment with privtune importable from the checkout, the
command-line pieces (description, threads, base model), the device, trainers built as `Trainer.run` builds
them, interleaved timing with peak memory, and the markdown tables over finished runs' report.json.

Import it before privtune: it sets HF_HUB_OFFLINE / WANDB_MODE (unless set) and puts the repository first
on `sys.path`. torch is imported only by the helpers that use it, so the report tables start fast.

Peak memory: on CUDA, `torch.cuda.max_memory_allocated` over the window minus the allocation at its
start. On CPU, the kernel's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs
after `malloc_trim` returns freed heap pages) minus the RSS at the window's start: every byte torch,
the allocator and Python touch counts, nothing is sampled, and nothing slows the step down.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

PRE_LOOP_STAGES = ("validate_config", "setup_accelerator", "check_run_dir", "setup_data", "setup_model",
                   "setup_optimizer", "prepare")


# ---------------------------------------------------------------------- command line
def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser whose --help shows a script's docstring: its first paragraph, then the rest."""
    head, _, rest = doc.strip().partition("\n\n")
    return argparse.ArgumentParser(description=head, epilog=rest or None, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_threads(ap: argparse.ArgumentParser, default: int | None, help: str = "torch.set_num_threads") -> None:
    ap.add_argument("--threads", type=int, default=default, help=help)


def set_threads(threads: int | None, device: torch.device) -> int:
    """torch's intra-op threads: `threads`, else 1 on CPU (a benchmark must not fight the machine), else torch's own."""
    import torch

    n = threads or (1 if device.type == "cpu" else None)
    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def add_base(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--base", default="embedded", help="diffusers model folder (default: the embedded tiny SD)")


def base_path(base: str) -> str:
    """The model folder of `--base` (`embedded` and `embedded:<name>` resolved to the shipped ones)."""
    from privtune.models.loading import resolve_base

    return resolve_base(base)


# ---------------------------------------------------------------------- device
def default_device() -> torch.device:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    import torch

    return torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"


def sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------- trainers
def reset_accelerate() -> None:
    """Accelerate's state is process-global; each trainer gets a fresh one, like a fresh process."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def build_trainer(recipe: str, run_dir: Path, base: str, batch_size: int, extra=()):
    """A trainer of `recipe` taken through every stage `Trainer.run` does before its loop (no run files)."""
    from privtune.config import load_config
    from privtune.trainers import get_trainer

    reset_accelerate()
    cfg = load_config(recipe, [f"output_dir={run_dir}", f"model.base={base}", f"train.batch_size={batch_size}",
                               "train.validation_every=0", "train.checkpoint_every=0", "tracking=none", *extra])
    trainer = get_trainer(cfg.trainer)(cfg)
    for stage in PRE_LOOP_STAGES:
        getattr(trainer, stage)()
    return trainer


class TrainerStep:
    """Calls the trainer's own `optimizer_step`, counting micro-steps as `Trainer.train` does."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.micro_step = 0

    def __call__(self) -> float:
        logs = self.trainer.optimizer_step(self.micro_step)
        self.micro_step += self.trainer.cfg.train.gradient_accumulation_steps
        return logs["loss"]


# ---------------------------------------------------------------------- measurement
class PeakMemory:
    """Peak memory of a window above its starting level, in MiB (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu_hwm = device.type == "cpu" and self._clear_refs()
        self.method = ("torch.cuda.max_memory_allocated" if device.type == "cuda"
                       else "VmHWM-reset RSS high-water" if self.cpu_hwm else "unavailable")

    @staticmethod
    def _status(field: str) -> int:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
        return int(match.group(1)) * 1024 if match else -1

    @staticmethod
    def _clear_refs() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            return False
        return PeakMemory._status("VmHWM") > 0

    def start(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        elif self.cpu_hwm:
            try:
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except OSError:
                pass
            self._clear_refs()
            self.base = self._status("VmRSS")

    def stop(self) -> float:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        if self.cpu_hwm:
            return (self._status("VmHWM") - self.base) / 2**20
        return float("nan")


def measure(variants: dict, steps: int, repeats: int, warmup: int, device: torch.device) -> dict:
    """Interleaved windows; per variant the median and spread of seconds per step and the max peak memory."""
    names = list(variants)
    mem = PeakMemory(device)
    for name in names:
        for _ in range(warmup):
            variants[name]()
    sync(device)
    times = {n: [] for n in names}
    cpu = {n: [] for n in names}
    peaks = {n: [] for n in names}
    losses = {n: float("nan") for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            mem.start()
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(steps):
                losses[name] = variants[name]()
            sync(device)
            times[name].append((time.perf_counter() - start) / steps)
            cpu[name].append((time.process_time() - cpu_start) / steps)
            peaks[name].append(mem.stop())
    return {
        n: {"s_per_step": statistics.median(times[n]), "min": min(times[n]), "max": max(times[n]),
            "windows": times[n], "cpu_s_per_step": statistics.median(cpu[n]),
            "peak_mib": max(peaks[n]), "last_loss": losses[n]}
        for n in names
    } | {"_memory_method": mem.method}


def ratios(results: dict, name: str, ref: str = "bare") -> dict:
    """name / ref three ways: of the medians, the median of per-window ratios (windows of one round run
    back to back, so they share the machine's load at that moment), and of the CPU times."""
    a, b = results[name], results[ref]
    return {"median": a["s_per_step"] / b["s_per_step"],
            "paired": statistics.median(x / y for x, y in zip(a["windows"], b["windows"])),
            "cpu": a["cpu_s_per_step"] / b["cpu_s_per_step"]}


def print_table(title: str, results: dict, batch_size: int) -> None:
    print(f"\n{title}")
    print(f"{'variant':<15}{'ms/step':>10}{'min':>9}{'max':>9}{'img/s':>9}{'cpu ms':>9}{'peak MiB':>10}{'loss':>9}")
    for name, r in results.items():
        if name.startswith("_"):
            continue
        print(f"{name:<15}{r['s_per_step'] * 1e3:>10.1f}{r['min'] * 1e3:>9.1f}{r['max'] * 1e3:>9.1f}"
              f"{batch_size / r['s_per_step']:>9.1f}{r['cpu_s_per_step'] * 1e3:>9.1f}{r['peak_mib']:>10.1f}{r['last_loss']:>9.4f}")


# ---------------------------------------------------------------------- tables over finished runs
def wants_help(argv: list[str], doc: str) -> bool:
    """True (after printing `doc`) when the arguments ask for help."""
    if any(a in ("-h", "--help") for a in argv):
        print(doc.strip())
        return True
    return False


def run_reports(argv: list[str]) -> tuple[dict[str, list[dict]], list[str]]:
    """The report.json of each NAME=RUN_DIR[,RUN_DIR...] argument, by name in argument order (a repeated name
    collects more runs), each with its `_path`; and the run folders that hold no report.json."""
    runs: dict[str, list[dict]] = {}
    missing = []
    for arg in argv:
        name, _, paths = arg.partition("=")
        for path in paths.split(","):
            report = Path(path) / "report.json"
            if not report.is_file():
                missing.append(path)
                continue
            runs.setdefault(name, []).append(json.loads(report.read_text()) | {"_path": path})
    return runs, missing


def print_markdown_table(columns: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def print_missing(missing: list[str]) -> None:
    if missing:
        print(f"\nnot finished (no report.json): {', '.join(missing)}")
