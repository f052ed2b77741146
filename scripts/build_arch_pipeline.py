"""Write a random-weight pipeline with the published SD v1.5 or SDXL base 1.0 architecture (privtune.models.arch).

    python scripts/build_arch_pipeline.py --arch sd15 --out runs/arch/sd15              # full width (~4 GB)
    python scripts/build_arch_pipeline.py --arch sdxl --scale 8 --out runs/arch/sdxl-8  # a CPU-sized SDXL

The folder loads with StableDiffusionPipeline / StableDiffusionXLPipeline.from_pretrained and trains with
`python -m privtune.train model.base=<folder> ...`; no download happens.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from privtune.models.arch import ARCHS, build_pipeline, parameter_count, scaled  # noqa: E402


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=sorted(ARCHS), required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--scale", type=int, default=1, help="divide every width by this (1 = the published sizes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fp16", action="store_true", help="store the weights in fp16 (half the disk; loads in any dtype)")
    args = ap.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        ap.error(f"--out {args.out} exists and is not empty; pass a new folder")
    t0 = time.time()
    arch = scaled(ARCHS[args.arch], args.scale)
    build_pipeline(arch, args.out, args.seed, dtype=torch.float16 if args.fp16 else torch.float32)
    print(f"{arch.name}: {parameter_count(args.out) / 1e6:.1f} M parameters -> {args.out} ({time.time() - t0:.0f} s)")
    return args.out


if __name__ == "__main__":
    main()
