"""`python -m privtune.sweep sweep=<name|file.yaml>`: train a grid of defenses and seeds, then chart their frontier.

A sweep file (YAML) lists the runs; `sweep=all_defenses` names the file shipped in privtune/sweeps/:

    name: all_defenses                     # optional; default: the file's name
    output_dir: runs/sweeps/all_defenses   # the root (relative to the working directory); runs train in <root>/<run name>/
    seeds: [0, 1, 2]                       # the seeds of every entry that sets none
    overrides: {train.max_steps: 500}      # optional: fixed overrides of every run (not part of the run names)
    runs:
      - recipe: lora
      - recipe: dpsgd
        label: DP-SGD                      # optional display name of the setting
        overrides: {dp.target_epsilon: [1, 4, 8]}   # a list is a grid axis, a scalar is fixed
        seeds: [0]                         # replaces the default seeds for this entry

Each entry expands to the cartesian product of its grid axes and its seeds. A key whose recipe value is
itself a list (e.g. eval.attacks) takes a plain list as its fixed value; a list of lists is its grid axis.
Each run trains in a folder named after its recipe, its entry's overrides and its seed, e.g.
`dpsgd__dp.target_epsilon=4__seed=0`, so a re-run finds its earlier runs: a finished one (report.json) is
skipped, an interrupted one is resumed with `resume=latest`. Every run's config is built with
`privtune.config.load_config` before anything starts, so an unknown recipe or key fails the whole sweep at once.

The root defaults to runs/sweeps/<name>. Runs are `python -m privtune.train` subprocesses (`--jobs N` at a
time), logged to <root>/logs/<run name>.log (run folders stay as train writes them); `--print-commands`
prints them for a scheduler (SLURM arrays etc.) instead. At the end the sweep writes
<root>/frontier.md and <root>/frontier.png: one row / point per setting (its runs grouped over seeds), the
strongest attack's AUC against the style accuracy of the generations, and the Pareto front of the settings.
"""

from .cli import HELP_EPILOG, main
from .frontier import (
    FRONTIER_MD,
    FRONTIER_PNG,
    METRIC_KEYS,
    FrontierRow,
    Stat,
    frontier_row,
    frontier_rows,
    pareto_front,
    plot_frontier,
    render_frontier_md,
    run_metrics,
    write_frontier,
)
from .runs import (
    CONFIG_DRIFT_IGNORED,
    FINISHED,
    INTERRUPTED,
    NEW,
    Outcome,
    check_existing,
    child_env,
    config_drift,
    execute,
    finished_report,
    run_state,
    shell_command,
    state_of,
)
from .spec import (
    ENTRY_KEYS,
    LOGS_DIR,
    MAX_NAME,
    RESERVED_KEYS,
    SWEEP_KEYS,
    SWEEPS_DIR,
    Run,
    Setting,
    Sweep,
    available_sweeps,
    expand_grid,
    format_value,
    load_sweep,
    override_args,
    run_name,
    sweep_path,
)

__all__ = [
    "CONFIG_DRIFT_IGNORED", "ENTRY_KEYS", "FINISHED", "FRONTIER_MD", "FRONTIER_PNG", "HELP_EPILOG", "INTERRUPTED",
    "LOGS_DIR", "MAX_NAME", "METRIC_KEYS", "NEW", "RESERVED_KEYS", "SWEEPS_DIR", "SWEEP_KEYS",
    "FrontierRow", "Outcome", "Run", "Setting", "Stat", "Sweep",
    "available_sweeps", "check_existing", "child_env", "config_drift", "execute", "expand_grid", "finished_report",
    "format_value", "frontier_row", "frontier_rows", "load_sweep", "main", "override_args", "pareto_front",
    "plot_frontier", "render_frontier_md", "run_metrics", "run_name", "run_state", "shell_command", "state_of",
    "sweep_path", "write_frontier",
]
