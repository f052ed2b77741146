"""Recipes and command-line overrides, resolved into one strict OmegaConf config.

A recipe is `privtune/recipes/<name>.yaml` (shipped inside the package) or a path to the user's own YAML. A recipe may name a parent with
`inherits: <recipe>`; its keys are merged over the parent's. The merged config is struct-locked:
a recipe or override key the parent chain does not define is an error that lists the valid keys,
so a typo never silently trains with a default.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from .errors import ConfigError

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
_META_KEYS = ("inherits",)


def shipped_names(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.yaml"))


def shipped_yaml(name: str, folder: Path, kind: str, listing: str) -> Path:
    """A YAML file shipped in `folder` by name, or a path to one; unknown names list what ships."""
    candidate = Path(name)
    valid = ", ".join(shipped_names(folder))
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        if not candidate.is_file():
            raise ConfigError(f"{kind} file {name!r} does not exist; pass a YAML path or one of: {valid}")
        return candidate
    path = folder / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown {kind} {name!r}; {listing}: {valid} (or a path to a .yaml file)")
    return path


def available_recipes() -> list[str]:
    return shipped_names(RECIPES_DIR)


def recipe_path(recipe: str) -> Path:
    """A recipe name from recipes/, or a path to a YAML file."""
    return shipped_yaml(recipe, RECIPES_DIR, "recipe", "valid recipes")


def _load_chain(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    if path.resolve() in seen:
        raise ConfigError(f"recipe {path} inherits from itself")
    try:
        node = OmegaConf.load(path)
    except (OmegaConfBaseException, OSError, ValueError) as exc:
        raise ConfigError(f"cannot read recipe {path}: {exc}") from exc
    if not isinstance(node, DictConfig):
        raise ConfigError(f"recipe {path} must be a YAML mapping of keys to values")
    parent = node.pop("inherits", None)
    if parent is None:
        return node
    base = _load_chain(recipe_path(str(parent)), seen + (path.resolve(),))
    return merge_strict(base, node, source=str(path), allow_new_sections=True)


def _valid_keys(node: DictConfig, prefix: str) -> str:
    return ", ".join(f"{prefix}{k}" for k in node.keys())


def _check_keys(base: Any, update: Any, prefix: str, source: str, allow_new_sections: bool = False) -> None:
    if not isinstance(update, DictConfig) or not isinstance(base, DictConfig) or len(base) == 0:
        return  # an empty mapping in the parent is a free-form section (e.g. eval.attack_params)
    for key in update.keys():
        if allow_new_sections and key not in base and isinstance(update[key], DictConfig):
            continue  # a defense recipe adds its own section (e.g. dp:); its keys become the strict schema
        if key not in base:
            close = difflib.get_close_matches(str(key), [str(k) for k in base.keys()], n=1)
            hint = f"did you mean '{prefix}{close[0]}'? " if close else ""
            raise ConfigError(
                f"unknown key '{prefix}{key}' in {source}; {hint}valid keys here: {_valid_keys(base, prefix)}"
            )
        if isinstance(base[key], DictConfig) and update[key] is not None:
            if not isinstance(update[key], DictConfig):
                raise ConfigError(f"{prefix}{key} is a section ({_valid_keys(base[key], prefix + key + '.')}); set its keys, not the section")
            _check_keys(base[key], update[key], f"{prefix}{key}.", source)
        elif not OmegaConf.is_missing(base, key) and not OmegaConf.is_interpolation(update, key):
            _check_type(f"{prefix}{key}", base[key], update[key], source)
            if isinstance(base[key], float) and isinstance(update[key], int) and not isinstance(update[key], bool):
                update[key] = float(update[key])  # a float key stays a float down the recipe chain (0 -> 0.0)


def _check_type(key: str, default: Any, value: Any, source: str) -> None:
    """A value must have its default's type: booleans are strict, numbers are numbers, lists are lists.

    null is accepted anywhere (several keys use it to mean off / automatic); a str or null default is free-form
    (e.g. lora.targets takes a preset name or a list)."""
    if value is None or default is None or isinstance(default, str):
        return
    if isinstance(default, bool):
        ok, want = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif isinstance(default, ListConfig):
        ok, want = isinstance(value, ListConfig), "a list, e.g. [a, b]"
    else:
        return
    if not ok:
        raise ConfigError(f"{key}={_show(value)} in {source}: expected {want} (the default is {_show(default)})")


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (ListConfig, DictConfig)):
        return str(OmegaConf.to_container(value))
    return str(value)


def merge_strict(base: DictConfig, update: DictConfig, source: str, allow_new_sections: bool = False) -> DictConfig:
    """Merge `update` over `base`, refusing keys that `base` lacks (a child recipe may add whole sections)."""
    _check_keys(base, update, "", source, allow_new_sections)
    return OmegaConf.merge(base, update)


def parse_overrides(args: Sequence[str]) -> tuple[str | None, list[str]]:
    """Split `recipe=NAME` from the `key=value` overrides."""
    recipe = None
    overrides = []
    for arg in args:
        if "=" not in arg:
            raise ConfigError(f"cannot read argument {arg!r}; write overrides as key=value (e.g. train.max_steps=300)")
        key, value = arg.split("=", 1)
        if key == "recipe":
            recipe = value
        else:
            overrides.append(f"{key}={value}")
    return recipe, overrides


def load_config(recipe: str, overrides: Sequence[str] = ()) -> DictConfig:
    """Resolve a recipe and its overrides into one read-only config."""
    cfg = _load_chain(recipe_path(recipe))
    try:
        update = OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"cannot parse overrides {list(overrides)}: {exc}") from exc
    cfg = merge_strict(cfg, update, source="the command line")
    cfg.recipe = Path(recipe).stem if recipe_path(recipe).parent != RECIPES_DIR else recipe
    if cfg.output_dir is None:
        cfg.output_dir = str(Path("runs") / cfg.recipe)
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"cannot resolve the config: {exc}") from exc
    OmegaConf.set_struct(cfg, True)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def to_container(cfg: DictConfig | ListConfig) -> Any:
    return OmegaConf.to_container(cfg, resolve=True)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def flat(cfg: DictConfig) -> dict[str, Any]:
    """Dotted keys -> scalars, for trackers that want a flat hyper-parameter table."""
    return flatten(to_container(cfg))


def flatten(container: Any) -> dict[str, Any]:
    """Dotted keys -> scalars of a plain nested dict (non-scalar leaves as strings)."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node if isinstance(node, (int, float, str, bool)) or node is None else str(node)

    walk(container, "")
    return out


__all__ = ["ConfigError", "ConfigKeyError", "available_recipes", "load_config", "parse_overrides", "to_yaml", "flat"]
