"""DGA operators: the naive reference, the PyTorch backend, the Triton backend and one dispatch."""

from .dispatch import available_backends, dga_attention, resolve_backend
from .dense import dense_attention
from .naive import naive_dga_attention

__all__ = ["available_backends", "dga_attention", "dense_attention", "naive_dga_attention", "resolve_backend"]
