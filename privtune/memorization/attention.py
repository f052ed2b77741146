"""Cross-attention probing and re-weighting for Ren et al., "Unveiling and Mitigating Memorization in
Text-to-Image Diffusion Models through Cross Attention" (ECCV 2024, arXiv 2403.11052); spec:
defenses.md section 4.

`F.scaled_dot_product_attention` never materialises the attention probabilities, so the probe replaces
the processor of every cross-attention layer (`attn2`) with one that computes
softmax(QK^T / sqrt(d) + mask) explicitly. It can

* record, per call and layer, the probabilities averaged over heads and queries, a [B, L] tensor per
  layer (what the entropy statistics need; detached, so training gradients are untouched);
* apply the inference-time mitigation: summary-token masking (positions >= L get -inf before the
  softmax, L = tokenised prompt length incl. BOS and the first EOS) on both classifier-free-guidance
  halves, and BOS re-weighting (the pre-softmax logit of token 0 multiplied by `bos_scale`) on the
  conditional half only. Diffusers lays a CFG batch out as [uncond x n, cond x n]: with n prompt lengths
  set, a batch of 2n rows is split in halves and a batch of n rows is all conditional.

Layers are numbered in forward order (down blocks, mid block, up blocks: the hook order of the reference
code); `sorted` is stable, so layers inside a block keep diffusers' order.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError


class AttentionProbe:
    """Shared state of the probe processors installed on one UNet."""

    def __init__(self):
        self.recording = False
        self.layers: list[str] = []
        self.probs: dict[int, Tensor] = {}
        self.bos_scale = 1.0
        self.mask_lengths: Tensor | None = None

    def take(self, rows: int | None = None) -> Tensor:
        """The recorded mean probabilities of the last call, [n_layers, B, L] (last `rows` rows), and clear."""
        if not self.probs:
            raise ConfigError("no cross-attention probabilities were recorded; is the probe installed and recording?")
        out = torch.stack([self.probs[i] for i in sorted(self.probs)])
        self.probs = {}
        return out if rows is None else out[:, -rows:]

    def _cond_rows(self, batch: int) -> tuple[Tensor | None, slice]:
        """Per-row prompt lengths and the conditional rows of a batch."""
        if self.mask_lengths is None:
            return None, slice(0, batch)
        n = len(self.mask_lengths)
        if batch == 2 * n:
            return torch.cat([self.mask_lengths, self.mask_lengths]), slice(n, batch)
        if batch == n:
            return self.mask_lengths, slice(0, batch)
        raise ConfigError(f"cross-attention batch of {batch} rows does not match {n} prompt lengths (n or 2n rows)")


class ProbeProcessor:
    """An explicit-softmax cross-attention processor reporting to an `AttentionProbe` (see module doc)."""

    def __init__(self, probe: AttentionProbe, index: int):
        self.probe = probe
        self.index = index

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        probe = self.probe
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, tokens = context.shape[0], context.shape[1]
        attention_mask = attn.prepare_attention_mask(attention_mask, tokens, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        heads = attn.heads
        q, k, v = (attn.head_to_batch_dim(x) for x in (query, key, value))
        logits = torch.bmm(q.float(), k.float().transpose(1, 2)) * attn.scale
        if attention_mask is not None:
            logits = logits + attention_mask.float()
        logits = logits.view(batch, heads, logits.shape[1], tokens)
        lengths, cond = probe._cond_rows(batch)
        if probe.bos_scale != 1.0:
            scale = torch.ones(batch, 1, 1, tokens, device=logits.device)
            scale[cond, ..., 0] = probe.bos_scale
            logits = logits * scale
        if lengths is not None:
            positions = torch.arange(tokens, device=logits.device)
            blocked = positions.view(1, -1) >= lengths.to(logits.device).view(-1, 1)
            logits = logits.masked_fill(blocked.view(batch, 1, 1, tokens), float("-inf"))
        probs = logits.softmax(dim=-1)
        if probe.recording:
            probe.probs[self.index] = probs.detach().mean(dim=(1, 2))
        out = torch.bmm(probs.view(batch * heads, -1, tokens).to(v.dtype), v)
        out = attn.batch_to_head_dim(out)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def install_probe(unet) -> AttentionProbe:
    """Replace the processor of every cross-attention layer (`attn2`) of `unet`; returns the shared probe."""
    base = getattr(unet, "module", unet)
    processors = dict(base.attn_processors)
    probe = AttentionProbe()
    for name in sorted(processors, key=forward_rank):
        if ".attn2." in f".{name}":
            probe.layers.append(name)
            processors[name] = ProbeProcessor(probe, len(probe.layers) - 1)
    if not probe.layers:
        raise ConfigError("the UNet has no cross-attention (attn2) layers to probe")
    base.set_attn_processor(processors)
    return probe


def forward_rank(name: str) -> int:
    """Blocks in the order a forward pass visits them (down, mid, up); diffusers lists mid last."""
    return {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}.get(name.split(".")[0], 3)


def remove_probe(unet) -> None:
    """Back to diffusers' default processors."""
    base = getattr(unet, "module", unet)
    base.set_default_attn_processor()


def entropy(probs: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy (nats) of probability vectors along `dim`."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(dim)


def partial_entropy(probs: Tensor, start: Tensor) -> Tensor:
    """-sum_{j >= start} a(j) log a(j) of the (unrenormalised) mean attention [..., B, L]; `start` is [B]."""
    positions = torch.arange(probs.shape[-1], device=probs.device)
    keep = (positions.view(1, -1) >= start.to(probs.device).view(-1, 1)).to(probs.dtype)
    return -(probs * probs.clamp_min(1e-12).log() * keep).sum(-1)


def check_layers(layers, probe: AttentionProbe) -> list[int]:
    """Validate a list of layer indices against the probed UNet (null / empty = all layers)."""
    n = len(probe.layers)
    if layers is None or len(layers) == 0:
        return list(range(n))
    out = [int(i) for i in layers]
    bad = [i for i in out if not 0 <= i < n]
    if bad:
        raise ConfigError(f"cross-attention layer index {bad} out of range: this UNet has {n} cross-attention layers (0..{n - 1})")
    return out
