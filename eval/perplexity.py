"""Long-text perplexity: every position of the second half of a window, never only the last token."""

from __future__ import annotations

import math
import random

import torch

from dga_hf.ops.stats import counting_keys


# Positions per lm-head projection when scoring. The logits of the scored positions are never all in memory:
# with Qwen2.5's 151,936-entry vocabulary the second half of a 32K window (16K positions) is ~10 GB of float32
# logits, a 1024-position chunk 0.6 GB.
SCORE_CHUNK = 1024

# Config attributes of models whose logits are not just `lm_head(hidden)`, with the value that makes them so:
# chunked scoring projects with the lm head alone and would silently score other logits than the model's.
LOGIT_POSTPROCESSING = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}


@torch.no_grad()
def second_half_nll(model, window: torch.Tensor, chunk: int = SCORE_CHUNK) -> tuple[float, int]:
    """Summed negative log-likelihood of the tokens in the second half of `window` [L] (each predicted
    from all tokens before it), and how many tokens that is. The decoder runs once over the window; its
    hidden states at the scored positions go through the lm head `chunk` positions at a time."""
    if chunk < 1:
        raise ValueError(f"chunk={chunk}: the number of positions per lm-head projection must be at least 1")
    ids = window.view(1, -1).to(model.device)
    length, half = ids.shape[1], ids.shape[1] // 2
    # positions half-1 .. L-2 predict tokens half .. L-1
    hidden = final_hidden_states(model, ids)[0, half - 1 : length - 1]
    head = model.get_output_embeddings()
    nll = sum(
        torch.nn.functional.cross_entropy(head(hidden[start : start + chunk]).float(), ids[0, half + start : half + start + chunk], reduction="sum")
        for start in range(0, length - half, chunk)
    )
    return float(nll), length - half


def final_hidden_states(model, ids: torch.Tensor) -> torch.Tensor:
    """The decoder's output (after its final norm) [batch, L, hidden]: what the lm head turns into logits."""
    for name, neutral in LOGIT_POSTPROCESSING.items():
        value = getattr(model.config, name, neutral)
        if value != neutral:
            raise ValueError(
                f"{model.config.model_type} sets {name}={value!r}: its logits are not lm_head(hidden), which is all "
                f"that chunked scoring computes; allowed: models with {name}={neutral!r}"
            )
    # no KV cache: a single forward needs none, and at 32K tokens it would hold every layer's keys and values
    return model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state


def pooled_perplexity(nlls: list[tuple[float, int]]) -> float:
    """exp of the mean per-token NLL over all scored tokens of all windows."""
    return math.exp(sum(n for n, _ in nlls) / sum(c for _, c in nlls))


def perplexity(model, windows: list[torch.Tensor]) -> float:
    return pooled_perplexity([second_half_nll(model, window) for window in windows])


# The harness task: `windows` corpus windows of each length, at seeded random offsets.


def make_samples(tokenizer, corpus: list[int], length: int, spec: dict, rng: random.Random) -> list[torch.Tensor]:
    starts = [rng.randrange(len(corpus) - length) for _ in range(spec.get("windows", 2))]
    return [torch.tensor(corpus[start : start + length]) for start in starts]


def run(model, tokenizer, windows: list[torch.Tensor], spec: dict) -> tuple[dict, list[dict]]:
    details = []
    for window in windows:
        with counting_keys() as keys:
            nll, count = second_half_nll(model, window)
        # what the window's forward read, over every layer (a dense model records dense reads: 1.0)
        details.append({"perplexity": math.exp(nll / count), "nll": nll, "tokens": count, "keys_read": keys.read, "keys_dense": keys.dense})
    return summarize(details, spec), details


def summarize(details: list[dict], spec: dict) -> dict:
    """The metrics of a (configuration, length) from its windows' details (the harness gathers them from
    every process first): the perplexity pooled over every scored token."""
    metrics = {"perplexity": pooled_perplexity([(d["nll"], d["tokens"]) for d in details])}
    if all("keys_dense" in d for d in details):
        dense = sum(d["keys_dense"] for d in details)
        # no attention call counted: the model is not patched, every layer attended densely
        metrics["keys_read"] = sum(d["keys_read"] for d in details) / dense if dense else 1.0
    return metrics


METRICS = {
    "perplexity": {"label": "perplexity (second half of each window)", "unit": "", "higher_is_better": False, "compare": "diff"},
    "keys_read": {"label": "keys read, measured (share of dense attention's, every layer of the windows' forwards)", "unit": "share",
                  "higher_is_better": False, "compare": "ratio"},
}
