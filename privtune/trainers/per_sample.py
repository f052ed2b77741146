"""Per-example gradients of a whole model with torch.func (vmap over examples of grad), for every adapter method.

Opacus' hooks compute per-sample gradients layer by layer from formulas for nn.Linear / nn.Conv2d. peft's DoRA layer
(the magnitude vectors) and its LyCORIS layers (LoKr, LoHa) have no such formula, and Opacus' per-layer functorch
fallback fails on them: DoRA's layer is called with its tensors as keyword arguments, and LyCORIS keeps its tensors in
ParameterDicts that are never called. Differentiating the whole model once per example has no such gap: whatever
peft computes, each example's gradient is exact (tests compare it with one backward pass per example).

`randomness="same"`: a random draw inside the model (LoRA dropout, LyCORIS module dropout) is shared by the examples
of one vmap call; it does not depend on the data, so clipping and the guarantee are unchanged.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch


@contextmanager
def transformable_peft():
    """peft's LoHa builds its update with a memory-saving autograd.Function that has no `setup_context`, which
    torch.func cannot transform; while per-example gradients are taken, the same product in plain autograd."""
    import peft.tuners.loha.layer as loha

    original = loha.make_weight
    loha.make_weight = lambda w1a, w1b, w2a, w2b, scale: (w1a @ w1b) * (w2a @ w2b) * scale
    try:
        yield
    finally:
        loha.make_weight = original


def per_example_grads(model: torch.nn.Module, params: dict[str, torch.nn.Parameter], example_loss: Callable,
                      *inputs: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({name: [n, *shape] gradient}, [n] losses) of `example_loss(call, *example_inputs)` for each of the n examples
    along dim 0 of every input; `call(*args, **kwargs)` runs `model` with `params` as its parameters."""
    from torch.func import functional_call, grad_and_value, vmap

    def one(ps, *xs):
        return example_loss(lambda *a, **k: functional_call(model, ps, a, k), *xs)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    detached = {name: p.detach() for name, p in params.items()}
    with transformable_peft(), sdpa_kernel(SDPBackend.MATH):  # the fused CPU attention backward has no batching rule
        return vmap(grad_and_value(one), in_dims=(None, *[0] * len(inputs)), randomness="same")(detached, *inputs)
