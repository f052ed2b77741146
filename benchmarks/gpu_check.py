"""GPU check: privtune's CUDA-only training paths on an SD v1.5-sized model, in one command, in about 8 minutes.

    bash benchmarks/gpu_check.sh             # one NVIDIA GPU, ~8 min: writes runs/gpu_check/gpu_check.{json,md}
    bash benchmarks/gpu_check.sh --dry-run   # the same code on tiny sizes (CPU, < 3 min): runs/gpu_check_dry/
    python benchmarks/gpu_check.py [--dry-run] [--out DIR] ...   # the driver itself, without the environment setup

What it runs, each through privtune's own code (`common.build_trainer` takes a trainer through every stage
`Trainer.run` does before its loop, then the trainer's own `optimizer_step` is timed):

1. A random-weight pipeline with SD v1.5's published architecture (privtune.models.arch.SD15, as
   scripts/build_arch_pipeline.py writes it: 860 M UNet parameters, cross-attention 768, SD's VAE, 512 px -> 64x64x4
   latents, a CLIP ViT-L/14-shaped text encoder with 77 tokens x 768 and a CLIP BPE tokenizer) is written to a
   temporary folder (no download). Weights are stored in fp16 to halve the disk traffic; every row loads them in
   its own dtype, as `load_components` does for any checkpoint. --dry-run divides every width by 8.
2. LoRA rows (recipe lora, `lora.targets=attn` rank 16, AdamW, train.cache_latents=true, batch 4 at 512 px): fp32,
   bf16 (train.mixed_precision=bf16: frozen weights in bf16, Accelerate autocast), fp16 (frozen weights in fp16,
   autocast and Accelerate's GradScaler), + gradient checkpointing (train.gradient_checkpointing), + bitsandbytes
   8-bit AdamW (optim.use_8bit). Time per optimizer step (median of timed windows after warm-up) and peak memory.
3. DP-SGD rows (recipe dpsgd, fixed-size batches, Opacus hooks; K = 1 at the same batch, and the recipe's K = 8
   noise multiplicity): time and memory as ratios to the LoRA row of the same precision.
4. Attack throughput: privtune's loss / SecMI / PIA attacks (their default settings, as the eval stage runs them)
   on EncodedSamples that `privtune.eval.encode.encode_records` makes of the split's images (members + non-members,
   64 at full size), against the target `privtune.eval.stage.attack_target` builds around the trained LoRA UNet of
   the `--attack-row` row (default `lora bf16`): `calibrate` on members vs non-members (it picks the timestep; timed
   apart), then `score` on every sample, timed: samples/s, UNet evaluations (NFE) per sample, and the ratio of the
   attack's NFE/s to plain batched UNet forwards at the same batch (`benchmarks/attacks.raw_throughput`), the
   attacks' query unit, which is also a row of its own.

Memory: on CUDA, `peak MiB` is `torch.cuda.max_memory_allocated` over the timed steps (everything resident: the
frozen VAE / text encoder / UNet, LoRA, optimizer state, cached latents, plus the step's activations) and
`step MiB` is that peak minus the allocation at the window's start. On CPU both come from the RSS high-water mark
(`common.PeakMemory`). Rows that need CUDA (fp16 + GradScaler, 8-bit AdamW) are marked `skipped: needs CUDA` on a
CPU; a row that fails records its error and the others still run (exit status 1). Rows not started before
`--budget-s` is spent are marked skipped. Without --dry-run and without CUDA the script exits with status 2.

Output: one JSON (environment: torch / diffusers / peft / transformers / accelerate / opacus / bitsandbytes
versions, device, CUDA version; settings; every row with numbers or an explicit skip / error reason) and one
Markdown table, both rewritten after every row, in `--out` (default runs/gpu_check/, runs/gpu_check_dry/ for
--dry-run; runs/ is git-ignored).
"""

from __future__ import annotations

import gc
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import common
import torch
from common import REPO, PeakMemory, TrainerStep, build_trainer, measure, sync
from dp_step import DPStep, dp_trainer

# ---------------------------------------------------------------------- sizes
# The model is privtune.models.arch.SD15 (the published SD v1.5 configs); --dry-run divides its widths by 8.
DRY_SCALE = 8
MAX_LENGTH = 77

FULL = dict(resolution=512, batch_size=4, members=16, nonmembers=48, warmup=2, steps=3, repeats=3, attack_batch=32,
            budget_s=420.0, out="runs/gpu_check")
DRY = dict(resolution=64, batch_size=1, members=2, nonmembers=2, warmup=1, steps=1, repeats=1, attack_batch=2,
           budget_s=170.0, out="runs/gpu_check_dry")
ATTACKS = ("loss", "secmi", "pia")


@dataclass(frozen=True)
class Row:
    name: str
    recipe: str = "lora"
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    use_8bit: bool = False
    multiplicity: int = 1  # dpsgd only: dp.noise_multiplicity
    reference: str | None = None  # the row its time / memory ratios are taken to

    @property
    def needs_cuda(self) -> str | None:
        if self.mixed_precision == "fp16":
            return "train.mixed_precision=fp16 (GradScaler)"
        if self.use_8bit:
            return "optim.use_8bit (bitsandbytes AdamW8bit)"
        return None

    def overrides(self) -> list[str]:
        return [f"train.mixed_precision={self.mixed_precision}", f"train.gradient_checkpointing={str(self.gradient_checkpointing).lower()}",
                f"optim.use_8bit={str(self.use_8bit).lower()}"]


# Run in this order (the most wanted first, in case --budget-s runs out); the table keeps it.
ROWS = (
    Row("lora fp32"),
    Row("lora bf16", mixed_precision="bf16"),
    Row("dpsgd fp32", "dpsgd", reference="lora fp32"),
    Row("dpsgd bf16", "dpsgd", "bf16", reference="lora bf16"),
    Row("lora fp16 +GradScaler", mixed_precision="fp16"),
    Row("lora fp32 +gc", gradient_checkpointing=True, reference="lora fp32"),
    Row("lora bf16 +gc", mixed_precision="bf16", gradient_checkpointing=True, reference="lora bf16"),
    Row("lora bf16 +adam8bit", mixed_precision="bf16", use_8bit=True, reference="lora bf16"),
    Row("lora bf16 +gc +adam8bit", mixed_precision="bf16", gradient_checkpointing=True, use_8bit=True, reference="lora bf16"),
    Row("dpsgd bf16 K=8", "dpsgd", "bf16", multiplicity=8, reference="lora bf16"),
)


# ---------------------------------------------------------------------- the model folder
def build_model_folder(folder: Path, dry_run: bool, device: torch.device) -> dict:
    """The random-weight SD v1.5-architecture pipeline of privtune.models.arch (widths / 8 with `dry_run`) at
    `folder`, weights stored in fp16; initialised on `device` (fast on a GPU), saved from the CPU. Returns its sizes."""
    from privtune.models import arch

    t0 = time.perf_counter()
    spec = arch.scaled(arch.SD15, DRY_SCALE if dry_run else 1)
    try:
        arch.build_pipeline(spec, folder, dtype=torch.float16, device=device)
    except (RuntimeError, TypeError, ValueError) as exc:  # a library that cannot initialise on the GPU: the CPU is slower, not wrong
        print(f"gpu_check: initialising on {device} failed ({exc}); initialising on the CPU", flush=True)
        arch.build_pipeline(spec, folder, dtype=torch.float16)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return {"arch": spec.name, "parameters": {"unet": arch.parameter_count(folder / "unet"), "all": arch.parameter_count(folder)},
            "folder_mib": round(size / 2**20, 1), "build_s": round(time.perf_counter() - t0, 1),
            "unet_config": {k: list(v) if isinstance(v, tuple) else v for k, v in spec.unet.items()}}


# ---------------------------------------------------------------------- environment
def environment(device: torch.device) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    env = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
           "device": common.device_name(device), "device_type": device.type, "cuda_available": torch.cuda.is_available(),
           "cuda_version": torch.version.cuda, "torch_threads": torch.get_num_threads()}
    for pkg in ("torch", "diffusers", "peft", "transformers", "accelerate", "opacus", "bitsandbytes", "safetensors", "numpy"):
        try:
            env[pkg] = version(pkg)
        except PackageNotFoundError:
            env[pkg] = "not installed"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(cudnn=torch.backends.cudnn.version(), gpu_memory_mib=round(props.total_memory / 2**20),
                   compute_capability=f"{props.major}.{props.minor}", tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                   tf32_cudnn=torch.backends.cudnn.allow_tf32)
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=20)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=20)
        env["git"] = head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if head.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        env["git"] = None
    return env


# ---------------------------------------------------------------------- rows
def resident_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    rss = PeakMemory._status("VmRSS")
    return rss / 2**20 if rss > 0 else float("nan")


def make_trainer(row: Row, run_dir: Path, base: str, args):
    extra = [f"data.resolution={args.resolution}", f"data.members={args.members}", f"data.nonmembers={args.nonmembers}",
             "eval.enabled=false", f"lora.targets={args.targets}", f"lora.rank={args.rank}", f"lora.alpha={args.rank}",
             "train.max_steps=100000", *row.overrides()]
    if row.recipe == "dpsgd":
        trainer = dp_trainer(run_dir, base, args.batch_size, row.multiplicity, "hooks", extra)
        return trainer, DPStep(trainer)
    trainer = build_trainer(row.recipe, run_dir, base, args.batch_size, extra)
    return trainer, TrainerStep(trainer)


def evidence(trainer, row: Row) -> dict:
    """What shows that the row's settings took effect inside privtune's trainer."""
    acc = trainer.accelerator
    unet = acc.unwrap_model(trainer.components.unet)
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    scaler = getattr(acc, "scaler", None)
    out = {"optimizer": f"{type(optimizer).__module__.split('.')[0]}.{type(optimizer).__name__}",
           "frozen_dtype": str(next(unet.parameters()).dtype).replace("torch.", ""),
           "lora_dtype": str(trainer.trainable[0].dtype).replace("torch.", ""),
           "lora_params": sum(p.numel() for p in trainer.trainable),
           "gradient_checkpointing": bool(getattr(unet, "is_gradient_checkpointing", False)),
           "accelerate_mixed_precision": str(acc.mixed_precision), "grad_scaler": scaler is not None,
           "unet_rows_per_step": trainer.cfg.train.batch_size * row.multiplicity}
    if scaler is not None:
        out["grad_scale"] = float(scaler.get_scale())
    if trainer.cache is not None:  # what the UNet is trained on: cached posteriors and text states
        out.update(latents=list(trainer.cache["moments"][False].shape[2:]), text_states=list(trainer.cache["text"].shape[1:]))
    if row.recipe == "dpsgd":
        out.update(noise_multiplicity=int(trainer.cfg.dp.noise_multiplicity), grad_sample=str(trainer.cfg.dp.grad_sample))
    return out


def check_evidence(row: Row, ev: dict) -> list[str]:
    """Settings that did not take effect (an empty list when all did)."""
    problems = []
    if ev["gradient_checkpointing"] != row.gradient_checkpointing:
        problems.append(f"gradient checkpointing is {ev['gradient_checkpointing']}")
    if row.use_8bit != ("8bit" in ev["optimizer"]):
        problems.append(f"optimizer is {ev['optimizer']}")
    if (row.mixed_precision == "fp16") != ev["grad_scaler"]:
        problems.append(f"GradScaler present: {ev['grad_scaler']}")
    want = {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}[row.mixed_precision]
    if ev["frozen_dtype"] != want:
        problems.append(f"frozen weights in {ev['frozen_dtype']}, not {want}")
    return problems


def run_row(row: Row, base: str, tmp: Path, device: torch.device, args, report: dict) -> dict:
    out = {"name": row.name, "recipe": row.recipe, "mixed_precision": row.mixed_precision,
           "gradient_checkpointing": row.gradient_checkpointing, "use_8bit": row.use_8bit, "noise_multiplicity": row.multiplicity,
           "reference": row.reference}
    t0 = time.perf_counter()
    trainer, step = make_trainer(row, tmp / row.name.replace(" ", "_").replace("+", ""), base, args)
    out["build_s"] = round(time.perf_counter() - t0, 2)
    out["evidence"] = ev = evidence(trainer, row)
    problems = check_evidence(row, ev)
    if problems:
        raise RuntimeError(f"{row.name}: the settings did not take effect: {'; '.join(problems)}")
    for _ in range(args.warmup):
        step()
    sync(device)
    resident = resident_mib(device)
    res = measure({row.name: step}, args.steps, args.repeats, 0, device)
    r = res[row.name]
    peak = r["peak_mib"]
    out.update(status="ok", ms_per_step=round(r["s_per_step"] * 1e3, 2), ms_min=round(r["min"] * 1e3, 2),
               ms_max=round(r["max"] * 1e3, 2), img_per_s=round(args.batch_size / r["s_per_step"], 3),
               step_mib=round(peak, 1), resident_mib=round(resident, 1), peak_mib=round(resident + peak, 1),
               memory_method=res["_memory_method"], loss=r["last_loss"], loss_finite=math.isfinite(r["last_loss"]),
               warmup=args.warmup, steps=args.steps, repeats=args.repeats)
    if ev["grad_scaler"]:
        ev["grad_scale_after"] = float(trainer.accelerator.scaler.get_scale())
    if row.name == args.attack_row:
        report["attacks"] = run_attacks(trainer, device, args)
    out["row_s"] = round(time.perf_counter() - t0, 2)
    return out


# ---------------------------------------------------------------------- attacks
def run_attacks(trainer, device: torch.device, args) -> list[dict]:
    """privtune's loss / SecMI / PIA on the trained row's UNet, against batched UNet forwards at the same batch."""
    from attacks import raw_throughput

    from privtune.eval.attacks import ATTACKS as REGISTRY
    from privtune.eval.encode import encode_records
    from privtune.eval.stage import attack_target

    comps = trainer.components
    unet = trainer.accelerator.unwrap_model(comps.unet)
    was_training = unet.training
    unet.eval()
    records = trainer.split.members + trainer.split.nonmembers
    where = f"{args.attack_row} UNet ({str(next(unet.parameters()).dtype).replace('torch.', '')} weights + fp32 LoRA)"
    rows = []
    try:
        with torch.no_grad():
            samples = encode_records(comps, records, args.resolution, device)
        target = attack_target(comps, unet, trainer.cfg.eval, records, device)
        n, batch = len(samples), min(args.attack_batch, len(samples))
        members, nonmembers = samples.subset(range(len(trainer.split.members))), samples.subset(range(len(trainer.split.members), n))
        shape = f"latents {list(samples.latents.shape[1:])}, text states {list(samples.cond.shape[1:])}"
        for name in ATTACKS:
            entry = {"name": name, "target": where, "n": n, "batch_size": batch, "inputs": shape}
            try:
                attack = REGISTRY.get(name)()
                sync(device)
                start = time.perf_counter()
                attack.calibrate(target, members, nonmembers, batch_size=batch, progress=False)  # picks the timestep
                sync(device)
                entry["calibrate_s"] = round(time.perf_counter() - start, 3)
                start = time.perf_counter()
                scored = attack.score(target, samples, batch, progress=False)
                sync(device)
                seconds = time.perf_counter() - start
                calls = max(1, int(round(scored.nfe_per_sample * -(-n // batch))))
                raw = raw_throughput(unet, samples, batch, calls, device)
                nfe_s = scored.nfe_per_sample * n / seconds
                entry.update(status="ok", seconds=round(seconds, 3), samples_per_s=round(n / seconds, 3),
                             nfe_per_sample=round(scored.nfe_per_sample, 2), attack_nfe_per_s=round(nfe_s, 2),
                             unet_nfe_per_s=round(raw, 2), ratio_to_unet=round(nfe_s / raw, 3),
                             scores_finite=bool(all(math.isfinite(float(s)) for s in scored.scores)))
            except Exception as exc:  # one attack failing must not hide the others
                entry.update(status="error", reason=f"error: {type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-3000:])
            rows.append(entry)
        with torch.no_grad():
            raw = raw_throughput(unet, samples, batch, max(2, -(-n // batch)), device)
        rows.append({"name": "unet forward", "target": where, "n": n, "batch_size": batch, "inputs": shape, "status": "ok",
                     "unet_nfe_per_s": round(raw, 2), "samples_per_s": round(raw, 2), "nfe_per_sample": 1.0,
                     "note": "the attacks' query unit: one batched conditional UNet forward per row (no_grad)"})
    except Exception as exc:  # encoding the samples or building the target failed: every attack row says why
        reason = f"error: {type(exc).__name__}: {exc}"
        done = {r["name"] for r in rows}
        rows += [{"name": a, "status": "error", "reason": reason, "traceback": traceback.format_exc()[-3000:]}
                 for a in (*ATTACKS, "unet forward") if a not in done]
    finally:
        if was_training:
            unet.train()
    return rows


# ---------------------------------------------------------------------- output
def ratios(report: dict) -> list[dict]:
    by_name = {r["name"]: r for r in report["train_rows"]}
    out = []
    for r in report["train_rows"]:
        ref = by_name.get(r.get("reference") or "")
        if ref is None:
            continue
        entry = {"row": r["name"], "reference": ref["name"]}
        if r.get("status") == "ok" and ref.get("status") == "ok":
            entry.update(status="ok", time_ratio=round(r["ms_per_step"] / ref["ms_per_step"], 3),
                         peak_memory_ratio=round(r["peak_mib"] / ref["peak_mib"], 3) if ref["peak_mib"] > 0 else None,
                         step_memory_ratio=round(r["step_mib"] / ref["step_mib"], 3) if ref["step_mib"] > 0 else None)
        else:
            entry.update(status="skipped", reason=f"skipped: {r['name'] if r.get('status') != 'ok' else ref['name']} has no numbers")
        out.append(entry)
    return out


def markdown(report: dict) -> str:
    env = report["environment"]
    if "settings" not in report:
        return f"# privtune GPU check ({report['mode']})\n\n{env['device']}: {report.get('error', 'no settings')}\n"
    s = report["settings"]
    rat = {r["row"]: r for r in report["ratios"]}
    seen = next((r["evidence"] for r in report["train_rows"] if "text_states" in r.get("evidence", {})), None)
    if seen:  # the shapes the trainer actually cached
        s = {**s, "latents": "x".join(map(str, seen["latents"])), "text_states": "x".join(map(str, seen["text_states"]))}
    lines = [f"# privtune GPU check ({report['mode']})", "",
             f"{env['device']}; CUDA {env['cuda_version']}; torch {env['torch']}, diffusers {env['diffusers']}, peft {env['peft']}, "
             f"bitsandbytes {env['bitsandbytes']}, opacus {env['opacus']}; git {env.get('git')}.",
             f"Model: {s['model']}; batch {s['batch_size']} at {s['resolution']} px ({s['latents']} latents, {s['text_states']} text "
             f"states); LoRA rank {s['rank']} on `{s['targets']}`; {s['warmup']} warm-up + {s['repeats']} windows x {s['steps']} "
             f"steps per row. Peak = {report['memory_note']}. Wall time {report.get('wall_s', 0):.0f} s.", "",
             "| check | variant | time | throughput | peak MiB | step MiB | vs reference | status |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["train_rows"]:
        check = "DP-SGD" if r["recipe"] == "dpsgd" else "LoRA step"
        if r.get("status") == "ok":
            ref = rat.get(r["name"])
            vs = (f"x{ref['time_ratio']:.2f} time, x{ref['peak_memory_ratio']:.2f} peak vs {ref['reference']}"
                  if ref and ref.get("status") == "ok" else "")
            ev = r["evidence"]
            note = f"ok: {ev['optimizer']}" + (", GradScaler" if ev["grad_scaler"] else "") + (
                "" if r["loss_finite"] else f", loss {r['loss']}") + (
                f", {r['allocated_before_mib']:.0f} MiB left by earlier rows" if r.get("allocated_before_mib", 0) > 64 else "")
            lines.append(f"| {check} | {r['name']} | {r['ms_per_step']:.1f} ms/step | {r['img_per_s']:.2f} img/s | {r['peak_mib']:.0f} | "
                         f"{r['step_mib']:.0f} | {vs} | {note} |")
        else:
            lines.append(f"| {check} | {r['name']} | | | | | | {r['reason'].splitlines()[0][:160]} |")
    for a in report["attacks"]:
        if a.get("status") == "ok" and a["name"] == "unet forward":
            lines.append(f"| attack | unet forward | | {a['unet_nfe_per_s']:.1f} NFE/s | | | batch {a['batch_size']} | ok: query unit |")
        elif a.get("status") == "ok":
            lines.append(f"| attack | {a['name']} | {a['seconds']:.2f} s / {a['n']} samples (+{a['calibrate_s']:.2f} s calibration) | "
                         f"{a['samples_per_s']:.2f} samples/s "
                         f"({a['nfe_per_sample']:g} NFE each) | | | x{a['ratio_to_unet']:.2f} of UNet NFE/s | ok |")
        else:
            lines.append(f"| attack | {a['name']} | | | | | | {a['reason'].splitlines()[0][:160]} |")
    return "\n".join(lines) + "\n"


def write(report: dict, out: Path) -> None:
    report["ratios"] = ratios(report)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))


def skipped(row: Row, reason: str) -> dict:
    return {"name": row.name, "recipe": row.recipe, "mixed_precision": row.mixed_precision,
            "gradient_checkpointing": row.gradient_checkpointing, "use_8bit": row.use_8bit, "noise_multiplicity": row.multiplicity,
            "reference": row.reference, "status": "skipped", "reason": reason}


# ---------------------------------------------------------------------- main
def parse_args(argv):
    ap = common.parser(__doc__)
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes, 1 step per row: proves the code path on a CPU in < 3 min")
    ap.add_argument("--out", type=Path, help=f"output folder (default {FULL['out']}, {DRY['out']} with --dry-run)")
    for key in ("resolution", "batch_size", "members", "nonmembers", "warmup", "steps", "repeats", "attack_batch"):
        ap.add_argument("--" + key.replace("_", "-"), type=int, help=f"default {FULL[key]} ({DRY[key]} with --dry-run)")
    ap.add_argument("--budget-s", type=float, help=f"start no row after this many seconds (default {FULL['budget_s']:g}, "
                                                   f"{DRY['budget_s']:g} with --dry-run)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", default="attn", help="lora.targets preset (attn: the attention projections)")
    ap.add_argument("--rows", help="comma-separated row names to run (default: all): " + ", ".join(r.name for r in ROWS))
    ap.add_argument("--attack-row", default="lora bf16", help="the row whose trained UNet the attacks query ('' = no attacks)")
    common.add_threads(ap, None, help="torch intra-op threads (CPU default 1)")
    args = ap.parse_args(argv)
    defaults = DRY if args.dry_run else FULL
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, Path(value) if key == "out" else value)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    wall0 = time.perf_counter()
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # one line per row in the log, not per data pass
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible (torch.cuda.is_available() is False, torch "
              f"{torch.__version__}, built for CUDA {torch.version.cuda}). This check needs an NVIDIA GPU; run "
              "`bash benchmarks/gpu_check.sh --dry-run` to prove the code path on a CPU.", file=sys.stderr)
        return 2
    device = common.default_device()
    common.set_threads(args.threads, device)
    rows = ROWS
    if args.rows:
        wanted = [w.strip() for w in args.rows.split(",") if w.strip()]
        unknown = sorted(set(wanted) - {r.name for r in ROWS})
        if unknown:
            print(f"gpu_check: unknown --rows {unknown}; rows: {[r.name for r in ROWS]}", file=sys.stderr)
            return 2
        rows = tuple(r for r in ROWS if r.name in wanted)
    out = args.out if args.out.is_absolute() else REPO / args.out
    mem_note = ("torch.cuda.max_memory_allocated over the timed steps (all resident tensors + the step); step = peak minus "
                "the allocation at the window start" if device.type == "cuda" else
                "RSS high-water over the timed steps (VmHWM) plus the RSS at the window start; step = the high-water rise")
    report = {"mode": "dry-run" if args.dry_run else "gpu", "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
              "environment": environment(device), "memory_note": mem_note, "train_rows": [], "attacks": [], "ratios": []}
    failed = False
    with tempfile.TemporaryDirectory(prefix="privtune-gpu-check-") as tmp:
        tmp = Path(tmp)
        try:
            model = build_model_folder(tmp / "model", args.dry_run, device)
        except Exception as exc:  # nothing can run without the model: say so in both files
            report.update(error=f"error: building the model folder failed: {type(exc).__name__}: {exc}",
                          traceback=traceback.format_exc()[-4000:], wall_s=round(time.perf_counter() - wall0, 1))
            print(report["traceback"], file=sys.stderr)
            write(report, out)
            return 1
        lat = args.resolution // 8
        width = 768 // (DRY_SCALE if args.dry_run else 1)
        what = f"SD v1.5 architecture, widths / {DRY_SCALE}" if args.dry_run else "SD v1.5 architecture (random weights)"
        report["settings"] = {"model": f"{what}, {model['parameters']['unet'] / 1e6:.1f} M UNet params",
                              "model_build": model, "resolution": args.resolution, "latents": f"4x{lat}x{lat}",
                              "text_states": f"{MAX_LENGTH}x{width}", "batch_size": args.batch_size, "rank": args.rank,
                              "targets": args.targets, "members": args.members, "nonmembers": args.nonmembers,
                              "warmup": args.warmup, "steps": args.steps, "repeats": args.repeats, "budget_s": args.budget_s,
                              "attack_row": args.attack_row, "attack_batch": args.attack_batch, "threads": torch.get_num_threads()}
        print(f"gpu_check: {report['mode']} on {report['environment']['device']}; model {model['folder_mib']} MiB "
              f"built in {model['build_s']} s", flush=True)
        last_row_s = 0.0
        for row in rows:
            elapsed = time.perf_counter() - wall0
            if row.needs_cuda and device.type != "cuda":
                result = skipped(row, f"skipped: needs CUDA ({row.needs_cuda})")
            elif row.use_8bit and importlib.util.find_spec("bitsandbytes") is None:
                result = skipped(row, "skipped: bitsandbytes is not installed (pip install bitsandbytes)")
            elif elapsed + last_row_s > args.budget_s:
                result = skipped(row, f"skipped: time budget --budget-s {args.budget_s:g} spent ({elapsed:.0f} s elapsed)")
            else:
                before = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
                try:
                    result = run_row(row, str(tmp / "model"), tmp, device, args, report)
                    last_row_s = result["row_s"]
                except Exception as exc:
                    failed = True
                    result = skipped(row, f"error: {type(exc).__name__}: {exc}")
                    result.update(status="error", traceback=traceback.format_exc()[-4000:])
                    print(result["traceback"], file=sys.stderr)
                finally:
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                        result["allocated_before_mib"] = round(before, 1)  # left by earlier rows (should be ~0)
                        result["allocated_after_mib"] = round(torch.cuda.memory_allocated(device) / 2**20, 1)
            report["train_rows"].append(result)
            if row.name == args.attack_row and not report["attacks"]:
                report["attacks"] = [{"name": a, "status": "skipped", "reason": f"skipped: row {row.name!r} has no trained UNet "
                                      f"({result.get('reason', '')[:120]})"} for a in (*ATTACKS, "unet forward")]
            status = result.get("reason") or f"{result['ms_per_step']:.1f} ms/step, peak {result['peak_mib']:.0f} MiB"
            print(f"gpu_check: [{time.perf_counter() - wall0:6.1f} s] {row.name}: {status}", flush=True)
            report["wall_s"] = round(time.perf_counter() - wall0, 1)
            write(report, out)
        if args.attack_row and not report["attacks"]:
            reason = (f"skipped: --attack-row {args.attack_row!r} is not among the rows run" if args.attack_row in {r.name for r in ROWS}
                      else f"skipped: --attack-row {args.attack_row!r} is no row")
            report["attacks"] = [{"name": a, "status": "skipped", "reason": reason} for a in (*ATTACKS, "unet forward")]
    failed = failed or any(a.get("status") == "error" for a in report["attacks"])
    report["wall_s"] = round(time.perf_counter() - wall0, 1)
    write(report, out)
    print((out / "gpu_check.md").read_text())
    print(f"gpu_check: wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} in {report['wall_s']:.0f} s"
          + (" (some rows failed: see their reason)" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
