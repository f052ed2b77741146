"""DualMD sampling: two LoRA adapters of one UNet, alternated across the DDIM denoising steps.

Tran, Nguyen, Tran & Tran, "Dual-Model Defense: Safeguarding Diffusion Models from Membership
Inference Attacks through Disjoint Data Splitting" (arXiv 2410.16657; specs/defenses.md section 2):
with DDIM timesteps tau_0 > tau_1 > ... > tau_{N-1}, step i uses adapter A when i is even and B when
i is odd; classifier-free guidance evaluates its conditional and unconditional halves with the same
adapter (diffusers runs both halves in one UNet call per step, so one switch per call does it).

The switch is a forward pre-hook on the UNet, so the same UNet object serves a diffusers pipeline
and privtune's attack predictor (`eval.primitives.UNetPredictor`) unchanged. The adapter is chosen
from the timestep, not from a call counter, which makes the alternating model a fixed function
eps(x, t, c) that a white-box attacker can query:

    step(t) = clamp(#{j : tau_j >= t} - 1, 0, N - 1),   adapter = A if step(t) is even else B

At the sampler's own timesteps this is exactly "A on even steps, B on odd steps". A timestep between
two DDIM timesteps belongs to the step that integrates across it (tau_{i+1} < t <= tau_i -> step i);
t above tau_0 belongs to step 0 and t below tau_{N-1} (e.g. PIA's t = 0) to the last step. So a
single-step attack (loss, PIA) at timestep t queries the adapter that the deployed sampler uses
around t, and a multi-step attack (SecMI) sees the same switches as the sampler's trajectory.
"""

from __future__ import annotations

import torch

from ..errors import ModelError
from .lora import active_adapter, tuner_layers, use_adapter


def ddim_timesteps(scheduler_config, num_inference_steps: int) -> torch.Tensor:
    """The timesteps (descending) a diffusers DDIM sampler with this config visits in N steps."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(int(num_inference_steps))
    return scheduler.timesteps.clone()


def step_index(timesteps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """step(t) for each entry of t under the descending schedule `timesteps`."""
    sched = timesteps.to(t.device).view(1, -1)
    count = (sched >= t.view(-1, 1)).sum(dim=1)
    return (count - 1).clamp(0, sched.shape[1] - 1)


class AdapterAlternation:
    """Switches a peft UNet between `adapters` (A on even steps, B on odd) by the timestep of each call.

    `timesteps` is the deployed DDIM schedule (descending) or a zero-argument callable returning the
    current one (e.g. `lambda: pipe.scheduler.timesteps`). `history` records (step, adapter) per call.
    Use as a context manager, or call `remove()`; the previously active adapter is restored.
    """

    def __init__(self, unet: torch.nn.Module, timesteps, adapters: tuple[str, str] = ("A", "B")):
        self.unet = unet
        self.adapters = tuple(adapters)
        self.timesteps = timesteps
        self.layers = tuner_layers(unet)
        if not self.layers:
            raise ModelError("DualMD sampling needs a UNet with LoRA adapters A and B; this one has no LoRA layer")
        self.previous = active_adapter(unet)
        self.current = None
        self.history: list[tuple[int, str]] = []
        self.handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def schedule(self) -> torch.Tensor:
        return self.timesteps() if callable(self.timesteps) else self.timesteps

    def adapter_for(self, t) -> tuple[int, str]:
        t = torch.as_tensor(t).reshape(-1)
        steps = step_index(self.schedule(), t)
        parities = set((steps % 2).tolist())
        if len(parities) != 1:
            raise ModelError("a DualMD UNet call mixes timesteps of even and odd sampling steps; call it once per timestep")
        step = int(steps[0])
        return step, self.adapters[step % 2]

    def _hook(self, module, args, kwargs):
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        step, name = self.adapter_for(t)
        if name != self.current:
            use_adapter(self.unet, name, self.layers)
            self.current = name
        self.history.append((step, name))
        return None

    def remove(self) -> None:
        self.handle.remove()
        use_adapter(self.unet, self.previous, self.layers)

    def __enter__(self) -> "AdapterAlternation":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def alternate_in_pipeline(pipe, adapters: tuple[str, str] = ("A", "B")) -> AdapterAlternation:
    """DualMD sampling for a diffusers pipeline whose UNet holds both adapters: follows pipe.scheduler's schedule."""
    return AdapterAlternation(pipe.unet, lambda: pipe.scheduler.timesteps, adapters)
