"""What the standalone attack CLIs share (privtune.attack_gradients, privtune.attack_threats): key=value parsing,
opening a finished run folder (its config, released LoRA and member split), and publishing a result into the
run's threats/, report and card with the training data's captions, ids and paths scrubbed from the card."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .errors import ConfigError


def parse_keys(argv: Sequence[str], keys: Sequence[str]) -> dict[str, str]:
    """{key: value} of `key=value` arguments; unknown keys and a missing run= are errors naming the valid keys."""
    own = {}
    for arg in argv:
        if "=" not in arg:
            raise ConfigError(f"cannot read argument {arg!r}; write key=value (see --help)")
        key, value = arg.split("=", 1)
        if key not in keys:
            raise ConfigError(f"unknown key {key!r}; use one of {', '.join(keys)}")
        own[key] = value
    if "run" not in own:
        raise ConfigError("run=<run dir> is required: the run whose model and members are attacked")
    return own


def number(own: dict, key: str, kind, default):
    """own[key] read as `kind` (int / float), `default` when absent; a value that does not parse is a ConfigError."""
    try:
        return kind(own.get(key, default))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{key}={own.get(key)!r} is not a {kind.__name__}") from exc


@dataclass
class RunTarget:
    """A finished run as an attack target: its resolved config, released LoRA folder, split and DP record."""

    path: Path
    cfg: Any
    lora_dir: Path
    split: Any
    privacy: dict | None

    @property
    def forbidden(self) -> list[str]:
        """What the card must never carry: every caption, id and path of the run's training and evaluation rows."""
        rows = self.split.members + self.split.nonmembers
        return [r.caption for r in rows] + [r.id for r in rows] + [str(self.path.resolve()), str(self.path)]

    def load_components(self, adapter: str | None = None):
        """The base model frozen on CPU with the released LoRA loaded (as `adapter` when given), UNet in eval mode."""
        from .models.loading import freeze, load_components
        from .models.lora import load_lora

        components = load_components(self.cfg.model)
        freeze(*components.modules())
        load_lora(components, self.lora_dir, *([adapter] if adapter else []))
        components.unet.eval()
        return components

    def publish(self, name: str, title: str, result: dict, markdown: Sequence[str], card: str) -> Path:
        from .eval.stage import base_model_name
        from .eval.threats import publish_threat

        return publish_threat(self.path, name, title, result, markdown, card, lora_dir=self.lora_dir,
                              base_model=base_model_name(self.cfg), license=str(self.cfg.eval.license),
                              forbidden=self.forbidden)


def open_run(run, what: str) -> RunTarget:
    """The run folder `run` as a target of attack `what`; refuses a folder that is not a finished privtune run, and a
    DualMD release (two adapters alternated per step: these attacks read one LoRA), before anything is written."""
    from omegaconf import OmegaConf

    from .evaluate import _split, read_privacy, with_current_defaults
    from .models.dualmd import is_dualmd_export

    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"run={run} is not a privtune run folder (no config.yaml); pass a folder written by privtune.train")
    lora_dir = run / "lora"
    if not any(lora_dir.glob("*.safetensors")):
        raise ConfigError(f"{lora_dir} holds no LoRA weights; finish the run (or resume it) before running {what}")
    if is_dualmd_export(lora_dir):
        raise ConfigError(f"a DualMD release holds two adapters; {what} attacks one LoRA: train a plain run, or "
                          "attack each adapter's training run")
    cfg = with_current_defaults(OmegaConf.load(run / "config.yaml"))
    return RunTarget(run, cfg, lora_dir, _split(cfg, {}, run), read_privacy(run))
