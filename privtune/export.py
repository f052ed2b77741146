"""Export the trained LoRA (diffusers format, optionally kohya/webui) and image grids, atomically.

The safetensors files carry only the adapter's shape metadata (rank, alpha, targets): no paths,
captions or other facts about the training data.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from .io import apply_umask, atomic_path

LORA_DIR = "lora"
LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"


def _install(tmp_dir: Path, final_dir: Path) -> None:
    """Move every file of `tmp_dir` into `final_dir`, one atomic rename each, with the umask's mode
    (safetensors writes owner-only files)."""
    final_dir.mkdir(parents=True, exist_ok=True)
    for f in tmp_dir.iterdir():
        apply_umask(f)
        os.replace(f, final_dir / f.name)


def adapter_metadata(config) -> dict:
    """The config keys that rebuild the adapter's shape (privtune.models.methods), JSON-safe; nothing about the data."""
    from .models.methods import method_of

    meta = config.to_dict()
    meta["target_modules"] = sorted(meta.get("target_modules") or [])
    meta["peft_type"] = str(getattr(config.peft_type, "value", config.peft_type))
    return {k: v for k, v in meta.items() if k in method_of(config).metadata_keys}


def save_lora_folder(folder: Path, unet_state: dict, unet_config, text_state: dict | None = None,
                     text_config=None, kohya: bool = False, text_state_2: dict | None = None) -> Path:
    """Write a diffusers-loadable LoRA folder (and the kohya file) from peft state dicts.

    The peft key layout (`lora_A` / `lora_B`) is kept: diffusers' older `lora.down` / `lora.up`
    conversion covers attention layers only and would leave a `full`-target LoRA half-loadable.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.") as tmp:
        tmp = Path(tmp)
        kwargs = {}
        if text_state:
            kwargs = {"text_encoder_lora_layers": text_state,
                      "text_encoder_lora_adapter_metadata": adapter_metadata(text_config)}
        pipeline = StableDiffusionPipeline
        if text_state_2:  # SDXL's second text encoder: its keys are text_encoder_2.*
            pipeline = StableDiffusionXLPipeline
            kwargs.update(text_encoder_2_lora_layers=text_state_2, text_encoder_2_lora_adapter_metadata=adapter_metadata(text_config))
        pipeline.save_lora_weights(
            tmp, unet_lora_layers=unet_state, weight_name=LORA_FILE,
            safe_serialization=True, unet_lora_adapter_metadata=adapter_metadata(unet_config), **kwargs,
        )
        if kohya:
            save_kohya(tmp / KOHYA_FILE, unet_state, unet_config, text_state, text_config)
        _install(tmp, folder)
    return folder / LORA_FILE


def save_kohya(path: Path, unet_state: dict, unet_config, text_state=None, text_config=None) -> None:
    """The kohya / webui key layout that ComfyUI and A1111 load: LoRA as lora_unet_*.lora_down / lora_up / alpha
    (diffusers' converter), LoKr / LoHa in LyCORIS' layout (privtune.models.kohya); a text-encoder LoRA as lora_te_*,
    kohya's SD 1.x name (diffusers writes lora_te1_, SDXL's name for its first encoder, which A1111 maps on SDXL only)."""
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    from .models import kohya as lycoris
    from .models.methods import method_of

    def lora_part(state, config, prefix: str) -> dict:
        out = convert_state_dict_to_kohya({f"{prefix}.{k}": v for k, v in state.items()})
        return {k: torch.tensor(float(config.lora_alpha)) if k.endswith(".alpha") else v for k, v in out.items()}

    method = method_of(unet_config)
    if method.lycoris:
        kohya = lycoris.kohya_state_dict(unet_state, unet_config, "lora_unet")
        meta = {"ss_network_module": "lycoris.kohya", "ss_network_args": f'{{"algo": "{method.name}"}}',
                "ss_network_alpha": str(unet_config.alpha)}
    else:
        kohya = lora_part(unet_state, unet_config, "unet")
        meta = {"ss_network_module": "networks.lora", "ss_network_alpha": str(unet_config.lora_alpha)}
    if text_state:
        kohya.update({k.replace("lora_te1_", "lora_te_", 1): v for k, v in lora_part(text_state, text_config, "text_encoder").items()})
    kohya = {k: v.contiguous() for k, v in kohya.items()}
    save_file(kohya, str(path), metadata={"format": "pt", "ss_network_dim": str(unet_config.r), **meta})


def export_lora(trainer) -> Path:
    """The trainer's adapters into run_dir/lora."""
    from .models.lora import lora_state_dict

    acc = trainer.accelerator
    unet = acc.unwrap_model(trainer.components.unet)
    comps = trainer.components
    text_state = text_state_2 = None
    if trainer.text_lora_config is not None:
        text_state = lora_state_dict(acc.unwrap_model(comps.text_encoder))
        if comps.sdxl:
            text_state_2 = lora_state_dict(acc.unwrap_model(comps.text_encoder_2))
    return save_lora_folder(trainer.run_dir / LORA_DIR, lora_state_dict(unet), trainer.lora_config,
                            text_state, trainer.text_lora_config, kohya=trainer.cfg.export.kohya, text_state_2=text_state_2)


def save_image_grid(images: list[Image.Image], captions: list[str], path: Path, cell: int = 128) -> Path:
    """A captioned row of images, upscaled for viewing, written atomically as PNG."""
    width = cell * len(images)
    grid = Image.new("RGB", (width, cell + 28), "white")
    draw = ImageDraw.Draw(grid)
    for i, (im, cap) in enumerate(zip(images, captions)):
        grid.paste(im.resize((cell, cell), Image.NEAREST), (i * cell, 0))
        draw.text((i * cell + 2, cell + 2), cap[:22], fill="black")
        draw.text((i * cell + 2, cell + 14), cap[22:44], fill="black")
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
    return Path(path)


__all__ = ["save_lora_folder", "export_lora", "save_image_grid"]
