"""Throughput of the MIAs against a tiny random-weight UNet2DConditionModel.

For each attack it prints samples/s, UNet evaluations (NFE) per sample, and the ratio of the
attack's NFE/s to the raw batched UNet forward throughput at the same batch size, measured right
before it in the same process (goal >= 0.9: the attack's own arithmetic should be negligible).
For GSA the reference is raw forward + backward passes with Opacus per-sample gradients over the same
parameters (the network work its features need); CLiD's ratio includes its text-encoder passes and
structural's its VAE decodes.

    python benchmarks/attacks.py --n 256 --batch-size 64
"""

from __future__ import annotations

import time
import zlib

import common
import torch
from common import sync

from privtune.eval.attacks import ATTACKS, AttackTarget, EncodedSamples
from privtune.eval.primitives import UNetPredictor

SETTINGS = {
    "loss": {"timesteps": [100], "draws": 4},
    "secmi": {"t_sec": 150, "k": 10},
    "secmi_nn": {"t_sec": 150, "k": 10, "epochs": 3},
    "pia": {"timesteps": [200]},
    "pian": {"timesteps": [200]},
    "quantile": {"t_sec": 150, "k": 10, "n_models": 10},
    "clid_th": {},
    "clid_vec": {},
    "gsa1": {"n_timesteps": 10},
    "gsa2": {"n_timesteps": 10},
    "structural": {"timesteps": [100], "stride": 20},
}
FITTED = ("secmi_nn", "quantile", "clid_th", "clid_vec", "gsa1", "gsa2", "structural")  # calibrate before scoring


def tiny_unet(device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=8,
    )
    return unet.to(device=device, dtype=dtype).eval()


@torch.no_grad()
def raw_throughput(unet, samples: EncodedSamples, batch_size: int, n_calls: int, device) -> float:
    """NFE/s of plain batched forwards over the same batches an attack would see."""
    dtype = next(unet.parameters()).dtype
    batches = [b.to(device) for b in samples.batches(batch_size)]
    t = torch.full((batch_size,), 100, device=device)
    unet(batches[0].latents.to(dtype), t[: len(batches[0])], encoder_hidden_states=batches[0].cond.to(dtype))
    sync(device)
    start, rows = time.perf_counter(), 0
    for i in range(n_calls):
        b = batches[i % len(batches)]
        unet(b.latents.to(dtype), t[: len(b)], encoder_hidden_states=b.cond.to(dtype))
        rows += len(b)
    sync(device)
    return rows / (time.perf_counter() - start)


def raw_gradient_throughput(unet, samples: EncodedSamples, batch_size: int, n_calls: int, device) -> float:
    """Rows/s of plain batched forward + backward passes with Opacus per-sample gradients over the same
    parameters GSA attacks: the network work GSA cannot avoid, so its ratio measures GSA's own overhead."""
    from privtune.eval.attacks.gsa import attacked_parameters, per_sample_gradients

    _, named = attacked_parameters(unet)
    params = [p for _, p in named]
    dtype = params[0].dtype
    batches = [b.to(device) for b in samples.batches(batch_size)]
    t = torch.full((batch_size,), 100, device=device)
    rows, start = 0, None
    with torch.enable_grad(), per_sample_gradients(unet, params):
        for i in range(n_calls + 1):
            if i == 1:
                sync(device)
                start = time.perf_counter()
            b = batches[i % len(batches)]
            eps = unet(b.latents.to(dtype), t[: len(b)], encoder_hidden_states=b.cond.to(dtype)).sample
            torch.autograd.grad(eps.float().pow(2).flatten(1).mean(1).sum(), params, allow_unused=True)
            for p in params:
                p.grad_sample = None
            rows += len(b) if i else 0
    sync(device)
    return rows / (time.perf_counter() - start)


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--n", type=int, default=256, help="samples scored per attack")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--attacks", default=",".join(SETTINGS))
    ap.add_argument("--device", default=common.default_device().type)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=3)
    common.add_threads(ap, None, help="torch intra-op threads (CPU default 1)")
    args = ap.parse_args()
    device = torch.device(args.device)
    common.set_threads(args.threads, device)
    unet = tiny_unet(device, getattr(torch, args.dtype))
    from diffusers import DDPMScheduler

    ac = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    g = torch.Generator().manual_seed(0)

    def encode_text(prompts) -> torch.Tensor:  # a stand-in text encoder: one seeded state per prompt
        return torch.stack([torch.randn(8, 64, generator=torch.Generator().manual_seed(zlib.crc32(p.encode()))) for p in prompts]
                           ).to(device)

    def decode(latents: torch.Tensor) -> torch.Tensor:  # a stand-in decoder: 3 channels, upsampled x4
        return latents[:, :3].repeat_interleave(4, -2).repeat_interleave(4, -1).clamp(-1, 1)

    def samples(n: int, prefix: str) -> EncodedSamples:
        latents = torch.randn(n, 4, 8, 8, generator=g)
        return EncodedSamples(latents, torch.randn(n, 8, 64, generator=g), [f"{prefix}{i}" for i in range(n)],
                              captions=[f"{prefix} caption {i}" for i in range(n)], pixels=decode(latents)).to(device)

    data = samples(args.n, "q")
    target = AttackTarget(UNetPredictor(unet), ac.to(device), device=device, encode_text=encode_text, decode=decode,
                          unet=unet)
    print(f"device={device} dtype={args.dtype} n={args.n} batch_size={args.batch_size} threads={torch.get_num_threads()}")
    print(f"{'attack':<10} {'samples/s':>10} {'NFE/sample':>10} {'attack NFE/s':>13} {'UNet NFE/s':>11} {'ratio':>6}")
    for name in args.attacks.split(","):
        attack = ATTACKS.get(name)(**SETTINGS.get(name, {}))
        if name in FITTED:
            attack.calibrate(target, samples(32, "cm"), samples(32, "cn"), batch_size=args.batch_size, progress=False)
        attack.score(target, data.subset(range(min(len(data), args.batch_size))), args.batch_size, progress=False)
        best_attack, best_raw = float("inf"), 0.0
        for _ in range(args.repeats):
            sync(device)
            start = time.perf_counter()
            res = attack.score(target, data, args.batch_size, progress=False)
            sync(device)
            best_attack = min(best_attack, time.perf_counter() - start)
            calls = int(round(res.nfe_per_sample * -(-args.n // args.batch_size)))
            raw = raw_gradient_throughput if name.startswith("gsa") else raw_throughput
            best_raw = max(best_raw, raw(unet, data, args.batch_size, calls, device))
        nfe_s = res.nfe_per_sample * args.n / best_attack
        print(
            f"{name:<10} {args.n / best_attack:>10.1f} {res.nfe_per_sample:>10.2f} {nfe_s:>13.1f} "
            f"{best_raw:>11.1f} {nfe_s / best_raw:>6.3f}"
        )

if __name__ == "__main__":
    main()
