"""The Triton backend of DGA stage 5 (docs/spec.md, steps 5 and 6), as `ops.autograd` and `ops.dispatch` use it:
``attend``, ``attend_forward`` and ``attend_backward`` with the contract of `torch_backend`.

The kernels live in modules of their own, which import only from `triton_common` (shared jit helpers,
the jit twin of the rule, precision and input checks), `triton_plan` (the prefill tile plan) and the
expansion's modules, never from each other:

- `triton_forward`: the forward kernel (output and logsumexp);
- `triton_backward`: the backward kernels (the seven gradients from the saved logsumexp);
- `triton_expand` / `triton_expand_backward`: query-aware expansion (docs/spec.md step 6), the kernels
  of the expanded members that the forward / backward launch, and the jit mask they share;
- `triton_decode`: one decoding step (not part of this backend; `DGACache` calls it).

float64 inputs fall back to `torch_backend` (documented in `triton_forward`); CPU tensors run only under
Triton's interpreter (``TRITON_INTERPRET=1`` before triton is first imported).
"""

from __future__ import annotations

from .triton_backward import attend_backward
from .triton_common import FP32_DOT_PRECISION
from .triton_forward import attend, attend_forward
from .triton_plan import focal_tile_counts, plan

__all__ = ["attend", "attend_forward", "attend_backward", "plan", "focal_tile_counts", "FP32_DOT_PRECISION"]
