"""Long-text perplexity: every position of the second half of a window, never only the last token."""

from __future__ import annotations

import math
import random

import torch


@torch.no_grad()
def second_half_nll(model, window: torch.Tensor) -> tuple[float, int]:
    """Summed negative log-likelihood of the tokens in the second half of `window` [L] (each predicted
    from all tokens before it), and how many tokens that is."""
    ids = window.view(1, -1).to(model.device)
    length, half = ids.shape[1], ids.shape[1] // 2
    # only positions half-1 .. L-1 are scored: skip the lm head (a [L, vocab] matmul) on the rest
    logits = model(ids, logits_to_keep=length - half + 1).logits[0].float()
    nll = torch.nn.functional.cross_entropy(logits[:-1], ids[0, half:], reduction="sum")
    return float(nll), length - half


def pooled_perplexity(nlls: list[tuple[float, int]]) -> float:
    """exp of the mean per-token NLL over all scored tokens of all windows."""
    return math.exp(sum(n for n, _ in nlls) / sum(c for _, c in nlls))


def perplexity(model, windows: list[torch.Tensor]) -> float:
    return pooled_perplexity([second_half_nll(model, window) for window in windows])


# The harness task: `windows` corpus windows of each length, at seeded random offsets.


def make_samples(tokenizer, corpus: list[int], length: int, spec: dict, rng: random.Random) -> list[torch.Tensor]:
    starts = [rng.randrange(len(corpus) - length) for _ in range(spec.get("windows", 2))]
    return [torch.tensor(corpus[start : start + length]) for start in starts]


def run(model, tokenizer, windows: list[torch.Tensor], spec: dict, progress=None) -> tuple[dict, list[dict]]:
    nlls = []
    for window in windows:
        nlls.append(second_half_nll(model, window))
        if progress is not None:
            progress.update(1)
    details = [{"perplexity": math.exp(nll / count), "nll": nll, "tokens": count} for nll, count in nlls]
    return summarize(details, spec), details


def summarize(details: list[dict], spec: dict) -> dict:
    """The metrics of a (configuration, length) from its windows' details (the harness gathers them from
    every process first): the perplexity pooled over every scored token."""
    return {"perplexity": pooled_perplexity([(d["nll"], d["tokens"]) for d in details])}


METRICS = {"perplexity": {"label": "perplexity (second half of each window)", "unit": "", "higher_is_better": False, "compare": "diff"}}
