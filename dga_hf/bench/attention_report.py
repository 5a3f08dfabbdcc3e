"""The attention benchmark's report (`dga_hf.bench.attention`): derived columns (speed-up, TFLOP/s),
``attention.json`` and ``attention.md`` with a prefill section and a training section."""

from __future__ import annotations

import json
from pathlib import Path

# forward + backward flops per visible (query, key) pair, in units of the forward's 4 * d: the backward
# does 5 matmuls to the forward's 2, i.e. 2.5x (the FlashAttention papers' count)
TRAIN_FLOP_FACTOR = 3.5

CORRECTNESS_NOTE = (
    "Correctness is checked by the tests, not by this benchmark: scripts/gpu_check.sh runs "
    "tests/test_triton_backend.py and tests/test_triton_backward.py (compiled kernels; Triton against the "
    "PyTorch backend, this shape and presets among the cases) before it."
)


def derive(results: list[dict], flops_per_pair: float, dense_method: str = "sdpa_flash") -> None:
    """Add TFLOP/s from the pair counts, and the speed-up over ``dense_method`` at the same length."""
    dense = {r["seq_len"]: r["ms"] for r in results if r["method"] == dense_method and "ms" in r}
    for r in results:
        if "ms" not in r:
            continue
        seconds = r["ms"] / 1e3
        if r.get("useful_pairs"):
            r["useful_tflops"] = r["useful_pairs"] * flops_per_pair / seconds / 1e12
        if r.get("executed_pairs"):
            r["executed_tflops"] = r["executed_pairs"] * flops_per_pair / seconds / 1e12
        if r["seq_len"] in dense and not r["method"].startswith("layout_"):
            r["speedup_vs_sdpa"] = dense[r["seq_len"]] / r["ms"]
            if r.get("ideal_speedup"):
                r["share_of_ideal"] = r["speedup_vs_sdpa"] / r["ideal_speedup"]


def save(out_dir: Path, report: dict) -> str:
    """Write attention.json and attention.md to out_dir; returns the Markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "attention.json").write_text(json.dumps(report, indent=2, default=str))
    markdown = to_markdown(report)
    (out_dir / "attention.md").write_text(markdown)
    return markdown


def load(out_dir: Path) -> dict:
    """The report already in out_dir (a prefill run's), or {} when there is none or it is unreadable."""
    try:
        report = json.loads((out_dir / "attention.json").read_text())
    except (OSError, ValueError):
        return {}
    return report if isinstance(report, dict) else {}


def _fmt(value, spec) -> str:
    return "" if value is None else format(value, spec)


def to_markdown(report: dict) -> str:
    """The prefill section (when the report has one) and the training section (when it has one)."""
    lines = _prefill_markdown(report) if "results" in report else ["# DGA attention benchmark", ""]
    if "training" in report:
        lines += _training_markdown(report["training"])
    return "\n".join(lines) + "\n"


def _prefill_markdown(report: dict) -> list[str]:
    meta = report["meta"]
    lines = [
        f"# DGA attention benchmark ({meta['device']})",
        "",
        f"Shape {meta['shape']}; torch {meta['torch']}, triton {meta.get('triton')}; median of {meta['repeats']} "
        f"calls after a warm-up; fp32 kernel dots: {meta['fp32_dot_precision']}."
        + ("" if meta.get("complete", True) else " PARTIAL (the run stopped early)."),
        "",
        CORRECTNESS_NOTE,
        "",
        "| L | method | ms | speed-up vs SDPA | ideal | share of ideal | useful TFLOP/s | executed TFLOP/s | peak MiB | note |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["results"]:
        note = r.get("error", "") or r.get("variant", "")
        lines.append(
            f"| {r['seq_len']} | {r['method']} | {_fmt(r.get('ms'), '.3f')} | {_fmt(r.get('speedup_vs_sdpa'), '.2f')} | "
            f"{_fmt(r.get('ideal_speedup'), '.2f')} | {_fmt(r.get('share_of_ideal'), '.2f')} | "
            f"{_fmt(r.get('useful_tflops'), '.1f')} | {_fmt(r.get('executed_tflops'), '.1f')} | "
            f"{_fmt(r.get('peak_mib'), '.0f')} | {note.replace('|', '/')} |"
        )
    return lines


def _training_markdown(training: dict) -> list[str]:
    meta = training["meta"]
    lines = [
        "",
        "## Training (forward + backward)",
        "",
        f"One training step of the attention alone (forward, then backward of a random dO; gradients of q, k, v) "
        f"on {meta['device']}, shape {meta['shape']}; torch {meta['torch']}, triton {meta.get('triton')}; median of "
        f"{meta['repeats']} steps after a warm-up. Useful TFLOP/s count {TRAIN_FLOP_FACTOR} x 4 x d flops per "
        f"visible (query, key) pair (backward = 2.5 x forward, as FlashAttention counts)."
        + ("" if meta.get("complete", True) else " PARTIAL (the run stopped early)."),
        "",
        CORRECTNESS_NOTE,
        "",
        "| L | method | ms | speed-up vs SDPA | ideal | useful TFLOP/s | peak MiB | note |",
        "|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in training["results"]:
        note = r.get("error", "") or r.get("variant", "")
        lines.append(
            f"| {r['seq_len']} | {r['method']} | {_fmt(r.get('ms'), '.3f')} | {_fmt(r.get('speedup_vs_sdpa'), '.2f')} | "
            f"{_fmt(r.get('ideal_speedup'), '.2f')} | {_fmt(r.get('useful_tflops'), '.1f')} | "
            f"{_fmt(r.get('peak_mib'), '.0f')} | {note.replace('|', '/')} |"
        )
    return lines
