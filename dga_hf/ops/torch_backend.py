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

# Elements of one tile's logits: 2**24 fp32 is 64 MiB, a few tiles' worth of live temporaries.
TILE_LOGITS_BUDGET = 2**24
# Fewer query rows per tile than this and Python overhead per tile dominates.
MIN_TILE_QUERIES = 128


def tile_blocks(layout: DGALayout, heads_total: int, config: DGAConfig, num_blocks: int) -> int:
    """Blocks per query tile: an eighth of the local window (a tile of T queries computes T x (T + n*m)
    local logits, so larger tiles waste work on the local stream; measured on CPU at 8K with
    local_blocks=128, tiles of n/8 blocks ran 2.7x faster than tiles of n), at least MIN_TILE_QUERIES
    queries, and within the logits budget."""
    m, n = config.group_size, config.local_blocks
    wanted = max(-(-n // 8), -(-MIN_TILE_QUERIES // m))
    keys_per_query = layout.focal_pos.shape[-1] + num_blocks + (n + wanted) * m
    affordable = TILE_LOGITS_BUDGET // max(heads_total * m * keys_per_query, 1)
    return max(1, min(num_blocks, wanted, affordable))


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
        q_pos = torch.arange(q_lo, q_hi, device=device).view(1, 1, 1, -1, 1)
        q_tile = query[:, :, :, q_lo:q_hi]
        streams = []  # (logits, values) per key stream, all masked to -inf where hidden

        # focal keys of blocks old for the tile's last query: a prefix, as slots are sorted by position
        old_limit = last - n
        if old_limit >= 0:
            count = int((focal_block <= old_limit).sum(-1).max())
            logits = scale * q_tile @ layout.focal_key[:, :, None, :count].transpose(-1, -2)
            hidden = focal_block[:, :, None, None, :count] > q_pos // m - n
            streams.append((logits.masked_fill_(hidden, -math.inf), layout.focal_value[:, :, None, :count]))
            agg_blocks = torch.arange(old_limit + 1, device=device)
            logits = scale * q_tile @ layout.agg_key[:, :, None, : old_limit + 1].transpose(-1, -2)
            logits += layout.agg_bias[:, :, None, None, : old_limit + 1]
            streams.append((logits.masked_fill_(agg_blocks > q_pos // m - n, -math.inf), layout.agg_value[:, :, None, : old_limit + 1]))

        w_lo = max(0, (first - n + 1) * m)
        w_pos = torch.arange(w_lo, q_hi, device=device)
        logits = scale * q_tile @ key[:, :, None, w_lo:q_hi].transpose(-1, -2)
        hidden = (w_pos > q_pos) | (w_pos // m <= q_pos // m - n) | (w_pos >= lengths)
        streams.append((logits.masked_fill_(hidden, -math.inf), value[:, :, None, w_lo:q_hi]))

        streams = [(logits, values) for logits, values in streams if logits.shape[-1]]
        peak = torch.stack([logits.amax(-1) for logits, _ in streams]).amax(0).unsqueeze(-1)
        peak = torch.where(torch.isfinite(peak), peak, 0.0)
        total = torch.zeros_like(peak)
        tile = 0.0
        for logits, values in streams:
            weights = logits.sub_(peak).exp_()
            total += weights.sum(-1, keepdim=True)
            tile = tile + weights @ values
        # rows with nothing to attend (padding) have total 0 and stay zero
        out[:, :, :, q_lo:q_hi] = tile / total.clamp(min=torch.finfo(total.dtype).tiny)
    real = torch.arange(seq_len, device=device).view(1, 1, 1, -1, 1) < lengths
    return out * real
