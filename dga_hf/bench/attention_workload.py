"""The work of the attention benchmark (`dga_hf.bench.attention`): its inputs, and how many (query, key)
pairs DGA really reads (`visible_pairs`, from the rule of docs/spec.md, query-aware expansion included)
and the prefill kernels compute (`executed_pairs`, from the kernels' own tile plans, `dga_hf.ops.triton_plan`
and `dga_hf.ops.triton_expand`)."""

from __future__ import annotations

from typing import Callable

import torch

from .. import rule
from ..config import DGAConfig
from ..ops.layout import DGALayout, build_layout

LLAMA3_8B = {"q_heads": 32, "kv_heads": 8, "head_dim": 128}


def random_qkv(seq_len: int, device, dtype, q_heads: int, kv_heads: int, head_dim: int, seed: int = 0):
    """q [1, q_heads, L, d], k and v [1, kv_heads, L, d]: standard normal, drawn on the CPU (the same
    numbers on every device), in ``dtype`` on ``device``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    shape_q, shape_kv = (1, q_heads, seq_len, head_dim), (1, kv_heads, seq_len, head_dim)
    q = torch.randn(shape_q, generator=gen).to(device=device, dtype=dtype)
    k = torch.randn(shape_kv, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(shape_kv, generator=gen).to(device=device, dtype=dtype)
    return q, k, v


def stage5_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: DGAConfig
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, Callable[[], DGALayout]]:
    """Grouped fp32 copies of q [B, Hq, L, d], k, v (q as [B, Hkv, G, L, d], as stage 5 takes it), the
    scale, and a builder of the layout from the model-dtype inputs, as the dispatch builds it before
    stage 5 (no padding)."""
    batch, q_heads, seq_len, head_dim = q.shape
    kv_heads = k.shape[1]
    scale = head_dim**-0.5
    grouped = q.view(batch, kv_heads, q_heads // kv_heads, seq_len, head_dim)
    lengths = torch.full((batch,), seq_len, dtype=torch.long, device=q.device)
    return grouped.float(), k.float(), v.float(), scale, (lambda: build_layout(grouped, k, v, lengths, config, scale))


def visible_pairs(layout: DGALayout, config: DGAConfig, seq_len: int, group: int) -> float:
    """Sum over real queries and query heads of the keys a query really sees (focal + aggregates of
    non-empty old blocks + local window; with expansion, docs/spec.md step 6, an expanded block's
    non-focal members instead of its aggregate)."""
    m, n = config.group_size, config.local_blocks
    device = layout.focal_pos.device
    pos = torch.arange(seq_len, device=device)
    query_block = rule.block_of(pos, m)  # [L]
    start = rule.first_local_position(query_block, m, n)
    local = (pos - start + 1).double()
    batch, heads, _ = layout.focal_pos.shape
    limits = start.view(1, 1, -1).expand(batch, heads, -1).contiguous()
    focal = torch.searchsorted(layout.focal_pos.contiguous(), limits).double()  # [B, H, L]
    nonempty = torch.isfinite(layout.agg_bias).double().cumsum(-1)  # [B, H, nb]
    nonempty = torch.cat([torch.zeros_like(nonempty[..., :1]), nonempty], dim=-1)
    old = rule.old_block_count(query_block, n)
    aggs = nonempty.gather(-1, old.view(1, 1, -1).expand(batch, heads, -1))
    real = (pos[None, :] < layout.lengths[:, None].to(device)).double()[:, None, :]
    expanded_members, expanded_blocks = _expansion_counts(layout, seq_len)
    return float(((local + focal + aggs + expanded_members - expanded_blocks) * real).sum()) * group


def _expansion_counts(layout: DGALayout, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query and kv head [B, H, L] (or 0 without expansion): the non-focal members of the blocks it
    expands (what it reads raw through them) and how many blocks it expands (aggregates it does not read)."""
    if layout.expanded is None or layout.expanded.shape[-1] == 0:
        return torch.zeros(()), torch.zeros(())
    m = layout.group_size
    batch, heads, _ = layout.focal.shape
    num_blocks = layout.agg_bias.shape[-1]
    real = torch.arange(seq_len, device=layout.focal.device)[None, :] < layout.lengths[:, None]
    members = torch.nn.functional.pad(~layout.focal & real[:, None, :], (0, num_blocks * m - seq_len))
    members = members.view(batch, heads, num_blocks, m).sum(-1).double()
    members = torch.nn.functional.pad(members, (0, 1))  # the sentinel block nb has no member
    chosen = layout.expanded
    read = members.gather(-1, chosen.flatten(2)).view_as(chosen).sum(-1)
    return read, (chosen < num_blocks).sum(-1).double()


def executed_pairs(layout: DGALayout, config: DGAConfig, seq_len: int, group: int, dtype: torch.dtype) -> float:
    """(query, key) pairs the forward kernels compute with their default tiles for ``dtype``: whole key
    chunks of every range of `triton_plan.tile_key_ranges`, for every row of the tile; with expansion also
    the expansion kernel's whole member chunks, for its rows (the G heads padded to ``BLOCK_G``)."""
    from ..ops import triton_expand, triton_plan

    d, dv = layout.agg_key.shape[-1], layout.agg_value.shape[-1]
    tiles = triton_plan.plan(group, dtype, d, dv)
    block_m, chunk = tiles["BLOCK_M"], tiles["BLOCK_N"]
    counts = triton_plan.focal_tile_counts(layout.focal_pos, layout.lengths, config, seq_len, block_m)
    ranges = triton_plan.all_tile_key_ranges(counts, layout.lengths, config, seq_len, block_m)

    def whole(count):
        return (count + chunk - 1) // chunk * chunk

    per_tile = whole(ranges.focal_hi) + whole(ranges.old_hi) + whole(ranges.win_hi - ranges.win_lo)  # [B, H, T]
    executed = float(per_tile.sum()) * block_m * group
    if layout.expanded is None or layout.expanded.shape[-1] == 0:
        return executed
    width = layout.expanded.shape[-1]
    expansion = triton_expand.expansion_tiles(group, dtype, d, dv, width, config.group_size)
    real = torch.arange(seq_len, device=layout.expanded.device)[None, :] < layout.lengths[:, None]
    columns = (layout.expanded < layout.agg_bias.shape[-1]).sum(-1) * config.group_size * real[:, None, :]
    member_chunk = expansion["BLOCK_N"]
    whole_columns = (columns + member_chunk - 1) // member_chunk * member_chunk
    return executed + float(whole_columns.sum()) * expansion["BLOCK_G"]
