"""Canary candidates for privacy auditing (Carlini et al., "The Secret Sharer", USENIX Security 2019;
Carlini et al. 2023, arXiv 2301.13188; specs/defenses.md section 7).

Every candidate is drawn i.i.d. from one synthetic distribution: a white 32 px-style image with a
few random coloured shapes and a unique random caption ("canary qhzmvk"). Which candidates are
inserted is decided only after all are drawn, so inserted canaries and never-inserted references
are exchangeable before training and exposure measures memorization, not a distribution shift.

Design `references` (default): M canaries (`count`), each given a repetition level from
`repetitions` in turn (0 = drawn but never inserted: a control whose exposure should be ~log2 e),
and R >= M references. Design `bernoulli`: each of count + references candidates is inserted
(with the highest repetition level) independently with probability 1/2, the setting of Steinke,
Nasr & Jagielski's one-run audit (NeurIPS 2023, arXiv 2305.08846).
"""

from __future__ import annotations

import hashlib
import string
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from ..errors import ConfigError
from .sources import Record, content_hash
from ..rng import numpy_rng

PREFIX = "canary-"


def draw_candidate(rng: np.random.Generator, size: int) -> tuple[Image.Image, str]:
    """One synthetic canary: 2-4 random filled rectangles / ellipses on white, and a random caption."""
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 5))):
        x0, y0 = rng.integers(0, size - size // 4, 2)
        w, h = rng.integers(size // 4, size // 2 + 1, 2)
        colour = tuple(int(c) for c in rng.integers(0, 230, 3))
        box = [int(x0), int(y0), int(min(size - 1, x0 + w)), int(min(size - 1, y0 + h))]
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)(box, fill=colour)
    word = "".join(rng.choice(list(string.ascii_lowercase), 6))
    return image, f"canary {word}"


@dataclass
class CanarySet:
    candidates: list[Record]
    repeats: list[int]     # per candidate; 0 = never inserted
    roles: list[str]       # "canary" (drawn as a canary, inserted `repeats` times) or "reference"
    design: str

    @property
    def inserted(self) -> list[int]:
        return [i for i, r in enumerate(self.repeats) if r > 0]

    def rows(self) -> list[Record]:
        """Training rows: each inserted candidate `repeats` times."""
        return [c for c, r in zip(self.candidates, self.repeats) for _ in range(r)]

    def manifest(self) -> dict:
        return {"design": self.design, "candidates": [
            {"id": c.id, "caption": c.caption, "sha256": c.sha256, "repeats": r, "role": role}
        for c, r, role in zip(self.candidates, self.repeats, self.roles)]}


def make_canaries(node, seed: int, size: int) -> CanarySet | None:
    """The canary set of `node` (the `canaries:` config section), or None when disabled."""
    if node is None or not node.enabled:
        return None
    count, n_ref = int(node.count), int(node.references)
    levels = [int(r) for r in node.repetitions]
    if count < 1 or n_ref < 1:
        raise ConfigError(f"canaries.count ({count}) and canaries.references ({n_ref}) must be >= 1")
    if not levels or min(levels) < 0:
        raise ConfigError(f"canaries.repetitions must be a non-empty list of counts >= 0 (got {levels})")
    if node.design not in ("references", "bernoulli"):
        raise ConfigError(f"canaries.design must be 'references' or 'bernoulli' (got {node.design!r})")
    if node.design == "references" and count > n_ref:
        raise ConfigError(
            f"canaries.count={count} exceeds canaries.references={n_ref}: exposure ranks each canary among the references, "
            f"so draw at least as many references as canaries (raise canaries.references or lower canaries.count)")
    rng = numpy_rng(seed, "canaries")
    total = count + n_ref
    candidates, seen = [], set()
    while len(candidates) < total:
        image, caption = draw_candidate(rng, size)
        if caption in seen:
            continue
        seen.add(caption)
        cid = PREFIX + hashlib.blake2b(caption.encode(), digest_size=4).hexdigest()
        candidates.append(Record(cid, caption, image, cid, content_hash(image)))
    order = rng.permutation(total)  # which candidates become canaries is drawn after all are drawn
    repeats = [0] * total
    if node.design == "references":
        for k, i in enumerate(order[:count]):
            repeats[int(i)] = levels[k % len(levels)]
        design = "references"
    else:
        inserted = rng.random(total) < 0.5
        repeats = [max(levels) if bool(b) else 0 for b in inserted]
        design = "bernoulli"
    cands = [candidates[i] for i in order]
    reps = [repeats[i] for i in order]
    roles = ["canary" if k < count else "reference" for k in range(total)] if design == "references" else ["canary"] * total
    return CanarySet(cands, reps, roles, design)
