"""Validation of what the attention operators are given, shared by `dga_attention` and `dense_attention`, so
that DGA and its dense fallback accept and refuse the same inputs. Every refusal names the argument, what it
got and what is allowed."""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def autocast_inputs(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Under autocast, query, key and value in the autocast dtype, as autocast hands them to PyTorch's
    attention (mixed precision leaves them mixed: a bf16 projection, then a float32 rotary embedding); else as
    they are, and `check_attention_inputs` refuses mixed dtypes."""
    tensors = (query, key, value)
    if not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in tensors):
        return query, key, value
    device = query.device.type
    if not torch.is_autocast_enabled(device):
        return query, key, value
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) for t in tensors)


def check_attention_inputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, prefill: bool) -> None:
    """query [B, Hq, q_len, d], key [B, Hkv, kv_len, d], value [B, Hkv, kv_len, dv]: one floating dtype, one
    device, Hq a multiple of Hkv, and q_len == kv_len for a prefill (`dga_attention`) or q_len <= kv_len
    (`dense_attention`: the queries are the last q_len positions)."""
    tensors = {"query": query, "key": key, "value": value}
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")

    def shapes() -> str:  # built only for a message: Dynamo cannot format a dynamic (symbolic) shape
        return ", ".join(f"{name} {tuple(tensor.shape)}" for name, tensor in tensors.items())

    if any(tensor.dim() != 4 for tensor in tensors.values()):
        raise ValueError(f"query, key and value must be 4-D [batch, heads, length, head_dim]; got {shapes()}")
    dtypes = {name: tensor.dtype for name, tensor in tensors.items()}
    if any(dtype not in FLOAT_DTYPES for dtype in dtypes.values()) or len(set(dtypes.values())) > 1:
        got = ", ".join(f"{name} {str(dtype).removeprefix('torch.')}" for name, dtype in dtypes.items())
        allowed = ", ".join(str(dtype).removeprefix("torch.") for dtype in FLOAT_DTYPES)
        raise TypeError(f"query, key and value must share one floating dtype ({allowed}); got {got}")
    devices = {tensor.device for tensor in tensors.values()}
    if len(devices) > 1:
        got = ", ".join(f"{name} on {tensor.device}" for name, tensor in tensors.items())
        raise ValueError(f"query, key and value must be on one device; got {got}")
    if not query.shape[0] == key.shape[0] == value.shape[0]:
        raise ValueError(f"query, key and value must have the same batch size (dim 0); got {shapes()}")
    if key.shape[1:3] != value.shape[1:3]:
        raise ValueError(f"key and value must have the same heads and length (dims 1-2); got {shapes()}")
    if key.shape[1] == 0 or query.shape[1] % key.shape[1]:
        raise ValueError(
            f"query heads must be a positive multiple of key/value heads (GQA); got {query.shape[1]} query heads "
            f"and {key.shape[1]} key/value heads ({shapes()})"
        )
    if query.shape[-1] != key.shape[-1] or query.shape[-1] == 0:
        raise ValueError(f"query and key must have the same head dim (dim 3), at least 1; got {shapes()}")
    q_len, kv_len = query.shape[2], key.shape[2]
    if prefill and q_len != kv_len:
        raise ValueError(f"dga_attention computes prefill (q_len == kv_len); got q_len={q_len}, kv_len={kv_len}")
    if q_len > kv_len:
        raise ValueError(f"the queries are the last q_len of the kv_len positions; got q_len={q_len} > kv_len={kv_len}")


def boolean_padding_mask(padding_mask: torch.Tensor | None, batch: int, kv_len: int) -> torch.Tensor | None:
    """padding_mask [B, kv_len] as bool, True = real token. Accepted: bool, or integer/floating 0/1 (1 = real
    token, Transformers' attention_mask). Anything else is refused, notably an additive float mask (0 for real
    tokens, -inf for padding), which read as 0/1 would swap real tokens and padding."""
    if padding_mask is None:
        return None
    if not isinstance(padding_mask, torch.Tensor):
        raise TypeError(f"padding_mask must be a [batch, kv_len] tensor or None, got {type(padding_mask).__name__}")
    if tuple(padding_mask.shape) != (batch, kv_len):
        raise ValueError(f"padding_mask must be [batch, kv_len] = {(batch, kv_len)}, got {tuple(padding_mask.shape)}")
    if padding_mask.dtype == torch.bool:
        return padding_mask
    if padding_mask.is_complex() or not bool(((padding_mask == 0) | (padding_mask == 1)).all()):
        raise ValueError(
            f"padding_mask must be bool or 0/1 (True/1 = real token); got {padding_mask.dtype} with other values "
            f"(e.g. {_first_other_value(padding_mask)}). An additive mask (0 = real token, -inf = padding) reads "
            "the other way round: pass `additive_mask == 0`"
        )
    return padding_mask != 0


def _first_other_value(padding_mask: torch.Tensor) -> object:
    others = padding_mask[(padding_mask != 0) & (padding_mask != 1)]
    return others[0].item() if others.numel() else None


def checked_scale(scale: object, head_dim: int) -> float:
    """The softmax scale as a Python float: 1/sqrt(head_dim) for None, else a finite real number (any sign:
    docs/spec.md's `s` is not restricted; 0 gives uniform weights over the visible keys)."""
    if scale is None:
        return head_dim**-0.5
    # comparisons, not math.isfinite: under torch.compile(dynamic=True) a model's float scale is symbolic
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not -math.inf < scale < math.inf:
        raise ValueError(f"scale={scale!r} is invalid: allowed values are None (1/sqrt(head_dim)) or a finite real number")
    return float(scale)
