"""LoRA injection through peft, with named target presets.

`attn` is the diffusers training script's set (attention projections); `full` is the kohya-style
set (attention, proj_in/proj_out, feed-forward, ResNet convolutions and time projections), which
reaches much further into the network and memorizes (and so is attacked) far more readily.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..errors import ConfigError

TARGET_PRESETS = {
    "attn": ["to_q", "to_k", "to_v", "to_out.0"],
    "full": [
        "to_q", "to_k", "to_v", "to_out.0",
        "proj_in", "proj_out",
        "ff.net.0.proj", "ff.net.2",
        "conv1", "conv2", "conv_shortcut", "time_emb_proj",
    ],
}


def target_modules(targets) -> list[str]:
    if isinstance(targets, str):
        if targets not in TARGET_PRESETS:
            raise ConfigError(f"unknown lora.targets preset {targets!r}; use one of {sorted(TARGET_PRESETS)} or a list of module names")
        return list(TARGET_PRESETS[targets])
    names = [str(t) for t in targets]
    if not names:
        raise ConfigError("lora.targets is an empty list; name at least one module or use a preset (attn, full)")
    return names


def lora_config(rank: int, alpha: float, dropout: float, targets):
    from peft import LoraConfig

    if rank < 1:
        raise ConfigError(f"lora.rank must be >= 1 (got {rank})")
    return LoraConfig(r=int(rank), lora_alpha=float(alpha), lora_dropout=float(dropout),
                      init_lora_weights="gaussian", target_modules=target_modules(targets))


def add_lora(model: torch.nn.Module, config, adapter_name: str = "default") -> list[torch.nn.Parameter]:
    """Attach a LoRA adapter (diffusers' / transformers' peft integration); returns its parameters."""
    import warnings

    try:
        with warnings.catch_warnings():  # a second adapter (DualMD, DistillMD) is intended
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            if hasattr(model, "add_adapter"):
                model.add_adapter(config, adapter_name=adapter_name)
            else:
                from peft import inject_adapter_in_model

                inject_adapter_in_model(config, model, adapter_name=adapter_name)
    except ValueError as exc:
        raise ConfigError(f"cannot attach LoRA to {type(model).__name__}: {exc}. Check lora.targets") from exc
    params = [p for n, p in model.named_parameters() if "lora_" in n and f".{adapter_name}." in n + "."]
    for p in params:
        p.requires_grad_(True)
    if not params:
        raise ConfigError(f"lora.targets matched no module of {type(model).__name__}; check the names")
    return params


def lora_state_dict(model: torch.nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=adapter_name)


def load_lora(components, lora_dir, adapter_name: str = "default") -> None:
    """Load an exported LoRA folder into the components' UNet (and text encoder) through diffusers.

    diffusers only warns when no key matches, so we check that every tensor of the file found a
    module of the right shape, and raise ModelError naming the problem otherwise.
    """
    from pathlib import Path

    from diffusers import StableDiffusionPipeline

    from ..errors import ModelError

    folder = Path(lora_dir)
    if not folder.is_dir() or not any(folder.glob("*.safetensors")):
        raise ModelError(f"LoRA folder {folder} holds no .safetensors weights; pass the run's lora/ folder")
    try:
        state, _ = StableDiffusionPipeline.lora_state_dict(str(folder), weight_name="pytorch_lora_weights.safetensors")
    except (OSError, ValueError, EnvironmentError) as exc:
        raise ModelError(f"cannot read the LoRA in {folder}: {exc}") from exc
    unet_keys = [k for k in state if k.startswith("unet.")]
    try:
        StableDiffusionPipeline.load_lora_into_unet(state, network_alphas=None, unet=components.unet, adapter_name=adapter_name)
        text_keys = [k for k in state if k.startswith("text_encoder.")]
        if text_keys:
            StableDiffusionPipeline.load_lora_into_text_encoder(state, network_alphas=None, text_encoder=components.text_encoder,
                                                                adapter_name=adapter_name)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ModelError(f"the LoRA in {folder} does not fit the base model {components.path}: {str(exc)[:500]}") from exc
    loaded = lora_state_dict(components.unet, adapter_name)
    if len(loaded) < len(unet_keys):
        raise ModelError(
            f"the LoRA in {folder} does not fit the base model {components.path}: only {len(loaded)} of its "
            f"{len(unet_keys)} UNet tensors match a module; was it trained on another base model?"
        )


def tuner_layers(model: torch.nn.Module) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def use_adapter(model: torch.nn.Module, name: str, layers: list | None = None) -> None:
    """Make adapter `name` the active one of every LoRA layer, leaving every `requires_grad` flag as it was.

    peft's `set_adapter` also flips `requires_grad` (active on, others off); a trainer that owns which
    adapters train (DualMD trains two, DistillMD's teachers stay frozen) must not have that changed.
    """
    layers = tuner_layers(model) if layers is None else layers
    flags = [(p, p.requires_grad) for m in layers for p in m.parameters()]
    for m in layers:
        m.set_adapter(name)
    for p, flag in flags:
        p.requires_grad_(flag)


@contextmanager
def adapters_disabled(model: torch.nn.Module):
    """The base model alone: every LoRA layer bypassed (peft's `enable_adapters(False)`), restored on exit."""
    layers = tuner_layers(model)
    before = [m.disable_adapters for m in layers]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m, was_disabled in zip(layers, before):
            m.enable_adapters(not was_disabled)


def active_adapter(model: torch.nn.Module) -> str:
    layers = tuner_layers(model)
    names = {tuple(m.active_adapters) for m in layers}
    if len(names) != 1:
        raise ValueError(f"LoRA layers disagree on the active adapter: {sorted(names)}")
    return ",".join(names.pop())


def load_adapter(model: torch.nn.Module, weights_file, config, adapter_name: str) -> list[torch.nn.Parameter]:
    """Add adapter `adapter_name` (shaped by `config`) to `model` and fill it from an exported diffusers file.

    Every tensor of the file must land in a module; returns the adapter's parameters (frozen).
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from ..errors import ModelError

    params = add_lora(model, config, adapter_name)
    state = {k[len("unet."):]: v for k, v in load_file(str(weights_file)).items() if k.startswith("unet.")}
    result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) or [] if "lora_" in k]
    loaded = lora_state_dict(model, adapter_name)
    if unexpected or len(loaded) != len(state):
        raise ModelError(f"the adapter {weights_file} does not fit this UNet ({len(state)} tensors in the file, "
                         f"{len(loaded)} in the adapter, {len(unexpected)} unexpected); was it trained with other lora settings?")
    for p in params:
        p.requires_grad_(False)
    return params
