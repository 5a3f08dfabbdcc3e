"""Environment of the test session, set before any test module is imported, and fixtures for every test.

Shared tiny models and inputs are functions in helpers.py (test modules import it, never each other).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# `import helpers` from any test module, whatever pytest's import mode (importlib mode adds no folder).
TESTS = str(Path(__file__).resolve().parent)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

# Triton decides interpreter vs compiler when it is first imported (its own helpers such as tl.sum are jitted
# then), so on a machine without CUDA the interpreter, the only way to run its kernels there, is chosen here,
# before any test module imports dga_hf's Triton backend. An explicit TRITON_INTERPRET is left as it is.
if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True)
def seeded_torch():
    """Every test starts from the same state of torch's global generator, so draws without a generator of
    their own (initial weights, `torch.randint` in a test) do not depend on which tests ran before."""
    torch.manual_seed(0)
