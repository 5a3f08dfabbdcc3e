"""Dense vs DGA on one model: every task on identical samples for every configuration of the run.

Samples of a (task, length) are built once, from a random generator seeded by (seed, task, length) alone,
and then scored under each configuration in turn (dense first; the model is patched and unpatched in
place, so one copy of the weights serves all). Launched as several processes (`accelerate launch
--multi_gpu --num_processes N $(which dga-eval) ...`, docs/evaluation.md), each process builds the same
samples, scores its share of them and gets everyone's results back, in sample order: the results are those
of one process. Results:

    results["tasks"][task] = {"spec", "lengths", "metrics": {name: {label, unit, higher_is_better, compare}},
                              "results": {config: {length: {"metrics": {...}, "details": [...], "seconds",
                                                            "samples_per_process": [...]} or {"error": "..."}}}}
"""

from __future__ import annotations

import contextlib
import random
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import dga_hf
from dga_hf.distributed import all_gather, shard, unshard

from . import copying, passkey, perplexity, ruler, speed
from .corpus import corpus_tokens
from .runconfig import Setting, task_lengths

SAMPLE_TASKS = {"passkey": passkey, "copy": copying, "perplexity": perplexity, "speed": speed}
RULER_METRIC = {"label": "RULER score", "unit": "share", "higher_is_better": True, "compare": "diff"}


def apply_config(model, setting: Setting) -> None:
    """Dense attention, or DGA with its decoding cache (dense decoding unless the setting asks for a DGACache)."""
    if setting.dga is None:
        if dga_hf.is_patched(model):
            dga_hf.unpatch(model)
        dga_hf.disable_decoding(model)
        return
    dga_hf.patch(model, setting.dga)
    if setting.decoding is None:
        dga_hf.disable_decoding(model)
    else:
        dga_hf.enable_decoding(model, setting.decoding)


def task_rng(seed: int, task: str, length: int) -> random.Random:
    # a string seed is hashed with SHA-512 by `random`: stable across processes, unlike hash()
    return random.Random(f"{seed}/{task}/{length}")


@dataclass(frozen=True)
class Processes:
    """This process's place among the processes evaluating one run (`accelerate launch`, `torchrun`): each
    scores every `count`-th sample of a (task, length) from its `rank` on, RULER's lengths likewise, and
    every process ends with all results (`dga_hf.distributed.all_gather`); one process by default."""

    rank: int = 0
    count: int = 1

    def share(self, items: list) -> list:
        return shard(items, self.rank, self.count)

    def gather(self, value: Any) -> list:
        """Every process's `value`, in rank order (no collective call with one process)."""
        return all_gather(value) if self.count > 1 else [value]


def run_tasks(model, tokenizer, spec: dict, configs: dict[str, Any], workdir: Path, on_task_done=None,
              processes: Processes = Processes()) -> dict[str, dict]:
    """Every task of `spec`; `on_task_done(results)` after each, so a long run leaves a report as it goes.
    With several `processes` every one of them calls this and gets the same results."""
    seed = int(spec.get("seed", 0))
    torch.manual_seed(seed)
    corpus = corpus_tokens(tokenizer)
    results = {}
    for task, task_spec in spec["tasks"].items():
        lengths = task_lengths(spec, task)
        if task == "ruler":
            results[task] = run_ruler_task(model, tokenizer, configs, task_spec, lengths, seed, workdir, processes)
        else:
            results[task] = run_sample_task(model, tokenizer, corpus, configs, task, task_spec, lengths, seed, processes)
        if on_task_done is not None:
            on_task_done(results)
    apply_config(model, Setting())
    return results


def run_sample_task(model, tokenizer, corpus, configs, task: str, task_spec: dict, lengths: list[int], seed: int,
                    processes: Processes = Processes()) -> dict:
    """Each process scores its share of every (configuration, length)'s samples; the shares are gathered,
    put back in sample order and summarised, so the results do not depend on the number of processes."""
    module = SAMPLE_TASKS[task]
    samples = {length: module.make_samples(tokenizer, corpus, length, task_spec, task_rng(seed, task, length)) for length in lengths}
    shares: dict[str, dict[str, dict]] = {name: {} for name in configs}
    total = len(configs) * sum(len(processes.share(s)) * task_spec.get("repeats", 1) for s in samples.values())
    with tqdm(total=total, desc=task, unit="sample", disable=processes.rank != 0) as progress:
        for name, config in configs.items():
            apply_config(model, config)
            for length in lengths:
                progress.set_postfix(config=name, length=length)
                shares[name][str(length)] = run_share(module, model, tokenizer, processes.share(samples[length]), task_spec, progress)
    everyone = processes.gather(shares)
    table = {name: {length: merge_shares(module, task_spec, [share[name][length] for share in everyone])
                    for length in shares[name]} for name in configs}
    return {"spec": task_spec, "lengths": lengths, "metrics": module.METRICS, "results": table}


def run_share(module, model, tokenizer, samples, task_spec: dict, progress) -> dict:
    """One process's samples of a (configuration, length): the details of each sample (a list per sample:
    speed has one per repeat). An exception is recorded, not raised, so that one failing setting (e.g. out
    of memory at the longest length) leaves the rest of the report intact."""
    began = time.perf_counter()
    try:
        details = [module.run(model, tokenizer, [sample], task_spec, progress)[1] for sample in samples]
    except Exception:  # noqa: BLE001 - recorded in results.json and shown in the report
        return {"error": traceback.format_exc(limit=4)}
    return {"details": details, "seconds": time.perf_counter() - began}


def merge_shares(module, task_spec: dict, shares: list[dict]) -> dict:
    """A (configuration, length)'s cell from every process's share, in rank order: the first error, else the
    details in sample order, the task's metrics of them and how many samples each process scored; seconds:
    the slowest process's."""
    errors = [share["error"] for share in shares if "error" in share]
    if errors:
        return {"error": errors[0]}
    details = [item for sample in unshard([share["details"] for share in shares]) for item in sample]
    try:
        metrics = module.summarize(details, task_spec)
    except Exception:  # noqa: BLE001 - e.g. no samples at all
        return {"error": traceback.format_exc(limit=4)}
    return {"metrics": metrics, "details": details, "seconds": round(max(share["seconds"] for share in shares), 2),
            "samples_per_process": [len(share["details"]) for share in shares]}


def run_ruler_task(model, tokenizer, configs, task_spec: dict, lengths: list[int], seed: int, workdir: Path,
                   processes: Processes = Processes()) -> dict:
    """Each process runs RULER at its share of the lengths (lm-eval's own sample split needs a model it
    loads itself); the tables are gathered."""
    mine = processes.share(lengths)
    total = len(configs) * len(mine) * len(task_spec["tasks"])
    try:
        # lm-eval reads the tokenizer from a folder: one per process, so that none reads another's half-written
        with _process_folder(workdir, processes) as folder, tqdm(total=total, desc="ruler", unit="task", disable=processes.rank != 0) as progress:
            table = ruler.run_ruler(model, tokenizer, configs, apply_config, task_spec, mine, seed, folder, progress)
    except Exception:  # noqa: BLE001 - e.g. lm-eval not installed: every cell says why
        error = traceback.format_exc(limit=4)
        table = {name: {str(length): {"error": error} for length in mine} for name in configs}
    metrics = {name: {**RULER_METRIC, "label": f"RULER {name}"} for name in task_spec["tasks"]}
    return {"spec": task_spec, "lengths": lengths, "metrics": metrics, "results": merge_ruler_tables(processes.gather(table), lengths)}


def merge_ruler_tables(tables: list[dict], lengths: list[int]) -> dict[str, dict[str, dict]]:
    """RULER's results[config][length] from every process's table, in rank order (process r ran the lengths
    `Processes(r, len(tables)).share(lengths)`)."""
    return {name: dict(zip(map(str, lengths), unshard([list(table[name].values()) for table in tables])))
            for name in tables[0]}


@contextlib.contextmanager
def _process_folder(workdir: Path, processes: Processes):
    """`workdir` for the first process, a temporary folder for each other one."""
    if processes.rank == 0:
        yield workdir
        return
    with tempfile.TemporaryDirectory(prefix=f"dga-eval-rank{processes.rank}-") as folder:
        yield Path(folder)
