"""Property inference vs the true proportion, with and without PriSampler (issue 19 parts 3-4).

Fine-tunes tiny-SD LoRAs on `dp_pool` pixel-art rows of which a fraction p in {0.2, 0.5, 0.8} wears
glasses / sunglasses (captions without the eyewear clause), and one auxiliary LoRA on disjoint rows at
p* = 0.5; then estimates p from N generations (prompts without the eyewear clause) and, on the p = 0.8 and
p = 0.2 targets, with PriSampler at lam in {0, 0.5, 1}. Also reports the estimate mapped through the other
undefended targets as the adversary's shadow models (`shadow_calibrated`, leave-one-out). Prints a markdown
table; writes results.json.

    OMP_NUM_THREADS=1 python benchmarks/property_inference.py --out runs/property_inference
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def train(data: Path, run: Path, steps: int, members: int, seed: int) -> Path:
    lora = run / "lora"
    if (lora / "pytorch_lora_weights.safetensors").is_file():
        return lora
    cmd = [sys.executable, "-m", "privtune.train", "recipe=lora", f"output_dir={run}", f"data.source={data}", "data.subset=null",
           f"data.members={members}", "data.nonmembers=0", f"train.max_steps={steps}", "train.validation_every=0",
           "train.checkpoint_every=0", "train.log_every=50", "eval.enabled=false", f"seed={seed}", "overwrite=true"]
    subprocess.run(cmd, check=True, cwd=REPO)
    return lora


def main() -> None:
    from privtune.eval import property_inference as pi
    from privtune.models.loading import EMBEDDED_MODEL

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/property_inference")
    ap.add_argument("--members", type=int, default=256)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--generations", type=int, default=128)
    ap.add_argument("--proportions", type=float, nargs="+", default=[0.2, 0.5, 0.8])
    ap.add_argument("--target-proportion", type=float, default=0.5)
    ap.add_argument("--lams", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    ap.add_argument("--defended", type=float, nargs="+", default=[0.8, 0.2], help="targets PriSampler runs on")
    ap.add_argument("--steps-inference", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=3.0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = pi.PropertySpec()

    rows = pi.portraits_rows(pi.TRAINING_SUBSET)
    used: list[str] = []
    loras, truth = {}, {}
    for i, p in enumerate([*args.proportions, "aux"]):
        q = args.target_proportion if p == "aux" else p
        chosen = pi.choose_rows(rows, spec, q, args.members, seed=100 + i, exclude_ids=used)
        used += chosen["id"].tolist()
        name = "aux" if p == "aux" else f"p{p:g}"
        data = pi.write_property_folder(chosen, out / "data" / name, spec)
        truth[name] = float(pi.has_property(chosen, spec).mean())
        loras[name] = train(data, out / "runs" / name, args.steps, args.members, seed=i)

    calibration = pi.calibrate(spec, exclude_ids=used)
    pool = pi.portraits_rows(pi.CALIBRATION_SUBSET)
    prompts = pool.sample(n=args.generations, random_state=0).reset_index(drop=True)
    reference = pi.decode_images(pool)
    results = []
    for p in args.proportions:
        name = f"p{p:g}"
        pipe = pi.load_pipeline(str(EMBEDDED_MODEL), loras[name], loras["aux"])
        lams = args.lams if p in args.defended else [0.0]
        for lam in lams:
            opts = pi.PriSamplerOptions(lam=lam, aux=str(loras["aux"]), target_proportion=truth["aux"])
            r = pi.property_inference(pipe, prompts, spec, calibration, true_proportion=truth[name], options=opts,
                                      steps=args.steps_inference, guidance=args.guidance, reference_images=reference,
                                      model=name)
            results.append(r.to_dict())
            print(f"{name} lam={lam}: p_hat={r.estimate['p_hat']:.3f} p_corr={r.estimate['p_corr']:.3f}", flush=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "aux_proportion": truth["aux"], "results": results}, indent=1))
    print(f"\nTPR {calibration.tpr:.3f}, FPR {calibration.fpr:.3f} ({calibration.source}); "
          f"{args.generations} generations per row, {args.members} training rows, {args.steps} steps; aux p* = {truth['aux']:.2f}\n")
    plain = {r["model"]: r for r in results if not r["prisampler"]["lam"]}
    for r in results:  # leave-one-out: the other undefended targets are the adversary's shadow models
        shadows = [(o["p_corr"], o["p_true"]) for name, o in plain.items() if name != r["model"]]
        r["p_shadow"] = pi.shadow_calibrated(r["p_corr"], shadows) if len(shadows) >= 2 else None
    (out / "results.json").write_text(json.dumps({"args": vars(args), "aux_proportion": truth["aux"], "results": results}, indent=1))
    print("| target p | PriSampler lam | p_hat [95% CI] | p_corr [95% CI] | abs(p_hat - p) | abs(p_corr - p) | abs(p_corr - p*) "
          "| p_shadow (leave-one-out) | abs(p_shadow - p) | style acc. | other-slot acc. | FD |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        u = r["utility"]
        print(f"| {r['p_true']:.2f} | {r['prisampler']['lam']:g} | {r['p_hat']:.3f} [{r['p_hat_ci'][0]:.3f}, {r['p_hat_ci'][1]:.3f}] "
              f"| {r['p_corr']:.3f} [{r['p_corr_ci'][0]:.3f}, {r['p_corr_ci'][1]:.3f}] | {r['error_p_hat']:.3f} "
              f"| {r['error_p_corr']:.3f} | {abs(r['p_corr'] - truth['aux']):.3f} | {_f(r['p_shadow'])} "
              f"| {_f(None if r['p_shadow'] is None else abs(r['p_shadow'] - r['p_true']))} | {u['style_accuracy']:.3f} "
              f"| {u['other_slots_accuracy']:.3f} | {u['frechet_distance']:.2f} |")


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"


if __name__ == "__main__":
    main()
