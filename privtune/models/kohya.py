"""LoKr and LoHa in the kohya / LyCORIS file layout that ComfyUI and A1111 load.

Keys are `<prefix>_<module path with "_" for ".">.<tensor>`, the tensors named as in LyCORIS (`lokr_w1`, `lokr_w2_a`,
`lokr_w2_b`, ...; `hada_w1_a`, ..., `hada_w2_b`) plus `alpha`. Those loaders scale the update by alpha / dim (dim: the
decomposed factor's rank) when a factor is decomposed and by 1 when none is, while peft always scales by alpha / r; so
peft's scale is multiplied into the first factor here and `alpha` is written as dim (scale 1 in every convention).
Hand-written because diffusers' `convert_state_dict_to_kohya` knows only lora_A / lora_B.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError

LOKR_TENSORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
LOHA_TENSORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def kohya_module(prefix: str, module: str) -> str:
    """kohya's name of diffusers module `module` (e.g. lora_unet_down_blocks_0_attentions_0_proj_in)."""
    return f"{prefix}_{module.replace('.', '_')}"


def _modules(state: dict) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        module, _, tensor = key.rpartition(".")
        if tensor not in LOKR_TENSORS + LOHA_TENSORS:
            raise ConfigError(f"the adapter tensor {key} has no kohya / LyCORIS name (effective-conv LoKr / LoHa is not exported)")
        out.setdefault(module, {})[tensor] = value
    return out


def kohya_state_dict(state: dict, config, prefix: str = "lora_unet") -> dict[str, torch.Tensor]:
    """peft's LoKr / LoHa state dict (`<module>.lokr_w1`, ...) in LyCORIS' layout, with the scale baked in."""
    scale = float(config.alpha) / float(config.r)
    out = {}
    for module, tensors in _modules(state).items():
        name = kohya_module(prefix, module)
        tensors = {k: v.detach().float().clone() for k, v in tensors.items()}
        if "hada_w1_a" in tensors:
            tensors["hada_w1_a"] *= scale
            dim = tensors["hada_w1_b"].shape[0]
        else:
            first = "lokr_w1" if "lokr_w1" in tensors else "lokr_w1_a"
            tensors[first] *= scale
            dim = (tensors["lokr_w2_b"].shape[0] if "lokr_w2_b" in tensors
                   else tensors["lokr_w1_b"].shape[0] if "lokr_w1_b" in tensors else None)
        out.update({f"{name}.{k}": v.contiguous() for k, v in tensors.items()})
        if dim is not None:
            out[f"{name}.alpha"] = torch.tensor(float(dim))
    return out
