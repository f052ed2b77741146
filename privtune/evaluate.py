"""`python -m privtune.evaluate run=<run dir>` or
`python -m privtune.evaluate model=<base> lora=<folder> members=<split.json|folder> [nonmembers=<folder>] out=<dir>`.

Re-runs the evaluation stage on a finished run (same seed, same scores as the automatic stage), or
attacks a LoRA trained elsewhere given its member and non-member data. A run's privacy record
(`privacy.json`) goes into the new report and card, so re-evaluating a DP run keeps its guarantee;
the card's "Reproduce" command stays the training command; an existing report is only replaced
with `overwrite=true`. A run written by an older privtune is read over its recipe's current
defaults, so keys added since then take their defaults.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from omegaconf import OmegaConf

from .config import flat, load_config, merge_strict, to_container
from .errors import ConfigError, DataError, PrivtuneError, run_command

HELP = """usage: python -m privtune.evaluate run=<run dir> [eval.attacks=[loss,secmi,pia] eval.KEY=VALUE ...]
       python -m privtune.evaluate model=<base> lora=<lora folder> members=<split.json | image folder>
                                   [nonmembers=<image folder>] out=<report folder> [data.source=...] [KEY=VALUE ...]
       add overwrite=true to replace an existing report.json in the output folder

Attacks a fine-tuned LoRA with membership-inference attacks and writes report.json, report.md, plots
and (for a run folder) the LoRA's privacy card. Under `accelerate launch` the attack work is sharded.
"""

OWN_KEYS = ("run", "model", "lora", "members", "nonmembers", "out", "overwrite")
PRIVACY_FILE = "privacy.json"
LEGACY_DP_CAVEAT = ("this run was trained by a privtune that drew the Poisson batches from the public run seed: anyone who "
                    "knows the seed and the data knows every batch, and the budget without amplification by subsampling "
                    "is several times larger; re-train it for secret batches")
REPORT_FILE = "report.json"


def _parse(argv):
    own, rest = {}, []
    for arg in argv:
        if "=" not in arg:
            raise ConfigError(f"cannot read argument {arg!r}; write key=value")
        key, value = arg.split("=", 1)
        (own.__setitem__(key, value) if key in OWN_KEYS else rest.append(arg))
    return own, rest


def _config(own, rest):
    if "run" in own:
        run = Path(own["run"])
        if not (run / "config.yaml").is_file():
            raise ConfigError(f"run={run} is not a privtune run folder (no config.yaml); pass a folder written by privtune.train")
        base = with_current_defaults(OmegaConf.load(run / "config.yaml"))
        cfg = merge_strict(base, OmegaConf.from_dotlist(rest), source="the command line")
        lora_dir = Path(own.get("lora", run / "lora"))
        out = Path(own.get("out", run))
        return cfg, lora_dir, out, run
    missing = [k for k in ("model", "lora", "members", "out") if k not in own]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)}=...; pass run=<run dir>, or model=, lora=, members=, out= (see --help)")
    cfg = load_config("lora", [f"model.base={own['model']}", f"output_dir={own['out']}", *rest])
    cfg = OmegaConf.create(OmegaConf.to_container(cfg))
    return cfg, Path(own["lora"]), Path(own["out"]), None


def with_current_defaults(saved):
    """A saved run config over its recipe's current defaults (keys added since the run take their
    defaults); the saved config alone when the recipe cannot be found any more."""
    try:
        defaults = to_container(load_config(str(saved.recipe)))
    except (PrivtuneError, AttributeError, KeyError):
        return saved
    return OmegaConf.merge(OmegaConf.create(defaults), saved)


def training_command(cfg, run: Path) -> str:
    """The command that trained the run: the one its earlier report recorded, else rebuilt from the
    resolved config as recipe + every key that differs from the recipe's defaults."""
    previous = run / REPORT_FILE
    if previous.is_file():
        try:
            command = json.loads(previous.read_text()).get("command")
        except (OSError, ValueError):
            command = None
        if command and "privtune.train" in command:
            return command
    recipe = str(cfg.recipe)
    try:
        defaults = flat(load_config(recipe))
    except PrivtuneError:
        defaults = {}
    skip = {"recipe", "resume", "overwrite"}
    args = [f"{k}={_value(v)}" for k, v in flat(cfg).items() if k not in skip and (k not in defaults or defaults[k] != v)]
    return " ".join(shlex.quote(a) for a in ["python", "-m", "privtune.train", f"recipe={recipe}", *args])


def _value(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    return str(v)


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse to replace an existing report unless asked (before anything is loaded or written)."""
    if (out / REPORT_FILE).is_file() and not overwrite:
        raise ConfigError(f"{out / REPORT_FILE} already exists; pass overwrite=true to replace it, or out=<new folder> "
                          "to write the new report elsewhere")


def read_privacy(run: Path | None) -> dict | None:
    """The run's privacy record (privacy.json, written by the DP trainer), or None."""
    if run is None or not (run / PRIVACY_FILE).is_file():
        return None
    try:
        privacy = json.loads((run / PRIVACY_FILE).read_text())
    except ValueError as exc:
        raise DataError(f"{run / PRIVACY_FILE} is not valid JSON ({exc}); restore it from the run's backup, since the "
                        "card would otherwise lose the run's differential-privacy guarantee") from exc
    if "secret_sampling" not in privacy:
        privacy.setdefault("caveats", []).append(LEGACY_DP_CAVEAT)
        privacy["secret_sampling"] = False
    return privacy


def _flag(value: str | None) -> bool:
    if value is None:
        return False
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise ConfigError(f"overwrite={value!r}: write overwrite=true or overwrite=false")


def _split(cfg, own, run):
    from .data.sources import load_source
    from .data.split import Split, check_disjoint, load_manifest, split_from_manifest

    if run is not None:
        manifest = load_manifest(run)
        split = split_from_manifest(manifest, load_source(cfg.data).records)
        split.training_fingerprint = manifest.get("training_fingerprint")
        return split
    members = Path(own["members"])
    if members.suffix == ".json" or (members / "split.json").is_file():
        return split_from_manifest(load_manifest(members), load_source(cfg.data).records)
    if "nonmembers" not in own:
        raise ConfigError("members= is an image folder, so nonmembers=<image folder> is needed too")
    data = OmegaConf.to_container(cfg.data)
    m = load_source(OmegaConf.create({**data, "source": str(members)})).records
    n = load_source(OmegaConf.create({**data, "source": own["nonmembers"]})).records
    for r in m:
        r.id, r.group = f"member/{r.id}", f"member/{r.group}"
    for r in n:
        r.id, r.group = f"nonmember/{r.id}", f"nonmember/{r.group}"
    check_disjoint(m, n)
    if not n:
        raise DataError("the non-member folder holds no samples")
    return Split(m, n, int(cfg.seed), f"{members} vs {own['nonmembers']}")


def evaluate(argv) -> dict:
    from .eval.stage import check_attacks, command_line, evaluate_model, record_command
    from .logging_utils import quiet_libraries
    from .models.loading import freeze, load_components
    from .models.lora import load_lora
    from .models.dualmd import dualmd_release_plan, dualmd_steps, is_dualmd_export, load_dualmd_adapters

    quiet_libraries()
    record_command("privtune.evaluate", argv)
    own, rest = _parse(argv)
    cfg, lora_dir, out, run = _config(own, rest)
    check_output(out, _flag(own.get("overwrite")))
    check_attacks(cfg.eval.attacks)
    privacy = read_privacy(run)
    split = _split(cfg, own, run)
    if cfg.eval.baseline:
        from .eval.stage import check_baseline

        check_baseline(cfg.eval.baseline, split.training_fingerprint)
    command = training_command(cfg, run) if run is not None else command_line()
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not __import__("torch").cuda.is_available())
    components = load_components(cfg.model)
    freeze(*components.modules())
    for m in components.modules():
        m.to(accelerator.device)
    plan = {}
    if is_dualmd_export(lora_dir):
        load_dualmd_adapters(components, lora_dir)
        plan = dualmd_release_plan(components.unet, components.noise_scheduler.config, dualmd_steps(cfg))
    else:
        load_lora(components, lora_dir)
    components.unet.to(accelerator.device)
    out.mkdir(parents=True, exist_ok=True)
    # The LoRA's card describes the run's own report: only re-write it when the report goes back there.
    card_dir = lora_dir if run is not None and out.resolve() == run.resolve() else None
    report = evaluate_model(cfg=cfg, components=components, unet=components.unet, split=split, run_dir=out,
                            accelerator=accelerator, lora_dir=card_dir, privacy=privacy, command=command,
                            evaluation_command=command_line(), shadow_run=run, **plan)
    return report


def own_out(argv) -> str:
    own, _ = _parse(argv)
    return own.get("out", own.get("run", ""))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    code, report = run_command(evaluate, argv, HELP)
    if report is not None:
        best = report.get("summary", {}).get("best_attack", {})
        auc = best.get("auc", {})
        print(f"privtune: best attack {best.get('name')}: AUC {auc.get('value', float('nan')):.3f} "
              f"[{', '.join(f'{v:.3f}' for v in auc.get('ci', []))}]; report in {own_out(argv)}")
    return code


if __name__ == "__main__":
    sys.exit(main())
