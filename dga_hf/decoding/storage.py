"""The two storage policies of a decode state (docs/decoding.md, "Modes"): what keep_full and compact keep
beyond the common buffers (`buffers.py`), how they record a closing block and how they refresh F. One
policy per class, as transformers' cache layers have one storage policy each.

Both answer: `held()` (their tensors, for bytes), `select_rows`, `ensure_capacity`, `append` (a step's new
tokens), `new_focal_slots` (a dense row's tokens joined F), `record_closed` (blocks that closed) and
`refresh` (re-select F).
"""

from __future__ import annotations

import math

import torch

from .. import rule
from . import refresh
from .blocks import ClosedBlocks, PrefillBlocks
from .buffers import DecodeBuffers, NewTokens, PrefillCapacity, Rows, gather_rows, grow, ring_size
from .settings import DecodeSettings


class _Policy:
    """Row selection and bytes over the tensors named in SELECTED (None where a policy does without)."""

    SELECTED: tuple[str, ...] = ()

    def held(self) -> list[torch.Tensor | None]:
        return [getattr(self, name) for name in self.SELECTED]

    def select_rows(self, index: torch.Tensor) -> None:
        for name in self.SELECTED:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.index_select(0, index.to(value.device)))


class ArchiveStorage(_Policy):
    """keep_full on a DGA layer: every token's key and value stays, so a refresh can re-select any token
    and every query can read old blocks raw (block expansion). Saves time, not memory.

      qbar [B, H, NBcap, d] (compute dtype): q_bar of every complete block at index = block, to re-aggregate
        a block from the archive when a refresh changes its members
      arch_k/v [B, H, Tcap, d]: every token at its position (positions past a row's length are scratch);
        Tcap a multiple of m once it holds a whole block, so a block is one item of
        `gather_rows(..., rows_per_item=m)`
    """

    SELECTED = ("qbar", "arch_k", "arch_v")

    def __init__(self, settings: DecodeSettings, prefill, blocks: PrefillBlocks, capacity: PrefillCapacity):
        m = settings.group_size
        self.settings = settings
        self.qbar = grow(blocks.query_bar, 2, capacity.blocks, exact=True)
        self.arch_k = grow(prefill.key, 2, capacity.tokens, exact=True, multiple=m)
        self.arch_v = grow(prefill.value, 2, capacity.tokens, exact=True, multiple=m)

    def ensure_capacity(self, blocks: int, tokens: NewTokens, focal_slots: int | None) -> None:
        self.qbar = grow(self.qbar, 2, blocks)
        need = max(max(tokens.new), max(tokens.old) + tokens.size)
        m = self.settings.group_size
        self.arch_k = grow(self.arch_k, 2, need, multiple=m)  # whole blocks: block expansion gathers blocks
        self.arch_v = grow(self.arch_v, 2, need, multiple=m)

    def append(self, tokens: NewTokens) -> None:
        """The new tokens into the archive (positions past a row's real tokens get scratch values,
        overwritten later)."""
        if tokens.uniform:
            at = tokens.old[0]
            self.arch_k[:, :, at : at + tokens.size] = tokens.key
            self.arch_v[:, :, at : at + tokens.size] = tokens.value
            return
        for archive, new in ((self.arch_k, tokens.key), (self.arch_v, tokens.value)):
            index = tokens.positions[:, None, :, None].expand(*new.shape)
            archive.scatter_(2, index, new.to(archive.dtype))

    def new_focal_slots(self, slot: torch.Tensor) -> None:
        """Nothing to record: a refresh re-reads F's tokens from the archive."""

    def record_closed(self, closed: ClosedBlocks, buffers: DecodeBuffers, tokens: NewTokens, scale: float) -> None:
        self.qbar[closed.rows, :, closed.blocks] = closed.query_bar

    def refresh(self, buffers: DecodeBuffers, rows: Rows, tokens: NewTokens, scale: float) -> None:
        refresh.refresh_archive(self, buffers, self.settings, rows, tokens, scale)


class CompactStorage(_Policy):
    """compact mode, and every all-focal layer (`DecodeSettings.all_focal`): a non-focal token is dropped
    once it leaves the local window (it lives on in its block's aggregate); a refresh re-ranks the tokens
    still held.

      qbar [B, H, S, d] (compute dtype): q_bar of the window's blocks, a ring of period n (`qbar_slot`;
        of the blocks sharing a slot, the latest), to re-aggregate a window block from the ring; S =
        `ring_size` of the longest row's blocks, at most n
      focal_logit [B, H, Fcap] (when refreshing, else None): s * q_bar of the token's block . its key (NaN
        until its block is complete), in focal-slot order: all that folding it into an old block needs
    """

    SELECTED = ("qbar", "focal_logit")

    def __init__(self, settings: DecodeSettings, prefill, blocks: PrefillBlocks, buffers: DecodeBuffers, scale: float):
        m = settings.group_size
        lengths = prefill.lengths
        num_blocks = blocks.query_bar.shape[2]
        self.settings = settings
        # slot s holds the latest block c = s (mod S) of each row that has begun (-1: none)
        slots = ring_size(num_blocks, settings.local_blocks)
        owner = rule.ring_positions(rule.block_of(lengths - 1, m) + 1, slots)  # [B, S]
        ring = gather_rows(blocks.query_bar, owner.clamp(min=0, max=num_blocks - 1)[:, None, :])
        self.qbar = ring * (owner >= 0)[:, None, :, None]
        self.focal_logit = None
        if settings.refresh_every:
            block = rule.block_of(buffers.focal_pos, m)
            complete = (block + 1) * m <= lengths[:, None, None]
            block_qbar = gather_rows(blocks.query_bar, block.clamp(max=num_blocks - 1))
            logit = scale * (buffers.focal_k.to(settings.compute_dtype) * block_qbar).sum(-1)
            self.focal_logit = torch.where(complete, logit, math.nan)

    def qbar_slot(self, block):
        """The slot of `block` (int or tensor) in the q_bar ring."""
        return block % self.qbar.shape[2]

    def ensure_capacity(self, blocks: int, tokens: NewTokens, focal_slots: int | None) -> None:
        begun = rule.block_of(max(tokens.new) - 1, self.settings.group_size) + 1
        self.qbar = grow(self.qbar, 2, ring_size(begun, self.settings.local_blocks), exact=True)
        if focal_slots is not None and self.focal_logit is not None:
            self.focal_logit = grow(self.focal_logit, 2, focal_slots, math.nan)

    def append(self, tokens: NewTokens) -> None:
        """Nothing beyond the ring: old tokens are not kept."""

    def new_focal_slots(self, slot: torch.Tensor) -> None:
        if self.focal_logit is not None:  # known once the token's block is complete
            self.focal_logit.scatter_(2, slot, math.nan)

    def record_closed(self, closed: ClosedBlocks, buffers: DecodeBuffers, tokens: NewTokens, scale: float) -> None:
        """q_bar into the ring of the window's blocks (of several closing blocks sharing a slot, the latest
        is kept); focal tokens of the closed blocks get their logit."""
        m, n = self.settings.group_size, self.settings.local_blocks
        last = {b: tokens.new[b] // m - 1 for b, _ in closed.pairs}  # each row's last complete block
        keep = [i for i, (b, c) in enumerate(closed.pairs) if not rule.is_old_block(c, last[b], n)]
        keep_t = torch.tensor(keep, device=closed.rows.device)
        self.qbar[closed.rows[keep_t], :, self.qbar_slot(closed.blocks[keep_t])] = closed.query_bar[keep_t]
        slots = buffers.focal_hi
        if self.focal_logit is None or not slots:
            return
        rows = closed.rows
        block = rule.block_of(buffers.focal_pos[rows, :, :slots], m)  # [N, H, F]
        hit = block == closed.blocks[:, None, None]
        focal_k = buffers.focal_k[rows, :, :slots].to(self.settings.compute_dtype)
        logit = scale * (focal_k * closed.query_bar[:, :, None, :]).sum(-1)
        current = self.focal_logit[:, :, :slots]
        total = torch.zeros_like(current).index_add_(0, rows, torch.where(hit, logit, 0.0))
        found = torch.zeros_like(total).index_add_(0, rows, hit.to(total.dtype)) > 0
        self.focal_logit[:, :, :slots] = torch.where(found, total, current)

    def refresh(self, buffers: DecodeBuffers, rows: Rows, tokens: NewTokens, scale: float) -> None:
        refresh.refresh_compact(self, buffers, self.settings, rows, tokens, scale)


def storage_for(settings: DecodeSettings, prefill, blocks: PrefillBlocks, buffers: DecodeBuffers, scale: float,
                capacity: PrefillCapacity) -> ArchiveStorage | CompactStorage:
    if settings.keep_archive:
        return ArchiveStorage(settings, prefill, blocks, capacity)
    return CompactStorage(settings, prefill, blocks, buffers, scale)
