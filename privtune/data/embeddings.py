"""Pluggable image embeddings for near-duplicate search (cosine similarity), by name.

- `features`: the fixed, training-free features of privtune.models.recognition (coarse RGB plus a
  foreground colour histogram); always available.
- `phash`: the DCT perceptual hash of the `imagehash` package (PyPI; weight-free, so it works
  offline), as a +-1 vector: cosine = 1 - 2 * Hamming / bits.

Learned copy detectors (SSCD, CLIP) need weights that privtune never downloads
(specs/defenses.md 6d); register one here when its weights ship with an installed package.
"""

from __future__ import annotations

import importlib.util
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from ..errors import ConfigError
from ..registry import Registry

EMBEDDINGS: Registry[Callable[[Sequence[Image.Image]], np.ndarray]] = Registry("embedding")
REQUIRES: dict[str, tuple[str, str]] = {}  # name -> (module, pip package)


def _needs(name: str, module: str, pip: str):
    def decorator(fn):
        REQUIRES[name] = (module, pip)
        return EMBEDDINGS.register(name)(fn)

    return decorator


@EMBEDDINGS.register("features")
def fixed_features(images: Sequence[Image.Image]) -> np.ndarray:
    from ..models import recognition
    from .similarity import to_pixels

    pixels = np.round(to_pixels(images, 32) * 255).astype(np.uint8)
    return recognition.features(pixels)


@_needs("phash", "imagehash", "imagehash")
def perceptual_hash(images: Sequence[Image.Image]) -> np.ndarray:
    import imagehash

    bits = [imagehash.phash(im.convert("RGB"), hash_size=8).hash.reshape(-1) for im in images]
    return np.stack(bits).astype(np.float32) * 2.0 - 1.0


def get_embedding(name: str) -> Callable[[Sequence[Image.Image]], np.ndarray]:
    """The embedding function `name`; a clear error when unknown or when its package is not installed."""
    fn = EMBEDDINGS.get(str(name))
    module, pip = REQUIRES.get(str(name), (None, None))
    if module is not None and importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"embedding {name!r} needs the {module!r} package, which is not installed; "
            f"run `pip install {pip}` or choose another embedding ({', '.join(EMBEDDINGS.names())})"
        )
    return fn
