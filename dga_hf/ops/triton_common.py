"""What every Triton kernel of DGA shares: the jit helpers of the online softmax, the jit twins of the
visibility rule, the interpreter fix, and the precision and input checks of the launchers.

The forward (`triton_forward`), backward (`triton_backward`) and decode (`triton_decode`) kernels import
from here and from `triton_plan` (the prefill tiles), never from each other; the prefill kernels also
from `triton_expand` / `triton_expand_backward` (query-aware expansion, which both directions launch).
The backward's row loads and updates (`grad_rows`, `dq_update`, `kv_update`) live here so that the
expansion's backward kernels share them.

The rule. Kernels cannot call Python, so `first_local_block` below is the jit twin of
`dga_hf.rule.first_local_block` (docs/spec.md: a query of block ``beta`` reads raw the blocks from
``beta - n + 1``; blocks before are old), and `first_block_seeing_as_old` the twin of its key-major inverse
(block ``c`` is old from query block ``c + n`` on, what the dk/dv kernel walks by);
tests/test_triton_backend.py checks each against `dga_hf.rule`. Every kernel calls them instead of
spelling the rule.

Interpreter. On CPU tensors the kernels run only under Triton's interpreter (``TRITON_INTERPRET=1`` in the
environment before triton is first imported). Importing this module patches one conversion of the
interpreter (`_fix_interpreter_scalar_index`); every kernel module imports this one first.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

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
def first_local_block(query_block, LOCAL_BLOCKS: tl.constexpr):
    """The jit twin of `dga_hf.rule.first_local_block`: ``beta - n + 1``, the first block a query of
    block ``beta`` reads raw (may be negative: then every block)."""
    return query_block - (LOCAL_BLOCKS - 1)


@triton.jit
def first_block_seeing_as_old(block, LOCAL_BLOCKS: tl.constexpr):
    """The jit twin of `dga_hf.rule.first_block_seeing_as_old`: ``c + n``, the first query block for which
    block ``c`` is old (the key-major view of `first_local_block`, for the backward's dk/dv kernel)."""
    return block + LOCAL_BLOCKS


@triton.jit
def dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with fp32 accumulation. UPCAST (interpreter only): the interpreter multiplies the raw
    bits of 16-bit floats, so it gets their exact fp32 values instead (the products the tensor cores form)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def logits(q, k, qk_scale, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """q [R, D] . k [N, D]^T * scale (log2 units), fp32 [R, N]."""
    kt = tl.trans(k)
    if UPCAST:
        return tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision=DOT_PRECISION) * qk_scale
    else:
        return tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale


@triton.jit
def online_update(acc, m_i, l_i, s, v, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One step of the online softmax: s [R, N] logits in log2 units (masked = -inf), v [N, DV]."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # a row that has seen only -inf keeps m = -inf; subtract 0 instead so no inf - inf = NaN appears
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = dot(p.to(v.dtype), v, acc, DOT_PRECISION, UPCAST)
    return acc, m_new, l_i


@triton.jit
def row_lse2(LSE, lse_off, row_real):
    """The rows' lse in log2 units; +inf for padded rows and rows that see nothing, so exp2(s - lse) = 0."""
    lse = tl.load(LSE + lse_off, mask=row_real, other=float("-inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


@triton.jit
def dq_update(dq, s, do, lse2, delta, k, v, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """dq + dS k (unscaled) for s [R, N] logits in log2 units (hidden = -inf) of the rows against a key
    chunk k [N, D], v [N, DV]; dS = P * (dO . v^T - D) with P = exp2(s - lse2)."""
    p = tl.math.exp2(s - lse2[:, None])
    dp = logits(do, v, 1.0, DOT_PRECISION, UPCAST)  # dO . v^T  [R, N]
    ds = p * (dp - delta[:, None])
    return dot(ds.to(k.dtype), k, dq, DOT_PRECISION, UPCAST)


@triton.jit
def kv_update(dk, dv, st, q, do, v, lse2, delta, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """dk + dS^T q (unscaled) and dv + P^T dO of a key chunk (k: what st was computed from, v [N, DV])
    for st [N, R] = S^T against R rows q [R, D], do [R, DV] (log2 units, hidden = -inf)."""
    pt = tl.math.exp2(st - lse2[None, :])
    dv = dot(pt.to(do.dtype), do, dv, DOT_PRECISION, UPCAST)
    dpt = logits(v, do, 1.0, DOT_PRECISION, UPCAST)  # (dO . v^T)^T  [N, R]
    dst = pt * (dpt - delta[None, :])
    dk = dot(dst.to(q.dtype), q, dk, DOT_PRECISION, UPCAST)
    return dk, dv


@triton.jit
def grad_rows(Q, DO, LSE, DELTA, q_base, do_base, g64, qpos64, row_real, lse_heads, bh64, L,
              stride_qg, stride_ql, stride_dg, stride_dl,
              HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """What the key-major kernels read of R query rows (query head g64, position qpos64; ``row_real``
    False: padding or no row, which reads as lse = +inf): q [R, D], dO [R, DV], lse in log2 units, D.
    q_base / do_base: Q / DO at the row's (batch, kv head); LSE and DELTA are contiguous [B, H, G, L]
    (``lse_heads`` = G)."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = load_rows(q_base + (g64 * stride_qg + qpos64 * stride_ql)[:, None] + offs_d[None, :],
                  row_real, offs_d < HEAD_DIM, BLOCK_D == HEAD_DIM, True)
    do = load_rows(do_base + (g64 * stride_dg + qpos64 * stride_dl)[:, None] + offs_dv[None, :],
                   row_real, offs_dv < VALUE_DIM, BLOCK_DV == VALUE_DIM, True)
    row_off = (bh64 * lse_heads + g64) * L + qpos64
    return q, do, row_lse2(LSE, row_off, row_real), tl.load(DELTA + row_off, mask=row_real, other=0.0)


@triton.jit
def load_rows(ptrs, row_mask, col_mask, EVEN_COLS: tl.constexpr, MASK_ROWS: tl.constexpr):
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


# Whether the kernels run in Triton's interpreter (decided when triton was first imported).
KERNEL_INTERPRETED = type(dot).__name__ == "InterpretedFunction"


def dot_precision(dtype: torch.dtype) -> str:
    return FP32_DOT_PRECISION if dtype == torch.float32 else "tf32"


def upcast(dtype: torch.dtype) -> bool:
    return KERNEL_INTERPRETED and dtype != torch.float32


def is_float64(*tensors: torch.Tensor) -> bool:
    return any(t.dtype == torch.float64 for t in tensors)


def check_supported(query: torch.Tensor, function: str) -> None:
    """Raise unless the kernels can run on `query` (`function`: the qualified name the error names)."""
    if query.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{function} supports float32/bfloat16/float16, got {query.dtype}")
    if query.device.type != "cuda" and not KERNEL_INTERPRETED:
        raise RuntimeError(
            f"{function} needs CUDA tensors (got {query.device}); CPU tensors run only under "
            "Triton's interpreter (TRITON_INTERPRET=1 in the environment before triton is first imported)"
        )


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()
