"""The single dispatch point of DGA backends."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ..config import BACKENDS, DGAConfig, resolve_config
from . import autograd, stats, torch_backend
from .dense import dense_attention
from .inputs import autocast_inputs, boolean_padding_mask, check_attention_inputs, checked_scale
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
    if requested == "triton" and importlib.util.find_spec("triton") is None:
        raise ValueError(
            f"backend='triton' needs the Triton package, which is not installed (device {device}): install it with "
            "`pip install dga-hf[triton]` (or `pip install triton`; Linux with an NVIDIA GPU, or the CPU under "
            "TRITON_INTERPRET=1), or use backend='torch' or 'auto'"
        )
    return requested


def dga_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    config: DGAConfig | Mapping[str, Any] | str | None,
    *,
    scale: float | None = None,
    backend: str = "auto",
    padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal Dynamic Group Attention over a whole sequence (prefill), as defined in docs/spec.md.

    Args:
        query: [B, Hq, L, d]; key: [B, Hkv, L, d]; value: [B, Hkv, L, dv], Hq a multiple of Hkv (GQA, no
            copy); one dtype (float16, bfloat16, float32 or float64) and one device.
        config: the DGA settings, in any form `patch` takes: a `DGAConfig`, a dict of its fields, a preset
            name, or None for the shipped default (`dga_hf.config.resolve_config`).
        scale: softmax scale, default ``1/sqrt(d)``; any finite number.
        backend: "auto" defers to ``config.backend``; "torch", "triton" or "naive" force one.
        padding_mask: optional [B, L], bool or 0/1 (True/1 = real token; an additive 0/-inf mask is
            refused). Each row gets the result of its own unpadded sequence; padded query positions
            return zeros.

    Settings longer than the sequence act as their bounded equivalents (`DGAConfig.for_length`), so
    memory follows the sequence. Non-finite inputs (outside docs/spec.md) are defined as dense attention
    treats a key: a non-finite element of query i, or of key or value j (a real, not padded, position)
    makes NaN exactly the outputs that read it: query i's own, and those of every query at or after j of
    that key/value head (each reads j raw or inside its block's aggregate). Everything else, selection
    and aggregates included, reads such elements as 0, so earlier queries are finite: causality holds
    for every input.

    Returns: [B, Hq, L, dv] in the dtype of ``query``.
    """
    settings = resolve_config(config)
    query, key, value = autocast_inputs(query, key, value)
    check_attention_inputs(query, key, value, prefill=True)
    batch, q_heads, seq_len, head_dim = query.shape
    padding_mask = boolean_padding_mask(padding_mask, batch, seq_len)
    scale = checked_scale(scale, head_dim)
    if query.numel() == 0 or value.numel() == 0:
        resolve_backend(settings.backend if backend == "auto" else backend, query.device)
        return query.new_zeros(batch, q_heads, seq_len, value.shape[-1])
    query, key, value, unreadable = _read_non_finite_as_zero(query, key, value, padding_mask)
    out = prefill(query, key, value, settings.for_length(seq_len), scale=scale, backend=backend,
                  padding_mask=padding_mask).output
    return out if unreadable is None else out.masked_fill(unreadable.unsqueeze(-1), math.nan)


def _read_non_finite_as_zero(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, padding_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The inputs with their non-finite elements replaced by 0, and the [B, Hq, L] outputs that read one (the
    rule in `dga_attention`'s docstring), None when every element is finite (the common case: one check)."""
    if bool(torch.isfinite(query).all() & torch.isfinite(key).all() & torch.isfinite(value).all()):
        return query, key, value, None
    batch, q_heads, seq_len, _ = query.shape
    kv_heads = key.shape[1]
    real = torch.ones(batch, seq_len, dtype=torch.bool, device=query.device) if padding_mask is None else padding_mask
    finite_query, finite_key, finite_value = torch.isfinite(query), torch.isfinite(key), torch.isfinite(value)
    positions = torch.arange(seq_len, device=query.device)
    bad_key = ~(finite_key.all(-1) & finite_value.all(-1)) & real[:, None, :]  # [B, Hkv, L]
    first_bad = torch.where(bad_key, positions, seq_len).amin(-1, keepdim=True)  # [B, Hkv, 1]
    reads_bad_key = (positions >= first_bad).repeat_interleave(q_heads // kv_heads, dim=1)  # [B, Hq, L]
    unreadable = (reads_bad_key | ~finite_query.all(-1)) & real[:, None, :]
    zero = torch.zeros((), dtype=query.dtype, device=query.device)
    return (
        torch.where(finite_query, query, zero),
        torch.where(finite_key, key, zero),
        torch.where(finite_value, value, zero),
        unreadable,
    )


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
        if stats.counting():
            stats.record_dense(lengths, kv_heads)
        return Prefill(out, q, k, v, lengths, real[:, None, :].expand(batch, kv_heads, seq_len), chosen)
    layout = build_layout(q, k, v, lengths, config, scale)
    if stats.counting():
        stats.record_layout(layout, config)
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
