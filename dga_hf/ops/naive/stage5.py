"""A differentiable transcription of docs/spec.md steps 5 and 6 over a given layout, with explicit masks.

It materialises [L, F + nb + L] logits, so it is for small shapes only; its value is that autograd
through it gives the exact gradients every backend's stage-5 backward must reproduce (the layout's
focal keys/values and aggregates are inputs of their own, as in the backends)."""

from __future__ import annotations

import math

import torch

from ... import rule
from ...config import DGAConfig
from ..layout import DGALayout, expanded_mask


def stage5_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    focal_key: torch.Tensor,
    focal_value: torch.Tensor,
    agg_key: torch.Tensor,
    agg_value: torch.Tensor,
    layout: DGALayout,
    config: DGAConfig,
    scale: float,
) -> torch.Tensor:
    """query [B, H, G, L, d], key/value [B, H, L, d], focal_* [B, H, F, d], agg_* [B, H, nb, d] ->
    [B, H, G, L, dv]; rows at positions >= layout.lengths[b] (and rows that see nothing) are 0."""
    logits = stage5_logits(query, key, focal_key, agg_key, layout, config, scale)
    values = torch.cat([focal_value, agg_value, value], dim=2).unsqueeze(2)
    weights = torch.softmax(logits, dim=-1)
    sees_nothing = torch.isneginf(logits).all(-1, keepdim=True)
    return torch.where(sees_nothing, torch.zeros_like(weights), weights) @ values


def stage5_logits(
    query: torch.Tensor, key: torch.Tensor, focal_key: torch.Tensor, agg_key: torch.Tensor, layout: DGALayout,
    config: DGAConfig, scale: float,
) -> torch.Tensor:
    """Every query's logits over [focal slots | aggregates (with their bias) | raw keys], -inf where the
    query does not read the key (steps 5 and 6): [B, H, G, L, F + nb + L]; rows at positions >=
    layout.lengths[b] read nothing. A row's log-sum-exp is the ``lse`` of the backends' attend_forward."""
    seq_len = query.shape[3]
    m, n = config.group_size, config.local_blocks
    pos = torch.arange(seq_len, device=query.device)
    query_block = rule.block_of(pos, m).view(1, 1, seq_len, 1)
    focal_block = rule.block_of(layout.focal_pos, m).unsqueeze(2)
    focal_visible = rule.is_old_block(focal_block, query_block, n)  # [B, H, L, F]
    blocks = torch.arange(agg_key.shape[2], device=query.device)
    agg_visible = rule.is_old_block(blocks.view(1, 1, 1, -1), query_block, n)
    agg_visible = agg_visible & torch.isfinite(layout.agg_bias).unsqueeze(2)
    local_visible = rule.reads_raw(pos.view(1, -1), pos.view(-1, 1), m, n)  # [L, L]
    local_visible = local_visible.expand(*focal_visible.shape[:2], seq_len, seq_len)
    if layout.expanded is not None:  # step 6: the expanded blocks' non-focal members raw, not their aggregates
        expanded = expanded_mask(layout.expanded, agg_key.shape[2])  # [B, H, L, nb]
        agg_visible = agg_visible & ~expanded
        member = expanded.gather(-1, rule.block_of(pos, m).expand(*expanded.shape[:3], seq_len))
        local_visible = local_visible | (member & ~layout.focal.unsqueeze(2))
    real_row = (pos.view(1, -1) < layout.lengths.view(-1, 1)).view(-1, 1, seq_len, 1)
    visible = torch.cat([focal_visible, agg_visible.expand(*focal_visible.shape[:2], -1, -1), local_visible], -1)
    visible = (visible & real_row).unsqueeze(2)  # [B, H, 1, L, K]

    keys = torch.cat([focal_key, agg_key, key], dim=2).unsqueeze(2)
    bias = torch.cat(
        [torch.zeros_like(layout.focal_pos, dtype=query.dtype), layout.agg_bias.to(query.dtype).nan_to_num(0.0, neginf=0.0),
         torch.zeros(*key.shape[:3], dtype=query.dtype, device=query.device)],
        dim=-1,
    ).view(*keys.shape[:2], 1, 1, -1)
    logits = scale * query @ keys.transpose(-1, -2) + bias
    return logits.masked_fill(~visible, -math.inf)
