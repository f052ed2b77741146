"""`python -m privtune.train recipe=<name> key=value ...` (or under `accelerate launch -m privtune.train`)."""

from __future__ import annotations

import shlex
import signal
import sys

from .config import available_recipes, load_config, parse_overrides, to_annotated_yaml
from .errors import PrivtuneError

HELP = """usage: python -m privtune.train recipe=<name|path.yaml> [key=value ...]
       accelerate launch [--num_processes N] -m privtune.train recipe=<name> [key=value ...]
       python -m privtune.train --print-config recipe=<name> [key=value ...]

Fine-tune a Stable Diffusion LoRA with a privacy defense, export it, and attack it.
--print-config prints the resolved config, every key with its value and help, and exits (nothing is written).

recipes: {recipes}

main keys (--print-config lists every key; privtune/schema/ defines them):
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
    print_config = "--print-config" in argv
    argv = [a for a in argv if a != "--print-config"]
    try:
        recipe, overrides = parse_overrides(argv)
        cfg = load_config(recipe or "lora", overrides)
        if print_config:
            print(to_annotated_yaml(cfg), end="")
            return 0
        from .logging_utils import quiet_libraries
        from .trainers import get_trainer

        quiet_libraries()
        from .eval.stage import record_command

        record_command("privtune.train", argv)

        trainer = get_trainer(cfg.trainer)(cfg)
        with interrupts_as_keyboard():
            run_dir = trainer.run()
    except PrivtuneError as exc:
        print(f"privtune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        stopped = locals().get("trainer")
        if stopped is None or getattr(stopped, "accelerator", None) is None or stopped.is_main:
            print(interrupted_message(stopped, argv), file=sys.stderr)
        return 130
    report = getattr(trainer, "report", None)
    if report:
        from .eval.report import console_summary

        print("\n".join(console_summary(report, run_dir)))
    print(f"privtune: run folder {run_dir}")
    return 0


class interrupts_as_keyboard:
    """SIGTERM (a scheduler's stop) ends the run like Ctrl-C: one line, no traceback, exit 130."""

    def __enter__(self):
        self.previous = None
        try:
            self.previous = signal.signal(signal.SIGTERM, self._raise)
        except ValueError:  # not the main thread: leave signals alone
            pass
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        return False


def interrupted_message(trainer, argv) -> str:
    """Where the run stopped, its last complete checkpoint and the command that continues it."""
    args = [a for a in argv if not a.startswith(("resume=", "overwrite="))] + ["resume=latest"]
    command = " ".join(["python", "-m", "privtune.train", *map(shlex.quote, args)])
    state = getattr(trainer, "state", None)
    where = f" at step {state.step}" if state is not None else " before training started"
    found = []
    if trainer is not None and getattr(trainer, "accelerator", None) is not None:
        try:
            found = trainer.checkpoints()
        except OSError:
            found = []
    last = f"last checkpoint {found[-1]}" if found else "no checkpoint saved yet (a resume starts from step 0)"
    return f"privtune: interrupted{where}; {last}; continue with: {command}"


if __name__ == "__main__":
    sys.exit(main())
