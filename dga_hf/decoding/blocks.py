"""Blocks of a decode state (docs/decoding.md): the prompt's complete blocks at prefill, blocks closing
during decoding (their q_bar and aggregate), and focal tokens folded into their block's aggregate. Stage 4
itself is `ops.layout.aggregate_blocks`, the prefill's, which also gives the blocks' score keys for
expand_score="principal" (docs/spec.md step 6) where the state expands with it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import rule
from ..ops.layout import aggregate_blocks
from .buffers import SENTINEL, DecodeBuffers, NewTokens, RawKeys, raw_index


@dataclass
class PrefillBlocks:
    """The blocks of a prompt: q_bar of every block begun (0 for one still incomplete: it is recorded when it
    closes), and the aggregates and keys of the blocks complete in the longest row (nc of them; a row's
    blocks past its own length have no members). Compute dtype."""

    query_bar: torch.Tensor  # [B, H, nb, d]: mean over the G query heads of the query at the block's end
    agg_key: torch.Tensor  # [B, H, nc, d]
    agg_value: torch.Tensor  # [B, H, nc, dv]
    lse: torch.Tensor  # [B, H, nc]
    count: torch.Tensor  # [B, H, nc]
    score_key: torch.Tensor | None  # [B, H, nc, 2, d]: the principal ends where the state scores by them, else None


def prefill_blocks(prefill, group_size: int, scale: float, dtype: torch.dtype, principal: bool) -> PrefillBlocks:
    """`Prefill` (compacted) -> the aggregates of each row's complete blocks over their non-focal tokens
    (and with `principal` their principal ends). Only complete blocks are cut out of the keys, never padded
    to a whole block: memory follows the prompt however large m is."""
    query, key, value, lengths, focal = prefill.query, prefill.key, prefill.value, prefill.lengths, prefill.focal
    batch, heads, _, seq_len, _ = query.shape
    m = group_size
    num_blocks = math.ceil(seq_len / m)
    blocks = torch.arange(num_blocks, device=query.device)
    complete = (blocks[None, :] + 1) * m <= lengths[:, None]  # [B, nb]
    ends = ((blocks + 1) * m - 1).clamp(max=seq_len - 1)
    query_bar = query[:, :, :, ends].to(dtype).mean(2) * complete[:, None, :, None]
    whole = seq_len // m
    span = whole * m
    real = torch.arange(span, device=query.device)[None, :] < lengths[:, None]
    members = (~focal[..., :span] & real[:, None, :]).view(batch, heads, whole, m)
    members &= complete[:, None, :whole, None]

    def blocked(x):
        return x[:, :, :span].reshape(batch, heads, whole, m, x.shape[-1])

    aggregates = aggregate_blocks(query_bar[:, :, :whole], blocked(key), blocked(value), members, scale, principal)
    return PrefillBlocks(query_bar, *aggregates)


@dataclass
class ClosedBlocks:
    """Blocks whose last position was among a step's tokens (N of them, over all rows)."""

    pairs: list[tuple[int, int]]  # (row, block)
    rows: torch.Tensor  # [N]
    blocks: torch.Tensor  # [N]
    query_bar: torch.Tensor  # [N, H, d], compute dtype


def close_blocks(buffers: DecodeBuffers, tokens: NewTokens, raw: RawKeys, group_size: int, scale: float,
                 dtype: torch.dtype) -> ClosedBlocks | None:
    """The blocks that close in this step: their q_bar (the G heads' mean query at the block's last
    position) and their aggregate over the non-focal tokens the step's raw keys hold, written to the
    buffers. Returns them for the storage to record, or None."""
    m = group_size
    pairs = [(b, c) for b, (t, a) in enumerate(zip(tokens.old, tokens.counts)) for c in range(t // m, (t + a) // m)]
    if not pairs:
        return None
    device = tokens.key.device
    rows = torch.tensor([b for b, _ in pairs], device=device)
    blocks = torch.tensor([c for _, c in pairs], device=device)
    starts = torch.tensor([tokens.old[b] for b, _ in pairs], device=device)
    ends = (blocks + 1) * m - 1
    query_bar = tokens.query[rows, :, :, ends - starts].to(dtype).mean(2)  # [N, H, G, d] -> [N, H, d]
    positions = blocks[:, None] * m + torch.arange(m, device=device)  # [N, m]
    index = raw_index(positions, starts[:, None], buffers.ring_slots, tokens.size > 1)
    aggregate_held_blocks(buffers, raw, rows, blocks, index, query_bar, m, scale)
    return ClosedBlocks(pairs, rows, blocks, query_bar)


def aggregate_held_blocks(buffers: DecodeBuffers, raw: RawKeys, rows, blocks, index, query_bar, group_size: int,
                          scale: float) -> None:
    """Aggregate blocks `blocks` of rows `rows` [N] from raw keys (the block's tokens at slots `index`
    [N, m]; a member is a token the slot still holds and not focal) with `query_bar` [N, H, d], into the
    buffers (with the score keys, where they hold some)."""
    positions = blocks[:, None] * group_size + torch.arange(group_size, device=blocks.device)
    keys = raw.keys[rows[:, None], :, index].transpose(1, 2)  # [N, H, m, d]
    values = raw.values[rows[:, None], :, index].transpose(1, 2)
    held = raw.positions[rows[:, None], index] == positions  # [N, m]
    members = ~raw.focal[rows[:, None], :, index].transpose(1, 2) & held[:, None, :]
    aggregates = aggregate_blocks(query_bar[:, :, None], keys[:, :, None], values[:, :, None], members[:, :, None],
                                  scale, buffers.score_k is not None)
    buffers.set_aggregates((rows, slice(None), blocks), *(None if x is None else x[:, :, 0] for x in aggregates))


def window_block_pairs(lengths: list[int], group_size: int, local_blocks: int) -> list[tuple[int, int]]:
    """(row, block) of each row's complete blocks in the local window of its last token."""
    m = group_size
    return [
        (b, c) for b, t in enumerate(lengths)
        for c in range(rule.old_block_count(rule.block_of(t - 1, m), local_blocks), rule.block_of(t - 1, m) + 1)
        if (c + 1) * m <= t
    ]


def fold(buffers: DecodeBuffers, folded, focal_pos, focal_k, focal_v, focal_logit, group_size: int, dtype) -> None:
    """Add the `folded` focal tokens [B, H, F] to their blocks' aggregates: the result is the aggregate
    (spec stage 4) over the block's previous members and these tokens, from K_hat, V_hat, the block's lse
    and each token's logit s * q_bar_c . k_j (recorded when its block closed). Only compact folds, and it
    never expands blocks, so there are no score keys to follow the new members."""
    lse = buffers.agg_lse
    blocks = rule.block_of(focal_pos.clamp(max=SENTINEL - 1), group_size).clamp(max=lse.shape[2] - 1)
    blocks = torch.where(folded, blocks, 0)
    keys, values = focal_k.to(dtype), focal_v.to(dtype)
    logits = focal_logit.masked_fill(~folded, -math.inf)  # [B, H, F]
    peak = lse.scatter_reduce(2, blocks, logits, reduce="amax")  # [B, H, NB]
    peak_safe = torch.where(torch.isfinite(peak), peak, 0.0)
    old_weight = torch.exp(lse - peak_safe)  # 0 for an empty block
    new_weight = torch.exp(logits - peak_safe.gather(2, blocks)).masked_fill(~folded, 0.0)
    total = old_weight + torch.zeros_like(lse).scatter_add_(2, blocks, new_weight)
    agg_k = old_weight[..., None] * buffers.agg_k.to(dtype)
    agg_k = agg_k.scatter_add_(2, blocks[..., None].expand_as(keys), new_weight[..., None] * keys)
    agg_v = old_weight[..., None] * buffers.agg_v.to(dtype)
    agg_v = agg_v.scatter_add_(2, blocks[..., None].expand_as(values), new_weight[..., None] * values)
    changed = torch.zeros(lse.shape, dtype=torch.int32, device=lse.device).scatter_add_(2, blocks, folded.int()) > 0
    denominator = total.clamp(min=torch.finfo(total.dtype).tiny)[..., None]
    buffers.replace_aggregates(
        torch.where(changed[..., None], (agg_k / denominator).to(buffers.agg_k.dtype), buffers.agg_k),
        torch.where(changed[..., None], (agg_v / denominator).to(buffers.agg_v.dtype), buffers.agg_v),
        torch.where(changed, peak_safe + total.log(), lse),
        buffers.agg_cnt + torch.zeros_like(buffers.agg_cnt).scatter_add_(2, blocks, folded.to(buffers.agg_cnt.dtype)),
    )
