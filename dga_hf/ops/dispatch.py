"""The single dispatch point of DGA backends."""

from __future__ import annotations

import contextlib
import importlib.util
import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional

import torch
from torch._C import DispatchKey

from .. import rule
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

    Under torch.compile the attention is the operator ``torch.ops.dga_hf.prefill`` (`prefill_operator`), which
    the compiler does not trace into: the selection has data-dependent shapes, so
    ``torch.compile(model, fullgraph=True)`` captures a DGA prefill whole. Outside it the same computation runs
    directly, so that training keeps the backward that reuses the forward's layout (ops/autograd.py).

    Returns: [B, Hq, L, dv] in the dtype of ``query``.
    """
    settings = resolve_config(config)
    query, key, value = autocast_inputs(query, key, value)
    check_attention_inputs(query, key, value, prefill=True)
    batch, q_heads, seq_len, head_dim = query.shape
    padding_mask = boolean_padding_mask(padding_mask, batch, seq_len)
    scale = checked_scale(scale, head_dim)
    if torch.compiler.is_compiling():
        return prefill_operator(query, key, value, padding_mask, settings.to_text(), scale, backend)
    return _attend(query, key, value, padding_mask, settings, scale, backend)


def _attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    padding_mask: torch.Tensor | None,
    settings: DGAConfig,
    scale: float,
    backend: str,
) -> torch.Tensor:
    """`dga_attention` on checked inputs (a boolean padding mask, a float scale): what it runs directly, and
    what the operator `dga_hf::prefill` runs."""
    batch, q_heads, seq_len, _ = query.shape
    if query.numel() == 0 or value.numel() == 0:
        resolve_backend(settings.backend if backend == "auto" else backend, query.device)
        return query.new_zeros(batch, q_heads, seq_len, value.shape[-1])
    query, key, value, unreadable = _read_non_finite_as_zero(query, key, value, padding_mask)
    out = prefill(query, key, value, settings.for_length(seq_len), scale=scale, backend=backend,
                  padding_mask=padding_mask).output
    return out if unreadable is None else out.masked_fill(unreadable.unsqueeze(-1), math.nan)


# PyTorch infers the operator's schema from these (string) annotations: `Optional[...]` is the spelling it has
# matched since it reads string annotations (2.5, the oldest release this package supports); `X | None` was
# only checked on 2.13.
@torch.library.custom_op("dga_hf::prefill", mutates_args=())
def prefill_operator(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    padding_mask: Optional[torch.Tensor],
    settings: str,
    scale: float,
    backend: str,
) -> torch.Tensor:
    """`dga_attention` as an operator that torch.compile keeps opaque: the arguments are `_attend`'s, checked,
    with the settings as their text (`DGAConfig.to_text`). Differentiable with respect to query, key and value
    (`prefill_backward_operator`)."""
    return _attend(query, key, value, padding_mask, DGAConfig.from_text(settings), scale, backend).contiguous()


@prefill_operator.register_fake
def _prefill_shape(query, key, value, padding_mask, settings, scale, backend):
    """The output as the compiler traces it: shape, dtype and device, no values."""
    batch, q_heads, seq_len, _ = query.shape
    return query.new_empty(batch, q_heads, seq_len, value.shape[-1])


@torch.library.custom_op("dga_hf::prefill_backward", mutates_args=())
def prefill_backward_operator(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    padding_mask: Optional[torch.Tensor],
    settings: str,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of `prefill_operator` with respect to query, key and value: its forward is run again with
    autograd recording (the layout lives only inside one call, so it cannot be kept from the forward) and
    differentiated through the backend's own backward (ops/autograd.py). An operator of its own, since
    recomputing the selection cannot be traced either."""
    with _recording_autograd():
        inputs = [tensor.detach().requires_grad_() for tensor in (query, key, value)]
        out = _attend(*inputs, padding_mask, DGAConfig.from_text(settings), scale, backend)
        if not out.requires_grad:  # an empty input: the output reads nothing
            return tuple(torch.zeros_like(tensor, memory_format=torch.contiguous_format) for tensor in inputs)
        grads = torch.autograd.grad(out, inputs, grad_out, materialize_grads=True)
    return tuple(grad.contiguous() for grad in grads)


@prefill_backward_operator.register_fake
def _prefill_backward_shapes(grad_out, query, key, value, padding_mask, settings, scale, backend):
    return tuple(tensor.new_empty(tensor.shape) for tensor in (query, key, value))


@contextlib.contextmanager
def _recording_autograd() -> Iterator[None]:
    """Autograd records again inside an operator's implementation, which PyTorch runs below autograd: the
    dispatcher excludes autograd's keys there, and grad mode alone does not bring them back. PyTorch has no
    public switch for this; its own higher-order operators set the keys with the same guard."""
    excluded = torch._C._dispatch_tls_local_exclude_set()
    for key in (DispatchKey.AutogradFunctionality, DispatchKey.AutogradOther, DispatchKey.AutogradNestedTensor):
        excluded = excluded.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), excluded), torch.enable_grad():
        yield


def _save_for_backward(ctx, inputs, output):
    query, key, value, padding_mask, settings, scale, backend = inputs
    ctx.save_for_backward(query, key, value, padding_mask)
    ctx.settings, ctx.scale, ctx.backend = settings, scale, backend


def _backward(ctx, grad_out):
    query, key, value, padding_mask = ctx.saved_tensors
    grads = prefill_backward_operator(grad_out, query, key, value, padding_mask, ctx.settings, ctx.scale, ctx.backend)
    return (*grads, None, None, None, None)


prefill_operator.register_autograd(_backward, setup_context=_save_for_backward)


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
    keep_selection: bool = False,
) -> Prefill:
    """The one dispatch of a prefill: backend choice, padding compaction, layout (stages 1-4), stage 5,
    uncompaction. `dga_attention` returns its output; a decode state also keeps the selection
    (`keep_selection`).
    `dense`: dense attention with the padding mask (a decode state's dense layer or short prompt); else
    the naive backend, dense attention for an unpadded sequence shorter than min_seq_len, dense attention
    when no query has an old block (the window spans the sequence: the same function, docs/spec.md's
    invariants, without the selection; unless `keep_selection`, since a decode state ages the prompt's blocks
    out of the window later), or DGA."""
    batch, q_heads, seq_len, head_dim = query.shape
    kv_heads = key.shape[1]
    chosen = resolve_backend(config.backend if backend == "auto" else backend, query.device)
    q, k, v, lengths, order = compact_padding(query, key, value, padding_mask)
    q = q.view(batch, kv_heads, q_heads // kv_heads, seq_len, head_dim)
    short = padding_mask is None and seq_len < config.min_seq_len and chosen != "naive"
    all_local = not keep_selection and chosen != "naive" and rule.old_block_count(
        rule.block_of(seq_len - 1, config.group_size), config.local_blocks) == 0
    if dense or short or all_local:
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
