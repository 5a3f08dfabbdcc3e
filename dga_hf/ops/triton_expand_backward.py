"""Backward of the query-aware expansion in the Triton prefill kernels (docs/spec.md, step 6; the forward
and the design: `triton_expand`).

The expanded members are raw keys: their logits ``scale * q . k_j`` enter the one softmax whose final
log-sum-exp the forward saved, so with ``P = exp(S - lse)`` and ``D = rowsum(dO * O)`` their gradients are
FlashAttention-2's: ``dQ += scale * dS K``, ``dK_j += scale * dS^T Q``, ``dV_j += P^T dO`` (they go to the
raw key / value gradients). The three-stream kernels of `triton_backward` hide, per row, the aggregates
the row expands (so an expanded aggregate gets no gradient from that row) and add the partials below
before their single store, so every gradient is rounded to its dtype once.

* `_expanded_dq_kernel`: one program per (query position, kv head), the forward's layout (the G query
  heads as the rows, padded to 16): dQ of the query's expanded members, stored scaled in fp32, which
  `triton_backward`'s dq kernel adds to its own.
* `_expanded_dk_dv_kernel`: key-major. `expanding_queries` inverts the expansion in PyTorch (a sort of
  the B * H * L * X chosen (query, block) pairs, O(L * X) memory, nothing L x L): per kv head and block,
  the real queries that expand it, ascending. One program per (kv head, block, chunk of ``BLOCK_N``
  members) walks its block's queries, ``GP x BLOCK_M`` rows per step (the G heads in ``HEAD_CHUNKS``), and
  stores dK / dV of its members in fp32, which the raw-key programs of `triton_backward`'s dk/dv kernel
  add to their own.

Accumulation is deterministic, without atomics: every partial row is owned by one program, and the sums
run in a fixed order. Atomic adds (a program per query adding into its members' dK / dV) would be simpler
but serialise on the blocks that many queries expand (a strong early block is expanded by almost every
later query) and change the sum order from run to run. Known limit, as for the earliest aggregates in
`triton_backward`: a block that many queries expand is walked by one program per member chunk (O(L)
steps); if a GPU profile shows that tail, split its query list over several programs and sum their
partials.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import LOG2E, dq_update, grad_rows, kv_update, load_rows, logits
from .triton_expand import expanded_count, expanded_keys, expansion_tiles, wide_operands

# Pipeline stages of the key-major kernel (its rows and warps are those of `triton_backward`'s dk/dv
# kernel). From ptxas's register reports for sm_90 at head dim 128, G = 4, without a GPU: no spill at 2
# stages with 16-bit operands (64 rows, 8 warps); with fp32 (32 rows) 1 stage spills 60 bytes, 2 spill 360.
EXPANDED_KV_STAGES_16BIT, EXPANDED_KV_STAGES_WIDE = 2, 1


@triton.jit(do_not_specialize=["H", "L", "NB", "X"])
def _expanded_dq_kernel(
    Q, K, V, DO, LSE, DELTA, PDQ, EXP, FOCAL, LENS,
    stride_qb, stride_qh, stride_qg, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_db, stride_dh, stride_dg, stride_dl,
    H, L, NB, X, qk_scale, scale,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, GROUP_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_X: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """One program per (query position, kv head): PDQ (contiguous [B, H, G, L, D] fp32) = scale * dS K
    over the query's expanded members, for its G heads; 0 for a query that expands nothing."""
    i = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1)
    b64 = (bh // H).to(tl.int64)
    h64 = (bh % H).to(tl.int64)
    bh64 = bh.to(tl.int64)
    length = tl.load(LENS + bh // H)
    real = i < length
    g64 = tl.arange(0, BLOCK_G).to(tl.int64)
    heads = g64 < GROUP
    offs_d = tl.arange(0, BLOCK_D)

    q, do, lse2, delta = grad_rows(Q, DO, LSE, DELTA, Q + b64 * stride_qb + h64 * stride_qh,
                                   DO + b64 * stride_db + h64 * stride_dh, g64, i, heads & real, GROUP, bh64, L,
                                   stride_qg, stride_ql, stride_dg, stride_dl, HEAD_DIM, VALUE_DIM, BLOCK_D, BLOCK_DV)
    chosen = EXP + (bh64 * L + i) * X
    count = expanded_count(chosen, X, NB, real, BLOCK_X)
    k_base = K + b64 * stride_kb + h64 * stride_kh
    v_base = V + b64 * stride_vb + h64 * stride_vh
    dq = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for start in range(0, count * GROUP_SIZE, BLOCK_N):
        k, v, read = expanded_keys(chosen, FOCAL + bh64 * L, k_base, v_base, stride_kl, stride_vl, start, count,
                                   length, HEAD_DIM, VALUE_DIM, BLOCK_D, BLOCK_DV, GROUP_SIZE, BLOCK_N)
        s = tl.where(read[None, :], logits(q, k, qk_scale, DOT_PRECISION, UPCAST), float("-inf"))
        dq = dq_update(dq, s, do, lse2, delta, k, v, DOT_PRECISION, UPCAST)
    rows = ((bh64 * GROUP + g64) * L + i) * HEAD_DIM
    tl.store(PDQ + rows[:, None] + offs_d[None, :], dq * scale, mask=heads[:, None] & (offs_d < HEAD_DIM)[None, :])


@triton.jit(do_not_specialize=["H", "L", "NB"])
def _expanded_dk_dv_kernel(
    Q, K, V, DO, LSE, DELTA, PDK, PDV, OFFSETS, QUERIES, FOCAL, LENS,
    stride_qb, stride_qh, stride_qg, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_db, stride_dh, stride_dg, stride_dl,
    H, L, NB, qk_scale, scale,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    GROUP_SIZE: tl.constexpr, MEMBER_CHUNKS: tl.constexpr,
    HEADS_PER_PROG: tl.constexpr, HEAD_CHUNKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Grid (nb * MEMBER_CHUNKS, B * H): members [chunk * BLOCK_N, (chunk + 1) * BLOCK_N) of one block
    against the queries that expand it (QUERIES[OFFSETS[bh * nb + c] : OFFSETS[bh * nb + c + 1]]):
    PDK = scale * dS^T Q and PDV = P^T dO (contiguous [B, H, L, d] fp32; 0 for focal members and for
    blocks no query expands). Every position < L belongs to one program."""
    BLOCK_R: tl.constexpr = HEADS_PER_PROG * BLOCK_M
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM
    EVEN_DV: tl.constexpr = BLOCK_DV == VALUE_DIM
    block = tl.program_id(0) // MEMBER_CHUNKS
    members = (tl.program_id(0) % MEMBER_CHUNKS) * BLOCK_N + tl.arange(0, BLOCK_N)
    bh = tl.program_id(1)
    b64 = (bh // H).to(tl.int64)
    h64 = (bh % H).to(tl.int64)
    bh64 = bh.to(tl.int64)
    length = tl.load(LENS + bh // H)
    keys = block * GROUP_SIZE + members
    keys64 = keys.to(tl.int64)
    key_ok = (members < GROUP_SIZE) & (keys < L)
    focal = tl.load(FOCAL + bh64 * L + keys64, mask=key_ok & (keys < length), other=1)
    read = key_ok & (focal == 0)  # a member past the row's length reads as focal: never read
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_d = offs_d < HEAD_DIM
    mask_dv = offs_dv < VALUE_DIM
    k = load_rows(K + b64 * stride_kb + h64 * stride_kh + keys64[:, None] * stride_kl + offs_d[None, :],
                  read, mask_d, EVEN_D, True)
    v = load_rows(V + b64 * stride_vb + h64 * stride_vh + keys64[:, None] * stride_vl + offs_dv[None, :],
                  read, mask_dv, EVEN_DV, True)

    q_base = Q + b64 * stride_qb + h64 * stride_qh
    do_base = DO + b64 * stride_db + h64 * stride_dh
    first = tl.load(OFFSETS + bh64 * NB + block)
    last = tl.load(OFFSETS + bh64 * NB + block + 1)
    rows = tl.arange(0, BLOCK_R)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for start in range(first, last, BLOCK_M):
        entry = start + rows % BLOCK_M
        listed = entry < last
        qpos64 = tl.load(QUERIES + entry, mask=listed, other=0).to(tl.int64)
        for chunk in range(HEAD_CHUNKS):
            g64 = (chunk * HEADS_PER_PROG + rows // BLOCK_M).to(tl.int64)
            q, do, lse2, delta = grad_rows(Q, DO, LSE, DELTA, q_base, do_base, g64, qpos64, listed,
                                           HEADS_PER_PROG * HEAD_CHUNKS, bh64, L, stride_qg, stride_ql,
                                           stride_dg, stride_dl, HEAD_DIM, VALUE_DIM, BLOCK_D, BLOCK_DV)
            st = tl.where(read[:, None], logits(k, q, qk_scale, DOT_PRECISION, UPCAST), float("-inf"))
            dk, dv = kv_update(dk, dv, st, q, do, v, lse2, delta, DOT_PRECISION, UPCAST)
    out = bh64 * L + keys64
    tl.store(PDK + out[:, None] * HEAD_DIM + offs_d[None, :], dk * scale, mask=key_ok[:, None] & mask_d[None, :])
    tl.store(PDV + out[:, None] * VALUE_DIM + offs_dv[None, :], dv, mask=key_ok[:, None] & mask_dv[None, :])


def expanding_queries(expanded: torch.Tensor, lengths: torch.Tensor, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The expansion inverted: per kv head and block, the real queries that expand it. expanded [B, H, L, X]
    (blocks, sentinel ``num_blocks``), lengths [B] -> offsets [B * H * nb + 1] int32 and queries [P] int32,
    the queries of (kv head bh, block c) being ``queries[offsets[bh * nb + c] : offsets[bh * nb + c + 1]]``,
    ascending."""
    batch, heads, seq_len, _ = expanded.shape
    device = expanded.device
    position = torch.arange(seq_len, device=device).view(1, 1, -1, 1)
    listed = (expanded < num_blocks) & (position < lengths.to(device).view(-1, 1, 1, 1))
    kv_head = torch.arange(batch * heads, device=device).view(batch, heads, 1, 1)
    slot = (kv_head * num_blocks + expanded)[listed]  # in (b, h, query, x) order: queries ascending per slot
    query = position.expand_as(expanded)[listed]
    queries = query[torch.argsort(slot, stable=True)].to(torch.int32)
    offsets = torch.zeros(batch * heads * num_blocks + 1, dtype=torch.int32, device=device)
    offsets[1:] = torch.bincount(slot, minlength=batch * heads * num_blocks).cumsum(0)
    if queries.numel() == 0:  # a valid pointer; no program reads it
        queries = torch.zeros(1, dtype=torch.int32, device=device)
    return offsets, queries


def expanded_dq(x, grad_out: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor, group_size: int, scale: float,
                *, block_n: int | None = None) -> torch.Tensor:
    """dQ of the expanded members, fp32 [B, H, G, L, d] contiguous, for `triton_backward`'s dq kernel to add.
    ``x``: the `triton_plan.KernelInputs` of the call (``x.expand_width`` > 0)."""
    query, key, value = x.query, x.key, x.value
    batch, heads, group, seq_len, head_dim = query.shape
    partial = torch.empty(query.shape, dtype=torch.float32, device=query.device)
    tiles = expansion_tiles(group, query.dtype, head_dim, value.shape[-1], x.expand_width, group_size, block_n=block_n)
    _expanded_dq_kernel[(seq_len, batch * heads)](
        query, key, value, grad_out, lse, delta, partial, x.expanded, x.focal, x.lengths,
        query.stride(0), query.stride(1), query.stride(2), query.stride(3),
        key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), grad_out.stride(3),
        heads, seq_len, x.agg_key.shape[2], x.expand_width, float(scale) * LOG2E, float(scale),
        HEAD_DIM=head_dim, VALUE_DIM=value.shape[-1], GROUP=group, GROUP_SIZE=group_size,
        DOT_PRECISION=x.constants["DOT_PRECISION"], UPCAST=x.constants["UPCAST"], **tiles,
    )
    return partial


def expanded_dk_dv(x, grad_out: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor, group_size: int, scale: float,
                   kv_cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """dK, dV of the expanded members, fp32 [B, H, L, d] contiguous, for `triton_backward`'s dk/dv kernel
    to add to the raw keys'. ``kv_cfg``: that kernel's tiles (rows per step; member chunks at most its
    ``BLOCK_N`` keys)."""
    query, key, value = x.query, x.key, x.value
    batch, heads, _, seq_len, head_dim = query.shape
    num_blocks = x.agg_key.shape[2]
    offsets, queries = expanding_queries(x.expanded, x.lengths, num_blocks)
    members = max(16, min(kv_cfg["BLOCK_N"], triton.next_power_of_2(group_size)))
    chunks = triton.cdiv(group_size, members)
    grad_key = torch.empty(key.shape, dtype=torch.float32, device=key.device)
    grad_value = torch.empty(value.shape, dtype=torch.float32, device=value.device)
    _expanded_dk_dv_kernel[(num_blocks * chunks, batch * heads)](
        query, key, value, grad_out, lse, delta, grad_key, grad_value, offsets, queries, x.focal, x.lengths,
        query.stride(0), query.stride(1), query.stride(2), query.stride(3),
        key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), grad_out.stride(3),
        heads, seq_len, num_blocks, float(scale) * LOG2E, float(scale),
        HEAD_DIM=head_dim, VALUE_DIM=value.shape[-1], BLOCK_D=kv_cfg["BLOCK_D"], BLOCK_DV=kv_cfg["BLOCK_DV"],
        GROUP_SIZE=group_size, MEMBER_CHUNKS=chunks,
        HEADS_PER_PROG=kv_cfg["HEADS_PER_PROG"], HEAD_CHUNKS=kv_cfg["HEAD_CHUNKS"],
        BLOCK_M=kv_cfg["BLOCK_M"], BLOCK_N=members,
        DOT_PRECISION=x.constants["DOT_PRECISION"], UPCAST=x.constants["UPCAST"], num_warps=kv_cfg["num_warps"],
        num_stages=EXPANDED_KV_STAGES_WIDE if wide_operands(query.dtype, head_dim, value.shape[-1])
        else EXPANDED_KV_STAGES_16BIT,
    )
    return grad_key, grad_value
