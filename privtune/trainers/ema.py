"""An exponential moving average of the trainable (LoRA) weights, through diffusers' EMAModel.

diffusers' training scripts wrap a whole UNet in EMAModel, which does not fit a PEFT LoRA (diffusers #9998);
EMAModel also takes a plain parameter list, so privtune averages exactly the trainable parameters. The
average is checkpointed with the run (resume continues it exactly) and, at the end of training, copied into
the LoRA before the export: what ships, what the attacks query and what utility measures is the EMA. Under
DP-SGD the average of the noised iterates is post-processing of the released sequence: it costs no epsilon.
"""

from __future__ import annotations

import torch


class LoraEMA:
    def __init__(self, params: list[torch.nn.Parameter], decay: float, start: int):
        from diffusers.training_utils import EMAModel

        self.params = params
        self.average = EMAModel(params, decay=decay, update_after_step=start)

    def step(self) -> None:
        self.average.step(self.params)

    @torch.no_grad()
    def copy_to_weights(self) -> None:
        """The LoRA takes the averaged weights (at the end of training, before the export)."""
        self.average.copy_to(self.params)

    def state_dict(self) -> dict:
        return self.average.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.average.load_state_dict(state)


def build_ema(cfg, params) -> LoraEMA | None:
    ema = cfg.train.ema
    return LoraEMA(params, float(ema.decay), int(ema.start)) if float(ema.decay) > 0 else None
