"""Stage 5 as one autograd function for every fast backend.

The focal selection (stages 1-2) is a discrete choice and passes no gradient; the focal keys/values are
gathered and the aggregates computed with ordinary differentiable ops (O(L * d) saved), so gradients
reach query, key and value through them too. Stage 5 itself saves only its inputs, its output and one
log-sum-exp per row, and the backend's ``attend_backward`` recomputes the logits tile by tile: no L x L
tensor in the forward or the backward.

A backend is a module with ``attend(q, k, v, layout, config, scale) -> out`` (inference),
``attend_forward(q, k, v, layout, config, scale) -> (out, lse)`` and
``attend_backward(q, k, v, layout, config, scale, out, lse, grad_out)`` returning the gradients of q, k,
v, layout.focal_key, layout.focal_value, layout.agg_key and layout.agg_value.
"""

from __future__ import annotations

from dataclasses import replace
from types import ModuleType

import torch

from ..config import DGAConfig
from .layout import DGALayout

_DIFFERENTIABLE_FIELDS = ("focal_key", "focal_value", "agg_key", "agg_value")


class _StageFive(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend, layout, config, scale, query, key, value, focal_key, focal_value, agg_key, agg_value):
        layout = replace(layout, focal_key=focal_key, focal_value=focal_value, agg_key=agg_key, agg_value=agg_value)
        out, lse = backend.attend_forward(query, key, value, layout, config, scale)
        ctx.save_for_backward(query, key, value, focal_key, focal_value, agg_key, agg_value, out, lse)
        # the differentiable tensors travel through save_for_backward only; so would the score keys (a view of
        # agg_key, or the principal ends), which the backward does not read: it reads the choice, layout.expanded
        ctx.layout = replace(layout, score_key=None, **dict.fromkeys(_DIFFERENTIABLE_FIELDS))
        ctx.backend, ctx.config, ctx.scale = backend, config, scale
        # the backward recomputes the forward's products: under autocast it must run them in the same
        # precision (what torch.amp.custom_fwd / custom_bwd do, for whichever device the inputs are on)
        device = query.device.type
        ctx.autocast = device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, focal_key, focal_value, agg_key, agg_value, out, lse = ctx.saved_tensors
        layout = replace(ctx.layout, focal_key=focal_key, focal_value=focal_value, agg_key=agg_key, agg_value=agg_value)
        device, enabled, dtype = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            grads = ctx.backend.attend_backward(
                query, key, value, layout, ctx.config, ctx.scale, out, lse, grad_out.contiguous()
            )
        return (None, None, None, None, *grads)


def attend(
    backend: ModuleType,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: DGALayout,
    config: DGAConfig,
    scale: float,
) -> torch.Tensor:
    """Stage 5 with ``backend``, differentiable with respect to q, k, v and the layout's focal keys/values
    and aggregates. Where no gradient is wanted it is ``backend.attend``, which need not compute the
    log-sum-exp that the backward reads."""
    inputs = (query, key, value, layout.focal_key, layout.focal_value, layout.agg_key, layout.agg_value)
    if not (torch.is_grad_enabled() and any(x.requires_grad for x in inputs)):
        return backend.attend(query, key, value, layout, config, scale)
    return _StageFive.apply(
        backend, layout, config, scale, query, key, value,
        layout.focal_key, layout.focal_value, layout.agg_key, layout.agg_value,
    )
