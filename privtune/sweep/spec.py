"""The sweep file: loading, validation, grid expansion and run names."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..config import load_config, recipe_path, shipped_names, shipped_yaml
from ..errors import ConfigError

SWEEPS_DIR = Path(__file__).resolve().parent.parent / "sweeps"
SWEEP_KEYS = ("name", "output_dir", "seeds", "overrides", "runs")
ENTRY_KEYS = ("recipe", "label", "overrides", "seeds")
RESERVED_KEYS = ("recipe", "seed", "output_dir", "resume", "overwrite")  # the sweep sets these itself
MAX_NAME = 120
LOGS_DIR = "logs"


@dataclass(frozen=True)
class Setting:
    """One defense setting: a recipe and its overrides (one grid point), trained once per seed."""

    recipe: str
    overrides: tuple[tuple[str, Any], ...]  # the entry's own overrides at this grid point, sorted by key
    common: tuple[tuple[str, Any], ...] = ()  # the sweep-wide overrides, under the entry's
    label: str | None = None

    def __hash__(self) -> int:  # values may be lists or mappings: hash their command-line text
        return hash((self.recipe, tuple(override_args(self.overrides)), tuple(override_args(self.common)), self.label))

    @property
    def display(self) -> str:
        """The label (with this point's grid values when the entry has a grid), else `recipe key=value ...`."""
        return self.label if self.label else " ".join([Path(self.recipe).stem, *override_args(self.overrides)])

    @property
    def undefended(self) -> bool:
        """Plain LoRA with no setting of its own: the baseline every defense is measured against."""
        return self.recipe == "lora" and not self.overrides

    def train_overrides(self) -> list[str]:
        """The `key=value` arguments of its runs: the common overrides, replaced by the entry's own."""
        merged = dict(self.common)
        merged.update(self.overrides)
        return override_args(sorted(merged.items()))


@dataclass(frozen=True)
class Run:
    """One training run of the sweep: a setting at one seed, in its own folder under the root."""

    setting: Setting
    seed: int
    name: str
    dir: Path
    config: DictConfig = field(compare=False, repr=False)

    def train_args(self, resume: bool = False) -> list[str]:
        """The arguments of `python -m privtune.train` for this run (`resume=latest` to continue it)."""
        args = [f"recipe={self.setting.recipe}", *self.setting.train_overrides(), f"seed={self.seed}", f"output_dir={self.dir}"]
        return [*args, "resume=latest"] if resume else args


@dataclass(frozen=True)
class Sweep:
    """An expanded, validated sweep: every run it names, in file order."""

    name: str
    root: Path
    runs: tuple[Run, ...]
    source: Path

    @property
    def logs_dir(self) -> Path:
        return self.root / LOGS_DIR

    def log_path(self, run: Run) -> Path:
        return self.logs_dir / f"{run.name}.log"

    def settings(self) -> list[tuple[Setting, list[Run]]]:
        """The settings in file order, each with its runs (one per seed)."""
        groups: dict[Setting, list[Run]] = {}
        for run in self.runs:
            groups.setdefault(run.setting, []).append(run)
        return list(groups.items())


def available_sweeps() -> list[str]:
    return shipped_names(SWEEPS_DIR)


def sweep_path(sweep: str) -> Path:
    """A sweep name from privtune/sweeps/, or a path to a YAML file."""
    return shipped_yaml(sweep, SWEEPS_DIR, "sweep", "shipped sweeps")


def _parse_value(text: str) -> Any:
    return OmegaConf.to_container(OmegaConf.from_dotlist([f"v={text}"]))["v"]


def _yaml_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_yaml_text(str(k))}: {_yaml_text(v)}" for k, v in value.items()) + "}"
    text = str(value)
    return text if re.fullmatch(r"[A-Za-z0-9_./@+-]+", text) else json.dumps(text)


def format_value(value: Any) -> str:
    """`value` as the text of a `key=value` override that reads back as the same value (YAML flow style)."""
    writers: list[Callable[[Any], str]] = [str] if isinstance(value, str) else []
    for write in (*writers, _yaml_text, json.dumps):
        try:
            text = write(value)
            if _parse_value(text) == value:
                return text
        except (OmegaConfBaseException, ValueError, TypeError):
            continue
    raise ConfigError(f"cannot write the override value {value!r} on a command line; use a number, string, boolean, list or mapping")


def override_args(overrides: Sequence[tuple[str, Any]]) -> list[str]:
    return [f"{key}={format_value(value)}" for key, value in overrides]


def _safe(part: str) -> str:
    """A name part with only filesystem-safe characters: brackets and quotes dropped, `,` -> `+`, the rest -> `_`."""
    part = re.sub(r"[\[\]{}\"' ]", "", part).replace(",", "+").replace(":", "-")
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", part)


def run_name(recipe: str, overrides: Sequence[tuple[str, Any]], seed: int, max_len: int = MAX_NAME) -> str:
    """The deterministic folder name of a run: recipe, its overrides sorted by key, and the seed.

    Names longer than `max_len` keep their start and the seed, with a hash of the full name in between."""
    body_parts = [Path(recipe).stem, *override_args(sorted(overrides, key=lambda kv: kv[0]))]
    body = "__".join(_safe(p) for p in body_parts)
    tail = f"__seed={seed}"
    if len(body) + len(tail) > max_len:
        digest = hashlib.sha256("__".join(body_parts).encode()).hexdigest()[:8]
        body = f"{body[:max(1, max_len - len(tail) - 9)]}-{digest}"
    return body + tail


def _where(index: int | None) -> str:
    return "the sweep file" if index is None else f"runs[{index}]"


def _check_seeds(seeds: Any, index: int | None) -> list[int]:
    where = _where(index)
    if not isinstance(seeds, list) or not seeds:
        raise ConfigError(f"seeds in {where} must be a non-empty list of integers, e.g. seeds: [0, 1, 2] (got {seeds!r})")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ConfigError(f"seeds in {where} must be non-negative integers, e.g. seeds: [0, 1, 2] (got {seeds!r})")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds in {where} repeat a seed ({seeds!r}); list each seed once")
    return list(seeds)


def _check_overrides(overrides: Any, index: int | None) -> dict[str, Any]:
    where = _where(index)
    if overrides is None:
        return {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"overrides in {where} must be a mapping of dotted keys to values, e.g. "
                          f"overrides: {{dp.target_epsilon: [1, 4, 8]}} (got {overrides!r})")
    for key in overrides:
        if str(key) in RESERVED_KEYS:
            raise ConfigError(f"overrides in {where} set {key!r}, which the sweep sets itself: use the entry's recipe:, "
                              "seeds: and the sweep's output_dir: instead")
    return {str(k): v for k, v in overrides.items()}


def expand_grid(overrides: Mapping[str, Any], list_keys: frozenset[str] = frozenset(), where: str = "an entry") -> list[dict[str, Any]]:
    """The grid points of an entry's overrides: the cartesian product of its list values (axes), scalars fixed.

    For a key in `list_keys` (its recipe value is a list) a plain list is the fixed value and a list of
    lists is the axis. Points come in the order of the keys and values as written."""
    axes: list[list[Any]] = []
    for key, value in overrides.items():
        if not isinstance(value, list):
            axes.append([value])
            continue
        if not value:
            fix = f"{key}: [[]]" if key in list_keys else f"{key}: <one value>"
            raise ConfigError(f"override {key} in {where} is an empty list: a list is a grid axis and needs at least one value "
                              f"(write {fix} for a fixed value, or remove the key)")
        nested = [isinstance(v, list) for v in value]
        if key in list_keys and not all(nested):
            if any(nested):
                raise ConfigError(f"override {key} in {where} mixes lists and single values; {key} takes a list, so write "
                                  f"one list for a fixed value or a list of lists for a grid axis")
            axes.append([value])
        else:
            axes.append(list(value))
    return [dict(zip(overrides, combo, strict=True)) for combo in itertools.product(*axes)]


def _list_keys(recipe: str, keys: Sequence[str]) -> frozenset[str]:
    """Which of `keys` hold a list in the recipe's own config (their plain-list override is a fixed value)."""
    base = load_config(recipe)
    return frozenset(k for k in keys if isinstance(OmegaConf.select(base, k, default=None), ListConfig))


def _resolve_recipe(recipe: Any, index: int, sweep_file: Path) -> str:
    if not isinstance(recipe, str) or not recipe:
        raise ConfigError(f"runs[{index}] has no recipe; add recipe: <name> (one of the shipped recipes or a .yaml path)")
    candidate = Path(recipe)
    if not candidate.is_absolute() and candidate.suffix in (".yaml", ".yml") and (sweep_file.parent / candidate).is_file():
        recipe = str(sweep_file.parent / candidate)  # a recipe file next to the sweep file
    recipe_path(recipe)
    return recipe


def _read_sweep_file(path: Path) -> dict[str, Any]:
    try:
        node = OmegaConf.load(path)
        data = OmegaConf.to_container(node, resolve=True)
    except (OmegaConfBaseException, OSError, ValueError) as exc:
        raise ConfigError(f"cannot read sweep file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"sweep file {path} must be a YAML mapping with a runs: list")
    unknown = [str(k) for k in data if k not in SWEEP_KEYS]
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} in sweep file {path}; valid keys: {', '.join(SWEEP_KEYS)}")
    if not isinstance(data.get("runs"), list) or not data["runs"]:
        raise ConfigError(f"sweep file {path} needs a non-empty runs: list, e.g. runs: [{{recipe: lora}}, {{recipe: dpsgd}}]")
    return data


def load_sweep(sweep: str | Path, output_dir: str | Path | None = None, overrides: Sequence[str] = ()) -> Sweep:
    """Read, expand and validate a sweep file (a name in privtune/sweeps/ or a path); nothing is written.

    `output_dir` replaces the file's root; `overrides` (`key=value`) are common overrides of every run,
    over the file's own. Every run's config is built (as `privtune.train` would), so any bad recipe, key
    or value fails here, before a run starts."""
    path = sweep_path(str(sweep))
    data = _read_sweep_file(path)
    name = str(data.get("name") or path.stem)
    root = Path(output_dir or data.get("output_dir") or Path("runs") / "sweeps" / name)
    default_seeds = _check_seeds(data["seeds"], None) if data.get("seeds") is not None else None
    common = _check_overrides(data.get("overrides"), None)
    for arg in overrides:
        key, sep, text = arg.partition("=")
        if not sep:
            raise ConfigError(f"cannot read argument {arg!r}; write overrides as key=value (e.g. train.max_steps=300)")
        try:
            value = _parse_value(text)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"cannot parse override {arg!r}: {exc}") from exc
        common.update(_check_overrides({key: value}, None))
    common_items = tuple(sorted(common.items()))
    runs: list[Run] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(data["runs"]):
        if not isinstance(entry, dict):
            raise ConfigError(f"runs[{index}] must be a mapping like {{recipe: lora, overrides: {{...}}}} (got {entry!r})")
        unknown = [str(k) for k in entry if k not in ENTRY_KEYS]
        if unknown:
            raise ConfigError(f"unknown key(s) {', '.join(unknown)} in runs[{index}]; valid keys: {', '.join(ENTRY_KEYS)}")
        try:
            recipe = _resolve_recipe(entry.get("recipe"), index, path)
        except ConfigError as exc:
            raise ConfigError(f"runs[{index}]: {exc}") from exc
        if entry.get("seeds") is not None:
            seeds = _check_seeds(entry["seeds"], index)
        elif default_seeds is not None:
            seeds = default_seeds
        else:
            raise ConfigError(f"runs[{index}] ({recipe}) has no seeds; add seeds: [0, 1, 2] at the top of the sweep file or in the entry")
        own = _check_overrides(entry.get("overrides"), index)
        label = entry.get("label")
        list_keys = _list_keys(recipe, [*own, *common])
        for key, value in common.items():
            if isinstance(value, list) and key not in list_keys:
                raise ConfigError(f"common override {key} is a list, but {key} takes a single value in runs[{index}] ({recipe}); "
                                  "grid axes belong in an entry's overrides")
        points = expand_grid(own, list_keys, where=f"runs[{index}] ({recipe})")
        axes = [k for k, v in own.items() if isinstance(v, list) and len({format_value(p[k]) for p in points}) > 1]
        for point in points:
            items = tuple(sorted(point.items()))
            point_label = None
            if label is not None:
                point_label = " ".join([str(label), *(f"{k}={format_value(point[k])}" for k in axes)])
            setting = Setting(recipe=recipe, overrides=items, common=common_items, label=point_label)
            for seed in seeds:
                run = _build_run(setting, seed, root, index)
                if run.name in seen:
                    raise ConfigError(f"runs[{seen[run.name]}] and runs[{index}] both make run {run.name!r}; give them different "
                                      "recipes, overrides or seeds (a label alone does not make another run)")
                seen[run.name] = index
                runs.append(run)
    return Sweep(name=name, root=root, runs=tuple(runs), source=path)


def _build_run(setting: Setting, seed: int, root: Path, index: int) -> Run:
    name = run_name(setting.recipe, setting.overrides, seed)
    run_dir = root / name
    args = [*setting.train_overrides(), f"seed={seed}", f"output_dir={run_dir}"]
    try:
        cfg = load_config(setting.recipe, args)
    except ConfigError as exc:
        raise ConfigError(f"runs[{index}] ({setting.recipe}, run {name}): {exc}") from exc
    return Run(setting=setting, seed=seed, name=name, dir=run_dir, config=cfg)
