"""The DGA attention operator alone on the CPU against causal SDPA, in one run (issue 14's speed target).

    python -m dga_eval.operator_bench [--lengths 8K,16K,32K] [--shapes smollm2-135m,qwen2.5-0.5b]
                                      [--inputs random|model] [--config NAME_OR_JSON ...] [--repeats 3]
                                      [--threads 2] [--layer K] [--out runs/operator_cpu]

For each attention shape, length and DGA configuration (the presets ``default`` and ``expand``, and every
``--config``: a preset name or a JSON file shaped like configs/*.json or a dict of `DGAConfig` fields):

* ``DGA ms``: `dga_hf.dga_attention(q, k, v, config, backend="torch")`, the whole operator (stages 1-6 of
  docs/spec.md: selection, aggregates, expansion choice and attention), float32, no gradient;
* ``layout ms``: stages 1-4 and the expansion choice alone (`build_layout`), a part of the DGA time;
* ``SDPA ms``: `torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)`;
* ``speed-up`` = SDPA ms / DGA ms (wall clock; also from the process CPU times, which on a shared machine move
  less); ``keys read``: the share of dense attention's (query, key) pairs the DGA call
  reads (`dga_hf.ops.stats.counting_keys`, exact for these inputs); ``ideal`` = 1 / keys read; ``share of
  ideal`` = speed-up / ideal (issue 14 asks for >= 0.6).

Timing: one warm-up call of each method, then ``--repeats`` rounds that each time every method once
(interleaved, so load on a shared machine hits all of them alike); the median per method is reported.

Inputs (the report says which): ``random`` (standard normal q, k, v, `dga_hf.bench.attention_workload.random_qkv`)
or ``model``: q, k and v (after RoPE) of one layer (``--layer``, default the middle one) of each shape's embedded
model (`dga_eval.models`: SmolLM2-135M for its shape, Qwen2.5-Coder-0.5B, whose attention has Qwen2.5-0.5B's
shape, for the other) on the first L tokens of the pydoc corpus. They are captured once at the longest length by
one forward that stops inside that layer (`capture_qkv`) and cached in ``<out>/inputs/``; shorter lengths take
a prefix (the model is causal, so the first L positions of a longer capture are those of an L-token forward).
Selection on random inputs is unlike real text: expansion's union of chosen blocks, hence its cost, differs.

Results: ``<out>/operator_cpu.json`` and ``<out>/operator_cpu.md``. Correctness is the tests' (the PyTorch
backend against the naive reference, tests/test_ops.py), not this benchmark's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
import traceback
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import dga_hf
from dga_hf import DGAConfig
from dga_hf.bench.attention_workload import random_qkv
from dga_hf.bench.timing import error_text
from dga_hf.config import preset_names, resolve_config
from dga_hf.ops.layout import build_layout
from dga_hf.ops.stats import counting_keys

# name -> attention shape, and the embedded model whose layer gives real inputs of that shape
SHAPES = {
    "smollm2-135m": {"q_heads": 9, "kv_heads": 3, "head_dim": 64, "model": "smollm2-135m"},
    "qwen2.5-0.5b": {"q_heads": 14, "kv_heads": 2, "head_dim": 64, "model": "qwen2.5-coder-0.5b"},
}
INPUTS = ("random", "model")
DEFAULT_CONFIGS = ("default", "expand")
DEFAULT_LENGTHS = (8192, 16384, 32768)
CORPUS = "pydoc"
REPORT_NAME = "operator_cpu"


# ------------------------------------------------------------------------------------------------ inputs
class _Captured(Exception):
    """Raised by the capturing attention function: the forward has what it came for and stops."""


@contextlib.contextmanager
def _attention_captured(implementation: str, layer: int, into: dict):
    """Inside the block, the attention function ``implementation`` of every model stores the query, key and
    value its layer ``layer`` receives (after RoPE, key/value with the kv heads only) in ``into`` and stops the
    forward; other layers run unchanged. Transformers' models look their attention function up per call in
    ``ALL_ATTENTION_FUNCTIONS``; its instance-local entry is set here and removed afterwards."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if implementation in ALL_ATTENTION_FUNCTIONS._local_mapping:
        raise RuntimeError(f"the attention function {implementation!r} is already overridden locally; not capturing")
    original = ALL_ATTENTION_FUNCTIONS[implementation]

    def capture(module, query, key, value, *args, **kwargs):
        if getattr(module, "layer_idx", None) == layer:
            into.update(query=query.detach().clone(), key=key.detach().clone(), value=value.detach().clone())
            raise _Captured
        return original(module, query, key, value, *args, **kwargs)

    ALL_ATTENTION_FUNCTIONS[implementation] = capture
    try:
        yield
    finally:
        del ALL_ATTENTION_FUNCTIONS[implementation]


def capture_qkv(model, ids: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [1, Hq, L, d], k and v [1, Hkv, L, d] as layer ``layer``'s attention receives them for ``ids`` [1, L]
    (after RoPE), from one forward that stops inside that layer (the layers after it never run)."""
    layers = model.config.num_hidden_layers
    if not 0 <= layer < layers:
        raise ValueError(f"layer={layer} is out of range: the model has layers 0..{layers - 1}")
    captured: dict[str, torch.Tensor] = {}
    with _attention_captured(model.config._attn_implementation, layer, captured), torch.no_grad():
        try:
            model(ids, use_cache=False)
        except _Captured:
            pass
    if not captured:
        raise RuntimeError(f"layer {layer}'s attention was not called through {model.config._attn_implementation!r}")
    return captured["query"], captured["key"], captured["value"]


def model_qkv(shape: str, length: int, layer: int | None, cache_dir: Path) -> tuple[tuple[torch.Tensor, ...], dict]:
    """Real inputs of ``length`` tokens for ``shape`` (see the module docstring) and where they came from; the
    capture is cached in ``cache_dir``, a longer one serving every shorter length."""
    from transformers import AutoConfig

    from .corpus import corpus_tokens
    from .models import load_model, resolve_model_path

    spec = SHAPES[shape]
    if layer is None:
        layer = AutoConfig.from_pretrained(resolve_model_path(spec["model"])).num_hidden_layers // 2
    for path in sorted(cache_dir.glob(f"{spec['model']}-{CORPUS}-layer{layer}-*.pt")):
        saved = torch.load(path)
        if saved["length"] >= length:
            return tuple(x[:, :, :length] for x in saved["qkv"]), saved["source"]
    model, tokenizer = load_model(spec["model"])
    tokens = corpus_tokens(tokenizer, CORPUS)
    if len(tokens) < length:
        raise ValueError(f"the {CORPUS} corpus has {len(tokens)} tokens for {spec['model']}: fewer than length={length}")
    qkv = capture_qkv(model, torch.tensor(tokens[:length])[None], layer)
    got = {"q_heads": qkv[0].shape[1], "kv_heads": qkv[1].shape[1], "head_dim": qkv[0].shape[-1]}
    if got != {name: spec[name] for name in got}:
        raise RuntimeError(f"{spec['model']}'s attention has shape {got}, not the shape {shape!r} ({spec})")
    source = {"model": spec["model"], "corpus": CORPUS, "captured_tokens": length, "layer": layer,
              "layers": model.config.num_hidden_layers}
    cache_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"length": length, "qkv": qkv, "source": source}, cache_dir / f"{spec['model']}-{CORPUS}-layer{layer}-{length}.pt")
    del model
    return qkv, source


# ------------------------------------------------------------------------------------------------ timing
def time_interleaved(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, dict]:
    """Per name: the median wall-clock ms and process CPU ms over ``repeats`` rounds that each call every function
    once, after one warm-up call of each, with every round's; or the error of a function that failed (the others
    go on). With one thread the CPU time is what the call would take on an idle machine, less the cache misses
    other jobs cause: on a shared machine it moves less than the wall time."""
    results: dict[str, dict] = {}
    live = {}
    for name, call in calls.items():
        try:
            call()
            live[name] = call
            results[name] = {"ms_all": [], "cpu_ms_all": []}
        except Exception as exc:  # noqa: BLE001 - one failure (out of memory) must not end the run
            results[name] = {"error": error_text(exc), "traceback": traceback.format_exc(limit=4)[-2000:]}
    for _ in range(repeats):
        for name, call in live.items():
            began, began_cpu = time.perf_counter(), time.process_time()
            call()
            results[name]["cpu_ms_all"].append(round((time.process_time() - began_cpu) * 1e3, 3))
            results[name]["ms_all"].append(round((time.perf_counter() - began) * 1e3, 3))
    for name in live:
        results[name]["ms"] = statistics.median(results[name]["ms_all"])
        results[name]["cpu_ms"] = statistics.median(results[name]["cpu_ms_all"])
    return results


# ------------------------------------------------------------------------------------------------ run
def named_configs(extra: list[str]) -> dict[str, DGAConfig]:
    """The default presets and each ``--config`` (a preset name, or a JSON file: configs/*.json's shape, or a
    dict of DGAConfig fields), by name, on the PyTorch backend."""
    configs = {name: DGAConfig.preset(name) for name in DEFAULT_CONFIGS}
    for value in extra:
        if value in preset_names():
            configs[value] = DGAConfig.preset(value)
            continue
        path = Path(value)
        if not path.is_file():
            raise ValueError(f"--config {value!r} is neither a preset {preset_names()} nor a JSON file")
        data = json.loads(path.read_text())
        configs[path.stem] = resolve_config(data["dga"] if isinstance(data, dict) and "dga" in data else data)
    return {name: config.replace(backend="torch") for name, config in configs.items()}


def measure_cell(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, configs: dict[str, DGAConfig], repeats: int) -> list[dict]:
    """One row per config at one shape and length: DGA, its layout and SDPA timed in the same rounds, the keys
    the DGA call reads, and the derived ratios."""
    batch, q_heads, length, head_dim = q.shape
    kv_heads = k.shape[1]
    scale = head_dim**-0.5
    grouped = q.view(batch, kv_heads, q_heads // kv_heads, length, head_dim)
    lengths = torch.full((batch,), length, dtype=torch.long)
    calls = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)}
    shares = {}
    for name, config in configs.items():
        with counting_keys() as count, torch.no_grad():
            dga_hf.dga_attention(q, k, v, config, backend="torch")
        shares[name] = count.share
        calls[f"dga {name}"] = lambda config=config: dga_hf.dga_attention(q, k, v, config, backend="torch")
        bounded = config.for_length(length)
        calls[f"layout {name}"] = lambda bounded=bounded: build_layout(grouped, k, v, lengths, bounded, scale)
    with torch.no_grad():
        timed = time_interleaved(calls, repeats)
    rows = []
    for name in configs:
        row = {"config": name, "seq_len": length, "keys_read": shares[name], "ideal_speedup": 1.0 / shares[name]}
        for method in ("dga", "layout", "sdpa"):
            result = timed[f"{method} {name}" if method != "sdpa" else "sdpa"]
            for key in ("ms", "ms_all", "cpu_ms", "cpu_ms_all"):
                row[f"{method}_{key}"] = result.get(key)
            if "error" in result:
                row[f"{method}_error"] = result["error"]
        derive(row)
        rows.append(row)
    return rows


def derive(row: dict) -> None:
    """The ratios of a row, from the numbers it reports: speed-up = SDPA ms / DGA ms, share of ideal =
    speed-up / ideal (ideal = 1 / keys read); the same from the CPU times."""
    for prefix, unit in (("", "ms"), ("cpu_", "cpu_ms")):
        if row.get(f"dga_{unit}") and row.get(f"sdpa_{unit}"):
            row[f"{prefix}speedup"] = row[f"sdpa_{unit}"] / row[f"dga_{unit}"]
            row[f"{prefix}share_of_ideal"] = row[f"{prefix}speedup"] / row["ideal_speedup"]


def run(lengths: list[int], shapes: list[str], inputs: str, configs: dict[str, DGAConfig], repeats: int,
        out_dir: Path, layer: int | None = None) -> dict:
    """The whole table (see the module docstring); written to out_dir after every cell."""
    meta = {
        "torch": torch.__version__,
        "dga_hf": dga_hf.__version__,
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "inputs": inputs,
        "dtype": "float32",
        "configs": {name: config.to_dict() for name, config in configs.items()},
        "load_average_start": os.getloadavg()[0],
    }
    try:
        import transformers

        meta["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - a dependency
        pass
    report = {"meta": meta, "sources": {}, "results": []}
    for shape in shapes:
        spec = SHAPES[shape]
        if inputs == "model":
            longest, source = model_qkv(shape, max(lengths), layer, out_dir / "inputs")
            report["sources"][shape] = source
        for length in sorted(lengths):
            if inputs == "model":
                q, k, v = (x[:, :, :length].contiguous() for x in longest)
            else:
                q, k, v = random_qkv(length, "cpu", torch.float32, spec["q_heads"], spec["kv_heads"], spec["head_dim"])
            for row in measure_cell(q, k, v, configs, repeats):
                report["results"].append({"shape": shape, "inputs": inputs, **row})
                print(_markdown_row(report["results"][-1]), flush=True)
            save(out_dir, report)
    report["meta"]["load_average_end"] = os.getloadavg()[0]
    save(out_dir, report)
    return report


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# ------------------------------------------------------------------------------------------------ report
COLUMNS = ("shape", "inputs", "L", "config", "DGA ms", "layout ms", "SDPA ms", "speed-up", "keys read", "ideal",
           "share of ideal", "speed-up (CPU time)", "share of ideal (CPU time)")


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _markdown_row(row: dict) -> str:
    errors = "; ".join(f"{key}: {value}" for key, value in row.items() if key.endswith("_error"))
    cells = (row["shape"], row["inputs"], str(row["seq_len"]), row["config"], _fmt(row.get("dga_ms"), ".1f"),
             _fmt(row.get("layout_ms"), ".1f"), _fmt(row.get("sdpa_ms"), ".1f"), _fmt(row.get("speedup"), ".2f"),
             _fmt(row.get("keys_read"), ".3f"), _fmt(row.get("ideal_speedup"), ".2f"),
             _fmt(row.get("share_of_ideal"), ".2f"), _fmt(row.get("cpu_speedup"), ".2f"),
             _fmt(row.get("cpu_share_of_ideal"), ".2f"))
    return "| " + " | ".join(cells) + " |" + (f" {errors}" if errors else "")


def to_markdown(report: dict) -> str:
    meta = report["meta"]
    lines = [
        "# DGA attention operator vs causal SDPA on the CPU",
        "",
        f"{meta['cpu']}, {meta['threads']} thread{'s' if meta['threads'] != 1 else ''}; torch {meta['torch']}, transformers {meta.get('transformers')}, "
        f"Python {meta['python']}; float32, batch 1; median of {meta['repeats']} interleaved rounds after a warm-up; "
        f"load average {meta['load_average_start']:.1f} at the start"
        + (f", {meta['load_average_end']:.1f} at the end." if "load_average_end" in meta else " (PARTIAL: the run stopped early)."),
        "",
        f"Inputs: {meta['inputs']}"
        + (" (standard normal q, k, v)." if meta["inputs"] == "random" else
           ", q, k, v after RoPE of one layer on the first L tokens of the corpus (prefixes of one capture); "
           + "; ".join(f"{shape}: {src['model']} layer {src['layer']} of {src['layers']}, {src['corpus']} corpus, "
                       f"captured at {src['captured_tokens']} tokens" for shape, src in report["sources"].items()) + "."),
        "DGA ms is the whole operator (`dga_attention`, PyTorch backend); layout ms is its stages 1-4 and the "
        "expansion choice alone. Speed-up = SDPA ms / DGA ms (wall clock); ideal = 1 / keys read; share of ideal = "
        "speed-up / ideal. The last two columns are the same ratios of the process CPU times (with one thread, "
        "what an idle machine would take, less other jobs' cache misses).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" if c in ("shape", "inputs", "config") else "---:" for c in COLUMNS) + "|",
    ]
    lines += [_markdown_row(row) for row in report["results"]]
    return "\n".join(lines) + "\n"


def save(out_dir: Path, report: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{REPORT_NAME}.json").write_text(json.dumps(report, indent=2))
    (out_dir / f"{REPORT_NAME}.md").write_text(to_markdown(report))


def _parse_length(text: str) -> int:
    text = text.strip().upper()
    return int(text[:-1]) * 1024 if text.endswith("K") else int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dga_eval.operator_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)), help="comma-separated (8K allowed)")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {list(SHAPES)}")
    parser.add_argument("--inputs", default="random", choices=INPUTS)
    parser.add_argument("--config", action="append", default=[], help="another configuration (repeatable)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--layer", type=int, default=None, help="layer captured with --inputs model (default: the middle)")
    parser.add_argument("--out", type=Path, default=Path("runs/operator_cpu"))
    args = parser.parse_args(argv)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"--shapes {unknown} unknown: the shapes are {list(SHAPES)}")
    lengths = [_parse_length(x) for x in args.lengths.split(",") if x.strip()]
    if not lengths or min(lengths) < 1:
        parser.error(f"--lengths {args.lengths!r}: give positive lengths")
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: at least 1")
    if args.layer is not None and args.inputs != "model":
        parser.error("--layer only applies to --inputs model")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        configs = named_configs(args.config)
    except ValueError as exc:
        parser.error(str(exc))
    run(lengths, shapes, args.inputs, configs, args.repeats, args.out, args.layer)
    print((args.out / f"{REPORT_NAME}.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
