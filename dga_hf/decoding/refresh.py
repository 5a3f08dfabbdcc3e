"""Refreshes of a decode state (docs/decoding.md, "Refresh"): every `refresh_every` tokens F is re-selected
with the step's latest queries as probes, after that step's output, and the aggregates whose membership
changed are recomputed. Stages 1 and 2 are the prefill's (`ops.layout`: `last_queries`, `importance`,
`focal_budgets`, `select_focal`) over the tokens the state holds: every cached token in keep_full, F and
the local window in compact."""

from __future__ import annotations

import math

import torch

from .. import rule
from ..ops.layout import aggregate_blocks, focal_budgets, importance, last_queries, select_focal
from .blocks import aggregate_held_blocks, fold, window_block_pairs
from .buffers import SENTINEL, DecodeBuffers, NewTokens, RawKeys, Rows, focal_spare, gather_rows, grow, raw_index, take_items
from .settings import DecodeSettings


def probes(tokens: NewTokens, probe_queries: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The last min(r, a_b) real queries of the step [B, H, G, P, d] and their positions [B, P] (-1 = no probe)."""
    counts = torch.tensor(tokens.counts, device=tokens.key.device)
    probe_query, index = last_queries(tokens.query, counts, min(probe_queries, max(tokens.counts)))
    return probe_query, torch.where(index >= 0, tokens.start[:, None] + index, -1)


def keep_idle_rows(score, budget, was_focal, counts: list[int], focal_count) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows without a new token keep their F: their focal candidates (`was_focal`) rank first and their
    budget is their focal count."""
    idle = [count == 0 for count in counts]
    if not any(idle):
        return score, budget
    keep = torch.tensor(idle, device=score.device).view(-1, 1, 1)
    score = torch.where(keep, torch.where(was_focal, math.inf, -math.inf), score)
    return score, torch.where(keep, focal_count[..., None], budget)


def refresh_archive(storage, buffers: DecodeBuffers, settings: DecodeSettings, rows: Rows, tokens: NewTokens,
                    scale: float) -> None:
    """keep_full: re-select F over every cached token; recompute the aggregates of the complete blocks
    whose membership changed (the others are unchanged)."""
    device, config = tokens.key.device, settings.config
    batch, heads = tokens.key.shape[:2]
    lengths = torch.tensor(rows.lengths, device=device)
    top = max(rows.lengths)
    positions = torch.arange(top, device=device)
    real = (positions[None, :] < lengths[:, None])[:, None, :]  # [B, 1, T]
    probe_query, probe_pos = probes(tokens, config.probe_queries)
    score = importance(probe_query, probe_pos, storage.arch_k[:, :, :top], positions.view(1, 1, -1), scale, real)
    budget = focal_budgets(rows.lengths, config, device, settings.all_focal).view(batch, 1, 1)
    previous = torch.zeros(batch, heads, top + 1, dtype=torch.bool, device=device)
    previous = previous.scatter_(2, buffers.focal_pos[:, :, : buffers.focal_hi].clamp(max=top), True)[..., :top]
    score, budget = keep_idle_rows(score, budget, previous, tokens.counts, buffers.focal_cnt)
    sink = (positions < config.sink_tokens).view(1, 1, -1)
    focal = select_focal(score, real.expand(batch, heads, top), sink, budget)

    # the focal buffer, positions ascending (slot = number of focal tokens before it)
    count = focal.sum(-1)
    slots = int(count.max())
    slot = torch.where(focal, focal.cumsum(-1) - 1, slots)  # unselected -> a scratch slot
    focal_pos = torch.full((batch, heads, slots + 1), SENTINEL, dtype=torch.long, device=device)
    focal_pos = focal_pos.scatter_(2, slot, positions.expand(batch, heads, top))[..., :slots]
    index = focal_pos.clamp(max=top - 1)
    buffers.replace_focal(focal_pos, storage.arch_k, storage.arch_v, index, count, focal_spare(rows.dense, slots))
    _reaggregate_changed(storage, buffers, settings, focal, previous, lengths, scale)
    gather = buffers.ring_pos.clamp(min=0, max=top - 1)[:, None, :].expand(batch, heads, -1)
    buffers.ring_focal = focal.gather(2, gather) & (buffers.ring_pos >= 0)[:, None, :]


def _reaggregate_changed(storage, buffers: DecodeBuffers, settings: DecodeSettings, focal, previous, lengths,
                         scale: float) -> None:
    """Aggregates, from the archive, of the complete blocks whose members changed between `previous` and
    `focal` [B, H, T]."""
    m = settings.group_size
    batch, heads, top = focal.shape
    num_blocks = top // m
    if not num_blocks:
        return
    span = num_blocks * m
    flipped = (focal[..., :span] != previous[..., :span]).view(batch, heads, num_blocks, m).any(-1)
    flipped &= ((torch.arange(num_blocks, device=focal.device) + 1) * m <= lengths[:, None])[:, None, :]
    b_idx, h_idx, c_idx = flipped.nonzero(as_tuple=True)
    if not b_idx.numel():
        return
    item = (b_idx * heads + h_idx) * (storage.arch_k.shape[2] // m) + c_idx
    keys, values = take_items(storage.arch_k, item, m), take_items(storage.arch_v, item, m)  # [N, m, d]
    members = ~focal[..., :span].view(batch, heads, num_blocks, m)[b_idx, h_idx, c_idx]
    query_bar = storage.qbar[b_idx, h_idx, c_idx]
    aggregates = aggregate_blocks(query_bar[:, None], keys[:, None], values[:, None], members[:, None], scale,
                                  buffers.score_k is not None)
    buffers.set_aggregates((b_idx, h_idx, c_idx), *(None if x is None else x[:, 0] for x in aggregates))


def refresh_compact(storage, buffers: DecodeBuffers, settings: DecodeSettings, rows: Rows, tokens: NewTokens,
                    scale: float) -> None:
    """compact: re-rank the held raw tokens (F and the local window of each row's last token); focal tokens
    dropped from F in old blocks are folded into their block's aggregate; the aggregates of the window's
    complete blocks are recomputed from the ring."""
    m, n, ring_slots = settings.group_size, settings.local_blocks, buffers.ring_slots
    device, config = tokens.key.device, settings.config
    batch, heads = tokens.key.shape[:2]
    last_block = rule.block_of(torch.tensor(rows.lengths, device=device) - 1, m)[:, None, None]  # [B, 1, 1]
    slots = buffers.focal_hi
    focal_pos = buffers.focal_pos[:, :, :slots]
    ring_pos = buffers.ring_pos[:, None, :].expand(batch, heads, ring_slots)
    in_window = (ring_pos >= 0) & ~rule.is_old_block(rule.block_of(ring_pos, m), last_block, n)
    from_ring = in_window & ~buffers.ring_focal
    cand_pos = torch.cat([focal_pos, torch.where(from_ring, ring_pos, SENTINEL)], dim=2)
    cand_k = torch.cat([buffers.focal_k[:, :, :slots], buffers.ring_k], dim=2)
    cand_v = torch.cat([buffers.focal_v[:, :, :slots], buffers.ring_v], dim=2)
    eligible = cand_pos < SENTINEL

    probe_query, probe_pos = probes(tokens, config.probe_queries)
    score = importance(probe_query, probe_pos, cand_k, cand_pos, scale, eligible)
    budget = focal_budgets(rows.lengths, config, device, settings.all_focal).view(batch, 1, 1)
    was_focal = torch.cat([eligible[..., :slots], torch.zeros_like(from_ring)], dim=2)
    score, budget = keep_idle_rows(score, budget, was_focal, tokens.counts, buffers.focal_cnt)
    chosen = select_focal(score, eligible, cand_pos < config.sink_tokens, budget, cand_pos)

    # demoted focal tokens of old blocks join their block's aggregate (exactly, through its lse)
    demoted = eligible[..., :slots] & ~chosen[..., :slots]
    folded = demoted & rule.is_old_block(rule.block_of(focal_pos, m), last_block, n)
    if bool(folded.any()):
        fold(buffers, folded, focal_pos, buffers.focal_k[:, :, :slots], buffers.focal_v[:, :, :slots],
             storage.focal_logit[:, :, :slots], m, settings.compute_dtype)
    ring_logit = _ring_logits(storage, buffers, settings, rows, scale)
    cand_logit = torch.cat([storage.focal_logit[:, :, :slots], ring_logit], dim=2)

    # the new focal buffer, positions ascending
    count = chosen.sum(-1)
    kept = int(count.max())
    order = torch.where(chosen, cand_pos, SENTINEL).sort(dim=-1)
    index = order.indices[..., :kept]
    spare = focal_spare(rows.dense, kept)
    buffers.replace_focal(order.values[..., :kept], cand_k, cand_v, index, count, spare)
    storage.focal_logit = grow(cand_logit.gather(2, index), 2, kept + spare, math.nan, exact=True)

    # ring membership: ring candidates chosen, or focal entries still chosen whose position is in the ring
    slot = focal_pos.clamp(max=SENTINEL - 1) % ring_slots
    hit = chosen[..., :slots] & (buffers.ring_pos.gather(1, slot.view(batch, -1)).view_as(slot) == focal_pos)
    marks = torch.zeros(batch, heads, ring_slots, dtype=torch.int32, device=device).scatter_add_(2, slot, hit.int())
    buffers.ring_focal = (marks > 0) | chosen[..., slots:]
    _reaggregate_window(storage, buffers, settings, rows, scale)


def _ring_logits(storage, buffers: DecodeBuffers, settings: DecodeSettings, rows: Rows, scale: float) -> torch.Tensor:
    """s * q_bar . k of each ring token [B, H, W], from the q_bar ring; NaN where its block is incomplete."""
    m = settings.group_size
    batch, heads = buffers.ring_k.shape[:2]
    lengths = torch.tensor(rows.lengths, device=buffers.ring_k.device)
    ring_block = rule.block_of(buffers.ring_pos.clamp(min=0), m)[:, None, :].expand(batch, heads, -1)
    ring_qbar = gather_rows(storage.qbar, storage.qbar_slot(ring_block))
    logit = scale * (buffers.ring_k.to(settings.compute_dtype) * ring_qbar).sum(-1)
    return torch.where((ring_block + 1) * m <= lengths[:, None, None], logit, math.nan)


def _reaggregate_window(storage, buffers: DecodeBuffers, settings: DecodeSettings, rows: Rows, scale: float) -> None:
    """The complete blocks of each row's local window: aggregates from the ring with the new membership."""
    m, n = settings.group_size, settings.local_blocks
    pairs = window_block_pairs(rows.lengths, m, n)
    if not pairs:
        return
    device = buffers.ring_k.device
    row_index = torch.tensor([b for b, _ in pairs], device=device)
    blocks = torch.tensor([c for _, c in pairs], device=device)
    slots = raw_index(blocks[:, None] * m + torch.arange(m, device=device), 0, buffers.ring_slots, chunk=False)
    raw = RawKeys(buffers.ring_k, buffers.ring_v, buffers.ring_pos, buffers.ring_focal)
    query_bar = storage.qbar[row_index, :, storage.qbar_slot(blocks)]
    aggregate_held_blocks(buffers, raw, row_index, blocks, slots, query_bar, m, scale)
