"""The schema's building blocks: fields that carry their help text, the base class of the section dataclasses
with its range-check helpers, and the parser that turns a config value into its field's type.

The parser is strict where a silent conversion would train with a value nobody asked for: booleans are only
true / false, an integer key refuses 2.5, a list key refuses a single value. It converts where nothing is lost:
an integer into a float key (0 -> 0.0), a number into a string key (a hub revision), an integral float into an
integer key (1e3 -> 1000).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from functools import cache
from typing import Any, ClassVar, Union

from omegaconf import DictConfig, ListConfig

from ..errors import ConfigError


def option(default: Any, help: str, *, choices: tuple = (), key: str | None = None) -> Any:
    """A schema field: its default (the value lora.yaml ships), its one-line help and, optionally, the values it
    takes. `key` is the config key where it is no Python name (mp.lambda)."""
    metadata: dict[str, Any] = {"help": help}
    if choices:
        metadata["choices"] = tuple(choices)
    if key:
        metadata["key"] = key
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def section(cls: type, help: str) -> Any:
    """A nested section that every config has (e.g. eval.extraction)."""
    return dataclasses.field(default_factory=cls, metadata={"help": help})


def defense_section(help: str, recipe: str, trainers: tuple[str, ...]) -> Any:
    """A defense's own section: absent (None) unless the recipe declares it. `recipe` is the shipped recipe that
    introduces it (its values are the section's defaults), `trainers` are the trainers that need it."""
    return dataclasses.field(default=None, metadata={"help": help, "recipe": recipe, "trainers": tuple(trainers)})


def key_of(f: dataclasses.Field) -> str:
    return f.metadata.get("key", f.name)


def show(value: Any) -> str:
    """A value as the user wrote it on the command line (true, [a, b], null)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (ListConfig, DictConfig)):
        from omegaconf import OmegaConf

        value = OmegaConf.to_container(value)
    if isinstance(value, list):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {show(v)}" for k, v in value.items()) + "}"
    return str(value)


class Section:
    """Base of the section dataclasses.

    `path` is the section's place in the config (e.g. "eval.extraction"; set once the schema tree is built).
    After construction the choices of every field are checked, then `check()`, where a subclass puts the
    range checks of its fields beside them. Both raise ConfigError naming the dotted key."""

    path: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise ConfigError(f"{self.key(f.name)} must be one of {', '.join(choices)} (got {value!r})")
        self.check()

    def check(self) -> None:
        """Range checks that need no model or data; the section's values are parsed to their types already."""

    def key(self, name: str) -> str:
        f = next(f for f in dataclasses.fields(self) if f.name == name)
        return f"{self.path}.{key_of(f)}" if self.path else key_of(f)

    def require(self, ok: bool, name: str, rule: str, hint: str = "") -> None:
        """ConfigError '<key> must be <rule> (got <value>)[: hint]' unless `ok`."""
        if not ok:
            value = getattr(self, name)
            got = repr(value) if isinstance(value, str) else show(value)
            raise ConfigError(f"{self.key(name)} must be {rule} (got {got})" + (f": {hint}" if hint else ""))

    def at_least(self, low: int | float, *names: str) -> None:
        """Each named key is null or >= low."""
        for name in names:
            value = getattr(self, name)
            self.require(value is None or value >= low, name, f">= {low}")

    def positive(self, *names: str) -> None:
        """Each named key is null or a finite number > 0."""
        for name in names:
            value = getattr(self, name)
            self.require(value is None or (math.isfinite(value) and value > 0), name, "> 0")

    def within(self, name: str, low: float, high: float, brackets: str = "[]", hint: str = "") -> None:
        """The key is null or in the interval `low, high`; `brackets` says which ends are closed ("[)", "()")."""
        value = getattr(self, name)
        if value is None:
            return
        above = value >= low if brackets[0] == "[" else value > low
        below = value <= high if brackets[1] == "]" else value < high
        self.require(above and below, name, f"in {brackets[0]}{low}, {high}{brackets[1]}", hint)


class Mismatch(Exception):
    """A value that does not have its field's type (the caller words the error)."""


def _union_args(tp: Any) -> tuple | None:
    if typing.get_origin(tp) is Union or isinstance(tp, types.UnionType):
        return typing.get_args(tp)
    return None


def section_class(tp: Any) -> type | None:
    """The section dataclass a field holds (through Optional), or None for a value field."""
    args = _union_args(tp)
    if args is not None:
        tp = next((a for a in args if a is not type(None)), None)
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


@cache
def hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def parse(tp: Any, value: Any, choices: tuple = ()) -> Any:
    """`value` converted to type `tp`, or Mismatch. Containers come back as plain lists and dicts."""
    if tp is Any:
        return value
    args = _union_args(tp)
    if args is not None:
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                try:
                    return parse(arg, value, choices)
                except Mismatch:
                    continue
        raise Mismatch
    origin = typing.get_origin(tp)
    if origin is list:
        if not isinstance(value, (list, ListConfig)):
            raise Mismatch
        (item,) = typing.get_args(tp)
        return [parse(item, v) for v in value]
    if origin is dict:
        if not isinstance(value, (dict, DictConfig)):
            raise Mismatch
        from omegaconf import OmegaConf

        return OmegaConf.to_container(value) if isinstance(value, DictConfig) else value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):
            word = "yes" if value else "no"  # YAML reads a bare no / yes as a boolean
            if word in choices:
                return word
        elif isinstance(value, (int, float)):
            return str(value)
    raise Mismatch


_NAMES = {bool: ("true or false", "booleans, e.g. [true, false]"), int: ("an integer", "integers, e.g. [1, 2]"),
          float: ("a number", "numbers, e.g. [0.9, 0.999]"), str: ("a string", "strings, e.g. [a, b]"),
          Any: ("any value", "values, e.g. [a, b]")}


def describe(tp: Any) -> str:
    """What a value of type `tp` is, for error messages ('an integer or null', 'a list of strings, e.g. [a, b]')."""
    args = _union_args(tp)
    if args is not None:
        words = [describe(a) for a in args if a is not type(None)]
        if type(None) in args:
            words.append("null")
        return ", ".join(words[:-1]) + " or " + words[-1] if len(words) > 1 else words[0]
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        return f"a list of {_NAMES.get(item, _NAMES[Any])[1]}"
    if origin is dict:
        return "a mapping, e.g. {key: value}"
    return _NAMES.get(tp, (getattr(tp, "__name__", str(tp)), ""))[0]


def mismatch_error(key: str, value: Any, tp: Any, default: Any, source: str | None = None) -> ConfigError:
    """'<key>=<value>[ in <source>]: expected <type> (the default is <default>)'."""
    where = f" in {source}" if source else ""
    hint = ""
    if isinstance(value, bool) and describe(tp).startswith("a string"):
        hint = "; YAML reads a bare yes / no / on / off as true / false, so quote a word like that"
    return ConfigError(f"{key}={show(value)}{where}: expected {describe(tp)} (the default is {show(default)}){hint}")
