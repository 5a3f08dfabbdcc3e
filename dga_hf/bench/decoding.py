"""Decoding without the harness: the attention of one decoding step alone, and the cache helpers that the
whole-model decoding runs (`python -m dga_eval.decoding`, the harness) time and measure.

`--attention-step` times the attention part of one decoding step alone, without a model, at the Llama-3-8B
attention shape (32 query heads, 8 kv heads, head dim 128; bf16 on a GPU, float32 on the CPU): dense
(SDPA of one query over the whole cache) against one DGACache layer in keep_full and compact mode after a
DGA prefill of the same random keys (refresh steps included, so the median and the mean are both given):

    python -m dga_hf.bench.decoding --attention-step --lengths 16384,32768,65536,131072 --out runs/bench

`decode` (greedy decoding through several caches, their steps interleaved), `static_cache`, `named_cache`
and `synthetic_memory` (one layer's cache bytes on random tensors with a model's shapes) need a model or
its config, never the harness's model files, tokenizer or corpus.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import StaticCache

from ..config import DecodingConfig, DGAConfig, resolve_config
from ..decoding import DGACache, cache_keyword, cache_nbytes, dense_cache
from ..ops.dispatch import resolve_backend


@torch.no_grad()
def decode(model, prompt: list[int], new_tokens: int, caches: dict) -> dict:
    """Greedy decoding of `prompt` through each cache of `caches` (name -> cache). The prefills run one
    after another; the decoding steps are interleaved (step i of every cache, then step i + 1), so that
    drift in the machine's speed (other jobs, thermal or memory-bandwidth changes) falls on every cache
    alike and the ratios between them hold even when the absolute times move."""
    kw = cache_keyword(model)
    ids = torch.tensor([prompt], device=model.device)
    runs = {}
    for name, cache in caches.items():
        began = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, **{kw: cache}, logits_to_keep=1)
        runs[name] = {"prefill": time.perf_counter() - began, "tokens": [int(out.logits[0, -1].argmax())], "wall": [], "cpu": []}
    for _ in range(new_tokens - 1):
        for name, cache in caches.items():
            run = runs[name]
            began, began_cpu = time.perf_counter(), time.process_time()
            out = model(input_ids=torch.tensor([[run["tokens"][-1]]], device=model.device), use_cache=True, **{kw: cache})
            run["tokens"].append(int(out.logits[0, -1].argmax()))
            run["wall"].append(time.perf_counter() - began)
            run["cpu"].append(time.process_time() - began_cpu)
    return {
        name: {
            "prefill_s": run["prefill"],
            "itl_ms": 1000 * statistics.mean(run["wall"]),
            "itl_median_ms": 1000 * statistics.median(run["wall"]),
            "itl_cpu_ms": 1000 * statistics.mean(run["cpu"]),
            "itl_cpu_median_ms": 1000 * statistics.median(run["cpu"]),
            "kv_bytes": cache_nbytes(caches[name]),
            "tokens": run["tokens"],
        }
        for name, run in runs.items()
    }


def static_cache(model, max_length: int) -> StaticCache:
    """A preallocated dense cache of `max_length` positions for one row (transformers 4.x's StaticCache takes
    max_batch_size; 5.x sizes itself at the first update)."""
    batch = {"max_batch_size": 1} if "max_batch_size" in inspect.signature(StaticCache.__init__).parameters else {}
    return StaticCache(config=model.config, max_cache_len=max_length, **batch)


def named_cache(model, name: str, options: DecodingConfig | None = None):
    """A DynamicCache for "dense", else a DGACache in that mode (the other fields from `options`)."""
    return dense_cache(model) if name == "dense" else DGACache(model, options, mode=name)


def synthetic_memory(model_config, length: int, settings: DGAConfig, steps: int = 0) -> dict:
    """Bytes of one layer's cache after a `length`-token prefill (+ `steps` decoded tokens) on random
    tensors with the model's shapes."""
    heads = model_config.num_key_value_heads
    q_heads = model_config.num_attention_heads
    dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // q_heads
    torch.manual_seed(0)
    result = {}
    modes = ("keep_full",) if settings.expand_blocks else ("keep_full", "compact")  # compact cannot expand
    for name in ("dense", *modes):
        q = torch.randn(1, q_heads, length, dim)
        k, v = torch.randn(1, heads, length, dim), torch.randn(1, heads, length, dim)
        if name == "dense":
            result[name] = 2 * (length + steps) * heads * dim * k.element_size()
            continue
        cache = DGACache(mode=name)
        key, value = cache.update(k, v, 0)
        key._dga_state.attend(q, key, value, None, settings, None)
        for _ in range(steps):
            key, value = cache.update(torch.randn(1, heads, 1, dim), torch.randn(1, heads, 1, dim), 0)
            key._dga_state.attend(torch.randn(1, q_heads, 1, dim), key, value, None, settings, None)
        result[name] = cache.kv_bytes()
    for name in modes:
        result[f"{name}/dense"] = result[name] / result["dense"]
    return result


def _elapsed_ms(fn, device: torch.device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    began = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 1000 * (time.perf_counter() - began), result


@torch.no_grad()
def attention_step(lengths: list[int], settings: DGAConfig, *, device: str = "cuda", steps: int = 40,
                   q_heads: int = 32, kv_heads: int = 8, head_dim: int = 128, dtype: torch.dtype | None = None) -> list[dict]:
    """Per length and cache: ms of the attention of one decoding step (median and mean of `steps` steps
    after a warm-up step), and the speed-up over dense: the faster of SDPA with `enable_gqa` (what
    Transformers calls) and SDPA with the G query heads of a kv head as query positions. Where `settings`
    resolve to the Triton backend (CUDA), keep_full runs twice: with the Triton decode kernels and with the
    PyTorch path. Settings with expand_blocks > 0 leave compact out (it cannot expand blocks) and run the
    Triton variant with backend "auto" (the prefill kernel does not expand: the prompt runs on PyTorch, the
    steps in the decode kernels)."""
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    chosen = resolve_backend(settings.backend, device)
    variants = [("keep_full", chosen)] + ([] if settings.expand_blocks else [("compact", chosen)])
    if chosen == "triton":
        variants.append(("keep_full", "torch"))
    rows = []
    for length in lengths:
        gen = torch.Generator(device=device).manual_seed(length)
        total = length + steps + 1

        def make(heads):
            return torch.randn(1, heads, total, head_dim, generator=gen, device=device, dtype=dtype)

        q, k, v = make(q_heads), make(kv_heads), make(kv_heads)
        group = q_heads // kv_heads
        sdpa = torch.nn.functional.scaled_dot_product_attention
        dense_variants = {  # GQA as Transformers calls it, and the G query heads as query positions (one read of K/V)
            ("dense", "sdpa"): lambda t: sdpa(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], enable_gqa=True),
            ("dense", "sdpa-grouped"): lambda t: sdpa(
                q[:, :, t].view(1, kv_heads, group, head_dim), k[:, :, : t + 1], v[:, :, : t + 1]),
        }
        times = {}
        for name, step in dense_variants.items():
            times[name] = [_elapsed_ms(lambda: step(t), device)[0] for t in range(length, total)]
        for mode, backend in variants:
            config = settings.replace(backend="auto" if backend == "triton" and settings.expand_blocks else backend)
            cache = DGACache(mode=mode)
            key, value = cache.update(k[:, :, :length], v[:, :, :length], 0)
            key._dga_state.attend(q[:, :, :length], key, value, None, config, None)
            times[(mode, backend)] = []
            for t in range(length, total):
                key, value = cache.update(k[:, :, t : t + 1], v[:, :, t : t + 1], 0)
                ms, _ = _elapsed_ms(lambda: key._dga_state.attend(q[:, :, t : t + 1], key, value, None, config, None), device)
                times[(mode, backend)].append(ms)
            del cache
        dense = min(statistics.median(times[name][1:]) for name in dense_variants)  # the faster dense
        for (name, backend), values in times.items():
            timed = values[1:]  # the first step warms up (allocations, kernel selection)
            median = statistics.median(timed)
            rows.append({"length": length, "cache": name, "backend": backend, "median_ms": median,
                         "mean_ms": statistics.mean(timed), "speedup_vs_dense": dense / median})
    return rows


def attention_step_markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Attention of one decoding step: dense vs DGACache", "",
        ", ".join(f"{k} {v}" for k, v in meta.items()), "",
        "| length | cache | backend | median ms | mean ms | speed-up over dense (median) |", "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['length']} | {row['cache']} | {row['backend']} | {row['median_ms']:.3f} | {row['mean_ms']:.3f} | "
                     f"{row['speedup_vs_dense']:.2f}× |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    # allow_abbrev=False: a whole-model run's --length must not pass for --lengths
    parser = argparse.ArgumentParser(description="Time the attention of one decoding step alone (random tensors, no model).",
                                     allow_abbrev=False)
    parser.add_argument("--attention-step", action="store_true",
                        help="time the attention of one decoding step alone (the only run of this module)")
    parser.add_argument("--preset", default=None, help="DGA preset name (default: the shipped default)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--shape", default="32,8,128",
                        help="query heads, kv heads, head dim (default: Llama-3-8B; SmolLM2: 9,3,64)")
    parser.add_argument("--lengths", default="16384,32768,65536,131072", help="context lengths")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="folder for decode_step.json and decode_step.md")
    args, unknown = parser.parse_known_args(argv)
    if unknown or not args.attention_step:
        parser.error(
            f"python -m dga_hf.bench.decoding runs only --attention-step (got {unknown or 'no --attention-step'}); "
            "the whole-model decoding runs (speed, --memory-only, --quality) are python -m dga_eval.decoding"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    from ..environment import package_versions

    settings = resolve_config(args.preset)
    lengths = [int(n) for n in args.lengths.split(",")]
    meta = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            **package_versions(("torch", "triton", "dga-hf")), "preset": args.preset or "default"}
    q_heads, kv_heads, head_dim = (int(x) for x in args.shape.split(","))
    meta["shape"] = args.shape
    rows = attention_step(lengths, settings, device=args.device, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim)
    markdown = attention_step_markdown(rows, meta)
    print(markdown)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "decode_step.json").write_text(json.dumps({"meta": meta, "settings": settings.to_dict(), "rows": rows}, indent=1))
        (out / "decode_step.md").write_text(markdown)


if __name__ == "__main__":
    main()
