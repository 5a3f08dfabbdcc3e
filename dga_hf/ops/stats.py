"""How many keys DGA's queries actually read: the exact count of a given input, beside the cost formula
(`DGAConfig.keys_per_query_share`), which assumes focal tokens spread evenly and no expansion choice.

A query reads one key per raw token (its local window, the focal tokens of old blocks, the non-focal
members of the blocks it expands) and one per aggregate it reads (docs/spec.md steps 5-6). Dense
attention reads i + 1 keys at position i. Counted per kv head (the G query heads of a head read the same
keys), summed over real queries.

    with dga_hf.ops.stats.counting_keys() as count:
        model(ids)
    count.share    # keys read / keys dense attention reads, over every DGA call (all layers)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .. import rule
from ..config import DGAConfig
from .layout import DGALayout


@dataclass
class KeyCount:
    """Totals over the calls made while counting: keys read and keys dense attention would read, over every
    real query and kv head, and the number of attention calls (layers x forward passes)."""

    read: int = 0
    dense: int = 0
    calls: int = 0
    per_call: list[float] = field(default_factory=list)  # each call's share, in call order

    @property
    def share(self) -> float:
        return self.read / self.dense if self.dense else float("nan")

    def add(self, read: int, dense: int) -> None:
        self.read += read
        self.dense += dense
        self.calls += 1
        self.per_call.append(read / dense if dense else float("nan"))


_active: list[KeyCount] = []


@contextlib.contextmanager
def counting_keys() -> Iterator[KeyCount]:
    """Count the keys read by every prefill attention call (`dga_attention`, a patched model) inside the
    block, across all models and layers. Counting costs O(L * expand_blocks) per call and syncs the device;
    outside the block nothing is counted and nothing is kept."""
    count = KeyCount()
    _active.append(count)
    try:
        yield count
    finally:
        _active.remove(count)


def counting() -> bool:
    return bool(_active)


def record_dense(lengths: torch.Tensor, kv_heads: int) -> None:
    """A call that ran dense attention (short sequence, dense layer): every query reads its whole prefix."""
    dense = _dense_keys(lengths) * kv_heads
    for count in _active:
        count.add(dense, dense)


def record_layout(layout: DGALayout, config: DGAConfig) -> None:
    read = int(keys_read(layout, config).sum())
    dense = _dense_keys(layout.lengths) * layout.focal.shape[1]
    for count in _active:
        count.add(read, dense)


def _dense_keys(lengths: torch.Tensor) -> int:
    return int((lengths * (lengths + 1) // 2).sum())


def keys_read(layout: DGALayout, config: DGAConfig) -> torch.Tensor:
    """Keys read by the real queries of each row and kv head, [B, H] int64 (docs/spec.md steps 5-6)."""
    m, n = config.group_size, config.local_blocks
    batch, heads, seq_len = layout.focal.shape
    device = layout.focal.device
    pos = torch.arange(seq_len, device=device)
    real = pos[None, :] < layout.lengths[:, None]  # [B, L]
    first_raw = rule.first_local_position(rule.block_of(pos, m), m, n)  # [L]
    local = pos - first_raw + 1
    focal_before = torch.nn.functional.pad(layout.focal.long().cumsum(-1), (1, 0))  # [B, H, L + 1]
    old_focal = focal_before.gather(-1, first_raw.expand(batch, heads, seq_len))  # focal tokens before the window
    has_members = torch.isfinite(layout.agg_bias)  # [B, H, nb]
    aggregated_before = torch.nn.functional.pad(has_members.long().cumsum(-1), (1, 0))
    old_blocks = rule.old_block_count(rule.block_of(pos, m), n)
    aggregates = aggregated_before.gather(-1, old_blocks.expand(batch, heads, seq_len))
    per_query = local + old_focal + aggregates
    if layout.expanded is not None:
        num_blocks = layout.agg_bias.shape[-1]
        padded = torch.nn.functional.pad(~layout.focal & real[:, None, :], (0, num_blocks * m - seq_len))
        members = torch.nn.functional.pad(padded.view(batch, heads, num_blocks, m).sum(-1), (0, 1))  # sentinel: 0
        chosen = layout.expanded
        expanded_members = members.gather(-1, chosen.flatten(2)).view_as(chosen).sum(-1)
        per_query = per_query + expanded_members - (chosen < num_blocks).sum(-1)
    return (per_query * real[:, None, :]).sum(-1)
