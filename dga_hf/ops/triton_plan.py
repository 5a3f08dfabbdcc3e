"""The tile plan of the prefill kernels (`triton_forward` and the dq kernel of `triton_backward`): tile
sizes (`plan`), the key ranges each query tile visits, and the layout cast to the kernels' dtypes
(`prepare`).

A query tile ``[q0, q0 + BLOCK_M)`` of one kv head visits three key ranges (docs/spec.md, step 5; the
rule of `dga_hf.rule`): the focal prefix, the aggregates of blocks old for some row of the tile, and the
raw local window from the first raw block of its first query to its last query. The kernels compute
them in `tile_key_ranges` (jit); `all_tile_key_ranges` is the same plan for every tile at once in
PyTorch, for whoever counts the work of the kernels (`dga_hf.bench`); tests/test_triton_backend.py checks
the two agree. The focal prefix lengths come from one ``searchsorted`` per call (`focal_tile_counts`),
which the kernels read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .. import rule
from ..config import DGAConfig
from .layout import DGALayout
from .triton_common import LOG2E, dot_precision, first_local_block, last_dim_contiguous, upcast
from .triton_expand import MAX_EXPANDED_CHUNK


def _pow2_divisor(value: int) -> int:
    return value & -value


def plan(group: int, dtype: torch.dtype, head_dim: int, value_dim: int, *, block_rows: int | None = None,
         block_n: int | None = None) -> dict:
    """Tile sizes: ``rows`` = heads per program x queries per tile (a power of two), key chunk ``block_n``."""
    wide = dtype == torch.float32
    big = max(head_dim, value_dim) > 128
    rows = block_rows or (64 if wide or big else 128)
    block_n = block_n or (32 if wide or big else 64)
    if rows < 16 or rows & (rows - 1) or block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_rows={rows} and block_n={block_n} must be powers of two >= 16")
    heads = min(_pow2_divisor(group), max(1, rows // 16))
    return {
        "HEADS_PER_PROG": heads,
        "HEAD_CHUNKS": group // heads,
        "BLOCK_M": rows // heads,
        "BLOCK_N": block_n,
        "BLOCK_D": max(16, triton.next_power_of_2(head_dim)),
        "BLOCK_DV": max(16, triton.next_power_of_2(value_dim)),
        "num_warps": 4 if wide or rows <= 64 else 8,
        "num_stages": 2 if wide or big else 3,
    }


def _tile_queries(lengths: torch.Tensor, seq_len: int, block_m: int) -> tuple[torch.Tensor, ...]:
    """Per tile: its first query q0 [T], its last real query q_last [B, T] (q0 for a tile of padding only)
    and whether it holds a real query, live [B, T]; as `tile_key_ranges` computes them."""
    tiles = triton.cdiv(seq_len, block_m)
    q0 = torch.arange(tiles, device=lengths.device) * block_m
    q_last = torch.maximum(torch.minimum(q0 + block_m, lengths[:, None]) - 1, q0)
    return q0, q_last, q0[None, :] < lengths[:, None]


def focal_tile_counts(
    focal_pos: torch.Tensor, lengths: torch.Tensor, config: DGAConfig, seq_len: int, block_m: int
) -> torch.Tensor:
    """[B, H, tiles, 2] int32: focal slots visible to every real query of a tile (old for its first
    query's block) and to some query (old for its last real query's block). Focal slots are sorted by
    position, so both are prefix lengths."""
    m, n = config.group_size, config.local_blocks
    q0, q_last, _ = _tile_queries(lengths.to(focal_pos.device), seq_len, block_m)
    limit_lo = rule.first_local_block(rule.block_of(q0, m), n) * m  # first raw position of the first query
    limit_hi = rule.first_local_block(rule.block_of(q_last, m), n) * m
    limits = torch.stack([limit_lo.expand_as(limit_hi), limit_hi], dim=-1).view(limit_hi.shape[0], 1, -1)
    batch, heads, _ = focal_pos.shape
    limits = limits.expand(batch, heads, -1).contiguous()
    counts = torch.searchsorted(focal_pos.contiguous(), limits)  # elements < limit
    return counts.view(batch, heads, q0.shape[0], 2).to(torch.int32)


@triton.jit
def tile_key_ranges(FCNT, bh64, tile, q0, length, NUM_TILES,
                    BLOCK_M: tl.constexpr, GROUP_SIZE: tl.constexpr, LOCAL_BLOCKS: tl.constexpr):
    """The key ranges a query tile [q0, q0 + BLOCK_M) can see, shared by the forward and the dq kernel:
    focal slots [0, focal_lo) and aggregates [0, old_lo) are visible to every real row (no mask needed),
    [.., focal_hi) / [.., old_hi) to some row; raw keys [win_lo, win_hi). All empty for a tile made only
    of padding."""
    live = q0 < length
    q_last = tl.maximum(tl.minimum(q0 + BLOCK_M, length) - 1, q0)
    blk_lo = q0 // GROUP_SIZE
    blk_hi = q_last // GROUP_SIZE
    old_lo = tl.maximum(first_local_block(blk_lo, LOCAL_BLOCKS), 0)  # aggregates old for every row of the tile
    old_hi = tl.where(live, tl.maximum(first_local_block(blk_hi, LOCAL_BLOCKS), 0), 0)  # ... for some row
    old_lo = tl.minimum(old_lo, old_hi)
    fcnt_ptr = FCNT + (bh64 * NUM_TILES + tile) * 2
    focal_hi = tl.where(live, tl.load(fcnt_ptr + 1), 0)
    focal_lo = tl.minimum(tl.load(fcnt_ptr), focal_hi)
    win_lo = tl.maximum(first_local_block(blk_lo, LOCAL_BLOCKS), 0) * GROUP_SIZE
    win_hi = tl.where(live, q_last + 1, win_lo)
    return focal_lo, focal_hi, old_lo, old_hi, win_lo, win_hi


@dataclass
class TileKeyRanges:
    """`tile_key_ranges` of every tile: focal slots [B, H, T]; aggregates and raw keys [win_lo, win_hi)
    [B, 1, T] (the same for every kv head)."""

    focal_lo: torch.Tensor
    focal_hi: torch.Tensor
    old_lo: torch.Tensor
    old_hi: torch.Tensor
    win_lo: torch.Tensor
    win_hi: torch.Tensor


def all_tile_key_ranges(counts: torch.Tensor, lengths: torch.Tensor, config: DGAConfig, seq_len: int,
                        block_m: int) -> TileKeyRanges:
    """What `tile_key_ranges` returns for every tile, from the kernels' `focal_tile_counts` ``counts``
    [B, H, T, 2] and the row lengths [B]; int64 tensors (see `TileKeyRanges`)."""
    m, n = config.group_size, config.local_blocks
    q0, q_last, live = _tile_queries(lengths.to(counts.device), seq_len, block_m)
    live = live[:, None, :]  # [B, 1, T]
    blk_lo, blk_hi = rule.block_of(q0, m), rule.block_of(q_last, m)[:, None, :]
    old_hi = torch.where(live, rule.old_block_count(blk_hi, n), 0)
    old_lo = torch.minimum(rule.old_block_count(blk_lo, n), old_hi)
    focal_hi = torch.where(live, counts[..., 1].long(), 0)
    focal_lo = torch.minimum(counts[..., 0].long(), focal_hi)
    win_lo = rule.first_local_position(blk_lo, m, n).expand_as(live)
    win_hi = torch.where(live, q_last[:, None, :] + 1, win_lo)
    return TileKeyRanges(focal_lo, focal_hi, old_lo, old_hi, win_lo, win_hi)


@dataclass
class KernelInputs:
    """What the forward and the dq kernels read besides q/k/v: the layout cast to the kernels' dtypes."""

    cfg: dict
    tiles: int
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    focal_pos: torch.Tensor  # [B, H, F'] int32 (F' = max(F, 1): one unused slot when there is no focal slot)
    focal_key: torch.Tensor  # [B, H, F', d] query dtype, contiguous
    focal_value: torch.Tensor
    agg_key: torch.Tensor  # [B, H, nb, d] query dtype, contiguous
    agg_value: torch.Tensor
    agg_bias: torch.Tensor  # [B, H, nb] fp32, log2 units
    lengths: torch.Tensor  # [B] int32
    counts: torch.Tensor  # focal_tile_counts for cfg["BLOCK_M"]
    # docs/spec.md step 6: X = expand_width (0: no expansion), the layout's expanded blocks [B, H, L, X]
    # int32 and focal flags [B, H, L] uint8 (one-element placeholders when X = 0)
    expand_width: int
    expanded: torch.Tensor
    focal: torch.Tensor

    @property
    def constants(self) -> dict:
        """Compile-time arguments shared by the forward and the dq kernel."""
        cfg = self.cfg
        dtype = self.query.dtype
        return dict(
            HEAD_DIM=self.query.shape[-1], VALUE_DIM=self.value.shape[-1],
            BLOCK_D=cfg["BLOCK_D"], BLOCK_DV=cfg["BLOCK_DV"],
            HEADS_PER_PROG=cfg["HEADS_PER_PROG"], HEAD_CHUNKS=cfg["HEAD_CHUNKS"],
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
            DOT_PRECISION=dot_precision(dtype), UPCAST=upcast(dtype),
            EXPANDED=self.expand_width > 0, BLOCK_X=triton.next_power_of_2(max(self.expand_width, 1)),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )


def prepare(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: DGALayout, config: DGAConfig,
            cfg: dict) -> KernelInputs:
    """Cast key/value and the layout to the query dtype (bias to log2 units), count focal slots per tile;
    the expansion's blocks and focal flags in the kernels' integer types."""
    batch, heads, _, seq_len, head_dim = query.shape
    value_dim = value.shape[-1]
    dtype = query.dtype
    focal_pos = layout.focal_pos
    focal_key, focal_value = layout.focal_key, layout.focal_value
    if focal_pos.shape[-1] == 0:  # no focal slot at all (every row empty): one unused slot keeps pointers valid
        focal_pos = torch.full((batch, heads, 1), seq_len, dtype=focal_pos.dtype, device=focal_pos.device)
        focal_key = focal_key.new_zeros(batch, heads, 1, head_dim)
        focal_value = focal_value.new_zeros(batch, heads, 1, value_dim)
    num_blocks = layout.agg_key.shape[2]
    width = 0 if layout.expanded is None else layout.expanded.shape[-1]
    if width and cfg["BLOCK_N"] > MAX_EXPANDED_CHUNK:
        raise ValueError(
            f"block_n={cfg['BLOCK_N']} is too wide with expand_blocks (the expansion mask of a chunk is one 64-bit "
            f"word per row): use block_n <= {MAX_EXPANDED_CHUNK}"
        )
    if width:
        expanded = layout.expanded.to(torch.int32).contiguous()
        focal = layout.focal.to(torch.uint8).contiguous()
    else:  # never read: EXPANDED is off
        expanded = torch.full((1,), num_blocks, dtype=torch.int32, device=query.device)
        focal = torch.ones(1, dtype=torch.uint8, device=query.device)
    return KernelInputs(
        cfg=cfg,
        tiles=triton.cdiv(seq_len, cfg["BLOCK_M"]),
        query=last_dim_contiguous(query),
        key=last_dim_contiguous(key.to(dtype)),
        value=last_dim_contiguous(value.to(dtype)),
        focal_pos=focal_pos.to(torch.int32).contiguous(),
        focal_key=focal_key.to(dtype).contiguous(),
        focal_value=focal_value.to(dtype).contiguous(),
        agg_key=layout.agg_key.to(dtype).contiguous(),
        agg_value=layout.agg_value.to(dtype).contiguous(),
        agg_bias=(layout.agg_bias.float() * LOG2E).contiguous(),
        lengths=layout.lengths.to(device=query.device, dtype=torch.int32),
        counts=focal_tile_counts(focal_pos, layout.lengths, config, seq_len, cfg["BLOCK_M"]),
        expand_width=width,
        expanded=expanded,
        focal=focal,
    )
