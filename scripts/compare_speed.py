"""Before/after speed of two checkouts on the CPU, in one run (e.g. around a refactoring).

    python scripts/compare_speed.py --before /path/old/.venv/bin/python --after .venv/bin/python \
        --lengths 8192,16384 --rounds 3 --out runs/compare

Each interpreter must import its own checkout's `dga_hf` (an editable install in its own venv). The two run
alternately, one process per measurement, `--rounds` times, so load on the machine hits both alike; the
minimum over rounds is reported. Measured, with the shipped preset at SmolLM2-135M's attention shape
(9 query heads, 3 kv heads, head dim 64), float32, `--threads` threads:
- prefill: `dga_hf.dga_attention` over L tokens (min of 2 calls);
- chunk: a 1,024-token chunked-prefill step after an L-token prefill through a `DGACache` (keep_full);
- step: median ms of a one-token decoding step (`dga_hf.bench.decoding.attention_step`, keep_full and compact).
Writes OUT/compare_speed.json and prints a Markdown table with after/before ratios (< 1: faster after).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

MEASURE = r"""
import json, sys, time, torch
import dga_hf
from dga_hf.bench.decoding import attention_step
length, threads = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(threads)
config = dga_hf.DGAConfig.preset("default").replace(backend="torch")
gen = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, h, length + 1024, 64, generator=gen) for h in (9, 3, 3))
result = {}
with torch.no_grad():
    times = []
    for _ in range(2):
        began = time.perf_counter()
        dga_hf.dga_attention(q[:, :, :length], k[:, :, :length], v[:, :, :length], config)
        times.append(1000 * (time.perf_counter() - began))
    result["prefill"] = min(times)
    cache = dga_hf.DGACache(mode="keep_full")
    key, value = cache.update(k[:, :, :length], v[:, :, :length], 0)
    key._dga_state.attend(q[:, :, :length], key, value, None, config, None)
    key, value = cache.update(k[:, :, length:], v[:, :, length:], 0)
    began = time.perf_counter()
    key._dga_state.attend(q[:, :, length:], key, value, None, config, None)
    result["chunk"] = 1000 * (time.perf_counter() - began)
for row in attention_step([length], config, device="cpu", steps=20, q_heads=9, kv_heads=3, head_dim=64):
    if row["cache"] != "dense":
        result[f"step {row['cache']}"] = row["median_ms"]
print(json.dumps(result))
"""


def measure(python: str, length: int, threads: int) -> dict[str, float]:
    done = subprocess.run([python, "-c", MEASURE, str(length), str(threads)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="python of the checkout before the change")
    parser.add_argument("--after", default=sys.executable, help="python of the checkout after the change")
    parser.add_argument("--lengths", default="8192,16384")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    runs: dict[str, dict[int, list[dict]]] = {"before": {n: [] for n in lengths}, "after": {n: [] for n in lengths}}
    for round_index in range(args.rounds):
        for length in lengths:
            order = ("before", "after") if round_index % 2 == 0 else ("after", "before")
            for side in order:
                runs[side][length].append(measure(getattr(args, side), length, args.threads))
                print(f"round {round_index + 1} L={length} {side}: {runs[side][length][-1]}", file=sys.stderr)
    lines = ["| L | measure | before ms | after ms | after / before |", "|---|---|---|---|---|"]
    best = {side: {n: {} for n in lengths} for side in runs}
    for length in lengths:
        for name in runs["before"][length][0]:
            for side in runs:
                best[side][length][name] = min(r[name] for r in runs[side][length])
            before, after = best["before"][length][name], best["after"][length][name]
            lines.append(f"| {length} | {name} | {before:.1f} | {after:.1f} | {after / before:.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare_speed.json").write_text(json.dumps({"args": vars(args), "runs": runs, "best": best}, indent=1))
        (out / "compare_speed.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
