"""The portraits attribute classifier: a small multi-head CNN, one head per caption slot.

It turns "did the LoRA learn what its captions say?" into numbers a person would agree with: for a
generation from a held-out caption, does the classifier see the caption's style (the fine-tuning
style the LoRA must learn), hair colour, shirt colour, ...? Its penultimate features are also the
space of the Fréchet distance and KID of `privtune.eval.portraits`. Trained by
`scripts/train_attribute_classifier.py` on the `utility` renders only (disjoint from every split), and
shipped as `privtune/assets/portraits/classifier/` (config.json + model.safetensors); the config records
each head's accuracy on held-out renders, the ceiling a generation can reach.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ModelError

CLASSIFIER_DIR = Path(__file__).resolve().parent.parent / "assets" / "portraits" / "classifier"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class AttributeClassifier(nn.Module):
    """Conv trunk (any input size: global average pooling) -> `feature_dim` features -> one linear head per slot.

    `slots` maps each slot name to its ordered values; inputs are RGB in [0, 1], [N, 3, H, W].
    """

    def __init__(self, slots: dict[str, list[str]], feature_dim: int = 128, width: int = 32):
        super().__init__()
        self.slots = {k: list(v) for k, v in slots.items()}
        w = width

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.trunk = nn.Sequential(block(3, w), nn.MaxPool2d(2), block(w, 2 * w), nn.MaxPool2d(2), block(2 * w, 4 * w),
                                   nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, feature_dim), nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({k: nn.Linear(feature_dim, len(v)) for k, v in self.slots.items()})
        self.feature_dim = feature_dim
        self.width = width

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(images * 2.0 - 1.0)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(images)
        return {k: head(f) for k, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Predicted value index per slot and the penultimate features, in eval mode."""
        was = self.training
        self.eval()
        preds: dict[str, list[np.ndarray]] = {k: [] for k in self.slots}
        feats = []
        for lo in range(0, len(images), batch_size):
            x = images[lo:lo + batch_size]
            f = self.features(x)
            feats.append(f.numpy())
            for k, head in self.heads.items():
                preds[k].append(head(f).argmax(1).numpy())
        self.train(was)
        return {k: np.concatenate(v) for k, v in preds.items()}, np.concatenate(feats)


def to_tensor(images, resolution: int) -> torch.Tensor:
    """PIL images -> float RGB [N, 3, r, r] in [0, 1] (box-resized when their size differs)."""
    from PIL import Image

    arrays = []
    for im in images:
        im = im.convert("RGB")
        if im.size != (resolution, resolution):
            im = im.resize((resolution, resolution), Image.BOX)
        arrays.append(np.asarray(im, dtype=np.float32) / 255.0)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def save_classifier(model: AttributeClassifier, folder, resolution: int, extra: dict | None = None) -> Path:
    from safetensors.torch import save_file

    from ..io import atomic_path, atomic_write_json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    atomic_write_json(folder / CONFIG_FILE, {"format": "privtune-attribute-classifier-v1", "slots": model.slots,
                                             "feature_dim": model.feature_dim, "width": model.width,
                                             "resolution": int(resolution), **(extra or {})})
    return folder


def load_classifier(folder=CLASSIFIER_DIR) -> tuple[AttributeClassifier, dict]:
    """The shipped (or a given) classifier in eval mode, and its config (slots, resolution, held-out accuracy)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise ModelError(f"no attribute classifier in {folder} ({CONFIG_FILE} + {WEIGHTS_FILE}); build it with "
                         "`python scripts/train_attribute_classifier.py`")
    config = json.loads((folder / CONFIG_FILE).read_text())
    model = AttributeClassifier(config["slots"], int(config["feature_dim"]), int(config["width"]))
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    model.eval()
    return model, config
