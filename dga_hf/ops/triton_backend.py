"""Triton backend of DGA stage 5: a flash-attention style kernel over the three key streams.

Same function as `torch_backend.attend` (see DGA_SPEC.md, step 5): for query ``i`` in block
``beta = i // m`` one softmax over

  (a) focal keys ``layout.focal_key`` at positions ``layout.focal_pos`` (sorted ascending, unused slots
      hold ``L``), visible iff ``focal_pos // m <= beta - n``;
  (b) block aggregates ``layout.agg_key`` with the additive logit bias ``layout.agg_bias`` (``-inf`` for
      a block with no non-focal member), visible iff ``c <= beta - n``;
  (c) raw local keys ``j <= i`` with ``j // m >= beta - n + 1`` (``j < length`` follows from ``j <= i``).

Design (one program per tile of queries and one kv head, grid ``(tiles, B * H * head_chunks)``):

* Native GQA. The ``G`` query heads of a kv head share the keys: a program takes ``GP`` of them (the
  largest power of two dividing ``G``, at most ``rows // 16``) and stacks ``GP x BLOCK_M`` queries as the
  ``rows`` of one tile (row ``r`` = head ``r // BLOCK_M``, query ``q0 + r % BLOCK_M``), so every key chunk
  is loaded once for all of them and fed to one ``tl.dot``. No ``repeat_kv``.
* Online softmax in base 2 with fp32 running max / sum / accumulator; operands of ``tl.dot`` stay in the
  input dtype (bf16 / fp16 on tensor cores; fp32 with ``FP32_DOT_PRECISION``).
* Only key ranges that can be visible to the tile are visited: the focal prefix
  ``[0, focal_count(last query's block))`` (counts from one ``searchsorted`` per call), the aggregates of
  blocks ``< last block - n + 1`` and the local window ``[(first block - n + 1) * m, last query]``.
  Chunks visible to every row of the tile (focal slots and aggregates old for the tile's *first* query)
  run without masks; only the tail chunks and the local window build masks, always from positions.
* Tiles are launched last-first (the heaviest, causal) so the tail of the grid is short.
* Padded query rows (position ``>= length``) and rows that see nothing store 0, never NaN.
* `attend_forward` also stores each row's natural-log logsumexp (``-inf`` for those rows), which the
  backward kernels (`triton_backward.attend_backward`, re-exported here) recompute the softmax from.

float64 is not supported by the kernels (no fp64 tensor-core path worth having); `attend`,
`attend_forward` and `attend_backward` fall back, explicitly and documented here, to the same functions
of `torch_backend` for float64 inputs, which compute the same function. On CPU tensors the kernels run
only under Triton's interpreter (``TRITON_INTERPRET=1`` in the environment before triton is first
imported); that is how the test-suite checks them without a GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..config import DGAConfig
from . import torch_backend
from .layout import DGALayout

LOG2E = 1.4426950408889634

# Precision of tl.dot for fp32 operands on the GPU: "tf32x3" (three TF32 MMAs, about fp32 accuracy),
# "ieee" (exact fp32 FMA, slow) or "tf32" (fast, ~1e-3 relative error). The interpreter always
# computes exact fp32.
FP32_DOT_PRECISION = os.environ.get("DGA_TRITON_FP32_PRECISION", "tf32x3")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def _fix_interpreter_scalar_index() -> None:
    """Triton's interpreter (<= 3.6) turns a scalar used as a loop bound into a Python int with
    ``int(array)``, which numpy >= 2.4 rejects for its 1-element arrays (triton-lang/triton#9171). Patch
    that one conversion, only in interpreter mode (never on the compiled GPU path)."""
    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover - layout of triton changed; nothing to fix then
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_dga_scalar_index_fix", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._dga_scalar_index_fix = True
    interpreter._patch_lang_tensor = patched


if _interpreting():
    _fix_interpreter_scalar_index()


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with fp32 accumulation. UPCAST (interpreter only): the interpreter multiplies the raw
    bits of 16-bit floats, so it gets their exact fp32 values instead (the products the tensor cores form)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _logits(q, k, qk_scale, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """q [R, D] . k [N, D]^T * scale (log2 units), fp32 [R, N]."""
    kt = tl.trans(k)
    if UPCAST:
        return tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision=DOT_PRECISION) * qk_scale
    else:
        return tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale


@triton.jit
def _online_update(acc, m_i, l_i, s, v, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One step of the online softmax: s [R, N] logits in log2 units (masked = -inf), v [N, DV]."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # a row that has seen only -inf keeps m = -inf; subtract 0 instead so no inf - inf = NaN appears
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = _dot(p.to(v.dtype), v, acc, DOT_PRECISION, UPCAST)
    return acc, m_new, l_i


@triton.jit
def _load_rows(ptrs, row_mask, col_mask, EVEN_COLS: tl.constexpr, MASK_ROWS: tl.constexpr):
    """Load a [N, D] chunk; masks only where the shape or the range needs them (compile-time choice)."""
    if MASK_ROWS:
        if EVEN_COLS:
            x = tl.load(ptrs, mask=row_mask[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_mask[:, None] & col_mask[None, :], other=0.0)
    else:
        if EVEN_COLS:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=col_mask[None, :], other=0.0)
    return x


@triton.jit
def _tile_key_ranges(FCNT, bh64, tile, q0, length, NUM_TILES,
                     BLOCK_M: tl.constexpr, GROUP_SIZE: tl.constexpr, LOCAL_BLOCKS: tl.constexpr):
    """The key ranges a query tile [q0, q0 + BLOCK_M) can see, shared by the forward and the dq kernel:
    focal slots [0, focal_lo) and aggregates [0, old_lo) are visible to every real row (no mask needed),
    [.., focal_hi) / [.., old_hi) to some row; raw keys [win_lo, win_hi). All empty for a tile made only
    of padding."""
    live = q0 < length
    q_last = tl.maximum(tl.minimum(q0 + BLOCK_M, length) - 1, q0)
    blk_lo = q0 // GROUP_SIZE
    blk_hi = q_last // GROUP_SIZE
    old_lo = tl.maximum(blk_lo - (LOCAL_BLOCKS - 1), 0)  # aggregates old for every row of the tile
    old_hi = tl.where(live, tl.maximum(blk_hi - (LOCAL_BLOCKS - 1), 0), 0)  # ... for some row
    old_lo = tl.minimum(old_lo, old_hi)
    fcnt_ptr = FCNT + (bh64 * NUM_TILES + tile) * 2
    focal_hi = tl.where(live, tl.load(fcnt_ptr + 1), 0)
    focal_lo = tl.minimum(tl.load(fcnt_ptr), focal_hi)
    win_lo = tl.maximum(blk_lo - (LOCAL_BLOCKS - 1), 0) * GROUP_SIZE
    win_hi = tl.where(live, q_last + 1, win_lo)
    return focal_lo, focal_hi, old_lo, old_hi, win_lo, win_hi


# sizes that change with the sequence length are not specialised on (no recompilation per length; the
# addresses they scale are aligned by the constexpr head dims anyway)
@triton.jit(do_not_specialize=["H", "L", "F", "NB", "NUM_TILES"])
def _dga_attend_kernel(
    Q, K, V, O, LSE,
    FK, FV, FP, AK, AV, AB, LENS, FCNT,
    stride_qb, stride_qh, stride_qg, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_ob, stride_oh, stride_og, stride_ol,
    H, L, F, NB, NUM_TILES, qk_scale,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    GROUP_SIZE: tl.constexpr, LOCAL_BLOCKS: tl.constexpr,
    HEADS_PER_PROG: tl.constexpr, HEAD_CHUNKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    BLOCK_R: tl.constexpr = HEADS_PER_PROG * BLOCK_M
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM
    EVEN_DV: tl.constexpr = BLOCK_DV == VALUE_DIM

    tile = NUM_TILES - 1 - tl.program_id(0)  # heaviest (latest) tiles first
    pid = tl.program_id(1)
    chunk = pid % HEAD_CHUNKS
    bh = pid // HEAD_CHUNKS
    b = bh // H
    h = bh % H
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    bh64 = bh.to(tl.int64)

    length = tl.load(LENS + b)
    q0 = tile * BLOCK_M
    rows = tl.arange(0, BLOCK_R)
    g = chunk * HEADS_PER_PROG + rows // BLOCK_M
    qpos = q0 + rows % BLOCK_M
    row_real = qpos < length
    qblk = qpos // GROUP_SIZE
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_d = offs_d < HEAD_DIM
    mask_dv = offs_dv < VALUE_DIM

    q_ptrs = (Q + b64 * stride_qb + h64 * stride_qh
              + (g.to(tl.int64) * stride_qg + qpos.to(tl.int64) * stride_ql)[:, None] + offs_d[None, :])
    q = _load_rows(q_ptrs, row_real, mask_d, EVEN_D, True)

    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)

    focal_lo, focal_hi, old_lo, old_hi, win_lo, win_hi = _tile_key_ranges(
        FCNT, bh64, tile, q0, length, NUM_TILES, BLOCK_M, GROUP_SIZE, LOCAL_BLOCKS)
    # first key each row may see raw: its block - n + 1 (may be negative = from 0)
    row_local_start = (qblk - (LOCAL_BLOCKS - 1)) * GROUP_SIZE
    offs_n = tl.arange(0, BLOCK_N)

    # ---- (a) focal keys: slots [0, focal_lo) unmasked, [.., focal_hi) masked by block
    fk_base = FK + bh64 * F * HEAD_DIM
    fv_base = FV + bh64 * F * VALUE_DIM
    fp_base = FP + bh64 * F
    focal_full = (focal_lo // BLOCK_N) * BLOCK_N
    for start in range(0, focal_full, BLOCK_N):
        slots = start + offs_n
        k = _load_rows(fk_base + slots[:, None] * HEAD_DIM + offs_d[None, :], slots < F, mask_d, EVEN_D, False)
        v = _load_rows(fv_base + slots[:, None] * VALUE_DIM + offs_dv[None, :], slots < F, mask_dv, EVEN_DV, False)
        s = _logits(q, k, qk_scale, DOT_PRECISION, UPCAST)
        acc, m_i, l_i = _online_update(acc, m_i, l_i, s, v, DOT_PRECISION, UPCAST)
    for start in range(focal_full, focal_hi, BLOCK_N):
        slots = start + offs_n
        in_range = slots < focal_hi
        k = _load_rows(fk_base + slots[:, None] * HEAD_DIM + offs_d[None, :], in_range, mask_d, EVEN_D, True)
        v = _load_rows(fv_base + slots[:, None] * VALUE_DIM + offs_dv[None, :], in_range, mask_dv, EVEN_DV, True)
        fpos = tl.load(fp_base + slots, mask=in_range, other=2147483647)
        s = _logits(q, k, qk_scale, DOT_PRECISION, UPCAST)
        s = tl.where(fpos[None, :] < row_local_start[:, None], s, float("-inf"))
        acc, m_i, l_i = _online_update(acc, m_i, l_i, s, v, DOT_PRECISION, UPCAST)

    # ---- (b) aggregates of old blocks: [0, old_lo) unmasked, [.., old_hi) masked by block
    ak_base = AK + bh64 * NB * HEAD_DIM
    av_base = AV + bh64 * NB * VALUE_DIM
    ab_base = AB + bh64 * NB
    agg_full = (old_lo // BLOCK_N) * BLOCK_N
    for start in range(0, agg_full, BLOCK_N):
        blocks = start + offs_n
        k = _load_rows(ak_base + blocks[:, None] * HEAD_DIM + offs_d[None, :], blocks < NB, mask_d, EVEN_D, False)
        v = _load_rows(av_base + blocks[:, None] * VALUE_DIM + offs_dv[None, :], blocks < NB, mask_dv, EVEN_DV, False)
        bias = tl.load(ab_base + blocks)  # log2 units; -inf = empty block
        s = _logits(q, k, qk_scale, DOT_PRECISION, UPCAST) + bias[None, :]
        acc, m_i, l_i = _online_update(acc, m_i, l_i, s, v, DOT_PRECISION, UPCAST)
    for start in range(agg_full, old_hi, BLOCK_N):
        blocks = start + offs_n
        in_range = blocks < old_hi
        k = _load_rows(ak_base + blocks[:, None] * HEAD_DIM + offs_d[None, :], in_range, mask_d, EVEN_D, True)
        v = _load_rows(av_base + blocks[:, None] * VALUE_DIM + offs_dv[None, :], in_range, mask_dv, EVEN_DV, True)
        bias = tl.load(ab_base + blocks, mask=in_range, other=float("-inf"))
        s = _logits(q, k, qk_scale, DOT_PRECISION, UPCAST) + bias[None, :]
        visible = (blocks[None, :] * GROUP_SIZE) < row_local_start[:, None]
        s = tl.where(visible, s, float("-inf"))
        acc, m_i, l_i = _online_update(acc, m_i, l_i, s, v, DOT_PRECISION, UPCAST)

    # ---- (c) raw local keys: the window [(blk_lo - n + 1) * m, q_last], causal + window masks
    k_base = K + b64 * stride_kb + h64 * stride_kh
    v_base = V + b64 * stride_vb + h64 * stride_vh
    for start in range(win_lo, win_hi, BLOCK_N):
        keys = start + offs_n
        in_range = keys < win_hi
        keys64 = keys.to(tl.int64)
        k = _load_rows(k_base + keys64[:, None] * stride_kl + offs_d[None, :], in_range, mask_d, EVEN_D, True)
        v = _load_rows(v_base + keys64[:, None] * stride_vl + offs_dv[None, :], in_range, mask_dv, EVEN_DV, True)
        s = _logits(q, k, qk_scale, DOT_PRECISION, UPCAST)
        visible = (keys[None, :] <= qpos[:, None]) & (keys[None, :] >= row_local_start[:, None])
        s = tl.where(visible, s, float("-inf"))
        acc, m_i, l_i = _online_update(acc, m_i, l_i, s, v, DOT_PRECISION, UPCAST)

    # ---- normalise; padded rows and rows that saw nothing store 0 (and lse -inf)
    ok = row_real & (l_i > 0.0)
    l_safe = tl.where(ok, l_i, 1.0)
    out = acc / l_safe[:, None]
    out = tl.where(ok[:, None], out, 0.0)
    o_ptrs = (O + b64 * stride_ob + h64 * stride_oh
              + (g.to(tl.int64) * stride_og + qpos.to(tl.int64) * stride_ol)[:, None] + offs_dv[None, :])
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(qpos < L)[:, None] & mask_dv[None, :])
    # natural-log logsumexp of the row's visible logits, [B, H, G, L] contiguous (for the backward)
    lse = tl.where(ok, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    lse_ptrs = LSE + (bh64 * (HEADS_PER_PROG * HEAD_CHUNKS) + g.to(tl.int64)) * L + qpos
    tl.store(lse_ptrs, lse, mask=qpos < L)


# Whether this module's kernel runs in Triton's interpreter (decided when triton / this module was imported).
KERNEL_INTERPRETED = type(_dga_attend_kernel).__name__ == "InterpretedFunction"


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


def focal_tile_counts(
    focal_pos: torch.Tensor, lengths: torch.Tensor, config: DGAConfig, seq_len: int, block_m: int
) -> torch.Tensor:
    """[B, H, tiles, 2] int32: focal slots visible to every real query of a tile (old for its first
    query's block) and to some query (old for its last real query's block). Focal slots are sorted by
    position, so both are prefix lengths."""
    m, n = config.group_size, config.local_blocks
    device = focal_pos.device
    tiles = triton.cdiv(seq_len, block_m)
    q0 = torch.arange(tiles, device=device) * block_m
    q_last = torch.minimum(q0 + block_m, lengths.to(device)[:, None]) - 1  # [B, T]
    q_last = torch.maximum(q_last, q0)
    limit_lo = ((q0 // m) - n + 1) * m  # first raw-local position of the tile's first block
    limit_hi = ((q_last // m) - n + 1) * m
    limits = torch.stack([limit_lo.expand_as(limit_hi), limit_hi], dim=-1).view(limit_hi.shape[0], 1, -1)
    batch, heads, _ = focal_pos.shape
    limits = limits.expand(batch, heads, -1).contiguous()
    counts = torch.searchsorted(focal_pos.contiguous(), limits)  # elements < limit
    return counts.view(batch, heads, tiles, 2).to(torch.int32)


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
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )


def dot_precision(dtype: torch.dtype) -> str:
    return FP32_DOT_PRECISION if dtype == torch.float32 else "tf32"


def upcast(dtype: torch.dtype) -> bool:
    return KERNEL_INTERPRETED and dtype != torch.float32


def is_float64(*tensors: torch.Tensor) -> bool:
    return any(t.dtype == torch.float64 for t in tensors)


def check_supported(query: torch.Tensor, name: str) -> None:
    if query.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"triton_backend.{name} supports float32/bfloat16/float16, got {query.dtype}")
    if query.device.type != "cuda" and not KERNEL_INTERPRETED:
        raise RuntimeError(
            f"triton_backend.{name} needs CUDA tensors (got {query.device}); CPU tensors run only under "
            "Triton's interpreter (TRITON_INTERPRET=1 in the environment before triton is first imported)"
        )


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def prepare(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: DGALayout, config: DGAConfig,
            cfg: dict) -> KernelInputs:
    """Cast key/value and the layout to the query dtype (bias to log2 units), count focal slots per tile."""
    batch, heads, _, seq_len, head_dim = query.shape
    value_dim = value.shape[-1]
    dtype = query.dtype
    focal_pos = layout.focal_pos
    focal_key, focal_value = layout.focal_key, layout.focal_value
    if focal_pos.shape[-1] == 0:  # no focal slot at all (every row empty): one unused slot keeps pointers valid
        focal_pos = torch.full((batch, heads, 1), seq_len, dtype=focal_pos.dtype, device=focal_pos.device)
        focal_key = focal_key.new_zeros(batch, heads, 1, head_dim)
        focal_value = focal_value.new_zeros(batch, heads, 1, value_dim)
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
    )


def attend_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: DGALayout,
    config: DGAConfig,
    scale: float,
    *,
    block_rows: int | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """query [B, H, G, L, d], key/value [B, H, L, d] (compacted, right-padded rows of ``layout.lengths``)
    -> (out [B, H, G, L, dv] in the dtype of ``query``, lse [B, H, G, L] float32).

    ``lse`` is the natural-log logsumexp of each row's visible logits (``scale * q.k``, plus ``agg_bias``
    for aggregates); -inf for padded rows and rows that see nothing (their ``out`` is 0). It is what
    `attend_backward` needs besides ``out``.

    q/k/v may be fp32, bf16 or fp16 (the layout's tensors are cast to the query dtype; softmax and
    accumulation are fp32). float64 falls back to `torch_backend.attend_forward` (same function).
    ``block_rows`` / ``block_n`` override the tile sizes (powers of two >= 16), for tests and tuning.
    """
    if is_float64(query, key, value):
        # Documented fallback: the Triton kernel has no fp64 path; the PyTorch backend computes the same
        # function in float64.
        return torch_backend.attend_forward(query, key, value, layout, config, scale)
    check_supported(query, "attend_forward")
    batch, heads, group, seq_len, head_dim = query.shape
    value_dim = value.shape[-1]
    dtype = query.dtype
    out = torch.empty(batch, heads, group, seq_len, value_dim, dtype=dtype, device=query.device)
    lse = torch.empty(batch, heads, group, seq_len, dtype=torch.float32, device=query.device)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))

    cfg = plan(group, dtype, head_dim, value_dim, block_rows=block_rows, block_n=block_n)
    x = prepare(query, key, value, layout, config, cfg)
    query, key, value = x.query, x.key, x.value
    grid = (x.tiles, batch * heads * cfg["HEAD_CHUNKS"])
    _dga_attend_kernel[grid](
        query, key, value, out, lse,
        x.focal_key, x.focal_value, x.focal_pos, x.agg_key, x.agg_value, x.agg_bias, x.lengths, x.counts,
        query.stride(0), query.stride(1), query.stride(2), query.stride(3),
        key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        heads, seq_len, x.focal_key.shape[2], x.agg_key.shape[2], x.tiles, float(scale) * LOG2E,
        GROUP_SIZE=config.group_size, LOCAL_BLOCKS=config.local_blocks,
        **x.constants,
    )
    return out, lse


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: DGALayout,
    config: DGAConfig,
    scale: float,
    *,
    block_rows: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """The output of `attend_forward` alone: [B, H, G, L, dv] in the dtype of ``query``."""
    if is_float64(query, key, value):
        return torch_backend.attend(query, key, value, layout, config, scale)
    return attend_forward(query, key, value, layout, config, scale, block_rows=block_rows, block_n=block_n)[0]


# The backward kernels live in their own module; it reuses this module's helpers (defined above).
from .triton_backward import attend_backward  # noqa: E402

__all__ = ["attend", "attend_forward", "attend_backward", "plan", "focal_tile_counts", "FP32_DOT_PRECISION"]
