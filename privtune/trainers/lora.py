"""Plain LoRA fine-tuning (Hu et al., "LoRA", ICLR 2022): the undefended baseline."""

from .base import Trainer
from .registry import TRAINERS


@TRAINERS.register("lora")
class LoRATrainer(Trainer):
    """The base loop with the plain denoising loss and no defense."""

    name = "lora"
