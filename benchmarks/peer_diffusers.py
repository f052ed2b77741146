"""privtune's LoRA trainer against diffusers' own train_text_to_image_lora.py, side by side in one run (issue 20).

What: diffusers' example script (an unchanged copy, passed with `--script`, never copied into the project) and
`python -m privtune.train recipe=lora` train the same LoRA on the same base model and the same images and
captions, each as its own child process, in turns. Why: the diffusers script is the reference most users
know; privtune should train no slower than it (goal: privtune / peer step time <= 0.8, from caching VAE
latents and text states, `train.cache_latents=true`), and its loss should follow the same curve.

Both get: the base (`--base`, default the embedded tiny SD), the rows privtune's recipe trains on for `--seed`
(its `data.members` members of the `pool` subset, written once as an imagefolder, PNG + metadata.jsonl with
`file_name` / `text`, for the peer), resolution 32 with a centre crop, no flip, rank = alpha = `--rank` on
the UNet's `to_q, to_k, to_v, to_out.0` (privtune's `lora.targets=attn` preset, the peer's fixed set), the
batch, the steps, AdamW at `--lr` with `--weight-decay`, a constant schedule without warm-up, gradient-norm
clipping at 1.0, fp32, seed `--seed`, data loading in the main process; no validation images, no checkpoint
inside the loop, no evaluation. Variants (`--variants`): `peer`; `privtune` (train.cache_latents=true, its
default); `privtune-nocache` (train.cache_latents=false: the VAE and text encoder run every step, as in the
peer, so it shows the cost of privtune's loop itself). Each round runs every variant once, the order
rotating from round to round, `--repeats` rounds; each number is the median over the rounds.

Step time: both trainers log every optimizer step through Accelerate's TensorBoard tracker (the peer its
`train_loss`, privtune `train/loss` with `train.log_every=1`), and each event carries the wall-clock time
it was logged at. Time per step = (t[S] - t[W]) / (S - W) over the logged steps W..S, W = `--warmup-steps`
(default max(5, S/10)): start-up (imports, model loading, data, latent caching) and the first steps fall
before t[W], the final save after t[S], so neither counts. CPU time per step is the same window on the
child's CPU clock (user + system of all its threads, /proc/<pid>/stat sampled every 0.1 s and interpolated
at t[W] and t[S]): on a machine shared with other jobs wall time also counts the time the child waited for
the core, CPU time does not. Ratios to the peer are given of the medians and as the median of per-round
ratios (the goal is judged on the latter, wall time). The JSON also has the median single-step interval.
Peak memory: the child's maximum resident set (`ru_maxrss` of that one child, from os.wait4), the whole
process, start-up included. Loss: the mean logged per-step training loss over the first and the last
quarter of the steps (each trainer draws its own noise and timesteps, so the curves agree in level and
trend, not step by step).

torchvision is not installed here (a PyPI wheel breaks imports beside the CPU torch build), and the peer
imports `torchvision.transforms`. The benchmark writes, in its temporary folder that goes first on the
peer's PYTHONPATH only, a small stand-in package `torchvision/` (PIL / numpy / torch; `SHIM` below):
`transforms` with Compose, Resize, CenterCrop, RandomCrop, RandomHorizontalFlip, Lambda, ToTensor, Normalize
and InterpolationMode, as torchvision computes them for PIL images, plus import-time stubs, because
transformers and diffusers import torchvision as soon as they find it: `transforms.functional.pil_to_tensor`
(transformers.image_utils), an empty `torchvision.io` (transformers.video_utils) and `transforms.v2.functional`
(transformers' image processors; the v1 functions re-exported). Nothing else needs a stub: datasets,
huggingface_hub, peft, accelerate, tensorboard are installed; `--report_to tensorboard` avoids W&B.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 taskset -c 0 python benchmarks/peer_diffusers.py \\
        --script ../shared/peers/diffusers/train_text_to_image_lora.py --steps 300 --batch-size 16 --rank 16 --repeats 3

Writes `<--out>/peer_diffusers.json` (settings, commands, every run, the medians and ratios) and keeps each
run's log under `<--out>/logs/`; the run folders live in a temporary folder (`--keep` keeps them in `--out`).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

PEER_LOSS_TAG = "train_loss"
PRIVTUNE_LOSS_TAG = "train/loss"
VARIANTS = ("peer", "privtune", "privtune-nocache")

# ---------------------------------------------------------------------- the torchvision stand-in
SHIM = {
    "torchvision/__init__.py": '''\
"""A stand-in for torchvision written by privtune's benchmarks/peer_diffusers.py: NOT torchvision.

Just what diffusers' train_text_to_image_lora.py and the libraries it imports need, in PIL / numpy / torch.
"""

__version__ = "0.0.0+privtune.peer.shim"

from . import io, transforms  # noqa: F401,E402
''',
    "torchvision/io.py": '''\
"""Empty: transformers.video_utils imports `torchvision.io` when it finds torchvision; nothing here uses it."""
''',
    "torchvision/transforms/__init__.py": '''\
"""torchvision.transforms for PIL images, as torchvision computes them (random draws from torch's RNG)."""

import torch

from . import functional as F
from .functional import InterpolationMode

__all__ = ["CenterCrop", "Compose", "InterpolationMode", "Lambda", "Normalize", "RandomCrop", "RandomHorizontalFlip",
           "Resize", "ToTensor", "functional"]
functional = F


def _pair(size):
    if isinstance(size, int):
        return size, size
    return (size[0], size[0]) if len(size) == 1 else (size[0], size[1])


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, img):
        for t in self.transforms:
            img = t(img)
        return img


class Resize:
    def __init__(self, size, interpolation=InterpolationMode.BILINEAR, max_size=None, antialias=True):
        self.size, self.interpolation, self.max_size = size, interpolation, max_size

    def __call__(self, img):
        return F.resize(img, self.size, self.interpolation, self.max_size)


class CenterCrop:
    def __init__(self, size):
        self.size = _pair(size)

    def __call__(self, img):
        return F.center_crop(img, self.size)


class RandomCrop:
    def __init__(self, size, padding=None, pad_if_needed=False, fill=0, padding_mode="constant"):
        if padding is not None or pad_if_needed:
            raise NotImplementedError("the torchvision shim's RandomCrop does not pad")
        self.size = _pair(size)

    @staticmethod
    def get_params(img, output_size):
        w, h = img.size
        th, tw = output_size
        if h < th or w < tw:
            raise ValueError(f"Required crop size {(th, tw)} is larger than input image size {(h, w)}")
        if w == tw and h == th:
            return 0, 0, h, w
        i = torch.randint(0, h - th + 1, size=(1,)).item()
        j = torch.randint(0, w - tw + 1, size=(1,)).item()
        return i, j, th, tw

    def __call__(self, img):
        return F.crop(img, *self.get_params(img, self.size))


class RandomHorizontalFlip:
    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, img):
        return F.hflip(img) if torch.rand(1) < self.p else img


class Lambda:
    def __init__(self, lambd):
        self.lambd = lambd

    def __call__(self, img):
        return self.lambd(img)


class ToTensor:
    def __call__(self, pic):
        return F.to_tensor(pic)


class Normalize:
    def __init__(self, mean, std, inplace=False):
        self.mean, self.std = mean, std

    def __call__(self, tensor):
        return F.normalize(tensor, self.mean, self.std)
''',
    "torchvision/transforms/functional.py": '''\
"""torchvision.transforms.functional for PIL images (and tensors where noted), in PIL / numpy / torch."""

import enum

import numpy as np
import torch
from PIL import Image

__all__ = ["InterpolationMode", "center_crop", "crop", "hflip", "normalize", "pil_to_tensor", "resize", "to_tensor"]


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


_PIL_FILTER = {
    InterpolationMode.NEAREST: Image.NEAREST, InterpolationMode.NEAREST_EXACT: Image.NEAREST,
    InterpolationMode.BILINEAR: Image.BILINEAR, InterpolationMode.BICUBIC: Image.BICUBIC,
    InterpolationMode.BOX: Image.BOX, InterpolationMode.HAMMING: Image.HAMMING, InterpolationMode.LANCZOS: Image.LANCZOS,
}


def resize(img, size, interpolation=InterpolationMode.BILINEAR, max_size=None, antialias=True):
    """An int (or [int]) size sets the shorter side, the longer scaled and truncated as torchvision does;
    (h, w) sets both. The image comes back unchanged when it already has the size."""
    w, h = img.size
    if isinstance(size, int) or len(size) == 1:
        short_target = size if isinstance(size, int) else size[0]
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = short_target, int(short_target * long / short)
        if max_size is not None and new_long > max_size:
            new_short, new_long = int(max_size * new_short / new_long), max_size
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    else:
        new_h, new_w = size
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), _PIL_FILTER[InterpolationMode(interpolation)])


def crop(img, top, left, height, width):
    """Outside the image is black, as torchvision pads."""
    return img.crop((left, top, left + width, top + height))


def center_crop(img, output_size):
    if isinstance(output_size, int):
        output_size = (output_size, output_size)
    th, tw = (output_size[0], output_size[0]) if len(output_size) == 1 else output_size
    w, h = img.size
    top = -((th - h) // 2) if th > h else int(round((h - th) / 2.0))
    left = -((tw - w) // 2) if tw > w else int(round((w - tw) / 2.0))
    return crop(img, top, left, th, tw)


def hflip(img):
    return img.transpose(Image.FLIP_LEFT_RIGHT)


def pil_to_tensor(pic):
    """uint8 [C, H, W], unscaled."""
    array = np.asarray(pic)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def to_tensor(pic):
    """A PIL image or an HWC array -> float [C, H, W]; uint8 scaled to [0, 1]."""
    tensor = pil_to_tensor(pic)
    return tensor.float().div(255) if tensor.dtype == torch.uint8 else tensor.float()


def normalize(tensor, mean, std, inplace=False):
    mean = torch.as_tensor(mean, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
    return (tensor - mean) / std
''',
    "torchvision/transforms/v2/__init__.py": '''\
"""Import-time stub: transformers' image processors import `torchvision.transforms.v2.functional` when they find torchvision."""

from . import functional  # noqa: F401
''',
    "torchvision/transforms/v2/functional.py": '''\
"""The v1 shim functions under the v2 name (import-time stub for transformers; nothing here calls them)."""

from ..functional import *  # noqa: F401,F403
''',
}


def write_shim(root: Path) -> Path:
    """Write the torchvision stand-in under `root` (which then goes first on the peer's PYTHONPATH)."""
    for rel, text in SHIM.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


# ---------------------------------------------------------------------- the shared data
def training_rows(members: int, seed: int):
    """The rows `recipe=lora` trains on for `seed` with `data.members=members` (its own load and split code)."""
    from privtune.config import load_config
    from privtune.data.sources import load_source
    from privtune.data.split import make_split

    cfg = load_config("lora", [f"seed={seed}", f"data.members={members}"])
    assert not cfg.dedup.enabled and not cfg.data.exclude and not cfg.data.auxiliary_members and not cfg.canaries.enabled
    source = load_source(cfg.data)
    split = make_split(source.records, cfg.data.members, cfg.data.nonmembers, cfg.seed, source.description,
                       one_per_group=bool(cfg.data.one_per_group))
    return split.members


def write_imagefolder(folder: Path, records) -> list[str]:
    """PNGs (the decoded RGB pixels privtune trains on, lossless) and metadata.jsonl (file_name, text)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, r in enumerate(records):
        name = f"{i:04d}.png"
        r.image.convert("RGB").save(folder / name)
        lines.append(json.dumps({"file_name": name, "text": r.caption, "id": r.id}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return [r.id for r in records]


# ---------------------------------------------------------------------- the two programs
def peer_command(args, base: str, data: Path, out: Path, cache: Path) -> list[str]:
    return [sys.executable, str(Path(args.script).resolve()),
            "--pretrained_model_name_or_path", base, "--train_data_dir", str(data), "--caption_column", "text",
            "--resolution", str(args.resolution), "--center_crop",
            "--train_batch_size", str(args.batch_size), "--max_train_steps", str(args.steps), "--rank", str(args.rank),
            "--learning_rate", str(args.lr), "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
            "--adam_weight_decay", str(args.weight_decay), "--max_grad_norm", "1.0", "--mixed_precision", "no",
            "--seed", str(args.seed), "--dataloader_num_workers", "0", "--checkpointing_steps", str(args.steps + 1),
            "--report_to", "tensorboard", "--output_dir", str(out), "--cache_dir", str(cache)]


def privtune_command(args, base: str, out: Path, cache_latents: bool) -> list[str]:
    return [sys.executable, "-m", "privtune.train", "recipe=lora", f"output_dir={out}", f"model.base={base}",
            f"seed={args.seed}", f"data.members={args.members}", f"data.resolution={args.resolution}",
            "data.center_crop=true", "data.random_flip=false",
            f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}", f"lora.rank={args.rank}",
            f"lora.alpha={args.rank}", "lora.targets=attn", f"optim.lr={args.lr}", f"optim.weight_decay={args.weight_decay}",
            "optim.scheduler=constant", "optim.warmup_steps=0", "train.max_grad_norm=1.0", "train.mixed_precision=no",
            f"train.cache_latents={str(cache_latents).lower()}", "train.num_workers=0", "train.log_every=1",
            "train.validation_every=0", "train.checkpoint_every=0", "eval.enabled=false", "tracking=tensorboard"]


def child_env(threads: int, pythonpath: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return env | {"PYTHONPATH": pythonpath, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                  "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of process `pid` so far, all its threads (/proc/<pid>/stat), None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_child(cmd: list[str], env: dict, log: Path, timeout: float) -> dict:
    """Run `cmd` to the end; its wall time, exit code, peak RSS (ru_maxrss of this child alone, from wait4) and
    (wall time, CPU seconds) samples every 0.1 s, to read the CPU time the child spent between two logged steps."""
    log.parent.mkdir(parents=True, exist_ok=True)
    samples = []
    with log.open("w") as out:
        start = time.time()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=common.REPO)
        deadline = start + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.time() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            now, cpu = time.time(), process_cpu_s(proc.pid)
            if cpu is not None:
                samples.append((now, cpu))
            time.sleep(0.1)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"start": start, "wall_s": time.time() - start, "rc": proc.returncode, "peak_rss_mb": usage.ru_maxrss / 1024,
            "cpu_s": usage.ru_utime + usage.ru_stime, "samples": samples}


def cpu_at(samples: list[tuple[float, float]], when: float) -> float:
    """The child's CPU seconds at wall time `when`, interpolated between the two samples around it."""
    for (t0, c0), (t1, c1) in zip(samples, samples[1:]):
        if t0 <= when <= t1:
            return c0 + (c1 - c0) * (when - t0) / (t1 - t0) if t1 > t0 else c1
    raise RuntimeError("a logged step falls outside the CPU-time samples of its process")


def read_scalars(logdir: Path, tag: str) -> list[tuple[int, float, float]]:
    """(step, wall time, value) of every `tag` scalar in the TensorBoard events under `logdir`, by step."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    points = {}
    for path in sorted(logdir.rglob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag != tag:
                    continue
                kind = value.WhichOneof("value")
                number = value.simple_value if kind == "simple_value" else float(tensor_util.make_ndarray(value.tensor))
                points[int(event.step)] = (int(event.step), float(event.wall_time), float(number))
    return [points[s] for s in sorted(points)]


def summarize(points, launched: float, samples, warmup: int, steps: int) -> dict:
    """Step time (wall and CPU) over the logged steps warmup..steps, start-up time, the first / last quarter's mean loss."""
    by_step = {s: (t, v) for s, t, v in points}
    if sorted(by_step) != list(range(1, steps + 1)):
        raise RuntimeError(f"expected a logged loss at every step 1..{steps}, got {len(by_step)} steps")
    times = [by_step[s][0] for s in range(1, steps + 1)]
    losses = [by_step[s][1] for s in range(1, steps + 1)]
    gaps = [b - a for a, b in zip(times[warmup - 1:], times[warmup:])]
    quarter = max(1, steps // 4)
    cpu = (cpu_at(samples, times[-1]) - cpu_at(samples, times[warmup - 1])) / (steps - warmup)
    return {"s_per_step": (times[-1] - times[warmup - 1]) / (steps - warmup), "cpu_s_per_step": cpu,
            "median_step_s": statistics.median(gaps),
            "max_step_s": max(gaps), "startup_s": times[0] - launched,
            "first_quarter_loss": statistics.fmean(losses[:quarter]), "last_quarter_loss": statistics.fmean(losses[-quarter:]),
            "losses": losses}


# ---------------------------------------------------------------------- one run of one variant
def run_variant(name: str, round_: int, args, ctx: dict) -> dict:
    work, base = ctx["work"], ctx["base"]
    out = work / f"{name}-r{round_}"
    log = ctx["logs"] / f"{name}-r{round_}.log"
    if name == "peer":
        cmd = peer_command(args, base, ctx["data"], out, work / "hf-datasets-cache")
        env, tag, logdir = child_env(args.threads, str(ctx["shim"])), PEER_LOSS_TAG, out / "logs"
    else:
        cmd = privtune_command(args, base, out, cache_latents=name == "privtune")
        env, tag, logdir = child_env(args.threads, str(common.REPO)), PRIVTUNE_LOSS_TAG, out / "logs"
    print(f"peer_diffusers: round {round_ + 1}/{args.repeats}: {name} ...", flush=True)
    result = run_child(cmd, env, log, args.timeout)
    if result["rc"] != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"peer_diffusers: {name} exited with {result['rc']} (log {log}):\n{tail}")
    result |= summarize(read_scalars(logdir, tag), result.pop("start"), result.pop("samples"), ctx["warmup"], args.steps)
    if name != "peer":
        trained = [r["id"] for r in json.loads((out / "split.json").read_text())["members"]]
        if sorted(trained) != sorted(ctx["ids"]):
            raise SystemExit(f"peer_diffusers: privtune trained on other rows than the imagefolder holds ({out / 'split.json'})")
    print(f"  {result['s_per_step'] * 1e3:.1f} ms/step ({result['cpu_s_per_step'] * 1e3:.1f} ms CPU), "
          f"start-up {result['startup_s']:.1f} s, wall {result['wall_s']:.1f} s, peak RSS {result['peak_rss_mb']:.0f} MB, "
          f"loss {result['first_quarter_loss']:.4f} -> {result['last_quarter_loss']:.4f}", flush=True)
    return result | {"command": cmd, "log": str(log)}


MEDIAN_KEYS = ("s_per_step", "cpu_s_per_step", "median_step_s", "startup_s", "wall_s", "peak_rss_mb", "first_quarter_loss",
               "last_quarter_loss")


def median_of(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in MEDIAN_KEYS} | {"rounds": [r["s_per_step"] for r in runs],
                                                                             "rounds_cpu": [r["cpu_s_per_step"] for r in runs]}


def ratios_to_peer(runs: dict, summary: dict) -> dict:
    """variant / peer, for wall and CPU time per step: of the medians, and the median of per-round ratios (the runs of one
    round follow each other, so they share the machine's load of that moment: on a shared machine the robust one)."""
    out = {}
    for name, rs in runs.items():
        if name == "peer":
            continue
        out[name] = {}
        for kind, key in (("wall", "s_per_step"), ("cpu", "cpu_s_per_step")):
            out[name][kind] = summary[name][key] / summary["peer"][key]
            out[name][f"{kind}_paired"] = statistics.median(a[key] / b[key] for a, b in zip(rs, runs["peer"]))
    return out


def print_results(summary: dict, ratios: dict, args) -> None:
    print(f"\npeer benchmark: batch {args.batch_size}, {args.steps} steps (timed {summary['_timed_steps']}), rank {args.rank}, "
          f"{args.members} rows at {args.resolution} px, lr {args.lr}, {args.threads} thread(s), median of {args.repeats} rounds")
    print(f"{'variant':<18}{'s/step':>8}{'CPU s/step':>12}{'img/s':>7}{'start-up s':>12}{'peak RSS MB':>13}"
          f"{'loss 1st q':>12}{'loss last q':>13}{'wall vs peer':>16}{'CPU vs peer':>16}")
    for name in args.variants:
        r, q = summary[name], ratios.get(name)
        wall = f"{q['wall']:.2f}x ({q['wall_paired']:.2f}x)" if q else ""
        cpu = f"{q['cpu']:.2f}x ({q['cpu_paired']:.2f}x)" if q else ""
        print(f"{name:<18}{r['s_per_step']:>8.3f}{r['cpu_s_per_step']:>12.3f}{args.batch_size / r['s_per_step']:>7.1f}"
              f"{r['startup_s']:>12.1f}{r['peak_rss_mb']:>13.0f}{r['first_quarter_loss']:>12.4f}{r['last_quarter_loss']:>13.4f}"
              f"{wall:>16}{cpu:>16}")
    print("(ratios: of the medians, and in brackets the median of per-round ratios)")
    if "privtune" in ratios:
        q = ratios["privtune"]
        verdict = "meets" if q["wall_paired"] <= args.goal else "misses"
        print(f"\nprivtune / peer step time: {q['wall_paired']:.3f}x wall (per-round median; {q['wall']:.3f}x of the medians), "
              f"{q['cpu_paired']:.3f}x CPU; {verdict} the goal <= {args.goal}x")


# ---------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = common.parser(__doc__)
    ap.add_argument("--script", required=True, help="diffusers' train_text_to_image_lora.py (run as it is, never copied)")
    common.add_base(ap)
    ap.add_argument("--members", type=int, default=128, help="training rows (recipe=lora's data.members)")
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup-steps", type=int, default=None, help="logged steps before the timed window (default max(5, steps/10))")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (and alpha)")
    ap.add_argument("--lr", type=float, default=1e-3, help="learning rate (recipe=lora's optim.lr)")
    ap.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (recipe=lora's optim.weight_decay)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2, help="rounds; each runs every variant once, the order rotating")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    common.add_threads(ap, 1, help="OMP_NUM_THREADS / MKL_NUM_THREADS of every child")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds one training may take")
    ap.add_argument("--goal", type=float, default=0.8, help="the privtune / peer step-time goal")
    ap.add_argument("--out", default="runs/peer_diffusers", help="folder for peer_diffusers.json and the logs")
    ap.add_argument("--keep", action="store_true", help="keep the run folders (in --out/work) instead of a temporary folder")
    args = ap.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown or not args.variants:
        ap.error(f"unknown --variants {unknown}; choose from {', '.join(VARIANTS)}")
    if not Path(args.script).is_file():
        ap.error(f"--script {args.script} is not a file")
    warmup = args.warmup_steps if args.warmup_steps is not None else max(5, args.steps // 10)
    if not 1 <= warmup < args.steps:
        ap.error(f"--warmup-steps must be in [1, --steps) (got {warmup})")

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work" if args.keep else Path(tempfile.mkdtemp(prefix="peer_diffusers-"))
    if args.keep and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        base = common.base_path(args.base)
        shim = write_shim(work / "shim")
        print(f"peer_diffusers: wrote a torchvision stand-in (PIL/numpy/torch: transforms.Compose, Resize, CenterCrop, "
              f"RandomCrop, RandomHorizontalFlip, Lambda, ToTensor, Normalize, InterpolationMode; import-time stubs "
              f"transforms.functional.pil_to_tensor, io, transforms.v2.functional) in {shim}, first on the peer's PYTHONPATH only")
        records = training_rows(args.members, args.seed)
        data = work / "imagefolder"
        ids = write_imagefolder(data, records)
        print(f"peer_diffusers: {len(ids)} rows (recipe=lora's members for seed {args.seed}) written as an imagefolder at {data}")
        load_before = os.getloadavg()
        ctx = {"work": work, "base": base, "data": data, "ids": ids, "shim": shim, "logs": out / "logs", "warmup": warmup}
        runs = {name: [] for name in args.variants}
        for r in range(args.repeats):
            k = r % len(args.variants)
            for name in args.variants[k:] + args.variants[:k]:
                runs[name].append(run_variant(name, r, args, ctx))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    summary = {name: median_of(rs) for name, rs in runs.items()} | {"_timed_steps": args.steps - warmup}
    ratios = ratios_to_peer(runs, summary) if "peer" in runs else {}
    print_results(summary, ratios, args)
    try:
        affinity = sorted(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    settings = {k: v for k, v in vars(args).items()} | {"base": base, "warmup_steps": warmup, "lora_targets": "attn",
                                                         "machine": f"CPU, {os.cpu_count()} cores, affinity {affinity}",
                                                         "load_average_before_after": [load_before, os.getloadavg()]}
    report = {"settings": settings, "summary": summary, "ratios_vs_peer": ratios, "goal": args.goal,
              "runs": {name: [{k: v for k, v in r.items()} for r in rs] for name, rs in runs.items()}}
    (out / "peer_diffusers.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwrote {out / 'peer_diffusers.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
