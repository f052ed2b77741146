"""Cost of one DP-SGD step against the non-private LoRA step at the same batch.

Variants run side by side in one process, on the same embedded UNet, LoRA shape (the recipes' defaults:
rank 16, `full` targets), cached latents and batch size; interleaved timed windows as in
`train_step.py` (`common.measure`; the paired per-window ratio is the one the goals are judged on):

  lora            `Trainer.optimizer_step`: mean loss, backward, global clipping, AdamW
  dp_hooks        DP-SGD step, K = 1: Opacus GradSampleModule hooks (per-layer closed-form per-sample
                  gradients of the LoRA Linear / Conv layers), per-example clipping, one Gaussian draw
  dp_functorch    the same step with Opacus' functorch path (vmap(grad) per layer) instead of the formulas
  dp_hooks_k{K}   dp_hooks with noise multiplicity K: every example runs K (timestep, noise) draws, so the
                  UNet sees K x batch rows (the price of DPDM's variance reduction, not of privacy)
  dp_vmap_{m}     with --vmap-methods: dp.grad_sample=vmap (torch.func over the whole UNet) for lora.method=m
                  (lora, dora, lokr, loha; the last three have no Opacus per-layer path)

Fixed-size batches (dp.poisson=false) so every variant processes exactly `--batch-size` examples.
Goals (issue 5): dp / lora <= 1.3 in time and in peak memory.

    python benchmarks/dp_step.py --steps 2 --repeats 9 --batch-size 16 --threads 2
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import common
import torch
from common import TrainerStep, build_trainer, measure, print_table, ratios


class DPStep:
    """The DP trainer's `optimizer_step`, advancing the step as `Trainer.train` does."""

    def __init__(self, trainer):
        self.trainer = trainer

    def __call__(self) -> float:
        self.trainer.state.reseed()
        logs = self.trainer.optimizer_step(0)
        self.trainer.state.step += 1
        return logs["loss"]


def dp_trainer(run_dir: Path, base: str, batch_size: int, k: int, grad_sample: str, extra=()):
    return build_trainer("dpsgd", run_dir, base, batch_size, [*extra,
        "dp.target_epsilon=null", "dp.noise_multiplier=1.0", "dp.noise_seed=0", "dp.poisson=false",
        f"dp.noise_multiplicity={k}", f"dp.grad_sample={grad_sample}", "train.max_steps=100000"])


def main(argv=None) -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per timed window")
    parser.add_argument("--repeats", type=int, default=9, help="timed windows per variant (interleaved)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--multiplicity", type=int, default=8, help="K of the dp_hooks_k variant (0 = skip it)")
    common.add_threads(parser, 2)
    common.add_base(parser)
    parser.add_argument("--targets", default="full", help="LoRA targets preset of every variant: full | attn")
    parser.add_argument("--vmap-methods", default="", help="comma-separated lora.method values to time with dp.grad_sample=vmap")
    args = parser.parse_args(argv)

    device = common.default_device()
    common.set_threads(args.threads, device)
    path = common.base_path(args.base)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        targets = [f"lora.targets={args.targets}"]
        lora = build_trainer("lora", tmp / "lora", path, args.batch_size, targets)
        variants = {
            "lora": TrainerStep(lora),
            "dp_hooks": DPStep(dp_trainer(tmp / "hooks", path, args.batch_size, 1, "hooks", targets)),
            "dp_functorch": DPStep(dp_trainer(tmp / "functorch", path, args.batch_size, 1, "functorch", targets)),
        }
        if args.multiplicity > 1:
            variants[f"dp_hooks_k{args.multiplicity}"] = DPStep(
                dp_trainer(tmp / "k", path, args.batch_size, args.multiplicity, "hooks", targets))
        for method in filter(None, args.vmap_methods.split(",")):
            variants[f"dp_vmap_{method}"] = DPStep(dp_trainer(tmp / f"vmap-{method}", path, args.batch_size, 1, "vmap",
                                                              [*targets, f"lora.method={method}"]))
        results = measure(variants, args.steps, args.repeats, args.warmup, device)

    where = common.device_name(device)
    n_lora = sum(p.numel() for p in lora.trainable)
    print(f"device: {where}; torch {torch.__version__}; threads {torch.get_num_threads()}; model {path}")
    print(f"batch {args.batch_size}, LoRA rank {lora.cfg.lora.rank} ({lora.cfg.lora.targets}, {n_lora} params), "
          f"{args.repeats} interleaved windows x {args.steps} steps; peak memory: {results['_memory_method']}")
    print_table("embedded model", results, args.batch_size)
    print()
    summary = {"device": where, "threads": torch.get_num_threads(), "batch_size": args.batch_size,
               "ms_per_step": {}, "peak_mib": {}, "time_ratio_to_lora": {}, "memory_ratio_to_lora": {}}
    for name, r in results.items():
        if name.startswith("_"):
            continue
        summary["ms_per_step"][name] = round(r["s_per_step"] * 1e3, 2)
        summary["peak_mib"][name] = round(r["peak_mib"], 1)
        if name == "lora":
            continue
        t = ratios(results, name, "lora")
        m = r["peak_mib"] / results["lora"]["peak_mib"]
        summary["time_ratio_to_lora"][name] = {k: round(v, 3) for k, v in t.items()}
        summary["memory_ratio_to_lora"][name] = round(m, 3)
        goal = "" if "_k" in name else (f"  (goals <= 1.3: time {'met' if t['paired'] <= 1.3 else 'MISSED'}, "
                                        f"memory {'met' if m <= 1.3 else 'MISSED'})")
        print(f"{name:<14}/ lora: time {t['paired']:.3f} paired ({t['median']:.3f} of medians, {t['cpu']:.3f} CPU), "
              f"peak memory {m:.3f}{goal}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
