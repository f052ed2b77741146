"""privtune: privacy-hardened Stable Diffusion LoRA fine-tuning, and the attacks that measure it."""

__version__ = "0.1.0"
