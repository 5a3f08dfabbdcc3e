"""The tensors every decode state holds (docs/decoding.md), and their mechanics: growth, capacity, row
selection, bytes, the raw keys of a step and the packed workspace of the one-token PyTorch step. What
keep_full and compact store differently lives in their storage policies (`storage.py`).

Shapes: B rows, H kv heads, d head dim, each row in compacted coordinates (its real tokens at 0..t-1).
  focal_k/v [B, H, Fcap, d], focal_pos [B, H, Fcap] (ascending; SENTINEL = unused slot), focal_cnt [B, H],
    focal_hi = the slots in use by the fullest row
  ring_k/v [B, H, R, d], ring_pos [B, R] (-1 = empty), ring_focal [B, H, R]: the local window's ring, slot =
    position % R; R = `ring_size` of the longest row, at most the window W = n * m
  agg_k/v [B, H, NBcap, d] (block c at index c; complete blocks only), agg_lse [B, H, NBcap] (log normaliser,
    -inf for an empty block), agg_cnt [B, H, NBcap] (members), agg_bias [B, H, NBcap] (stage 5's logit bias)
  score_k [B, H, NBcap, 2, d]: the blocks' principal ends, what expansion scores them by with
    expand_score="principal" (docs/spec.md step 6); held only then (keep_full, E > 0), else None. Grown,
    written and selected with agg_k, from the same `aggregate_blocks` call
Every capacity follows the sequence, never the settings alone (docs/decoding.md, "Memory and cost"): the
prefill sizes buffers for the prompt plus `PrefillCapacity`'s spare, and they grow geometrically (GROWTH,
GROWTH_STEP; rings by powers of two up to their period: `ring_size`); unused slots are masked by position,
never read.

The packed workspace. A one-token PyTorch step runs one SDPA over focal, aggregate and ring keys (then the
expanded blocks' tokens): `packed()` makes focal_k, agg_k and ring_k views of one tensor ws_k [B, H, N, d]
(focal_v, agg_v, ring_v of ws_v), followed by `tail` rows (up to E * m, as many as the old blocks need)
that the step fills with the expanded blocks. Aliasing rule: an in-place write to one of those six buffers
(a new token in the ring, a closed block's aggregate, a dense row's new focal token) lands in the
workspace; assigning a new tensor to one (growth, a refresh, a fold, a chunk's ring, row selection) leaves
the workspace stale, and `packed()` notices it (each buffer must still *be* the view it handed out: an
`is` check) and packs again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import rule
from ..ops.layout import aggregate_bias, block_score_keys

PACKED = ("focal_k", "agg_k", "ring_k", "focal_v", "agg_v", "ring_v")
SENTINEL = 2**62  # position of an unused focal slot: its block is never old
GROWTH = 1.25  # buffers grow geometrically (x1.25 + a fixed step), never by one token
GROWTH_STEP = 64
PREFILL_SPARE = 256  # the most decoded tokens the buffers sized at prefill take before growing


@dataclass(frozen=True)
class PrefillCapacity:
    """What the buffers sized at prefill hold before they grow: a prompt of `length` tokens and room for as
    many decoded tokens again, at most PREFILL_SPARE (a short prompt gets a short spare)."""

    tokens: int
    blocks: int

    @classmethod
    def of(cls, length: int, group_size: int) -> PrefillCapacity:
        tokens = length + min(PREFILL_SPARE, length)
        return cls(tokens, block_slots(tokens, group_size))


def block_slots(length: int, group_size: int) -> int:
    """Block-indexed slots (aggregates, q_bar) for rows of up to `length` tokens: one per block
    begun, and one more."""
    return -(-length // group_size) + 1


def grown_size(capacity: int, needed: int, exact: bool = False, multiple: int = 1) -> int:
    """The capacity after growing from `capacity` to hold `needed` entries: geometric unless `exact`, rounded
    up to `multiple` once it reaches one (a capacity below `multiple` holds no whole item yet)."""
    size = needed if exact else max(needed, int(capacity * GROWTH) + GROWTH_STEP)
    return -(-size // multiple) * multiple if size >= multiple else size


def ring_size(entries: int, period: int) -> int:
    """Slots of a ring of `period` (slot = entry % slots) that holds entries 0..entries-1: the period once
    the entries reach it, else the power of two >= entries. Below the period every entry sits at its own
    index (entry % slots = entry), so growing keeps every slot where it is, and the ring never exceeds what
    the sequence holds (a window of 10**6 blocks costs nothing on a short row). Powers of two keep the
    sizes the Triton decode kernel is compiled for (its ring length is a constexpr) to a few."""
    return period if entries >= period else min(period, 1 << max(entries - 1, 0).bit_length())


def grow(
    x: torch.Tensor, dim: int, needed: int, fill: float | int | bool = 0, exact: bool = False, multiple: int = 1
) -> torch.Tensor:
    """x with room for `needed` entries along `dim` (`grown_size`), the new entries `fill`."""
    capacity = x.shape[dim]
    if needed <= capacity:
        return x
    size = grown_size(capacity, needed, exact, multiple)
    shape = list(x.shape)
    shape[dim] = size
    y = x.new_full(shape, fill)
    y.narrow(dim, 0, capacity).copy_(x)
    return y


def gather_rows(x: torch.Tensor, index: torch.Tensor, rows_per_item: int = 1) -> torch.Tensor:
    """x [B, H, N, d], index [B, H, K] (or [B, 1, K]) -> x[b, h, index[b, h, k]] as [B, H, K, d].
    With rows_per_item = m (N a multiple of m), index holds block numbers and each item is the block's m
    rows: [B, H, K*m, d]. One index_select of whole rows: a gather along dim 2 with an index expanded over
    d is several times slower on the CPU."""
    batch, heads, length, dim = x.shape
    base = torch.arange(batch * heads, device=x.device).view(batch, heads, 1) * (length // rows_per_item)
    flat = (index.expand(batch, heads, index.shape[-1]) + base).flatten()
    return take_items(x, flat, rows_per_item).view(batch, heads, -1, dim)


def take_items(x: torch.Tensor, flat: torch.Tensor, rows_per_item: int) -> torch.Tensor:
    """x [B, H, N, d] seen as B*H*N/rows_per_item items of rows_per_item rows -> items `flat`, [K, rows, d]."""
    return x.reshape(-1, rows_per_item * x.shape[-1]).index_select(0, flat).view(-1, rows_per_item, x.shape[-1])


def block_bias(lse: torch.Tensor, count: torch.Tensor, group_bias: str) -> torch.Tensor:
    """The stage-5 bias of aggregates (`aggregate_bias`), also -inf where the log normaliser is not finite."""
    return aggregate_bias(count, group_bias).masked_fill(~torch.isfinite(lse), -math.inf)


def focal_spare(dense_rows: list[bool], slots: int) -> int:
    """Spare focal slots past a selection of `slots`: rows still dense add every new token to F (room for
    as many again, at most GROWTH_STEP)."""
    return min(GROWTH_STEP, max(slots, 1)) if any(dense_rows) else 0


def focal_buffer(positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor, spare: int):
    """A focal buffer: `positions` [B, H, K] ascending (SENTINEL past a row's count), their keys and values
    gathered from rows `index` [B, H, K] of keys/values, with room for `spare` more slots."""
    size = positions.shape[-1] + spare
    return (grow(positions, 2, size, SENTINEL, exact=True), grow(gather_rows(keys, index), 2, size, exact=True),
            grow(gather_rows(values, index), 2, size, exact=True))


@dataclass
class RawKeys:
    """The raw tokens a step reads: the ring, and for a chunk its tokens after it (`raw_index`)."""

    keys: torch.Tensor  # [B, H, R (+ q), d]
    values: torch.Tensor
    positions: torch.Tensor  # [B, R (+ q)], -1 = empty slot or padded token
    focal: torch.Tensor  # [B, H, R (+ q)] bool


def raw_index(pos: torch.Tensor, start: torch.Tensor, slots: int, chunk: bool) -> torch.Tensor:
    """Index in a step's `RawKeys` of `pos` (compacted positions of the rows whose first new position is
    `start`, broadcastable): the ring of `slots` (slot = pos % slots), then, for a chunk, its tokens."""
    if not chunk:
        return pos % slots
    return torch.where(pos >= start, slots + pos - start, pos % slots)


class Rows:
    """Host bookkeeping of the batch rows: `lengths` (real tokens per row) and `dense` (rows still dense:
    an all-focal layer, or shorter than min_seq_len) drive the control flow. Their device copies are
    cached and rebuilt only when a list is replaced, so that a step without padding copies nothing from
    the host (on a GPU such copies would serialise the stream)."""

    def __init__(self, lengths: list[int], dense: list[bool]):
        self.lengths = lengths
        self.dense = dense
        self._on_device: tuple | None = None  # (lengths, dense, their device copies)

    def on_device(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._on_device
        if cached is None or cached[0] is not self.lengths or cached[1] is not self.dense:
            cached = (self.lengths, self.dense, torch.tensor(self.lengths, device=device),
                      torch.tensor(self.dense, device=device))
            self._on_device = cached
        return cached[2], cached[3]

    def advance(self, lengths: list[int], on_device: torch.Tensor | None) -> None:
        """The rows after a step; `on_device`, the new lengths' device copy if the caller has it."""
        if on_device is not None and self._on_device is not None:
            self._on_device = (lengths, self.dense, on_device, self._on_device[3])
        self.lengths = lengths

    def select(self, rows: list[int]) -> None:
        self.lengths = [self.lengths[r] for r in rows]
        self.dense = [self.dense[r] for r in rows]


@dataclass
class NewTokens:
    """One step's new tokens in compacted coordinates (each row's real new tokens first) and the rows
    around them."""

    query: torch.Tensor  # [B, H, G, q, d]
    key: torch.Tensor  # [B, H, q, d]
    value: torch.Tensor  # [B, H, q, dv]
    order: torch.Tensor | None  # the compaction's permutation; None when every new token is real
    counts: list[int]  # real new tokens per row
    old: list[int]  # row lengths before the step
    new: list[int]  # row lengths after it
    start: torch.Tensor  # [B] `old` on the device
    dense: torch.Tensor  # [B] bool, rows still dense, on the device
    positions: torch.Tensor  # [B, q] position of each new token
    valid: torch.Tensor  # [B, q] bool, real new tokens
    all_valid: bool  # every new token is real
    uniform: bool  # every new token real and every row at the same length: writes are plain slices

    @property
    def size(self) -> int:
        return self.key.shape[2]

    @property
    def joins_focal(self) -> torch.Tensor:
        """[B, q] bool: the new tokens that join F (real tokens of rows still dense)."""
        return self.valid & self.dense[:, None]


def nbytes(tensors) -> int:
    """Bytes of the storages behind `tensors` (allocated capacity; views of one storage counted once)."""
    storages = {}
    for tensor in tensors:
        if tensor is not None:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


class DecodeBuffers:
    """The focal buffer, the local ring and the block aggregates of one layer (shapes and the packed
    workspace's aliasing rule: the module docstring). Built from the prefill's selection (`Prefill`) and
    the prompt's complete blocks (`PrefillBlocks`)."""

    SELECTED = ("focal_k", "focal_v", "focal_pos", "focal_cnt", "ring_k", "ring_v", "ring_pos", "ring_focal",
                "agg_k", "agg_v", "agg_bias", "agg_lse", "agg_cnt", "score_k")

    def __init__(self, prefill, blocks, dense_rows: list[bool], window: int, group_bias: str,
                 capacity: PrefillCapacity):
        key, value, focal = prefill.key, prefill.value, prefill.focal
        seq_len = focal.shape[-1]
        self.window = window
        self.group_bias = group_bias
        count = focal.sum(-1)
        slots = int(count.max()) if count.numel() else 0
        positions = torch.arange(seq_len, device=focal.device)
        focal_pos = torch.where(focal, positions, SENTINEL).sort(dim=-1).values[..., :slots]
        index = focal_pos.clamp(max=max(seq_len - 1, 0))
        spare = focal_spare(dense_rows, slots)
        self.focal_pos, self.focal_k, self.focal_v = focal_buffer(focal_pos, key, value, index, spare)
        self.focal_cnt = count
        self.focal_hi = slots
        self.ring_pos = rule.ring_positions(prefill.lengths, ring_size(seq_len, window))
        self.ring_k, self.ring_v, self.ring_focal = _ring_rows(self.ring_pos, self.ring_pos.clamp(min=0), key, value, focal)
        self.agg_k = grow(blocks.agg_key.to(key.dtype), 2, capacity.blocks, exact=True)
        self.agg_v = grow(blocks.agg_value.to(value.dtype), 2, capacity.blocks, exact=True)
        self.agg_lse = grow(blocks.lse, 2, capacity.blocks, -math.inf, exact=True)
        self.agg_cnt = grow(blocks.count, 2, capacity.blocks, exact=True)
        self.agg_bias = block_bias(self.agg_lse, self.agg_cnt, group_bias)
        self.score_k = None
        if blocks.score_key is not None:
            self.score_k = grow(blocks.score_key.to(key.dtype), 2, capacity.blocks, exact=True)
        self.ws_k = self.ws_v = None  # the packed workspace, built by the first one-token PyTorch step
        self.tail = 0
        self._packed: tuple | None = None

    def held(self) -> list[torch.Tensor | None]:
        return [*(getattr(self, name) for name in self.SELECTED), self.ws_k, self.ws_v]

    def select_rows(self, index: torch.Tensor) -> None:
        for name in self.SELECTED:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.index_select(0, index.to(value.device)))

    @property
    def ring_slots(self) -> int:
        """R, the ring's slots now (slot = position % R)."""
        return self.ring_pos.shape[1]

    def ensure_capacity(self, blocks: int, focal_slots: int | None, length: int) -> None:
        """Room for `blocks` aggregates, (while rows are dense: not None) `focal_slots` focal slots, and a
        ring for rows of up to `length` tokens (`ring_size`: below the window every position keeps its slot)."""
        for name, fill in (("agg_k", 0), ("agg_v", 0), ("agg_cnt", 0), ("agg_lse", -math.inf), ("agg_bias", -math.inf)):
            setattr(self, name, grow(getattr(self, name), 2, blocks, fill))
        if self.score_k is not None:
            self.score_k = grow(self.score_k, 2, blocks)
        slots = ring_size(length, self.window)
        if slots > self.ring_slots:
            self.ring_pos = grow(self.ring_pos, 1, slots, -1, exact=True)
            for name, fill in (("ring_k", 0), ("ring_v", 0), ("ring_focal", False)):
                setattr(self, name, grow(getattr(self, name), 2, slots, fill, exact=True))
        if focal_slots is not None:
            self.focal_k = grow(self.focal_k, 2, focal_slots)
            self.focal_v = grow(self.focal_v, 2, focal_slots)
            self.focal_pos = grow(self.focal_pos, 2, focal_slots, SENTINEL)

    def append_focal(self, tokens: NewTokens, dense_rows: list[bool]) -> torch.Tensor:
        """Rows still dense: their new tokens join F (slots after each row's count). Returns the slots
        written [B, H, q]."""
        batch, heads, q_len, _ = tokens.key.shape
        slot = self.focal_cnt[:, :, None] + torch.arange(q_len, device=tokens.key.device)  # [B, H, q]
        for buffer, new in ((self.focal_k, tokens.key), (self.focal_v, tokens.value)):
            buffer.scatter_(2, slot[..., None].expand(-1, -1, -1, new.shape[-1]), new.to(buffer.dtype))
        joined = tokens.joins_focal
        self.focal_pos.scatter_(2, slot, torch.where(joined, tokens.positions, SENTINEL)[:, None, :].expand(batch, heads, q_len))
        self.focal_cnt = self.focal_cnt + joined.sum(-1)[:, None]
        self.focal_hi += max(count for count, dense in zip(tokens.counts, dense_rows) if dense)
        return slot

    def replace_focal(self, positions, keys, values, index, count: torch.Tensor, spare: int) -> None:
        """F after a refresh (`focal_buffer`'s arguments; `count` [B, H] focal tokens per row)."""
        self.focal_pos, self.focal_k, self.focal_v = focal_buffer(positions, keys, values, index, spare)
        self.focal_cnt, self.focal_hi = count, positions.shape[-1]

    def raw_keys(self, tokens: NewTokens) -> RawKeys:
        """The raw tokens of the step: the ring with the new token written in (one token), else the ring
        followed by the chunk (`raw_index`)."""
        if tokens.size == 1:
            self._write_ring_token(tokens)
            return RawKeys(self.ring_k, self.ring_v, self.ring_pos, self.ring_focal)
        return RawKeys(
            torch.cat([self.ring_k, tokens.key.to(self.ring_k.dtype)], dim=2),
            torch.cat([self.ring_v, tokens.value.to(self.ring_v.dtype)], dim=2),
            torch.cat([self.ring_pos, torch.where(tokens.valid, tokens.positions, -1)], dim=1),
            torch.cat([self.ring_focal, tokens.joins_focal[:, None, :].expand(-1, self.ring_focal.shape[1], -1)], dim=2),
        )

    def _write_ring_token(self, tokens: NewTokens) -> None:
        """Each row's new token into ring slot position % R; a row whose new token is padding keeps its slot."""
        if tokens.uniform:  # every row at the same slot: plain slices
            at = tokens.old[0] % self.ring_slots
            by_row, by_head = (slice(None), at), (slice(None), slice(None), at)
        else:
            rows = torch.arange(tokens.key.shape[0], device=tokens.key.device)
            slot = tokens.positions[:, 0] % self.ring_slots
            by_row, by_head = (rows, slot), (rows, slice(None), slot)
        keep = tokens.valid[:, 0]
        joins_focal = tokens.joins_focal[:, 0, None].expand(-1, self.ring_focal.shape[1])  # [B, H]
        for buffer, index, new in ((self.ring_pos, by_row, tokens.positions[:, 0]), (self.ring_k, by_head, tokens.key[:, :, 0]),
                                   (self.ring_v, by_head, tokens.value[:, :, 0]), (self.ring_focal, by_head, joins_focal)):
            new = new.to(buffer.dtype)
            if not tokens.all_valid:
                new = torch.where(keep.view(-1, *[1] * (new.dim() - 1)), new, buffer[index])
            buffer[index] = new

    def refill_ring(self, new_lengths: torch.Tensor, start: torch.Tensor, raw: RawKeys) -> None:
        """After a chunk: the ring keeps the last R positions of every row (R >= the rows' lengths below the
        window), read from the step's raw keys (`start` [B]: each row's first new position), which hold the
        ring of R slots before the chunk."""
        slots = self.ring_slots
        self.ring_pos = rule.ring_positions(new_lengths, slots)
        index = raw_index(self.ring_pos.clamp(min=0), start[:, None], slots, True)
        self.ring_k, self.ring_v, self.ring_focal = _ring_rows(self.ring_pos, index, raw.keys, raw.values, raw.focal)

    def set_aggregates(self, index: tuple, agg_k, agg_v, lse, count, score_k) -> None:
        """Write aggregates (`aggregate_blocks`' results) at `index` of the [B, H, NBcap] grid, in place;
        `score_k` (the principal ends) where the buffers hold score keys, else None."""
        if score_k is not None:
            self.score_k[index] = score_k.to(self.score_k.dtype)
        self.agg_k[index] = agg_k.to(self.agg_k.dtype)
        self.agg_v[index] = agg_v.to(self.agg_v.dtype)
        self.agg_lse[index] = lse
        self.agg_cnt[index] = count
        self.agg_bias[index] = block_bias(lse, count, self.group_bias)

    def score_keys(self, blocks: int) -> torch.Tensor:
        """The score keys of blocks 0..blocks-1 that expansion ranks (`block_score_keys`): [B, H, blocks, S, d]."""
        return block_score_keys(self.agg_k[:, :, :blocks], None if self.score_k is None else self.score_k[:, :, :blocks])

    def replace_aggregates(self, agg_k, agg_v, lse, count) -> None:
        """Every aggregate at once (a fold, compact only: no score keys), in new tensors."""
        if self.score_k is not None:
            raise RuntimeError("DecodeBuffers.replace_aggregates: a fold cannot update the principal ends")
        self.agg_k, self.agg_v, self.agg_lse, self.agg_cnt = agg_k, agg_v, lse, count
        self.agg_bias = block_bias(lse, count, self.group_bias)

    def packed(self, tail: int, most_tail: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The workspace ws_k, ws_v of one-token PyTorch steps, packed again if stale (module docstring) or
        short of `tail` rows after the ring for expanded blocks (then grown geometrically, up to `most_tail`)."""
        stale = self._packed is None or not all(getattr(self, name) is view for name, view in zip(PACKED, self._packed))
        if tail > self.tail:
            self._pack(min(most_tail, grown_size(self.tail, tail)))
        elif stale:
            self._pack(self.tail)
        return self.ws_k, self.ws_v

    def _pack(self, tail: int) -> None:
        self.tail = tail
        for names, ws_name in ((PACKED[:3], "ws_k"), (PACKED[3:], "ws_v")):
            parts = [getattr(self, name) for name in names]
            batch, heads, _, dim = parts[0].shape
            ws = parts[0].new_zeros(batch, heads, sum(p.shape[2] for p in parts) + tail, dim)
            offset = 0
            for name, part in zip(names, parts):
                view = ws[:, :, offset : offset + part.shape[2]]
                view.copy_(part)
                setattr(self, name, view)
                offset += part.shape[2]
            setattr(self, ws_name, ws)
        self._packed = tuple(getattr(self, name) for name in PACKED)


def _ring_rows(ring_pos: torch.Tensor, index: torch.Tensor, keys, values, focal):
    """Ring keys, values and focal flags: slot s takes row index[b, s] of keys/values/focal [B, H, N, ...]."""
    batch, heads = keys.shape[:2]
    gather = index[:, None, :]
    ring_focal = focal.gather(2, gather.expand(batch, heads, -1)) & (ring_pos >= 0)[:, None, :]
    return gather_rows(keys, gather), gather_rows(values, gather), ring_focal
