"""`python -m privtune.attack_gradients run=<run dir> [batch=2] [modes=gidm,gidm+] [epsilons=64,8,1] ...`

What a federated server recovers from one shared LoRA update of this run's model (GIDM / GIDM+, see
privtune/eval/gradient_inversion.py): a seeded batch of the run's members, its gradient at the released
weights, shared plainly, clipped only, and clipped + noised at each epsilon (sigma calibrated for the run's
own sample rate and steps), and for a DP run also at the run's own sigma and C. Writes
`threats/gradient_inversion.json`, `plots/gradient_inversion.png` (truth | each reconstruction), and, when the
run has a report and a card, their gradient-inversion sections.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .errors import ConfigError, run_command
from .threat_cli import number as _number
from .threat_cli import open_run, parse_keys

HELP = __doc__ + """
keys: run=<run dir> (required)  batch=<images, default 2>  modes=<gidm,gidm+>  epsilons=<comma list, default 64,8,1>
      iterations=<Adam steps, default 300>  lr=<0.1>  t_candidates=<5>  screen_iterations=<25>  seed=<0>
      max_grad_norm=<C for the clip / DP rows; default the run's dp.max_grad_norm, else the dpsgd recipe's>
"""
KEYS = ("run", "batch", "modes", "epsilons", "iterations", "lr", "t_candidates", "screen_iterations", "seed", "max_grad_norm")
NAME = "gradient_inversion"


def _defenses(cfg, n: int, privacy, epsilons, max_grad_norm):
    from .config import load_config
    from .eval.gradient_inversion import DPSetting, calibrated_defenses

    if max_grad_norm is None:
        max_grad_norm = float(privacy["max_grad_norm"]) if privacy and privacy.get("max_grad_norm") else \
            float(load_config("dpsgd").dp.max_grad_norm)
    q = float(privacy["sample_rate"]) if privacy and privacy.get("sample_rate") else min(1.0, int(cfg.train.batch_size) / max(1, n))
    steps = int(privacy["steps"]) if privacy and privacy.get("steps") else int(cfg.train.max_steps)
    delta = float(privacy["delta"]) if privacy and privacy.get("delta") else 1.0 / (10 * n)
    rows = calibrated_defenses(epsilons, max_grad_norm, q, steps, delta)
    own = "none"
    if privacy and privacy.get("noise_multiplier") is not None:
        own = f"this run's DP step (eps={float(privacy.get('epsilon') or 0):.3g})"
        rows.insert(0, DPSetting(own, float(privacy.get("max_grad_norm") or max_grad_norm), float(privacy["noise_multiplier"]),
                                 privacy.get("epsilon")))
    return rows, own, {"sample_rate": q, "steps": steps, "delta": delta, "max_grad_norm": max_grad_norm}


def save_grid(images: dict, path: Path) -> Path:
    """Rows: truth, then each (defense, mode) reconstruction; one column per image of the batch."""
    import numpy as np
    from PIL import Image

    rows = [(k, v.permute(0, 2, 3, 1).numpy()) for k, v in images.items()]
    h, w = rows[0][1].shape[1:3]
    grid = np.ones((len(rows) * (h + 2), len(rows[0][1]) * (w + 2), 3))
    for i, (_, ims) in enumerate(rows):
        for j, im in enumerate(ims):
            grid[i * (h + 2):i * (h + 2) + h, j * (w + 2):j * (w + 2) + w] = im
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((grid * 255).round().astype("uint8")).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(path)
    (path.with_suffix(".txt")).write_text("rows, top to bottom: " + "; ".join(k for k, _ in rows) + "\n")
    return path


def attack(argv) -> dict:
    import torch

    from .eval.encode import encode_records
    from .eval.gradient_inversion import InversionConfig, attack_batch, card_line, markdown_lines, to_dict
    from .logging_utils import quiet_libraries

    quiet_libraries()
    own = parse_keys(argv, KEYS)
    modes = [m.strip() for m in own.get("modes", "gidm").split(",") if m.strip()]
    try:
        epsilons = [float(e) for e in own.get("epsilons", "64,8,1").split(",") if e.strip()]
    except ValueError as exc:
        raise ConfigError(f"epsilons={own['epsilons']!r} is not a comma list of numbers") from exc
    if any(not e > 0 for e in epsilons):
        raise ConfigError(f"epsilons must be > 0 (got {epsilons})")
    cfg_inv = InversionConfig(mode=modes[0] if modes else "", iterations=_number(own, "iterations", int, 300),
                              lr=_number(own, "lr", float, 0.1), t_candidates=_number(own, "t_candidates", int, 5),
                              screen_iterations=_number(own, "screen_iterations", int, 25), seed=_number(own, "seed", int, 0))
    for m in modes or [""]:
        InversionConfig(mode=m).check()
    cfg_inv.check()
    batch = _number(own, "batch", int, 2)
    if batch < 1:
        raise ConfigError(f"batch must be >= 1 (got {batch})")
    mgn = _number(own, "max_grad_norm", float, None) if "max_grad_norm" in own else None
    if mgn is not None and not mgn > 0:
        raise ConfigError(f"max_grad_norm must be > 0 (got {mgn})")

    target = open_run(own["run"], "gradient inversion")
    cfg, privacy, split, run = target.cfg, target.privacy, target.split, target.path
    defenses, own_name, dp_info = _defenses(cfg, len(split.members), privacy, epsilons, mgn)
    if batch > len(split.members):
        raise ConfigError(f"batch={batch} exceeds the run's {len(split.members)} members")
    gen = torch.Generator().manual_seed(cfg_inv.seed)
    chosen = [split.members[i] for i in torch.randperm(len(split.members), generator=gen)[:batch].tolist()]

    components = target.load_components()
    enc = encode_records(components, chosen, int(cfg.data.resolution), torch.device("cpu"))
    start = time.perf_counter()

    def show(row):
        print(f"privtune: {row.defense['name']} / {row.mode}: PSNR {row.psnr:.2f} dB, SSIM {row.ssim:.3f} "
              f"(chance {row.chance_psnr:.2f} / {row.chance_ssim:.3f}), {row.seconds:.0f} s", flush=True)

    rows, images = attack_batch(components, components.unet, enc.latents, enc.cond, defenses, modes, cfg_inv,
                                seed=cfg_inv.seed, progress=show)
    settings = {"batch": batch, "own": own_name, **dp_info, "attack": {k: getattr(cfg_inv, k) for k in
                ("iterations", "lr", "t_candidates", "screen_iterations", "seed")}, "modes": modes,
                "seconds": round(time.perf_counter() - start, 1)}
    result = to_dict(rows, settings)
    save_grid(images, run / "plots" / f"{NAME}.png")
    lines = [*markdown_lines(result), "", f"![truth | reconstructions](plots/{NAME}.png)"]
    target.publish(NAME, "Gradient inversion", result, lines, card_line(result))
    return result


def main(argv: list[str] | None = None) -> int:
    code, result = run_command(attack, sys.argv[1:] if argv is None else argv, HELP)
    if result is not None:
        print(json.dumps({r["defense"]["name"] + "/" + r["mode"]: round(r["psnr"], 2) for r in result["rows"]}))
    return code


if __name__ == "__main__":
    sys.exit(main())
