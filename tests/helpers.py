"""Things several test modules share, one section per topic (test modules import this, never each other)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

# ------------------------------------------------------------------------------------------------
# Triton kernels (tests/test_triton_backend.py, tests/test_triton_backward.py, tests/test_triton_decode.py)
#
# Two devices, never both in one process:
#
# * ``cpu``: Triton's interpreter runs the kernels on CPU tensors. Triton picks interpreter or compiler
#   when it is first imported, so ``TRITON_INTERPRET=1`` must be in the environment by then; the suite
#   is meant to be run with it set. On a machine without CUDA, importing this module sets the variable
#   itself when it is absent and triton is not imported yet (no compiled kernel can run there anyway);
#   if another module imported triton first, the CPU cases skip and say so. Import this module before
#   anything that imports triton.
# * ``cuda``: the compiled kernels on a GPU; runs only when CUDA is available and ``TRITON_INTERPRET``
#   is unset (``scripts/gpu_check.sh``).

if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"  # CPU-only machine: the interpreter is the only way to run the kernels
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
CUDA_COMPILED = not INTERPRET and torch.cuda.is_available()
NOT_CUDA_COMPILED = "needs CUDA and TRITON_INTERPRET unset (compiled kernels)"

DEVICES = [
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(
            not INTERPRET,
            reason="the CPU path runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1 in the "
            "environment before triton is first imported",
        ),
    ),
    pytest.param("cuda", marks=pytest.mark.skipif(not CUDA_COMPILED, reason=NOT_CUDA_COMPILED)),
]

from dga_hf.config import DGAConfig  # noqa: E402 - imports triton: only after TRITON_INTERPRET is decided


# Small settings whose tiles, blocks and windows make every loop of the prefill kernels run at tiny lengths.
CFG_A = DGAConfig(group_size=4, focal_ratio=0.25, probe_queries=8, local_blocks=1)
CFG_B = DGAConfig(group_size=4, focal_ratio=0.2, probe_queries=6, local_blocks=3, sink_tokens=2, group_bias="log_size")
CFG_C = DGAConfig(group_size=16, focal_ratio=0.1, probe_queries=8, local_blocks=1)
CFG_D = DGAConfig(group_size=8, focal_ratio=0.15, probe_queries=8, local_blocks=2)
