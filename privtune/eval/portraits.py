"""Utility on the embedded portraits benchmark: does a model draw what its held-out captions say?

Generations from captions the model never trained on are read by the shipped attribute classifier
(privtune.models.attributes):
* style accuracy: the fraction classified as the fine-tuning (private) style, what the LoRA must learn;
* per-slot accuracy against the caption's own values, beside chance (the majority value's share) and
  the classifier's ceiling (its accuracy on held-out real renders), and the all-slots-correct rate;
* a Fréchet distance and KID between the generations' and held-out real renders' penultimate
  classifier features. The Fréchet covariance is the Ledoit-Wolf shrinkage estimate (scikit-learn), so it
  is full rank at any n and scipy never warns of a singular matrix; KID is the unbiased MMD^2 with the
  cubic polynomial kernel of Bińkowski et al. (ICLR 2018), unbiased at small n. Both are written out
  (a few lines) because torchmetrics' versions need Inception weights or a larger subset size.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from ..models.attributes import load_classifier, to_tensor
from .distances import frechet_distance, kernel_inception_distance

PRIVATE_STYLE = "pixel art"
_SLOT_RE = re.compile(
    r"^(?P<style>.+?) portrait, (?P<hair_color>\S+) (?P<hair_length>\S+) hair, (?P<skin_tone>\S+) skin, "
    r"(?P<eyewear>no glasses|glasses|sunglasses), (?P<shirt_color>\S+) shirt, (?P<background_color>\S+) background$")


def parse_caption(caption: str) -> dict[str, str] | None:
    """The slot values of a portraits caption, or None when it does not follow the template."""
    m = _SLOT_RE.match(caption.strip())
    return m.groupdict() if m else None


def slot_scores(predicted: dict[str, np.ndarray], wanted: Sequence[dict[str, str]], slots: dict[str, list[str]]) -> dict:
    """Per-slot accuracy of predicted value indices against the captions' values, and the all-correct rate."""
    correct = {}
    for slot, values in slots.items():
        truth = np.array([values.index(w[slot]) if w[slot] in values else -1 for w in wanted])
        correct[slot] = predicted[slot] == truth
    all_ok = np.all(np.stack([correct[s] for s in slots if s != "style"]), axis=0)
    return {"slot_accuracy": {s: float(c.mean()) for s, c in correct.items()}, "all_slots_correct": float(all_ok.mean())}


def portrait_utility(images, captions: Sequence[str], reference_images, classifier_dir=None) -> dict:
    """Style / slot accuracy of `images` (uint8 [N,H,W,3] or PIL) generated from `captions`, and FD / KID of
    their classifier features against `reference_images` (held-out real renders of the fine-tuning style)."""
    from PIL import Image

    model, config = load_classifier(*([classifier_dir] if classifier_dir else []))
    res = int(config["resolution"])
    to_pil = (lambda x: Image.fromarray(x) if isinstance(x, np.ndarray) else x)  # noqa: E731
    pred, feats = model.predict(to_tensor([to_pil(x) for x in images], res))
    _, ref = model.predict(to_tensor([to_pil(x) for x in reference_images], res))
    wanted = [parse_caption(c) for c in captions]
    if any(w is None for w in wanted):
        bad = next(c for c, w in zip(captions, wanted) if w is None)
        raise ValueError(f"caption {bad!r} does not follow the portraits template")
    slots = config["slots"]
    scores = slot_scores(pred, wanted, slots)
    style_values = slots["style"]
    private = style_values.index(PRIVATE_STYLE) if PRIVATE_STYLE in style_values else -1
    out = {
        "style_accuracy": float((pred["style"] == private).mean()),
        **scores,
        "slot_chance": config.get("chance", {}),
        "slot_ceiling": config.get("heldout_accuracy", {}),
        "frechet_distance": frechet_distance(feats, ref),
        "kid": kernel_inception_distance(feats, ref),
        "n_generations": len(captions), "n_reference": len(reference_images),
        "feature_space": "penultimate features of the shipped portraits attribute classifier (Ledoit-Wolf FD, unbiased KID)",
    }
    return out
