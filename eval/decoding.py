"""Decoding speed, KV memory and quality on a real model: dense decoding (DynamicCache) vs DGACache keep_full / compact.

    python -m dga_eval.decoding --length 8192 --new-tokens 16 --threads 1
    python -m dga_eval.decoding --memory-only --length 32768
    python -m dga_eval.decoding --quality --length 4096      # passkey + copy through decoding steps

For each cache the model (patched with the given preset; the prefill is DGA except for "sdpa") prefills a
corpus prompt of `length` tokens and then generates `new_tokens` greedy tokens one step at a time, the caches'
steps interleaved (step i of every cache, then step i + 1: a change in the machine's speed during the run
hits every cache alike; "sdpa" and "static" unpatch the model and run on their own first). Reported:
inter-token latency (mean and median of the decoding steps, prefill excluded; wall clock and this process's
CPU time, the latter being robust to other jobs sharing the CPU), the bytes each cache holds after the last
step, and whether the greedy tokens equal those of dense decoding.

`--memory-only` builds one layer's cache on random tensors with the model's head shapes (no model run) and
reports the bytes per layer for dense, keep_full and compact: the ratio is the same for every layer.

The attention of one decoding step alone, without a model, is the library's operator benchmark:
`python -m dga_hf.bench.decoding --attention-step`.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

import dga_hf
from dga_hf import DecodingConfig, DGAConfig
from dga_hf.bench.decoding import decode, named_cache, static_cache, synthetic_memory
from dga_hf.config import resolve_config
from dga_hf.decoding import dense_cache

from . import copying, passkey
from .corpus import corpus_tokens
from .models import load_model, resolve_model_path


def quality(model, tokenizer, length: int, caches: list[str], seed: int = 0, depths=(0.1, 0.3, 0.5, 0.7, 0.9),
            copies: int = 3, passage_tokens: int = 64, options: DecodingConfig | None = None) -> dict:
    """Passkey exact match (the harness's samples and scoring, 8 greedy tokens) and teacher-forced copy
    token accuracy through decoding steps, per cache (DGA caches with `options`, mode from the name)."""
    corpus = corpus_tokens(tokenizer)
    rng = random.Random(seed)
    keys = [passkey.make_sample(tokenizer, corpus, length - 8, depth, rng) for depth in depths]
    texts = [copying.make_sample(tokenizer, corpus, length, passage_tokens, 32, rng) for _ in range(copies)]
    result = {name: {"passkey": [], "copy": []} for name in caches}
    for sample in keys:
        for name in caches:
            tokens = decode(model, sample.prompt, 8, {name: named_cache(model, name, options)})[name]["tokens"]
            answer = tokenizer.decode(tokens, skip_special_tokens=True)
            result[name]["passkey"].append({"depth": sample.depth, "key": sample.key, "answer": answer,
                                            "match": passkey.exact_match(answer, sample.key)})
        print("passkey", sample.depth, {n: result[n]["passkey"][-1]["answer"] for n in caches}, flush=True)
    for sample in texts:
        for name in caches:
            result[name]["copy"].append(copying.second_copy_accuracy_by_decoding(model, sample, named_cache(model, name, options)))
        print("copy", {n: round(result[n]["copy"][-1], 3) for n in caches}, flush=True)
    summary = {
        name: {"passkey_accuracy": sum(d["match"] for d in r["passkey"]) / len(r["passkey"]),
               "copy_accuracy": sum(r["copy"]) / len(r["copy"])}
        for name, r in result.items()
    }
    return {"summary": summary, "details": result}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dga_eval.decoding", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="path or Hub name (default: the embedded SmolLM2-135M)")
    parser.add_argument("--preset", default=None, help="DGA preset name (default: the shipped default)")
    parser.add_argument("--dga", default="{}",
                        help='DGAConfig fields overriding the preset as JSON, e.g. \'{"local_blocks": 8, "expand_blocks": 16}\' '
                             "(block expansion is a DGA setting: prefill and decoding both follow it)")
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
                        help='DecodingConfig fields of the DGA caches as JSON, e.g. \'{"refresh_every": 18, "dense_share": null}\' '
                             "(their mode comes from --caches; default: the DecodingConfig defaults)")
    parser.add_argument("--out", default=None, help="folder for decoding_<length>.json (the speed run)")
    args = parser.parse_args(argv)
    options = DecodingConfig.from_value(json.loads(args.decoding))  # a bad field fails before the model loads
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = DGAConfig.from_dict({**resolve_config(args.preset).to_dict(), **json.loads(args.dga)})
    if args.memory_only:
        from transformers import AutoConfig

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
    caches = {name: named_cache(model, name, options) for name in names if name not in unpatched}
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
