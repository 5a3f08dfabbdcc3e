"""results.json, report.md (one table per task metric: dense, each DGA configuration and its difference or
ratio to dense, per length) and PNG plots (each metric against length, every configuration on one figure)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

from .cells import write_atomically
from .runconfig import DENSE

PLOTS = {  # file -> (task, metrics on it): one figure per quantity the issue asks for
    "passkey_accuracy.png": ("passkey", ["accuracy"]),
    "copy_accuracy.png": ("copy", ["accuracy"]),
    "perplexity.png": ("perplexity", ["perplexity"]),
    "latency.png": ("speed", ["ttft_ms", "itl_ms"]),
    "memory.png": ("speed", ["kv_cache_mb", "peak_memory_mb"]),
    "ruler.png": ("ruler", None),  # None: every RULER task of the run
}


def write_report(results: dict, out: Path, plotted_tasks: list[str] | None = None) -> list[Path]:
    """results.json and report.md (each replaced whole: a run killed while writing leaves the previous one), and
    the plots of `plotted_tasks` (None: of every task)."""
    write_atomically(out / "results.json", json.dumps(results, indent=2, default=str))
    write_atomically(out / "report.md", markdown_report(results))
    return [out / "results.json", out / "report.md", *write_plots(results, out, plotted_tasks)]


# ---------------------------------------------------------------- values


def cell_value(cell: dict | None, metric: str) -> tuple[float | None, str | None]:
    """(value, error) of one metric in one (configuration, length) cell of a task."""
    if cell is None:
        return None, "not run"
    if "error" in cell:
        return None, cell["error"]
    if metric in cell.get("errors", {}):
        return None, cell["errors"][metric]
    value = cell.get("metrics", {}).get(metric)
    return value, None if value is not None else "no value"


def series(task: dict, config: str, metric: str) -> list[float | None]:
    return [cell_value(task["results"].get(config, {}).get(str(n)), metric)[0] for n in task["lengths"]]


def compare(value: float | None, dense: float | None, how: str) -> float | None:
    if value is None or dense is None:
        return None
    if how == "ratio":
        return value / dense if dense else None
    return value - dense


# ---------------------------------------------------------------- markdown


def markdown_report(results: dict) -> str:
    settings = results["settings"]
    lines = [
        f"# Dense vs DGA: {settings['model']}",
        "",
        f"{settings['date']} · device `{settings['device']}` · dtype `{settings['dtype']}` · seed {settings['seed']} · "
        f"wall time {settings.get('wall_seconds', '?')} s",
        "",
        f"`{settings['command']}`",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in settings["versions"].items()),
        *reuse_note(results),
        "",
        *configs_table(results),
    ]
    for task_name, task in results["tasks"].items():
        lines += ["", f"## {task_name}", "", task_description(task_name, task), ""]
        for metric, meta in task["metrics"].items():
            lines += metric_table(task, metric, meta, list(results["configs"]))
        lines += error_notes(task, list(results["configs"]))
    return "\n".join(lines) + "\n"


def reuse_note(results: dict) -> list[str]:
    """How many cells a resumed run (`--resume`) took from earlier sessions, and when those were computed."""
    written = sorted(when for task in results["tasks"].values() for cells in task.get("reused", {}).values()
                     for when in cells.values())
    if not written:
        return []
    total = sum(len(cells) for task in results["tasks"].values() for cells in task["results"].values())
    return ["", f"Resumed (`--resume`): {len(written)} of these {total} cells were computed by earlier sessions, from "
                f"{written[0]} to {written[-1]} (`tasks.<task>.reused` in results.json); timings are each session's own."]


def configs_table(results: dict) -> list[str]:
    lengths = results["settings"]["lengths"]
    lines = [
        "## Configurations", "",
        "Keys a query reads, as a share of dense attention's: measured over the perplexity windows' forwards where the "
        "run has them, else the spec's cost formula (marked ≈).", "",
    ]
    lines.append("| configuration | settings | " + " | ".join(f"keys {n}" for n in lengths) + " |")
    lines.append("|---|---|" + "---|" * len(lengths))
    for name, entry in results["configs"].items():
        if entry is None:
            lines.append(f"| {name} | dense attention | " + " | ".join("100%" for _ in lengths) + " |")
            continue
        settings = ", ".join(f"{k}={_setting_text(v)}" for k, v in entry["settings"].items())
        lines.append(f"| {name} | {settings} | " + " | ".join(_keys_cell(results, name, n) for n in lengths) + " |")
    return lines


def _keys_cell(results: dict, config: str, length: int) -> str:
    """The measured share of keys read at `length` (perplexity task), else the cost formula's, marked ≈."""
    cell = results["tasks"].get("perplexity", {}).get("results", {}).get(config, {}).get(str(length)) or {}
    measured = (cell.get("metrics") or {}).get("keys_read")
    return f"{measured:.1%}" if measured is not None else f"≈{results['configs'][config]['keys_share'][str(length)]:.1%}"


def _setting_text(value: Any) -> str:
    """A setting for a table cell: a dict of decoding fields as "mode(field=value, ...)", its "auto" fields left out."""
    if not isinstance(value, dict):
        return str(value)
    fields = ", ".join(f"{k}={v}" for k, v in value.items() if k != "mode" and v != "auto")
    return f"{value.get('mode')}({fields})" if fields else str(value.get("mode"))


def task_description(name: str, task: dict) -> str:
    spec = ", ".join(f"{k}={v}" for k, v in task["spec"].items() if k != "lengths")
    text = f"Settings: {spec}." if spec else ""
    methods = sorted(measurement_methods(task))
    return text + (f" Peak memory: {'; '.join(methods)}." if methods else "")


def measurement_methods(task: dict) -> set[str]:
    """How the speed task measured memory (CUDA allocator or process RSS), from its per-sample details."""
    return {
        detail["memory_method"]
        for cells in task["results"].values()
        for cell in cells.values()
        for detail in (cell.get("details") or [])
        if isinstance(detail, dict) and "memory_method" in detail
    }


def metric_table(task: dict, metric: str, meta: dict, configs: list[str]) -> list[str]:
    dga = [c for c in configs if c != DENSE]
    sign = "÷" if meta["compare"] == "ratio" else "−"
    unit = f" ({meta['unit']})" if meta["unit"] and meta["unit"] != "share" else ""
    direction = "higher is better" if meta["higher_is_better"] else "lower is better"
    header = ["length", DENSE] + [col for c in dga for col in (c, f"{c} {sign} dense")]
    lines = [f"**{meta['label']}**{unit}, {direction}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for length in task["lengths"]:
        dense_value, dense_error = cell_value(task["results"].get(DENSE, {}).get(str(length)), metric)
        row = [str(length), fmt(dense_value, meta, dense_error)]
        for config in dga:
            value, error = cell_value(task["results"].get(config, {}).get(str(length)), metric)
            row += [fmt(value, meta, error), fmt_compare(compare(value, dense_value, meta["compare"]), meta)]
        lines.append("| " + " | ".join(row) + " |")
    return lines + [""]


def fmt(value: float | None, meta: dict, error: str | None = None) -> str:
    if value is None:
        return "error" if error and error not in ("no value", "not run") else "—"
    if meta["unit"] == "share":
        return f"{value:.1%}"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def fmt_compare(value: float | None, meta: dict) -> str:
    if value is None:
        return "—"
    if meta["compare"] == "ratio":
        return f"{value:.2f}×"
    if meta["unit"] == "share":
        return f"{value * 100:+.1f} pp"
    return f"{value:+.3g}"


def error_notes(task: dict, configs: list[str]) -> list[str]:
    notes = []
    for config in configs:
        for length in task["lengths"]:
            cell = task["results"].get(config, {}).get(str(length)) or {}
            errors = {"all": cell["error"]} if "error" in cell else cell.get("errors", {})
            for metric, error in errors.items():
                last = error.strip().splitlines()[-1] if error.strip() else error
                notes.append(f"- {config}, {length}, {metric}: `{last}`")
    return ["Errors (full tracebacks in results.json):", "", *notes, ""] if notes else []


# ---------------------------------------------------------------- plots


def write_plots(results: dict, out: Path, tasks: list[str] | None = None) -> list[Path]:
    """The plots of `tasks` (None: of every task of the results)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    written = []
    for filename, (task_name, metrics) in PLOTS.items():
        task = results["tasks"].get(task_name)
        if task is None or (tasks is not None and task_name not in tasks):
            continue
        names = metrics or list(task["metrics"])
        path = out / filename
        plot_metrics(task, names, list(results["configs"]), path, results["settings"]["model"])
        written.append(path)
    return written


def plot_metrics(task: dict, metrics: list[str], configs: list[str], path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    columns = min(3, len(metrics))
    rows = math.ceil(len(metrics) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.8 * rows), squeeze=False)
    for axis, metric in zip(axes.flat, metrics):
        meta = task["metrics"][metric]
        for config in configs:
            values = series(task, config, metric)
            points = [(n, v) for n, v in zip(task["lengths"], values) if v is not None]
            if points:
                scale = 100 if meta["unit"] == "share" else 1
                dense = config == DENSE  # drawn larger and dashed: equal values must not hide it
                axis.plot([n for n, _ in points], [v * scale for _, v in points], marker="o",
                          markersize=9 if dense else 5, linestyle="--" if dense else "-", label=config)
        if meta["unit"] == "share":
            axis.set_ylim(-3, 103)
        axis.set_xscale("log", base=2)
        axis.set_xticks(task["lengths"], [str(n) for n in task["lengths"]])
        axis.set_xlabel("context length (tokens)")
        axis.set_ylabel(ylabel(meta))
        axis.set_title(meta["label"])
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    for axis in list(axes.flat)[len(metrics):]:
        axis.set_visible(False)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=110)
    plt.close(figure)
    write_atomically(path, image.getvalue())  # a run killed while plotting keeps the last whole plot


def ylabel(meta: dict[str, Any]) -> str:
    if meta["unit"] == "share":
        return "%"
    return meta["unit"] or meta["label"].split(" (")[0]
