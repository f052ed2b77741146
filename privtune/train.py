"""`python -m privtune.train recipe=<name> key=value ...` (or under `accelerate launch -m privtune.train`)."""

from __future__ import annotations

import sys

from .config import available_recipes, load_config, parse_overrides
from .errors import PrivtuneError

HELP = """usage: python -m privtune.train recipe=<name|path.yaml> [key=value ...]
       accelerate launch [--num_processes N] -m privtune.train recipe=<name> [key=value ...]

Fine-tune a Stable Diffusion LoRA with a privacy defense, export it, and attack it.

recipes: {recipes}

main keys (see privtune/recipes/lora.yaml for every key and its default):
  trainer=lora                 which trainer (defense) runs
  output_dir=runs/<recipe>     the run folder; resume=latest continues it
  model.base=embedded          embedded tiny SD | local diffusers folder | hub id (e.g. runwayml/stable-diffusion-v1-5)
  data.source=embedded         embedded portraits set | embedded:emoji | image folder with metadata.jsonl | hub data set
  data.members=64 data.nonmembers=64   split sizes (ground truth for the attacks)
  lora.rank=16 lora.targets=full       LoRA size and targets (attn | full | [names])
  train.max_steps=1000 train.batch_size=16 train.mixed_precision=no
  optim.lr=1e-3 optim.use_8bit=false
  tracking=none|wandb|tensorboard
  export.kohya=false
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or any(a in ("-h", "--help", "help") for a in argv):
        print(HELP.format(recipes=", ".join(available_recipes())))
        return 0
    try:
        recipe, overrides = parse_overrides(argv)
        cfg = load_config(recipe or "lora", overrides)
        from .logging_utils import quiet_libraries
        from .trainers import get_trainer

        quiet_libraries()
        from .eval.stage import record_command

        record_command("privtune.train", argv)

        trainer = get_trainer(cfg.trainer)(cfg)
        run_dir = trainer.run()
    except PrivtuneError as exc:
        print(f"privtune: error: {exc}", file=sys.stderr)
        return 2
    report = getattr(trainer, "report", None)
    if report:
        from .eval.report import console_summary

        print("\n".join(console_summary(report, run_dir)))
    print(f"privtune: run folder {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
