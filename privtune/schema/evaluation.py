"""The evaluation section: the membership-inference attacks, utility, the card, and extraction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from ..errors import ConfigError
from .base import Section, option, section

EXTRACTION_REFERENCES = ("reconstruction", "image")  # privtune.eval.extraction.REFERENCES


@dataclass
class Extraction(Section):
    enabled: bool = option(False, "turn extraction on: generate from member captions and flag near-copies of their images")
    captions: int = option(16, "member captions attacked (duplicated members first); the paper: the most duplicated ones")
    generations: int = option(16, "images per caption (the paper: 500)")
    clique: int = option(5, "flag a caption when >= this many generations are mutually within delta (the paper: 10)")
    delta: float = option(0.15, "tiled-l2 threshold for the generation graph and the training-image match (the paper: ~0.15)")
    reference: str = option("reconstruction", "reconstruction (the caption's training image as the VAE reconstructs it) | "
                                              "image (the raw image, the paper's; equal at SD's 512 px)",
                            choices=EXTRACTION_REFERENCES)
    tiles: int = option(4, "tiled l2 grid at the data resolution (the paper: 4 x 4 tiles of 128 px)")
    inference_steps: int = option(25, "DDIM steps of the generations (the paper: 50)")
    guidance_scale: float = option(3.0, "guidance scale of the generations")
    pairs_png: int = option(16, "extracted pairs drawn in plots/extraction.png")

    def check(self) -> None:
        self.at_least(1, "captions", "generations", "clique", "inference_steps", "tiles")
        self.within("delta", 0, 1, "(]")
        self.at_least(0, "pairs_png")
        if self.enabled and self.clique > self.generations:
            raise ConfigError(f"eval.extraction.clique={self.clique} exceeds eval.extraction.generations={self.generations}; "
                              "a clique cannot be larger than the number of generations")


@dataclass
class Shadow(Section):
    enabled: bool = option(False, "also fit the attacks' learned parts on shadow models (the target's recipe trained on "
                                  "rows disjoint from its split, cached in <run>/shadows/); entries named <attack>~shadow")
    seed: int = option(1000, "the first shadow run's seed, the others seed+1, seed+2, ... (public: a shadow guards no secret)")
    count: int = option(1, "shadow models pooled (the papers use several, e.g. GSA 5); each is one more training run")

    def check(self) -> None:
        self.at_least(0, "seed")
        self.at_least(1, "count")


@dataclass
class Eval(Section):
    enabled: bool = option(True, "attack the trained model at the end of the run")
    attacks: List[str] = option(["loss", "secmi", "pia"], "attacks run, any of: loss, secmi, secmi_nn, pia, pian, quantile, "
                                                          "clid_th, clid_vec, gsa1, gsa2, structural, rediffuse, miagm, "
                                                          "wu, pang_wang, wen, wen_trajectory, ren, ren_trajectory; "
                                                          "[all] = every attack the release allows")
    attack_params: Dict[str, Any] = option({}, "per-attack settings, e.g. {loss: {draws: 8}, secmi: {t_sec: 100}}")
    max_members: Optional[int] = option(None, "attack a uniform random subset of this many members (null = every member); "
                                              "AUC stays unbiased, CIs widen")
    calibration_fraction: float = option(0.5, "share of members and non-members that fits thresholds, timesteps and "
                                              "classifiers; the rest is reported")
    guidance_scale: float = option(1.0, "guidance scale of the attack queries (1 = the conditional prediction, the spec default)")
    batch_size: int = option(32, "rows per attack batch")
    bootstrap: int = option(1000, "bootstrap resamples for the confidence intervals")
    utility: bool = option(True, "measure utility: held-out loss, prompt fidelity and Frechet distance of generations")
    utility_generations: int = option(128, "generations from held-out captions (base and fine-tuned), read by the classifier")
    utility_guidance_scale: float = option(3.0, "guidance scale of the utility generations")
    utility_inference_steps: int = option(25, "sampler steps of the utility generations")
    clip_model: Optional[str] = option(None, "real checkpoints: a LOCAL CLIP folder (CLIPModel + CLIPProcessor) for CLIP score "
                                             "and CLIP-space FD / KID; never downloaded")
    baseline: Optional[str] = option(None, "run folder of the undefended baseline (same data) for the card's comparison")
    license: str = option("other", "license field of the exported model card")
    extraction: Extraction = section(Extraction, "Carlini et al. generate-and-filter extraction (spec attacks 9.1)")
    shadow: Shadow = section(Shadow, "a shadow model for the attacks' learned parts (classifiers, regressors, scalers)")

    def check(self) -> None:
        self.require(self.max_members is None or self.max_members >= 2, "max_members",
                     "null (attack every member) or an integer >= 2")
        self.within("calibration_fraction", 0, 1, "()", "that share of members and non-members fits "
                    "the attacks, the rest is reported; 0.5 is the default")
        self.at_least(1, "batch_size", "utility_inference_steps")
        self.at_least(0, "bootstrap", "utility_generations")
