"""The single dispatch point of DGA backends."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from ..config import BACKENDS, DGAConfig
from . import autograd, torch_backend
from .dense import dense_attention
from .layout import build_layout, compact_padding, compute_dtype, uncompact
from .naive import naive_dga_attention


def _triton_usable(device: torch.device) -> bool:
    return device.type == "cuda" and importlib.util.find_spec("triton") is not None


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    device = torch.device(device)
    names = ["torch", "naive"]
    if _triton_usable(device):
        names.insert(0, "triton")
    return names


def resolve_backend(requested: str, device: torch.device) -> str:
    """"auto" picks Triton on CUDA when it is installed, else PyTorch. An explicit backend that cannot
    run on this device is an error, never a silent substitution."""
    if requested not in BACKENDS:
        raise ValueError(f"backend={requested!r} is invalid: allowed values are {BACKENDS}")
    if requested == "auto":
        return "triton" if _triton_usable(device) else "torch"
    return requested


def dga_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    config: DGAConfig,
    *,
    scale: float | None = None,
    backend: str = "auto",
    padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal Dynamic Group Attention over a whole sequence (prefill), as defined in DGA_SPEC.md.

    Args:
        query: [B, Hq, L, d]; key, value: [B, Hkv, L, d] with Hq a multiple of Hkv (GQA, no copy).
        config: the DGA settings.
        scale: softmax scale, default ``1/sqrt(d)``.
        backend: "auto" defers to ``config.backend``; "torch", "triton" or "naive" force one.
        padding_mask: optional [B, L] bool, True for real tokens. Each row gets the result of its own
            unpadded sequence; padded query positions return zeros.

    Returns: [B, Hq, L, d] in the dtype of ``query``.
    """
    _check_shapes(query, key, value, padding_mask)
    scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
    return prefill(query, key, value, config, scale=scale, backend=backend, padding_mask=padding_mask).output


@dataclass
class Prefill:
    """A prefill's output and the focal selection it attended with, in compacted coordinates (each row's
    real tokens first, ops/layout.py): what a decode state (dga_hf/decoding) starts from."""

    output: torch.Tensor  # [B, Hq, L, dv] in the query's dtype; padded query positions are zero
    query: torch.Tensor  # [B, Hkv, G, L, d], compacted
    key: torch.Tensor  # [B, Hkv, L, d], compacted
    value: torch.Tensor  # [B, Hkv, L, dv], compacted
    lengths: torch.Tensor  # [B] real tokens per row
    focal: torch.Tensor  # [B, Hkv, L] bool: the focal set F; every real token where the attention was dense
    backend: str  # the backend the request resolved to ("triton", "torch" or "naive")


def prefill(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    config: DGAConfig,
    *,
    scale: float,
    backend: str = "auto",
    padding_mask: torch.Tensor | None = None,
    dense: bool = False,
) -> Prefill:
    """The one dispatch of a prefill: backend choice, padding compaction, layout (stages 1-4), stage 5,
    uncompaction. `dga_attention` returns its output; a decode state also keeps the selection.
    `dense`: dense attention with the padding mask (a decode state's dense layer or short prompt); else
    the naive backend, dense attention for an unpadded sequence shorter than min_seq_len, or DGA."""
    batch, q_heads, seq_len, head_dim = query.shape
    kv_heads = key.shape[1]
    chosen = resolve_backend(config.backend if backend == "auto" else backend, query.device)
    q, k, v, lengths, order = compact_padding(query, key, value, padding_mask)
    q = q.view(batch, kv_heads, q_heads // kv_heads, seq_len, head_dim)
    short = padding_mask is None and seq_len < config.min_seq_len and chosen != "naive"
    if dense or short:
        out = dense_attention(query, key, value, scale=scale, padding_mask=padding_mask)
        real = torch.arange(seq_len, device=query.device)[None, :] < lengths[:, None]
        return Prefill(out, q, k, v, lengths, real[:, None, :].expand(batch, kv_heads, seq_len), chosen)
    layout = build_layout(q, k, v, lengths, config, scale)
    if chosen == "naive":
        out = naive_dga_attention(query, key, value, config, scale=scale, padding_mask=padding_mask).to(query)
    else:
        if chosen == "triton":
            from . import triton_backend

            # the kernel reads bf16/fp16 operands directly and accumulates in fp32
            out = autograd.attend(triton_backend, q, k, v, layout, config, scale)
        else:
            dtype = compute_dtype(query.dtype)
            out = autograd.attend(torch_backend, q.to(dtype), k.to(dtype), v.to(dtype), layout, config, scale)
        out = uncompact(out.reshape(batch, q_heads, seq_len, -1), order).to(query.dtype)
    return Prefill(out, q, k, v, lengths, layout.focal, chosen)


def _check_shapes(query, key, value, padding_mask) -> None:
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(
            f"dga_attention expects 4-D query/key/value [B, H, L, d], got {tuple(query.shape)}, "
            f"{tuple(key.shape)}, {tuple(value.shape)}"
        )
    if query.shape[0] != key.shape[0] or key.shape[:3] != value.shape[:3]:
        raise ValueError(f"batch/head/length of key {tuple(key.shape)} and value {tuple(value.shape)} must match")
    if query.shape[2] != key.shape[2]:
        raise ValueError(
            f"dga_attention computes prefill (q_len == kv_len); got q_len={query.shape[2]}, kv_len={key.shape[2]}"
        )
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"query heads ({query.shape[1]}) must be a multiple of key/value heads ({key.shape[1]})")
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"query head dim {query.shape[-1]} != key head dim {key.shape[-1]}")
    if padding_mask is not None and tuple(padding_mask.shape) != (query.shape[0], query.shape[2]):
        raise ValueError(f"padding_mask must be [B, L] = {(query.shape[0], query.shape[2])}, got {tuple(padding_mask.shape)}")
