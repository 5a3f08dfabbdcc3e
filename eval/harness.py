"""Dense vs DGA on one model: every task on identical samples for every configuration of the run, cell by cell.

A cell is one (task, length, configuration); each finished cell goes to the run's `CellStore` at once
(eval/cells.py), and a resumed run (`dga-eval --resume`) reuses the stored cells whose fingerprint matches and
runs only the others. Samples of a (task, length) are built from a random generator seeded by (seed, task,
length) alone and scored under each configuration in turn (dense first; the model is patched and unpatched in
place, so one copy of the weights serves all): which cells ran before does not change a cell. Launched as
several processes (`accelerate launch --multi_gpu --num_processes N $(which dga-eval) ...`,
docs/evaluation.md), each process builds the same samples, scores its share of every cell's samples and gets
everyone's results back, in sample order: the results are those of one process. Results:

    results[task] = {"spec", "lengths", "metrics": {name: {label, unit, higher_is_better, compare}},
                     "results": {config: {length: {"metrics": {...}, "details": [...], "seconds",
                                                   "samples_per_process": [...]} or {"error": "..."}}},
                     "reused": {config: {length: when the reused cell was written}}}
"""

from __future__ import annotations

import contextlib
import json
import random
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generator, Iterator

import torch
from tqdm import tqdm

import dga_hf
from dga_hf.distributed import all_gather, shard, unshard

from . import copying, passkey, perplexity, ruler, speed
from .cells import CellKey, CellStore
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

    def broadcast(self, value: Any) -> Any:
        """The first process's `value`, on every process: what the first process decides, all follow."""
        return self.gather(value)[0]


def cell_order(task: str, lengths: list[int], configs: dict[str, Any]) -> list[CellKey]:
    """The cells of a task in the order they run: RULER length by length (a length's lm-eval tasks are built
    once and evaluated under every configuration), the other tasks configuration by configuration (the model
    is patched once for all lengths)."""
    if task == "ruler":
        return [CellKey(task, length, name) for length in lengths for name in configs]
    return [CellKey(task, length, name) for name in configs for length in lengths]


def run_tasks(model, tokenizer, spec: dict, configs: dict[str, Setting], workdir: Path, store: CellStore,
              on_cell_done: Callable[[dict, str], None] | None = None, processes: Processes = Processes()) -> dict[str, dict]:
    """Every cell of `spec` that `store` does not hold already (with the same fingerprint): each finished cell is
    written to `store` (by the first process) and `on_cell_done(results, task)` follows, with the results of every
    cell so far, reused or new, so a run that stops leaves a report. With several `processes` every one of them
    calls this and gets the same results; the first one decides which cells are reused."""
    seed = int(spec.get("seed", 0))
    torch.manual_seed(seed)
    lengths = {task: task_lengths(spec, task) for task in spec["tasks"]}
    fingerprints = {key: store.fingerprint(key, spec["tasks"][task], configs[key.config])
                    for task in spec["tasks"] for key in cell_order(task, lengths[task], configs)}
    reused = processes.broadcast(store.reusable(fingerprints) if processes.rank == 0 else None)
    cells = {key: entry["cell"] for key, entry in reused.items()}

    def results() -> dict[str, dict]:
        return {task: task_results(task, spec["tasks"][task], lengths[task], configs, cells, reused) for task in spec["tasks"]}

    corpus = corpus_tokens(tokenizer)
    with tqdm(total=len(fingerprints), initial=len(reused), desc="dga-eval", unit="cell", disable=processes.rank != 0) as progress:
        for task, task_spec in spec["tasks"].items():
            pending = [key for key in fingerprints if key.task == task and key not in cells]
            if task == "ruler":
                new_cells = ruler_cells(model, tokenizer, configs, task_spec, pending, seed, workdir, processes, progress)
            else:
                new_cells = sample_cells(model, tokenizer, corpus, configs, task, task_spec, pending, seed, processes, progress)
            for key, cell in new_cells:
                cells[key] = json.loads(json.dumps(cell, default=str))  # as the store holds it, on every process
                if processes.rank == 0:
                    store.save(key, fingerprints[key], cells[key])
                progress.update(1)
                if on_cell_done is not None:
                    on_cell_done(results(), task)
    apply_config(model, Setting())
    return results()


def task_results(task: str, task_spec: dict, lengths: list[int], configs: dict[str, Setting], cells: dict[CellKey, dict],
                 reused: dict[CellKey, dict]) -> dict:
    """A task's part of the results (the module docstring) from the cells there are so far."""
    if task == "ruler":
        metrics = {name: {**RULER_METRIC, "label": f"RULER {name}"} for name in task_spec["tasks"]}
    else:
        metrics = SAMPLE_TASKS[task].METRICS

    def table(source: dict[CellKey, Any]) -> dict[str, dict[str, Any]]:
        return {name: {str(length): source[CellKey(task, length, name)] for length in lengths if CellKey(task, length, name) in source}
                for name in configs}

    written = {key: entry["written"] for key, entry in reused.items()}
    return {"spec": task_spec, "lengths": lengths, "metrics": metrics, "results": table(cells), "reused": table(written)}


def gathered_cells(own: Generator[tuple[CellKey, Any], None, None], rounds: int, merge: Callable[[list], dict],
                   processes: Processes) -> Iterator[tuple[CellKey, dict]]:
    """Every process's cells, round by round: in each round each process hands in its next (key, part), None
    once it has none left, and gets everyone's, so all make the same collective calls; a cell's parts (in rank
    order) merge into the cell. `own` is closed at the end (its `with` blocks exit), even when it has no part
    left to hand in."""
    with contextlib.closing(own):
        for _ in range(rounds):
            parts: dict[CellKey, list] = {}
            for item in processes.gather(next(own, None)):
                if item is not None:
                    parts.setdefault(item[0], []).append(item[1])
            for key, values in parts.items():
                yield key, merge(values)


def sample_cells(model, tokenizer, corpus, configs, task: str, task_spec: dict, pending: list[CellKey], seed: int,
                 processes: Processes, progress) -> Iterator[tuple[CellKey, dict]]:
    """The `pending` cells of a sample task: each process scores its share of a cell's samples; the shares are
    gathered, put back in sample order and summarised, so a cell does not depend on the number of processes."""
    module = SAMPLE_TASKS[task]
    samples = {length: module.make_samples(tokenizer, corpus, length, task_spec, task_rng(seed, task, length))
               for length in dict.fromkeys(key.length for key in pending)}

    def own() -> Generator[tuple[CellKey, dict], None, None]:
        applied = None
        for key in pending:
            if key.config != applied:
                apply_config(model, configs[key.config])
                applied = key.config
            progress.set_postfix_str(str(key))
            yield key, run_share(module, model, tokenizer, processes.share(samples[key.length]), task_spec)

    return gathered_cells(own(), len(pending), lambda shares: merge_shares(module, task_spec, shares), processes)


def run_share(module, model, tokenizer, samples, task_spec: dict) -> dict:
    """One process's samples of a (configuration, length): the details of each sample (a list per sample:
    speed has one per repeat). An exception is recorded, not raised, so that one failing setting (e.g. out
    of memory at the longest length) leaves the rest of the report intact."""
    began = time.perf_counter()
    try:
        details = [module.run(model, tokenizer, [sample], task_spec)[1] for sample in samples]
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


def ruler_share(pending: list[CellKey], processes: Processes) -> list[CellKey]:
    """The `pending` RULER cells a process runs: those of its share of their lengths (lm-eval's own sample split
    needs a model it loads itself)."""
    lengths = processes.share(list(dict.fromkeys(key.length for key in pending)))
    return [key for key in pending if key.length in lengths]


def ruler_cells(model, tokenizer, configs, task_spec: dict, pending: list[CellKey], seed: int, workdir: Path,
                processes: Processes, progress) -> Iterator[tuple[CellKey, dict]]:
    """The `pending` RULER cells: each process runs those of its share of the lengths, and all get every cell."""
    mine = ruler_share(pending, processes)
    rounds = max(len(ruler_share(pending, Processes(rank, processes.count))) for rank in range(processes.count))

    def own() -> Generator[tuple[CellKey, dict], None, None]:
        done = 0
        try:
            # lm-eval reads the tokenizer from a folder: one per process, so that none reads another's half-written
            with _process_folder(workdir, processes) as folder:
                for (length, name), cell in ruler.run_ruler(model, tokenizer, configs, apply_config, task_spec,
                                                            [(key.length, key.config) for key in mine], seed, folder, progress):
                    yield CellKey("ruler", length, name), cell
                    done += 1
        except Exception:  # noqa: BLE001 - e.g. lm-eval not installed: every cell left says why
            error = traceback.format_exc(limit=4)
            for key in mine[done:]:
                yield key, {"error": error}

    return gathered_cells(own(), rounds, lambda parts: parts[0], processes)


@contextlib.contextmanager
def _process_folder(workdir: Path, processes: Processes):
    """`workdir` for the first process, a temporary folder for each other one."""
    if processes.rank == 0:
        yield workdir
        return
    with tempfile.TemporaryDirectory(prefix=f"dga-eval-rank{processes.rank}-") as folder:
        yield Path(folder)
