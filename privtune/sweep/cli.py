"""The command line of `python -m privtune.sweep`."""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import ConfigError, PrivtuneError
from .frontier import write_frontier
from .runs import (
    FINISHED,
    INTERRUPTED,
    check_existing,
    execute,
    shell_command,
    state_of,
)
from .spec import available_sweeps, load_sweep

HELP_EPILOG = """Other key=value arguments are common overrides of every run (under each entry's own overrides).
A finished run (report.json) is skipped; an interrupted one is resumed with resume=latest.
Shipped sweeps: {sweeps}"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m privtune.sweep", description="Train a sweep of privtune runs (recipes x overrides x seeds), then "
        "write the privacy / utility frontier (<root>/frontier.md, frontier.png).",
        epilog=HELP_EPILOG.format(sweeps=", ".join(available_sweeps()) or "none"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("assignments", nargs="*", metavar="key=value",
                        help="sweep=<name|file.yaml> (required, or --sweep), output_dir=<root>, common overrides")
    parser.add_argument("--sweep", help="the sweep file or shipped sweep name (same as sweep=)")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once (local subprocesses; default 1)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--print-commands", "--dry-run", dest="print_commands", action="store_true",
                      help="print one shell command per unfinished run (for a scheduler) and run nothing")
    mode.add_argument("--report-only", action="store_true", help="only (re)write the frontier from the finished runs")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser()
    if not argv:
        parser.print_help()
        return 0
    args = parser.parse_intermixed_args(argv)
    try:
        sweep_arg, output_dir, overrides = args.sweep, None, []
        for item in args.assignments:
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"cannot read argument {item!r}; write sweep=<name|file.yaml> and overrides as key=value")
            if key == "sweep":
                sweep_arg = value
            elif key == "output_dir":
                output_dir = value
            else:
                overrides.append(item)
        if not sweep_arg:
            raise ConfigError(f"no sweep given; pass sweep=<name|file.yaml> (shipped: {', '.join(available_sweeps())})")
        if args.jobs < 1:
            raise ConfigError(f"--jobs must be >= 1 (got {args.jobs})")
        sweep = load_sweep(sweep_arg, output_dir, overrides)
        if args.report_only:
            for problem in check_existing(sweep):
                print(f"privtune.sweep: warning: {problem} (the sweep's settings changed since it ran)", file=sys.stderr)
            md, png = write_frontier(sweep)
            print(f"privtune.sweep: frontier {md} and {png}")
            return 0
        if args.print_commands:
            problems = check_existing(sweep)
            if problems:
                raise ConfigError("run folders from other settings are in the way: " + "; ".join(problems))
            states = [(run, state_of(run)) for run in sweep.runs]
            try:
                for run, state in states:
                    if state != FINISHED:
                        print(shell_command(run, resume=state == INTERRUPTED), flush=True)
            except BrokenPipeError:  # `... --print-commands | head`: the reader has all it wants
                sys.stdout = open(os.devnull, "w")
                return 0
            done = sum(state == FINISHED for _, state in states)
            print(f"privtune.sweep: {len(states) - done} command(s); {done} finished run(s) left out", file=sys.stderr)
            return 0
        print(f"privtune.sweep: {sweep.name}: {len(sweep.runs)} runs under {sweep.root}")
        outcomes = execute(sweep, jobs=args.jobs)
    except PrivtuneError as exc:
        print(f"privtune: error: {exc}", file=sys.stderr)
        return 2
    md, png = write_frontier(sweep)
    print(f"privtune.sweep: frontier {md} and {png}")
    failed = [o for o in outcomes if o.failed]
    for o in failed:
        print(f"privtune.sweep: FAILED {o.run.name} (exit {o.returncode}); log: {o.log}", file=sys.stderr)
    if failed:
        print(f"privtune.sweep: {len(failed)} of {len(outcomes)} runs failed", file=sys.stderr)
        return 1
    return 0
