"""Builders for the tiny Stable-Diffusion-architecture model that privtune ships as its default base.

Every component is a standard diffusers / transformers class (UNet2DConditionModel, AutoencoderKL,
CLIPTextModel, CLIPTokenizer, DDPM/DDIM schedulers) at a size that trains on a CPU in minutes, so
the fine-tuning, defense and attack code paths exercised on it are the ones used on real SD
checkpoints. The hyper-parameters live in the `TINY` dataclass instance so other code can read them.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

import torch

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


@dataclass(frozen=True)
class TinyConfig:
    """Hyper-parameters of the tiny pipeline (pixel/latent geometry, widths, depths, noise schedule)."""

    image_size: int = 32
    latent_channels: int = 4
    latent_size: int = 8
    vae_channels: tuple[int, ...] = (16, 32, 64)
    vae_layers_per_block: int = 1
    vae_norm_groups: int = 8
    unet_channels: tuple[int, ...] = (64, 96)
    unet_down_blocks: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D")
    unet_up_blocks: tuple[str, ...] = ("CrossAttnUpBlock2D", "UpBlock2D")
    unet_layers_per_block: int = 1
    unet_head_dim: int = 32
    text_hidden: int = 128
    text_intermediate: int = 256
    text_layers: int = 3
    text_heads: int = 4
    max_length: int = 32
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"


TINY = TinyConfig()

# The portraits base (assets/tiny-sd-portraits, benchmarks/README.md "Portraits benchmark"): 8 latent channels,
# because a 4-channel VAE trained on the base styles is a poor codec for an unseen style (its reconstructions of
# pixel-art `pool` renders read back as pixel art 0.63 of the time; 0.84-0.88 with 8 channels or with generic
# colour-block images in its batches), and cross-attention at the 8x8 decoder level too, so small regions follow
# the caption (with attention at 4x4 only, shirt colour on held-out pairs was 0.04; with it, 1.00).
PORTRAITS = replace(TINY, latent_channels=8, unet_up_blocks=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
ARCHS = {"tiny": TINY, "portraits": PORTRAITS}


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 reversible map from the 256 byte values to printable Unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _base_vocab() -> list[str]:
    """The 512 single-byte symbols, bare and word-final, in CLIP's order."""
    chars = list(bytes_to_unicode().values())
    return chars + [c + "</w>" for c in chars]


def _words(captions: Iterable[str]) -> Counter:
    """Pre-tokenize captions exactly as CLIPTokenizer does (normalizer + split + byte-level) and count words."""
    from transformers import CLIPTokenizer

    base = {t: i for i, t in enumerate(_base_vocab() + [BOS, EOS])}
    backend = CLIPTokenizer(vocab=base, merges=[]).backend_tokenizer
    counts: Counter = Counter()
    for caption in captions:
        text = backend.normalizer.normalize_str(caption)
        counts.update(piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text))
    return counts


def learn_bpe(captions: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn byte-level BPE merges until every caption word is a single token; returns (vocab, merges).

    The vocabulary keeps all 512 byte symbols so unseen words still tokenize (into smaller pieces);
    ties between equally frequent pairs are broken lexicographically so the result is deterministic.
    """
    words = [[list(w[:-1]) + [w[-1] + "</w>"], n] for w, n in sorted(_words(captions).items())]
    pairs: Counter = Counter()
    where: dict[tuple[str, str], set[int]] = {}
    for i, (symbols, n) in enumerate(words):
        for pair in zip(symbols, symbols[1:]):
            pairs[pair] += n
            where.setdefault(pair, set()).add(i)
    merges: list[tuple[str, str]] = []
    while pairs:
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        for i in sorted(where.pop(best)):
            symbols, n = words[i]
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] -= n
                if pairs[pair] <= 0:
                    del pairs[pair]
            out, j = [], 0
            while j < len(symbols):
                if j + 1 < len(symbols) and (symbols[j], symbols[j + 1]) == best:
                    out.append(joined)
                    j += 2
                else:
                    out.append(symbols[j])
                    j += 1
            words[i][0] = out
            for pair in zip(out, out[1:]):
                pairs[pair] += n
                where.setdefault(pair, set()).add(i)
    tokens = _base_vocab()
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            tokens.append(a + b)
            seen.add(a + b)
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def build_tokenizer(captions: Iterable[str], max_length: int = TINY.max_length):
    """A CLIPTokenizer whose BPE is learned from `captions`, written as vocab.json/merges.txt and reloaded."""
    return tokenizer_from_bpe(*learn_bpe(captions), max_length=max_length)


def tokenizer_from_bpe(vocab: dict[str, int], merges: list[tuple[str, str]], max_length: int = TINY.max_length):
    """Load a CLIPTokenizer from a learned vocabulary and merge list (through the on-disk file format)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer_files(Path(tmp), vocab, merges)
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=max_length)


def write_tokenizer_files(folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """Write the slow-format CLIP tokenizer files (vocab.json, merges.txt with its version header)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def build_text_encoder(vocab_size: int, bos_id: int, eos_id: int, seed: int = 0, cfg: TinyConfig = TINY):
    """A small randomly initialised CLIPTextModel (causal transformer, last hidden state conditions the UNet)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_intermediate,
        projection_dim=cfg.text_hidden,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=cfg.max_length,
        hidden_act="quick_gelu",
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    return CLIPTextModel(config)


def build_vae(seed: int = 0, cfg: TinyConfig = TINY):
    """A small AutoencoderKL: 3x32x32 pixels -> 4x8x8 latents (two downsamplings)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels,
        layers_per_block=cfg.vae_layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.vae_norm_groups,
        sample_size=cfg.image_size,
    )


def build_unet(seed: int = 0, cfg: TinyConfig = TINY):
    """A small UNet2DConditionModel with cross-attention to the text encoder's hidden states."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=cfg.latent_size,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        down_block_types=cfg.unet_down_blocks,
        up_block_types=cfg.unet_up_blocks,
        block_out_channels=cfg.unet_channels,
        layers_per_block=cfg.unet_layers_per_block,
        attention_head_dim=cfg.unet_head_dim,
        cross_attention_dim=cfg.text_hidden,
        norm_num_groups=32,
    )


def scheduler_kwargs(cfg: TinyConfig = TINY) -> dict:
    """SD's noise schedule (scaled-linear betas 0.00085 -> 0.012 over 1000 steps, epsilon prediction)."""
    return dict(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
    )


def build_train_scheduler(cfg: TinyConfig = TINY):
    """DDPMScheduler used to add noise during training."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**scheduler_kwargs(cfg), clip_sample=False)


def build_sample_scheduler(cfg: TinyConfig = TINY):
    """DDIMScheduler with SD's settings; this is the scheduler saved with the pipeline."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**scheduler_kwargs(cfg), clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def count_parameters(module: torch.nn.Module) -> int:
    """Number of parameters of `module`."""
    return sum(p.numel() for p in module.parameters())
