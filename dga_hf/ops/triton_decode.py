"""Triton kernels of one DGA decoding step: the attention of one new token per row over a decode state.

Contract: one step of the decoding rule (docs/decoding.md), as transcribed in
`dga_hf.ops.naive.decoding` (the PyTorch path of a one-token step,
`dga_hf.decoding.steps.attend_packed`, computes the same). For the new token
of row ``b`` (kv head ``h``, its ``G`` query heads), with ``first`` = the first position of its local
window, one softmax over

  (a) focal slots ``[0, focal_hi)`` at positions ``focal_pos < first`` whose block is not expanded;
  (b) aggregates of blocks ``c < first / m`` (``c < old_blocks``) that are not expanded, with their bias;
  (c) the raw tokens of the expanded blocks (keep_full; chosen by docs/spec.md step 6 in PyTorch,
      `dga_hf.ops.layout.choose_expanded`, as for the prefill): ``expanded_blocks[b, h, e]``, tokens
      ``c * m .. c * m + m - 1`` of the archive, for the entries with ``expanded_usable``;
  (d) the ring: slots whose position is ``>= first`` (empty slots hold -1).

Flash-decoding: one new token is too little work for one program per kv head (a GPU has 100+ cores), so
the four streams are cut into chunks of ``CHUNK_ITERS * BLOCK_N`` keys and each program folds one chunk
into a partial (running max, sum, accumulator) with the online softmax; a second kernel merges a row's
partials. The ``G`` query heads of a kv head are the rows of each ``tl.dot`` (padded to 16): keys are
loaded once for all of them. Masks come from positions, never from a stored mask. Rows that see nothing
output 0.

On CPU tensors the kernels run only under Triton's interpreter (``TRITON_INTERPRET=1``), as the prefill
kernels do; that is how the test-suite checks them against the PyTorch path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import LOG2E, check_supported, dot_precision, load_rows, logits, online_update, upcast

LOG2E_CONST = tl.constexpr(LOG2E)  # aggregate biases are natural-log; the online softmax works in base 2

@triton.jit
def _fold_chunk(acc, m_i, l_i, q, k_ptrs, v_ptrs, visible, bias, in_range, mask_d, mask_dv, qk_scale,
                EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    k = load_rows(k_ptrs, in_range, mask_d, EVEN_D, True)
    v = load_rows(v_ptrs, in_range, mask_dv, EVEN_DV, True)
    s = logits(q, k, qk_scale, DOT_PRECISION, UPCAST) + bias[None, :]
    s = tl.where(visible[None, :], s, float("-inf"))
    return online_update(acc, m_i, l_i, s, v, DOT_PRECISION, UPCAST)


# everything that changes from step to step is a runtime argument: no recompilation while decoding
@triton.jit(do_not_specialize=["H", "FOCAL_HI", "OLD_BLOCKS", "EXPANDED", "N_FOCAL", "N_AGG", "N_EXP", "N_CHUNKS"])
def _decode_partial_kernel(
    Q, PART_M, PART_L, PART_ACC, FIRST,
    FK, FV, FP, AK, AV, AB, XMASK, XBLK, XUSE, XK, XV, RK, RV, RP,
    stride_fk, stride_fv, stride_fp, stride_ak, stride_av, stride_ab,
    stride_xk, stride_xv, stride_rk, stride_rv, stride_rp,
    H, FOCAL_HI, OLD_BLOCKS, EXPANDED, N_FOCAL, N_AGG, N_EXP, N_CHUNKS, qk_scale,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, GROUP_SIZE: tl.constexpr, RING: tl.constexpr,
    BLOCK_N: tl.constexpr, CHUNK_ITERS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Strides: per (b, h) item for [B, H, N, d] buffers (stride_*k, rows contiguous, last dim 1) and per
    row b for ring positions; the row stride of every [B, H, N, d] buffer is its last-but-one dim = d."""
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM
    EVEN_DV: tl.constexpr = BLOCK_DV == VALUE_DIM
    CHUNK: tl.constexpr = BLOCK_N * CHUNK_ITERS
    chunk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    bh64 = bh.to(tl.int64)
    b64 = b.to(tl.int64)

    rows = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < HEAD_DIM
    mask_dv = offs_dv < VALUE_DIM
    q = load_rows(Q + (bh64 * GROUP + rows)[:, None] * HEAD_DIM + offs_d[None, :], rows < GROUP, mask_d, EVEN_D, True)
    first = tl.load(FIRST + b)  # int64: the first position of the row's local window
    zero = tl.zeros([BLOCK_N], dtype=tl.float32)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], dtype=tl.float32)

    if chunk < N_FOCAL:  # (a) focal slots: old (position < first) and not in an expanded block
        lo = chunk * CHUNK
        for it in range(CHUNK_ITERS):
            slots = lo + it * BLOCK_N + offs_n
            in_range = slots < FOCAL_HI
            pos = tl.load(FP + bh64 * stride_fp + slots, mask=in_range, other=first)
            visible = in_range & (pos < first)
            if EXPANDED > 0:
                hit = tl.load(XMASK + bh64 * OLD_BLOCKS + pos // GROUP_SIZE, mask=visible, other=0)
                visible = visible & (hit == 0)
            acc, m_i, l_i = _fold_chunk(
                acc, m_i, l_i, q,
                FK + bh64 * stride_fk + slots.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :],
                FV + bh64 * stride_fv + slots.to(tl.int64)[:, None] * VALUE_DIM + offs_dv[None, :],
                visible, zero, in_range, mask_d, mask_dv, qk_scale, EVEN_D, EVEN_DV, DOT_PRECISION, UPCAST)
    elif chunk < N_FOCAL + N_AGG:  # (b) aggregates of old blocks that are not expanded, + their bias
        lo = (chunk - N_FOCAL) * CHUNK
        for it in range(CHUNK_ITERS):
            blocks = lo + it * BLOCK_N + offs_n
            in_range = blocks < OLD_BLOCKS
            visible = in_range & (blocks.to(tl.int64) * GROUP_SIZE < first)
            if EXPANDED > 0:
                hit = tl.load(XMASK + bh64 * OLD_BLOCKS + blocks, mask=in_range, other=0)
                visible = visible & (hit == 0)
            bias = tl.load(AB + bh64 * stride_ab + blocks, mask=visible, other=0.0) * LOG2E_CONST
            acc, m_i, l_i = _fold_chunk(
                acc, m_i, l_i, q,
                AK + bh64 * stride_ak + blocks.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :],
                AV + bh64 * stride_av + blocks.to(tl.int64)[:, None] * VALUE_DIM + offs_dv[None, :],
                visible, bias, in_range, mask_d, mask_dv, qk_scale, EVEN_D, EVEN_DV, DOT_PRECISION, UPCAST)
    elif chunk < N_FOCAL + N_AGG + N_EXP:  # (c) raw tokens of the expanded blocks, from the archive
        lo = (chunk - N_FOCAL - N_AGG) * CHUNK
        for it in range(CHUNK_ITERS):
            items = lo + it * BLOCK_N + offs_n
            in_range = items < EXPANDED * GROUP_SIZE
            entry = items // GROUP_SIZE
            block = tl.load(XBLK + bh64 * EXPANDED + entry, mask=in_range, other=0)
            usable = tl.load(XUSE + bh64 * EXPANDED + entry, mask=in_range, other=0)
            token = (block * GROUP_SIZE + items % GROUP_SIZE).to(tl.int64)
            acc, m_i, l_i = _fold_chunk(
                acc, m_i, l_i, q,
                XK + bh64 * stride_xk + token[:, None] * HEAD_DIM + offs_d[None, :],
                XV + bh64 * stride_xv + token[:, None] * VALUE_DIM + offs_dv[None, :],
                in_range & (usable != 0), zero, in_range, mask_d, mask_dv, qk_scale, EVEN_D, EVEN_DV,
                DOT_PRECISION, UPCAST)
    else:  # (d) the ring: the local window (positions >= first; empty slots hold -1)
        lo = (chunk - N_FOCAL - N_AGG - N_EXP) * CHUNK
        for it in range(CHUNK_ITERS):
            slots = lo + it * BLOCK_N + offs_n
            in_range = slots < RING
            pos = tl.load(RP + b64 * stride_rp + slots, mask=in_range, other=-1)
            acc, m_i, l_i = _fold_chunk(
                acc, m_i, l_i, q,
                RK + bh64 * stride_rk + slots.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :],
                RV + bh64 * stride_rv + slots.to(tl.int64)[:, None] * VALUE_DIM + offs_dv[None, :],
                in_range & (pos >= first), zero, in_range, mask_d, mask_dv, qk_scale, EVEN_D, EVEN_DV,
                DOT_PRECISION, UPCAST)

    part = bh64 * N_CHUNKS + chunk
    tl.store(PART_M + part * BLOCK_G + rows, m_i)
    tl.store(PART_L + part * BLOCK_G + rows, l_i)
    tl.store(PART_ACC + (part * BLOCK_G + rows)[:, None] * BLOCK_DV + offs_dv[None, :], acc)


@triton.jit(do_not_specialize=["N_CHUNKS"])
def _decode_merge_kernel(PART_M, PART_L, PART_ACC, O, N_CHUNKS,
                         VALUE_DIM: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_DV: tl.constexpr):
    """O[b, h, g] = the softmax-weighted merge of the item's partials; 0 where no key was visible."""
    bh64 = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_G)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], dtype=tl.float32)
    for chunk in range(N_CHUNKS):
        part = bh64 * N_CHUNKS + chunk
        m_c = tl.load(PART_M + part * BLOCK_G + rows)
        l_c = tl.load(PART_L + part * BLOCK_G + rows)
        acc_c = tl.load(PART_ACC + (part * BLOCK_G + rows)[:, None] * BLOCK_DV + offs_dv[None, :])
        m_new = tl.maximum(m_i, m_c)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: no inf - inf
        alpha = tl.math.exp2(m_i - m_use)
        beta = tl.math.exp2(m_c - m_use)
        l_i = l_i * alpha + l_c * beta
        acc = acc * alpha[:, None] + acc_c * beta[:, None]
        m_i = m_new
    seen = l_i > 0.0
    out = tl.where(seen[:, None], acc / tl.where(seen, l_i, 1.0)[:, None], 0.0)
    tl.store(O + (bh64 * GROUP + rows)[:, None] * VALUE_DIM + offs_dv[None, :], out,
             mask=(rows < GROUP)[:, None] & (offs_dv < VALUE_DIM)[None, :])


def plan(dtype: torch.dtype, head_dim: int, value_dim: int, group: int, *, block_n: int | None = None,
         chunk_iters: int | None = None) -> dict:
    """Tile sizes: keys per ``tl.dot`` (``BLOCK_N``), dots per program (``CHUNK_ITERS``), query rows padded
    to ``BLOCK_G`` >= 16 (the smallest ``tl.dot``)."""
    wide = dtype == torch.float32 or max(head_dim, value_dim) > 128
    block_n = block_n or (32 if wide else 64)
    chunk_iters = chunk_iters or 4
    if block_n < 16 or block_n & (block_n - 1) or chunk_iters < 1:
        raise ValueError(f"block_n={block_n} must be a power of two >= 16 and chunk_iters={chunk_iters} >= 1")
    return {
        "BLOCK_N": block_n, "CHUNK_ITERS": chunk_iters,
        "BLOCK_G": max(16, triton.next_power_of_2(group)),
        "BLOCK_D": max(16, triton.next_power_of_2(head_dim)),
        "BLOCK_DV": max(16, triton.next_power_of_2(value_dim)),
        "num_warps": 4,
    }


def _items_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x [B, H, N] or [B, H, N, d] addressed by the kernels as item (b * H + h) at stride(1), consecutive
    entries (rows of d) packed: a capacity buffer's prefix along N qualifies as it is, anything else is copied."""
    packed = x.stride(-1) == 1 and x.stride(0) == x.shape[1] * x.stride(1)
    if x.dim() == 4:
        packed = packed and x.stride(2) == x.shape[3]
    return x if packed else x.contiguous()


def attend_step(
    query: torch.Tensor,
    first: torch.Tensor,
    focal: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    aggregates: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    expanded: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None,
    ring: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    group_size: int,
    scale: float,
    *,
    block_n: int | None = None,
    chunk_iters: int | None = None,
) -> torch.Tensor:
    """query [B, H, G, d] (one new token per row, unscaled); first [B] int64: the first position of each
    row's local window; focal = (keys [B, H, F, d], values, positions [B, H, F]) with the F slots to read;
    aggregates = (keys [B, H, NB, d], values, bias [B, H, NB]) of the old blocks (NB = old blocks of the
    longest row); expanded = (mask [B, H, NB] bool, blocks [B, H, E], usable [B, H, E] bool, archive keys
    [B, H, T, d], archive values) or None; ring = (keys [B, H, W, d], values, positions [B, W]).
    Returns [B, H, G, dv] float32."""
    check_supported(query, "triton_decode.attend_step")
    batch, heads, group, head_dim = query.shape
    focal_k, focal_v, focal_pos = focal
    agg_k, agg_v, agg_bias = aggregates
    ring_k, ring_v, ring_pos = ring
    value_dim = ring_v.shape[-1]
    dtype = ring_k.dtype
    cfg = plan(dtype, head_dim, value_dim, group, block_n=block_n, chunk_iters=chunk_iters)
    chunk = cfg["BLOCK_N"] * cfg["CHUNK_ITERS"]
    focal_hi, old_blocks, window = focal_k.shape[2], agg_k.shape[2], ring_k.shape[2]
    if expanded is None or old_blocks == 0:
        count = 0
        x_mask = x_blocks = x_usable = ring_pos  # never read (EXPANDED = 0)
        x_k, x_v = ring_k, ring_v
    else:
        x_mask, x_blocks, x_usable, x_k, x_v = expanded
        count = x_blocks.shape[-1]
        x_mask, x_usable = x_mask.to(torch.int8).contiguous(), x_usable.to(torch.int8).contiguous()
        x_blocks = x_blocks.contiguous()
        x_k, x_v = _items_contiguous(x_k), _items_contiguous(x_v)
    n_focal, n_agg = triton.cdiv(focal_hi, chunk), triton.cdiv(old_blocks, chunk)
    n_exp, n_ring = triton.cdiv(count * group_size, chunk), triton.cdiv(window, chunk)
    n_chunks = n_focal + n_agg + n_exp + n_ring
    device = query.device
    out = torch.empty(batch, heads, group, value_dim, dtype=torch.float32, device=device)
    if out.numel() == 0:
        return out
    rows = batch * heads * n_chunks * cfg["BLOCK_G"]
    part_m = torch.empty(rows, dtype=torch.float32, device=device)
    part_l = torch.empty(rows, dtype=torch.float32, device=device)
    part_acc = torch.empty(rows, cfg["BLOCK_DV"], dtype=torch.float32, device=device)
    query = query.to(dtype).contiguous()
    focal_k, focal_v, focal_pos, agg_k, agg_v, agg_bias, ring_k, ring_v = (
        _items_contiguous(x) for x in (focal_k, focal_v, focal_pos, agg_k, agg_v, agg_bias.float(), ring_k, ring_v))
    ring_pos = ring_pos.contiguous()
    precision, up = dot_precision(dtype), upcast(dtype)
    _decode_partial_kernel[(n_chunks, batch * heads)](
        query, part_m, part_l, part_acc, first.to(device=device, dtype=torch.int64).contiguous(),
        focal_k, focal_v, focal_pos, agg_k, agg_v, agg_bias, x_mask, x_blocks, x_usable, x_k, x_v,
        ring_k, ring_v, ring_pos,
        focal_k.stride(1), focal_v.stride(1), focal_pos.stride(1), agg_k.stride(1), agg_v.stride(1),
        agg_bias.stride(1), x_k.stride(1), x_v.stride(1), ring_k.stride(1), ring_v.stride(1), ring_pos.stride(0),
        heads, focal_hi, old_blocks, count, n_focal, n_agg, n_exp, n_chunks, float(scale) * LOG2E,
        HEAD_DIM=head_dim, VALUE_DIM=value_dim, BLOCK_D=cfg["BLOCK_D"], BLOCK_DV=cfg["BLOCK_DV"],
        GROUP=group, BLOCK_G=cfg["BLOCK_G"], GROUP_SIZE=group_size, RING=window,
        BLOCK_N=cfg["BLOCK_N"], CHUNK_ITERS=cfg["CHUNK_ITERS"], DOT_PRECISION=precision, UPCAST=up,
        num_warps=cfg["num_warps"],
    )
    _decode_merge_kernel[(batch * heads,)](
        part_m, part_l, part_acc, out, n_chunks,
        VALUE_DIM=value_dim, GROUP=group, BLOCK_G=cfg["BLOCK_G"], BLOCK_DV=cfg["BLOCK_DV"], num_warps=cfg["num_warps"],
    )
    return out
