"""Shared types of the membership-inference attacks: pre-encoded samples, the attacked target,
score containers, the `Attack` base class and the `ATTACKS` registry.

Score convention (specs/attacks.md §0.3): every attack returns `scores` in which **higher means
"more likely a member"**, plus the `raw` statistic it was derived from (e.g. a loss, where lower
means member). Attacks only ever fit anything (a timestep, a classifier) in `calibrate`, on the
labelled calibration split; `score` is a pure function of the fitted attack and the samples.
A `learned` attack splits its calibration into `fit_features` (per model) and `fit` (once), so its learned part
can be fitted on the pooled features of several shadow models (`calibrate_pooled`).
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, Callable, ContextManager, Hashable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ...errors import ConfigError, DataError
from ...registry import Registry
from .. import distributed
from ..primitives import NFECounter, NoisePredictor

ATTACKS: Registry[type["Attack"]] = Registry("attack")


@dataclass
class EncodedSamples:
    """Samples already in the model's input space: latents [N,C,H,W], text conditions [N,L,D]
    and one unique string id per sample (ids drive per-sample noise and the leakage checks).
    Attacks that need more get it here: `captions` (the training captions, for attacks that re-encode
    diminished prompts) and `pixels` [N,3,H,W] in [-1,1] (the preprocessed images the latents encode,
    for attacks that compare decoded images with them)."""

    latents: Tensor
    cond: Tensor
    ids: list[str]
    captions: list[str] | None = None
    pixels: Tensor | None = None

    def __post_init__(self) -> None:
        self.ids = [str(i) for i in self.ids]
        n = len(self.ids)
        if self.latents.shape[0] != n or self.cond.shape[0] != n:
            raise DataError(
                f"EncodedSamples: {self.latents.shape[0]} latents, {self.cond.shape[0]} conditions and "
                f"{n} ids; all three must have one entry per sample"
            )
        if self.latents.dim() != 4 or self.cond.dim() != 3:
            raise DataError("EncodedSamples: latents must be [N,C,H,W] and cond [N,L,D]")
        if self.captions is not None:
            self.captions = [str(c) for c in self.captions]
            if len(self.captions) != n:
                raise DataError(f"EncodedSamples: {len(self.captions)} captions for {n} samples")
        if self.pixels is not None and (self.pixels.dim() != 4 or self.pixels.shape[0] != n):
            raise DataError(f"EncodedSamples: pixels must be [N,3,H,W] with N={n}, got {tuple(self.pixels.shape)}")

    def __len__(self) -> int:
        return len(self.ids)

    def _with(self, latents: Tensor, cond: Tensor, ids: list[str], captions, pixels) -> "EncodedSamples":
        return EncodedSamples(latents, cond, ids, captions, pixels)

    def subset(self, index: Sequence[int] | np.ndarray | Tensor) -> "EncodedSamples":
        idx = torch.as_tensor(np.asarray(index, dtype=np.int64))
        rows = idx.tolist()
        return self._with(
            self.latents[idx.to(self.latents.device)], self.cond[idx.to(self.cond.device)], [self.ids[i] for i in rows],
            None if self.captions is None else [self.captions[i] for i in rows],
            None if self.pixels is None else self.pixels[idx.to(self.pixels.device)],
        )

    def to(self, device: torch.device | str | None) -> "EncodedSamples":
        if device is None:
            return self
        pixels = None if self.pixels is None else self.pixels.to(device)
        return self._with(self.latents.to(device), self.cond.to(device), self.ids, self.captions, pixels)

    @staticmethod
    def concat(parts: Sequence["EncodedSamples"]) -> "EncodedSamples":
        captions = None if any(p.captions is None for p in parts) else [c for p in parts for c in p.captions]
        pixels = None if any(p.pixels is None for p in parts) else torch.cat([p.pixels for p in parts])
        return EncodedSamples(
            torch.cat([p.latents for p in parts]), torch.cat([p.cond for p in parts]),
            [i for p in parts for i in p.ids], captions, pixels,
        )

    def batches(self, batch_size: int) -> Iterator["EncodedSamples"]:
        if batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        for lo in range(0, len(self), batch_size):
            yield self.subset(np.arange(lo, min(lo + batch_size, len(self))))


@dataclass
class AttackTarget:
    """What a gray-box attacker queries: a noise predictor and the target scheduler's ᾱ_t.
    Batches are moved to `device` (default: where the latents already are). Prompt-level
    memorization attacks also need the empty-prompt embedding `uncond` [1,L,D] and, for Ren et
    al.'s mode D, each sample's tokenised prompt length (BOS + tokens + first EOS) by sample id.

    What an attack may further need (its `requires`, checked by `missing_requirements`): `encode_text`
    (prompts -> condition states [B,L,D] from the target's own text encoder; "captions"), `decode`
    (scaled latents -> pixels in [-1,1] through the target's VAE; "pixels"), `unet` (the attacked
    network itself, for gradients; "white_box") and `generation` (a GenerationAPI: generated images and an
    offline image encoder, all a black-box attacker holds; "generation")."""

    predictor: NoisePredictor
    alphas_cumprod: Tensor
    device: torch.device | str | None = None
    uncond: Tensor | None = None
    token_lengths: dict[str, int] | None = None
    encode_text: Callable[[Sequence[str]], Tensor] | None = None
    decode: Callable[[Tensor], Tensor] | None = None
    unet: torch.nn.Module | None = None
    generation: Any = None  # privtune.eval.generation.GenerationAPI: the black-box attacks' only view

    def __post_init__(self) -> None:
        if self.alphas_cumprod.dim() != 1:
            raise ConfigError("alphas_cumprod must be the 1-D ᾱ_t tensor of the target's scheduler")
        if self.device is not None:
            self.alphas_cumprod = self.alphas_cumprod.to(self.device)


@dataclass
class AttackScores:
    """Per-sample results; `scores` are higher-is-member, `raw` is the attack's own statistic."""

    scores: np.ndarray
    raw: np.ndarray
    nfe_per_sample: float
    ids: list[str] = field(default_factory=list)
    labels: np.ndarray | None = None


def member_labels(n_members: int, n_nonmembers: int) -> np.ndarray:
    return np.concatenate([np.ones(n_members, dtype=np.int64), np.zeros(n_nonmembers, dtype=np.int64)])


def map_batches(
    target: AttackTarget,
    samples: EncodedSamples,
    fn: Callable[[AttackTarget, EncodedSamples], dict[Hashable, Tensor]],
    batch_size: int,
    progress: bool = True,
    desc: str = "",
) -> tuple[dict[Hashable, np.ndarray], float]:
    """Applies `fn` batch by batch behind an NFE counter; returns the concatenated per-sample
    outputs (each key -> array [N, ...]) and UNet evaluations per sample."""
    counter = NFECounter(target.predictor)
    counted = replace(target, predictor=counter)
    shard = distributed.current()
    lo, hi = shard.bounds(len(samples)) if shard else (0, len(samples))
    part = samples.subset(np.arange(lo, hi))
    outs: dict[Hashable, list[np.ndarray]] = defaultdict(list)
    n_batches = -(-len(part) // batch_size)
    for batch in tqdm(part.batches(batch_size), total=n_batches, desc=desc, disable=not progress, leave=False):
        batch = batch.to(target.device)
        for key, value in fn(counted, batch).items():
            outs[key].append(value.detach().float().cpu().numpy())
    if shard:
        pieces = shard.gather({"outs": dict(outs), "nfe": counter.total})
        outs = defaultdict(list)
        for piece in pieces:
            for key, values in piece["outs"].items():
                outs[key].extend(values)
        return {k: np.concatenate(v) for k, v in outs.items()}, sum(p["nfe"] for p in pieces) / max(1, len(samples))
    return {k: np.concatenate(v) for k, v in outs.items()}, counter.per_sample(len(samples))


def stratified_holdout(labels: np.ndarray, fraction: float, rng: np.random.Generator, who: str) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held-out) indices: a seeded `fraction` of each class held out, so a learned part is selected or scored
    on calibration samples it was not fitted on; DataError when a class is too small to split."""
    fit, held = [], []
    for cls in (1, 0):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_held = int(round(fraction * len(idx)))
        if n_held < 1 or n_held >= len(idx):
            raise DataError(f"{who} needs enough calibration members and non-members to hold out {fraction:g} of each "
                            "and fit on the rest (at least 2 of each)")
        held.append(idx[:n_held])
        fit.append(idx[n_held:])
    return np.concatenate(fit), np.concatenate(held)


def best_by_auc(candidates: dict[Any, np.ndarray], labels: np.ndarray) -> tuple[Any, dict[str, float]]:
    """The candidate whose higher-is-member scores have the largest AUC (first one on ties)."""
    from ..metrics import auc

    aucs = {k: auc(v, labels) for k, v in candidates.items()}
    best = max(aucs, key=lambda k: (aucs[k], -list(aucs).index(k)))
    return best, {str(k): v for k, v in aucs.items()}


REQUIREMENTS = {
    "captions": "the training captions and the target's text encoder (samples.captions, target.encode_text)",
    "pixels": "the images and the target's VAE decoder (samples.pixels, target.decode)",
    "white_box": "the attacked network's weights and autograd (target.unet)",
    "generation": "the release's generation API, an offline image encoder and the query images and captions "
                  "(target.generation, samples.pixels, samples.captions; for a real checkpoint the encoder is a local "
                  "CLIP folder: set eval.clip_model)",
    "variation": "an image-variation (img2img) API (target.generation.vary)",
}


def missing_requirements(attack: "Attack | type[Attack]", target: AttackTarget | None = None,
                         samples: EncodedSamples | None = None) -> list[str]:
    """What `attack` needs that the target or samples lack, in words (empty when it can run).
    A None target or samples is not checked."""
    have = {
        "captions": (target is None or target.encode_text is not None) and (samples is None or samples.captions is not None),
        "pixels": (target is None or target.decode is not None) and (samples is None or samples.pixels is not None),
        "white_box": target is None or target.unet is not None,
        "generation": (target is None or target.generation is not None)
                      and (samples is None or (samples.pixels is not None and samples.captions is not None)),
        "variation": target is None or getattr(target.generation, "vary", None) is not None,
    }
    unknown = [r for r in attack.requires if r not in REQUIREMENTS]
    if unknown:
        raise ConfigError(f"attack {attack.name!r} declares unknown requirement(s) {unknown}; known: {', '.join(REQUIREMENTS)}")
    return [f"{attack.name} needs {REQUIREMENTS[r]}" for r in attack.requires if not have[r]]


@dataclass
class CalibrationPart:
    """One labelled model-and-data pair a learned part is fitted on: the target's calibration split, or one shadow
    model with its own members and non-members. `context` makes the model live while its features are computed."""

    target: AttackTarget
    members: EncodedSamples
    nonmembers: EncodedSamples
    context: Callable[[], ContextManager] = field(default=nullcontext)


class Attack:
    """Base class. Subclasses implement `_score_batch` (-> {"score": [B], "raw": [B]}) and, when
    they fit anything, `calibrate`. `calibrate` may return scores on (a held-out part of) the
    calibration samples, with labels, for the runner's threshold fit; None means "score the
    calibration split with `score`".

    A `learned` attack implements `fit_features` (per-sample arrays from one model) and `fit` (its learned part, on
    the features of one or several models, concatenated); `calibrate` is then one part and `calibrate_pooled` many."""

    name = "attack"
    statistic = ""         # what `raw` measures, for the report's inversion note ("t-error")
    members_lower = False  # the spec expects members to have the smaller `raw` (score = -raw)
    requires: tuple[str, ...] = ()  # keys of REQUIREMENTS beyond noise predictions (see missing_requirements)
    learned = False  # fits a model (classifier, regressor, scaler) in `calibrate`: a shadow model can fit it instead

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def calibrate(
        self, target: AttackTarget, members: EncodedSamples, nonmembers: EncodedSamples,
        batch_size: int = 32, progress: bool = True,
    ) -> AttackScores | None:
        if not self.learned:
            return None
        return self.calibrate_pooled([CalibrationPart(target, members, nonmembers)], batch_size, progress)

    def calibrate_pooled(self, parts: Sequence[CalibrationPart], batch_size: int = 32,
                         progress: bool = True) -> AttackScores:
        """Fits the learned part once on the features of every part (each model on its own members and non-members),
        as the papers pool several shadow models; returns `fit`'s held-out scores with labels."""
        if not self.learned:
            raise ConfigError(f"attack {self.name!r} has no learned part to fit on pooled models")
        if not parts:
            raise ConfigError(f"{self.name}: calibrate_pooled needs at least one model")
        features: dict[str, list[np.ndarray]] = defaultdict(list)
        labels, ids, nfe_total = [], [], 0.0
        for i, part in enumerate(parts):
            samples = EncodedSamples.concat([part.members, part.nonmembers])
            with part.context():
                feats, nfe = self.fit_features(part.target, samples, batch_size, progress)
            if i and set(feats) != set(features):
                raise DataError(f"{self.name}: model {i} gave features {sorted(feats)}, model 0 {sorted(features)}")
            for key, value in feats.items():
                if i and value.shape[1:] != features[key][0].shape[1:]:
                    raise DataError(f"{self.name}: model {i}'s {key!r} features have shape {value.shape[1:]}, model 0's "
                                    f"{features[key][0].shape[1:]}; pooled models must share the target's recipe")
                features[key].append(value)
            labels.append(member_labels(len(part.members), len(part.nonmembers)))
            ids.extend(samples.ids)
            nfe_total += nfe * len(samples)
        pooled = {k: np.concatenate(v) for k, v in features.items()}
        out = self.fit(pooled, np.concatenate(labels), ids)
        out.nfe_per_sample = nfe_total / max(1, len(ids))
        return out

    def fit_features(self, target: AttackTarget, samples: EncodedSamples, batch_size: int,
                     progress: bool) -> tuple[dict[str, np.ndarray], float]:
        """A learned attack's per-sample inputs to `fit` on one model (each array [N, ...]) and its NFE per sample."""
        raise NotImplementedError(f"learned attack {self.name!r} must implement fit_features and fit")

    def fit(self, features: dict[str, np.ndarray], labels: np.ndarray, ids: list[str]) -> AttackScores:
        """Fits the learned part on pooled `features` (1 = member); records `fit_ids` and returns scores, with labels,
        on samples it was not fitted on (or on all of them when nothing is held out)."""
        raise NotImplementedError(f"learned attack {self.name!r} must implement fit_features and fit")

    def score(
        self, target: AttackTarget, samples: EncodedSamples, batch_size: int = 32, progress: bool = True
    ) -> AttackScores:
        out, nfe = map_batches(target, samples, self._score_batch, batch_size, progress, desc=self.name)
        return AttackScores(out["score"], out["raw"], nfe, ids=list(samples.ids))

    def _score_batch(self, target: AttackTarget, batch: EncodedSamples) -> dict[Hashable, Tensor]:
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        return {"seed": self.seed}


def base_predictor(predictor):
    """The innermost predictor under wrappers such as NFECounter (which keep theirs in `.predictor`)."""
    while hasattr(predictor, "predictor"):
        predictor = predictor.predictor
    return predictor
