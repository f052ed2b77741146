"""Generation utility for real checkpoints, from a CLIP model on disk: CLIP score (Hessel et al. 2021, through
torchmetrics) of generations against their held-out captions, and Fréchet distance / KID of CLIP image embeddings
against the held-out real images (FD in CLIP space: Kynkäänniemi et al. 2023, "The role of ImageNet classes in
Fréchet Inception Distance").

privtune never downloads weights: `eval.clip_model` must be a local folder (CLIPModel + CLIPProcessor, e.g. a
`save_pretrained` copy of openai/clip-vit-large-patch14), loaded with `local_files_only` and without remote code.
Inception FID / KID (torchmetrics' FrechetInceptionDistance) need torch-fidelity, which needs torchvision, and
Inception weights on disk; where either is missing the report says so instead of a number.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..models import recognition
from .distances import frechet_distance, kernel_inception_distance

INCEPTION_SKIPPED = ("Inception FID/KID skipped: torchmetrics' FrechetInceptionDistance needs torch-fidelity (which "
                     "needs torchvision) and the Inception weights on disk; privtune never downloads them")
CLIP_SKIPPED = ("CLIP score and CLIP-space FD/KID skipped: set eval.clip_model to a local CLIP folder (CLIPModel + "
                "CLIPProcessor saved with save_pretrained); privtune never downloads weights")


def check_clip_folder(path) -> Path:
    """The local CLIP folder `eval.clip_model` names (checked before training); a clear error otherwise."""
    folder = Path(str(path)).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"eval.clip_model={path!s} is not a local folder; privtune never downloads weights: save a "
                          "CLIP model there first (CLIPModel / CLIPProcessor .save_pretrained) or set eval.clip_model=null")
    if not any(folder.glob("*.safetensors")):
        raise ConfigError(f"eval.clip_model={folder} holds no .safetensors weights (privtune loads safetensors only)")
    if not any((folder / name).is_file() for name in ("preprocessor_config.json", "processor_config.json")):
        raise ConfigError(f"eval.clip_model={folder} has no (pre)processor_config.json: save the CLIPProcessor there too")
    return folder


class _TensorFeatures(torch.nn.Module):
    """CLIPModel whose get_image_features / get_text_features return tensors: transformers 5 returns a
    ModelOutput (pooler_output = the projected embedding), torchmetrics' CLIPScore expects the tensor."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out):
        return getattr(out, "pooler_output", out)

    def get_image_features(self, *args, **kwargs):
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return self._tensor(self.model.get_text_features(*args, **kwargs))


def load_local_clip(path) -> tuple:
    """(CLIPModel, CLIPProcessor) from a local folder, without network or remote code."""
    from transformers import CLIPModel, CLIPProcessor

    folder = check_clip_folder(path)
    model = CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=True).eval()
    processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    return model, processor


@torch.no_grad()
def image_embeddings(model, processor, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """L2-normalised CLIP image embeddings of uint8 [N, H, W, 3] images."""
    out = []
    for i in range(0, len(images), batch_size):
        inputs = processor(images=list(images[i:i + batch_size]), return_tensors="pt")
        feats = _TensorFeatures._tensor(model.get_image_features(pixel_values=inputs["pixel_values"]))
        out.append(torch.nn.functional.normalize(feats.float(), dim=-1).numpy())
    return np.concatenate(out)


def clip_metrics(pipe, records, n: int, steps: int, guidance: float, seed: int, clip_model) -> dict:
    """CLIP score of generations from the first `n` held-out captions, and FD / KID of their CLIP embeddings
    against all held-out real images; `skipped` entries say what could not be measured and why."""
    out: dict = {"skipped": [INCEPTION_SKIPPED]} if importlib.util.find_spec("torch_fidelity") is None else {}
    if not clip_model:
        out.setdefault("skipped", []).append(CLIP_SKIPPED)
        return out
    from torchmetrics.multimodal.clip_score import CLIPScore

    model, processor = load_local_clip(clip_model)
    chosen = records[:n]
    captions = [r.caption for r in chosen]
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    generated = recognition.generate(pipe, captions, steps=steps, guidance=guidance, seed=seed)
    real = recognition.to_uint8([r.image.resize((size, size)) for r in records])
    metric = CLIPScore(model_name_or_path=lambda: (_TensorFeatures(model), processor))
    metric.update(torch.from_numpy(generated).permute(0, 3, 1, 2), captions)
    gen_feats, real_feats = image_embeddings(model, processor, generated), image_embeddings(model, processor, real)
    out.update({
        "clip_score": float(metric.compute()),
        "clip_frechet_distance": frechet_distance(gen_feats, real_feats),
        "clip_kid": kernel_inception_distance(gen_feats, real_feats),
        "n_generations": len(chosen), "n_reference": len(real),
        "feature_space": f"CLIP image embeddings ({Path(str(clip_model)).name}; Ledoit-Wolf FD, unbiased KID)",
    })
    return out
