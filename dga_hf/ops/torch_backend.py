"""PyTorch backend of DGA stage 5 (CPU and GPU): one softmax per query over three key streams.

Queries are processed in tiles of whole blocks; a tile reads the focal keys and aggregates of the blocks
that are old for its last query (a prefix of each, since both are sorted by position), and the raw keys
of its own blocks plus the ``local_blocks - 1`` before. Masks are rebuilt from positions per tile, so
memory is bounded by the tile budget, never L x L, in the forward and in the backward: the backward
(`attend_backward`) recomputes each tile's logits from the saved log-sum-exp, as FlashAttention does.

Two forwards compute the same function: `attend_forward` (output and log-sum-exp, for training)
materialises each tile's logits per stream; `attend` (inference) hands each tile to PyTorch's fused
`scaled_dot_product_attention` with the rule as an additive mask, which on the CPU is about twice as
fast (8K, SmolLM2-135M's attention shape, shipped preset: 395 ms against 750 ms per layer, 2 threads).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import rule
from ..config import DGAConfig
from .layout import DGALayout, expanded_mask

# Elements of one tile's logits: 2**24 fp32 is 64 MiB, a few tiles' worth of live temporaries.
TILE_LOGITS_BUDGET = 2**24
# Fewer query rows per tile than this and Python overhead per tile dominates.
MIN_TILE_QUERIES = 128


def additive_mask(hidden: torch.Tensor, dtype: torch.dtype, bias: torch.Tensor | None = None) -> torch.Tensor:
    """An SDPA mask in ``dtype``: -inf where ``hidden``, else 0 (or ``bias``, broadcast)."""
    visible = torch.zeros((), dtype=dtype, device=hidden.device) if bias is None else bias.to(dtype)
    return torch.where(hidden, -math.inf, visible)


def tile_blocks(layout: DGALayout, heads_total: int, config: DGAConfig, num_blocks: int) -> int:
    """Blocks per query tile: an eighth of the local window (a tile of T queries computes T x (T + n*m)
    local logits, so larger tiles waste work on the local stream; measured on CPU at 8K with
    local_blocks=128, tiles of n/8 blocks ran 2.7x faster than tiles of n), at least MIN_TILE_QUERIES
    queries, and within the logits budget. With expansion the tile also reads the union of its queries'
    expanded blocks: at most every old block, so the budget counts them all."""
    m, n = config.group_size, config.local_blocks
    wanted = max(-(-n // 8), -(-MIN_TILE_QUERIES // m))
    expanded = num_blocks * m if layout.expanded is not None else 0
    keys_per_query = layout.focal_pos.shape[-1] + num_blocks + (n + wanted) * m + expanded
    affordable = TILE_LOGITS_BUDGET // max(heads_total * m * keys_per_query, 1)
    return max(1, min(num_blocks, wanted, affordable))


@dataclass
class _Expansion:
    """What the queries q_lo..q_hi-1 of a tile expand (docs/spec.md step 6): per query, the members of its
    expanded blocks as raw key positions (each query its own keys, as in NSA's selected attention), and
    the aggregates it therefore skips."""

    positions: torch.Tensor  # [B, H, T, X * m]: each query's expanded members (clamped into the sequence)
    hidden: torch.Tensor  # [B, H, T, X * m] bool: not read (a focal member, the sentinel, past the sequence)
    agg_hidden: torch.Tensor  # [B, H, T, old] bool: the query reads this block raw, not its aggregate


def _expansion(layout: DGALayout, q_lo: int, q_hi: int, old_blocks: int) -> _Expansion | None:
    """The tile's expansion; None when its queries expand nothing. A member of an expanded block is read
    through the expansion unless it is focal (the focal stream reads it already)."""
    if layout.expanded is None or old_blocks == 0:
        return None
    chosen = layout.expanded[:, :, q_lo:q_hi, : min(layout.expanded.shape[-1], old_blocks)]  # [B, H, T, X]
    if chosen.numel() == 0 or not bool((chosen < old_blocks).any()):
        return None
    m = layout.group_size
    seq_len = layout.focal.shape[-1]
    positions = (chosen[..., None] * m + torch.arange(m, device=chosen.device)).flatten(-2)
    outside = positions >= seq_len  # the sentinel's members, and those of a short last block
    positions = positions.clamp(max=seq_len - 1)
    focal = layout.focal.gather(2, positions.flatten(2)).view_as(positions)
    return _Expansion(positions, outside | focal, expanded_mask(chosen, old_blocks))


@dataclass
class _Stream:
    """One key stream as a tile sees it: masked logits [B, H, G, T, K] over ``source[:, :, lo:hi]`` (keys
    shared by the tile's queries), or, with ``per_query`` positions [B, H, T, K], over each query's own
    keys (the members of its expanded blocks)."""

    logits: torch.Tensor
    source: str  # "focal", "agg" or "local"
    lo: int = 0
    hi: int = 0
    per_query: torch.Tensor | None = None

    def keys(self, tensor: torch.Tensor) -> torch.Tensor:
        """The stream's rows of a [B, H, N, d] source: [B, H, 1, K, d], or [B, H, T, K, d] per query."""
        if self.per_query is None:
            return tensor[:, :, None, self.lo : self.hi]
        return tensor.reshape(-1, tensor.shape[-1]).index_select(0, self._flat(tensor)).view(*self.per_query.shape, -1)

    def _flat(self, tensor: torch.Tensor) -> torch.Tensor:
        """The per-query positions as rows of ``tensor`` [B, H, N, d] flattened to [B * H * N, d] (whole rows
        by index_select: a gather of the same elements is about 10x slower on the CPU)."""
        batch, heads, length = tensor.shape[:3]
        offset = length * torch.arange(batch * heads, device=tensor.device).view(batch, heads, 1, 1)
        return (self.per_query + offset).flatten()

    def apply(self, weights: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """weights [B, H, G, T, K] times the stream's rows (from `keys`) -> [B, H, G, T, d]."""
        if self.per_query is None:
            return weights @ rows
        return (weights.transpose(2, 3) @ rows).transpose(2, 3)  # batched over (B, H, T), the G heads as rows

    def apply_transposed(self, weights: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The stream's gradient rows: weights [B, H, G, T, K] transposed times rows [B, H, G, T, d],
        summed over G -> [B, H, K, d] (shared keys) or [B, H, T, K, d] (per query)."""
        if self.per_query is None:
            return (weights.transpose(-1, -2) @ rows).sum(2)
        return weights.permute(0, 1, 3, 4, 2) @ rows.transpose(2, 3)

    def add_to(self, total: torch.Tensor, rows: torch.Tensor) -> None:
        """total[:, :, the stream's keys] += rows (from `apply_transposed`); per-query keys may repeat."""
        if self.per_query is None:
            total[:, :, self.lo : self.hi] += rows
            return
        total.view(-1, total.shape[-1]).index_add_(0, self._flat(total), rows.reshape(-1, total.shape[-1]))


def _tiles(query: torch.Tensor, key: torch.Tensor, layout: DGALayout, config: DGAConfig, scale: float) -> Iterator[tuple[int, int, list[_Stream]]]:
    """(first query, end query, streams) per tile; hidden logits are -inf, empty streams are left out."""
    batch, heads, group, seq_len, _ = query.shape
    m, n = config.group_size, config.local_blocks
    num_blocks = math.ceil(seq_len / m)
    device = query.device
    focal_block = layout.focal_block  # [B, H, F]
    step = tile_blocks(layout, batch * heads * group, config, num_blocks)
    for first in range(0, num_blocks, step):
        last = min(num_blocks, first + step) - 1
        q_lo, q_hi = first * m, min(seq_len, (last + 1) * m)
        q_pos = torch.arange(q_lo, q_hi, device=device).view(1, 1, 1, -1, 1)
        q_tile = query[:, :, :, q_lo:q_hi]
        streams = []

        # focal keys of blocks old for the tile's last query: a prefix, as slots are sorted by position
        old_blocks = rule.old_block_count(last, n)
        q_block = rule.block_of(q_pos, m)
        if old_blocks:
            count = int(rule.is_old_block(focal_block, last, n).sum(-1).max())
            logits = scale * q_tile @ layout.focal_key[:, :, None, :count].transpose(-1, -2)
            hidden = ~rule.is_old_block(focal_block[:, :, None, None, :count], q_block, n)
            streams.append(_Stream(logits.masked_fill_(hidden, -math.inf), "focal", 0, count))
            agg_blocks = torch.arange(old_blocks, device=device)
            logits = scale * q_tile @ layout.agg_key[:, :, None, :old_blocks].transpose(-1, -2)
            logits += layout.agg_bias[:, :, None, None, :old_blocks]
            hidden = ~rule.is_old_block(agg_blocks, q_block, n)
            expansion = _expansion(layout, q_lo, q_hi, old_blocks)
            if expansion is not None:
                hidden = hidden | expansion.agg_hidden[:, :, None]
                stream = _Stream(None, "local", per_query=expansion.positions)
                members = stream.keys(key)  # [B, H, T, K, d]
                logits_expanded = (q_tile.transpose(2, 3) @ members.transpose(-1, -2)).transpose(2, 3).mul_(scale)
                stream.logits = logits_expanded.masked_fill_(expansion.hidden[:, :, None], -math.inf)
                streams.append(stream)
            streams.append(_Stream(logits.masked_fill_(hidden, -math.inf), "agg", 0, old_blocks))

        w_lo = rule.first_local_position(first, m, n)
        w_pos = torch.arange(w_lo, q_hi, device=device)
        logits = scale * q_tile @ key[:, :, None, w_lo:q_hi].transpose(-1, -2)
        hidden = ~rule.reads_raw(w_pos, q_pos, m, n)
        streams.append(_Stream(logits.masked_fill_(hidden, -math.inf), "local", w_lo, q_hi))
        yield q_lo, q_hi, [stream for stream in streams if stream.per_query is not None or stream.hi > stream.lo]


def _sources(key: torch.Tensor, value: torch.Tensor, layout: DGALayout) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {
        "focal": (layout.focal_key, layout.focal_value),
        "agg": (layout.agg_key, layout.agg_value),
        "local": (key, value),
    }


def _padded_rows(layout: DGALayout, seq_len: int, device: torch.device) -> torch.Tensor:
    """[B, 1, 1, L] True at positions past each row's length (compacted rows are right-padded)."""
    return (torch.arange(seq_len, device=device).view(1, -1) >= layout.lengths.view(-1, 1)).view(-1, 1, 1, seq_len)


def attend_forward(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: DGALayout, config: DGAConfig, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """query [B, H, G, L, d], key/value [B, H, L, d] (compacted, one compute dtype) ->
    (out [B, H, G, L, dv], lse [B, H, G, L]): lse is the log-sum-exp of each row's visible logits;
    padded rows (and rows that see nothing) get out 0 and lse -inf."""
    batch, heads, group, seq_len, _ = query.shape
    out = query.new_zeros(batch, heads, group, seq_len, value.shape[-1])
    lse = query.new_full((batch, heads, group, seq_len), -math.inf)
    sources = _sources(key, value, layout)
    for q_lo, q_hi, streams in _tiles(query, key, layout, config, scale):
        peak = torch.stack([stream.logits.amax(-1) for stream in streams]).amax(0).unsqueeze(-1)
        peak = torch.where(torch.isfinite(peak), peak, 0.0)
        total = torch.zeros_like(peak)
        tile = 0.0
        for stream in streams:
            weights = stream.logits.sub_(peak).exp_()
            total += weights.sum(-1, keepdim=True)
            tile = tile + stream.apply(weights, stream.keys(sources[stream.source][1]))
        out[:, :, :, q_lo:q_hi] = tile / total.clamp(min=torch.finfo(total.dtype).tiny)
        lse[:, :, :, q_lo:q_hi] = (total.log() + peak).squeeze(-1)
    padded = _padded_rows(layout, seq_len, query.device)
    return out.masked_fill_(padded.unsqueeze(-1), 0.0), lse.masked_fill_(padded, -math.inf)


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: DGALayout, config: DGAConfig, scale: float) -> torch.Tensor:
    """The output of `attend_forward` without its log-sum-exp (inference): per query tile one fused
    `scaled_dot_product_attention` over [keys old for the tile | the tile's local window | the members of
    the blocks its queries expand (`_tile_union`)], the spec's rule and the aggregates' bias in an
    additive mask, so no [G, T, K] logits are materialised.

    The focal keys and the aggregates are merged into one stream sorted by block (`_old_stream`), so
    the keys old for a tile are a prefix of it. Key, value and mask buffers persist across tiles: a
    tile copies only the old entries it adds, its local window, its expanded blocks, and the mask
    columns of the blocks that are old for some of its queries but not all (the other old columns are
    the bias for every query, written once). The aggregates a query expands are hidden in its mask row
    for the tile and restored after it."""
    batch, heads, group, seq_len, dim = query.shape
    m, n = config.group_size, config.local_blocks
    num_blocks = math.ceil(seq_len / m)
    device, dtype = query.device, query.dtype
    rows = batch * heads
    # budgeted as if the [G, T, K] logits were materialised, as SDPA's math fallback does
    step = tile_blocks(layout, rows * group, config, num_blocks)
    old_block, old_key, old_value, old_bias, agg_column = _old_stream(layout, num_blocks)
    tile_rows = min(seq_len, step * m)
    # the members of the blocks a tile's queries expand: at most every block's
    expanded = 0 if layout.expanded is None else min(num_blocks, tile_rows * layout.expanded.shape[-1]) * m
    # a row stride of the mask that is a multiple of 16 elements spares the GPU's memory-efficient SDPA a
    # padded copy of the mask per tile; the last column is a spare no tile reads (expansion's sentinel)
    capacity = -(-(old_block.shape[-1] + min(seq_len, (n + step) * m) + expanded + 1) // 16) * 16
    key_buffer = key.new_empty(rows, 1, capacity, dim)
    value_buffer = value.new_empty(rows, 1, capacity, value.shape[-1])
    mask = query.new_empty(rows, 1, tile_rows, capacity)
    queries = query.reshape(rows, group, seq_len, dim)
    keys, values = key.reshape(rows, seq_len, dim), value.reshape(rows, seq_len, -1)  # once: may copy
    if layout.expanded is not None:
        key_blocks, value_blocks = _blocks(keys, m), _blocks(values, m)
        focal = layout.focal.flatten(0, 1)
    out = query.new_empty(rows, group, seq_len, value.shape[-1])
    copied = final = 0  # old entries in the buffers; old mask columns that are the bias for every query
    local_pattern = None
    for first in range(0, num_blocks, step):
        last = min(num_blocks, first + step) - 1
        q_lo, q_hi = first * m, min(seq_len, (last + 1) * m)
        visible = int(rule.is_old_block(old_block, last, n).sum(-1).max())
        if visible > copied:
            key_buffer[:, 0, copied:visible] = old_key[:, copied:visible]
            value_buffer[:, 0, copied:visible] = old_value[:, copied:visible]
            copied = visible
        if visible > final:
            q_block = rule.block_of(torch.arange(q_lo, q_hi, device=device), m).view(1, 1, -1, 1)
            mask[:, :, : q_hi - q_lo, final:visible] = additive_mask(
                ~rule.is_old_block(old_block[:, None, None, final:visible], q_block, n), dtype,
                old_bias[:, None, None, final:visible],
            )
            final = int(rule.is_old_block(old_block, first, n).sum(-1).min())
        w_lo = rule.first_local_position(first, m, n)
        end = visible + q_hi - w_lo
        key_buffer[:, 0, visible:end] = keys[:, w_lo:q_hi]
        value_buffer[:, 0, visible:end] = values[:, w_lo:q_hi]
        if local_pattern is None or local_pattern[0] != (q_lo - w_lo, q_hi - q_lo):
            local_pattern = ((q_lo - w_lo, q_hi - q_lo), _local_mask(q_lo, q_hi, w_lo, m, n, device, dtype))
        mask[:, 0, : q_hi - q_lo, visible:end] = local_pattern[1]
        tile_mask = mask[:, 0, : q_hi - q_lo]
        chosen = None
        if layout.expanded is not None and rule.old_block_count(last, n) > 0:
            chosen = layout.expanded[:, :, q_lo:q_hi].flatten(0, 1).contiguous()  # [rows, T, X]
            union, reads = _tile_union(chosen, num_blocks)
            chosen = chosen if union.shape[1] else None
        if chosen is not None:  # the union of the tile's expanded blocks joins its keys
            blocks = (key_blocks, value_blocks)
            end = _write_expanded_members((key_buffer, value_buffer, tile_mask), end, union, reads, blocks, focal, m, seq_len)
            # the aggregates each query expands are hidden in its mask row for this tile only
            columns = torch.where(chosen < num_blocks, agg_column.gather(1, chosen.clamp(max=num_blocks - 1).flatten(1)).view_as(chosen), capacity - 1)
            kept = tile_mask.gather(-1, columns)
            tile_mask.scatter_(-1, columns, -math.inf)
        out[:, :, q_lo:q_hi] = F.scaled_dot_product_attention(
            queries[:, :, q_lo:q_hi], key_buffer[:, :, :end], value_buffer[:, :, :end],
            attn_mask=mask[:, :, : q_hi - q_lo, :end], scale=scale, enable_gqa=True,
        )
        if chosen is not None:
            tile_mask.scatter_(-1, columns, kept)
    out = out.view(batch, heads, group, seq_len, -1)
    return out.masked_fill_(_padded_rows(layout, seq_len, device).unsqueeze(-1), 0.0)


def _write_expanded_members(buffers, end: int, union, reads, blocks, focal, group_size: int, seq_len: int) -> int:
    """Append the members of a tile's union of expanded blocks after column ``end`` of its key and value
    buffers [rows, 1, C, d] and mask rows [rows, T, C] (a query reads the non-focal members of its own
    blocks); ``blocks`` are the keys and values as whole blocks (`_blocks`). Returns the new end."""
    key_buffer, value_buffer, tile_mask = buffers
    rows, width = union.shape
    num_blocks = blocks[0].shape[0] // rows
    members = width * group_size
    index = (union.clamp(max=num_blocks - 1) + num_blocks * torch.arange(rows, device=union.device).view(-1, 1)).flatten()
    key_buffer[:, 0, end : end + members] = blocks[0].index_select(0, index).view(rows, members, -1)
    value_buffer[:, 0, end : end + members] = blocks[1].index_select(0, index).view(rows, members, -1)
    positions = (union[..., None] * group_size + torch.arange(group_size, device=union.device)).flatten(1)
    readable = (positions < seq_len) & ~focal.gather(1, positions.clamp(max=seq_len - 1))
    hidden = ~(reads.repeat_interleave(group_size, -1) & readable[:, None])
    tile_mask[:, :, end : end + members] = additive_mask(hidden, tile_mask.dtype)
    return end + members


def _tile_union(chosen: torch.Tensor, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocks a tile's queries expand, as one set per row (batch row x kv head), so that they join the
    tile's shared keys (one SDPA, keys read once per tile: on the CPU, memory traffic, not arithmetic,
    bounds this step, and per-query copies of X blocks cost far more than the logits of a union).
    chosen [rows, T, X] (sentinel nb) -> (the union's block indices [rows, U] (sentinel nb), and which
    query reads which of them [rows, T, U] bool)."""
    rows = chosen.shape[0]
    ordered = chosen.flatten(1).sort(-1).values
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    first &= ordered < num_blocks
    width = int(first.sum(-1).max())
    slot = torch.where(first, first.cumsum(-1) - 1, width)
    union = torch.full((rows, width + 1), num_blocks, dtype=chosen.dtype, device=chosen.device)
    union = union.scatter_(1, slot, ordered)[:, :width].contiguous()
    place = torch.searchsorted(union, chosen.flatten(1)).view_as(chosen).clamp(max=width)
    place = torch.where(chosen < num_blocks, place, width)
    reads = torch.zeros(*chosen.shape[:2], width + 1, dtype=torch.bool, device=chosen.device)
    return union, reads.scatter_(-1, place, True)[..., :width]


def _blocks(rows: torch.Tensor, group_size: int) -> torch.Tensor:
    """[R, L, d] -> [R * nb, m * d]: whole blocks as rows (one index_select fetches a block), the last block
    zero-padded (a view when L is a multiple of m)."""
    missing = -rows.shape[1] % group_size
    if missing:
        rows = F.pad(rows, (0, 0, 0, missing))
    return rows.reshape(-1, group_size * rows.shape[-1])


def _old_stream(layout: DGALayout, num_blocks: int) -> tuple[torch.Tensor, ...]:
    """Focal keys and aggregates of each kv head merged into one stream sorted by block (the focal keys
    and the aggregate of one block are visible to the same queries), flattened over batch and heads:
    block [BH, F+nb], key, value, additive bias (0 for focal keys, the aggregate's bias) and the column
    of each block's aggregate in the stream [BH, nb]."""
    batch, heads, slots = layout.focal_pos.shape
    device = layout.focal_pos.device
    agg_block = torch.arange(num_blocks, device=device).expand(batch, heads, num_blocks)
    block = torch.cat([layout.focal_block, agg_block], dim=-1)
    order = block.argsort(dim=-1, stable=True)

    def merged(focal: torch.Tensor, agg: torch.Tensor) -> torch.Tensor:
        both = torch.cat([focal, agg], dim=2)
        return both.gather(2, order[..., None].expand(*order.shape, both.shape[-1])).flatten(0, 1)

    bias = torch.cat([torch.zeros_like(layout.agg_bias[..., :1]).expand(batch, heads, slots), layout.agg_bias], dim=-1)
    return (
        block.gather(-1, order).flatten(0, 1),
        merged(layout.focal_key, layout.agg_key),
        merged(layout.focal_value, layout.agg_value),
        bias.gather(-1, order).flatten(0, 1),
        order.argsort(dim=-1)[..., slots:].flatten(0, 1),
    )


def _local_mask(q_lo: int, q_hi: int, w_lo: int, m: int, n: int, device, dtype) -> torch.Tensor:
    """[T, W] additive mask of queries q_lo..q_hi-1 over raw keys w_lo..q_hi-1: causal, and within the
    query's own block and the n-1 before."""
    q_pos = torch.arange(q_lo, q_hi, device=device)[:, None]
    w_pos = torch.arange(w_lo, q_hi, device=device)[None, :]
    return additive_mask(~rule.reads_raw(w_pos, q_pos, m, n), dtype)


def attend_backward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: DGALayout,
    config: DGAConfig,
    scale: float,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """Gradients of `attend_forward`'s output with respect to query, key, value, layout.focal_key,
    layout.focal_value, layout.agg_key and layout.agg_value, one tile at a time from the saved ``lse``
    (dS = P * (dP - rowsum(dO * O)), as in FlashAttention-2). GQA: a kv head's gradient sums its G query
    heads. Rows with lse = -inf (padding) contribute nothing."""
    grad_out = grad_out.to(query.dtype)
    sources = _sources(key, value, layout)
    grads = {name: (torch.zeros_like(k), torch.zeros_like(v)) for name, (k, v) in sources.items()}
    grad_query = torch.zeros_like(query)
    # exp(logit - inf) = 0 for the rows that attend nothing
    lse = torch.where(torch.isfinite(lse), lse, math.inf).unsqueeze(-1)
    row_dot = (grad_out * out).sum(-1, keepdim=True)  # D = rowsum(dO * O)
    for q_lo, q_hi, streams in _tiles(query, key, layout, config, scale):
        q_tile, d_out = query[:, :, :, q_lo:q_hi], grad_out[:, :, :, q_lo:q_hi]
        for stream in streams:
            keys, values = (stream.keys(x) for x in sources[stream.source])
            grad_keys, grad_values = grads[stream.source]
            probs = stream.logits.sub_(lse[:, :, :, q_lo:q_hi]).exp_()
            stream.add_to(grad_values, stream.apply_transposed(probs, d_out))
            d_probs = stream.apply(d_out, values.transpose(-1, -2))  # dP = dO V^T
            grad_logits = probs.mul_(d_probs - row_dot[:, :, :, q_lo:q_hi]).mul_(scale)
            grad_query[:, :, :, q_lo:q_hi] += stream.apply(grad_logits, keys)
            stream.add_to(grad_keys, stream.apply_transposed(grad_logits, q_tile))
    return (grad_query, *grads["local"], *grads["focal"], *grads["agg"])
