"""What every Triton kernel of DGA shares: the jit helpers of the online softmax, the jit twins of the
visibility rule, the interpreter fix, and the precision and input checks of the launchers.

The forward (`triton_forward`), backward (`triton_backward`) and decode (`triton_decode`) kernels import
from here and from `triton_plan` (the prefill tiles), never from each other.

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
