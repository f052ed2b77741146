"""A DualMD release: its export (two adapter folders, the sampling helper, dualmd.json), loading it back,
and what the evaluation attacks (each adapter alone, their per-sample best, the alternating sampler).

Tran et al., "Dual-Model Defense" (arXiv 2410.16657); the trainer is `privtune.trainers.dualmd`, the
alternating predictor `privtune.models.alternation`.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from .. import export as exporter
from ..io import atomic_write_json, atomic_write_text
from .alternation import AdapterAlternation, ddim_timesteps
from .lora import active_adapter, lora_state_dict, use_adapter

ADAPTERS = ("A", "B")
EXPORT_DIRS = {"A": "adapter_a", "B": "adapter_b"}
HELPER_FILE = "dualmd_sampling.py"


def export_dualmd(folder: Path, unet, lora_config, kohya: bool = False, inference_steps: int = 25) -> Path:
    """lora/adapter_a, lora/adapter_b (diffusers format), the plain-diffusers sampling helper and dualmd.json."""
    from . import dualmd_sampling

    folder = Path(folder)
    for name, sub in EXPORT_DIRS.items():
        exporter.save_lora_folder(folder / sub, lora_state_dict(unet, name), lora_config, kohya=kohya)
    atomic_write_text(folder / HELPER_FILE, Path(dualmd_sampling.__file__).read_text())
    atomic_write_json(folder / "dualmd.json", {
        "format": "privtune-dualmd-v1", "adapters": dict(EXPORT_DIRS), "scheduler": "DDIM",
        "rule": "adapter A on even denoising steps (0, 2, ...), B on odd ones; one adapter for both CFG halves",
        "evaluated_inference_steps": inference_steps, "helper": HELPER_FILE,
    })
    return folder


def is_dualmd_export(folder) -> bool:
    return (Path(folder) / "dualmd.json").is_file()


def load_dualmd_adapters(components, folder) -> None:
    """Load an exported DualMD pair as adapters A and B of `components.unet` (A active)."""
    from .lora import load_lora

    for name, sub in EXPORT_DIRS.items():
        load_lora(components, Path(folder) / sub, name)
    use_adapter(components.unet, ADAPTERS[0])


def dualmd_steps(cfg) -> int:
    """The deployed schedule's length: the run's `dualmd.inference_steps` (else `eval.utility_inference_steps`)."""
    return int(cfg.dualmd.inference_steps if "dualmd" in cfg else cfg.eval.utility_inference_steps)


@contextmanager
def only_adapter(unet, name: str):
    """Adapter `name` alone, as an attacker holding just that file would run it; restores the active one."""
    previous = active_adapter(unet)
    use_adapter(unet, name)
    try:
        yield
    finally:
        use_adapter(unet, previous)


DUALMD_THREAT = ("white-box over the released files (adapter_a, adapter_b): the attacker runs each adapter alone, "
                 "the per-sample best of the two, and the deployed alternating sampler, fitting each attack's direction "
                 "and threshold on calibration data of known membership; the strongest is reported")


def dualmd_release_plan(unet, scheduler_config, steps: int) -> dict:
    """What a DualMD run ships, for `evaluate_model`: both adapter files, their alternating sampler
    (the deployed model) and the adapters' per-sample best combination."""
    from ..eval.runner import Release

    timesteps = ddim_timesteps(scheduler_config, int(steps))
    releases = [
        Release("alternating", description=f"adapters A / B alternated over a {steps}-step DDIM sampler (the deployed model)",
                context=lambda: AdapterAlternation(unet, timesteps, ADAPTERS), deployed=True),
        Release("adapter_a", description="lora/adapter_a alone over the base model", context=partial(only_adapter, unet, "A"),
                deployed=False),
        Release("adapter_b", description="lora/adapter_b alone over the base model", context=partial(only_adapter, unet, "B"),
                deployed=False),
    ]
    return {"releases": releases, "combinations": [("adapter_a", "adapter_b")], "threat_model": DUALMD_THREAT}


def usage_lines(base_model: str, steps: int) -> list[str]:
    return ["## Usage", "",
            "Two adapters (DualMD): `adapter_a` and `adapter_b` must be alternated across DDIM steps "
            "(A on even steps, B on odd ones); either one alone is not the audited model. "
            f"`{HELPER_FILE}` (next to this card, needs only diffusers) does it:", "",
            "```python", "from diffusers import StableDiffusionPipeline",
            "from dualmd_sampling import load_dualmd, generate", "",
            f'pipe = load_dualmd(StableDiffusionPipeline.from_pretrained("{base_model}"), "path/to/this/lora")',
            f'image = generate(pipe, "a prompt", num_inference_steps={steps}).images[0]', "```", ""]


def rewrite_card_usage(lora_dir: Path, base_model: str, steps: int) -> None:
    """Replace the single-LoRA usage section of the written model card with the DualMD one."""
    from ..eval.card import CARD_FILE, LOCAL_PATH, looks_like_path

    card = Path(lora_dir) / CARD_FILE
    if not card.is_file():
        return
    shown = "path/to/base-model" if looks_like_path(base_model) or base_model == LOCAL_PATH else base_model
    text = card.read_text()
    new = re.sub(r"## Usage\n.*?(?=## Privacy card)", lambda m: "\n".join(usage_lines(shown, steps)) + "\n", text, count=1, flags=re.S)
    atomic_write_text(card, new)
