"""Inference-time memorization mitigations as sampling options (config section `sampling:`), used for
the validation images and the utility generations of every recipe:

* `wen_prompt_optimization` (Wen et al., ICLR 2024): the prompt embedding is optimised on the first
  sampling step to lower the text-conditional noise magnitude (privtune.memorization.wen), then the
  image is generated from scratch with the optimised embedding and the same x_T (same seed);
* `ren_mitigation` (Ren et al., ECCV 2024): summary-token masking and BOS re-weighting in every
  cross-attention layer at every step (privtune.memorization.attention), installed only for the call;
* `prisampler` (Hu & Pang 2023, against property inference; privtune.eval.property_inference): every UNet
  call returns (1 - lam) eps_model + lam eps_aux, the auxiliary LoRA loaded as a frozen extra adapter.

All wrap a diffusers StableDiffusionPipeline; the wrapper has the pipeline's call signature.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .attention import install_probe
from .wen import optimize_prompt_embeds, scaled_target

WEN_TARGET_AT_SD = 3.0


def check_config(cfg) -> None:
    if cfg.wen_target_loss is not None and float(cfg.wen_target_loss) <= 0:
        raise ConfigError(f"sampling.wen_target_loss must be positive or null (got {cfg.wen_target_loss})")
    if float(cfg.wen_lr) <= 0 or int(cfg.wen_iters) < 0:
        raise ConfigError("sampling.wen_lr must be > 0 and sampling.wen_iters >= 0")
    if float(cfg.ren_bos_scale) <= 0:
        raise ConfigError(f"sampling.ren_bos_scale must be positive (got {cfg.ren_bos_scale})")
    ps = cfg.get("prisampler")
    if ps is not None and float(ps.lam) > 0:
        from ..eval.property_inference import PriSamplerOptions, check_prisampler

        check_prisampler(PriSamplerOptions(lam=float(ps.lam), aux=ps.aux, target_proportion=ps.target_proportion))


def prompt_lengths(tokenizer, prompts: list[str]) -> torch.Tensor:
    """L per prompt: tokens incl. BOS and the first EOS, from the unpadded (truncated) tokenisation."""
    ids = tokenizer(prompts, truncation=True, max_length=tokenizer.model_max_length).input_ids
    return torch.tensor([len(x) for x in ids])


class MitigatedPipeline:
    """A StableDiffusionPipeline with the configured inference-time mitigations (see the module docstring)."""

    def __init__(self, pipe, cfg):
        self.pipe = pipe
        self.cfg = cfg
        self.last_wen_losses = None

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, prompt, num_inference_steps=50, guidance_scale=7.5, height=None, width=None, generator=None, **kwargs):
        lam = _prisampler_lam(self.cfg)
        if lam == 0:
            return self._call(prompt, num_inference_steps, guidance_scale, height, width, generator, **kwargs)
        from ..eval.property_inference import prisampler
        from ..models.lora import active_adapter

        self._load_prisampler_aux()
        with prisampler(self.pipe.unet, lam, target=active_adapter(self.pipe.unet), aux=PRISAMPLER_ADAPTER):
            return self._call(prompt, num_inference_steps, guidance_scale, height, width, generator, **kwargs)

    def _load_prisampler_aux(self) -> None:
        """The auxiliary LoRA as a frozen extra adapter of the pipeline's UNet (once); the active adapter and every
        requires_grad flag are left as they were, so training and export never see it."""
        from types import SimpleNamespace

        from ..models.lora import active_adapter, load_lora, use_adapter

        unet = self.pipe.unet
        if PRISAMPLER_ADAPTER in (getattr(unet, "peft_config", None) or {}):
            return
        before = active_adapter(unet)
        flags = [(p, p.requires_grad) for p in unet.parameters()]
        holder = SimpleNamespace(unet=unet, text_encoder=self.pipe.text_encoder, path="the sampled model")
        load_lora(holder, self.cfg.prisampler.aux, PRISAMPLER_ADAPTER)
        for p, flag in flags:
            p.requires_grad_(flag)
        for n, p in unet.named_parameters():
            if PRISAMPLER_ADAPTER in n:
                p.requires_grad_(False)
        use_adapter(unet, before)

    def _call(self, prompt, num_inference_steps=50, guidance_scale=7.5, height=None, width=None, generator=None, **kwargs):
        pipe, cfg = self.pipe, self.cfg
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        saved = dict(pipe.unet.attn_processors) if cfg.ren_mitigation else None
        try:
            if cfg.ren_mitigation:
                probe = install_probe(pipe.unet)
                probe.bos_scale = float(cfg.ren_bos_scale)
                if cfg.ren_mask_summary:
                    probe.mask_lengths = prompt_lengths(pipe.tokenizer, prompts)
            if cfg.wen_prompt_optimization:
                kwargs.update(self._wen_inputs(prompts, num_inference_steps, guidance_scale, height, width, generator))
                return pipe(prompt=None, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                            height=height, width=width, generator=generator, **kwargs)
            return pipe(prompts, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                        height=height, width=width, generator=generator, **kwargs)
        finally:
            if saved is not None:
                pipe.unet.set_attn_processor(saved)

    def _wen_inputs(self, prompts, steps, guidance, height, width, generator) -> dict:
        pipe, cfg = self.pipe, self.cfg
        device = pipe._execution_device
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        height, width = height or size, width or size
        cond, uncond = pipe.encode_prompt(prompts, device, 1, True)
        latents = pipe.prepare_latents(len(prompts), pipe.unet.config.in_channels, height, width, cond.dtype, device, generator)
        pipe.scheduler.set_timesteps(steps, device=device)
        t0 = pipe.scheduler.timesteps[0]
        target = cfg.wen_target_loss
        if target is None:
            target = scaled_target(WEN_TARGET_AT_SD, latents.shape[1:])
        x = pipe.scheduler.scale_model_input(latents, t0)
        optimised, self.last_wen_losses = optimize_prompt_embeds(pipe.unet, x, t0, cond, uncond[:1], float(target),
                                                                 float(cfg.wen_lr), int(cfg.wen_iters))
        return {"prompt_embeds": optimised, "negative_prompt_embeds": uncond, "latents": latents}


PRISAMPLER_ADAPTER = "prisampler_aux"


def _prisampler_lam(cfg) -> float:
    ps = cfg.get("prisampler") if hasattr(cfg, "get") else getattr(cfg, "prisampler", None)
    return float(ps.lam) if ps is not None else 0.0


def apply_sampling_options(pipe, cfg):
    """`pipe` itself when no sampling mitigation is on, else a MitigatedPipeline around it."""
    if not (cfg.wen_prompt_optimization or cfg.ren_mitigation or _prisampler_lam(cfg) > 0):
        return pipe
    return MitigatedPipeline(pipe, cfg)
