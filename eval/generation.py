"""Greedy decoding with a KV cache, timed step by step (prefill = time to first token, then each new token).

Written out instead of `model.generate` so that the same loop gives both the tokens the accuracy tasks
score and the latencies the speed task reports, with nothing (sampling, stopping criteria, logits
processors) in between.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from dga_hf.decoding import cache_for, cache_keyword, cache_nbytes


@dataclass
class Generation:
    tokens: list[int]
    prefill_seconds: float
    step_seconds: list[float] = field(default_factory=list)
    kv_bytes: int | None = None  # what the KV cache holds after the last step

    @property
    def inter_token_seconds(self) -> float | None:
        return sum(self.step_seconds) / len(self.step_seconds) if self.step_seconds else None


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a wall-clock interval covers the kernels it launched."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def greedy_generate(model, prompt: list[int], new_tokens: int, *, stop_ids: tuple[int, ...] = ()) -> Generation:
    """Greedy continuation of `prompt` (token ids): up to `new_tokens` tokens, stopping after a token in
    `stop_ids`. The first token comes from the prefill; each later one from one cached decoding step.
    The cache is a DGACache when `dga_hf.enable_decoding` was called on the patched model (as generate()
    would use), else the model's own DynamicCache."""
    device = model.device
    ids = torch.tensor([prompt], device=device)
    cache = cache_for(model)
    synchronize(device)
    began = time.perf_counter()
    # logits_to_keep=1: the prefill needs only the last position's logits, not [L, vocab]
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **({} if cache is None else {cache_keyword(model): cache}))
    token = int(out.logits[0, -1].argmax())
    synchronize(device)
    result = Generation(tokens=[token], prefill_seconds=time.perf_counter() - began)
    while len(result.tokens) < new_tokens and token not in stop_ids:
        began = time.perf_counter()
        out = model(input_ids=torch.tensor([[token]], device=device), use_cache=True, **cache_argument(out))
        token = int(out.logits[0, -1].argmax())
        synchronize(device)
        result.step_seconds.append(time.perf_counter() - began)
        result.tokens.append(token)
    result.kv_bytes = cache_nbytes(next(iter(cache_argument(out).values())))
    return result


def cache_argument(out) -> dict:
    """The KV cache of a model output, as the keyword argument that feeds it back: `cache` since
    transformers renamed `past_key_values` (the old name still works there, with a warning)."""
    fields = getattr(type(out), "__dataclass_fields__", {})
    return {"cache": out.cache} if "cache" in fields else {"past_key_values": out.past_key_values}


def stop_ids_of(tokenizer) -> tuple[int, ...]:
    eos = tokenizer.eos_token_id
    return tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
