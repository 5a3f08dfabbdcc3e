"""Dense vs DGA on one model: every task on identical samples for every configuration of the run.

Samples of a (task, length) are built once, from a random generator seeded by (seed, task, length) alone,
and then scored under each configuration in turn (dense first; the model is patched and unpatched in
place, so one copy of the weights serves all). Results:

    results["tasks"][task] = {"spec", "lengths", "metrics": {name: {label, unit, higher_is_better, compare}},
                              "results": {config: {length: {"metrics": {...}, "details": [...], "seconds"}
                                                           or {"error": "..."}}}}
"""

from __future__ import annotations

import random
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import dga_hf

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


def run_tasks(model, tokenizer, spec: dict, configs: dict[str, Any], workdir: Path, on_task_done=None) -> dict[str, dict]:
    """Every task of `spec`; `on_task_done(results)` after each, so a long run leaves a report as it goes."""
    seed = int(spec.get("seed", 0))
    torch.manual_seed(seed)
    corpus = corpus_tokens(tokenizer)
    results = {}
    for task, task_spec in spec["tasks"].items():
        lengths = task_lengths(spec, task)
        if task == "ruler":
            results[task] = run_ruler_task(model, tokenizer, configs, task_spec, lengths, seed, workdir)
        else:
            results[task] = run_sample_task(model, tokenizer, corpus, configs, task, task_spec, lengths, seed)
        if on_task_done is not None:
            on_task_done(results)
    apply_config(model, Setting())
    return results


def run_sample_task(model, tokenizer, corpus, configs, task: str, task_spec: dict, lengths: list[int], seed: int) -> dict:
    module = SAMPLE_TASKS[task]
    samples = {length: module.make_samples(tokenizer, corpus, length, task_spec, task_rng(seed, task, length)) for length in lengths}
    table: dict[str, dict[str, dict]] = {name: {} for name in configs}
    total = len(configs) * sum(len(s) * task_spec.get("repeats", 1) for s in samples.values())
    with tqdm(total=total, desc=task, unit="sample") as progress:
        for name, config in configs.items():
            apply_config(model, config)
            for length in lengths:
                progress.set_postfix(config=name, length=length)
                table[name][str(length)] = run_cell(module, model, tokenizer, samples[length], task_spec, progress)
    return {"spec": task_spec, "lengths": lengths, "metrics": module.METRICS, "results": table}


def run_cell(module, model, tokenizer, samples, task_spec: dict, progress) -> dict:
    """One (configuration, length) of a task; an exception is recorded, not raised, so that one failing
    setting (e.g. out of memory at the longest length) leaves the rest of the report intact."""
    began = time.perf_counter()
    try:
        metrics, details = module.run(model, tokenizer, samples, task_spec, progress)
    except Exception:  # noqa: BLE001 - recorded in results.json and shown in the report
        return {"error": traceback.format_exc(limit=4)}
    return {"metrics": metrics, "details": details, "seconds": round(time.perf_counter() - began, 2)}


def run_ruler_task(model, tokenizer, configs, task_spec: dict, lengths: list[int], seed: int, workdir: Path) -> dict:
    total = len(configs) * len(lengths) * len(task_spec["tasks"])
    try:
        with tqdm(total=total, desc="ruler", unit="task") as progress:
            table = ruler.run_ruler(model, tokenizer, configs, apply_config, task_spec, lengths, seed, workdir, progress)
    except Exception:  # noqa: BLE001 - e.g. lm-eval not installed: every cell says why
        error = traceback.format_exc(limit=4)
        table = {name: {str(length): {"error": error} for length in lengths} for name in configs}
    metrics = {name: {**RULER_METRIC, "label": f"RULER {name}"} for name in task_spec["tasks"]}
    return {"spec": task_spec, "lengths": lengths, "metrics": metrics, "results": table}
