"""Trainers: one Accelerate loop (base.Trainer) and one subclass per defense, picked by the recipe's `trainer:` key."""

from .registry import TRAINERS, get_trainer

from . import lora  # noqa: F401  (registers "lora")
from . import dpsgd  # noqa: F401  (registers "dpsgd")
from . import mp_lora  # noqa: F401  (registers "mp_lora" and "smp_lora")
from . import dualmd  # noqa: F401  (registers "dualmd")
from . import distillmd  # noqa: F401  (registers "distillmd")

__all__ = ["TRAINERS", "get_trainer"]
