"""`python -m privtune.evaluate run=<run dir>` or
`python -m privtune.evaluate model=<base> lora=<folder> members=<split.json|folder> [nonmembers=<folder>] out=<dir>`.

Re-runs the evaluation stage on a finished run (same seed, same scores as the automatic stage), or
attacks a LoRA trained elsewhere given its member and non-member data.
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import OmegaConf

from .config import load_config, merge_strict
from .errors import ConfigError, DataError, PrivtuneError

HELP = """usage: python -m privtune.evaluate run=<run dir> [eval.attacks=[loss,secmi,pia] eval.KEY=VALUE ...]
       python -m privtune.evaluate model=<base> lora=<lora folder> members=<split.json | image folder>
                                   [nonmembers=<image folder>] out=<report folder> [data.source=...] [KEY=VALUE ...]

Attacks a fine-tuned LoRA with membership-inference attacks and writes report.json, report.md, plots
and (for a run folder) the LoRA's privacy card. Under `accelerate launch` the attack work is sharded.
"""

OWN_KEYS = ("run", "model", "lora", "members", "nonmembers", "out")


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
        base = OmegaConf.load(run / "config.yaml")
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


def _split(cfg, own, run):
    from .data.sources import load_source
    from .data.split import Split, check_disjoint, load_manifest, split_from_manifest

    if run is not None:
        return split_from_manifest(load_manifest(run), load_source(cfg.data).records)
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
    from .eval.stage import check_attacks, evaluate_model
    from .logging_utils import quiet_libraries
    from .models.loading import freeze, load_components
    from .models.lora import load_lora

    quiet_libraries()
    from .eval.stage import record_command

    record_command("privtune.evaluate", argv)
    own, rest = _parse(argv)
    cfg, lora_dir, out, run = _config(own, rest)
    check_attacks(cfg.eval.attacks)
    split = _split(cfg, own, run)
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not __import__("torch").cuda.is_available())
    components = load_components(cfg.model)
    freeze(components.vae, components.text_encoder, components.unet)
    for m in (components.vae, components.text_encoder, components.unet):
        m.to(accelerator.device)
    from contextlib import nullcontext

    from .trainers.dualmd import dualmd_alternation, is_dualmd_export

    alternation = nullcontext()
    if is_dualmd_export(lora_dir):
        alternation = dualmd_alternation(components, lora_dir, cfg)
    else:
        load_lora(components, lora_dir)
    components.unet.to(accelerator.device)
    out.mkdir(parents=True, exist_ok=True)
    # The LoRA's card describes the run's own report: only re-write it when the report goes back there.
    card_dir = lora_dir if run is not None and out.resolve() == run.resolve() else None
    with alternation:
        report = evaluate_model(cfg=cfg, components=components, unet=components.unet, split=split, run_dir=out,
                                accelerator=accelerator, lora_dir=card_dir)
    return report


def own_out(argv) -> str:
    own, _ = _parse(argv)
    return own.get("out", own.get("run", ""))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or any(a in ("-h", "--help", "help") for a in argv):
        print(HELP)
        return 0
    try:
        report = evaluate(argv)
    except PrivtuneError as exc:
        print(f"privtune: error: {exc}", file=sys.stderr)
        return 2
    if report is not None:
        best = report.get("summary", {}).get("best_attack", {})
        auc = best.get("auc", {})
        print(f"privtune: best attack {best.get('name')}: AUC {auc.get('value', float('nan')):.3f} "
              f"[{', '.join(f'{v:.3f}' for v in auc.get('ci', []))}]; report in {own_out(argv)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
