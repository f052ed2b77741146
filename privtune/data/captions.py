"""Caption randomization for training batches (Somepalli et al., "Understanding and Mitigating Copying
in Diffusion Models", NeurIPS 2023, code somepago/DCR; spec: defenses.md section 6).

Text conditioning on a fixed caption drives copying; randomizing the caption a training image is seen
with weakens that link. Transforms, each applied to a training row independently with probability `p`
(DCR's `trainspecial_prob`, default 0.1):

* multiple captions (MC): a record with several captions (its `captions` list, e.g. the merged captions
  of a deduplicated group, or a caption holding several joined by `separator`) trains with one of them,
  drawn uniformly, at every step. With
  `multiple: true` this draw happens for every row (it is not a randomization with probability p:
  there is no "original" caption to keep); the first caption is the one cached and shown elsewhere;
* random-token insertion (RT, `randwordadd`): `insert_tokens` random vocabulary words inserted at
  random word boundaries;
* random word repetition (CWR, `wordrepeat`): `repeat_words` randomly chosen caption words repeated at
  random word boundaries;
* Gaussian noise on the text embedding (GN, `rand_noise_lam`): c <- c + lambda * N(0, I) on the whole
  [L, D] sequence incl. padding (as the reference code does), on every training row; the attacks and
  the generations encode captions without it.

What LoRA trainers (kohya sd-scripts) offer, on the same seeded path: tag shuffle (`shuffle_tags`: the
comma-separated tags of every caption in a new order every step, the first `keep_tags` in place), tag
dropout (each tag after `keep_tags` dropped with probability `tag_dropout`) and caption dropout (the whole
caption replaced by the empty one with probability `dropout`, whose cached embedding the input pipeline
reuses). Caption dropout is also a memorization mitigation: a member seen without its caption ties its image
less to its caption, and attacks that query with the exact caption (CLiD) lose part of their signal.

The text transforms edit words (strings) before tokenisation, so the tokenizer still adds BOS first
and EOS after the last word. Every draw is a pure function of (seed, micro-step, row): seeded,
identical across processes and exactly reproduced on resume.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError
from ..rng import numpy_rng, torch_generator


@dataclass
class CaptionDraw:
    caption: str
    randomized: bool


def check_config(cfg) -> None:
    if not 0.0 <= float(cfg.p) <= 1.0:
        raise ConfigError(f"captions.p must be a probability in [0, 1] (got {cfg.p})")
    for key in ("insert_tokens", "repeat_words"):
        if int(cfg[key]) < 0:
            raise ConfigError(f"captions.{key} must be >= 0 (got {cfg[key]})")
    if float(cfg.embedding_noise) < 0:
        raise ConfigError(f"captions.embedding_noise must be >= 0 (got {cfg.embedding_noise})")
    if cfg.multiple and not str(cfg.separator):
        raise ConfigError("captions.multiple=true needs a non-empty captions.separator")


def word_vocabulary(tokenizer) -> list[str]:
    """Whole-word entries of a CLIP BPE vocabulary (ending in </w>, alphabetic, not special tokens)."""
    special = set(tokenizer.all_special_tokens)
    words = sorted({t[:-4] for t in tokenizer.get_vocab() if t.endswith("</w>") and t not in special and t[:-4].isalpha()})
    if not words:
        raise ConfigError("the tokenizer has no whole-word vocabulary entries to insert; set captions.insert_tokens=0")
    return words


class CaptionRandomizer:
    """Seeded caption transforms for training rows (see the module docstring)."""

    def __init__(self, cfg, seed: int, tokenizer=None):
        check_config(cfg)
        self.p = float(cfg.p)
        self.multiple = bool(cfg.multiple)
        self.separator = str(cfg.separator)
        self.insert_tokens = int(cfg.insert_tokens)
        self.repeat_words = int(cfg.repeat_words)
        self.noise = float(cfg.embedding_noise)
        self.dropout = float(cfg.get("dropout", 0.0))
        self.shuffle_tags = bool(cfg.get("shuffle_tags", False))
        self.keep_tags = int(cfg.get("keep_tags", 0))
        self.tag_dropout = float(cfg.get("tag_dropout", 0.0))
        self.seed = int(seed)
        self.vocab = word_vocabulary(tokenizer) if self.insert_tokens and tokenizer is not None else []
        self.applied = 0
        self.seen = 0

    @property
    def text_active(self) -> bool:
        return (self.multiple or (self.p > 0 and (self.insert_tokens > 0 or self.repeat_words > 0)) or self.dropout > 0
                or self.shuffle_tags or self.tag_dropout > 0)

    @property
    def active(self) -> bool:
        return self.text_active or self.noise > 0

    def variants(self, record) -> list[str]:
        """The captions a record may train with: its `captions` list when it has one (e.g. merged by
        deduplication), else its caption split on `separator`; just its caption when `multiple` is off."""
        caption = record if isinstance(record, str) else record.caption
        if not self.multiple:
            return [caption]
        listed = None if isinstance(record, str) else getattr(record, "captions", None)
        parts = [c.strip() for c in (listed or caption.split(self.separator)) if c and c.strip()]
        return parts or [caption]

    def base(self, record) -> str:
        """The caption a row is cached / shown with (the first of several)."""
        return self.variants(record)[0]

    def draw(self, record, micro_step: int, row: int) -> CaptionDraw:
        """The caption training row `row` (a Record or a caption string) trains with at `micro_step`."""
        rng = numpy_rng(self.seed, "caption", micro_step, row)
        options = self.variants(record)
        text = options[int(rng.integers(len(options)))] if len(options) > 1 else options[0]
        randomized = False
        if self.insert_tokens and rng.random() < self.p:
            text = insert_words(text, [self.vocab[i] for i in rng.integers(len(self.vocab), size=self.insert_tokens)], rng)
            randomized = True
        if self.repeat_words and rng.random() < self.p:
            words = text.split()
            picked = [words[i] for i in rng.integers(len(words), size=self.repeat_words)] if words else []
            text = insert_words(text, picked, rng)
            randomized = True
        if self.shuffle_tags or self.tag_dropout:
            tagged = self.edit_tags(text, numpy_rng(self.seed, "caption-tags", micro_step, row))
            randomized |= tagged != text
            text = tagged
        if self.dropout and numpy_rng(self.seed, "caption-dropout", micro_step, row).random() < self.dropout:
            text, randomized = "", True
        self.seen += 1
        self.applied += int(randomized)
        return CaptionDraw(text, randomized)

    def edit_tags(self, caption: str, rng: np.random.Generator) -> str:
        """Shuffle / drop the comma-separated tags after the first `keep_tags` (kohya's shuffle_caption,
        keep_tokens and caption_tag_dropout_rate)."""
        tags = [t.strip() for t in caption.split(",")]
        kept, rest = tags[:self.keep_tags], tags[self.keep_tags:]
        if self.tag_dropout:
            rest = [t for t, u in zip(rest, rng.random(len(rest))) if u >= self.tag_dropout]
        if self.shuffle_tags:
            rest = [rest[i] for i in rng.permutation(len(rest))]
        return ", ".join(t for t in kept + rest if t)

    def embedding_noise(self, shape, micro_step: int, rows) -> torch.Tensor:
        """lambda * N(0, I) for the rows of one micro-batch, [B, L, D], seeded by (seed, micro-step, row)."""
        out = torch.empty(tuple(shape))
        for i, r in enumerate(rows):
            out[i] = torch.randn(tuple(shape[1:]), generator=torch_generator(self.seed, "caption-noise", micro_step, r))
        return self.noise * out

    def stats(self) -> dict:
        return {"p": self.p, "rows_seen": self.seen, "rows_randomized": self.applied,
                "rate": self.applied / self.seen if self.seen else None}


def insert_words(caption: str, new: list[str], rng: np.random.Generator) -> str:
    """Insert each of `new` at a random word boundary of `caption` (start and end included)."""
    words = caption.split()
    for w in new:
        words.insert(int(rng.integers(len(words) + 1)), w)
    return " ".join(words)
