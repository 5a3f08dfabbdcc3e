"""Peak memory of a block of work, above what was in use when it began.

CUDA: `torch.cuda.max_memory_allocated` (tensors only, exact). CPU: the process's resident set size
(RSS), sampled by a background thread with psutil, peak minus the value at the start; this counts
everything the process touches (allocator caches too), so it is an estimate, comparable between
configurations of one run rather than an exact tensor count. Without psutil it falls back to
`resource.getrusage` (max RSS ever, so it reads 0 unless the block sets a new process-wide peak).
The method used is recorded with every number.
"""

from __future__ import annotations

import ctypes
import gc
import importlib.util
import resource
import threading
import time

import torch

CUDA_METHOD = "torch.cuda.max_memory_allocated minus allocated at start"
PSUTIL_METHOD = "process RSS sampled every 2 ms (psutil), peak minus RSS at start"
RUSAGE_METHOD = "resource.getrusage max RSS growth (0 unless a new process peak)"


def release_free_memory() -> None:
    """Give freed heap pages back to the OS, so the next RSS baseline does not depend on what ran before."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the baseline is only less tidy
        pass


class PeakMemory:
    """`with PeakMemory(device) as peak: ...` then `peak.megabytes` and `peak.method`."""

    def __init__(self, device: torch.device, interval: float = 0.002):
        self.device = torch.device(device)
        self.interval = interval
        self.megabytes: float | None = None
        self.method = self._choose_method()

    def _choose_method(self) -> str:
        if self.device.type == "cuda":
            return CUDA_METHOD
        if importlib.util.find_spec("psutil") is None:
            return RUSAGE_METHOD
        return PSUTIL_METHOD

    def __enter__(self) -> "PeakMemory":
        if self.method == CUDA_METHOD:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        elif self.method == PSUTIL_METHOD:
            release_free_memory()
            import psutil

            self._process = psutil.Process()
            self._start = self._peak = self._process.memory_info().rss
            self._done = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        else:
            self._start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def _sample(self) -> None:
        while not self._done.is_set():
            self._peak = max(self._peak, self._process.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        if self.method == CUDA_METHOD:
            torch.cuda.synchronize(self.device)
            used = torch.cuda.max_memory_allocated(self.device) - self._start
        elif self.method == PSUTIL_METHOD:
            self._done.set()
            self._thread.join()
            self._peak = max(self._peak, self._process.memory_info().rss)
            used = self._peak - self._start
        else:
            used = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self._start
        self.megabytes = max(0, used) / 2**20
