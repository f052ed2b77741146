"""Recipes and command-line overrides, resolved into one strict OmegaConf config.

A recipe is `privtune/recipes/<name>.yaml` (shipped inside the package) or a path to the user's own YAML. A recipe may name a parent with
`inherits: <recipe>`; its keys are merged over the parent's. The merged config is struct-locked:
a recipe or override key the parent chain does not define is an error that lists the valid keys,
so a typo never silently trains with a default. Recipes hold values; what each key is (its type, help and
allowed range) is `privtune.schema`, which every resolved config is parsed against.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from . import schema
from .errors import ConfigError
from .schema.base import show

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


def _check_keys(base: Any, update: Any, prefix: str, source: str, allow_new_sections: bool = False) -> None:
    """Refuse keys of `update` that `base` lacks and values of the wrong type; converts values to their key's type.

    A key the schema knows takes the schema's type; a key of a user's own section takes its parent value's type."""
    if not isinstance(update, DictConfig) or not isinstance(base, DictConfig) or len(base) == 0:
        return  # an empty mapping in the parent is a free-form section
    raw = OmegaConf.to_container(base, resolve=False)  # the parent's values as written: an interpolation stays ${...}
    for key in update.keys():
        path = f"{prefix}{key}"
        if key not in base:
            if allow_new_sections and not OmegaConf.is_interpolation(update, key) and isinstance(update[key], DictConfig):
                _check_new_section(path, update[key], source)
                continue
            raise _unknown_key(path, base, prefix, source)
        if OmegaConf.is_interpolation(update, key) or OmegaConf.is_missing(base, key):
            continue
        spec = schema.lookup(path)
        if spec is not None and spec.section is None:
            update[key] = spec.parse(update[key], source, raw[key])
        elif isinstance(raw[key], dict) and update[key] is not None:
            if not isinstance(update[key], DictConfig):
                keys = ", ".join(f"{path}.{k}" for k in raw[key])
                raise ConfigError(f"{path} is a section ({keys}); set its keys, not the section")
            _check_keys(base[key], update[key], f"{path}.", source)
        else:
            update[key] = _check_type(path, raw[key], update[key], source)


def _check_new_section(path: str, node: DictConfig, source: str) -> None:
    """A section a child recipe adds: a defense section of the schema is checked against it; any other section is the
    recipe's own, and its keys become the strict schema of the recipes and overrides below it."""
    spec = schema.lookup(path)
    if spec is not None and spec.section is not None:
        _check_keys(OmegaConf.create(schema.defaults(spec.section)), node, f"{path}.", source)


def _unknown_key(path: str, base: DictConfig, prefix: str, source: str) -> ConfigError:
    spec = schema.lookup(path)
    if spec is not None and "recipe" in spec.field.metadata:
        recipe, trainers = spec.field.metadata["recipe"], ", ".join(spec.field.metadata["trainers"])
        return ConfigError(f"unknown key '{path}' in {source}: this recipe has no {path}: section (it comes with "
                           f"recipe={recipe} and the recipes that inherit from it, for trainer {trainers}); pass "
                           f"recipe={recipe} to set {path}.* keys")
    return schema.unknown_key(path, [str(k) for k in base.keys()], prefix, f" in {source}")


def _check_type(key: str, default: Any, value: Any, source: str) -> Any:
    """A key of a user's own section must keep its parent value's type: booleans are strict, numbers are numbers,
    lists are lists (an integer becomes a float where the parent's value is a float).

    null is accepted anywhere; a str or null parent value is free-form."""
    if value is None or default is None or isinstance(default, str):
        return value
    if isinstance(default, bool):
        ok, want = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif isinstance(default, list):
        ok, want = isinstance(value, ListConfig), "a list, e.g. [a, b]"
    else:
        return value
    if not ok:
        raise ConfigError(f"{key}={show(value)} in {source}: expected {want} (the default is {show(default)})")
    return float(value) if isinstance(default, float) else value


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
    """Resolve a recipe and its overrides into one read-only config, parsed and checked against privtune.schema."""
    cfg = _load_chain(recipe_path(recipe))
    try:
        update = OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"cannot parse overrides {list(overrides)}: {exc}") from exc
    cfg = merge_strict(cfg, update, source="the command line")
    cfg.recipe = Path(recipe).stem if recipe_path(recipe).parent != RECIPES_DIR else recipe
    schema.fill_defaults(cfg)
    if cfg.output_dir is None:
        cfg.output_dir = str(Path("runs") / cfg.recipe)
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"cannot resolve the config: {exc}") from exc
    cfg = OmegaConf.create(schema.validate(OmegaConf.to_container(cfg)))
    OmegaConf.set_struct(cfg, True)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def to_container(cfg: DictConfig | ListConfig) -> Any:
    return OmegaConf.to_container(cfg, resolve=True)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def to_annotated_yaml(cfg: DictConfig) -> str:
    """The config as YAML with each key's schema help as a trailing comment (`key: value  # help`).

    Sections are blocks; every other value (lists, free-form mappings such as eval.attack_params) is written in
    flow style on its key's line, so each key has exactly one line for its comment."""
    import yaml

    lines = [f"# resolved config of recipe={cfg.get('recipe')}; after each key, its help (privtune.schema)"]

    def walk(node: dict, prefix: str, indent: str) -> None:
        for key, value in node.items():
            path = f"{prefix}{key}"
            spec = schema.lookup(path)
            comment = f"  # {spec.help}" if spec is not None else ""
            if isinstance(value, dict) and value and (spec is None or spec.section is not None):
                lines.append(f"{indent}{key}:{comment}")
                walk(value, f"{path}.", indent + "  ")
            else:
                flow = yaml.safe_dump([value], default_flow_style=True, width=10 ** 9).strip()[1:-1]
                lines.append(f"{indent}{key}: {flow}{comment}")

    walk(to_container(cfg), "", "")
    return "\n".join(lines) + "\n"


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


__all__ = ["ConfigError", "ConfigKeyError", "available_recipes", "load_config", "parse_overrides", "to_yaml",
           "to_annotated_yaml", "flat"]
