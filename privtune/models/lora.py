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


SHOWN_MISMATCHES = 3  # key / shape pairs a wrong-shape LoRA's error shows


def target_modules(targets) -> list[str]:
    if isinstance(targets, str):
        if targets not in TARGET_PRESETS:
            raise ConfigError(f"unknown lora.targets preset {targets!r}; use one of {sorted(TARGET_PRESETS)} or a list of module names")
        return list(TARGET_PRESETS[targets])
    names = [str(t) for t in targets]
    if not names:
        raise ConfigError("lora.targets is an empty list; name at least one module or use a preset (attn, full)")
    return names


def lora_config(rank: int, alpha: float, dropout: float, targets, method: str = "lora"):
    """The peft config of adapter method `method` (privtune.models.methods: lora, dora, lokr, loha)."""
    from . import methods

    if rank < 1:
        raise ConfigError(f"lora.rank must be >= 1 (got {rank})")
    return methods.get(method).build(rank, alpha, dropout, target_modules(targets))


def _is_transformers_model(model) -> bool:
    return any(c.__module__.startswith("transformers.") for c in type(model).__mro__)


def add_lora(model: torch.nn.Module, config, adapter_name: str = "default") -> list[torch.nn.Parameter]:
    """Attach an adapter of any peft method here (diffusers' / transformers' peft integration); returns its parameters."""
    import warnings

    from .methods import is_adapter_param

    try:
        with warnings.catch_warnings():  # a second adapter (DualMD, DistillMD) is intended
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            # diffusers models through their peft integration; transformers models (the text encoders) through peft
            # itself: transformers 5's add_adapter demands a peft release (>= 0.22) that PyPI does not have yet.
            if hasattr(model, "add_adapter") and not _is_transformers_model(model):
                model.add_adapter(config, adapter_name=adapter_name)
            else:
                from peft import inject_adapter_in_model

                inject_adapter_in_model(config, model, adapter_name=adapter_name)
    except ValueError as exc:
        raise ConfigError(f"cannot attach LoRA to {type(model).__name__}: {exc}. Check lora.targets") from exc
    params = [p for n, p in model.named_parameters() if is_adapter_param(n) and f".{adapter_name}." in n + "."]
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

    Every tensor's shape is checked against the model before diffusers sees the file, and diffusers only
    warns when no key matches, so a LoRA that does not fit raises one short ModelError naming the problem.
    """
    from pathlib import Path

    from diffusers import StableDiffusionPipeline

    from ..errors import ModelError
    from ..export import LORA_FILE

    folder = Path(lora_dir)
    if not folder.is_dir() or not any(folder.glob("*.safetensors")):
        raise ModelError(f"LoRA folder {folder} holds no .safetensors weights; pass the run's lora/ folder")
    weights = folder / LORA_FILE
    what = f"the base model {components.path}"
    if any(".lokr_" in k or ".hada_" in k for k in _keys(weights)):
        return _load_lycoris(components, weights, what, adapter_name)
    try:
        state, _ = StableDiffusionPipeline.lora_state_dict(str(folder), weight_name=LORA_FILE)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise ModelError(f"cannot read the LoRA in {folder}: {exc}") from exc
    encoders = (("text_encoder", components.text_encoder), ("text_encoder_2", getattr(components, "text_encoder_2", None)))
    for prefix, model in (("unet", components.unet), *encoders):
        part = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
        if part and model is None:
            raise ModelError(f"the LoRA in {folder} has {prefix} weights, which {what} has no {prefix} for; "
                             "evaluate it on the (SDXL) base model it was trained on")
        if model is None:
            continue
        mismatches = shape_mismatches(model, part)
        if mismatches:
            raise ModelError(mismatch_message(weights, what, mismatches, len(part), file_settings(weights, part, prefix),
                                              fix="evaluate it on the base model it was trained on"))
    unet_keys = [k for k in state if k.startswith("unet.")]
    try:
        with _quiet_diffusers_loader():
            StableDiffusionPipeline.load_lora_into_unet(state, network_alphas=None, unet=components.unet, adapter_name=adapter_name)
            for prefix, model in encoders:
                if model is not None and any(k.startswith(prefix + ".") for k in state):
                    StableDiffusionPipeline.load_lora_into_text_encoder(state, network_alphas=None, text_encoder=model, prefix=prefix,
                                                                        adapter_name=adapter_name)
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"the LoRA in {folder} does not fit {what}: {first}") from exc
    loaded = lora_state_dict(components.unet, adapter_name)
    if len(loaded) < len(unet_keys):
        raise ModelError(
            f"the LoRA in {folder} does not fit {what}: only {len(loaded)} of its "
            f"{len(unet_keys)} UNet tensors match a module; was it trained on another base model?"
        )


def _keys(weights) -> list[str]:
    from safetensors import safe_open

    from ..errors import ModelError

    try:
        with safe_open(str(weights), "pt") as f:
            return list(f.keys())
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"cannot read the adapter file {weights}: {exc}") from exc


def file_metadata(weights) -> dict:
    """The adapter metadata diffusers' save_lora_weights packs into a file (`unet.r`, `text_encoder.alpha`, ...)."""
    import json

    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        return json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))


def _load_lycoris(components, weights, what: str, adapter_name: str) -> None:
    """A LoKr / LoHa file into the UNet (and text encoders) through peft, shaped by the file's adapter metadata.

    peft itself, not diffusers: diffusers has no LoHa loader, and one path for both keeps what privtune attacks the
    same for either (tests check a vanilla diffusers pipeline loads a LoKr file to the same predictions).
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from ..errors import ModelError
    from .methods import config_from_metadata

    meta = file_metadata(weights)
    state = load_file(str(weights))
    parts = (("unet", components.unet), ("text_encoder", components.text_encoder),
             ("text_encoder_2", getattr(components, "text_encoder_2", None)))
    for prefix, model in parts:
        part = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
        if not part:
            continue
        if model is None:
            raise ModelError(f"the adapter {weights} has {prefix} weights, which {what} has no {prefix} for")
        config = {k[len(prefix) + 1:]: v for k, v in meta.items() if k.startswith(prefix + ".")}
        if not config.get("peft_type"):
            raise ModelError(f"the adapter {weights} has no adapter metadata for its {prefix} tensors; export it with privtune")
        try:
            params = add_lora(model, config_from_metadata(config), adapter_name)
            result = set_peft_model_state_dict(model, part, adapter_name=adapter_name)
        except (ConfigError, RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"the adapter {weights} does not fit {what}: {first}; evaluate it on the base model it was "
                             "trained on") from exc
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            raise ModelError(f"the adapter {weights} does not fit {what}: {len(unexpected)} of its {prefix} tensors match "
                             f"no module (e.g. {unexpected[0]}); was it trained on another base model?")
        for p in params:
            p.requires_grad_(False)


@contextmanager
def _quiet_diffusers_loader():
    """Mute diffusers' loader logger, which logs a failed load's whole error before re-raising it."""
    import logging

    logger = logging.getLogger("diffusers.loaders.peft")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _expected_shape(model: torch.nn.Module, key: str, found: tuple, adapter: dict):
    """The shape `model` has for LoRA tensor `key` (`<module>.lora_A.weight`): the injected adapter's own
    parameter (`adapter`: its name -> parameter, with the adapter's name dropped), else what the base layer's
    sizes imply at the file's rank; None when unknown."""
    module_name, sep, tail = key.rpartition(".lora_")
    if not sep:
        return None
    part, _, leaf = tail.partition(".")
    if key in adapter:
        return tuple(adapter[key].shape)
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return None
    base = getattr(module, "base_layer", module)
    if leaf != "weight" or len(found) < 2:
        return None
    if isinstance(base, torch.nn.Linear):
        return (found[0], base.in_features) if part == "A" else (base.out_features, found[1])
    if isinstance(base, torch.nn.Conv2d):
        return (found[0], base.in_channels, *base.kernel_size) if part == "A" else (base.out_channels, found[1], 1, 1)
    return None


def shape_mismatches(model: torch.nn.Module, state: dict, adapter_name: str | None = None) -> list[tuple[str, tuple, tuple]]:
    """(key, expected shape, found shape) for every LoRA tensor of `state` (keys as exported, without the adapter's
    name) whose shape `model` does not have; against adapter `adapter_name`'s parameters where it is injected."""
    adapter = {}
    if adapter_name is not None:
        for name, param in model.named_parameters():
            for part in (".lora_A.", ".lora_B."):
                if f"{part}{adapter_name}." in name:
                    adapter[name.replace(f"{part}{adapter_name}.", part)] = param
    out = []
    for key, tensor in state.items():
        found = tuple(tensor.shape)
        expected = _expected_shape(model, key, found, adapter)
        if expected is not None and expected != found:
            out.append((key, expected, found))
    return out


def _targets_name(names) -> str:
    names = sorted(set(names))
    for preset, members in TARGET_PRESETS.items():
        if names == sorted(members):
            return preset
    return "[" + ",".join(names) + "]"


def file_settings(weights_file, state: dict, prefix: str = "unet") -> str:
    """The lora settings a file was trained with, as `lora.rank=.. lora.targets=..`: from the adapter metadata
    privtune and diffusers write, else read off the tensors' shapes and module names."""
    try:
        meta = file_metadata(weights_file)
    except (OSError, ValueError, RuntimeError):
        meta = {}
    rank = meta.get(f"{prefix}.r")
    targets = meta.get(f"{prefix}.target_modules")
    if rank is None:
        ranks = sorted({tuple(v.shape)[0] for k, v in state.items() if ".lora_A." in k and v.ndim >= 2})
        rank = ranks[0] if len(ranks) == 1 else "/".join(map(str, ranks)) or "?"
    if not targets:
        known = {t for preset in TARGET_PRESETS.values() for t in preset}
        modules = {k.rpartition(".lora_")[0] for k in state if ".lora_" in k}
        targets = {t for m in modules for t in known if m == t or m.endswith("." + t)}
    settings = f"lora.rank={rank} lora.targets={_targets_name(targets)}"
    alpha = meta.get(f"{prefix}.lora_alpha")
    return settings + (f" lora.alpha={alpha:g}" if isinstance(alpha, (int, float)) else "")


def mismatch_message(weights_file, what: str, mismatches: list, total: int, settings: str, fix: str) -> str:
    """One short message: the file, how many tensors mismatch, the first few shapes, and the fix."""
    def shape(s):
        return "(" + ", ".join(map(str, s)) + ")"

    shown = "\n".join(f"  {k}: expected {shape(e)}, found {shape(f)}" for k, e, f in mismatches[:SHOWN_MISMATCHES])
    more = f"\n  ... and {len(mismatches) - SHOWN_MISMATCHES} more" if len(mismatches) > SHOWN_MISMATCHES else ""
    return (f"the LoRA {weights_file} does not fit {what}: {len(mismatches)} of its {total} tensors have another shape\n"
            f"{shown}{more}\nthe file was trained with {settings}; {fix}")


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
    mismatches = shape_mismatches(model, state, adapter_name)
    if mismatches:
        targets = config.target_modules if isinstance(config.target_modules, str) else _targets_name(config.target_modules)
        raise ModelError(mismatch_message(weights_file, f"an adapter with lora.rank={config.r} lora.targets={targets}",
                                          mismatches, len(state), file_settings(weights_file, state),
                                          fix="set the lora settings to the file's"))
    result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) or [] if "lora_" in k]
    loaded = lora_state_dict(model, adapter_name)
    if unexpected or len(loaded) != len(state):
        raise ModelError(f"the adapter {weights_file} does not fit this UNet ({len(state)} tensors in the file, "
                         f"{len(loaded)} in the adapter, {len(unexpected)} unexpected); was it trained with other lora settings?")
    for p in params:
        p.requires_grad_(False)
    return params
