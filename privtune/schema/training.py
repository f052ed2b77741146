"""Sections of what is trained and how: model, data (with dedup and canaries), LoRA, training loop, optimizer,
caption randomization, the memorization filter, inference-time mitigations and export."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Union

from ..errors import ConfigError
from .base import Section, option, section

LORA_PRESETS = ("attn", "full")  # privtune.models.lora.TARGET_PRESETS
FILTER_METHODS = ("none", "wen", "ren")  # privtune.memorization.filter.METHODS


@dataclass
class Model(Section):
    base: str = option("embedded", "base model: embedded (= embedded:portraits) | embedded:emoji (shipped tiny SDs) | a local "
                                   "diffusers folder | a hub id (e.g. runwayml/stable-diffusion-v1-5)")
    revision: Optional[str] = option(None, "hub revision (branch, tag or commit) of the base model; null = the default branch")
    variant: Optional[str] = option(None, "weights variant, e.g. fp16 for hub checkpoints that ship it; null = the main weights")
    allow_unsafe_weights: bool = option(False, "true allows pickle (.bin) weights; safetensors only otherwise")


@dataclass
class Duplicate(Section):
    members: int = option(0, "how many members (seeded choice) to duplicate; 0 = off")
    repeats: int = option(50, "each duplicated member appears this many times in the training rows (recorded in split.json)")

    def check(self) -> None:
        self.at_least(0, "members")
        self.at_least(1, "repeats")


@dataclass
class Data(Section):
    source: str = option("embedded", "training data: embedded (= embedded:portraits) | embedded:emoji | a local image folder "
                                     "with metadata.jsonl | a hub data set name")
    subset: Optional[str] = option("pool", "embedded only: the benchmark subset members and non-members are drawn from "
                                           "(pool = the fine-tuning pool); null = all rows")
    hub_split: str = option("train", "split of a hub data set")
    image_column: str = option("image", "image column of a hub data set")
    caption_column: str = option("caption", "caption column of the data set")
    group_column: Optional[str] = option("group", "rows sharing a group stay on one side of the split (ignored if the column "
                                                  "is absent; null = no groups)")
    one_per_group: bool = option(False, "draw one row per group (no near-duplicates in the split; the duplicated benchmark sets it)")
    on_bad_sample: str = option("error", "error | skip (skip and count corrupt images and empty captions)",
                                choices=("error", "skip"))
    members: int = option(128, "fine-tuning set size (the rows the attacks try to recognise)")
    nonmembers: int = option(256, "held-out set size from the same pool, for the attacks (half calibrate, half report)")
    exclude: Optional[str] = option(None, "a run folder or split.json whose rows (members, non-members, auxiliary, their "
                                          "groups and identical images) are left out before the split (shadow models use it)")
    auxiliary_members: int = option(0, "extra training rows from outside the evaluation split, trained on and never attacked "
                                       "(MP/SMP-LoRA's proxy members; set the same on a LoRA baseline for the same rows)")
    resolution: int = option(32, "training image size in pixels")
    center_crop: bool = option(True, "center crop to the resolution; false = random crop")
    random_flip: bool = option(False, "random horizontal flip of training images (SecMI simple defense; latents cached both ways)")
    cutout: int = option(0, "Cutout hole size in pixels, 0 = off (SecMI simple defense; training batches only, turns latent "
                            "caching off)")
    randaugment: int = option(0, "RandAugment operations per image (kornia), 0 = off (SecMI used 5; training batches only, "
                                 "turns latent caching off)")
    randaugment_magnitude: int = option(9, "RandAugment magnitude 0-30 (torchvision's default 9, as SecMI)")
    duplicate: Duplicate = section(Duplicate, "duplicated-data benchmark (Carlini et al. 2023): extra training rows copying "
                                              "a few members")

    def check(self) -> None:
        self.at_least(0, "auxiliary_members")
        self.at_least(1, "resolution")
        self.require(0 <= self.cutout <= self.resolution, "cutout",
                     f"0 (off) or a hole size in pixels up to data.resolution={self.resolution}")
        self.require(self.randaugment >= 0, "randaugment", "0 (off) or a number of operations >= 1")
        self.within("randaugment_magnitude", 0, 30)
        if self.duplicate.members > self.members:
            self.duplicate.require(False, "members", f"<= data.members ({self.members})")


@dataclass
class Dedup(Section):
    enabled: bool = option(False, "turn near-duplicate removal on (Carlini et al. 2023; Somepalli et al. 2023)")
    resolution: int = option(16, "images are compared at this size (whole image resized; small = robust to re-encoding / crops)")
    tiles: int = option(4, "tiled l2 over tiles x tiles tiles (Carlini et al.: 4 x 4)")
    tiled_l2: Optional[float] = option(0.1, "link images whose tiled l2 (pixels in [0, 1]) is <= this; null = pixel path off")
    embedding: Optional[str] = option(None, "null | features (fixed, always there) | phash (pip install imagehash): extra links "
                                            "by cosine")
    cosine: float = option(0.95, "embedding links need cosine >= this")
    flip: bool = option(False, "also link mirrored copies")
    sheet_groups: int = option(8, "largest groups shown in the run folder's dedup_groups.png")

    def check(self) -> None:
        self.at_least(1, "resolution")
        self.require(self.tiles >= 1 and self.resolution % self.tiles == 0, "tiles",
                     f">= 1 and divide dedup.resolution={self.resolution}")
        self.within("tiled_l2", 0, 1)
        self.within("cosine", -1, 1)
        if self.enabled and self.tiled_l2 is None and self.embedding is None:
            raise ConfigError("dedup needs dedup.tiled_l2 (pixel path) or dedup.embedding set; both are null")


@dataclass
class Canaries(Section):
    enabled: bool = option(False, "turn the canary audit on: insert the canaries and report their exposure")
    count: int = option(16, "M canaries (drawn i.i.d. with the references, then picked at random)")
    repetitions: List[int] = option([0, 1, 4, 16], "levels given to the canaries in turn; 0 = drawn but never inserted "
                                                   "(control: ~1.44 bits)")
    references: int = option(200, "R never-inserted references (the paper: 1000, max exposure ~10 bits)")
    design: str = option("references", "references | bernoulli (each candidate inserted w.p. 1/2: Steinke et al. one-run audit)",
                         choices=("references", "bernoulli"))
    timestep: int = option(100, "score = -loss at this t (Carlini et al.), averaged over `draws` shared noises")
    draws: int = option(8, "noise draws averaged per canary score")

    def check(self) -> None:
        self.at_least(1, "count", "references")
        self.require(bool(self.repetitions) and min(self.repetitions) >= 0, "repetitions", "a non-empty list of counts >= 0")
        if self.enabled and self.design == "references" and self.count > self.references:
            raise ConfigError(f"canaries.count={self.count} exceeds canaries.references={self.references}: exposure ranks each "
                              "canary among the references, so draw at least as many references as canaries")


@dataclass
class Lora(Section):
    rank: int = option(16, "LoRA rank r")
    alpha: int = option(16, "LoRA alpha (the update is scaled by alpha / rank)")
    dropout: float = option(0.0, "dropout on the LoRA layers' input")
    targets: Union[str, List[str]] = option("full", "attn | full (kohya-style) | an explicit list of module names")
    method: str = option("lora", "lora | dora (DoRA: a magnitude vector per adapted weight beside the low-rank direction) "
                                 "| lokr (LoKr: a Kronecker-product update) | loha (LoHa: a Hadamard product of two "
                                 "low-rank products); through peft, see privtune.models.methods",
                         choices=("lora", "dora", "lokr", "loha"))
    text_encoder: bool = option(False, "also train a LoRA on the text encoder")
    text_encoder_targets: List[str] = option(["q_proj", "k_proj", "v_proj", "out_proj"], "text-encoder modules the LoRA targets")

    def check(self) -> None:
        self.at_least(1, "rank")
        self.within("dropout", 0, 1, "[)")
        if self.method in ("lokr", "loha"):
            self.require(self.dropout == 0, "dropout", f"0 with lora.method={self.method} (peft's LoKr / LoHa have no input dropout)")
        if isinstance(self.targets, str):
            self.require(self.targets in LORA_PRESETS, "targets", f"a preset ({', '.join(LORA_PRESETS)}) or a list of module names")
        else:
            self.require(bool(self.targets), "targets", "a preset (attn, full) or a non-empty list of module names")


@dataclass
class Ema(Section):
    decay: float = option(0.0, "EMA of the LoRA weights (diffusers' EMAModel over the trainable parameters); 0 = off, e.g. "
                               "0.999. When on, the EMA weights are what is exported, attacked and measured; with DP-SGD "
                               "the EMA of the private iterates is post-processing and costs no epsilon")
    start: int = option(0, "optimizer steps before the EMA starts following the weights (its decay then ramps up as "
                           "(1 + s) / (10 + s), capped at `decay`)")

    def check(self) -> None:
        self.require(0.0 <= self.decay < 1.0, "decay", "0 (off) or a decay in (0, 1), e.g. 0.999")
        self.at_least(0, "start")


@dataclass
class Train(Section):
    max_steps: int = option(1000, "optimizer steps to train for")
    batch_size: int = option(16, "training rows per step, per process")
    gradient_accumulation_steps: int = option(1, "micro-batches accumulated per optimizer step")
    mixed_precision: str = option("no", "no | fp16 (CUDA only) | bf16", choices=("no", "fp16", "bf16"))
    gradient_checkpointing: bool = option(False, "recompute UNet activations in the backward pass (less memory, slower)")
    cache_latents: bool = option(True, "cache VAE latents and text embeddings when both are frozen")
    max_grad_norm: float = option(1.0, "clip the global gradient norm of each step to this; 0 = off")
    num_workers: int = option(0, "data loader worker processes")
    log_every: int = option(10, "steps between logged losses")
    checkpoint_every: int = option(500, "steps between checkpoints (resume=latest continues from the newest); 0 = none")
    checkpoints_total_limit: Optional[int] = option(2, "checkpoints kept, the oldest deleted first; null or 0 = keep all")
    validation_every: int = option(500, "steps between validation image grids; 0 = none")
    validation_prompts: Optional[List[str]] = option(None, "prompts of the validation images; null = four held-out captions "
                                                           "(source rows in neither split; else non-members), never a training caption")
    validation_inference_steps: int = option(25, "sampler steps of the validation images")
    validation_guidance_scale: float = option(3.0, "guidance scale of the validation images")
    snr_gamma: Optional[float] = option(None, "min-SNR-gamma loss weighting (Hang et al. 2023), e.g. 5.0: each example's loss "
                                              "times min(SNR_t, gamma) / SNR_t (epsilon; / (SNR_t + 1) for v-prediction); "
                                              "under DP-SGD applied per example before clipping; null = off")
    ema: Ema = section(Ema, "exponential moving average of the LoRA weights")

    def check(self) -> None:
        self.require(self.snr_gamma is None or self.snr_gamma > 0, "snr_gamma", "null (off) or a positive gamma, e.g. 5.0")
        self.at_least(1, "max_steps", "batch_size", "gradient_accumulation_steps", "log_every", "validation_inference_steps")
        self.at_least(0, "max_grad_norm", "num_workers", "checkpoint_every", "checkpoints_total_limit", "validation_every")


@dataclass
class Optim(Section):
    lr: float = option(1.0e-3, "AdamW learning rate")
    weight_decay: float = option(0.0, "AdamW (decoupled) weight decay on the LoRA parameters only; SecMI's l2 defense used 5e-4")
    betas: List[float] = option([0.9, 0.999], "AdamW betas")
    eps: float = option(1.0e-8, "AdamW epsilon")
    use_8bit: bool = option(False, "bitsandbytes 8-bit AdamW (CUDA only)")
    scheduler: str = option("constant", "learning-rate schedule: any diffusers.optimization scheduler name")
    warmup_steps: int = option(0, "learning-rate warm-up steps")

    def check(self) -> None:
        self.at_least(0, "lr", "weight_decay", "eps", "warmup_steps")
        self.require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "two numbers in [0, 1)")


@dataclass
class Captions(Section):
    p: float = option(0.1, "probability each enabled text transform is applied to a training caption (DCR default 0.1)")
    multiple: bool = option(False, "MC: train each row with one of its captions (record.captions, or split on `separator`) per step")
    separator: str = option("|", "separates the captions of a row in one caption string (captions.multiple)")
    insert_tokens: int = option(0, "RT: insert this many random vocabulary words at random word boundaries (DCR: 2)")
    repeat_words: int = option(0, "CWR: repeat this many caption words at random word boundaries (DCR: 2)")
    embedding_noise: float = option(0.0, "GN: lambda of lambda * N(0, I) added to the training text embedding (DCR: 0.1)")
    dropout: float = option(0.0, "probability a training row trains with the empty caption (kohya's caption_dropout_rate; "
                                 "also a memorization mitigation, and it weakens attacks that need the exact caption)")
    shuffle_tags: bool = option(False, "shuffle the comma-separated tags of every training caption, every step (kohya's "
                                       "shuffle_caption)")
    keep_tags: int = option(0, "the first N tags stay in place and are never dropped (kohya's keep_tokens)")
    tag_dropout: float = option(0.0, "probability each comma-separated tag (after keep_tags) is dropped from a training caption")

    def check(self) -> None:
        self.within("p", 0, 1)
        self.within("dropout", 0, 1)
        self.within("tag_dropout", 0, 1)
        self.at_least(0, "keep_tags")
        self.at_least(0, "insert_tokens", "repeat_words", "embedding_noise")
        if self.multiple and not self.separator:
            raise ConfigError("captions.multiple=true needs a non-empty captions.separator")


@dataclass
class MemorizationFilter(Section):
    method: str = option("none", "none | wen (noise magnitude, one extra no-grad forward) | ren (cross-attention entropy)",
                         choices=FILTER_METHODS)
    threshold: Optional[float] = option(None, "absolute tau (Wen: 2 at SD 512 px); null = `percentile` of the metric on known "
                                              "non-members")
    percentile: float = option(95.0, "percentile of the metric on known non-members that becomes tau, in (0, 100)")
    calibration: str = option("unused", "unused (source rows in neither split) | nonmembers (the attack runner's calibration half)",
                              choices=("unused", "nonmembers"))
    calibration_rows: int = option(64, "known non-members tau is calibrated on")
    calibration_draws: int = option(4, "random (t, noise) draws per calibration row")
    recalibrate_every: int = option(100, "steps between re-calibrations on the current model (0 = once, at the start)")
    ren_layers: Optional[List[int]] = option(None, "cross-attention layer indices (hook order) averaged for the entropy; null = all")

    def check(self) -> None:
        self.require(self.threshold is None or 0 < self.threshold < float("inf"), "threshold",
                     "a positive number, or null to calibrate it")
        self.within("percentile", 0, 100, "()")
        self.at_least(2, "calibration_rows")
        self.at_least(1, "calibration_draws")
        self.at_least(0, "recalibrate_every")
        self.require(not self.ren_layers or min(self.ren_layers) >= 0, "ren_layers", "null or a list of layer indices >= 0")


@dataclass
class PriSampler(Section):
    lam: float = option(0.0, "Hu & Pang: eps = (1 - lam) eps_model + lam eps_aux at every sampling step; 0 = off")
    aux: Optional[str] = option(None, "the auxiliary LoRA folder (a LoRA trained on rows whose property share is the owner's "
                                      "target_proportion)")
    target_proportion: Optional[float] = option(None, "p*, the property share of the auxiliary LoRA's rows (recorded, not used)")

    def check(self) -> None:
        self.within("lam", 0, 1, "[]")
        self.require(self.target_proportion is None or 0 <= self.target_proportion <= 1, "target_proportion",
                     "null or a proportion in [0, 1]")
        self.require(not (self.lam > 0 and not self.aux), "aux",
                     "the auxiliary run's lora/ folder when lam > 0 (a LoRA trained on rows with the target proportion)")


@dataclass
class Sampling(Section):
    wen_prompt_optimization: bool = option(False, "Wen et al.: optimise the prompt embedding on the first sampling step")
    wen_target_loss: Optional[float] = option(None, "early stop of the prompt optimisation; null = 3 (paper, SD 4x64x64 latent) "
                                                    "x sqrt(latent size / 16384)")
    wen_lr: float = option(0.05, "learning rate of the prompt optimisation")
    wen_iters: int = option(10, "iterations of the prompt optimisation")
    ren_mitigation: bool = option(False, "Ren et al.: summary-token masking + BOS re-weighting in cross-attention")
    ren_bos_scale: float = option(1.25, "c1, multiplies the BOS logit of the conditional branch")
    ren_mask_summary: bool = option(True, "attention to positions >= prompt length (padding / summary tokens) set to 0")
    prisampler: PriSampler = section(PriSampler, "PriSampler (Hu & Pang 2023), the property-inference defense: an auxiliary "
                                                 "LoRA's prediction mixed into every sampling step")

    def check(self) -> None:
        self.positive("wen_target_loss", "wen_lr", "ren_bos_scale")
        self.at_least(0, "wen_iters")


@dataclass
class Export(Section):
    kohya: bool = option(False, "also write the LoRA in the kohya / webui format")
