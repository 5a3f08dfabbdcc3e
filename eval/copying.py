"""Long-range copy: a passage of random corpus words appears near the start of the context and again at its
end, `length - passage_tokens` tokens later; teacher-forced token accuracy on the second copy.

Only an attention that still reaches the first copy can predict the second (the words are random, so
neither the filler between them nor the passage's own start gives them away). The first token of the
second copy has no cue and is not scored: position t of the second copy is predicted from the logits
at t - 1, for t = 1 .. passage_tokens - 1.

`"through": "prefill"` (default) scores all of them in one forward pass (the prefill's attention);
`"through": "decoding"` prefills up to the second copy's first token and predicts each later token with
one cached decoding step fed the true previous token, so the decoding cache's attention is what is scored
(a DGACache when the configuration decodes with one).
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass

import torch

from dga_hf.decoding import cache_for, cache_keyword

from .corpus import pydoc_text
from .generation import cache_argument


@dataclass(frozen=True)
class CopySample:
    ids: list[int]
    passage: list[int]
    first_start: int  # where the first copy begins; the second copy is the last len(passage) tokens


@functools.lru_cache(maxsize=1)
def corpus_words() -> tuple[str, ...]:
    return tuple(sorted(set(re.findall(r"\b[a-z]{3,12}\b", pydoc_text()))))


def make_samples(tokenizer, corpus: list[int], length: int, spec: dict, rng: random.Random) -> list[CopySample]:
    return [
        make_sample(tokenizer, corpus, length, spec.get("passage_tokens", 64), spec.get("lead_tokens", 32), rng)
        for _ in range(spec.get("samples", 2))
    ]


def make_sample(
    tokenizer, corpus: list[int], length: int, passage_tokens: int, lead_tokens: int, rng: random.Random
) -> CopySample:
    """`lead` filler tokens, the passage, filler up to the last `passage_tokens` positions, the passage again."""
    passage = random_passage(tokenizer, passage_tokens, rng)
    gap = length - lead_tokens - 2 * passage_tokens
    if gap < 1:
        raise ValueError(f"a copy sample of {length} tokens cannot hold two passages of {passage_tokens} tokens")
    start = rng.randrange(len(corpus) - lead_tokens - gap)
    lead, between = corpus[start : start + lead_tokens], corpus[start + lead_tokens : start + lead_tokens + gap]
    return CopySample(ids=lead + passage + between + passage, passage=passage, first_start=lead_tokens)


def random_passage(tokenizer, passage_tokens: int, rng: random.Random) -> list[int]:
    words = corpus_words()
    ids: list[int] = []
    while len(ids) < passage_tokens:  # words are 1+ tokens each: draw until there are enough
        text = " " + " ".join(rng.choice(words) for _ in range(passage_tokens))
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[:passage_tokens]


def token_accuracy(predicted: torch.Tensor, target: torch.Tensor) -> float:
    return float((predicted == target).float().mean())


@torch.no_grad()
def second_copy_accuracy(model, sample: CopySample) -> float:
    p = len(sample.passage)
    ids = torch.tensor([sample.ids], device=model.device)
    # logits of the last p positions: those at -p .. -2 predict the second copy's tokens 1 .. p-1
    logits = model(input_ids=ids, logits_to_keep=p).logits[0, :-1]
    return token_accuracy(logits.argmax(-1).cpu(), torch.tensor(sample.passage[1:]))


@torch.no_grad()
def second_copy_accuracy_by_decoding(model, sample: CopySample, cache=None) -> float:
    """The same score, each token from one decoding step over `cache` (default: `dga_hf.decoding.cache_for`,
    i.e. a DGACache when DGA decoding is enabled on the model, else the model's DynamicCache)."""
    p = len(sample.passage)
    cache = cache_for(model) if cache is None else cache
    prompt = torch.tensor([sample.ids[: len(sample.ids) - p + 1]], device=model.device)
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1, **({} if cache is None else {cache_keyword(model): cache}))
    predicted = [int(out.logits[0, -1].argmax())]
    for token in sample.passage[1:-1]:
        out = model(input_ids=torch.tensor([[token]], device=model.device), use_cache=True, **cache_argument(out))
        predicted.append(int(out.logits[0, -1].argmax()))
    return token_accuracy(torch.tensor(predicted), torch.tensor(sample.passage[1:]))


def run(model, tokenizer, samples: list[CopySample], spec: dict) -> tuple[dict, list[dict]]:
    through = spec.get("through", "prefill")
    if through not in ("prefill", "decoding"):
        raise ValueError(f"copy task: through={through!r} is invalid: allowed values are 'prefill', 'decoding'")
    score = second_copy_accuracy if through == "prefill" else second_copy_accuracy_by_decoding
    details = []
    for sample in samples:
        details.append({"accuracy": score(model, sample)})
    return summarize(details, spec), details


def summarize(details: list[dict], spec: dict) -> dict:
    """The metrics of a (configuration, length) from its samples' details (the harness gathers them from
    every process first)."""
    return {"accuracy": sum(d["accuracy"] for d in details) / len(details)}


METRICS = {"accuracy": {"label": "copy token accuracy", "unit": "share", "higher_is_better": True, "compare": "diff"}}
