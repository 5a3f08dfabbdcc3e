"""Timing of one benchmarked call: median over repeats after a warm-up (CUDA events on a GPU), peak
memory above what was allocated, and failures recorded instead of raised."""

from __future__ import annotations

import statistics
import time
import traceback

import torch


def time_call(fn, repeats: int, device) -> dict:
    """Median ms of `repeats` calls after one warm-up, and the peak memory above what was allocated."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    out = fn()  # warm-up (and compilation)
    del out
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            tic = time.perf_counter()
            out = fn()
            times.append((time.perf_counter() - tic) * 1e3)
        del out
    result = {"ms": statistics.median(times), "ms_all": [round(t, 4) for t in times]}
    if cuda:
        result["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return result


def measure(results: list, name: str, seq_len: int, fn, repeats: int, device, **extra) -> dict:
    """Time `fn` and append its entry (method, seq_len, ``extra``, ms or the error) to `results`."""
    entry = {"method": name, "seq_len": seq_len, **extra}
    try:
        entry.update(time_call(fn, repeats, device))
    except Exception as exc:  # noqa: BLE001 - one failure (OOM, compile error) must not end the run
        entry["error"] = error_text(exc)
        entry["traceback"] = traceback.format_exc(limit=4)[-2000:]
    finally:
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    results.append(entry)
    status = f"{entry['ms']:.3f} ms" if "ms" in entry else f"ERROR {entry['error']}"
    print(f"  L={seq_len:>6} {name:<28} {status}", flush=True)
    return entry


def error_text(exc: Exception) -> str:
    """The first line of an exception, short enough for a table cell."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
