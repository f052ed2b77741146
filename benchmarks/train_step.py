"""Cost of one optimizer step: the privtune LoRA trainer against a bare hand-written loop.

Three steps run side by side in one process over the same UNet weights, LoRA, data and optimizer:

  trainer         `Trainer.optimizer_step` with train.cache_latents=false (VAE + text encoder every step)
  trainer_cache   `Trainer.optimizer_step` with train.cache_latents=true (posterior and text states cached)
  bare            VAE encode + text encode + noise + UNet forward + MSE + backward + clip + AdamW,
                  written out by hand on a peft LoRA, with no Accelerate and no privtune code in the loop

The variants are interleaved (rotating order) over `--repeats` timed windows of `--steps` steps each,
after a warm-up; each variant's time per step is the median of its windows. Ratios to `bare` are
printed as the ratio of medians, as the median of per-round ratios (the windows of one round run back
to back and share the machine's load, so on a shared machine this is the robust one; the goals are
judged on it) and as the ratio of median CPU times. Goals: trainer / bare <= 1.05, trainer_cache / bare < 1.
Peak memory is measured as `common.PeakMemory` describes.

    python benchmarks/train_step.py --steps 2 --repeats 15 --batch-size 16 --threads 2
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import common
import torch
import torch.nn.functional as F
from common import TrainerStep, measure, print_table, ratios

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)


# ---------------------------------------------------------------------- the three steps
def build_trainer(run_dir: Path, base: str, batch_size: int, cache: bool, extra=()):
    """A LoRA trainer ready for its loop (`common.build_trainer`), with or without the latent cache."""
    trainer = common.build_trainer("lora", run_dir, base, batch_size,
                                   [f"train.cache_latents={str(cache).lower()}", *extra])
    assert (trainer.cache is not None) == cache, "train.cache_latents did not take effect"
    return trainer


class BareStep:
    """The hand-written loop: frozen VAE / text encoder, a peft LoRA on the UNet, torch AdamW."""

    def __init__(self, path: str, trainer, device: torch.device):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from peft import LoraConfig
        from transformers import CLIPTextModel, CLIPTokenizer

        cfg = trainer.cfg
        self.device = device
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        self.text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder").to(device).requires_grad_(False).eval()
        self.vae = AutoencoderKL.from_pretrained(path, subfolder="vae").to(device).requires_grad_(False).eval()
        self.unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet").to(device).requires_grad_(False)
        self.scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
        self.unet.add_adapter(LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                         init_lora_weights="gaussian",
                                         target_modules=sorted(trainer.lora_config.target_modules)))
        self.unet.train()
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                           eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
        self.max_grad_norm = cfg.train.max_grad_norm
        self.scaling = self.vae.config.scaling_factor
        self.n_train_steps = self.scheduler.config.num_train_timesteps
        records = trainer.train_records
        res = cfg.data.resolution
        self.pixels = torch.stack([image_tensor(r.image, res) for r in records])
        self.ids = tokenizer([r.caption for r in records], padding="max_length", max_length=tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        self.batches = [torch.as_tensor(trainer.schedule.rows(k)[0]) for k in range(64)]
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.k = 0

    def __call__(self) -> float:
        rows = self.batches[self.k % len(self.batches)]
        self.k += 1
        with torch.no_grad():
            dist = self.vae.encode(self.pixels[rows].to(self.device)).latent_dist
            latents = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=self.generator).to(self.device)) * self.scaling
            states = self.text_encoder(self.ids[rows].to(self.device), return_dict=False)[0]
        return bare_update(self, latents, states, self.n_train_steps)


def bare_update(step, latents, states, n_train_steps: int) -> float:
    """The hand-written update both bare loops share: noise, UNet, MSE, backward, clip, AdamW."""
    noise = torch.randn(latents.shape, generator=step.generator).to(step.device)
    t = torch.randint(0, n_train_steps, (latents.shape[0],), generator=step.generator).to(step.device)
    pred = step.unet(step.scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=states, return_dict=False)[0]
    loss = F.mse_loss(pred, noise)
    loss.backward()
    if step.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(step.params, step.max_grad_norm)
    step.optimizer.step()
    step.optimizer.zero_grad(set_to_none=True)
    return loss.item()


def image_tensor(image, resolution: int) -> torch.Tensor:
    """Center-cropped, resized RGB in [-1, 1]: the bare loop's one-off preprocessing into memory."""
    import numpy as np
    from PIL import Image

    w, h = image.size
    side = min(w, h)
    image = image.convert("RGB").crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
    array = np.asarray(image.resize((resolution, resolution), Image.BICUBIC), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


# ---------------------------------------------------------------------- SD v1.5 shapes (CUDA)
class Sd15Bare:
    """Bare step on an SD v1.5-shaped UNet: precomputed 64x64x4 latents and 77x768 text states."""

    def __init__(self, unet, latents, states, lora_cfg, optim_kwargs, max_grad_norm, device):
        from diffusers import DDPMScheduler

        self.unet, self.latents, self.states, self.device = unet, latents, states, device
        self.unet.requires_grad_(False)
        self.unet.add_adapter(lora_cfg)
        self.unet.train()
        self.params = [p for p in unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, **optim_kwargs)
        self.max_grad_norm = max_grad_norm
        self.scheduler = DDPMScheduler()
        self.generator = torch.Generator().manual_seed(0)

    def __call__(self) -> float:
        return bare_update(self, self.latents, self.states, 1000)


def sd15_variants(run_dir: Path, base: str, batch_size: int, device: torch.device, unet_config: dict) -> dict:
    """The trainer's `optimizer_step` (cached path) and the bare step, both on a fresh SD v1.5-shaped UNet.

    The trainer is built on the embedded model, then its UNet is swapped for the big one (LoRA, optimizer
    and Accelerate wrapping redone) and its cache filled with random SD v1.5-sized posteriors and states.
    """
    from diffusers import UNet2DConditionModel

    from privtune.models.lora import add_lora

    def fresh_unet():
        torch.manual_seed(0)
        return UNet2DConditionModel(**unet_config).to(device)

    trainer = build_trainer(run_dir, base, batch_size, True)
    comps = trainer.components
    size, ctx = unet_config["sample_size"], unet_config["cross_attention_dim"]
    n = len(trainer.train_records)
    gen = torch.Generator().manual_seed(1)
    moments = torch.stack([torch.randn(n, 4, size, size, generator=gen), torch.rand(n, 4, size, size, generator=gen) * 0.1])
    trainer.cache = {"moments": {False: moments.to(device)}, "text": torch.randn(n, 77, ctx, generator=gen).to(device)}
    comps.unet = fresh_unet().requires_grad_(False)
    trainer.trainable = add_lora(comps.unet, trainer.lora_config)
    comps.unet.train()
    common.reset_accelerate()
    trainer.setup_accelerator()
    trainer.setup_optimizer()
    trainer.prepare()
    cfg = trainer.cfg
    optim_kwargs = dict(lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    rows = torch.as_tensor(trainer.schedule.rows(0)[0])
    latents = (moments[0][rows] * comps.scaling_factor).to(device)
    bare = Sd15Bare(fresh_unet(), latents, trainer.cache["text"][rows.to(device)], trainer.lora_config, optim_kwargs,
                    cfg.train.max_grad_norm, device)
    return {"trainer_cache": TrainerStep(trainer), "bare": bare}


def print_ratio(label: str, r: dict, goal: str, met: bool) -> None:
    print(f"{label} = {r['median']:.3f} of medians, {r['paired']:.3f} paired per window, {r['cpu']:.3f} in CPU time"
          f"  (goal {goal}: {'met' if met else 'MISSED'} on the paired ratio)")


def main(argv=None) -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per timed window")
    parser.add_argument("--repeats", type=int, default=15, help="timed windows per variant (interleaved)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--batch-size", type=int, default=16)
    common.add_threads(parser, 2)
    common.add_base(parser)
    parser.add_argument("--sd15-shapes", action="store_true", help="CUDA only: also compare on an SD v1.5-shaped UNet")
    args = parser.parse_args(argv)

    device = common.default_device()
    common.set_threads(args.threads, device)
    path = common.base_path(args.base)
    with tempfile.TemporaryDirectory() as tmp:
        plain = build_trainer(Path(tmp) / "plain", path, args.batch_size, False)
        cached = build_trainer(Path(tmp) / "cached", path, args.batch_size, True)
        bare = BareStep(path, plain, device)
        n_lora = sum(p.numel() for p in plain.trainable)
        assert n_lora == sum(p.numel() for p in bare.params), "trainer and bare loop train different LoRAs"
        variants = {"trainer": TrainerStep(plain), "trainer_cache": TrainerStep(cached), "bare": bare}
        results = measure(variants, args.steps, args.repeats, args.warmup, device)

        cpu = common.device_name(device)
        print(f"device: {cpu}; torch {torch.__version__}; threads {torch.get_num_threads()}; model {path}")
        print(f"batch {args.batch_size} at {plain.cfg.data.resolution}px, LoRA rank {plain.cfg.lora.rank} "
              f"({plain.cfg.lora.targets}, {n_lora} params), {args.repeats} interleaved windows x {args.steps} steps "
              f"after {args.warmup} warm-up steps; median ms/step (min / max over windows)")
        print(f"peak memory: {results['_memory_method']} over a window, above the level at its start")
        print_table("embedded model", results, args.batch_size)
        ratio_plain, ratio_cache = ratios(results, "trainer"), ratios(results, "trainer_cache")
        print()
        print_ratio("trainer / bare      ", ratio_plain, "<= 1.05", ratio_plain["paired"] <= 1.05)
        print_ratio("trainer_cache / bare", ratio_cache, "< 1", ratio_cache["paired"] < 1)
        summary = {
            "device": cpu, "threads": torch.get_num_threads(), "batch_size": args.batch_size,
            "steps": args.steps, "repeats": args.repeats,
            "ms_per_step": {n: round(r["s_per_step"] * 1e3, 2) for n, r in results.items() if not n.startswith("_")},
            "peak_mib": {n: round(r["peak_mib"], 1) for n, r in results.items() if not n.startswith("_")},
            "memory_method": results["_memory_method"],
            "ratio_trainer_bare": {k: round(v, 3) for k, v in ratio_plain.items()},
            "ratio_trainer_cache_bare": {k: round(v, 3) for k, v in ratio_cache.items()},
        }
        del variants, plain, cached, bare

        if args.sd15_shapes and device.type != "cuda":
            print("\n--sd15-shapes needs a CUDA GPU (an SD v1.5-sized UNet training step); skipped on CPU")
            summary["sd15"] = "skipped: needs a GPU"
        elif args.sd15_shapes:
            sd = sd15_variants(Path(tmp) / "sd15", path, args.batch_size, device, SD15_UNET)
            sd_results = measure(sd, args.steps, args.repeats, args.warmup, device)
            print_table("SD v1.5-shaped UNet (random init, 64x64x4 latents, 77x768 text states)", sd_results, args.batch_size)
            ratio_sd = ratios(sd_results, "trainer_cache")
            print()
            print_ratio("sd15 trainer_cache / bare", ratio_sd, "<= 1.05", ratio_sd["paired"] <= 1.05)
            summary["sd15"] = {"ms_per_step": {n: round(r["s_per_step"] * 1e3, 2) for n, r in sd_results.items()
                                               if not n.startswith("_")},
                               "peak_mib": {n: round(r["peak_mib"], 1) for n, r in sd_results.items() if not n.startswith("_")},
                               "ratio_trainer_cache_bare": {k: round(v, 3) for k, v in ratio_sd.items()}}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
