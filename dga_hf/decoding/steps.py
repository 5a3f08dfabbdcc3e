"""The attention of a decode step's new tokens (docs/decoding.md, "Decoding step"): one softmax over the
focal tokens of old blocks, the aggregates of old blocks (with their bias) and the raw tokens of the local
window, with the rule (`dga_hf.rule`) as a mask built from positions.

- `attend_chunk`: a multi-token step (chunked prefill), one SDPA per query tile over focal slots,
  aggregates, ring and chunk, and in keep_full the raw tokens of the blocks its queries expand;
- `attend_dense`: a keep_full one-token step that would read at least `dense_share` of the keys
  (`reads_most_keys`) is dense attention over the archive;
- `attend_packed`: a one-token step on the PyTorch path, one SDPA over the packed workspace (`buffers.py`),
  with the raw tokens of the expanded blocks copied into its tail;
- `attend_fused`: the same step in the Triton kernels of `ops/triton_decode.py`.
Each takes the query as [B, H, G, q, d] (`NewTokens.query`) and returns [B, H, G, q, dv] in the compute dtype.

Block expansion (keep_full, every query of every step; E = `DGAConfig.expand_blocks`) is docs/spec.md's step 6
over the state's score keys (its aggregates, or with expand_score="principal" the blocks' principal ends, which
the buffers keep beside them): `expansion` calls the prefill's choice, `ops.layout.choose_expanded`. An expanded
block is read as all m of its tokens from the archive, its focal slots hidden (they are among those tokens)
and its aggregate hidden: in keep_full a complete block's members are exactly its tokens outside F.
"""

from __future__ import annotations

import math

import torch

from .. import rule
from ..ops.dense import single_query_attention
from ..ops.layout import choose_expanded, expanded_indices
from ..ops.torch_backend import additive_mask
from .buffers import DecodeBuffers, NewTokens, RawKeys, gather_rows
from .settings import DecodeSettings

QUERY_TILE = 256  # queries per tile in a chunked-prefill step


def old_block_count(settings: DecodeSettings, new: list[int]) -> int:
    """Blocks old for the longest row's last new token (`rule.old_block_count`)."""
    return rule.old_block_count(rule.block_of(max(new) - 1, settings.group_size), settings.local_blocks)


def attend_chunk(buffers: DecodeBuffers, storage, settings: DecodeSettings, tokens: NewTokens, raw: RawKeys,
                 scale: float) -> torch.Tensor:
    """A multi-token step: per query tile, one SDPA over [focal slots | aggregates of old blocks | raw
    tokens of the ring and the chunk | the tokens of the blocks the tile's queries expand] with the rule as
    an additive mask. A focal token is read iff its position is before the query's window
    (`rule.first_local_position`; unused slots hold SENTINEL) and its block is not expanded by the query, an
    aggregate iff its block is old and not expanded, a raw token iff it lies in the window and not after the
    query (empty ring slots hold -1), an archive token iff the query expands its block."""
    m, n, window, slots = settings.group_size, settings.local_blocks, settings.window, buffers.ring_slots
    old_blocks = old_block_count(settings, tokens.new)
    focal_slots = buffers.focal_hi
    batch, heads, group, q_len, _ = tokens.query.shape
    dtype = buffers.ring_k.dtype
    focal_k, focal_v = buffers.focal_k[:, :, :focal_slots], buffers.focal_v[:, :, :focal_slots]
    agg_k, agg_v = buffers.agg_k[:, :, :old_blocks], buffers.agg_v[:, :, :old_blocks]
    focal_pos = buffers.focal_pos[:, :, None, :focal_slots]
    agg_bias = buffers.agg_bias[:, :, None, :old_blocks]
    agg_blocks = torch.arange(old_blocks, device=tokens.key.device)
    focal_block = rule.block_of(buffers.focal_pos[:, :, None, :focal_slots], m).clamp(max=max(old_blocks - 1, 0))
    query_block = rule.block_of(tokens.positions, m)  # [B, q]
    first_pos = rule.first_local_position(query_block, m, n)
    outputs = []
    tile = q_len if q_len <= QUERY_TILE else QUERY_TILE
    for lo in range(0, q_len, tile):
        hi = min(q_len, lo + tile)
        start = first_pos[:, None, lo:hi, None]  # [B, 1, T, 1]
        if raw.keys.shape[2] <= slots + hi:
            raw_k, raw_v, raw_pos = raw.keys, raw.values, raw.positions
        else:  # ring + the chunk keys a query of this tile can see (its window starts after lo - W)
            begin = slots + max(0, lo - window)
            raw_k = torch.cat([raw.keys[:, :, :slots], raw.keys[:, :, begin : slots + hi]], dim=2)
            raw_v = torch.cat([raw.values[:, :, :slots], raw.values[:, :, begin : slots + hi]], dim=2)
            raw_pos = torch.cat([raw.positions[:, :slots], raw.positions[:, begin : slots + hi]], dim=1)
        rp = raw_pos[:, None, None, :]
        focal_hidden = (focal_pos >= start).expand(-1, -1, hi - lo, -1)
        agg_hidden = ~rule.is_old_block(agg_blocks, query_block[:, None, lo:hi, None], n).expand(-1, heads, -1, -1)
        parts_k, parts_v, expanded_hidden = [focal_k, agg_k, raw_k], [focal_v, agg_v, raw_v], []
        if settings.expand and old_blocks:
            picked = expansion(buffers, settings, tokens.query[:, :, :, lo:hi], query_block[:, lo:hi], old_blocks)
            union = picked.flatten(0, 2).any(0).nonzero().flatten()  # the blocks any query of the tile expands
            if union.numel():
                # a focal token of a block the query expands is read as one of the block's tokens
                focal_hidden = focal_hidden | picked.gather(3, focal_block.expand(-1, -1, hi - lo, -1))
                agg_hidden = agg_hidden | picked
                parts_k.append(gather_rows(storage.arch_k, union.view(1, 1, -1), m))
                parts_v.append(gather_rows(storage.arch_v, union.view(1, 1, -1), m))
                expanded_hidden = [additive_mask(~picked[..., union].repeat_interleave(m, dim=-1), dtype)]
        mask = torch.cat([
            additive_mask(focal_hidden, dtype),
            additive_mask(agg_hidden, dtype, agg_bias),
            additive_mask(((rp < start) | (rp > tokens.positions[:, None, lo:hi, None])).expand(-1, heads, -1, -1), dtype),
            *expanded_hidden,
        ], dim=-1)
        keys = torch.cat(parts_k, dim=2).flatten(0, 1)[:, None]
        values = torch.cat(parts_v, dim=2).flatten(0, 1)[:, None]
        query = tokens.query[:, :, :, lo:hi].to(dtype).flatten(0, 1)
        out = torch.nn.functional.scaled_dot_product_attention(
            query, keys, values, attn_mask=mask.flatten(0, 1)[:, None], scale=scale, enable_gqa=True
        )
        if not tokens.all_valid:  # a padded query sees nothing: 0 on the CPU, NaN on some GPU SDPA backends
            out = out.nan_to_num_(0.0)
        outputs.append(out.view(batch, heads, group, hi - lo, -1))
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=3)
    return out.to(settings.compute_dtype)


def reads_most_keys(settings: DecodeSettings, focal_slots: int, new: list[int]) -> bool:
    """The dense-step rule (keep_full, one-token steps): the keys a DGA step may read (every focal slot,
    every old block, the expanded blocks' tokens, the window) are at least `dense_share` of the
    shortest row's tokens."""
    old_blocks = old_block_count(settings, new)
    reads = focal_slots + old_blocks + min(settings.expand, old_blocks) * settings.group_size + settings.window
    return reads >= settings.dense_share * min(new)


def attend_dense(storage, settings: DecodeSettings, tokens: NewTokens, scale: float) -> torch.Tensor:
    """Dense attention of each row's new token over the row's cached tokens (archive positions < its new
    length; the new token is already written)."""
    batch, heads, group, _, dim = tokens.query.shape
    new = tokens.new
    top = max(new)
    keys, values = storage.arch_k[:, :, :top], storage.arch_v[:, :, :top]
    real = None
    if min(new) != top:
        real = torch.arange(top, device=keys.device) < torch.tensor(new, device=keys.device)[:, None]
    query = tokens.query.reshape(batch, heads * group, 1, dim).to(keys.dtype)
    out = single_query_attention(query, keys, values, scale=scale, key_mask=real)
    if not tokens.all_valid:  # a row without a real new token (and possibly no token at all) outputs zeros
        out = out.nan_to_num(0.0)
    return out.view(batch, heads, group, 1, -1).to(settings.compute_dtype)


def expansion(buffers: DecodeBuffers, settings: DecodeSettings, query: torch.Tensor, query_block: torch.Tensor,
              old_blocks: int) -> torch.Tensor:
    """docs/spec.md step 6 for a step's queries [B, H, G, T, d] in blocks `query_block` [B, T]: the blocks
    among the first `old_blocks` that each query expands, [B, H, T, old_blocks] bool (`choose_expanded` over
    the state's score keys: its aggregates, or its principal ends; a block without members has the bias
    -inf)."""
    return choose_expanded(query, query_block, buffers.score_keys(old_blocks),
                           torch.isfinite(buffers.agg_bias[:, :, :old_blocks]), settings.expand, settings.local_blocks)


def expanded_list(picked: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The expanded blocks of `picked` [..., nb] bool (at most `count` per query) as a list
    (`expanded_indices`): block indices [..., count] and which entries are blocks [..., count] bool (a query
    with fewer than `count` candidates has fewer; the other entries hold block nb - 1 and are not read)."""
    num_blocks = picked.shape[-1]
    listed = expanded_indices(picked, count, num_blocks)
    return listed.clamp(max=num_blocks - 1), listed < num_blocks


def attend_packed(buffers: DecodeBuffers, storage, settings: DecodeSettings, tokens: NewTokens,
                  scale: float) -> torch.Tensor:
    """A one-token step on the PyTorch path: one SDPA (`single_query_attention`) over the packed workspace
    (focal slots, aggregates, ring, and in keep_full the raw tokens of the expanded blocks copied into its
    tail) with an additive mask holding each key's visibility under the rule (and the aggregates' bias)."""
    m, n = settings.group_size, settings.local_blocks
    old_blocks = old_block_count(settings, tokens.new)
    ws_k, ws_v = buffers.packed(min(settings.expand, old_blocks) * m, settings.expand * m)
    batch, heads, group, _, dim = tokens.query.shape
    dtype, device = ws_k.dtype, ws_k.device
    query_block = rule.block_of(tokens.positions[:, 0], m)  # [B]
    first_pos = rule.first_local_position(query_block, m, n)
    focal_pos = buffers.focal_pos[:, :, : buffers.focal_k.shape[2]]
    focal_hidden = focal_pos >= first_pos[:, None, None]
    agg_visible = rule.is_old_block(torch.arange(buffers.agg_k.shape[2], device=device), query_block[:, None, None], n)
    agg_bias = buffers.agg_bias.masked_fill(~agg_visible, -math.inf)
    ring_hidden = (buffers.ring_pos < first_pos[:, None])[:, None, :].expand(batch, heads, -1)
    tail = buffers.tail
    tail_visible = torch.zeros(batch, heads, tail, dtype=torch.bool, device=device)  # stale rows hidden
    if settings.expand and old_blocks:
        expanded = expansion(buffers, settings, tokens.query, query_block[:, None], old_blocks)[:, :, 0]
        chosen, usable = expanded_list(expanded, min(settings.expand, old_blocks))
        agg_bias[..., :old_blocks].masked_fill_(expanded, -math.inf)
        block = rule.block_of(focal_pos, m).clamp_(max=old_blocks - 1)
        focal_hidden |= expanded.gather(2, block)  # a focal token of an expanded block is read with its block
        rows = chosen.shape[-1] * m  # min(E, old blocks) blocks
        ws_k[:, :, -tail:][:, :, :rows] = gather_rows(storage.arch_k, chosen, m)
        ws_v[:, :, -tail:][:, :, :rows] = gather_rows(storage.arch_v, chosen, m)
        tail_visible[..., :rows] = usable.repeat_interleave(m, dim=2)

    mask = torch.cat([additive_mask(focal_hidden, dtype), agg_bias.to(dtype), additive_mask(ring_hidden, dtype),
                      additive_mask(~tail_visible, dtype)], dim=-1)
    query = tokens.query.reshape(batch, heads * group, 1, dim).to(dtype)
    out = single_query_attention(query, ws_k, ws_v, scale=scale, key_mask=mask)
    if not tokens.all_valid:  # a row without a real new token may see nothing: 0/0
        out = out.nan_to_num(0.0)
    return out.view(batch, heads, group, 1, -1).to(settings.compute_dtype)


def attend_fused(buffers: DecodeBuffers, storage, settings: DecodeSettings, tokens: NewTokens,
                 scale: float) -> torch.Tensor:
    """A one-token step in the Triton kernels (ops/triton_decode.py): the same keys and rule as
    `attend_packed`, read where they lie (no workspace, no copy of the expanded blocks), in two launches."""
    from ..ops import triton_decode

    m, hi = settings.group_size, buffers.focal_hi
    old_blocks = old_block_count(settings, tokens.new)
    query_block = rule.block_of(tokens.positions[:, 0], m)  # [B]
    expanded = None
    if settings.expand and old_blocks:
        mask = expansion(buffers, settings, tokens.query, query_block[:, None], old_blocks)[:, :, 0]
        chosen, usable = expanded_list(mask, min(settings.expand, old_blocks))
        expanded = (mask, chosen, usable, storage.arch_k, storage.arch_v)
    out = triton_decode.attend_step(
        tokens.query[:, :, :, 0], rule.first_local_position(query_block, m, settings.local_blocks),
        (buffers.focal_k[:, :, :hi], buffers.focal_v[:, :, :hi], buffers.focal_pos[:, :, :hi]),
        (buffers.agg_k[:, :, :old_blocks], buffers.agg_v[:, :, :old_blocks], buffers.agg_bias[:, :, :old_blocks]),
        expanded, (buffers.ring_k, buffers.ring_v, buffers.ring_pos), m, scale,
    )
    return out[:, :, :, None].to(settings.compute_dtype)
