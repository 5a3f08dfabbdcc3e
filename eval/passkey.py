"""Passkey retrieval: a 5-digit key hidden at a chosen depth of natural filler text (Python's documentation,
a fresh random stretch per sample), read back by greedy decoding and scored by exact match.

The prompt is built from token ids, so its length and the needle's depth are exact in tokens:
`intro + filler[:k] + needle + filler[k:] + question`, with `k / len(filler) = depth`, and
`len(prompt) + max_new_tokens = length` (the whole sequence stays within the context length).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from .generation import greedy_generate, stop_ids_of

INTRO = (
    "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the pass key.\n\n"
)
NEEDLE = "\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
QUESTION = "\n\nWhat is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeySample:
    prompt: list[int]
    key: str
    depth: float
    needle_start: int  # index in `prompt` of the needle's first token


def make_samples(tokenizer, corpus: list[int], length: int, spec: dict, rng: random.Random) -> list[PasskeySample]:
    depths = spec.get("depths", [0.1, 0.5, 0.9])
    per_depth = spec.get("samples_per_depth", 1)
    new_tokens = spec.get("max_new_tokens", 8)
    return [
        make_sample(tokenizer, corpus, length - new_tokens, depth, rng)
        for depth in depths
        for _ in range(per_depth)
    ]


def make_sample(tokenizer, corpus: list[int], prompt_length: int, depth: float, rng: random.Random) -> PasskeySample:
    key = str(rng.randint(10_000, 99_999))
    intro = tokenizer(INTRO)["input_ids"]  # the tokenizer's own special tokens (BOS) go first
    needle = encode(tokenizer, NEEDLE.format(key=key))
    question = encode(tokenizer, QUESTION)
    filler_length = prompt_length - len(intro) - len(needle) - len(question)
    if filler_length < 1:
        raise ValueError(f"a passkey prompt of {prompt_length} tokens leaves no room for filler text")
    start = rng.randrange(len(corpus) - filler_length)
    filler = corpus[start : start + filler_length]
    split = round(depth * filler_length)
    prompt = intro + filler[:split] + needle + filler[split:] + question
    return PasskeySample(prompt=prompt, key=key, depth=depth, needle_start=len(intro) + split)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def exact_match(generated: str, key: str) -> bool:
    """The first number in the answer is the key (so "12345." and " 12345 is" count, "1234" does not)."""
    found = re.search(r"\d+", generated)
    return found is not None and found.group() == key


def run(model, tokenizer, samples: list[PasskeySample], spec: dict) -> tuple[dict, list[dict]]:
    new_tokens = spec.get("max_new_tokens", 8)
    details = []
    for sample in samples:
        generation = greedy_generate(model, sample.prompt, new_tokens, stop_ids=stop_ids_of(tokenizer))
        answer = tokenizer.decode(generation.tokens, skip_special_tokens=True)
        details.append({"depth": sample.depth, "key": sample.key, "answer": answer, "match": exact_match(answer, sample.key)})
    return summarize(details, spec), details


def summarize(details: list[dict], spec: dict) -> dict:
    """The metrics of a (configuration, length) from its samples' details (the harness gathers them from
    every process first)."""
    return {"accuracy": sum(d["match"] for d in details) / len(details)}


METRICS = {"accuracy": {"label": "passkey exact match", "unit": "share", "higher_is_better": True, "compare": "diff"}}
