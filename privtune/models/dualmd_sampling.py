"""DualMD sampling in plain diffusers: alternate two LoRA adapters across DDIM steps.

Tran et al., "Dual-Model Defense" (arXiv 2410.16657). privtune copies this file next to a DualMD
export (`lora/dualmd_sampling.py`); it needs only diffusers (with peft installed for adapters):

    from diffusers import StableDiffusionPipeline
    from dualmd_sampling import load_dualmd, generate

    pipe = load_dualmd(StableDiffusionPipeline.from_pretrained("<base model>"), "path/to/lora")
    image = generate(pipe, "a prompt", num_inference_steps=25, guidance_scale=3.0).images[0]

Adapter A denoises the even steps (0, 2, ...) and B the odd ones; under classifier-free guidance the
conditional and unconditional halves of a step share one UNet call, hence one adapter. The switch
happens in `callback_on_step_end`, which runs after step i and so sets the adapter of step i + 1.
DDIM is used because it keeps no history of earlier model outputs (a multistep solver would mix them).
"""

from diffusers import DDIMScheduler

WEIGHTS = "pytorch_lora_weights.safetensors"
ADAPTERS = (("A", "adapter_a"), ("B", "adapter_b"))


def load_dualmd(pipe, folder):
    """Load `folder/adapter_a` and `folder/adapter_b` as adapters "A" and "B", switch to DDIM, activate A."""
    for name, sub in ADAPTERS:
        pipe.load_lora_weights(f"{folder}/{sub}", weight_name=WEIGHTS, adapter_name=name)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_adapters("A")
    return pipe


def _switch(pipe, step, timestep, callback_kwargs):
    pipe.set_adapters("B" if (step + 1) % 2 else "A")
    return callback_kwargs


def generate(pipe, prompt, **kwargs):
    """`pipe(prompt, **kwargs)` with A on even denoising steps and B on odd ones."""
    pipe.set_adapters("A")
    try:
        return pipe(prompt, callback_on_step_end=_switch, **kwargs)
    finally:
        pipe.set_adapters("A")
