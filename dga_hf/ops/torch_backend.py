"""PyTorch backend of DGA stage 5 (CPU and GPU): one softmax per query over three key streams.

Queries are processed in tiles of whole blocks; a tile reads the focal keys and aggregates of the blocks
that are old for its last query (a prefix of each, since both are sorted by position), and the raw keys
of its own blocks plus the ``local_blocks - 1`` before. Masks are rebuilt from positions per tile, so
memory is bounded by the tile budget, never L x L, in the forward and in the backward: the backward
(`attend_backward`) recomputes each tile's logits from the saved log-sum-exp, as FlashAttention does.

Two forwards compute the same function: `attend_forward` (output and log-sum-exp, for training)
materialises each tile's logits per stream; `attend` (inference) hands each tile to PyTorch's fused
attention with the rule as an additive mask, which on the CPU is about twice as fast (8K, SmolLM2-135M's
attention shape, shipped preset: 395 ms against 750 ms per layer, 2 threads). With query-aware expansion
(docs/spec.md step 6) inference runs the members of the expanded blocks as a second stream in tiles of their
own, merged by log-sum-exp (`_add_expanded`); docs/results.md, "CPU operator vs SDPA (issue 14)", has what
that costs against dense SDPA and why.
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
# Query blocks per tile of the expanded stream (`_add_expanded`): the union of the blocks a tile's queries
# expand, hence its work, grows with the tile.
EXPANDED_TILE_BLOCKS = 4
# Query tiles of the expanded stream whose unions are computed and sorted by size at once.
EXPANDED_CHUNK_TILES = 64
# Logits of the expanded stream per fused call (tiles of similar union size): 2**24 fp32 is 64 MiB.
EXPANDED_CALL_SCORES = 2**24
# Tiles whose unions differ by at most this factor share a fused call (padded to the largest).
SIMILAR_WIDTH = 1.15
# A tile of the expanded stream whose unions cover at least this share of its old blocks reads all of them in
# place: computing the rest costs less than copying the union (on random inputs nearly every tile's union
# covers most old blocks).
IN_PLACE_UNION_SHARE = 0.8


def additive_mask(hidden: torch.Tensor, dtype: torch.dtype, bias: torch.Tensor | None = None) -> torch.Tensor:
    """An SDPA mask in ``dtype``: -inf where ``hidden``, else 0 (or ``bias``, broadcast)."""
    visible = torch.zeros((), dtype=dtype, device=hidden.device) if bias is None else bias.to(dtype)
    return torch.where(hidden, -math.inf, visible)


def tile_blocks(layout: DGALayout, heads_total: int, config: DGAConfig, num_blocks: int, expanded_keys: int) -> int:
    """Blocks per query tile: an eighth of the local window (a tile of T queries computes T x (T + n*m)
    local logits, so larger tiles waste work on the local stream; measured on CPU at 8K with
    local_blocks=128, tiles of n/8 blocks ran 2.7x faster than tiles of n), at least MIN_TILE_QUERIES
    queries, and within the logits budget, which counts ``expanded_keys`` more keys per query (the members of
    the blocks a query expands, where the tile reads them)."""
    m, n = config.group_size, config.local_blocks
    wanted = max(-(-n // 8), -(-MIN_TILE_QUERIES // m))
    keys_per_query = layout.focal_pos.shape[-1] + num_blocks + (n + wanted) * m + expanded_keys
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
    # the expanded stream's logits are [G, T, X * m]; budgeted as every block's members
    step = tile_blocks(layout, batch * heads * group, config, num_blocks, 0 if layout.expanded is None else num_blocks * m)
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
    """The output of `attend_forward` without its log-sum-exp (inference), in two streams.

    The shared stream (`_attend_shared`): per query tile one fused scaled-dot-product attention over [keys old
    for the tile | the tile's local window], the spec's rule, the aggregates' bias and the aggregates each query
    expands hidden in an additive mask, so no [G, T, K] logits are materialised. With expansion (docs/spec.md
    step 6) the expanded stream (`_add_expanded`) reads the members of the blocks each query expands, in tiles
    of EXPANDED_TILE_BLOCKS query blocks, and is merged into the shared stream's result by log-sum-exp."""
    batch, heads, group, seq_len, dim = query.shape
    rows = batch * heads
    queries = query.reshape(rows, group, seq_len, dim)
    keys, values = key.reshape(rows, seq_len, dim), value.reshape(rows, seq_len, -1)  # once: may copy
    expanded = None
    if layout.expanded is not None and layout.expanded.shape[-1] > 0:
        expanded = layout.expanded.flatten(0, 1)  # [rows, L, X]
    out, lse = _attend_shared(queries, keys, values, layout, config, scale, expanded)
    if expanded is not None:
        _add_expanded(out, lse, queries, keys, values, expanded, layout.focal.flatten(0, 1), config, scale)
    out = out.view(batch, heads, group, seq_len, -1)
    return out.masked_fill_(_padded_rows(layout, seq_len, query.device).unsqueeze(-1), 0.0)


def _attend_shared(queries, keys, values, layout: DGALayout, config: DGAConfig, scale: float, expanded):
    """The focal keys and aggregates of old blocks and the local window, per query tile one fused attention:
    queries [R, G, L, d], keys/values [R, L, d] (R = batch rows x kv heads) -> out [R, G, L, dv] and, when
    ``expanded`` ([R, L, X], each query's expanded blocks) is given, the log-sum-exp [R, G, L] (else None),
    the aggregates each query expands left out.

    The focal keys and the aggregates are merged into one stream sorted by block (`_old_stream`), so
    the keys old for a tile are a prefix of it. Key, value and mask buffers persist across tiles, laid out as
    [the local window, right-aligned in LOCAL columns | the old stream]: a tile copies only the old entries it
    adds, its local window, and the mask columns of the blocks that are old for some of its queries but not
    all (the other old columns are the bias for every query, written once). The aggregates a query expands are
    hidden in its mask row for the tile and restored after it.

    Rows whose old prefixes differ in length (each kv head has its own focal tokens; on SmolLM2-135M at 32K one
    head's lie mostly in the first half, another's in the last) go through separate calls, so that no row
    computes the masked tail of another's prefix (`_similar_widths` groups rows of similar length)."""
    rows, group, seq_len, dim = queries.shape
    m, n = config.group_size, config.local_blocks
    num_blocks = math.ceil(seq_len / m)
    device, dtype = queries.device, queries.dtype
    # budgeted as if the [G, T, K] logits were materialised, as SDPA's math fallback does
    step = tile_blocks(layout, rows * group, config, num_blocks, 0)  # the expanded members are another stream's
    old_block, old_key, old_value, old_bias, agg_column = _old_stream(layout, num_blocks)
    tile_rows = min(seq_len, step * m)
    local = min(seq_len, (n + step) * m)  # the longest local window of a tile
    # a row stride of the mask that is a multiple of 16 elements spares the GPU's memory-efficient SDPA a
    # padded copy of the mask per tile; the last column is a spare no tile reads (expansion's sentinel)
    capacity = -(-(local + old_block.shape[-1] + 1) // 16) * 16
    key_buffer = keys.new_empty(rows, 1, capacity, dim)
    value_buffer = values.new_empty(rows, 1, capacity, values.shape[-1])
    mask = queries.new_empty(rows, 1, tile_rows, capacity)
    out = queries.new_empty(rows, group, seq_len, values.shape[-1])
    lse = None if expanded is None else queries.new_empty(rows, group, seq_len)
    copied = final = 0  # old entries in the buffers; old mask columns that are the bias for every query
    local_pattern = None
    for first in range(0, num_blocks, step):
        last = min(num_blocks, first + step) - 1
        q_lo, q_hi = first * m, min(seq_len, (last + 1) * m)
        counts = rule.is_old_block(old_block, last, n).sum(-1)  # old entries of each row for the tile
        visible = int(counts.max())
        if visible > copied:
            key_buffer[:, 0, local + copied : local + visible] = old_key[:, copied:visible]
            value_buffer[:, 0, local + copied : local + visible] = old_value[:, copied:visible]
            copied = visible
        if visible > final:
            q_block = rule.block_of(torch.arange(q_lo, q_hi, device=device), m).view(1, 1, -1, 1)
            mask[:, :, : q_hi - q_lo, local + final : local + visible] = additive_mask(
                ~rule.is_old_block(old_block[:, None, None, final:visible], q_block, n), dtype,
                old_bias[:, None, None, final:visible],
            )
            final = int(rule.is_old_block(old_block, first, n).sum(-1).min())
        w_lo = rule.first_local_position(first, m, n)
        begin = local - (q_hi - w_lo)
        key_buffer[:, 0, begin:local] = keys[:, w_lo:q_hi]
        value_buffer[:, 0, begin:local] = values[:, w_lo:q_hi]
        if local_pattern is None or local_pattern[0] != (q_lo - w_lo, q_hi - q_lo):
            local_pattern = ((q_lo - w_lo, q_hi - q_lo), _local_mask(q_lo, q_hi, w_lo, m, n, device, dtype))
        mask[:, 0, : q_hi - q_lo, begin:local] = local_pattern[1]
        tile_mask = mask[:, 0, : q_hi - q_lo]
        hidden = None
        if expanded is not None and rule.old_block_count(last, n) > 0:
            # the aggregates each query expands are hidden in its mask row for this tile only
            chosen = expanded[:, q_lo:q_hi]
            column = local + agg_column.gather(1, chosen.clamp(max=num_blocks - 1).flatten(1)).view_as(chosen)
            hidden = torch.where(chosen < num_blocks, column, capacity - 1)
            kept = tile_mask.gather(-1, hidden)
            tile_mask.scatter_(-1, hidden, -math.inf)
        for row_lo, row_hi, longest in _similar_widths(counts.tolist(), rows * capacity):
            part = slice(row_lo, row_hi)
            part_out, part_lse = _fused_attention(
                queries[part, :, q_lo:q_hi], key_buffer[part, :, begin : local + longest],
                value_buffer[part, :, begin : local + longest], mask[part, :, : q_hi - q_lo, begin : local + longest],
                scale, with_lse=lse is not None,
            )
            out[part, :, q_lo:q_hi] = part_out
            if lse is not None:
                lse[part, :, q_lo:q_hi] = part_lse
        if hidden is not None:
            tile_mask.scatter_(-1, hidden, kept)
    return out, lse


def _fused_attention(query, key, value, mask, scale: float, with_lse: bool):
    """Attention of query [R, G, T, d] over key/value [R, 1, K, d] (shared by the G heads) with the additive
    mask [R, 1, T, K] -> (out [R, G, T, dv], log-sum-exp [R, G, T] or None). On the CPU both come from
    PyTorch's fused flash kernel where it applies (dv = d; its log-sum-exp of a row that sees no key is not
    -inf: callers mark such rows); elsewhere the log-sum-exp comes from materialised logits (the tile budgets
    bound them)."""
    if not with_lse:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=True), None
    group = query.shape[1]
    key, value = key.expand(-1, group, -1, -1), value.expand(-1, group, -1, -1)  # views: nothing is copied
    if query.device.type == "cpu" and value.shape[-1] == query.shape[-1]:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, False, attn_mask=mask, scale=scale)
    logits = torch.baddbmm(mask.expand(-1, group, -1, -1).flatten(0, 1), query.flatten(0, 1),
                           key.flatten(0, 1).transpose(-1, -2), alpha=scale)
    lse = logits.logsumexp(-1, keepdim=True)
    weights = (logits - torch.where(torch.isfinite(lse), lse, 0.0)).exp_()
    out = weights @ value.flatten(0, 1)
    return out.view(*query.shape[:-1], -1), lse.view(query.shape[:-1])


def _add_expanded(out, lse, queries, keys, values, expanded, focal, config: DGAConfig, scale: float) -> None:
    """Merge the expanded stream (docs/spec.md step 6) into ``out`` [R, G, L, dv] with log-sum-exp ``lse``
    [R, G, L] (the shared stream's, updated in place): each query reads the non-focal members of its
    expanded blocks (``expanded`` [R, L, X], sentinel nb; ``focal`` [R, L] bool).

    Tiles of EXPANDED_TILE_BLOCKS query blocks: a tile's keys are the union of the blocks its queries expand
    (`_tile_union`), each query masked to its own. The union grows with the tile (on SmolLM2-135M at 8K, 1.9x
    the blocks one query expands for 16 queries, 2.7x for 128), so these tiles are smaller than the shared
    stream's. The tiles (of every batch row and kv head) of EXPANDED_CHUNK_TILES query tiles at a time are
    sorted by the size of their union and go through the fused attention in groups of similar size
    (`_similar_widths`), each group's unions padded to its longest."""
    rows, group, seq_len, dim = queries.shape
    m, n = config.group_size, config.local_blocks
    num_blocks = math.ceil(seq_len / m)
    tile = EXPANDED_TILE_BLOCKS * m
    key_blocks, value_blocks = _blocks(keys, m), _blocks(values, m)  # [R * nb, m * d]
    first = rule.first_block_seeing_as_old(0, n) * m  # earlier queries have no old block
    blocks = torch.arange(m, device=queries.device)
    for lo in range(first, seq_len, EXPANDED_CHUNK_TILES * tile):
        hi = min(seq_len, lo + EXPANDED_CHUNK_TILES * tile)
        tiles = -(-(hi - lo) // tile)
        missing = tiles * tile - (hi - lo)  # the last tile's queries past the sequence: no choice, no query
        chosen = F.pad(expanded[:, lo:hi], (0, 0, 0, missing), value=num_blocks).view(rows * tiles, tile, -1)
        union, reads = _tile_union(chosen, num_blocks)  # [R * tiles, U], [R * tiles, tile, U]
        if union.shape[1] == 0:
            continue
        owner = torch.arange(rows, device=queries.device).repeat_interleave(tiles)  # batch row x kv head of a tile
        tile_queries = F.pad(queries[:, :, lo:hi], (0, 0, 0, missing)).view(rows, group, tiles, tile, dim)
        tile_queries = tile_queries.transpose(1, 2).reshape(rows * tiles, group, tile, dim)
        chunk_out = queries.new_zeros(rows * tiles, group, tile, values.shape[-1])
        chunk_lse = queries.new_full((rows * tiles, group, tile), -math.inf)
        widths = (union < num_blocks).sum(-1)
        # a tile whose unions (over its rows) cover most of its old blocks reads all of them, in place
        last = (torch.arange(1, tiles + 1, device=queries.device) * tile + lo).clamp(max=hi) - 1  # each tile's last query
        old = rule.old_block_count(rule.block_of(last, m), n)
        in_place = widths.view(rows, tiles).sum(0) >= IN_PLACE_UNION_SHARE * rows * old
        for index in in_place.nonzero().flatten().tolist():
            entries = torch.arange(rows, device=queries.device) * tiles + index
            _expanded_in_place(chunk_out, chunk_lse, entries, tile_queries[entries], keys, values, chosen[entries],
                               focal, int(old[index]), m, scale)
        gathered = ~in_place.repeat(rows)
        order = widths.masked_fill(~gathered, -1).argsort()[int((~gathered).sum()) :]
        budget = max(1, EXPANDED_CALL_SCORES // (group * tile * m))  # union blocks of one call, all tiles
        for begin, stop, width in _similar_widths(widths[order].tolist(), budget):
            if width == 0:
                continue
            picked = order[begin:stop]
            part = union[picked, :width]
            index = (part.clamp(max=num_blocks - 1) + num_blocks * owner[picked, None]).flatten()
            part_keys = key_blocks.index_select(0, index).view(len(picked), 1, width * m, dim)
            part_values = value_blocks.index_select(0, index).view(len(picked), 1, width * m, -1)
            positions = part[..., None] * m + blocks  # [n, U, m]
            readable = (positions < seq_len) & ~focal[owner[picked, None, None], positions.clamp(max=seq_len - 1)]
            part_reads = reads[picked, :, :width]
            # a sum of broadcast biases: on the CPU many times faster than a `where` of the same shape
            mask = additive_mask(~part_reads, queries.dtype)[..., None] + additive_mask(~readable, queries.dtype)[:, None]
            part_out, part_lse = _fused_attention(tile_queries[picked], part_keys, part_values,
                                                  mask.view(len(picked), 1, tile, width * m), scale, with_lse=True)
            reads_any = (part_reads & readable.any(-1)[:, None]).any(-1)  # [n, tile]
            chunk_out[picked] = part_out
            chunk_lse[picked] = torch.where(reads_any[:, None], part_lse, -math.inf)
        chunk_out = chunk_out.view(rows, tiles, group, tile, -1).transpose(1, 2).reshape(rows, group, tiles * tile, -1)
        chunk_lse = chunk_lse.view(rows, tiles, group, tile).transpose(1, 2).reshape(rows, group, tiles * tile)
        _merge(out[:, :, lo:hi], lse[:, :, lo:hi], chunk_out[:, :, : hi - lo], chunk_lse[:, :, : hi - lo])


def _expanded_in_place(out, lse, entries, queries, keys, values, chosen, focal, old: int, group_size: int,
                       scale: float) -> None:
    """The expanded stream of one tile over all its old blocks, read in place (no copy of the members): for the
    tile's ``entries`` (one per batch row x kv head, in row order) of ``out`` / ``lse`` [E, G, T, dv] / [E, G, T],
    queries [R, G, T, d], their choices ``chosen`` [R, T, X] among blocks 0..old-1 (sentinel nb)."""
    members = old * group_size
    reads = expanded_mask(chosen, old)  # [R, T, old]
    readable = ~focal[:, :members].view(-1, old, group_size)
    mask = additive_mask(~reads, queries.dtype)[..., None] + additive_mask(~readable, queries.dtype)[:, None]
    part_out, part_lse = _fused_attention(queries, keys[:, None, :members], values[:, None, :members],
                                          mask.view(len(entries), 1, chosen.shape[1], members), scale, with_lse=True)
    reads_any = (reads & readable.any(-1)[:, None]).any(-1)  # [R, T]
    out[entries] = part_out
    lse[entries] = torch.where(reads_any[:, None], part_lse, -math.inf)


def _similar_widths(widths: list[int], budget: int) -> list[tuple[int, int, int]]:
    """Runs of consecutive entries of ``widths``: (begin, end, the run's widest), each run's widest at most
    SIMILAR_WIDTH times its narrowest (plus one) and at most ``budget`` in width x entries (sorted widths give
    the fewest runs)."""
    runs = []
    begin = 0
    low = high = widths[0] if widths else 0
    for index, width in enumerate(widths):
        low, high = min(low, width), max(high, width)
        if index > begin and (high > SIMILAR_WIDTH * low + 1 or high * (index + 1 - begin) > budget):
            runs.append((begin, index, max(widths[begin:index])))
            begin, low, high = index, width, width
    if widths:
        runs.append((begin, len(widths), max(widths[begin:])))
    return runs


def _merge(out, lse, other_out, other_lse) -> None:
    """out, lse (in place) <- the softmax over both key sets of two partial results normalised over their own
    keys (out [..., T, dv], lse [..., T]); other_lse is -inf where the other set is empty."""
    total = torch.logaddexp(lse, other_lse)
    out.mul_((lse - total).exp_().unsqueeze(-1)).add_(other_out * (other_lse - total).exp_().unsqueeze(-1))
    lse.copy_(total)


def _tile_union(chosen: torch.Tensor, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocks a tile's queries expand, as one set per tile, so that the tile reads each block's keys once.
    chosen [R, T, X] (sentinel nb) -> (the union's block indices [R, U] (sentinel nb), and which query reads
    which of them [R, T, U] bool)."""
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
