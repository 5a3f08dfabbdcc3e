"""The forward kernel of DGA stage 5 (Triton): a flash-attention style kernel over the three key streams.

Same function as `torch_backend.attend` (docs/spec.md, steps 5 and 6): for query ``i`` in block
``beta = i // m`` one softmax over

  (a) focal keys ``layout.focal_key`` at positions ``layout.focal_pos`` (sorted ascending, unused slots
      hold ``L``), visible iff ``focal_pos // m <= beta - n``;
  (b) block aggregates ``layout.agg_key`` with the additive logit bias ``layout.agg_bias`` (``-inf`` for
      a block with no non-focal member), visible iff ``c <= beta - n``;
  (c) raw local keys ``j <= i`` with ``j // m >= beta - n + 1`` (``j < length`` follows from ``j <= i``);
  (d) with query-aware expansion (``layout.expanded``, step 6): the non-focal members of the blocks the
      query expands, whose aggregates (b) then hides. (d) is `triton_expand`'s kernel, which merges its
      softmax with this kernel's by their log-sum-exp (this kernel then stores an fp32 partial output).

Design (one program per tile of queries and one kv head, grid ``(tiles, B * H * head_chunks)``):

* Native GQA. The ``G`` query heads of a kv head share the keys: a program takes ``GP`` of them (the
  largest power of two dividing ``G``, at most ``rows // 16``) and stacks ``GP x BLOCK_M`` queries as the
  ``rows`` of one tile (row ``r`` = head ``r // BLOCK_M``, query ``q0 + r % BLOCK_M``), so every key chunk
  is loaded once for all of them and fed to one ``tl.dot``. No ``repeat_kv``.
* Online softmax in base 2 with fp32 running max / sum / accumulator; operands of ``tl.dot`` stay in the
  input dtype (bf16 / fp16 on tensor cores; fp32 with ``FP32_DOT_PRECISION``).
* Only key ranges that can be visible to the tile are visited (`triton_plan.tile_key_ranges`): the
  focal prefix ``[0, focal_count(last query's block))`` (counts from one ``searchsorted`` per call), the
  aggregates of blocks ``< last block - n + 1`` and the local window ``[(first block - n + 1) * m, last
  query]``.
  Chunks visible to every row of the tile (focal slots and aggregates old for the tile's *first* query)
  run without masks; only the tail chunks and the local window build masks, always from positions.
* Tiles are launched last-first (the heaviest, causal) so the tail of the grid is short.
* Padded query rows (position ``>= length``) and rows that see nothing store 0, never NaN.
* `attend_forward` also stores each row's natural-log logsumexp (``-inf`` for those rows), which the
  backward kernels (`triton_backward.attend_backward`) recompute the softmax from.

float64 is not supported by the kernels (no fp64 tensor-core path worth having); `attend` and
`attend_forward` (and `triton_backward.attend_backward`) fall back, explicitly and documented here, to the
same functions of `torch_backend` for float64 inputs, which compute the same function. On CPU tensors
the kernels run only under Triton's interpreter (``TRITON_INTERPRET=1`` in the environment before triton
is first imported); that is how the test-suite checks them without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..config import DGAConfig
from . import torch_backend
from .layout import DGALayout
from .triton_common import (
    LOG2E,
    check_supported,
    first_local_block,
    is_float64,
    load_rows,
    logits,
    online_update,
)
from .triton_expand import attend_expanded, expanded_hit, expanded_rows
from .triton_plan import plan, prepare, tile_key_ranges


# sizes that change with the sequence length are not specialised on (no recompilation per length; the
# addresses they scale are aligned by the constexpr head dims anyway)
@triton.jit(do_not_specialize=["H", "L", "F", "NB", "NUM_TILES", "X"])
def _dga_attend_kernel(
    Q, K, V, O, LSE,
    FK, FV, FP, AK, AV, AB, LENS, FCNT, EXP,
    stride_qb, stride_qh, stride_qg, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_ob, stride_oh, stride_og, stride_ol,
    H, L, F, NB, NUM_TILES, X, qk_scale,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    GROUP_SIZE: tl.constexpr, LOCAL_BLOCKS: tl.constexpr,
    HEADS_PER_PROG: tl.constexpr, HEAD_CHUNKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, EXPANDED: tl.constexpr, BLOCK_X: tl.constexpr,
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
    q = load_rows(q_ptrs, row_real, mask_d, EVEN_D, True)

    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)

    focal_lo, focal_hi, old_lo, old_hi, win_lo, win_hi = tile_key_ranges(
        FCNT, bh64, tile, q0, length, NUM_TILES, BLOCK_M, GROUP_SIZE, LOCAL_BLOCKS)
    # first key each row may see raw: its block - n + 1 (may be negative = from 0)
    row_local_start = first_local_block(qblk, LOCAL_BLOCKS) * GROUP_SIZE
    offs_n = tl.arange(0, BLOCK_N)

    # ---- (a) focal keys: slots [0, focal_lo) unmasked, [.., focal_hi) masked by block
    fk_base = FK + bh64 * F * HEAD_DIM
    fv_base = FV + bh64 * F * VALUE_DIM
    fp_base = FP + bh64 * F
    focal_full = (focal_lo // BLOCK_N) * BLOCK_N
    for start in range(0, focal_full, BLOCK_N):
        slots = start + offs_n
        k = load_rows(fk_base + slots[:, None] * HEAD_DIM + offs_d[None, :], slots < F, mask_d, EVEN_D, False)
        v = load_rows(fv_base + slots[:, None] * VALUE_DIM + offs_dv[None, :], slots < F, mask_dv, EVEN_DV, False)
        s = logits(q, k, qk_scale, DOT_PRECISION, UPCAST)
        acc, m_i, l_i = online_update(acc, m_i, l_i, s, v, DOT_PRECISION, UPCAST)
    for start in range(focal_full, focal_hi, BLOCK_N):
        slots = start + offs_n
        in_range = slots < focal_hi
        k = load_rows(fk_base + slots[:, None] * HEAD_DIM + offs_d[None, :], in_range, mask_d, EVEN_D, True)
        v = load_rows(fv_base + slots[:, None] * VALUE_DIM + offs_dv[None, :], in_range, mask_dv, EVEN_DV, True)
        fpos = tl.load(fp_base + slots, mask=in_range, other=2147483647)
        s = logits(q, k, qk_scale, DOT_PRECISION, UPCAST)
        s = tl.where(fpos[None, :] < row_local_start[:, None], s, float("-inf"))
        acc, m_i, l_i = online_update(acc, m_i, l_i, s, v, DOT_PRECISION, UPCAST)

    # ---- (b) aggregates of old blocks: [0, old_lo) unmasked, [.., old_hi) masked by block; a row hides
    # the aggregates of the blocks it expands (their members are read raw by `triton_expand`)
    if EXPANDED:
        rows_chosen = expanded_rows(EXP + (bh64 * L + qpos) * X, row_real, X, NB, BLOCK_X)
    ak_base = AK + bh64 * NB * HEAD_DIM
    av_base = AV + bh64 * NB * VALUE_DIM
    ab_base = AB + bh64 * NB
    agg_full = (old_lo // BLOCK_N) * BLOCK_N
    for start in range(0, agg_full, BLOCK_N):
        blocks = start + offs_n
        k = load_rows(ak_base + blocks[:, None] * HEAD_DIM + offs_d[None, :], blocks < NB, mask_d, EVEN_D, False)
        v = load_rows(av_base + blocks[:, None] * VALUE_DIM + offs_dv[None, :], blocks < NB, mask_dv, EVEN_DV, False)
        bias = tl.load(ab_base + blocks)  # log2 units; -inf = empty block
        s = logits(q, k, qk_scale, DOT_PRECISION, UPCAST) + bias[None, :]
        if EXPANDED:
            s = tl.where(expanded_hit(rows_chosen, start, BLOCK_N, False), float("-inf"), s)
        acc, m_i, l_i = online_update(acc, m_i, l_i, s, v, DOT_PRECISION, UPCAST)
    for start in range(agg_full, old_hi, BLOCK_N):
        blocks = start + offs_n
        in_range = blocks < old_hi
        k = load_rows(ak_base + blocks[:, None] * HEAD_DIM + offs_d[None, :], in_range, mask_d, EVEN_D, True)
        v = load_rows(av_base + blocks[:, None] * VALUE_DIM + offs_dv[None, :], in_range, mask_dv, EVEN_DV, True)
        bias = tl.load(ab_base + blocks, mask=in_range, other=float("-inf"))
        s = logits(q, k, qk_scale, DOT_PRECISION, UPCAST) + bias[None, :]
        visible = (blocks[None, :] * GROUP_SIZE) < row_local_start[:, None]
        if EXPANDED:
            visible = visible & ~expanded_hit(rows_chosen, start, BLOCK_N, False)
        s = tl.where(visible, s, float("-inf"))
        acc, m_i, l_i = online_update(acc, m_i, l_i, s, v, DOT_PRECISION, UPCAST)

    # ---- (c) raw local keys: the window [(blk_lo - n + 1) * m, q_last], causal + window masks
    k_base = K + b64 * stride_kb + h64 * stride_kh
    v_base = V + b64 * stride_vb + h64 * stride_vh
    for start in range(win_lo, win_hi, BLOCK_N):
        keys = start + offs_n
        in_range = keys < win_hi
        keys64 = keys.to(tl.int64)
        k = load_rows(k_base + keys64[:, None] * stride_kl + offs_d[None, :], in_range, mask_d, EVEN_D, True)
        v = load_rows(v_base + keys64[:, None] * stride_vl + offs_dv[None, :], in_range, mask_dv, EVEN_DV, True)
        s = logits(q, k, qk_scale, DOT_PRECISION, UPCAST)
        visible = (keys[None, :] <= qpos[:, None]) & (keys[None, :] >= row_local_start[:, None])
        s = tl.where(visible, s, float("-inf"))
        acc, m_i, l_i = online_update(acc, m_i, l_i, s, v, DOT_PRECISION, UPCAST)

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
    check_supported(query, "triton_backend.attend_forward")
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
    # with expansion the three streams' output is a partial that `attend_expanded` merges: kept in fp32
    part = out if not x.expand_width or dtype == torch.float32 else torch.empty_like(out, dtype=torch.float32)
    grid = (x.tiles, batch * heads * cfg["HEAD_CHUNKS"])
    _dga_attend_kernel[grid](
        query, key, value, part, lse,
        x.focal_key, x.focal_value, x.focal_pos, x.agg_key, x.agg_value, x.agg_bias, x.lengths, x.counts, x.expanded,
        query.stride(0), query.stride(1), query.stride(2), query.stride(3),
        key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        part.stride(0), part.stride(1), part.stride(2), part.stride(3),
        heads, seq_len, x.focal_key.shape[2], x.agg_key.shape[2], x.tiles, x.expand_width, float(scale) * LOG2E,
        GROUP_SIZE=config.group_size, LOCAL_BLOCKS=config.local_blocks,
        **x.constants,
    )
    if x.expand_width:
        attend_expanded(x, part, lse, out, config.group_size, scale, block_n=block_n)
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
