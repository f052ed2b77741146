"""The shadow models of `eval.shadow`: what the attacks' learned parts are fitted on in the papers' threat model
(CLiD's scaler and α, GSA's and SecMI-NN's classifiers, the quantile regressors; specs/attacks.md §4-6).

A shadow is the target's own resolved recipe trained again by `python -m privtune.train`, with a public seed
(`eval.shadow.seed` + i for shadow i) and `data.exclude=<the target's run folder>`, so its members and non-members
come from the same source and share no row, group or image with the target's split. Shadows differ from one another
by their seed, which draws their own member / non-member split of the remaining rows; `eval.shadow.count` of them
are pooled. Shadow i lives in `<run>/shadows/shadow-<i>/` (a run folder of its own, with its log beside it): a
finished one is reused, an interrupted one resumed. Each is trained in a subprocess before the attacks, so an
evaluation never nests two trainings in one process.
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


def shadow_name(index: int) -> str:
    return f"shadow-{int(index)}"


def shadow_folder(run_dir: str | Path, index: int = 0) -> Path:
    return Path(run_dir) / SHADOWS / shadow_name(index)


def shadow_seed(cfg, index: int = 0) -> int:
    return int(cfg.eval.shadow.seed) + int(index)


def shadow_config(cfg, run_dir: str | Path, index: int = 0) -> dict:
    """Shadow `index`'s recipe: the target's resolved config, its own seed and folder, the target's rows excluded,
    no evaluation and no validation images (a shadow is never released)."""
    if cfg.get("trainer") in ("dualmd", "distillmd"):
        raise ConfigError(f"eval.shadow: shadow models of {cfg.trainer} (several adapters or teachers) are not "
                          "supported yet; set eval.shadow.enabled=false")
    out = to_container(cfg)
    out.pop("recipe", None)
    out.update(seed=shadow_seed(cfg, index), output_dir=str(shadow_folder(run_dir, index)), resume=None,
               overwrite=False, tracking="none")
    out["data"]["exclude"] = str(Path(run_dir))
    out["eval"]["enabled"] = False
    out["train"]["validation_every"] = 0
    return out


VOLATILE = ("recipe", "resume", "overwrite", "output_dir")  # how a run was launched, not what it trained


def stale_settings(cfg, run_dir: str | Path, index: int) -> list[str]:
    """The training settings a cached shadow `index` was trained with that this evaluation's shadow recipe changes
    (its seed, the target's rows, the recipe itself); eval.* settings are the evaluation's own and not compared."""
    from ..config import flat

    saved = shadow_folder(run_dir, index) / "config.yaml"
    if not saved.is_file():
        return []
    want = flat(OmegaConf.create(shadow_config(cfg, run_dir, index)))
    have = flat(OmegaConf.load(saved))
    return [f"{k}={have[k]!r} (now {want[k]!r})" for k in sorted(set(want) & set(have))
            if not k.startswith("eval.") and k not in VOLATILE and str(want[k]) != str(have[k])]


def finished(folder: Path) -> bool:
    lora = folder / "lora"
    return lora.is_dir() and any(lora.rglob("*.safetensors"))


def ensure_shadows(cfg, run_dir: str | Path, progress: bool = True) -> list[Path]:
    """The `eval.shadow.count` shadows' run folders, each trained (or resumed) first when it holds no exported LoRA."""
    return [ensure_shadow(cfg, run_dir, i, progress) for i in range(int(cfg.eval.shadow.count))]


def ensure_shadow(cfg, run_dir: str | Path, index: int = 0, progress: bool = True) -> Path:
    """Shadow `index`'s run folder, trained (or resumed) first when it holds no exported LoRA."""
    run_dir = Path(run_dir)
    if not (run_dir / "split.json").is_file():
        raise ConfigError(f"eval.shadow needs the target's split.json in {run_dir} to keep the shadow's rows apart; "
                          "evaluate a privtune run folder (run=<dir>)")
    folder, name = shadow_folder(run_dir, index), shadow_name(index)
    stale = stale_settings(cfg, run_dir, index)
    if stale:
        raise ConfigError(f"the cached shadow model {folder} was trained with {', '.join(stale[:4])}"
                          f"{' and more' if len(stale) > 4 else ''}; this evaluation's shadow differs. Delete {folder} "
                          "to train it again, or evaluate with the settings it was trained with")
    if finished(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    recipe = folder.parent / f"{name}.yaml"
    recipe.write_text(OmegaConf.to_yaml(OmegaConf.create(shadow_config(cfg, run_dir, index))))
    args = [sys.executable, "-m", "privtune.train", f"recipe={recipe}"]
    if (folder / "config.yaml").is_file():
        args.append("resume=latest")
    log = folder.parent / f"{name}.log"
    if progress:
        print(f"privtune: training shadow model {index + 1}/{int(cfg.eval.shadow.count)} in {folder} (log: {log})",
              flush=True)
    with open(log, "a") as f:
        f.write(f"# {' '.join(args)}\n")
        f.flush()
        done = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if done.returncode != 0 or not finished(folder):
        raise PrivtuneError(f"shadow model {name}'s training failed (exit {done.returncode}); see {log}. Re-running the "
                            "evaluation resumes it")
    return folder
