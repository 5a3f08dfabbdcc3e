"""Decoding speed and KV memory: dense decoding (DynamicCache) vs DGACache keep_full / compact.

    python -m dga_hf.bench.decoding --length 8192 --new-tokens 16 --threads 1
    python -m dga_hf.bench.decoding --memory-only --length 32768
    python -m dga_hf.bench.decoding --quality --length 4096      # passkey + copy through decoding steps

For each cache the model (patched with the given preset; the prefill is DGA except for "sdpa") prefills a
corpus prompt of `length` tokens and then generates `new_tokens` greedy tokens one step at a time, the caches'
steps interleaved (step i of every cache, then step i + 1: a change in the machine's speed during the run
hits every cache alike; "sdpa" and "static" unpatch the model and run on their own first). Reported:
inter-token latency (mean and median of the decoding steps, prefill excluded; wall clock and this process's
CPU time, the latter being robust to other jobs sharing the CPU), the bytes each cache holds after the last
step, and whether the greedy tokens equal those of dense decoding.

`--memory-only` builds one layer's cache on random tensors with the model's head shapes (no model run) and
reports the bytes per layer for dense, keep_full and compact: the ratio is the same for every layer.

`--attention-step` times the attention part of one decoding step alone, without a model, at the Llama-3-8B
attention shape (32 query heads, 8 kv heads, head dim 128; bf16 on a GPU, float32 on the CPU): dense
(SDPA of one query over the whole cache) against one DGACache layer in keep_full and compact mode after a
DGA prefill of the same random keys (refresh steps included, so the median and the mean are both given):

    python -m dga_hf.bench.decoding --attention-step --lengths 16384,32768,65536,131072 --out runs/bench
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


def _make_cache(model, name: str, options: DecodingConfig | None = None):
    """A DynamicCache for "dense", else a DGACache in that mode (the other fields from `options`)."""
    return dense_cache(model) if name == "dense" else DGACache(model, options, mode=name)


def quality(model, tokenizer, length: int, caches: list[str], seed: int = 0, depths=(0.1, 0.3, 0.5, 0.7, 0.9),
            copies: int = 3, passage_tokens: int = 64, options: DecodingConfig | None = None) -> dict:
    """Passkey exact match (the harness's samples and scoring, 8 greedy tokens) and teacher-forced copy
    token accuracy through decoding steps, per cache (DGA caches with `options`, mode from the name)."""
    import random

    from dga_eval import copying, passkey
    from dga_eval.corpus import corpus_tokens

    corpus = corpus_tokens(tokenizer)
    rng = random.Random(seed)
    keys = [passkey.make_sample(tokenizer, corpus, length - 8, depth, rng) for depth in depths]
    texts = [copying.make_sample(tokenizer, corpus, length, passage_tokens, 32, rng) for _ in range(copies)]
    result = {name: {"passkey": [], "copy": []} for name in caches}
    for sample in keys:
        for name in caches:
            tokens = decode(model, sample.prompt, 8, {name: _make_cache(model, name, options)})[name]["tokens"]
            answer = tokenizer.decode(tokens, skip_special_tokens=True)
            result[name]["passkey"].append({"depth": sample.depth, "key": sample.key, "answer": answer,
                                            "match": passkey.exact_match(answer, sample.key)})
        print("passkey", sample.depth, {n: result[n]["passkey"][-1]["answer"] for n in caches}, flush=True)
    for sample in texts:
        for name in caches:
            result[name]["copy"].append(copying.second_copy_accuracy_by_decoding(model, sample, _make_cache(model, name, options)))
        print("copy", {n: round(result[n]["copy"][-1], 3) for n in caches}, flush=True)
    summary = {
        name: {"passkey_accuracy": sum(d["match"] for d in r["passkey"]) / len(r["passkey"]),
               "copy_accuracy": sum(r["copy"]) / len(r["copy"])}
        for name, r in result.items()
    }
    return {"summary": summary, "details": result}


def synthetic_memory(model_config, length: int, settings: DGAConfig, steps: int = 0) -> dict:
    """Bytes of one layer's cache after a `length`-token prefill (+ `steps` decoded tokens) on random
    tensors with the model's shapes."""
    heads = model_config.num_key_value_heads
    q_heads = model_config.num_attention_heads
    dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // q_heads
    torch.manual_seed(0)
    result = {}
    for name in ("dense", "keep_full", "compact"):
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
    result["keep_full/dense"] = result["keep_full"] / result["dense"]
    result["compact/dense"] = result["compact"] / result["dense"]
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
    PyTorch path."""
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    chosen = resolve_backend(settings.backend, device)
    variants = [("keep_full", chosen), ("compact", chosen)]
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
            config = settings.replace(backend=backend)
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="path or Hub name (default: the embedded SmolLM2-135M)")
    parser.add_argument("--preset", default=None, help="DGA preset name or JSON file (default: the shipped default)")
    parser.add_argument("--length", type=int, default=8192, help="prompt length")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--caches", default="dense,keep_full,compact",
                        help="dense: patched model, DGA prefill, DynamicCache (dense decoding); sdpa: the unpatched model; "
                             "static: the unpatched model with a preallocated StaticCache")
    parser.add_argument("--memory-only", action="store_true")
    parser.add_argument("--quality", action="store_true", help="passkey and copy-by-decoding instead of speed")
    parser.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9", help="passkey depths (--quality)")
    parser.add_argument("--copies", type=int, default=3, help="copy samples (--quality)")
    parser.add_argument("--memory-steps", type=int, default=64, help="decoded tokens in the synthetic memory run")
    parser.add_argument("--decoding", default="{}",
                        help='DecodingConfig fields of the DGA caches as JSON, e.g. \'{"refresh_every": 18, "expand_blocks": 32}\' '
                             "(their mode comes from --caches; default: the DecodingConfig defaults)")
    parser.add_argument("--attention-step", action="store_true",
                        help="time the attention of one decoding step alone (random tensors, no model)")
    parser.add_argument("--shape", default="32,8,128",
                        help="query heads, kv heads, head dim of --attention-step (default: Llama-3-8B; SmolLM2: 9,3,64)")
    parser.add_argument("--lengths", default="16384,32768,65536,131072", help="context lengths (--attention-step)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="(--attention-step)")
    parser.add_argument("--out", default=None,
                        help="folder for the results: decode_step.json / decode_step.md (--attention-step), else "
                             "decoding_<length>.json")
    args = parser.parse_args(argv)
    options = DecodingConfig.from_value(json.loads(args.decoding))  # a bad field fails before the model loads
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.attention_step:
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
        return
    import dga_hf
    from dga_eval.corpus import corpus_tokens
    from dga_eval.models import load_model

    settings = resolve_config(args.preset)
    if args.memory_only:
        from transformers import AutoConfig
        from dga_eval.models import resolve_model_path

        config = AutoConfig.from_pretrained(resolve_model_path(args.model))
        print(json.dumps({"length": args.length, "settings": settings.to_dict(),
                          "bytes_per_layer": synthetic_memory(config, args.length, settings, args.memory_steps)}, indent=1))
        return
    model, tokenizer = load_model(args.model)
    dga_hf.patch(model, settings)
    if args.quality:
        depths = tuple(float(x) for x in args.depths.split(","))
        report = quality(model, tokenizer, args.length, args.caches.split(","), depths=depths, copies=args.copies,
                         options=options)
        print(json.dumps({"length": args.length, "settings": settings.to_dict(), "decoding": options.to_dict(),
                          **report}, indent=1))
        return
    corpus = corpus_tokens(tokenizer)
    prompt = (corpus * (1 + args.length // len(corpus)))[: args.length]
    names = args.caches.split(",")
    results = {}
    unpatched = {  # the unpatched model (dense prefill, its own attention): runs of their own
        "sdpa": lambda: dense_cache(model),
        # preallocated: dense decoding without the DynamicCache's per-step concatenation of the whole cache
        "static": lambda: static_cache(model, args.length + args.new_tokens),
    }
    if any(name in unpatched for name in names):
        dga_hf.unpatch(model)
        for name in names:
            if name in unpatched:
                results[name] = decode(model, prompt, args.new_tokens, {name: unpatched[name]()})[name]
        dga_hf.patch(model, settings)
    caches = {name: _make_cache(model, name, options) for name in names if name not in unpatched}
    results.update(decode(model, prompt, args.new_tokens, caches))
    del caches
    for name in names:
        print(name, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in results[name].items() if k != "tokens"}, flush=True)
    if "dense" in results:
        for name, result in results.items():
            result["same_tokens_as_dense"] = sum(a == b for a, b in zip(result["tokens"], results["dense"]["tokens"]))
            for key in ("itl_ms", "itl_median_ms", "itl_cpu_ms", "itl_cpu_median_ms", "kv_bytes"):
                result[f"{key}_vs_dense"] = result[key] / results["dense"][key]
    report = json.dumps({"length": args.length, "new_tokens": args.new_tokens, "settings": settings.to_dict(),
                         "decoding": options.to_dict(), "threads": torch.get_num_threads(), "results": results}, indent=1)
    print(report)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"decoding_{args.length}.json").write_text(report)


if __name__ == "__main__":
    main()
