"""Query-aware expansion in the Triton prefill kernels (docs/spec.md, step 6): the jit helpers every
prefill kernel uses to honour ``layout.expanded``, and the forward kernel of the expanded members.

``layout.expanded`` [B, H, L, X] holds, per query position and kv head, the (at most X) old blocks the
query expands, ascending, then the sentinel ``nb``; it is chosen once in PyTorch (`layout.select_expanded`)
before stage 5, as NSA computes its block indices before its selected-attention kernel. For an expanded
block ``c`` query ``i`` does not read the aggregate of ``c`` and reads raw the members of ``c`` that are
not focal (the focal ones it reads through the focal stream already), all in one softmax.

Design (two kernels, one softmax):

* The three-stream kernel (`triton_forward`) runs unchanged but for one mask: in its aggregate stream a
  row hides the aggregates of its own expanded blocks (only when ``EXPANDED``). The row's X chosen blocks
  are loaded once per program (`expanded_rows`, [rows, X] registers); per chunk of aggregates they become
  one 64-bit word per row, whose bits are the mask (`expanded_hit`), so the mask costs
  O(rows * (X + chunk)) per chunk instead of O(rows * chunk * X) compares (hence aggregate chunks of at
  most 64). It stores its partial result: the output normalised over the three streams (kept in fp32)
  and their log-sum-exp.
* `_expanded_attend_kernel` (NSA's selected-attention layout, `native_sparse_attention/ops/parallel.py`):
  one program per (query position, kv head); the ``G`` query heads of the group are the rows of the tile
  (padded to ``BLOCK_G`` >= 16 for ``tl.dot``). It walks the members of the query's expanded blocks,
  packed into columns (`expanded_members`: column ``j`` is member ``j % m`` of the ``j // m``-th chosen
  block, so a short block size wastes no chunk), masking focal members and positions past the row, with
  the online softmax; then merges its partial with the three streams' by their log-sum-exp, exactly:
  ``out = (o_3 * 2^(lse_3 - M) + acc) / (2^(lse_3 - M) + l)``, and stores the final output (query dtype)
  and the final log-sum-exp, which the backward (`triton_backward`, `triton_expand_backward`) reads.

Why not inside the three-stream kernel: its tile's rows are ``BLOCK_M`` queries, each with its own X
blocks, so the tile would visit the union of up to ``BLOCK_M * X`` blocks with a per-row mask (mostly
hidden work), where a per-query program reads exactly its own ``X * m`` members.

Each key is read once per query: raw (focal, local, or a non-focal member of an expanded block) or inside
one aggregate. The expansion kernel's work is at most ``X * m`` keys per query and kv head, a constant in
L (docs/spec.md, Cost); its rows are ``G`` heads padded to 16, so with ``G < 16`` part of each ``tl.dot``
is padding (as in NSA).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import LOG2E, load_rows, logits, online_update

# Tiles of the per-(query, kv head) kernels. Not tuned on a GPU (none was available); chosen from ptxas's
# register reports for sm_90 at head dim 128, G = 4, compiled without a GPU: 32 member columns per step and
# 2 stages spill nothing with 4 warps for 16-bit operands (64 columns spill 150-190 bytes) and with 8
# warps for fp32 / head dims > 128 ("wide").
EXPANDED_KEYS = 32
EXPANDED_WARPS_16BIT, EXPANDED_WARPS_WIDE = 4, 8
EXPANDED_STAGES = 2


def wide_operands(dtype: torch.dtype, head_dim: int, value_dim: int) -> bool:
    """fp32 operands or head dims > 128: the tiles that need more registers per row."""
    return dtype == torch.float32 or max(head_dim, value_dim) > 128


def expansion_tiles(group: int, dtype: torch.dtype, head_dim: int, value_dim: int, width: int, group_size: int,
                    *, block_n: int | None = None) -> dict:
    """Tile sizes of the per-(query, kv head) expansion kernels: ``BLOCK_G`` rows (the G query heads, padded
    to a power of two >= 16), ``BLOCK_N`` member columns per step (at most what X blocks hold), ``BLOCK_X``
    (X rounded up to a power of two), ``BLOCK_D`` / ``BLOCK_DV``, warps and stages."""
    wide = wide_operands(dtype, head_dim, value_dim)
    return {
        "BLOCK_G": max(16, triton.next_power_of_2(group)),
        "BLOCK_N": max(16, min(block_n or EXPANDED_KEYS, triton.next_power_of_2(max(width * group_size, 1)))),
        "BLOCK_X": triton.next_power_of_2(max(width, 1)),
        "BLOCK_D": max(16, triton.next_power_of_2(head_dim)),
        "BLOCK_DV": max(16, triton.next_power_of_2(value_dim)),
        "num_warps": EXPANDED_WARPS_WIDE if wide else EXPANDED_WARPS_16BIT,
        "num_stages": EXPANDED_STAGES,
    }


# an aggregate chunk's expansion mask is one 64-bit word per row (`expanded_hit`)
MAX_EXPANDED_CHUNK = 64


@triton.jit
def expanded_rows(chosen, row_ok, width, NB, BLOCK_X: tl.constexpr):
    """The chosen blocks of R rows as an [R, BLOCK_X] tile: ``chosen`` [R] points at each row's X entries
    (``row_ok`` False: no row); the sentinel NB past X and for missing rows."""
    x = tl.arange(0, BLOCK_X)
    return tl.load(chosen[:, None] + x[None, :], mask=row_ok[:, None] & (x < width)[None, :], other=NB)


@triton.jit
def expanded_hit(rows_chosen, start, BLOCK_N: tl.constexpr, KEYS_FIRST: tl.constexpr):
    """Whether each row (an `expanded_rows` tile [R, BLOCK_X]) expands each block of the chunk
    [start, start + BLOCK_N): [R, BLOCK_N], or [BLOCK_N, R] with KEYS_FIRST. Through one 64-bit word per
    row (bit j: the row expands block start + j), so a chunk costs R * BLOCK_X operations for the words and
    R * BLOCK_N for the mask, not R * BLOCK_N * X compares."""
    tl.static_assert(BLOCK_N <= 64, "the expansion mask of a chunk is one 64-bit word per row")
    offset = rows_chosen - start
    inside = (offset >= 0) & (offset < BLOCK_N)
    # a row's chosen blocks are distinct: the sum of their bits is their union, without carries
    word = tl.sum(inside.to(tl.int64) << tl.where(inside, offset, 0).to(tl.int64), 1)
    lanes = tl.arange(0, BLOCK_N).to(tl.int64)
    if KEYS_FIRST:
        return ((word[None, :] >> lanes[:, None]) & 1) != 0
    else:
        return ((word[:, None] >> lanes[None, :]) & 1) != 0


@triton.jit
def expanded_count(chosen, width, NB, real, BLOCK_X: tl.constexpr):
    """How many blocks the query whose X chosen blocks start at ``chosen`` expands (0 where not ``real``):
    the entries before the sentinel NB."""
    x = tl.arange(0, BLOCK_X)
    c = tl.load(chosen + x, mask=(x < width) & real, other=NB)
    return tl.sum((c < NB).to(tl.int32), 0)


@triton.jit
def expanded_members(chosen, focal_row, start, count, length, GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Columns [start, start + BLOCK_N) of a query's expanded members, packed: column j is member j % m of
    its (j // m)-th chosen block. Returns their positions and whether the query reads each (inside the
    ``count`` chosen blocks, before ``length``, not focal: ``focal_row`` is the kv head's focal flags)."""
    cols = start + tl.arange(0, BLOCK_N)
    listed = cols < count * GROUP_SIZE
    block = tl.load(chosen + cols // GROUP_SIZE, mask=listed, other=0)
    pos = block * GROUP_SIZE + cols % GROUP_SIZE
    inside = listed & (pos < length)
    focal = tl.load(focal_row + pos, mask=inside, other=1)
    return pos, inside & (focal == 0)


@triton.jit
def expanded_keys(chosen, focal_row, k_base, v_base, stride_kl, stride_vl, start, count, length,
                  HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                  GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys [BLOCK_N, D] and values [BLOCK_N, DV] of `expanded_members` columns [start, start + BLOCK_N)
    (k_base / v_base: K / V at the query's batch row and kv head), and which of them the query reads."""
    pos, read = expanded_members(chosen, focal_row, start, count, length, GROUP_SIZE, BLOCK_N)
    pos64 = pos.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = load_rows(k_base + pos64[:, None] * stride_kl + offs_d[None, :], read, offs_d < HEAD_DIM,
                  BLOCK_D == HEAD_DIM, True)
    v = load_rows(v_base + pos64[:, None] * stride_vl + offs_dv[None, :], read, offs_dv < VALUE_DIM,
                  BLOCK_DV == VALUE_DIM, True)
    return k, v, read


# sizes that change with the sequence length are not specialised on (no recompilation per length)
@triton.jit(do_not_specialize=["H", "L", "NB", "X"])
def _expanded_attend_kernel(
    Q, K, V, PART, LSE, OUT, EXP, FOCAL, LENS,
    stride_qb, stride_qh, stride_qg, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_ob, stride_oh, stride_og, stride_ol,
    H, L, NB, X, qk_scale,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, GROUP_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_X: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """One program per (query position, kv head): the G heads' softmax over the query's expanded members,
    merged with the three streams' partial (PART fp32 and LSE, same strides as OUT) into OUT and LSE."""
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM
    i = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1)
    b64 = (bh // H).to(tl.int64)
    h64 = (bh % H).to(tl.int64)
    bh64 = bh.to(tl.int64)
    length = tl.load(LENS + bh // H)
    real = i < length
    g = tl.arange(0, BLOCK_G)
    g64 = g.to(tl.int64)
    heads = g < GROUP
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_d = offs_d < HEAD_DIM
    mask_dv = offs_dv < VALUE_DIM

    q = load_rows(Q + b64 * stride_qb + h64 * stride_qh + i * stride_ql + (g64 * stride_qg)[:, None] + offs_d[None, :],
                  heads & real, mask_d, EVEN_D, True)
    chosen = EXP + (bh64 * L + i) * X
    count = expanded_count(chosen, X, NB, real, BLOCK_X)
    k_base = K + b64 * stride_kb + h64 * stride_kh
    v_base = V + b64 * stride_vb + h64 * stride_vh
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], dtype=tl.float32)
    for start in range(0, count * GROUP_SIZE, BLOCK_N):
        k, v, read = expanded_keys(chosen, FOCAL + bh64 * L, k_base, v_base, stride_kl, stride_vl, start, count,
                                   length, HEAD_DIM, VALUE_DIM, BLOCK_D, BLOCK_DV, GROUP_SIZE, BLOCK_N)
        s = tl.where(read[None, :], logits(q, k, qk_scale, DOT_PRECISION, UPCAST), float("-inf"))
        acc, m_i, l_i = online_update(acc, m_i, l_i, s, v, DOT_PRECISION, UPCAST)

    # ---- merge with the three streams' normalised partial by the log-sum-exp (log2 units)
    rows = (bh64 * GROUP + g64) * L + i  # LSE is contiguous [B, H, G, L]
    lse_streams = tl.load(LSE + rows, mask=heads, other=float("-inf")) * 1.4426950408889634  # log2(e)
    o_off = b64 * stride_ob + h64 * stride_oh + i * stride_ol + (g64 * stride_og)[:, None] + offs_dv[None, :]
    o_streams = tl.load(PART + o_off, mask=heads[:, None] & mask_dv[None, :], other=0.0)
    top = tl.maximum(lse_streams, m_i)
    top = tl.where(top == float("-inf"), 0.0, top)  # a row that saw nothing: no inf - inf
    w_streams = tl.math.exp2(lse_streams - top)
    w_expanded = tl.math.exp2(m_i - top)
    total = w_streams + l_i * w_expanded
    ok = heads & real & (total > 0.0)
    total_safe = tl.where(ok, total, 1.0)
    out = (o_streams * w_streams[:, None] + acc * w_expanded[:, None]) / total_safe[:, None]
    tl.store(OUT + o_off, tl.where(ok[:, None], out, 0.0).to(OUT.dtype.element_ty), mask=heads[:, None] & mask_dv[None, :])
    lse = tl.where(ok, (top + tl.math.log2(total_safe)) * 0.6931471805599453, float("-inf"))
    tl.store(LSE + rows, lse, mask=heads)


def attend_expanded(x, part: torch.Tensor, lse: torch.Tensor, out: torch.Tensor, group_size: int, scale: float,
                    *, block_n: int | None = None) -> None:
    """Add the expanded members to the three streams' result: ``part`` (their normalised output, fp32) and
    ``lse`` (their log-sum-exp, updated in place) -> ``out`` (``part`` itself when it is fp32). ``x``: the
    `triton_plan.KernelInputs` of the call (``x.expand_width`` > 0)."""
    query, key, value = x.query, x.key, x.value
    batch, heads, group, seq_len, head_dim = query.shape
    assert part.stride() == out.stride() and lse.is_contiguous()
    tiles = expansion_tiles(group, query.dtype, head_dim, value.shape[-1], x.expand_width, group_size, block_n=block_n)
    _expanded_attend_kernel[(seq_len, batch * heads)](
        query, key, value, part, lse, out, x.expanded, x.focal, x.lengths,
        query.stride(0), query.stride(1), query.stride(2), query.stride(3),
        key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        heads, seq_len, x.agg_key.shape[2], x.expand_width, float(scale) * LOG2E,
        HEAD_DIM=head_dim, VALUE_DIM=value.shape[-1], GROUP=group, GROUP_SIZE=group_size,
        DOT_PRECISION=x.constants["DOT_PRECISION"], UPCAST=x.constants["UPCAST"], **tiles,
    )
