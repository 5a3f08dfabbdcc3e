"""Eager vs torch.compile of a patched model's prefill on the CPU (issue 16, item 16).

    nice .venv/bin/python scripts/compile_bench.py --lengths 2048,4096 --threads 2 --out runs/compile_bench

For each length, the same model (default: the embedded SmolLM2-135M, float32) runs one prefill of L random
token ids (no cache, no gradient, logits of the last token only, as generate's prefill) with
- dga: the shipped default preset with min_seq_len=0, so every layer runs DGA (`dga_hf.patch`);
- dense: the unpatched model, PyTorch's fused SDPA (the reference).
Each is timed eager and compiled with ``torch.compile(model)`` (inductor, default mode): the median of
`--repeats` calls after one warm-up call, eager and compiled calls alternating. A compiled model's first call
is its warm-up, timed apart as the compile time (Dynamo and inductor, plus that call's run); every
(attention, length) compiles afresh. Also
reported: the share of dense attention's keys DGA reads, and the largest difference of the compiled logits
from the eager ones. Prints a Markdown table; with --out writes compile_bench.json and compile_bench.md there.
On a shared, loaded machine the times are rough.
"""

from __future__ import annotations

import os

# inductor compiles its kernels in worker processes, one per core by default; one is enough here and keeps
# a shared machine usable (must be set before torch is imported)
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402

import dga_hf  # noqa: E402
from dga_hf.ops import stats  # noqa: E402


def prefill(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False, logits_to_keep=1).logits


def timed_ms(model, ids: torch.Tensor) -> float:
    began = time.perf_counter()
    prefill(model, ids)
    return 1000 * (time.perf_counter() - began)


def measure(model, ids: torch.Tensor, repeats: int) -> dict:
    """Eager and compiled times of one prefill of `model` (as it is patched now). After the warm-ups the two
    alternate, so that a change in the machine's load falls on both."""
    with stats.counting_keys() as count:
        eager_logits = prefill(model, ids)  # the eager warm-up
    torch._dynamo.reset()
    compiled = torch.compile(model)
    began = time.perf_counter()
    compiled_logits = prefill(compiled, ids)
    compile_s = time.perf_counter() - began
    eager_times, compiled_times = [], []
    for _ in range(repeats):
        eager_times.append(timed_ms(model, ids))
        compiled_times.append(timed_ms(compiled, ids))
    torch._dynamo.reset()
    eager_ms, compiled_ms = statistics.median(eager_times), statistics.median(compiled_times)
    return {
        "keys_read": count.share if count.calls else 1.0,  # dense attention records no count when unpatched
        "eager_ms": eager_ms,
        "compiled_ms": compiled_ms,
        "compiled_over_eager": compiled_ms / eager_ms,
        "compile_s": compile_s,
        "max_logit_difference": (compiled_logits - eager_logits).abs().max().item(),
        "eager_ms_all": eager_times,
        "compiled_ms_all": compiled_times,
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| attention | L | keys read | eager ms | compiled ms | compiled / eager | compile s (first call) | max abs logit diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['attention']} | {row['length']} | {row['keys_read']:.0%} | {row['eager_ms']:.0f} | "
            f"{row['compiled_ms']:.0f} | {row['compiled_over_eager']:.2f} | {row['compile_s']:.1f} | "
            f"{row['max_logit_difference']:.1e} |"
        )
    by_key = {(row["attention"], row["length"]): row for row in rows}
    for length in sorted({row["length"] for row in rows}):
        dga, dense = by_key[("dga", length)], by_key[("dense", length)]
        lines.append(
            f"\nL={length}: DGA / dense {dga['eager_ms'] / dense['eager_ms']:.2f} eager, "
            f"{dga['compiled_ms'] / dense['compiled_ms']:.2f} compiled"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="embedded model name or checkpoint path")
    parser.add_argument("--lengths", default="2048,4096")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    from dga_eval.models import load_model

    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model)
    settings = dga_hf.DGAConfig.preset("default").replace(min_seq_len=0)
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
        for attention in ("dga", "dense"):
            if attention == "dga":
                dga_hf.patch(model, settings)
            else:
                dga_hf.unpatch(model)
            rows.append({"attention": attention, "length": length, **measure(model, ids, args.repeats)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    report = table(rows)
    print(report)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        versions = {
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "threads": args.threads, "cpu": platform.processor() or platform.machine(),
        }
        (out / "compile_bench.json").write_text(json.dumps({"args": vars(args), "versions": versions, "rows": rows}, indent=1))
        (out / "compile_bench.md").write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
