"""What each trainer supports, declared rather than guessed.

A trainer lists the options it supports in `supports`; `check` refuses a config that turns on any other
one, with the trainer's reason and the fix, before anything is written. Options that can only be known
once Accelerate is up (several processes) are checked by `check_processes`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import ConfigError


@dataclass(frozen=True)
class Option:
    """A training option a trainer may not support: when it is on, and how to turn it off."""

    describe: str
    is_on: Callable
    fix: str


OPTIONS = {
    "memorization_filter": Option("the memorization filter", lambda cfg: cfg.memorization_filter.method != "none",
                                  "set memorization_filter.method=none"),
    "text_encoder": Option("a text-encoder LoRA", lambda cfg: bool(cfg.lora.text_encoder), "set lora.text_encoder=false"),
    "gradient_checkpointing": Option("train.gradient_checkpointing", lambda cfg: bool(cfg.train.gradient_checkpointing),
                                     "set train.gradient_checkpointing=false"),
    "fp16": Option("fp16 loss scaling", lambda cfg: cfg.train.mixed_precision == "fp16", "use train.mixed_precision=bf16 or no"),
    "max_grad_norm": Option("train.max_grad_norm (batch-level clipping)", lambda cfg: bool(cfg.train.max_grad_norm),
                            "set train.max_grad_norm=0"),
    "snr_gamma": Option("train.snr_gamma (min-SNR loss weighting)", lambda cfg: cfg.train.snr_gamma is not None,
                        "set train.snr_gamma=null"),
    "adapter_method": Option("an adapter method other than LoRA (lora.method=dora | lokr | loha)",
                             lambda cfg: cfg.lora.method != "lora", "set lora.method=lora"),
    "multi_process": Option("several processes", None, "launch it without accelerate multi-process"),
}
ALL = frozenset(OPTIONS)


def check(cfg, name: str, supports: frozenset, reasons: dict[str, str]) -> None:
    """Refuse every option that is on but not in `supports`."""
    unknown = set(supports) - ALL
    if unknown:
        raise ValueError(f"trainer {name} declares unknown capabilities {sorted(unknown)}; known: {sorted(ALL)}")
    for key, option in OPTIONS.items():
        if key not in supports and option.is_on is not None and option.is_on(cfg):
            why = f" ({reasons[key]})" if key in reasons else ""
            raise ConfigError(f"trainer {name} does not support {option.describe}{why}; {option.fix}")


def check_processes(num_processes: int, name: str, supports: frozenset, reasons: dict[str, str]) -> None:
    if num_processes > 1 and "multi_process" not in supports:
        why = f" ({reasons['multi_process']})" if "multi_process" in reasons else ""
        raise ConfigError(f"trainer {name} runs in a single process{why}; {OPTIONS['multi_process'].fix}")
