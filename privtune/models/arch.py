"""Random-weight pipelines with the published architectures of SD v1.5 and SDXL base 1.0, built offline.

No machine here can download weights, but the code path a real checkpoint takes depends on the architecture
(77-token CLIP states of width 768 / 2048, SDXL's second text encoder, pooled embeddings and add_time_ids,
64x64 latents, the attention layout), not on the weights. `build_pipeline` writes a diffusers folder
(safetensors) whose configs are the published ones (runwayml/stable-diffusion-v1-5 and
stabilityai/stable-diffusion-xl-base-1.0 `*/config.json`, transcribed in SD15 / SDXL below); `scale` divides
every width (and SDXL's transformer depth) so CPU tests can run it while every structural feature stays.

The tokenizer is a CLIP-format BPE tokenizer written here: the embedded tiny SD's learned vocabulary and
merges, padded with unused tokens so that BOS / EOS sit at CLIP's ids 49406 / 49407 in a 49,408-token
vocabulary (what the text encoders' embedding tables and pooling expect), 77 tokens long.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
VOCAB_SIZE, MAX_LENGTH = 49408, 77

CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              projection_dim=768, hidden_act="quick_gelu")
OPENCLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                     projection_dim=1280, hidden_act="gelu")
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 steps_offset=1)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           act_fn="silu", norm_num_groups=32)


@dataclass(frozen=True)
class Arch:
    """One published pipeline architecture: UNet / VAE kwargs, text encoder(s), scheduler class."""
    name: str
    unet: dict
    vae: dict
    text_encoders: tuple[dict, ...]
    text_classes: tuple[str, ...]
    scheduler: str
    scheduler_kwargs: dict = field(default_factory=dict)
    pipeline: str = "StableDiffusionPipeline"


SD15 = Arch(
    "sd15",
    unet=dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
              down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
              up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
              cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu"),
    vae={**VAE, "sample_size": 512, "scaling_factor": 0.18215},
    text_encoders=(CLIP_L,),
    text_classes=("CLIPTextModel",),
    scheduler="PNDMScheduler",
    scheduler_kwargs=dict(skip_prk_steps=True, set_alpha_to_one=False),
)

SDXL = Arch(
    "sdxl",
    unet=dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
              transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
              use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
              projection_class_embeddings_input_dim=2816, norm_num_groups=32, act_fn="silu"),
    vae={**VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
    text_encoders=({**CLIP_L, "hidden_act": "quick_gelu"}, OPENCLIP_BIGG),
    text_classes=("CLIPTextModel", "CLIPTextModelWithProjection"),
    scheduler="EulerDiscreteScheduler",
    scheduler_kwargs=dict(timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False),
    pipeline="StableDiffusionXLPipeline",
)
ARCHS = {"sd15": SD15, "sdxl": SDXL}


def _groups(channels) -> int:
    """The largest GroupNorm group count <= 32 that divides every width (32 at full width)."""
    return max(g for g in range(1, 33) if all(c % g == 0 for c in channels))


def scaled(arch: Arch, scale: int) -> Arch:
    """`arch` with every width divided by `scale` (heads kept; SDXL's transformer depth divided too)."""
    if scale == 1:
        return arch
    if scale < 1 or 320 % scale or 128 % scale:
        raise ValueError(f"--scale {scale}: widths 320 and 128 must divide by it (1, 2, 4, 8, 16, ...)")

    def div(x):
        return tuple(c // scale for c in x)

    u = dict(arch.unet, block_out_channels=div(arch.unet["block_out_channels"]))
    heads = arch.unet["attention_head_dim"]
    if any(c % h for c, h in zip(u["block_out_channels"], heads if isinstance(heads, tuple) else [heads] * 4)):
        raise ValueError(f"--scale {scale} leaves a width that the attention heads do not divide")
    encoders = tuple(dict(t, hidden_size=t["hidden_size"] // scale, intermediate_size=t["intermediate_size"] // scale,
                          projection_dim=t["projection_dim"] // scale,
                          num_hidden_layers=max(2, t["num_hidden_layers"] // scale)) for t in arch.text_encoders)
    for t in encoders:
        if t["hidden_size"] % t["num_attention_heads"]:
            raise ValueError(f"--scale {scale} leaves a text-encoder width that its heads do not divide")
    u["cross_attention_dim"] = sum(t["hidden_size"] for t in encoders)
    if "transformer_layers_per_block" in u:
        u["transformer_layers_per_block"] = tuple(max(1, n // scale) for n in u["transformer_layers_per_block"])
    if u.get("addition_embed_type") == "text_time":
        u["addition_time_embed_dim"] = arch.unet["addition_time_embed_dim"] // scale
        u["projection_class_embeddings_input_dim"] = encoders[-1]["projection_dim"] + 6 * u["addition_time_embed_dim"]
    u["norm_num_groups"] = _groups(u["block_out_channels"])
    v = dict(arch.vae, block_out_channels=div(arch.vae["block_out_channels"]))
    v["norm_num_groups"] = _groups(v["block_out_channels"])
    return Arch(f"{arch.name}/{scale}", u, v, encoders, arch.text_classes, arch.scheduler, arch.scheduler_kwargs, arch.pipeline)


def clip_vocab() -> tuple[dict[str, int], list[str]]:
    """The embedded tiny SD's BPE, padded so BOS / EOS are CLIP's 49406 / 49407 of a 49,408-token vocabulary."""
    from ..embedded import DEFAULT, EMBEDDED

    folder = EMBEDDED[DEFAULT].model / "tokenizer"
    learned = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    merges = [m for m in (folder / "merges.txt").read_text(encoding="utf-8").splitlines()[1:] if m]
    tokens = [t for t, _ in sorted(learned.items(), key=lambda kv: kv[1]) if t not in (BOS, EOS)]
    tokens += [f"<|unused{i}|>" for i in range(VOCAB_SIZE - 2 - len(tokens))]
    return {t: i for i, t in enumerate(tokens + [BOS, EOS])}, merges


def write_tokenizer(folder: Path, pad_token: str = EOS) -> None:
    """A CLIP tokenizer folder (vocab.json, merges.txt, config) of 77 tokens; SDXL's second pads with '!'."""
    vocab, merges = clip_vocab()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, "bos_token": BOS, "eos_token": EOS,
        "unk_token": EOS, "pad_token": pad_token, "do_lower_case": True}, indent=2), encoding="utf-8")


def text_config(spec: dict):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=VOCAB_SIZE, max_position_embeddings=MAX_LENGTH, bos_token_id=VOCAB_SIZE - 2,
                          eos_token_id=VOCAB_SIZE - 1, pad_token_id=VOCAB_SIZE - 1, **spec)


def build_modules(arch: Arch, device: str | torch.device = "cpu") -> dict:
    """`arch`'s networks with random weights on `device` ("meta": configs and shapes only, no memory)."""
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device(device):
        parts = {"unet": UNet2DConditionModel(**arch.unet), "vae": AutoencoderKL(**arch.vae)}
        for spec, cls, suffix in zip(arch.text_encoders, arch.text_classes, ("", "_2")):
            parts[f"text_encoder{suffix}"] = getattr(transformers, cls)(text_config(spec))
    return parts


def build_pipeline(arch: Arch, out: Path, seed: int = 0, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu") -> Path:
    """Write `arch` with random weights (seeded; initialised on `device`, stored in `dtype`) as a diffusers
    folder of safetensors; returns the folder."""
    import diffusers

    torch.manual_seed(seed)
    out = Path(out)
    parts = build_modules(arch, device)
    for name, module in parts.items():
        module.to("cpu", dtype).save_pretrained(out / name, safe_serialization=True)
    getattr(diffusers, arch.scheduler)(**arch.scheduler_kwargs, **SCHEDULER).save_pretrained(out / "scheduler")
    suffixes = ("", "_2")
    for suffix in suffixes[:len(arch.text_encoders)]:
        write_tokenizer(out / f"tokenizer{suffix}", pad_token="!" if suffix else EOS)
    index = {"_class_name": arch.pipeline, "_diffusers_version": diffusers.__version__,
             "scheduler": ["diffusers", arch.scheduler], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    for cls, suffix in zip(arch.text_classes, suffixes):
        index[f"text_encoder{suffix}"] = ["transformers", cls]
        index[f"tokenizer{suffix}"] = ["transformers", "CLIPTokenizer"]
    if arch.pipeline == "StableDiffusionXLPipeline":
        index.update(force_zeros_for_empty_prompt=True, image_encoder=[None, None], feature_extractor=[None, None])
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False,
                     image_encoder=[None, None])
    (out / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    n = sum(p.numel() for m in parts.values() for p in m.parameters())
    (out / "ARCH.md").write_text(
        f"# {arch.name}: random weights, published architecture\n\nBuilt by scripts/build_arch_pipeline.py (seed {seed}); "
        f"{n / 1e6:.1f} M parameters. Not a trained model: its generations are noise. It proves code paths.\n",
        encoding="utf-8")
    return out


def parameter_count(folder: Path) -> int:
    """Total parameters in a built folder's safetensors (read from the headers; nothing is loaded)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(folder).rglob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return total
