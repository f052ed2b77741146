"""The shadow model of `eval.shadow.enabled`: what the attacks' learned parts are fitted on in the papers' threat
model (CLiD's scaler and α, GSA's and SecMI-NN's classifiers, the quantile regressors; specs/attacks.md §4-6).

A shadow is the target's own resolved recipe trained again by `python -m privtune.train`, with a public seed
(`eval.shadow.seed`) and `data.exclude=<the target's run folder>`, so its members and non-members come from the
same source and share no row, group or image with the target's split. It lives in `<run>/shadows/shadow-0/`
(a run folder of its own, with its log beside it): a finished one is reused, an interrupted one resumed. It is
trained in a subprocess before the attacks, so an evaluation never nests two trainings in one process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from ..config import to_container
from ..errors import ConfigError, PrivtuneError

SHADOWS = "shadows"
NAME = "shadow-0"


def shadow_folder(run_dir: str | Path) -> Path:
    return Path(run_dir) / SHADOWS / NAME


def shadow_config(cfg, run_dir: str | Path) -> dict:
    """The shadow's recipe: the target's resolved config, its own seed and folder, the target's rows excluded,
    no evaluation and no validation images (a shadow is never released)."""
    if cfg.get("trainer") in ("dualmd", "distillmd"):
        raise ConfigError(f"eval.shadow: shadow models of {cfg.trainer} (several adapters or teachers) are not "
                          "supported yet; set eval.shadow.enabled=false")
    out = to_container(cfg)
    out.pop("recipe", None)
    out.update(seed=int(cfg.eval.shadow.seed), output_dir=str(shadow_folder(run_dir)), resume=None, overwrite=False,
               tracking="none")
    out["data"]["exclude"] = str(Path(run_dir))
    out["eval"]["enabled"] = False
    out["train"]["validation_every"] = 0
    return out


def finished(folder: Path) -> bool:
    lora = folder / "lora"
    return lora.is_dir() and any(lora.rglob("*.safetensors"))


def ensure_shadow(cfg, run_dir: str | Path, progress: bool = True) -> Path:
    """The shadow's run folder, trained (or resumed) first when it holds no exported LoRA."""
    run_dir = Path(run_dir)
    if not (run_dir / "split.json").is_file():
        raise ConfigError(f"eval.shadow needs the target's split.json in {run_dir} to keep the shadow's rows apart; "
                          "evaluate a privtune run folder (run=<dir>)")
    folder = shadow_folder(run_dir)
    if finished(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    recipe = folder.parent / f"{NAME}.yaml"
    recipe.write_text(OmegaConf.to_yaml(OmegaConf.create(shadow_config(cfg, run_dir))))
    args = [sys.executable, "-m", "privtune.train", f"recipe={recipe}"]
    if (folder / "config.yaml").is_file():
        args.append("resume=latest")
    log = folder.parent / f"{NAME}.log"
    if progress:
        print(f"privtune: training the shadow model in {folder} (log: {log})", flush=True)
    with open(log, "a") as f:
        f.write(f"# {' '.join(args)}\n")
        f.flush()
        done = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if done.returncode != 0 or not finished(folder):
        raise PrivtuneError(f"the shadow model's training failed (exit {done.returncode}); see {log}. Re-running the "
                            "evaluation resumes it")
    return folder
