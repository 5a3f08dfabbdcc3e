"""Speed: time to first token (the prefill of a prompt), mean time per later generated token, the KV cache's
size after the last token (a DGACache when the configuration decodes with one), and peak memory,
for a corpus prompt of each length (`len(prompt) + new_tokens = length`). Each measurement is repeated
`repeats` times and the median kept; unless `warmup` is false, an untimed generation of the same prompt
runs first, so one-off costs (Triton compilation, allocator growth) are not charged to a configuration.
"""

from __future__ import annotations

import random
import statistics

from .generation import greedy_generate
from .memory import PeakMemory


def make_samples(tokenizer, corpus: list[int], length: int, spec: dict, rng: random.Random) -> list[list[int]]:
    prompt_length = length - spec.get("new_tokens", 16)
    start = rng.randrange(len(corpus) - prompt_length)
    return [corpus[start : start + prompt_length]]


def run(model, tokenizer, prompts: list[list[int]], spec: dict) -> tuple[dict, list[dict]]:
    new_tokens = spec.get("new_tokens", 16)
    details = []
    for prompt in prompts:
        if spec.get("warmup", True):
            # untimed, at the same shape: kernel compilation (Triton) and allocator growth happen here
            greedy_generate(model, prompt, 2)
        for _ in range(spec.get("repeats", 1)):
            with PeakMemory(model.device) as peak:
                # no stop tokens: every repeat times the same number of steps
                generation = greedy_generate(model, prompt, new_tokens)
            details.append({
                "ttft_ms": 1000 * generation.prefill_seconds,
                "itl_ms": 1000 * generation.inter_token_seconds if generation.step_seconds else None,
                "kv_cache_mb": generation.kv_bytes / 2**20,
                "peak_memory_mb": peak.megabytes,
                "memory_method": peak.method,
                "new_tokens": len(generation.tokens),
            })
    return summarize(details, spec), details


def summarize(details: list[dict], spec: dict) -> dict:
    """The metrics of a length from its repeats' details (the harness gathers them from every process
    first): the median of each."""
    return {name: _median(d[name] for d in details) for name in METRICS}


def _median(values) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


METRICS = {
    "ttft_ms": {"label": "time to first token (prefill)", "unit": "ms", "higher_is_better": False, "compare": "ratio"},
    "itl_ms": {"label": "inter-token latency", "unit": "ms", "higher_is_better": False, "compare": "ratio"},
    "kv_cache_mb": {"label": "KV cache after the last token", "unit": "MB", "higher_is_better": False, "compare": "ratio"},
    "peak_memory_mb": {"label": "peak memory above start", "unit": "MB", "higher_is_better": False, "compare": "ratio"},
}
