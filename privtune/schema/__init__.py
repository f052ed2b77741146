"""The typed schema of a privtune config: one dataclass per section, each field with its default, a one-line help
text (`metadata["help"]`, as in peft's dataclasses) and the range checks beside it (`Section.check`).

Recipes (privtune/recipes/*.yaml) hold values; this package says what each key is. `privtune.config.load_config`
parses every resolved config against it (`validate`), so a wrong type or an out-of-range value is a ConfigError
naming the key before any model, data or run folder is touched. The defense sections (dp, mp, dualmd, distill)
are Optional: a config has one only when its recipe declares it, so a `recipe=lora` config holds no dp: section.
A section that a user's own recipe adds and the schema does not know stays as the recipe writes it.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from omegaconf import DictConfig

from ..errors import ConfigError
from .base import Mismatch, Section, defense_section, hints, key_of, mismatch_error, option, parse, section, section_class, show
from .defenses import DP, EMPTY_ATTACKER_SPLIT, MP, Distill, DualMD
from .evaluation import Eval, Extraction
from .training import Canaries, Captions, Data, Dedup, Duplicate, Export, Lora, MemorizationFilter, Model, Optim, Sampling, Train

MP_TRAINERS = ("mp_lora", "smp_lora")


@dataclass
class Config(Section):
    trainer: str = option("lora", "which trainer class runs (privtune.trainers registry)")
    seed: int = option(0, "seed of the split, the training draws and the attacks")
    output_dir: Optional[str] = option(None, "run folder; null = runs/<recipe>")
    resume: Optional[str] = option(None, "null | latest | path to a checkpoint-<step> folder")
    overwrite: bool = option(False, "allow a new run to replace an existing run folder's results (the old run is moved aside)")
    tracking: str = option("none", "none | wandb | tensorboard (WANDB_MODE=offline works with no network)",
                           choices=("none", "wandb", "tensorboard"))
    tracking_log_captions: bool = option(False, "true sends validation prompts, data paths and ids to the tracker (default: "
                                                "neutral captions, paths and ids scrubbed)")
    tracker_project: str = option("privtune", "project name at the tracker")
    model: Model = section(Model, "the base Stable Diffusion model")
    data: Data = section(Data, "training data and the member / non-member split")
    dedup: Dedup = section(Dedup, "near-duplicate removal on the loaded data, before the member / non-member split")
    canaries: Canaries = section(Canaries, "privacy audit: synthetic canaries inserted into the training rows")
    lora: Lora = section(Lora, "the LoRA adapter")
    train: Train = section(Train, "the training loop")
    optim: Optim = section(Optim, "optimizer and learning-rate schedule")
    captions: Captions = section(Captions, "caption randomization on training batches (Somepalli et al. NeurIPS 2023); "
                                           "all off by default")
    memorization_filter: MemorizationFilter = section(MemorizationFilter, "mask rows flagged as memorized out of the "
                                                                          "training loss (Wen et al. / Ren et al.)")
    sampling: Sampling = section(Sampling, "inference-time mitigations for validation images and utility generations")
    export: Export = section(Export, "formats the LoRA is exported in")
    eval: Eval = section(Eval, "attacks, utility and the privacy card at the end of the run")
    dp: Optional[DP] = defense_section("DP-SGD (Abadi et al. 2016; DPDM): per-example clipping, Gaussian noise, accountant",
                                       recipe="dpsgd", trainers=("dpsgd",))
    mp: Optional[MP] = defense_section("MP-LoRA / SMP-LoRA (Luo et al. 2025): the proxy membership attacker and the objective",
                                       recipe="mp_lora", trainers=MP_TRAINERS)
    dualmd: Optional[DualMD] = defense_section("DualMD (Tran et al. 2024): two adapters on disjoint halves of the members",
                                               recipe="dualmd", trainers=("dualmd", "distillmd"))
    distill: Optional[Distill] = defense_section("DistillMD (Tran et al. 2024): a student taught by the teacher that did not "
                                                 "see each sample", recipe="distillmd", trainers=("distillmd",))
    recipe: Optional[str] = option(None, "the recipe this config was resolved from (set by privtune)")

    def check(self) -> None:
        """The checks between sections; each section checked its own keys already."""
        self.at_least(0, "seed")
        for f in defense_fields():
            if self.trainer in f.metadata["trainers"] and getattr(self, f.name) is None:
                raise ConfigError(f"trainer {self.trainer} needs the {key_of(f)}: section; use recipe={self.trainer} "
                                  "(or inherit from it)")
        tiles, resolution = self.eval.extraction.tiles, self.data.resolution
        if self.eval.extraction.enabled and resolution % tiles:
            self.eval.extraction.require(False, "tiles", f">= 1 and divide data.resolution={resolution}")
        if self.trainer in MP_TRAINERS:
            self.data.require(self.data.auxiliary_members >= 1, "auxiliary_members", ">= 1", EMPTY_ATTACKER_SPLIT)
        if self.trainer == "smp_lora" and not self.mp.beta + self.mp.delta > 0:
            raise ConfigError(f"mp.beta + mp.delta must be > 0 so the SMP-LoRA denominator stays positive (got "
                              f"beta={self.mp.beta:g}, delta={self.mp.delta:g}); the paper uses beta=1, delta=1e-5")
        batch = self.train.batch_size
        if batch < 2 or batch % 2:
            if self.trainer == "dualmd":
                raise ConfigError(f"dualmd splits train.batch_size evenly between adapters A and B; make it even and >= 2 "
                                  f"(got {batch})")
            if self.trainer == "distillmd" and not self.distill.teachers:
                raise ConfigError(f"distillmd trains its teachers with train.batch_size split between A and B; make it "
                                  f"even and >= 2 (got {batch})")


def defense_fields() -> list[dataclasses.Field]:
    """The Optional sections a recipe declares for its defense (dp, mp, dualmd, distill)."""
    return [f for f in dataclasses.fields(Config) if "recipe" in f.metadata]


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {key_of(f): f for f in dataclasses.fields(cls)}


def _place(cls: type, path: str, seen: set) -> None:
    """Tell each section class where it sits; a class used twice would give its keys two names."""
    assert cls not in seen, f"{cls.__name__} appears twice in the schema"
    seen.add(cls)
    cls.path = path
    for key, f in _fields(cls).items():
        sub = section_class(hints(cls)[f.name])
        if sub is not None:
            _place(sub, f"{path}.{key}" if path else key, seen)


_place(Config, "", set())


@dataclass(frozen=True)
class Spec:
    """One key of the schema: its dotted path, dataclass field and type."""

    path: str
    field: dataclasses.Field
    type: Any

    @property
    def section(self) -> type | None:
        return section_class(self.type)

    @property
    def help(self) -> str:
        return self.field.metadata["help"]

    @property
    def default(self) -> Any:
        return default_value(self.field, self.type)

    def parse(self, value: Any, source: str | None = None, default: Any = dataclasses.MISSING) -> Any:
        """`value` converted to this key's type, or a ConfigError naming key, value, type and `default` (shown)."""
        try:
            return parse(self.type, value, self.field.metadata.get("choices", ()))
        except Mismatch:
            shown = self.default if default is dataclasses.MISSING else default
            raise mismatch_error(self.path, value, self.type, shown, source) from None


def lookup(path: str) -> Spec | None:
    """The schema's key at dotted `path`, or None (unknown, or inside a free-form mapping such as eval.attack_params)."""
    cls: type | None = Config
    spec = None
    for part in path.split("."):
        if cls is None:
            return None
        f = _fields(cls).get(part)
        if f is None:
            return None
        spec = Spec(f"{spec.path}.{part}" if spec else part, f, hints(cls)[f.name])
        cls = spec.section
    return spec


def help_at(path: str) -> str | None:
    spec = lookup(path)
    return spec.help if spec else None


def default_value(f: dataclasses.Field, tp: Any) -> Any:
    """A field's default as a plain value; a section's as the mapping of its keys' defaults."""
    sub = section_class(tp)
    if sub is not None and "recipe" not in f.metadata:
        return defaults(sub)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def defaults(cls: type = Config) -> dict[str, Any]:
    """The defaults of a section (for Config: of a plain LoRA config, without the defense sections)."""
    return {key_of(f): default_value(f, hints(cls)[f.name]) for f in dataclasses.fields(cls) if "recipe" not in f.metadata}


def iter_paths(cls: type = Config, prefix: str = "") -> Iterator[Spec]:
    """Every key of the schema, sections included, defense sections with their keys."""
    for key, f in _fields(cls).items():
        spec = Spec(prefix + key, f, hints(cls)[f.name])
        yield spec
        if spec.section is not None:
            yield from iter_paths(spec.section, spec.path + ".")


def fill_defaults(cfg: DictConfig, cls: type = Config) -> None:
    """Add the schema default of every key a (not yet resolved) config lacks, in the sections it has: a user's recipe
    that declares `dp: {target_epsilon: 3}` gets the rest of dp:. Defense sections are added only by recipes."""
    for key, f in _fields(cls).items():
        tp = hints(cls)[f.name]
        if key not in cfg:
            if "recipe" not in f.metadata:
                cfg[key] = default_value(f, tp)
        elif section_class(tp) is not None and isinstance(cfg[key], DictConfig):
            fill_defaults(cfg[key], section_class(tp))


def unknown_key(path: str, valid: list[str], prefix: str, where: str = "") -> ConfigError:
    """'unknown key ...; did you mean ...? valid keys here: ...' for a key the schema or the recipe lacks."""
    name = path[len(prefix):]
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"did you mean '{prefix}{close[0]}'? " if close else ""
    return ConfigError(f"unknown key '{path}'{where}; {hint}valid keys here: {', '.join(prefix + k for k in valid)}")


def validate(container: dict[str, Any]) -> dict[str, Any]:
    """A resolved config (plain dict) parsed against the schema with every check run; returns it with each value
    converted to its key's type (same keys, same order). ConfigError on the first problem."""
    return _build(Config, container, "")[1]


def _build(cls: type, node: dict[str, Any], prefix: str) -> tuple[Any, dict[str, Any]]:
    specs = _fields(cls)
    kwargs: dict[str, Any] = {}
    parsed: dict[str, Any] = {}
    for key, value in node.items():
        f = specs.get(str(key))
        if f is None:
            if cls is Config and isinstance(value, dict):
                parsed[key] = value  # a section of the user's own recipe: strict through its recipe chain only
                continue
            raise unknown_key(f"{prefix}{key}", list(specs), prefix)
        tp = hints(cls)[f.name]
        sub = section_class(tp)
        if sub is None:
            parsed[key] = kwargs[f.name] = Spec(prefix + key, f, tp).parse(value)
        elif value is None and "recipe" in f.metadata:
            parsed[key] = kwargs[f.name] = None
        elif not isinstance(value, dict):
            raise ConfigError(f"{prefix}{key}={show(value)}: {prefix}{key} is a section "
                              f"({', '.join(f'{prefix}{key}.{k}' for k in _fields(sub))}); set its keys, not the section")
        else:
            kwargs[f.name], parsed[key] = _build(sub, value, f"{prefix}{key}.")
    return cls(**kwargs), parsed


__all__ = [
    "Canaries", "Captions", "Config", "DP", "Data", "Dedup", "Distill", "DualMD", "Duplicate", "Eval", "Export",
    "Extraction", "Lora", "MP", "MemorizationFilter", "Model", "Optim", "Sampling", "Section", "Spec", "Train",
    "defaults", "defense_fields", "fill_defaults", "help_at", "iter_paths", "lookup", "unknown_key", "validate",
]
