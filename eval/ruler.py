"""RULER tasks of lm-evaluation-harness, run offline on the model already in memory (patched or not).

RULER builds its samples itself and sizes them with a tokenizer it loads by name: lm-eval passes the
task manager's `metadata` to the task's dataset function, which reads `tokenizer` (else `pretrained`,
else `model`) and `max_seq_lengths` (lm_eval/tasks/ruler/common_utils.py). So the tokenizer is saved to
a folder and that folder's path goes in the metadata; one length per task manager, so `limit` takes the
first samples of that length (RULER orders a multi-length dataset by length).

Samples are built once per (task, length) and the same Task object is evaluated for every
configuration, so dense and DGA answer identical prompts; a (length, configuration) with all its tasks is one
cell of the run (eval/cells.py), handed back as soon as it is done. The synthetic tasks need no download
(niah_single_1, niah_multikey_2/3: "repeat" and "needle" haystacks; vt, cwe, fwe); others (the essay
haystack, qa_*) would download a dataset: offline that raises, and the error is recorded for that task
instead of a score.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


@contextlib.contextmanager
def offline():
    """Hugging Face Hub and datasets offline for the block. The libraries read these variables once, at
    import, so the flags of modules already imported are set as well, and everything is restored after."""
    saved_env = {name: os.environ.get(name) for name in OFFLINE_VARIABLES}
    flags = [
        (module, flag)
        for module, flag in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
                             ("datasets.config", "HF_DATASETS_OFFLINE"))
        if module in sys.modules and hasattr(sys.modules[module], flag)
    ]
    saved_flags = [(module, flag, getattr(sys.modules[module], flag)) for module, flag in flags]
    os.environ.update({name: "1" for name in OFFLINE_VARIABLES})
    for module, flag in flags:
        setattr(sys.modules[module], flag, True)
    try:
        yield
    finally:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for module, flag, value in saved_flags:
            setattr(sys.modules[module], flag, value)


def run_ruler(
    model,
    tokenizer,
    configs: dict[str, Any],
    apply_config: Callable[[Any, Any], None],
    spec: dict,
    cells: list[tuple[int, str]],
    seed: int,
    workdir: Path,
    progress=None,
) -> Iterator[tuple[tuple[int, str], dict]]:
    """Each (length, configuration) of `cells` in turn, as soon as it is done: ((length, name), {"metrics": {task:
    score}, "details": {...}, "errors": {task: message}}). A length's tasks are built once for the consecutive
    cells of that length."""
    tokenizer_dir = workdir / "ruler-tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    with offline():
        for length, of_length in itertools.groupby(cells, key=lambda cell: cell[0]):
            tasks, load_errors = load_tasks(spec["tasks"], length, tokenizer_dir)
            for _, name in of_length:
                if progress is not None:
                    progress.set_postfix_str(f"ruler/{length}/{name}")
                apply_config(model, configs[name])
                cell = {"metrics": {}, "details": {}, "errors": dict(load_errors)}
                for task_name, task in tasks.items():
                    began = time.perf_counter()
                    try:
                        cell["metrics"][task_name], cell["details"][task_name] = evaluate_task(
                            model, tokenizer, task, task_name, length, spec, seed
                        )
                        cell["details"][task_name]["seconds"] = round(time.perf_counter() - began, 2)
                    except Exception:  # noqa: BLE001 - one broken task must not hide the others' scores
                        cell["errors"][task_name] = traceback.format_exc(limit=3)
                yield (length, name), cell


def load_tasks(names: list[str], length: int, tokenizer_dir: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Each task built on its own, so a task that cannot be built offline fails alone, with its error."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(metadata={"max_seq_lengths": [length], "tokenizer": str(tokenizer_dir)})
    tasks, errors = {}, {}
    for name in names:
        try:
            tasks[name] = manager.load([name])["tasks"][name]
        except Exception:  # noqa: BLE001 - recorded per task, shown in the report
            errors[name] = traceback.format_exc(limit=3)
    return tasks, errors


def evaluate_task(model, tokenizer, task, task_name: str, length: int, spec: dict, seed: int) -> tuple[float, dict]:
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
    output = lm_eval.simple_evaluate(
        model=lm,
        tasks=[task],
        limit=spec.get("limit"),
        gen_kwargs=spec.get("gen_kwargs"),
        bootstrap_iters=0,
        log_samples=True,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    scores = output["results"][task_name]
    key = f"{length},none"
    # common_utils.process_results reports the sample's own length; -1 means no sample of that length
    if key not in scores or scores[key] == -1:
        raise RuntimeError(f"{task_name} returned no score for length {length}: {sorted(scores)}")
    samples = output.get("samples", {}).get(task_name, [])
    details = {
        "attention": model.config._attn_implementation,  # provenance: "dga" when patched
        "samples": len(samples),
        "answers": [
            {"target": s["target"], "answer": str(s["filtered_resps"][0])[:200], "score": s.get(str(length))}
            for s in samples
        ],
    }
    return float(scores[key]), details
