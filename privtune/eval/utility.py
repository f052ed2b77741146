"""What a defense cost: held-out denoising loss, and whether generations show what captions ask.

Held-out loss works on any checkpoint. On the embedded portraits benchmark, generations from held-out
(non-member) captions are read by the shipped attribute classifier (privtune.eval.portraits: style and
per-slot accuracy, FD / KID in its features), for the LoRA and for the base model alone, so "did the
LoRA learn the style?" is a before / after number. On the embedded emoji set the generation metrics
use a fixed, training-free feature space (privtune.models.recognition). For real checkpoints CLIP score and
CLIP-space FD / KID come from a local CLIP folder (`eval.clip_model`, privtune.eval.clip_metrics); what
cannot be measured offline is listed under `skipped`, with the reason.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..models import recognition
from .attacks import EncodedSamples
from .clip_metrics import clip_metrics
from .distances import frechet_distance
from .primitives import single_step_loss, seeded_noise

LOSS_TIMESTEPS = (100, 300, 500, 700, 900)


@torch.no_grad()
def denoising_loss(predictor, samples: EncodedSamples, alphas_cumprod, seed: int = 0, batch_size: int = 32) -> float:
    """Mean per-entry epsilon MSE over fixed timesteps and per-sample seeded noise."""
    total, count = 0.0, 0
    for batch in samples.batches(batch_size):
        for t in LOSS_TIMESTEPS:
            noise = seeded_noise(tuple(batch.latents.shape[1:]), seed, f"utility-{t}", ids=batch.ids).to(batch.latents)
            loss = single_step_loss(predictor, batch.latents, t, noise, batch.cond, alphas_cumprod, reduction="mean")
            total += float(loss.sum())
            count += len(batch)
    return total / max(count, 1)


def generation_metrics(pipe, records, n: int, steps: int, guidance: float, seed: int = 0) -> dict:
    """Generate for the first n captions; fidelity = retrieval of each caption's own image, FD vs the real images."""
    chosen = records[:n]
    real = recognition.to_uint8([r.image.resize((pipe.unet.config.sample_size * pipe.vae_scale_factor,) * 2) for r in records])
    generated = recognition.generate(pipe, [r.caption for r in chosen], steps=steps, guidance=guidance, seed=seed)
    ranks = recognition.retrieval_ranks(recognition.features(generated), recognition.features(real), list(range(len(chosen))))
    fid = recognition.retrieval_scores(ranks, len(real))
    return {
        "prompt_fidelity_top10": fid["top10"],
        "prompt_fidelity_top10_chance": fid["top10_chance"],
        "frechet_distance": frechet_distance(recognition.features(generated), recognition.features(real[: len(chosen)])),
        "n_generations": len(chosen),
        "feature_space": "fixed: coarse RGB + foreground colour histogram (privtune.models.recognition)",
    }


def portraits_metrics(pipe, records, n: int, steps: int, guidance: float, seed: int = 0, grid_path=None) -> dict:
    """Style / slot accuracy and FD / KID of generations from the first n held-out captions, for the LoRA
    and for the base model (LoRA bypassed), against the held-out real images; a base | LoRA grid when asked."""
    from ..models.lora import adapters_disabled
    from .portraits import portrait_utility

    chosen = records[:n]
    captions = [r.caption for r in chosen]
    reference = [r.image for r in records]
    lora = recognition.generate(pipe, captions, steps=steps, guidance=guidance, seed=seed)
    with adapters_disabled(pipe.unet):
        base = recognition.generate(pipe, captions, steps=steps, guidance=guidance, seed=seed)
    out = portrait_utility(lora, captions, reference)
    before = portrait_utility(base, captions, reference)
    out["base_model"] = {k: before[k] for k in ("style_accuracy", "slot_accuracy", "all_slots_correct", "frechet_distance", "kid")}
    codec = portrait_utility(vae_round_trip(pipe, [r.image for r in chosen]), captions, reference)
    out["vae_round_trip"] = {k: codec[k] for k in ("style_accuracy", "slot_accuracy", "all_slots_correct")}
    out["inference"] = {"steps": steps, "guidance": guidance, "seed": seed}
    if grid_path is not None:
        real = recognition.to_uint8([r.image for r in chosen[:16]])
        generations_grid(real, base[:16], lora[:16], grid_path)
        out["grid"] = str(Path(grid_path).name)
    return out


@torch.no_grad()
def vae_round_trip(pipe, images, batch_size: int = 64) -> np.ndarray:
    """The held-out images encoded and decoded by the frozen VAE (posterior mode), reported beside the LoRA's
    numbers: how much of a style and its slots the base's codec keeps on real images (a LoRA's own latents can
    decode cleaner, so this is a reference, not a bound)."""
    vae = pipe.vae
    x = torch.from_numpy(recognition.to_uint8(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    param = next(vae.parameters())
    out = []
    for batch in x.split(batch_size):
        z = vae.encode(batch.to(param)).latent_dist.mode()
        out.append(vae.decode(z).sample.clamp(-1, 1).float().cpu())
    return ((torch.cat(out).permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().astype(np.uint8)


def generations_grid(real: np.ndarray, base: np.ndarray, lora: np.ndarray, path) -> None:
    """Rows real | base model | LoRA for the same held-out captions, 4x enlarged, labelled."""
    from PIL import Image, ImageDraw

    from ..io import atomic_path

    scale, pad, label_w = 3, 2, 70
    n, h, w = len(real), real.shape[1] * scale, real.shape[2] * scale
    sheet = Image.new("RGB", (label_w + n * (w + pad), 3 * (h + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (name, images) in enumerate((("held-out\nimage", real), ("base\nmodel", base), ("LoRA", lora))):
        draw.multiline_text((4, row * (h + pad) + h // 3), name, fill="black")
        for i, im in enumerate(images):
            tile = Image.fromarray(im).resize((w, h), Image.NEAREST)
            sheet.paste(tile, (label_w + i * (w + pad), row * (h + pad)))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")


def compute_utility(*, predictor, members: EncodedSamples, nonmembers: EncodedSamples, alphas_cumprod, pipe,
                    nonmember_records, eval_cfg, embedded: bool, seed: int = 0, benchmark: str | None = None,
                    grid_path=None) -> dict:
    out = {
        "heldout_denoising_loss": denoising_loss(predictor, nonmembers, alphas_cumprod, seed),
        "member_denoising_loss": denoising_loss(predictor, members, alphas_cumprod, seed),
        "loss_timesteps": list(LOSS_TIMESTEPS),
    }
    out["generalization_gap"] = out["heldout_denoising_loss"] - out["member_denoising_loss"]
    if benchmark == "portraits" and pipe is not None and nonmember_records:
        out.update(portraits_metrics(pipe, nonmember_records, int(eval_cfg.utility_generations),
                                     int(eval_cfg.utility_inference_steps), float(eval_cfg.utility_guidance_scale), seed,
                                     grid_path))
    elif embedded and pipe is not None and nonmember_records:
        out.update(generation_metrics(pipe, nonmember_records, int(eval_cfg.utility_generations),
                                      int(eval_cfg.utility_inference_steps), float(eval_cfg.utility_guidance_scale), seed))
    elif not embedded and pipe is not None and nonmember_records:
        out.update(clip_metrics(pipe, nonmember_records, int(eval_cfg.utility_generations),
                                int(eval_cfg.utility_inference_steps), float(eval_cfg.utility_guidance_scale), seed,
                                eval_cfg.get("clip_model")))
    return out
