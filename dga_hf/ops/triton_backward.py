"""Backward pass of the Triton stage-5 kernel (`triton_forward.attend_forward`), FlashAttention-2 style.

The forward saves ``out`` and one natural-log logsumexp ``lse`` per row. With ``P = exp(S - lse)`` over the
row's visible logits ``S`` (three key streams: focal slots, block aggregates with their bias, raw local
keys; see `triton_forward`), ``dS = P * (dO . V^T - D)`` with ``D = rowsum(dO * O)``:
``dQ = scale * dS K``, ``dK = scale * dS^T Q``, ``dV = P^T dO`` per stream. Nothing is L x L: every
kernel recomputes its logits tile by tile from ``lse``. Three small kernels, explicit block sizes
(`plan_backward`):

* ``_bwd_delta_kernel``: ``D = rowsum(dO * O)`` in fp32, ``BLOCK_L`` rows per program, grid
  ``(cdiv(L, BLOCK_L), B * H * G)``.
* ``_bwd_dq_kernel`` (query-major): the forward's grid, tiles and key ranges exactly (`triton_plan`:
  same `plan`, `focal_tile_counts` and `tile_key_ranges`): a program owns ``GP x BLOCK_M`` query rows of one kv head and walks the focal
  prefix, the old aggregates and the local window, unmasked chunks first, accumulating ``dQ`` in fp32.
* ``_bwd_kv_kernel`` (key-major), grid ``(B * H * (focal + aggregate + raw-key chunks),)``:
  a program owns ``BLOCK_N`` consecutive keys of one stream (``_kv_chunk``, specialised per stream at
  compile time) and one kv head, and walks the query tiles that can see them, for all ``G`` query heads
  of the kv head (native GQA: ``GP`` heads stacked per step as in the forward, the ``HEAD_CHUNKS`` loop
  covers the rest), accumulating ``dK`` and ``dV`` in fp32 registers and storing them once. No atomics:
  every key's gradient is owned by exactly one program. The three streams share one launch so that the
  many short raw-key programs fill the GPU around the long focal/aggregate ones (an early focal slot or
  aggregate is seen by every later query); the kv head varies fastest in the grid, so the heaviest chunks
  (the earliest) of every head start first. The query range of a chunk follows from positions:

  - focal slots (sorted by position ``p``): slot ``p`` is seen by rows of blocks ``>= p // m + n``, so
    the chunk's rows are ``[(min p // m + n) * m, length)``; from ``(max p // m + n) * m`` on, every row
    sees every slot of the chunk and the tiles run without a mask (unused slots hold ``L``: never seen);
  - aggregates ``c``: the same with ``p = c * m`` (an empty block has bias ``-inf``: P = 0);
  - raw keys ``j``: rows ``[j, (j // m + n) * m)``, i.e. ``[k0, min(((k0 + BLOCK_N - 1) // m + n) * m,
    length))`` for the chunk ``[k0, k0 + BLOCK_N)``; tiles starting at or after its last key and ending
    inside its first key's window need no mask (the middle of the range when ``n * m > BLOCK_N``).

  Rows past ``length`` (padding) load ``lse = -inf``, which the kernels turn into ``+inf`` so that
  ``P = exp2(S - inf) = 0``: they contribute nothing and their ``dQ`` is 0.

Query-aware expansion (docs/spec.md step 6, ``layout.expanded``; design in `triton_expand`): the dq kernel
and the aggregate programs of the dk/dv kernel hide, per row, the aggregates the row expands (the forward's
mask); the expanded members' gradients come from `triton_expand_backward`'s kernels, launched first, as
fp32 partials [B, H, G, L, d] (dQ) and [B, H, L, d] (dK, dV of raw keys), which the dq kernel and the
raw-key programs add before their single store: deterministic, no atomics, one rounding per gradient.

  Known limit: a chunk of the earliest focal slots or aggregates walks all later queries (O(L) steps),
  so with few kv heads the longest program bounds the launch. If a GPU profile shows that tail, split
  those chunks' query ranges over several programs and sum their partial dK/dV (a [splits, F, d]
  buffer, still no atomics).

float64 falls back to `torch_backend.attend_backward` (same contract), as the forward does.
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
    dot_precision,
    dq_update,
    first_block_seeing_as_old,
    first_local_block,
    grad_rows,
    is_float64,
    kv_update,
    last_dim_contiguous,
    load_rows,
    logits,
    row_lse2,
    upcast,
)
from .triton_expand import expanded_hit, expanded_rows
from .triton_expand_backward import expanded_dk_dv, expanded_dq
from .triton_plan import plan, prepare, tile_key_ranges

# Block sizes. Not tuned on a GPU yet (none was available); chosen from the register reports of
# ptxas for sm_90 (H100/H200) at head dim 128, compiled without a GPU: the 16-bit dq kernel does not
# spill at 128 x 32; the key-major kernels spill a few hundred bytes at 64 x 64 (as does a plain
# FlashAttention-2 dk/dv loop at that size with this Triton); fp32 (tf32x3 dots) spills least at 32 x 32.
# "WIDE" = fp32 operands or head dims > 128.
# D = rowsum(dO * O): rows per program of the preprocess kernel.
DELTA_BLOCK_L = 64
# dq kernel (query-major): query rows (heads x queries) per program, keys per step.
DQ_ROWS_16BIT, DQ_ROWS_WIDE, DQ_KEYS = 128, 32, 32
# dk/dv kernels (key-major): keys per program, query rows (heads x queries) per step, warps.
KV_KEYS_16BIT, KV_ROWS_16BIT = 64, 64
KV_KEYS_WIDE, KV_ROWS_WIDE = 32, 32
KV_WARPS = 8



@triton.jit
def _bwd_delta_kernel(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_og, stride_ol,
    stride_db, stride_dh, stride_dg, stride_dl,
    H, G, L,
    VALUE_DIM: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid = tl.program_id(1)  # (b * H + h) * G + g
    g = pid % G
    bh = pid // G
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = tl.arange(0, BLOCK_DV)
    mask = (rows < L)[:, None] & (cols < VALUE_DIM)[None, :]
    rows64 = rows.to(tl.int64)
    o = tl.load(O + b * stride_ob + h * stride_oh + g * stride_og + rows64[:, None] * stride_ol + cols[None, :],
                mask=mask, other=0.0)
    do = tl.load(DO + b * stride_db + h * stride_dh + g * stride_dg + rows64[:, None] * stride_dl + cols[None, :],
                 mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid.to(tl.int64) * L + rows64, delta, mask=rows < L)


# sizes that change with the sequence length are not specialised on (no recompilation per length)
@triton.jit(do_not_specialize=["H", "L", "F", "NB", "NUM_TILES", "X"])
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA,
    FK, FV, FP, AK, AV, AB, LENS, FCNT, EXP, PDQ,
    stride_qb, stride_qh, stride_qg, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_db, stride_dh, stride_dg, stride_dl,
    stride_gb, stride_gh, stride_gg, stride_gl,
    H, L, F, NB, NUM_TILES, X, qk_scale, scale,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    GROUP_SIZE: tl.constexpr, LOCAL_BLOCKS: tl.constexpr,
    HEADS_PER_PROG: tl.constexpr, HEAD_CHUNKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, EXPANDED: tl.constexpr, BLOCK_X: tl.constexpr,
):
    """One program per (query tile, kv head, head chunk), the forward kernel's tiles and key ranges (and
    its expansion mask of the aggregates); with EXPANDED it adds the expanded members' dq (PDQ, fp32
    [B, H, G, L, D] contiguous, scaled) before its store."""
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
    g64 = g.to(tl.int64)
    qpos = q0 + rows % BLOCK_M
    qpos64 = qpos.to(tl.int64)
    row_real = qpos < length
    qblk = qpos // GROUP_SIZE
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_d = offs_d < HEAD_DIM
    mask_dv = offs_dv < VALUE_DIM

    q = load_rows(Q + b64 * stride_qb + h64 * stride_qh + (g64 * stride_qg + qpos64 * stride_ql)[:, None]
                   + offs_d[None, :], row_real, mask_d, EVEN_D, True)
    do = load_rows(DO + b64 * stride_db + h64 * stride_dh + (g64 * stride_dg + qpos64 * stride_dl)[:, None]
                    + offs_dv[None, :], row_real, mask_dv, EVEN_DV, True)
    row_off = (bh64 * (HEADS_PER_PROG * HEAD_CHUNKS) + g64) * L + qpos64
    lse2 = row_lse2(LSE, row_off, row_real)
    delta = tl.load(DELTA + row_off, mask=row_real, other=0.0)
    dq = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)

    # ---- the key ranges this tile can see: exactly the forward's
    focal_lo, focal_hi, old_lo, old_hi, win_lo, win_hi = tile_key_ranges(
        FCNT, bh64, tile, q0, length, NUM_TILES, BLOCK_M, GROUP_SIZE, LOCAL_BLOCKS)
    row_local_start = first_local_block(qblk, LOCAL_BLOCKS) * GROUP_SIZE
    offs_n = tl.arange(0, BLOCK_N)

    # ---- (a) focal keys
    fk_base = FK + bh64 * F * HEAD_DIM
    fv_base = FV + bh64 * F * VALUE_DIM
    fp_base = FP + bh64 * F
    focal_full = (focal_lo // BLOCK_N) * BLOCK_N
    for start in range(0, focal_full, BLOCK_N):
        slots = start + offs_n
        k = load_rows(fk_base + slots[:, None] * HEAD_DIM + offs_d[None, :], slots < F, mask_d, EVEN_D, False)
        v = load_rows(fv_base + slots[:, None] * VALUE_DIM + offs_dv[None, :], slots < F, mask_dv, EVEN_DV, False)
        s = logits(q, k, qk_scale, DOT_PRECISION, UPCAST)
        dq = dq_update(dq, s, do, lse2, delta, k, v, DOT_PRECISION, UPCAST)
    for start in range(focal_full, focal_hi, BLOCK_N):
        slots = start + offs_n
        in_range = slots < focal_hi
        k = load_rows(fk_base + slots[:, None] * HEAD_DIM + offs_d[None, :], in_range, mask_d, EVEN_D, True)
        v = load_rows(fv_base + slots[:, None] * VALUE_DIM + offs_dv[None, :], in_range, mask_dv, EVEN_DV, True)
        fpos = tl.load(fp_base + slots, mask=in_range, other=2147483647)
        s = logits(q, k, qk_scale, DOT_PRECISION, UPCAST)
        s = tl.where(fpos[None, :] < row_local_start[:, None], s, float("-inf"))
        dq = dq_update(dq, s, do, lse2, delta, k, v, DOT_PRECISION, UPCAST)

    # ---- (b) aggregates of old blocks, but those the row expands
    if EXPANDED:
        rows_chosen = expanded_rows(EXP + (bh64 * L + qpos64) * X, row_real, X, NB, BLOCK_X)
    ak_base = AK + bh64 * NB * HEAD_DIM
    av_base = AV + bh64 * NB * VALUE_DIM
    ab_base = AB + bh64 * NB
    agg_full = (old_lo // BLOCK_N) * BLOCK_N
    for start in range(0, agg_full, BLOCK_N):
        blocks = start + offs_n
        k = load_rows(ak_base + blocks[:, None] * HEAD_DIM + offs_d[None, :], blocks < NB, mask_d, EVEN_D, False)
        v = load_rows(av_base + blocks[:, None] * VALUE_DIM + offs_dv[None, :], blocks < NB, mask_dv, EVEN_DV, False)
        bias = tl.load(ab_base + blocks)
        s = logits(q, k, qk_scale, DOT_PRECISION, UPCAST) + bias[None, :]
        if EXPANDED:
            s = tl.where(expanded_hit(rows_chosen, start, BLOCK_N, False), float("-inf"), s)
        dq = dq_update(dq, s, do, lse2, delta, k, v, DOT_PRECISION, UPCAST)
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
        dq = dq_update(dq, s, do, lse2, delta, k, v, DOT_PRECISION, UPCAST)

    # ---- (c) raw local keys
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
        dq = dq_update(dq, s, do, lse2, delta, k, v, DOT_PRECISION, UPCAST)

    dq = dq * scale
    if EXPANDED:
        rows_off = ((bh64 * (HEADS_PER_PROG * HEAD_CHUNKS) + g64) * L + qpos64) * HEAD_DIM
        dq += tl.load(PDQ + rows_off[:, None] + offs_d[None, :], mask=(qpos < L)[:, None] & mask_d[None, :], other=0.0)
    tl.store(DQ + b64 * stride_gb + h64 * stride_gh + (g64 * stride_gg + qpos64 * stride_gl)[:, None] + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=(qpos < L)[:, None] & mask_d[None, :])


@triton.jit
def _kv_step(
    dk, dv, k, v, kpos, key0, bias, start, length, bh64,
    Q, DO, LSE, DELTA, EXP,
    stride_qb, stride_qh, stride_qg, stride_ql,
    stride_db, stride_dh, stride_dg, stride_dl,
    H, L, X, NKEYS, qk_scale,
    STREAM: tl.constexpr, MASKED: tl.constexpr,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    GROUP_SIZE: tl.constexpr, LOCAL_BLOCKS: tl.constexpr,
    HEADS_PER_PROG: tl.constexpr, HEAD_CHUNKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, EXPANDED: tl.constexpr, BLOCK_X: tl.constexpr,
):
    """Add the contribution of queries [start, start + BLOCK_M) of all G heads to a key chunk's dk, dv
    (unscaled: dk = sum dS^T q). MASKED: apply the stream's visibility mask (else every row of the tile
    sees every key of the chunk, up to padding rows, which lse = +inf silences). EXPANDED: an aggregate
    (STREAM 1, the chunk's blocks from ``key0``) is hidden from the rows that expand it, masked or not."""
    BLOCK_R: tl.constexpr = HEADS_PER_PROG * BLOCK_M
    rows = tl.arange(0, BLOCK_R)
    qpos = start + rows % BLOCK_M
    qpos64 = qpos.to(tl.int64)
    row_real = qpos < length
    b64 = bh64 // H
    h64 = bh64 % H
    q_base = Q + b64 * stride_qb + h64 * stride_qh
    do_base = DO + b64 * stride_db + h64 * stride_dh
    if STREAM == 1 and EXPANDED:  # the same rows for every head chunk
        rows_chosen = expanded_rows(EXP + (bh64 * L + qpos64) * X, row_real, X, NKEYS, BLOCK_X)
        expands = expanded_hit(rows_chosen, key0, BLOCK_N, True)
    for chunk in range(HEAD_CHUNKS):
        g64 = (chunk * HEADS_PER_PROG + rows // BLOCK_M).to(tl.int64)
        q, do, lse2, delta = grad_rows(Q, DO, LSE, DELTA, q_base, do_base, g64, qpos64, row_real,
                                       HEADS_PER_PROG * HEAD_CHUNKS, bh64, L, stride_qg, stride_ql, stride_dg,
                                       stride_dl, HEAD_DIM, VALUE_DIM, BLOCK_D, BLOCK_DV)
        st = logits(k, q, qk_scale, DOT_PRECISION, UPCAST)  # [N, R] = S^T, log2 units
        if STREAM == 1:
            st = st + bias[:, None]
            if EXPANDED:
                st = tl.where(expands, float("-inf"), st)
        if MASKED:
            row_local_start = first_local_block(qpos // GROUP_SIZE, LOCAL_BLOCKS) * GROUP_SIZE
            if STREAM == 2:
                visible = (kpos[:, None] <= qpos[None, :]) & (kpos[:, None] >= row_local_start[None, :])
            else:  # focal position / aggregate block start is old for the row's block
                visible = kpos[:, None] < row_local_start[None, :]
            st = tl.where(visible, st, float("-inf"))
        dk, dv = kv_update(dk, dv, st, q, do, v, lse2, delta, DOT_PRECISION, UPCAST)
    return dk, dv


@triton.jit
def _kv_chunk(
    chunk, bh, Q, DO, LSE, DELTA, K, V, DK, DV, KPOS, BIAS, LENS, EXP, PDK, PDV,
    stride_qb, stride_qh, stride_qg, stride_ql,
    stride_db, stride_dh, stride_dg, stride_dl,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    H, L, NKEYS, X, qk_scale, scale,
    STREAM: tl.constexpr,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    GROUP_SIZE: tl.constexpr, LOCAL_BLOCKS: tl.constexpr,
    HEADS_PER_PROG: tl.constexpr, HEAD_CHUNKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, EXPANDED: tl.constexpr, BLOCK_X: tl.constexpr,
):
    """dK, dV of keys [chunk * BLOCK_N, (chunk + 1) * BLOCK_N) of stream STREAM for kv head bh.
    STREAM 0: focal slots (KPOS = their positions), 1: aggregates (BIAS = their log2 bias), 2: raw keys.
    DK / DV are contiguous [B, H, NKEYS, d]. EXPANDED: aggregates are hidden from the rows that expand
    them (EXP), and raw keys add the expanded members' gradients (PDK / PDV, fp32 [B, H, L, d], scaled)."""
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM
    EVEN_DV: tl.constexpr = BLOCK_DV == VALUE_DIM
    m: tl.constexpr = GROUP_SIZE
    n: tl.constexpr = LOCAL_BLOCKS

    b = bh // H
    bh64 = bh.to(tl.int64)
    b64 = b.to(tl.int64)
    h64 = (bh % H).to(tl.int64)
    length = tl.load(LENS + b)
    k0 = chunk * BLOCK_N
    keys = k0 + tl.arange(0, BLOCK_N)
    key_ok = keys < NKEYS
    keys64 = keys.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_d = offs_d < HEAD_DIM
    mask_dv = offs_dv < VALUE_DIM
    k = load_rows(K + b64 * stride_kb + h64 * stride_kh + keys64[:, None] * stride_kl + offs_d[None, :],
                   key_ok, mask_d, EVEN_D, True)
    v = load_rows(V + b64 * stride_vb + h64 * stride_vh + keys64[:, None] * stride_vl + offs_dv[None, :],
                   key_ok, mask_dv, EVEN_DV, True)

    # Query range [q_lo, q_hi) that can see some key of the chunk; tiles start at q_lo + t * BLOCK_M.
    # Tiles [0, t_full) and [t_end, num_tiles) are masked; tiles [t_full, t_end) start at or after q_full
    # and end at or before full_hi, so every row sees every key (up to padding rows: lse = +inf).
    # (Every numerator of // below is >= 0, so it is the same in every integer-division convention.)
    bias = tl.zeros([BLOCK_N], dtype=tl.float32)
    if STREAM == 0:
        kpos = tl.load(KPOS + bh64 * NKEYS + keys, mask=key_ok, other=L)  # sorted; unused slots hold L
        q_lo = first_block_seeing_as_old(tl.min(kpos, 0) // m, n) * m
        q_full = first_block_seeing_as_old(tl.max(kpos, 0) // m, n) * m
        q_hi = length
    elif STREAM == 1:
        kpos = keys * m  # first position of the aggregated block
        bias = tl.load(BIAS + bh64 * NKEYS + keys, mask=key_ok, other=float("-inf"))
        q_lo = first_block_seeing_as_old(k0, n) * m
        q_full = first_block_seeing_as_old(k0 + BLOCK_N - 1, n) * m
        q_hi = length
    else:
        kpos = keys
        q_lo = k0
        q_full = k0 + BLOCK_N - 1  # causal for every key of the chunk
        q_hi = tl.minimum(first_block_seeing_as_old((k0 + BLOCK_N - 1) // m, n) * m, length)
    num_tiles = tl.cdiv(tl.maximum(q_hi - q_lo, 0), BLOCK_M)
    t_full = tl.minimum(tl.cdiv(q_full - q_lo, BLOCK_M), num_tiles)
    if STREAM == 2:
        full_hi = first_block_seeing_as_old(k0 // m, n) * m  # inside the first key's window, so inside every key's (> q_lo)
        t_end = tl.maximum(tl.minimum((full_hi - q_lo) // BLOCK_M, num_tiles), t_full)
    else:
        t_end = num_tiles  # old blocks stay visible to every later row

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for t in range(0, t_full):
        dk, dv = _kv_step(dk, dv, k, v, kpos, k0, bias, q_lo + t * BLOCK_M, length, bh64, Q, DO, LSE, DELTA, EXP,
                          stride_qb, stride_qh, stride_qg, stride_ql, stride_db, stride_dh, stride_dg, stride_dl,
                          H, L, X, NKEYS, qk_scale, STREAM, True, HEAD_DIM, VALUE_DIM, BLOCK_D, BLOCK_DV,
                          GROUP_SIZE, LOCAL_BLOCKS, HEADS_PER_PROG, HEAD_CHUNKS, BLOCK_M, BLOCK_N, DOT_PRECISION, UPCAST,
                          EXPANDED, BLOCK_X)
    for t in range(t_full, t_end):
        dk, dv = _kv_step(dk, dv, k, v, kpos, k0, bias, q_lo + t * BLOCK_M, length, bh64, Q, DO, LSE, DELTA, EXP,
                          stride_qb, stride_qh, stride_qg, stride_ql, stride_db, stride_dh, stride_dg, stride_dl,
                          H, L, X, NKEYS, qk_scale, STREAM, False, HEAD_DIM, VALUE_DIM, BLOCK_D, BLOCK_DV,
                          GROUP_SIZE, LOCAL_BLOCKS, HEADS_PER_PROG, HEAD_CHUNKS, BLOCK_M, BLOCK_N, DOT_PRECISION, UPCAST,
                          EXPANDED, BLOCK_X)
    for t in range(t_end, num_tiles):
        dk, dv = _kv_step(dk, dv, k, v, kpos, k0, bias, q_lo + t * BLOCK_M, length, bh64, Q, DO, LSE, DELTA, EXP,
                          stride_qb, stride_qh, stride_qg, stride_ql, stride_db, stride_dh, stride_dg, stride_dl,
                          H, L, X, NKEYS, qk_scale, STREAM, True, HEAD_DIM, VALUE_DIM, BLOCK_D, BLOCK_DV,
                          GROUP_SIZE, LOCAL_BLOCKS, HEADS_PER_PROG, HEAD_CHUNKS, BLOCK_M, BLOCK_N, DOT_PRECISION, UPCAST,
                          EXPANDED, BLOCK_X)

    dk = dk * scale
    out = bh64 * NKEYS + keys64
    if STREAM == 2 and EXPANDED:
        dk += tl.load(PDK + out[:, None] * HEAD_DIM + offs_d[None, :], mask=key_ok[:, None] & mask_d[None, :], other=0.0)
        dv += tl.load(PDV + out[:, None] * VALUE_DIM + offs_dv[None, :], mask=key_ok[:, None] & mask_dv[None, :],
                      other=0.0)
    tl.store(DK + out[:, None] * HEAD_DIM + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=key_ok[:, None] & mask_d[None, :])
    tl.store(DV + out[:, None] * VALUE_DIM + offs_dv[None, :], dv.to(DV.dtype.element_ty),
             mask=key_ok[:, None] & mask_dv[None, :])


@triton.jit(do_not_specialize=["BH", "H", "L", "F", "NB", "FOCAL_CHUNKS", "AGG_CHUNKS", "X"])
def _bwd_kv_kernel(
    Q, DO, LSE, DELTA, LENS, EXP,
    FK, FV, DFK, DFV, FP,
    AK, AV, DAK, DAV, AB,
    K, V, DK, DV, PDK, PDV,
    stride_qb, stride_qh, stride_qg, stride_ql,
    stride_db, stride_dh, stride_dg, stride_dl,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    BH, H, L, F, NB, FOCAL_CHUNKS, AGG_CHUNKS, X, qk_scale, scale,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    GROUP_SIZE: tl.constexpr, LOCAL_BLOCKS: tl.constexpr,
    HEADS_PER_PROG: tl.constexpr, HEAD_CHUNKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, EXPANDED: tl.constexpr, BLOCK_X: tl.constexpr,
):
    """Grid (B * H * (focal chunks + aggregate chunks + raw-key chunks),): program p takes chunk p // BH
    of the concatenated streams for kv head p % BH. One launch for the three streams, so the many short
    raw-key programs fill the GPU around the few long focal/aggregate ones (which see every later query);
    with the kv head varying fastest, the heaviest chunks (earliest focal slots and aggregates) of every
    head start first. (A 1-D grid: no 65535 limit on the chunk count.) Focal / aggregate tensors and their
    gradients are contiguous [B, H, F or NB, d]; EXP, PDK, PDV: see `_kv_chunk`."""
    bh = tl.program_id(0) % BH
    pid = tl.program_id(0) // BH
    F64 = F.to(tl.int64)  # strides of the [B, H, F, d] / [B, H, NB, d] tensors, in int64
    NB64 = NB.to(tl.int64)
    if pid < FOCAL_CHUNKS:
        _kv_chunk(pid, bh, Q, DO, LSE, DELTA, FK, FV, DFK, DFV, FP, AB, LENS, EXP, PDK, PDV,
                  stride_qb, stride_qh, stride_qg, stride_ql, stride_db, stride_dh, stride_dg, stride_dl,
                  H * F64 * HEAD_DIM, F64 * HEAD_DIM, HEAD_DIM, H * F64 * VALUE_DIM, F64 * VALUE_DIM, VALUE_DIM,
                  H, L, F, X, qk_scale, scale, 0, HEAD_DIM, VALUE_DIM, BLOCK_D, BLOCK_DV, GROUP_SIZE, LOCAL_BLOCKS,
                  HEADS_PER_PROG, HEAD_CHUNKS, BLOCK_M, BLOCK_N, DOT_PRECISION, UPCAST, EXPANDED, BLOCK_X)
    elif pid < FOCAL_CHUNKS + AGG_CHUNKS:
        _kv_chunk(pid - FOCAL_CHUNKS, bh, Q, DO, LSE, DELTA, AK, AV, DAK, DAV, FP, AB, LENS, EXP, PDK, PDV,
                  stride_qb, stride_qh, stride_qg, stride_ql, stride_db, stride_dh, stride_dg, stride_dl,
                  H * NB64 * HEAD_DIM, NB64 * HEAD_DIM, HEAD_DIM, H * NB64 * VALUE_DIM, NB64 * VALUE_DIM, VALUE_DIM,
                  H, L, NB, X, qk_scale, scale, 1, HEAD_DIM, VALUE_DIM, BLOCK_D, BLOCK_DV, GROUP_SIZE, LOCAL_BLOCKS,
                  HEADS_PER_PROG, HEAD_CHUNKS, BLOCK_M, BLOCK_N, DOT_PRECISION, UPCAST, EXPANDED, BLOCK_X)
    else:
        _kv_chunk(pid - FOCAL_CHUNKS - AGG_CHUNKS, bh, Q, DO, LSE, DELTA, K, V, DK, DV, FP, AB, LENS, EXP, PDK, PDV,
                  stride_qb, stride_qh, stride_qg, stride_ql, stride_db, stride_dh, stride_dg, stride_dl,
                  stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
                  H, L, L, X, qk_scale, scale, 2, HEAD_DIM, VALUE_DIM, BLOCK_D, BLOCK_DV, GROUP_SIZE, LOCAL_BLOCKS,
                  HEADS_PER_PROG, HEAD_CHUNKS, BLOCK_M, BLOCK_N, DOT_PRECISION, UPCAST, EXPANDED, BLOCK_X)


def plan_backward(group: int, dtype: torch.dtype, head_dim: int, value_dim: int, *, block_rows: int | None = None,
                  block_n: int | None = None) -> tuple[dict, dict]:
    """Tiles of the dq kernel and of the dk/dv kernels (`triton_plan.plan` dicts). ``block_rows`` /
    ``block_n`` override both (rows = heads x queries per program or step, keys per step or program)."""
    wide = dtype == torch.float32 or max(head_dim, value_dim) > 128
    dq = plan(group, dtype, head_dim, value_dim, block_rows=block_rows or (DQ_ROWS_WIDE if wide else DQ_ROWS_16BIT),
              block_n=block_n or DQ_KEYS)
    kv = plan(group, dtype, head_dim, value_dim, block_rows=block_rows or (KV_ROWS_WIDE if wide else KV_ROWS_16BIT),
              block_n=block_n or (KV_KEYS_WIDE if wide else KV_KEYS_16BIT))
    kv["num_warps"] = KV_WARPS
    return dq, kv


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
    *,
    block_rows: int | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """Gradients of `triton_forward.attend_forward` (``out``, ``lse`` are its results) for ``grad_out``:
    (grad_query, grad_key, grad_value, grad_focal_key, grad_focal_value, grad_agg_key, grad_agg_value),
    each with the shape and dtype of its input (the layout's tensors: those of ``layout.focal_key`` etc.);
    fp32 accumulation. No gradient for agg_bias, focal_pos or lengths. Rows with lse = -inf contribute
    nothing. float64 falls back to `torch_backend.attend_backward`."""
    if is_float64(query, key, value):
        # Documented fallback, as in the forward: the PyTorch backend computes the same gradients in fp64.
        return torch_backend.attend_backward(query, key, value, layout, config, scale, out, lse, grad_out)
    check_supported(query, "triton_backend.attend_backward")
    group, head_dim = query.shape[2], query.shape[-1]
    value_dim = value.shape[-1]
    dtype = query.dtype
    device = query.device
    grads = [
        torch.empty_like(query, memory_format=torch.contiguous_format),
        torch.empty(key.shape, dtype=key.dtype, device=device),
        torch.empty(value.shape, dtype=value.dtype, device=device),
        *(torch.empty(x.shape, dtype=x.dtype, device=device)
          for x in (layout.focal_key, layout.focal_value, layout.agg_key, layout.agg_value)),
    ]
    if query.numel() == 0 or key.numel() == 0:
        return tuple(g.zero_() for g in grads)

    dq_cfg, kv_cfg = plan_backward(group, dtype, head_dim, value_dim, block_rows=block_rows, block_n=block_n)
    x = prepare(query, key, value, layout, config, dq_cfg)
    query, key, value = x.query, x.key, x.value
    grad_out = last_dim_contiguous(grad_out.to(dtype))
    out = last_dim_contiguous(out)
    lse = lse.float().contiguous()
    delta = _row_dots(out, grad_out, dq_cfg["BLOCK_DV"])
    # the expanded members' gradients first (fp32 partials), which the three-stream kernels add to theirs
    grad_query_expanded = grad_key_expanded = grad_value_expanded = delta  # placeholders: EXPANDED is off
    if x.expand_width:
        grad_query_expanded = expanded_dq(x, grad_out, lse, delta, config.group_size, scale, block_n=block_n)
        grad_key_expanded, grad_value_expanded = expanded_dk_dv(x, grad_out, lse, delta, config.group_size, scale, kv_cfg)
    _launch_dq(x, grad_out, lse, delta, grads[0], grad_query_expanded, config, scale, dq_cfg)
    _launch_dk_dv(x, grad_out, lse, delta, grads, (grad_key_expanded, grad_value_expanded), layout.focal_key.shape[2],
                  config, scale, kv_cfg)
    return tuple(grads)


def _row_dots(out: torch.Tensor, grad_out: torch.Tensor, block_dv: int) -> torch.Tensor:
    """D = rowsum(dO * O), [B, H, G, L] in float32."""
    batch, heads, group, seq_len, value_dim = out.shape
    delta = torch.empty(batch, heads, group, seq_len, dtype=torch.float32, device=out.device)
    _bwd_delta_kernel[(triton.cdiv(seq_len, DELTA_BLOCK_L), batch * heads * group)](
        out, grad_out, delta,
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), grad_out.stride(3),
        heads, group, seq_len,
        VALUE_DIM=value_dim, BLOCK_DV=block_dv, BLOCK_L=DELTA_BLOCK_L,
    )
    return delta


def _launch_dq(x, grad_out, lse, delta, dq, dq_expanded, config: DGAConfig, scale: float, dq_cfg: dict) -> None:
    """dq, query-major: one program per query tile and chunk of a kv head's query heads (plus
    ``dq_expanded``, the expanded members' fp32 partial, with expansion)."""
    query, key, value = x.query, x.key, x.value
    batch, heads, _, seq_len, _ = query.shape
    _bwd_dq_kernel[(x.tiles, batch * heads * dq_cfg["HEAD_CHUNKS"])](
        query, key, value, grad_out, dq, lse, delta,
        x.focal_key, x.focal_value, x.focal_pos, x.agg_key, x.agg_value, x.agg_bias, x.lengths, x.counts,
        x.expanded, dq_expanded,
        query.stride(0), query.stride(1), query.stride(2), query.stride(3),
        key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), grad_out.stride(3),
        dq.stride(0), dq.stride(1), dq.stride(2), dq.stride(3),
        heads, seq_len, x.focal_key.shape[2], x.agg_key.shape[2], x.tiles, x.expand_width, float(scale) * LOG2E,
        float(scale), GROUP_SIZE=config.group_size, LOCAL_BLOCKS=config.local_blocks,
        **x.constants,
    )


def _launch_dk_dv(x, grad_out, lse, delta, grads: list, expanded: tuple, num_focal: int, config: DGAConfig,
                  scale: float, kv_cfg: dict) -> None:
    """dk, dv: key-major, the three streams in one launch (one program per kv head and chunk of any stream).
    `grads`: the seven gradient tensors of `attend_backward`, written in place; `expanded`: the expanded
    members' fp32 partial dk, dv (added to the raw keys' with expansion)."""
    query, key, value = x.query, x.key, x.value
    batch, heads, _, seq_len, head_dim = query.shape
    dtype = query.dtype
    num_blocks = x.agg_key.shape[2]
    block_keys = kv_cfg["BLOCK_N"]
    focal_chunks, agg_chunks = triton.cdiv(num_focal, block_keys), triton.cdiv(num_blocks, block_keys)
    chunks = focal_chunks + agg_chunks + triton.cdiv(seq_len, block_keys)
    # no focal slot at all: no focal program runs, any valid tensor serves as the focal gradients' pointer
    grad_fk, grad_fv = (grads[3], grads[4]) if num_focal else (x.focal_key, x.focal_value)
    dk, dv = grads[1], grads[2]
    assert dk.is_contiguous() and dv.is_contiguous()
    _bwd_kv_kernel[(batch * heads * chunks,)](
        query, grad_out, lse, delta, x.lengths, x.expanded,
        x.focal_key, x.focal_value, grad_fk, grad_fv, x.focal_pos,
        x.agg_key, x.agg_value, grads[5], grads[6], x.agg_bias,
        key, value, dk, dv, *expanded,
        query.stride(0), query.stride(1), query.stride(2), query.stride(3),
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), grad_out.stride(3),
        key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        batch * heads, heads, seq_len, num_focal, num_blocks, focal_chunks, agg_chunks, x.expand_width,
        float(scale) * LOG2E, float(scale),
        HEAD_DIM=head_dim, VALUE_DIM=value.shape[-1], BLOCK_D=kv_cfg["BLOCK_D"], BLOCK_DV=kv_cfg["BLOCK_DV"],
        GROUP_SIZE=config.group_size, LOCAL_BLOCKS=config.local_blocks,
        HEADS_PER_PROG=kv_cfg["HEADS_PER_PROG"], HEAD_CHUNKS=kv_cfg["HEAD_CHUNKS"],
        BLOCK_M=kv_cfg["BLOCK_M"], BLOCK_N=block_keys,
        DOT_PRECISION=dot_precision(dtype), UPCAST=upcast(dtype),
        EXPANDED=x.constants["EXPANDED"], BLOCK_X=x.constants["BLOCK_X"],
        num_warps=kv_cfg["num_warps"], num_stages=kv_cfg["num_stages"],
    )


__all__ = ["attend_backward", "plan_backward"]
