"""Long-text perplexity: every position of the second half of a window, never only the last token."""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def second_half_nll(model, window: torch.Tensor) -> tuple[float, int]:
    """Summed negative log-likelihood of the tokens in the second half of `window` [L] (each predicted
    from all tokens before it), and how many tokens that is."""
    ids = window.view(1, -1).to(model.device)
    logits = model(ids).logits[0].float()
    half = ids.shape[1] // 2
    nll = torch.nn.functional.cross_entropy(logits[half - 1 : -1], ids[0, half:], reduction="sum")
    return float(nll), ids.shape[1] - half


def perplexity(model, windows: list[torch.Tensor]) -> float:
    total, count = 0.0, 0
    for window in windows:
        nll, n = second_half_nll(model, window)
        total, count = total + nll, count + n
    return math.exp(total / count)
