"""privtune.sweep: grid expansion, run names, validation before any run, skip / resume of run folders,
scheduler commands, and the frontier report (from real tiny runs and from synthetic reports)."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from privtune import sweep as sw
from privtune.errors import ConfigError

from .conftest import REPO


def tiny(base_model: str, **extra) -> dict:
    """Common overrides of a 2-step run with a cheap evaluation (loss attack only, no utility)."""
    return {"model.base": base_model, "train.max_steps": 2, "train.batch_size": 4, "data.members": 8, "data.nonmembers": 8,
            "lora.rank": 4, "lora.alpha": 4, "train.validation_every": 0, "train.checkpoint_every": 0, "train.log_every": 1,
            "eval.utility": False, "eval.attacks": ["loss"], "eval.bootstrap": 20,
            "eval.attack_params": {"loss": {"timesteps": [100], "draws": 1}}, **extra}


def write_sweep(path: Path, **content) -> Path:
    """A sweep file (JSON is YAML, and keeps dotted keys and nested values exact)."""
    path.write_text(json.dumps(content))
    return path


# ---------------------------------------------------------------- grid expansion and names
def test_grid_is_the_cartesian_product_in_written_order():
    points = sw.expand_grid({"a": [1, 2], "b": "x", "c": [True, False]})
    assert points == [{"a": 1, "b": "x", "c": True}, {"a": 1, "b": "x", "c": False},
                      {"a": 2, "b": "x", "c": True}, {"a": 2, "b": "x", "c": False}]
    assert sw.expand_grid({}) == [{}]


def test_list_valued_keys_take_a_plain_list_as_their_fixed_value():
    keys = frozenset({"eval.attacks"})
    assert sw.expand_grid({"eval.attacks": ["loss", "pia"]}, keys) == [{"eval.attacks": ["loss", "pia"]}]
    assert sw.expand_grid({"eval.attacks": [["loss"], ["pia"]]}, keys) == [{"eval.attacks": ["loss"]}, {"eval.attacks": ["pia"]}]
    with pytest.raises(ConfigError, match="mixes lists"):
        sw.expand_grid({"eval.attacks": [["loss"], "pia"]}, keys)


def test_empty_grid_axis_is_an_error():
    with pytest.raises(ConfigError, match=r"dp.target_epsilon in runs\[0\].*empty list"):
        sw.expand_grid({"dp.target_epsilon": []}, where="runs[0]")


def test_run_names_are_deterministic_and_filesystem_safe():
    assert sw.run_name("dpsgd", [("dp.target_epsilon", 4)], 0) == "dpsgd__dp.target_epsilon=4__seed=0"
    a = sw.run_name("lora", [("optim.lr", 1e-4), ("data.cutout", 16)], 2)
    assert a == sw.run_name("lora", [("data.cutout", 16), ("optim.lr", 1e-4)], 2) == "lora__data.cutout=16__optim.lr=0.0001__seed=2"
    listed = sw.run_name("lora", [("eval.attacks", ["loss", "pia"]), ("data.source", "embedded:emoji")], 1)
    assert listed == "lora__data.source=embedded-emoji__eval.attacks=loss+pia__seed=1"
    assert re.fullmatch(r"[A-Za-z0-9._=+-]+", sw.run_name("x.yaml", [("k", {"a b": "c/d"})], 0))
    many = [(f"captions.key{i}", "v" * 20) for i in range(8)]
    long_a = sw.run_name("lora", many, 3)
    long_b = sw.run_name("lora", [*many[:7], ("captions.key7", "w" * 20)], 3)
    assert len(long_a) <= sw.MAX_NAME and long_a.endswith("__seed=3") and long_a.startswith("lora__captions.key0=")
    assert long_a != long_b  # the hash tells apart names that truncate alike
    assert long_a.removesuffix("__seed=3") == sw.run_name("lora", many, 4).removesuffix("__seed=4")  # seeds share the folder stem


@pytest.mark.parametrize("value", [1e-05, 0.001, 8, -1, True, None, "embedded:portraits", "true", "8", "a b", ["loss", "pia"],
                                   {"loss": {"timesteps": [100], "draws": 1}}, [], "runs/x y.yaml"])
def test_override_values_read_back_unchanged(value):
    from omegaconf import OmegaConf

    text = sw.format_value(value)
    assert OmegaConf.to_container(OmegaConf.from_dotlist([f"k={text}"]))["k"] == value


# ---------------------------------------------------------------- loading and validation
def test_shipped_all_defenses_sweep_expands_and_builds_every_config():
    sweep = sw.load_sweep("all_defenses")
    assert sw.sweep_path("all_defenses").resolve() == (Path(sw.__file__).parent.parent / "sweeps" / "all_defenses.yaml").resolve()
    names = [r.name for r in sweep.runs]
    assert len(names) == len(set(names)) == 10 * 3 + 8
    settings = sweep.settings()
    assert [len(runs) for _, runs in settings] == [3] * 10 + [1] * 8
    labels = [s.display for s, _ in settings]
    assert "DP-SGD 3k members dp.target_epsilon=1" in labels and "DP-SGD 3k members dp.target_epsilon=8" in labels
    assert sum(s.undefended for s, _ in settings) == 1
    dp = next(r for r in sweep.runs if r.name == "dpsgd__dp.noise_multiplicity=2__dp.target_epsilon=8__train.max_steps=500__seed=1")
    assert dp.config.dp.target_epsilon == 8 and dp.config.seed == 1 and dp.config.trainer == "dpsgd"
    assert dp.config.dp.noise_multiplicity == 2 and dp.config.train.max_steps == 500
    assert dp.config.output_dir == str(Path("runs/sweeps/all_defenses") / dp.name)
    assert {r.config.trainer for r in sweep.runs} >= {"lora", "dpsgd", "mp_lora", "smp_lora", "dualmd", "distillmd"}


def test_entries_expand_over_grid_and_their_own_seeds(tmp_path):
    path = write_sweep(tmp_path / "s.yaml", output_dir=str(tmp_path / "root"), seeds=[0, 1, 2],
                       overrides={"train.max_steps": 3},
                       runs=[{"recipe": "lora"},
                             {"recipe": "dpsgd", "label": "DP", "overrides": {"dp.target_epsilon": [1, 4], "dp.delta": 1e-4},
                              "seeds": [5]}])
    sweep = sw.load_sweep(path, overrides=["train.batch_size=2"])
    assert sweep.name == "s" and sweep.root == tmp_path / "root"
    assert [r.name for r in sweep.runs] == ["lora__seed=0", "lora__seed=1", "lora__seed=2",
                                           "dpsgd__dp.delta=0.0001__dp.target_epsilon=1__seed=5",
                                           "dpsgd__dp.delta=0.0001__dp.target_epsilon=4__seed=5"]
    assert [s.display for s, _ in sweep.settings()] == ["lora", "DP dp.target_epsilon=1", "DP dp.target_epsilon=4"]
    run = sweep.runs[-1]
    assert run.train_args() == ["recipe=dpsgd", "dp.delta=0.0001", "dp.target_epsilon=4", "train.batch_size=2", "train.max_steps=3",
                                "seed=5", f"output_dir={tmp_path / 'root' / run.name}"]
    assert run.config.train.max_steps == 3 and run.config.train.batch_size == 2 and run.config.dp.target_epsilon == 4
    assert not (tmp_path / "root").exists()


BAD = [
    ({"seeds": [0], "runs": [{"recipe": "lorra"}]}, r"unknown recipe 'lorra'; valid recipes: .*dpsgd.*lora"),
    ({"seeds": [0], "runs": [{"recipe": "lora", "overrides": {"train.max_stpes": 3}}]},
     r"unknown key 'train.max_stpes'.*valid keys here: .*train.max_steps"),
    ({"seeds": [0], "runs": [{"recipe": "dpsgd", "overrides": {"dp.target_epsilon": []}}]}, r"dp.target_epsilon in runs\[0\].*empty list"),
    ({"seeds": [0]}, r"needs a non-empty runs: list"),
    ({"seeds": [0], "runs": []}, r"needs a non-empty runs: list"),
    ({"seeds": [0, 0], "runs": [{"recipe": "lora"}]}, r"repeat a seed"),
    ({"seeds": ["0"], "runs": [{"recipe": "lora"}]}, r"non-negative integers"),
    ({"seeds": [0], "runs": [{"recipe": "lora", "seeds": []}]}, r"seeds in runs\[0\] must be a non-empty list"),
    ({"runs": [{"recipe": "lora"}]}, r"runs\[0\] \(lora\) has no seeds"),
    ({"seeds": [0], "runs": [{"recipe": "lora", "label": "a"}, {"recipe": "lora", "label": "b"}]},
     r"runs\[0\] and runs\[1\] both make run 'lora__seed=0'"),
    ({"seeds": [0], "runs": [{"recipe": "lora", "overrides": {"seed": 3}}]}, r"set 'seed', which the sweep sets itself"),
    ({"seeds": [0], "runs": [{"recipe": "lora", "overides": {}}]}, r"unknown key\(s\) overides in runs\[0\]; valid keys: recipe, label"),
    ({"seeds": [0], "run": [{"recipe": "lora"}]}, r"unknown key\(s\) run in sweep file"),
    ({"seeds": [0], "overrides": {"train.max_steps": [1, 2]}, "runs": [{"recipe": "lora"}]}, r"common override train.max_steps is a list"),
]


@pytest.mark.parametrize("content,message", BAD)
def test_bad_sweep_files_fail_before_any_run(tmp_path, capsys, content, message):
    root = tmp_path / "root"
    path = write_sweep(tmp_path / "bad.yaml", output_dir=str(root), **content)
    with pytest.raises(ConfigError, match=message):
        sw.load_sweep(path)
    assert sw.main([f"sweep={path}"]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not root.exists()


def test_unknown_sweep_name_lists_the_shipped_ones(capsys):
    assert sw.main(["--sweep", "nope"]) == 2
    assert "unknown sweep 'nope'; shipped sweeps: all_defenses" in capsys.readouterr().err


# ---------------------------------------------------------------- run folders
def test_run_state_reads_folders_as_train_does(tmp_path):
    run = tmp_path / "r"
    assert sw.run_state(run) == sw.NEW
    run.mkdir()
    (run / "stray.log").write_text("x")
    assert sw.run_state(run) == sw.NEW  # train does not refuse this folder: a fresh start
    (run / "config.yaml").write_text("seed: 0\n")
    assert sw.run_state(run) == sw.INTERRUPTED
    (run / "report.json").write_text('{"summary": ')  # not a complete report
    assert sw.run_state(run) == sw.INTERRUPTED
    (run / "report.json").write_text('{"summary": {"best_attack": null}}')
    assert sw.run_state(run) == sw.FINISHED
    teachers = tmp_path / "distill" / "teachers"
    teachers.mkdir(parents=True)
    (teachers / "config.yaml").write_text("seed: 0\n")
    assert sw.run_state(tmp_path / "distill") == sw.INTERRUPTED
    lora = tmp_path / "noeval" / "lora"
    lora.mkdir(parents=True)
    assert sw.run_state(lora.parent, eval_enabled=False) == sw.INTERRUPTED
    (lora / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    assert sw.run_state(lora.parent, eval_enabled=False) == sw.FINISHED


def test_child_env_shares_cpus_between_jobs():
    assert "OMP_NUM_THREADS" not in sw.child_env(1, {}, cpus=8)
    assert sw.child_env(2, {}, cpus=8)["OMP_NUM_THREADS"] == "4"
    assert sw.child_env(4, {}, cpus=2)["OMP_NUM_THREADS"] == "1"
    assert sw.child_env(2, {"OMP_NUM_THREADS": "3"}, cpus=8)["OMP_NUM_THREADS"] == "3"


def test_folders_trained_with_other_settings_stop_the_sweep(tmp_path, capsys):
    path = write_sweep(tmp_path / "s.yaml", output_dir=str(tmp_path / "root"), seeds=[0], runs=[{"recipe": "lora"}])
    sweep = sw.load_sweep(path)
    run = sweep.runs[0]
    run.dir.mkdir(parents=True)
    from privtune.config import load_config, to_yaml

    (run.dir / "config.yaml").write_text(to_yaml(load_config("lora", [f"output_dir={run.dir}", "train.max_steps=7"])))
    assert sw.main([f"sweep={path}"]) == 2
    err = capsys.readouterr().err
    assert "differs in train.max_steps" in err and "output_dir=<folder>" in err
    assert not sweep.logs_dir.exists()
    (run.dir / "config.yaml").write_text(to_yaml(load_config("lora", [f"output_dir={run.dir}"])))
    assert sw.config_drift(run) == []


# ---------------------------------------------------------------- the frontier from synthetic reports
def report(auc, tpr=0.1, attack="pia", style=0.8, slots=None, ci=(0.0, 1.0), privacy=None) -> dict:
    utility = {"frechet_distance": 50.0, "kid": 10.0}
    if style is not None:
        utility["style_accuracy"] = style
        utility["slot_accuracy"] = slots or {"style": style, "hair": 0.6, "eyes": 0.4}
    out = {"summary": {"best_attack": {"name": attack, "auc": {"value": auc, "ci": list(ci)},
                                       "tpr@1%fpr": {"value": tpr, "ci": [0.0, 0.3]}}}, "utility": utility}
    if privacy:
        out["privacy"] = privacy
    return out


def test_pareto_front_keeps_only_undominated_points():
    points = [(0.9, 0.9), (0.5, 0.6), (0.4, 0.7), (0.9, 0.95), (0.2, 0.5), (0.2, 0.55)]
    assert sw.pareto_front(points) == [0, 1, 4]
    assert sw.pareto_front([(0.5, 0.5), (0.5, 0.5)]) == [0, 1]  # ties dominate neither
    assert sw.pareto_front([]) == []


def test_stat_over_seeds():
    two = sw.Stat.over([0.9, 0.7], [(0.8, 1.0), (0.6, 0.8)])
    assert two.n == 2 and two.mean == pytest.approx(0.8) and two.std == pytest.approx(0.141421, abs=1e-5)
    assert two.text() == "0.800 ± 0.141" and two.errors() == pytest.approx((0.141421, 0.141421), abs=1e-5)
    one = sw.Stat.over([None, 0.6], [None, (0.5, 0.7)])
    assert one.n == 1 and one.text() == "0.600 [0.500, 0.700]" and one.errors() == pytest.approx((0.1, 0.1))
    assert sw.Stat.over([None]).text() == "n/a" and sw.Stat.over([]).errors() is None


def test_frontier_groups_seeds_and_marks_the_front(tmp_path, capsys):
    root = tmp_path / "root"
    path = write_sweep(tmp_path / "s.yaml", name="synthetic", output_dir=str(root), seeds=[0, 1], runs=[
        {"recipe": "lora"},
        {"recipe": "dpsgd", "label": "DP", "overrides": {"dp.target_epsilon": [1, 8]}, "seeds": [0]},
        {"recipe": "lora", "label": "custom data", "overrides": {"data.cutout": 16}},
        {"recipe": "lora", "label": "never ran", "overrides": {"data.random_flip": True}, "seeds": [0]},
    ])
    sweep = sw.load_sweep(path)
    reports = {
        "lora__seed=0": report(0.9, tpr=0.5, attack="pia", style=0.9),
        "lora__seed=1": report(0.7, tpr=0.3, attack="loss", style=0.7),
        "dpsgd__dp.target_epsilon=1__seed=0": report(0.55, style=0.3, ci=(0.5, 0.6), privacy={"epsilon": 99.0}),
        "dpsgd__dp.target_epsilon=8__seed=0": report(0.6, style=0.2, ci=(0.52, 0.68)),  # dominated by eps=1
        "lora__data.cutout=16__seed=0": report(0.65, style=None),
        "lora__data.cutout=16__seed=1": report(0.75, style=None),
    }
    for run in sweep.runs:
        if run.name in reports:
            run.dir.mkdir(parents=True)
            (run.dir / "report.json").write_text(json.dumps(reports[run.name]))
    (root / "dpsgd__dp.target_epsilon=1__seed=0" / "privacy.json").write_text(json.dumps({"epsilon": 0.99}))

    rows = {row.setting.display: row for row in sw.frontier_rows(sweep)}
    assert list(rows) == ["lora", "DP dp.target_epsilon=1", "DP dp.target_epsilon=8", "custom data", "never ran"]
    lora = rows["lora"]
    assert lora.finished == lora.planned == 2 and lora.stats["auc"].text() == "0.800 ± 0.141"
    assert lora.stats["slot_accuracy"].mean == pytest.approx(0.5)  # hair 0.6, eyes 0.4; style is its own column
    assert lora.strongest in ("pia (1/2), loss (1/2)", "loss (1/2), pia (1/2)")
    assert lora.on_front and rows["DP dp.target_epsilon=1"].on_front and not rows["DP dp.target_epsilon=8"].on_front
    assert rows["DP dp.target_epsilon=1"].stats["epsilon"].mean == pytest.approx(0.99)  # privacy.json wins
    assert rows["custom data"].point is None and not rows["custom data"].on_front
    assert rows["never ran"].finished == 0 and rows["never ran"].stats["auc"].mean is None

    assert sw.main([f"sweep={path}", "--report-only"]) == 0
    md = (root / "frontier.md").read_text()
    lines = {line.split(" | ")[0].lstrip("| "): line for line in md.splitlines() if line.startswith("| ")}
    assert "| 2 | 0.800 ± 0.141 | 0.400 ± 0.141 | 0.800 ± 0.141 | 0.500 ± 0.000 | 50.00 ± 0.00 |" in lines["lora (undefended)"]
    assert lines["lora (undefended)"].rstrip().endswith("| yes |")
    assert "| 1 | 0.550 [0.500, 0.600] | 0.100 [0.000, 0.300] | 0.300 |" in lines["DP dp.target_epsilon=1"]
    assert "| 0.99 | pia | yes |" in lines["DP dp.target_epsilon=1"]
    assert "| - | pia |  |" in lines["DP dp.target_epsilon=8"]
    assert "| 2 | 0.700 ± 0.071 |" in lines["custom data"] and "| n/a | n/a |" in lines["custom data"]
    assert "| 0 of 1 | n/a |" in lines["never ran"]
    assert "Not in frontier.png (no style accuracy or no attack AUC in their reports): custom data." in md
    with Image.open(root / "frontier.png") as image:
        assert image.format == "PNG" and image.size[0] > 600
    assert "frontier" in capsys.readouterr().out


def test_frontier_with_nothing_to_plot_still_writes(tmp_path):
    path = write_sweep(tmp_path / "s.yaml", output_dir=str(tmp_path / "root"), seeds=[0], runs=[{"recipe": "lora"}])
    sweep = sw.load_sweep(path)
    sweep.runs[0].dir.mkdir(parents=True)
    (sweep.runs[0].dir / "report.json").write_text(json.dumps(report(0.7, style=None)))
    md, png = sw.write_frontier(sweep)
    assert "| lora (undefended) | 1 | 0.700 [0.000, 1.000] |" in md.read_text() and png.stat().st_size > 0


# ---------------------------------------------------------------- real runs
def test_sweep_trains_skips_and_prints_commands(tmp_path, base_model, capsys):
    root = tmp_path / "root"
    path = write_sweep(tmp_path / "two.yaml", output_dir=str(root), seeds=[0, 1], overrides=tiny(base_model),
                       runs=[{"recipe": "lora"}])
    assert sw.main([f"sweep={path}", "--print-commands"]) == 0
    out = capsys.readouterr()
    commands = [shlex.split(line) for line in out.out.splitlines()]
    assert len(commands) == 2 and "2 command(s); 0 finished" in out.err
    for seed, cmd in enumerate(commands):
        assert cmd[:4] == ["python", "-m", "privtune.train", "recipe=lora"]
        assert f"seed={seed}" in cmd and f"output_dir={root / f'lora__seed={seed}'}" in cmd
        assert "eval.attack_params={loss: {timesteps: [100], draws: 1}}" in cmd and "eval.attacks=[loss]" in cmd
    assert not root.exists()  # nothing executed, nothing written

    done = subprocess.run([sys.executable, *commands[0][1:]], check=False, capture_output=True, text=True, cwd=tmp_path,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    first = root / "lora__seed=0"
    assert (first / "report.json").is_file()

    assert sw.main([f"sweep={path}"]) == 0
    out = capsys.readouterr().out
    assert "[1/2] skip lora__seed=0: finished" in out and "[2/2] run lora__seed=1" in out and "[2/2] done lora__seed=1" in out
    second = root / "lora__seed=1"
    assert (second / "report.json").is_file() and (root / "logs" / "lora__seed=1.log").is_file()
    assert "privtune: run folder" in (root / "logs" / "lora__seed=1.log").read_text()
    md = (root / "frontier.md").read_text()
    assert "| lora (undefended) | 2 |" in md and "Not in frontier.png" in md  # eval.utility=false: no style accuracy
    with Image.open(root / "frontier.png") as image:
        assert image.format == "PNG"

    mtimes = {p: (p / "report.json").stat().st_mtime_ns for p in (first, second)}
    assert sw.main([f"sweep={path}"]) == 0
    out = capsys.readouterr().out
    assert "skip lora__seed=0" in out and "skip lora__seed=1" in out and " run " not in out
    assert mtimes == {p: (p / "report.json").stat().st_mtime_ns for p in (first, second)}
    assert sw.main([f"sweep={path}", "--print-commands"]) == 0
    assert capsys.readouterr().out == ""


CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def test_interrupted_run_is_resumed(tmp_path, base_model, capsys):
    root = tmp_path / "root"
    path = write_sweep(tmp_path / "one.yaml", output_dir=str(root), seeds=[0], runs=[{"recipe": "lora"}],
                       overrides=tiny(base_model, **{"train.max_steps": 30, "train.checkpoint_every": 5}))
    run_dir = root / "lora__seed=0"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "privtune.sweep", f"sweep={path}"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if (run_dir / "checkpoints").is_dir() and any(CHECKPOINT.match(p.name) for p in (run_dir / "checkpoints").iterdir()):
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert not (run_dir / "report.json").exists(), "the run finished before it could be interrupted"
    assert sw.run_state(run_dir) == sw.INTERRUPTED

    assert sw.main([f"sweep={path}"]) == 0
    assert "[1/1] resume lora__seed=0" in capsys.readouterr().out
    log = (root / "logs" / "lora__seed=0.log").read_text()
    assert log.count("# privtune.sweep ") == 2 and "resume=latest" in log
    step = int(re.search(r"privtune: resumed from \S+checkpoint-(\d+) at step (\d+)", log).group(2))
    assert 5 <= step < 30
    assert (run_dir / "report.json").is_file() and (run_dir / "checkpoints" / "checkpoint-30").is_dir()


def test_failed_runs_are_reported_and_the_others_still_run(tmp_path, base_model, capsys):
    root = tmp_path / "root"
    path = write_sweep(tmp_path / "bad.yaml", output_dir=str(root), seeds=[0, 1], overrides=tiny(base_model),
                       runs=[{"recipe": "lora", "overrides": {"eval.attacks": ["nope"]}}])  # valid config, fails in train
    sweep = sw.load_sweep(path)
    assert sw.main([f"sweep={path}", "--jobs", "2"]) == 1
    out = capsys.readouterr()
    for run in sweep.runs:
        assert f"FAILED {run.name} (exit 2); log: {sweep.log_path(run)}" in out.err
        assert "nope" in sweep.log_path(run).read_text()
    assert "2 of 2 runs failed" in out.err and (root / "frontier.md").is_file()


def test_benchmark_sweep_files_load_and_name_their_runs():
    """The sweep behind benchmarks/README.md's frontier stays loadable (every recipe, key and seed valid)."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "sweeps" / "issue15_portraits.yaml"
    sweep = sw.load_sweep(str(path))
    names = [r.name for r in sweep.runs]
    assert "lora__seed=2" in names and "dp_style__dp.target_epsilon=1__seed=0" in names and len(names) == 10


def test_frontier_labels_of_coinciding_points_do_not_overlap():
    """Settings that land on one spot (every undefended-like run at AUC 1.0) get labels that do not overlap."""
    from privtune.sweep.frontier import LABEL_CHAR, LABEL_HEIGHT, place_labels

    texts = [f"setting number {i}" for i in range(10)]
    points = [(0.8, 0.85)] * 8 + [(0.81, 0.85), (0.2, 0.1)]
    boxes = []
    for (x, y, align), text in zip(place_labels(points, texts), texts):
        width = LABEL_CHAR * len(text)
        left = x if align == "left" else x - width
        boxes.append((left, y, left + width, y + LABEL_HEIGHT))
    assert all(0 <= b[0] and b[2] <= 1 and 0 <= b[1] and b[3] <= 1 for b in boxes)
    for i, a in enumerate(boxes):
        for b in boxes[:i]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)
