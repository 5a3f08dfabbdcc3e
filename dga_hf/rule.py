"""The rule of DGA (docs/spec.md), spelled once: which keys a query reads, how many tokens are focal,
where the decoding ring keeps a position and how often decoding re-selects.

Every function takes Python ints or integer tensors (elementwise) alike, so the naive reference, the
PyTorch backend, the decode state, the benchmarks and the settings all call the same code. The Triton
kernels cannot call Python: they keep one jit twin of `first_local_block` (`ops/triton_common.py`),
tested against this module.

Vocabulary. Block of position j: ``c(j) = j // m``. A query at position i lies in block ``beta = c(i)``
and reads raw the tokens of blocks ``first_local_block(beta, n) = beta - n + 1`` to ``beta`` (its own
block and the ``n - 1`` before it: the local window); every block before that is *old* for it: read as
its focal tokens and its aggregate.
"""

from __future__ import annotations

import math
from typing import TypeVar

import torch

Int = TypeVar("Int", int, torch.Tensor)

# Keeps float error (0.07 * 100 = 7.000000000000001) from adding a focal token.
_RATIO_EPSILON = 1e-9


def block_of(position: Int, group_size: int) -> Int:
    """The block ``c(j) = j // m`` of a position (floor division: -1, an empty slot, maps to block -1)."""
    if isinstance(position, torch.Tensor):
        return torch.div(position, group_size, rounding_mode="floor")
    return position // group_size


def first_local_block(query_block: Int, local_blocks: int) -> Int:
    """The first block a query of `query_block` reads raw, ``beta - n + 1`` (may be negative: then it
    reads every block raw). Blocks before it are old for the query."""
    return query_block - (local_blocks - 1)


def first_local_position(query_block: Int, group_size: int, local_blocks: int) -> Int:
    """The first position a query of `query_block` reads raw (clamped at 0): positions before it are old."""
    first = first_local_block(query_block, local_blocks) * group_size
    if isinstance(first, torch.Tensor):
        return first.clamp(min=0)
    return max(0, first)


def is_old_block(block: Int, query_block: Int, local_blocks: int) -> Int:
    """Whether `block` is old for a query of `query_block` (``c <= beta - n``): its aggregate and focal
    tokens are read, its other tokens are not."""
    return block < first_local_block(query_block, local_blocks)


def first_block_seeing_as_old(block: Int, local_blocks: int) -> Int:
    """The first query block for which `block` is old, ``c + n``: the inverse of `first_local_block`
    (``is_old_block(c, beta, n)`` iff ``beta >= first_block_seeing_as_old(c, n)``). Queries of blocks
    ``c .. c + n - 1`` read the block's tokens raw, later ones its focal tokens and aggregate; a backward
    pass that walks keys (not queries) needs it."""
    return block + local_blocks


def old_block_count(query_block: Int, local_blocks: int) -> Int:
    """How many blocks (0 .. count-1) are old for a query of `query_block`."""
    first = first_local_block(query_block, local_blocks)
    if isinstance(first, torch.Tensor):
        return first.clamp(min=0)
    return max(0, first)


def reads_raw(key_pos: Int, query_pos: Int, group_size: int, local_blocks: int) -> Int:
    """Whether a query at `query_pos` reads the token at `key_pos` raw through its local window (causal,
    and in the query's block or the ``n - 1`` before). Focal tokens of old blocks are read as well; that
    is the focal set's business, not this function's."""
    in_window = block_of(key_pos, group_size) >= first_local_block(block_of(query_pos, group_size), local_blocks)
    return (key_pos <= query_pos) & in_window


def focal_count(seq_len: int, focal_ratio: float) -> int:
    """``k = min(L, max(1, ceil(gamma * L)))``, the spec's focal budget of a sequence of L tokens."""
    return min(seq_len, max(1, math.ceil(focal_ratio * seq_len - _RATIO_EPSILON)))


def focal_budget(length: int, focal_ratio: float, sink_tokens: int, dense: bool = False) -> int:
    """Focal tokens of a row of `length` real tokens: k (at least the sinks), 0 for an empty row, and the
    whole row where it is dense (shorter than `min_seq_len`, or a dense layer), since a dense row keeps every
    token raw."""
    if dense:
        return length
    return max(focal_count(length, focal_ratio), min(sink_tokens, length)) if length else 0


def ring_positions(lengths: torch.Tensor, window: int) -> torch.Tensor:
    """The decoding ring of `window` slots per row: slot s holds the latest position ``p < length`` with
    ``p = s (mod window)``, or -1 when the row has none. lengths [B] -> [B, window]."""
    slots = torch.arange(window, device=lengths.device)
    back = lengths[:, None] - 1 - slots
    return torch.where(back >= 0, slots + window * torch.div(back, window, rounding_mode="floor"), -1)


def refresh_interval(group_size: int, expanding_window: int = 0) -> int:
    """How often decoding re-selects the focal set: the paper's ceil(1.1 * m) generated tokens. With block
    expansion (keep_full), `expanding_window` = the local window n * m: every max(ceil(1.1 * m), window // 8)
    tokens. The step's own expansion already follows the query through old context (the job the paper's
    frequent refresh does); a refresh is left only to bring generated tokens into F before they leave the
    raw window, and eight per window do that. Measured on SmolLM2-135M at 4K (docs/decoding.md): copy and
    the perplexity of 256 decoded tokens are equal with a refresh every 18 tokens, every 64, and none."""
    paper = max(1, math.ceil(1.1 * group_size - _RATIO_EPSILON))
    return max(paper, expanding_window // 8)
