"""Build privtune's embedded default base model: a tiny Stable Diffusion pipeline trained on emoji.

Steps: (a) learn a CLIP BPE tokenizer from every caption of the emoji data set; (b) pre-train the
AutoencoderKL on the `base` rows and set its scaling factor so scaled latents have unit variance;
(c) pre-train the UNet and the CLIP text encoder jointly on cached `base` latents with the epsilon
loss and 10% caption dropout (for classifier-free guidance); (d) save a standard diffusers
StableDiffusionPipeline folder (DDIM scheduler, no safety checker, safetensors); (e) score
recognisability by retrieval and write BUILD.md plus a contact sheet. `pool` rows are never used for
training: they are reserved for member / non-member fine-tuning draws.

Usage: python scripts/build_tiny_sd.py [--out privtune/assets/tiny-sd] [--vae-steps N] [--unet-steps N]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from privtune.models import recognition, tiny  # noqa: E402

DATA = ROOT / "privtune" / "assets" / "emoji" / "emoji.parquet"


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options; defaults reproduce the shipped model."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "privtune" / "assets" / "tiny-sd"))
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="1 is fastest on a shared 2-core CPU")
    p.add_argument("--vae-steps", type=int, default=300)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--kl-weight", type=float, default=5e-4)
    p.add_argument("--vae-synthetic", type=float, default=0.0,
                   help="fraction of each VAE batch replaced by random colour-block images (generic codec data)")
    p.add_argument("--arch", choices=sorted(tiny.ARCHS), default="tiny",
                   help="hyper-parameter set in privtune/models/tiny.py (tiny: the emoji base, portraits: the portraits base)")
    p.add_argument("--unet-steps", type=int, default=1750)
    p.add_argument("--unet-batch", type=int, default=32)
    p.add_argument("--unet-lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--eval-captions", type=int, default=256, help="base captions scored by retrieval (0 skips)")
    p.add_argument("--eval-steps", type=int, default=recognition.DEFAULT_STEPS)
    p.add_argument("--eval-guidance", type=float, nargs="+", default=[2.0, 3.5, 5.0],
                   help="guidance scales tried on the first 64 eval captions; the best is used for the full score")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--limit", type=int, default=0, help="use only the first N base rows (smoke tests)")
    p.add_argument("--portraits-eval", type=int, default=256,
                   help="portraits data: base_heldout captions generated and read by the attribute classifier (0 skips)")
    return p.parse_args(argv)


def setup(seed: int, threads: int) -> None:
    """Seed everything, pin the thread count and ask torch for deterministic kernels (without the slow memory fill)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False


def load_data(path: str, limit: int = 0):
    """All captions (for the tokenizer) and the `base` rows (or their first `limit`) as pixels in [-1, 1], uint8, captions."""
    import datasets

    ds = datasets.Dataset.from_parquet(path)
    captions = list(ds["caption"])
    base = ds.filter(lambda s: s == "base", input_columns="subset")
    if limit:
        base = base.select(range(min(limit, len(base))))
    images = recognition.to_uint8(list(base["image"]))
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return captions, pixels, images, list(base["caption"])


def lr_at(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to zero, as a multiplier of the base learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def colour_blocks(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    """`n` images of uniform random colour blocks (a k x k grid, k in 4..size, nearest-upsampled) in [-1, 1]: generic
    codec training data with hard edges at every scale, so the VAE is not a codec for the base styles alone."""
    k = [4, 8, 16, size][int(torch.randint(0, 4, (1,), generator=g))]
    return F.interpolate(torch.rand(n, 3, k, k, generator=g) * 2 - 1, size=size, mode="nearest")


def train_vae(vae, pixels: torch.Tensor, args, log) -> dict:
    """Pre-train the VAE with reconstruction MSE plus a small KL term; returns final losses."""
    g = torch.Generator().manual_seed(args.seed + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, args.vae_steps, args.warmup))
    vae.train()
    recent: list[tuple[float, float]] = []
    for step in range(args.vae_steps):
        idx = torch.randint(0, len(pixels), (args.vae_batch,), generator=g)
        x = pixels[idx]
        n_synth = int(round(args.vae_batch * args.vae_synthetic))
        if n_synth:
            x = torch.cat([x[n_synth:], colour_blocks(n_synth, x.shape[-1], g)])
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        recon = vae.decode(z).sample
        mse = F.mse_loss(recon, x)
        kl = posterior.kl().mean() / z[0].numel()
        loss = mse + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        recent = (recent + [(mse.item(), kl.item())])[-50:]
        if (step + 1) % args.log_every == 0 or step + 1 == args.vae_steps:
            log(f"vae step {step + 1}/{args.vae_steps} mse {np.mean([r[0] for r in recent]):.4f} "
                f"kl {np.mean([r[1] for r in recent]):.3f}")
    vae.eval()
    with torch.no_grad():
        full = torch.cat([vae.decode(vae.encode(b).latent_dist.mode()).sample for b in pixels.split(256)])
    return {"vae_train_mse_last50": float(np.mean([r[0] for r in recent])),
            "vae_train_kl_last50": float(np.mean([r[1] for r in recent])),
            "vae_recon_mse_mode_all_base": float(F.mse_loss(full, pixels))}


@torch.no_grad()
def cache_latents(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Posterior-mode latents of all base images, scaled to unit std; returns (latents, scaling factor)."""
    z = torch.cat([vae.encode(b).latent_dist.mode() for b in pixels.split(256)])
    factor = float(1.0 / z.std())
    vae.register_to_config(scaling_factor=factor)
    return z * factor, factor


def encode_captions(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's max length, exactly as StableDiffusionPipeline tokenizes prompts."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def train_unet(unet, text_encoder, tokenizer, latents: torch.Tensor, captions: list[str], args, log) -> dict:
    """Jointly pre-train UNet and text encoder with the epsilon loss and caption dropout; returns final loss."""
    noise_sched = tiny.build_train_scheduler()
    ids = encode_captions(tokenizer, captions)
    empty = encode_captions(tokenizer, [""])[0]
    g = torch.Generator().manual_seed(args.seed + 2)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, args.unet_steps, args.warmup))
    unet.train()
    text_encoder.train()
    recent: list[float] = []
    for step in range(args.unet_steps):
        idx = torch.randint(0, len(latents), (args.unet_batch,), generator=g)
        x0 = latents[idx]
        tokens = ids[idx].clone()
        drop = torch.rand(len(idx), generator=g) < args.caption_dropout
        tokens[drop] = empty
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(idx),), generator=g)
        noisy = noise_sched.add_noise(x0, noise, t)
        hidden = text_encoder(tokens)[0]
        loss = F.mse_loss(unet(noisy, t, hidden).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        recent = (recent + [loss.item()])[-100:]
        if (step + 1) % args.log_every == 0 or step + 1 == args.unet_steps:
            log(f"unet step {step + 1}/{args.unet_steps} eps-mse {np.mean(recent):.4f}")
    unet.eval()
    text_encoder.eval()
    return {"unet_train_eps_mse_last100": float(np.mean(recent))}


def save_pipeline(out: Path, vae, text_encoder, tokenizer, unet, vocab, merges):
    """Write the standard diffusers layout (safetensors, DDIM scheduler, no safety checker) and return the pipeline."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=tiny.build_sample_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(out, safe_serialization=True)
    tiny.write_tokenizer_files(out / "tokenizer", vocab, merges)
    return pipe


def portraits_eval(pipe, data: str, n: int, steps: int, guidance: float, seed: int, out: Path, log) -> dict:
    """Generate for `n` held-out-combination captions (`base_heldout`) and read them with the attribute classifier."""
    import datasets

    from privtune.eval.portraits import portrait_utility

    held = datasets.Dataset.from_parquet(data).filter(lambda s: s == "base_heldout", input_columns="subset")
    held = held.select(range(min(n, len(held))))
    real = recognition.to_uint8(list(held["image"]))
    generated = recognition.generate(pipe, list(held["caption"]), steps=steps, guidance=guidance, seed=seed)
    scores = portrait_utility(generated, list(held["caption"]), list(held["image"]))
    scores.update(steps=steps, guidance=guidance, seed=seed, subset="base_heldout")
    recognition.contact_sheet(real[:64], generated[:64], out / "contact_sheet.png")
    log(f"portraits eval (guidance {guidance}): slot accuracy {scores['slot_accuracy']}, all-correct {scores['all_slots_correct']:.3f}")
    return scores


def write_build_md(out: Path, args, argv, counts, losses, scores, timings, factor) -> None:
    """Record how the model was made: architecture, sizes, steps, timings, losses and recognisability."""
    cfg = tiny.ARCHS[args.arch]
    size_mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
    cmd = "python scripts/build_tiny_sd.py" + ("" if not argv else " " + " ".join(argv))
    lines = [
        f"# {out.name}: a tiny Stable Diffusion base model embedded in privtune",
        "",
        "A tiny Stable-Diffusion-architecture pipeline (standard diffusers/transformers classes) pre-trained",
        f"from scratch on the `base` split of `{Path(args.data).parent.name}` ({counts['base_rows']} images, 32x32). No "
        "other split was used: `pool` (and `dp_pool`) are reserved for member / non-member fine-tuning draws. Built by",
        "`scripts/build_tiny_sd.py` (`privtune/models/tiny.py` holds the hyper-parameters).",
        "",
        "## Architecture",
        "",
        f"- UNet2DConditionModel: {counts['unet']:,} parameters; blocks {cfg.unet_down_blocks} / {cfg.unet_up_blocks}, "
        f"channels {cfg.unet_channels}, {cfg.unet_layers_per_block} layer(s) per block, head dim {cfg.unet_head_dim}, "
        f"sample size {cfg.latent_size}, {cfg.latent_channels} latent channels, cross-attention dim {cfg.text_hidden}.",
        f"- AutoencoderKL: {counts['vae']:,} parameters; channels {cfg.vae_channels} (two downsamplings, "
        f"{cfg.image_size}x{cfg.image_size}x3 -> {cfg.latent_size}x{cfg.latent_size}x{cfg.latent_channels}), "
        f"scaling_factor {factor:.4f} (1 / std of posterior-mode latents of the base images).",
        f"- CLIPTextModel: {counts['text_encoder']:,} parameters; hidden {cfg.text_hidden}, {cfg.text_layers} layers, "
        f"{cfg.text_heads} heads, max length {cfg.max_length}. Trained jointly with the UNet here; frozen by all later "
        "fine-tuning.",
        f"- CLIPTokenizer: byte-level BPE learned from all {counts['captions']} captions of the data set "
        f"(vocab {counts['vocab']}, {counts['merges']} merges); every caption word is one token, unknown words fall "
        "back to byte pieces.",
        f"- Scheduler: DDIMScheduler saved with the pipeline; SD betas ({cfg.beta_schedule}, {cfg.beta_start} -> "
        f"{cfg.beta_end}, {cfg.num_train_timesteps} steps, {cfg.prediction_type}). Training uses "
        "`DDPMScheduler.from_config` of it.",
        "",
        "## Training",
        "",
        f"- VAE: {args.vae_steps} steps, batch {args.vae_batch}, AdamW lr {args.vae_lr} (warm-up + cosine), "
        f"loss MSE + {args.kl_weight} x KL (per latent element)"
        + (f"; {args.vae_synthetic:.0%} of each batch random colour-block images (generic codec data, "
           "no portraits)." if args.vae_synthetic else "."),
        f"- UNet + text encoder: {args.unet_steps} steps, batch {args.unet_batch}, AdamW lr {args.unet_lr} "
        f"(warm-up {args.warmup} + cosine), weight decay 0.01, epsilon loss, uniform timesteps, "
        f"{args.caption_dropout:.0%} caption dropout to the empty prompt, no flips, cached posterior-mode latents.",
        f"- Seed {args.seed}, {args.threads} threads, `torch.use_deterministic_algorithms(True)`.",
        "",
        "## Results",
        "",
        f"- Final VAE losses: train MSE (last 50 steps) {losses['vae_train_mse_last50']:.4f}, KL "
        f"{losses['vae_train_kl_last50']:.3f}; reconstruction MSE of all base images (pixels in [-1, 1], posterior "
        f"mode) {losses['vae_recon_mse_mode_all_base']:.4f}.",
        f"- Final UNet epsilon MSE (last 100 steps): {losses['unet_train_eps_mse_last100']:.4f}.",
    ]
    if scores.get("slot_accuracy"):
        chance, ceiling = scores.get("slot_chance", {}), scores.get("slot_ceiling", {})
        lines += [
            f"- Held-out caption combinations (`base_heldout`, hair x shirt colour pairs never in `base`): one generation "
            f"per caption for {scores['n_generations']} captions (DDIM {scores['steps']} steps, guidance {scores['guidance']}, "
            f"seed {scores['seed']}), read by the attribute classifier (`privtune/assets/portraits/classifier`):",
            "",
            "| slot | accuracy | chance (majority) | classifier ceiling |",
            "|---|---|---|---|",
            *[f"| {k} | {v:.3f} | {chance.get(k, float('nan')):.3f} | {ceiling.get(k, float('nan')):.3f} |"
              for k, v in scores["slot_accuracy"].items()],
            "",
            f"  All slots but style correct: {scores['all_slots_correct']:.3f}. `contact_sheet.png`: real | generated pairs.",
        ]
    elif scores:
        lines += [
            f"- Recognisability (`privtune.models.recognition`): one generation per caption for {scores['n_queries']} "
            f"fixed base captions (DDIM {scores['steps']} steps, guidance {scores['guidance']}, seed {scores['seed']}), "
            f"retrieving the caption's real image among all {scores['gallery_size']} base images in a fixed "
            "pixel + colour-histogram feature space:",
            f"  top-1 {scores['top1']:.3f} (chance {scores['top1_chance']:.4f}, {scores['top1_x_chance']:.0f}x), "
            f"top-10 {scores['top10']:.3f} (chance {scores['top10_chance']:.4f}, {scores['top10_x_chance']:.0f}x), "
            f"median rank {scores['median_rank']:.0f}. `contact_sheet.png`: real | generated pairs.",
        ]
        sweep = scores.get("guidance_sweep_first64") or {}
        if sweep:
            tried = "; ".join(f"{g}: top-1 {v['top1']:.3f}, top-10 {v['top10']:.3f}" for g, v in sweep.items())
            lines.append(f"- Guidance chosen on the first 64 of those captions ({tried}).")
    lines += [
        "",
        "## Cost",
        "",
        f"- Wall time: total {timings['total']:.0f} s (tokenizer {timings['tokenizer']:.0f} s, VAE {timings['vae']:.0f} s, "
        f"UNet {timings['unet']:.0f} s, evaluation {timings.get('eval', 0):.0f} s) on a shared 2-core CPU.",
        f"- Folder size: {size_mb:.1f} MB.",
        "",
        "## Command",
        "",
        "```",
        cmd,
        "```",
        "",
    ]
    (out / "BUILD.md").write_text("\n".join(lines), encoding="utf-8")


def main(argv=None) -> dict:
    """Run the whole build; returns the summary also written to BUILD.md / build_summary.json."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    setup(args.seed, args.threads)
    out = Path(args.out)
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)

    timings: dict = {}
    captions, pixels, images, base_captions = load_data(args.data, args.limit)
    vocab, merges = tiny.learn_bpe(captions)
    tokenizer = tiny.tokenizer_from_bpe(vocab, merges)
    timings["tokenizer"] = time.time() - t0
    log(f"tokenizer: vocab {len(vocab)}, merges {len(merges)}; {len(base_captions)} base rows")

    cfg = tiny.ARCHS[args.arch]
    vae = tiny.build_vae(seed=args.seed, cfg=cfg)
    unet = tiny.build_unet(seed=args.seed, cfg=cfg)
    text_encoder = tiny.build_text_encoder(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, seed=args.seed,
                                           cfg=cfg)
    counts = {"unet": tiny.count_parameters(unet), "vae": tiny.count_parameters(vae),
              "text_encoder": tiny.count_parameters(text_encoder), "captions": len(captions),
              "vocab": len(vocab), "merges": len(merges), "base_rows": len(base_captions)}
    log(f"parameters: {counts}")

    t = time.time()
    losses = train_vae(vae, pixels, args, log)
    latents, factor = cache_latents(vae, pixels)
    timings["vae"] = time.time() - t
    log(f"vae done: {losses}, scaling_factor {factor:.4f}")

    t = time.time()
    losses.update(train_unet(unet, text_encoder, tokenizer, latents, base_captions, args, log))
    timings["unet"] = time.time() - t

    pipe = save_pipeline(out, vae, text_encoder, tokenizer, unet, vocab, merges)
    scores: dict = {}
    if "skin_tone" in __import__("datasets").Dataset.from_parquet(args.data).column_names:
        if args.portraits_eval > 0:
            t = time.time()
            sweep = {}
            for guidance in args.eval_guidance:
                s = portraits_eval(pipe, args.data, 64, args.eval_steps, guidance, args.seed, out, log)
                sweep[guidance] = float(np.mean(list(s["slot_accuracy"].values())))
            best = max(sweep, key=sweep.get)
            scores = portraits_eval(pipe, args.data, args.portraits_eval, args.eval_steps, best, args.seed, out, log)
            scores["guidance_sweep_first64_mean_slot_accuracy"] = sweep
            timings["eval"] = time.time() - t
    elif args.eval_captions > 0:
        t = time.time()
        query = recognition.sample_indices(len(base_captions), args.eval_captions, seed=args.seed)
        sweep = {}
        for guidance in args.eval_guidance if len(args.eval_guidance) > 1 else []:
            s, _ = recognition.evaluate(pipe, images, base_captions, query[:64], steps=args.eval_steps,
                                        guidance=guidance, seed=args.seed)
            sweep[guidance] = {k: s[k] for k in ("top1", "top10", "median_rank")}
            log(f"guidance {guidance}: {sweep[guidance]}")
        best = max(sweep, key=lambda g: (sweep[g]["top10"], sweep[g]["top1"])) if sweep else args.eval_guidance[0]
        scores, generated = recognition.evaluate(pipe, images, base_captions, query, steps=args.eval_steps,
                                                 guidance=best, seed=args.seed)
        scores["guidance_sweep_first64"] = sweep
        recognition.contact_sheet(images[query[:64]], generated[:64], out / "contact_sheet.png")
        timings["eval"] = time.time() - t
        log(f"recognisability: {scores}")
    timings["total"] = time.time() - t0
    summary = {"parameters": counts, "losses": losses, "recognition": scores, "timings_s": timings,
               "scaling_factor": factor, "args": vars(args) | {"out": None, "data": None}}
    (out / "build_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    write_build_md(out, args, argv, counts, losses, scores, timings, factor)
    log(f"done in {timings['total']:.0f} s -> {out}")
    return summary


if __name__ == "__main__":
    main()
