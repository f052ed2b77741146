"""SIDE vs unguided sampling at an equal number of generations, on a tiny-SD LoRA that memorized (issue 19 part 1).

The target: a LoRA fine-tuned on `--members` pixel-art portraits (dp_pool rows) that all share ONE caption, so
the model is in effect unconditional (SIDE's setting), `--duplicated` of them repeated `--repeats` times among
the training rows (Carlini et al.'s regime: a few heavily duplicated images, the rest seen a few hundred times).
Unguided sampling keeps returning the duplicated images; SIDE clusters a pool of its own generations, trains a
time-dependent classifier on noisy latents of the pool, and guides each cluster. Both arms are confirmed the
same way (tiled l2 <= delta against each member's VAE reconstruction). Prints a markdown table; writes results.json.

    OMP_NUM_THREADS=1 python benchmarks/side.py --out runs/side
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
CAPTION = "pixel art portrait"


def main() -> None:
    from omegaconf import OmegaConf

    from privtune.data.sources import load_source
    from privtune.data.split import load_manifest, split_from_manifest
    from privtune.eval import property_inference as pi
    from privtune.eval import side
    from privtune.evaluate import with_current_defaults
    from privtune.models.loading import freeze, load_components
    from privtune.models.lora import load_lora

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/side")
    ap.add_argument("--members", type=int, default=64)
    ap.add_argument("--duplicated", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--generations", type=int, default=256)
    ap.add_argument("--pool", type=int, default=96)
    ap.add_argument("--clusters", type=int, default=8)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--delta", type=float, default=0.1)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = ap.parse_args()
    out = Path(args.out)
    rows = pi.portraits_rows(pi.TRAINING_SUBSET).iloc[:args.members].copy()
    rows["caption"] = CAPTION
    data = out / "data"
    if not (data / "metadata.jsonl").is_file():
        data.mkdir(parents=True, exist_ok=True)
        lines = []
        for i, image in enumerate(pi.decode_images(rows)):
            image.save(data / f"img{i:04d}.png")
            lines.append(json.dumps({"file_name": f"img{i:04d}.png", "caption": CAPTION, "group": f"row{i:04d}"}))
        (data / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    run = out / "run"
    if not (run / "lora" / "pytorch_lora_weights.safetensors").is_file():
        subprocess.run([sys.executable, "-m", "privtune.train", "recipe=lora", f"output_dir={run}", f"data.source={data}",
                        "data.subset=null", f"data.members={args.members}", "data.nonmembers=0",
                        f"data.duplicate.members={args.duplicated}", f"data.duplicate.repeats={args.repeats}",
                        f"train.max_steps={args.steps}", "train.validation_every=0", "train.checkpoint_every=0",
                        "train.log_every=100", "eval.enabled=false", "overwrite=true"], check=True, cwd=REPO)
    cfg = with_current_defaults(OmegaConf.load(run / "config.yaml"))
    manifest = load_manifest(run)
    split = split_from_manifest(manifest, load_source(cfg.data).records)
    duplicated = set((manifest.get("training_rows") or {}).get("duplicated") or {})
    comps = load_components(cfg.model)
    freeze(comps.vae, comps.text_encoder, comps.unet)
    load_lora(comps, run / "lora")
    comps.unet.eval()
    results = []
    for seed in args.seeds:
        scfg = side.SideConfig(generations=args.generations, pool=args.pool, clusters=args.clusters, guidance=args.guidance,
                               delta=args.delta, seed=seed)
        r = side.side_on_pipeline(comps, comps.unet, split.members, scfg, int(cfg.data.resolution), prompt=CAPTION)
        for arm in ("side", "unguided"):
            r[arm]["duplicated_extracted"] = len(set(r[arm]["extracted_members"]) & duplicated)
        results.append(r)
        print(f"seed {seed}: SIDE {r['side']['unique_members']} unique ({r['side']['matched_generations']} matched), "
              f"unguided {r['unguided']['unique_members']} ({r['unguided']['matched_generations']})", flush=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "duplicated": sorted(duplicated),
                                                  "results": [{k: v for k, v in r.items()} for r in results]}, indent=1))
    print(f"\n{args.members} members ({args.duplicated} x {args.repeats} duplicated), {args.steps} steps; "
          f"{args.generations} generations per arm; settings {asdict(scfg)}\n")
    print("| seed | arm | unique members extracted | of them duplicated | singletons | matched generations | seconds |")
    print("|---|---|---|---|---|---|---|")
    for seed, r in zip(args.seeds, results):
        for arm, name in (("side", f"SIDE (pool {args.pool} + {args.generations - args.pool} guided, {args.clusters} clusters)"),
                          ("unguided", "unguided")):
            a = r[arm]
            print(f"| {seed} | {name} | {a['unique_members']} | {a['duplicated_extracted']} | "
                  f"{a['unique_members'] - a['duplicated_extracted']} | {a['matched_generations']} | {a['seconds']} |")


if __name__ == "__main__":
    main()
