"""Adapter methods through peft: LoRA, DoRA, LoKr and LoHa, one `Method` each, registered in `METHODS`.

- LoRA: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022.
- DoRA: Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024 (peft's `use_dora`): a magnitude
  vector per adapted weight beside LoRA's direction update.
- LoKr: Yeh et al., "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model Evaluation",
  ICLR 2024 (LyCORIS): the update is a Kronecker product w1 (x) w2, with w2 low-rank when the rank is small.
- LoHa: same paper (LyCORIS; after Hyeon-Woo et al.'s FedPara, ICLR 2022): the update is the Hadamard product of
  two low-rank products, (w1a w1b) * (w2a w2b).

A method is one entry here plus its kohya / LyCORIS key suffixes in `privtune.models.kohya`. `diffusers_loads` says
whether diffusers' `load_lora_weights` reads the exported file (LoRA, DoRA and LoKr; diffusers has no LoHa loader, so
a LoHa release is loaded through peft or, in ComfyUI / A1111, from the kohya file).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import ConfigError

ADAPTER_PREFIXES = ("lora_", "lokr_", "hada_")  # peft's parameter names of every method here


def is_adapter_param(name: str) -> bool:
    """Whether `name` (a `named_parameters` key) is a tensor of an adapter of any method here."""
    return any(p in name for p in ADAPTER_PREFIXES)


def holds_adapter(layer, adapter_name: str) -> bool:
    """Whether peft tuner layer `layer` holds adapter `adapter_name`, whatever its method."""
    return any(adapter_name in getattr(layer, attr, {}) for attr in getattr(layer, "adapter_layer_names", ()))


@dataclass(frozen=True)
class Method:
    """One adapter method: how peft builds it, which metadata keys describe it, which loaders read its file."""

    name: str
    describe: str
    build: Callable  # (rank, alpha, dropout, targets) -> a peft config
    metadata_keys: tuple[str, ...]
    diffusers_loads: bool
    lycoris: bool  # a LyCORIS method (peft's LycorisLayer): its own tensors, not lora_A / lora_B


def _lora(use_dora: bool):
    def build(rank, alpha, dropout, targets):
        from peft import LoraConfig

        return LoraConfig(r=int(rank), lora_alpha=float(alpha), lora_dropout=float(dropout), use_dora=use_dora,
                          init_lora_weights="gaussian", target_modules=targets)
    return build


def _lokr(rank, alpha, dropout, targets):
    from peft import LoKrConfig

    return LoKrConfig(r=int(rank), alpha=float(alpha), target_modules=targets)


def _loha(rank, alpha, dropout, targets):
    from peft import LoHaConfig

    return LoHaConfig(r=int(rank), alpha=float(alpha), target_modules=targets)


LORA_KEYS = ("r", "lora_alpha", "lora_dropout", "target_modules", "use_dora", "init_lora_weights", "peft_type", "bias",
             "use_rslora")
LYCORIS_KEYS = ("r", "alpha", "rank_dropout", "module_dropout", "target_modules", "use_effective_conv2d", "init_weights",
                "peft_type")

METHODS = {
    "lora": Method("lora", "LoRA", _lora(False), LORA_KEYS, diffusers_loads=True, lycoris=False),
    "dora": Method("dora", "DoRA", _lora(True), LORA_KEYS, diffusers_loads=True, lycoris=False),
    "lokr": Method("lokr", "LoKr", _lokr, (*LYCORIS_KEYS, "decompose_both", "decompose_factor"), diffusers_loads=True,
                   lycoris=True),
    "loha": Method("loha", "LoHa", _loha, LYCORIS_KEYS, diffusers_loads=False, lycoris=True),
}


def usage(name: str, weight_name: str) -> tuple[list[str], list[str]]:
    """(imports, lines) that load a run's `lora/` folder of method `name` into a vanilla diffusers `pipe`."""
    folder = "path/to/this/lora"
    if name == "lokr":  # the SD pipelines' load_lora_weights reads LoRA keys only; the UNet's own loader reads LoKr
        return [], [f'pipe.unet.load_lora_adapter("{folder}", weight_name="{weight_name}", prefix="unet")']
    if name == "loha":
        return (["import json", "from peft import LoHaConfig, inject_adapter_in_model, set_peft_model_state_dict",
                 "from safetensors import safe_open", "from safetensors.torch import load_file"],
                [f'weights = "{folder}/{weight_name}"  # diffusers has no LoHa loader; peft loads it',
                 'with safe_open(weights, "pt") as f:',
                 '    meta = json.loads(f.metadata()["lora_adapter_metadata"])',
                 'inject_adapter_in_model(LoHaConfig(**{k[5:]: v for k, v in meta.items() if k.startswith("unet.")}), pipe.unet)',
                 'set_peft_model_state_dict(pipe.unet, {k[5:]: v for k, v in load_file(weights).items() if k.startswith("unet.")})'])
    return [], [f'pipe.load_lora_weights("{folder}", weight_name="{weight_name}")']


def get(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"unknown lora.method {name!r}; use one of {', '.join(METHODS)}")
    return METHODS[name]


def method_of(config) -> Method:
    """The method a peft config builds."""
    peft_type = str(getattr(config.peft_type, "value", config.peft_type)).upper()
    if peft_type == "LORA":
        return METHODS["dora" if getattr(config, "use_dora", False) else "lora"]
    for m in METHODS.values():
        if m.name.upper() == peft_type:
            return m
    raise ConfigError(f"peft adapter type {peft_type} is not one privtune trains ({', '.join(METHODS)})")


def config_from_metadata(meta: dict):
    """The peft config an exported file's adapter metadata describes (privtune writes `peft_type`)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    cls = {"LORA": LoraConfig, "LOKR": LoKrConfig, "LOHA": LoHaConfig}.get(str(meta.get("peft_type", "LORA")).upper())
    if cls is None:
        raise ConfigError(f"adapter type {meta.get('peft_type')!r} is not one privtune loads ({', '.join(METHODS)})")
    return cls(**meta)
