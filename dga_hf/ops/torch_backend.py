"""PyTorch backend of DGA stage 5 (CPU and GPU): one softmax per query over three key streams.

Queries are processed in tiles of whole blocks; a tile reads the focal keys and aggregates of the blocks
that are old for its last query (a prefix of each, since both are sorted by position), and the raw keys
of its own blocks plus the ``local_blocks - 1`` before. Masks are rebuilt from positions per tile, so
memory is bounded by the tile budget, never L x L.
"""

from __future__ import annotations

import math

import torch

from ..config import DGAConfig
from .layout import DGALayout

# Elements of one tile's logits (fp32): 2**25 is 128 MiB, a few tiles' worth of live temporaries.
TILE_LOGITS_BUDGET = 2**25


def tile_blocks(layout: DGALayout, heads_total: int, config: DGAConfig, num_blocks: int) -> int:
    """Blocks per query tile, so that one tile's logits stay within the budget."""
    m = config.group_size
    keys_per_query = layout.focal_pos.shape[-1] + num_blocks + config.local_blocks * m
    per_block = heads_total * m * (keys_per_query + m)
    return max(1, min(num_blocks, TILE_LOGITS_BUDGET // max(per_block, 1)))


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: DGALayout, config: DGAConfig, scale: float) -> torch.Tensor:
    """query [B, H, G, L, d], key/value [B, H, L, d] (compacted, compute dtype) -> [B, H, G, L, dv]."""
    batch, heads, group, seq_len, _ = query.shape
    m, n = config.group_size, config.local_blocks
    num_blocks = math.ceil(seq_len / m)
    device = query.device
    out = query.new_zeros(batch, heads, group, seq_len, value.shape[-1])
    focal_block = layout.focal_block  # [B, H, F]
    step = tile_blocks(layout, batch * heads * group, config, num_blocks)
    lengths = layout.lengths.view(batch, 1, 1, 1, 1)
    for first in range(0, num_blocks, step):
        last = min(num_blocks, first + step) - 1
        q_lo, q_hi = first * m, min(seq_len, (last + 1) * m)
        q_pos = torch.arange(q_lo, q_hi, device=device)
        q_block = (q_pos // m).view(1, 1, 1, -1, 1)
        q_tile = query[:, :, :, q_lo:q_hi]

        # focal keys of blocks that are old for the tile's last query (a prefix: sorted by position)
        old_limit = last - n
        focal_old_count = int((focal_block <= old_limit).sum(-1).max()) if old_limit >= 0 else 0
        f_block = focal_block[..., :focal_old_count].unsqueeze(2).unsqueeze(3)  # [B, H, 1, 1, F']
        f_logits = scale * q_tile @ layout.focal_key[:, :, None, :focal_old_count].transpose(-1, -2)
        f_logits = f_logits.masked_fill(f_block > q_block - n, -math.inf)

        agg_count = max(0, old_limit + 1)
        a_block = torch.arange(agg_count, device=device).view(1, 1, 1, 1, -1)
        a_logits = scale * q_tile @ layout.agg_key[:, :, None, :agg_count].transpose(-1, -2)
        a_logits = (a_logits + layout.agg_bias[:, :, None, None, :agg_count]).masked_fill(a_block > q_block - n, -math.inf)

        w_lo = max(0, (first - n + 1) * m)
        w_pos = torch.arange(w_lo, q_hi, device=device).view(1, 1, 1, 1, -1)
        l_logits = scale * q_tile @ key[:, :, None, w_lo:q_hi].transpose(-1, -2)
        hidden = (w_pos > q_pos.view(1, 1, 1, -1, 1)) | (w_pos // m <= q_block - n) | (w_pos >= lengths)
        l_logits = l_logits.masked_fill(hidden, -math.inf)

        logits = torch.cat([f_logits, a_logits, l_logits], dim=-1)
        peak = logits.amax(-1, keepdim=True)
        weights = torch.exp(logits - torch.where(torch.isfinite(peak), peak, 0.0))
        total = weights.sum(-1, keepdim=True)
        splits = [f_logits.shape[-1], a_logits.shape[-1], l_logits.shape[-1]]
        w_f, w_a, w_l = weights.split(splits, dim=-1)
        tile = w_f @ layout.focal_value[:, :, None, :focal_old_count]
        tile = tile + w_a @ layout.agg_value[:, :, None, :agg_count]
        tile = tile + w_l @ value[:, :, None, w_lo:q_hi]
        # rows with nothing to attend (padding) have total 0 and stay zero
        out[:, :, :, q_lo:q_hi] = tile / total.clamp(min=torch.finfo(total.dtype).tiny)
    real = torch.arange(seq_len, device=device).view(1, 1, 1, -1, 1) < lengths
    return out * real
