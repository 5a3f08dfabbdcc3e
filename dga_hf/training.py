"""`dga-finetune`: continued pre-training of a DGA-patched (or dense) causal LM on long text.

    dga-finetune --model PATH --dga paper --train docs/ --eval heldout.txt --context-length 1024 \\
        --max-steps 200 --lr 1e-4 --warmup-steps 20 --out runs/ft
    accelerate launch --multi_gpu --num_processes 2 $(which dga-finetune) --model PATH ...   # data parallel
    accelerate launch --config_file configs/accelerate/fsdp.yaml $(which dga-finetune) ...  # FSDP (GPUs)
    accelerate launch --multi_gpu --num_processes 2 -m dga_hf.training --model PATH ...      # the same

Several processes (docs/training.md): each takes `--batch-size` windows per micro-step, so one optimizer step
reads batch size x accumulation x processes windows; without CUDA they run on the CPU over gloo. A launch that
cannot give what it asks for stops with an error: `accelerate launch --cpu --num_processes N` (one process
started), FSDP or DeepSpeed on the CPU (accelerate falls back to plain data parallelism there), mixed
precision from the launcher against `--bf16 no`, fewer windows than one optimizer step reads. Data-parallel
replicas are compared after training (a digest of every parameter), and only the first process writes.

The text (files, directories of *.txt, or a `datasets` dataset) is tokenized, documents are joined with
the EOS token between them, and the stream is cut into non-overlapping windows of the context length;
the labels are the input ids. Training runs through Transformers' `Trainer` (tqdm progress, periodic
held-out loss and perplexity). The output folder gets the model and tokenizer (`save_pretrained`; the
DGA settings are kept in config.json, so `AutoModelForCausalLM.from_pretrained(out,
attn_implementation="dga")` after `import dga_hf` restores them; a dense run saves a plain model) and
`training_log.json` (losses, held-out perplexities, wall time, settings).

Python: `dga_hf.training.finetune(FinetuneConfig(...))` or `finetune(model=..., train_files=[...], ...)`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from . import distributed
from .config import DGAConfig, preset_names
from .distributed import LaunchError
from .environment import dtype_argument, package_versions

DENSE_NAMES = ("none", "dense")
BF16_CHOICES = ("auto", True, False)
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
LOG_FILE = "training_log.json"
VERSIONED = ("torch", "transformers", "accelerate", "datasets", "dga-hf")


@dataclass(frozen=True)
class FinetuneConfig:
    """Settings of one fine-tuning run, validated on construction (an invalid value raises `ValueError`
    naming the field, the value and what is allowed).

    Attributes:
        model: a Hugging Face model directory (or Hub name, when the Hub is reachable).
        output_dir: where the model, the tokenizer and `training_log.json` are written.
        gguf_file: load `model/gguf_file` (de-quantised to float32) instead of safetensors.
        dga: a preset name (``"paper"``, ``"default"``, ...), a JSON file (a preset file with a ``"dga"``
            entry, or the `DGAConfig` fields themselves), a dict, a `DGAConfig`, or ``"none"`` (or None)
            for the dense control.
        train_files: text files and/or directories (every ``*.txt`` below them, sorted); one file is one
            document.
        train_dataset: a `datasets` dataset: a name for `load_dataset` or a folder (`save_to_disk` output
            or data files); `dataset_config`, `train_split` and `text_column` select what is read.
        eval_files, eval_dataset, eval_split: the held-out text, in the same forms (optional).
        context_length: tokens per training (and evaluation) window. ``>= 2``.
        max_steps: optimizer steps. ``>= 1``.
        learning_rate: peak learning rate (AdamW). ``> 0``.
        warmup_steps: linear warm-up steps. ``>= 0``.
        lr_scheduler: ``"cosine"``, ``"linear"``, ``"constant"`` or ``"constant_with_warmup"``.
        weight_decay: AdamW weight decay. ``>= 0``.
        max_grad_norm: gradient clipping (0 turns it off). ``>= 0``.
        batch_size: windows per device and micro-step. ``>= 1``.
        gradient_accumulation: micro-steps per optimizer step. ``>= 1``.
        gradient_checkpointing: recompute activations in the backward pass (less memory, more time).
        bf16: ``"auto"`` (bf16 mixed precision on a GPU that supports it, else what the launcher sets: float32
            unless `accelerate launch --mixed_precision`), True or False (False with a launcher's mixed
            precision is an error).
        freeze_embeddings: do not train the input embeddings (nor the output head when it is tied to them).
        eval_every: evaluate on the held-out windows every N optimizer steps; 0: only at the end. ``>= 0``.
        eval_at_start: also evaluate before the first step (with held-out text and ``eval_every > 0``).
        max_eval_windows: evaluate on at most this many held-out windows, evenly spaced; None: all.
        logging_steps: log the training loss every N steps. ``>= 1``.
        seed: seed of the model's random state and of the data order. ``>= 0``.
        threads: CPU threads for torch (None: torch's default). ``>= 1``.
    """

    model: str
    output_dir: str
    gguf_file: str | None = None
    dga: Any = "default"
    train_files: tuple[str, ...] = ()
    train_dataset: str | None = None
    eval_files: tuple[str, ...] = ()
    eval_dataset: str | None = None
    dataset_config: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    text_column: str = "text"
    context_length: int = 1024
    max_steps: int = 100
    learning_rate: float = 1e-4
    warmup_steps: int = 10
    lr_scheduler: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 1
    gradient_accumulation: int = 1
    gradient_checkpointing: bool = False
    bf16: Any = "auto"
    freeze_embeddings: bool = False
    eval_every: int = 0
    eval_at_start: bool = True
    max_eval_windows: int | None = None
    logging_steps: int = 1
    seed: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        _check_text("model", self.model)
        _check_text("output_dir", self.output_dir)
        for name in ("gguf_file", "train_dataset", "eval_dataset", "dataset_config"):
            if getattr(self, name) is not None:
                _check_text(name, getattr(self, name))
        for name in ("train_split", "eval_split", "text_column"):
            _check_text(name, getattr(self, name))
        for name in ("train_files", "eval_files"):
            object.__setattr__(self, name, _check_paths(name, getattr(self, name)))
        if not self.train_files and self.train_dataset is None:
            raise ValueError(
                "FinetuneConfig.train_files=() is invalid: give the training text as files or directories "
                "(train_files) or as a datasets dataset (train_dataset)"
            )
        _check_number("context_length", self.context_length, minimum=2, integer=True)
        _check_number("max_steps", self.max_steps, minimum=1, integer=True)
        _check_number("warmup_steps", self.warmup_steps, minimum=0, integer=True)
        _check_number("batch_size", self.batch_size, minimum=1, integer=True)
        _check_number("gradient_accumulation", self.gradient_accumulation, minimum=1, integer=True)
        _check_number("eval_every", self.eval_every, minimum=0, integer=True)
        _check_number("logging_steps", self.logging_steps, minimum=1, integer=True)
        _check_number("seed", self.seed, minimum=0, integer=True)
        if self.max_eval_windows is not None:
            _check_number("max_eval_windows", self.max_eval_windows, minimum=1, integer=True)
        if self.threads is not None:
            _check_number("threads", self.threads, minimum=1, integer=True)
        _check_number("learning_rate", self.learning_rate, minimum=0.0, strict=True)
        _check_number("weight_decay", self.weight_decay, minimum=0.0)
        _check_number("max_grad_norm", self.max_grad_norm, minimum=0.0)
        for name in ("learning_rate", "weight_decay", "max_grad_norm"):
            object.__setattr__(self, name, float(getattr(self, name)))
        for name in ("gradient_checkpointing", "freeze_embeddings", "eval_at_start"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"FinetuneConfig.{name}={getattr(self, name)!r} is invalid: allowed values are True, False")
        if self.lr_scheduler not in SCHEDULERS:
            raise ValueError(f"FinetuneConfig.lr_scheduler={self.lr_scheduler!r} is invalid: allowed values are {SCHEDULERS}")
        object.__setattr__(self, "bf16", _parse_bf16(self.bf16))
        self.dga_config()  # an unknown preset, a missing file or a bad DGA field fails here, before any work

    def dga_config(self) -> DGAConfig | None:
        """The DGA settings of the run, None for the dense control."""
        return resolve_dga(self.dga)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["train_files"], data["eval_files"] = list(self.train_files), list(self.eval_files)
        if isinstance(self.dga, DGAConfig):
            data["dga"] = self.dga.to_dict()
        return data


@dataclass
class FinetuneResult:
    """What `finetune` returns: the trained model (eval mode, on its training device), its tokenizer, the
    output folder and the training log (the content of `training_log.json`)."""

    model: Any
    tokenizer: Any
    output_dir: Path
    log: dict[str, Any] = field(default_factory=dict)


def _check_text(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"FinetuneConfig.{name}={value!r} is invalid: allowed values are non-empty strings")


def _check_paths(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, (str, os.PathLike)):
        value = [value]
    if not hasattr(value, "__iter__"):
        raise ValueError(f"FinetuneConfig.{name}={value!r} is invalid: allowed values are a list of files or directories")
    paths = tuple(str(p) for p in value)
    for path in paths:
        if not Path(path).exists():
            raise ValueError(f"FinetuneConfig.{name}: {path!r} does not exist (allowed values are existing files or directories)")
    return paths


def _check_number(name: str, value: Any, *, minimum: float, integer: bool = False, strict: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    bad = isinstance(value, bool) or not isinstance(value, kinds) or (isinstance(value, float) and not math.isfinite(value))
    if bad or (value <= minimum if strict else value < minimum):
        what = "an integer" if integer else "a number"
        raise ValueError(f"FinetuneConfig.{name}={value!r} is invalid: allowed range is {what} {'>' if strict else '>='} {minimum}")


def _parse_bf16(value: Any) -> str | bool:
    if isinstance(value, str):
        lowered = value.lower()
        if lowered == "auto":
            return "auto"
        if lowered in ("yes", "true", "1", "on"):
            return True
        if lowered in ("no", "false", "0", "off"):
            return False
    elif isinstance(value, bool):
        return value
    raise ValueError(f"FinetuneConfig.bf16={value!r} is invalid: allowed values are 'auto', True, False")


def resolve_dga(value: Any) -> DGAConfig | None:
    """A run's DGA settings from a preset name, a JSON file, a dict or a `DGAConfig`; None for dense
    (None, "none" or "dense")."""
    if value is None or (isinstance(value, str) and value.lower() in DENSE_NAMES):
        return None
    if isinstance(value, DGAConfig):
        return value
    if isinstance(value, Mapping):
        return _dga_from_mapping(value, "dict")
    if isinstance(value, (str, os.PathLike)):
        text = str(value)
        if text in preset_names():
            return DGAConfig.preset(text)
        path = Path(text)
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError as error:
                raise ValueError(f"FinetuneConfig.dga={text!r} is invalid: the file is not JSON ({error})") from None
            return _dga_from_mapping(data, f"file {text}")
    raise ValueError(
        f"FinetuneConfig.dga={value!r} is invalid: allowed values are a preset name {preset_names()}, a JSON file of "
        f"DGA settings, a dict or DGAConfig, or 'none' for dense attention"
    )


def _dga_from_mapping(data: Any, where: str) -> DGAConfig:
    if not isinstance(data, Mapping):
        raise ValueError(f"FinetuneConfig.dga: the {where} must hold a JSON object, got {type(data).__name__}")
    settings = data["dga"] if isinstance(data.get("dga"), Mapping) else data  # a preset file or bare fields
    try:
        return DGAConfig.from_dict(settings)
    except (TypeError, ValueError) as error:
        raise ValueError(f"FinetuneConfig.dga ({where}): {error}") from None


# ------------------------------------------------------------------------------------------------ data


def text_files(paths: Sequence[str]) -> list[Path]:
    """The files named, and every *.txt below the directories named (sorted, so the order is fixed)."""
    found: list[Path] = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*.txt") if p.is_file()))
        else:
            found.append(path)
    return found


def read_texts(paths: Sequence[str]) -> list[str]:
    files = text_files(paths)
    if paths and not files:
        raise ValueError(f"no *.txt files under {list(paths)}")
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def dataset_texts(name: str, config_name: str | None, split: str, column: str) -> list[str]:
    """The `column` of one split of a `datasets` dataset: a folder written by `save_to_disk`, else anything
    `load_dataset` takes (a Hub name, or a folder of data files)."""
    try:
        import datasets
    except ImportError:
        raise ImportError(
            "reading a datasets dataset needs the `datasets` package: pip install datasets "
            "(or pip install 'dga-hf[train]'); text files and folders of *.txt need nothing extra"
        ) from None
    path = Path(name)
    saved = path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists())
    if saved:
        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise ValueError(f"dataset {name!r} has no split {split!r}: its splits are {list(data)}")
            data = data[split]
    else:
        data = datasets.load_dataset(name, config_name, split=split)
    if column not in data.column_names:
        raise ValueError(f"dataset {name!r} (split {split!r}) has no column {column!r}: its columns are {data.column_names}")
    return [text for text in data[column] if isinstance(text, str) and text]


def token_stream(tokenizer, texts: Sequence[str]) -> list[int]:
    """Every document's tokens, with the EOS token between documents."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for index, text in enumerate(texts):
        if index and eos is not None:
            ids.append(eos)
        ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    return ids


def windows(ids: Sequence[int], length: int) -> torch.Tensor:
    """Non-overlapping windows [N, length] of the stream; the tail shorter than `length` is dropped."""
    count = len(ids) // length
    return torch.tensor(list(ids[: count * length]), dtype=torch.long).view(count, length)


def spaced(rows: torch.Tensor, limit: int | None) -> torch.Tensor:
    """At most `limit` rows, evenly spaced over all of them (first and last included)."""
    if limit is None or rows.shape[0] <= limit:
        return rows
    if limit == 1:
        return rows[:1]
    index = [round(i * (rows.shape[0] - 1) / (limit - 1)) for i in range(limit)]
    return rows[index]


class WindowDataset(torch.utils.data.Dataset):
    """Windows as causal-LM examples: labels = input ids (the model shifts them), no padding."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return self.rows.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.rows[index]
        return {"input_ids": row, "labels": row.clone()}


def load_windows(settings: FinetuneConfig, tokenizer, *, held_out: bool) -> tuple[torch.Tensor | None, dict[str, Any]]:
    files = settings.eval_files if held_out else settings.train_files
    dataset = settings.eval_dataset if held_out else settings.train_dataset
    if not files and dataset is None:
        return None, {}
    texts = read_texts(files) if files else []
    if dataset is not None:
        split = settings.eval_split if held_out else settings.train_split
        texts += dataset_texts(dataset, settings.dataset_config, split, settings.text_column)
    ids = token_stream(tokenizer, texts)
    rows = windows(ids, settings.context_length)
    what = "held-out" if held_out else "training"
    if rows.shape[0] == 0:
        raise ValueError(
            f"the {what} text has {len(ids)} tokens, fewer than one window of context_length={settings.context_length}"
        )
    all_rows = rows.shape[0]
    if held_out:
        rows = spaced(rows, settings.max_eval_windows)
    info = {"documents": len(texts), "tokens": len(ids), "windows": rows.shape[0], "windows_available": all_rows}
    return rows, info


# ------------------------------------------------------------------------------------------------ model


def load_model_and_tokenizer(path: str, gguf_file: str | None = None):
    """A causal LM in float32 with its tokenizer. A GGUF file is de-quantised into a plain float32 model
    (no quantization config is kept, so the fine-tuned checkpoint is an ordinary safetensors model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(path, **extra)
    model = AutoModelForCausalLM.from_pretrained(path, **extra, **dtype_argument(torch.float32))
    if gguf_file:
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, **dtype_argument(torch.float32))
        plain.load_state_dict(model.state_dict())
        model = plain
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def prepare_model(model, settings: DGAConfig | None):
    """Patch with `settings`, or make the model plainly dense (removing DGA settings a checkpoint may carry)."""
    from .integration import is_patched, patch, unpatch

    if settings is None:
        if is_patched(model) or getattr(model.config, "dga", None) is not None:
            unpatch(model)
        return model
    return patch(model, settings)


def use_bf16(setting: str | bool) -> bool:
    if setting == "auto":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return bool(setting)


# ------------------------------------------------------------------------------------------------ training


def _trainer_class():
    from transformers import Trainer

    class DGATrainer(Trainer):
        """Adds the held-out perplexity next to every held-out loss it logs."""

        def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
            if "eval_loss" in logs:
                logs["eval_perplexity"] = math.exp(min(float(logs["eval_loss"]), 700.0))
            super().log(logs, *args, **kwargs)

    return DGATrainer


def training_arguments(settings: FinetuneConfig, bf16: bool, has_eval: bool):
    from transformers import TrainingArguments

    evaluate = has_eval and settings.eval_every > 0
    # transformers 5.x renamed gradient_checkpointing* to activation_checkpointing* (old names deprecated)
    prefix = "activation" if any(f.name == "activation_checkpointing" for f in dataclasses.fields(TrainingArguments)) else "gradient"
    checkpointing = {
        f"{prefix}_checkpointing": settings.gradient_checkpointing,
        f"{prefix}_checkpointing_kwargs": {"use_reentrant": False} if settings.gradient_checkpointing else None,
    }
    return TrainingArguments(
        **checkpointing,
        output_dir=settings.output_dir,
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation,
        learning_rate=settings.learning_rate,
        warmup_steps=settings.warmup_steps,
        lr_scheduler_type=settings.lr_scheduler,
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        bf16=bf16,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=settings.eval_every if evaluate else None,
        eval_on_start=bool(evaluate and settings.eval_at_start),
        prediction_loss_only=True,
        logging_strategy="steps",
        logging_steps=settings.logging_steps,
        save_strategy="no",
        report_to="none",
        seed=settings.seed,
        data_seed=settings.seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=False,
    )


def finetune(settings: FinetuneConfig | None = None, /, *, command: str | None = None, **fields: Any) -> FinetuneResult:
    """Fine-tune (continued pre-training) and save. Pass a `FinetuneConfig`, or its fields as keywords
    (`finetune(model=path, output_dir=out, train_files=[...], dga="paper")`); keywords given with a
    config override its fields. `command`: the command line to record in the log. Under a launcher
    (`accelerate launch`, `torchrun`) every process calls it; the first one writes the output folder."""
    # Transformers < 5 writes the run's mixed precision into ACCELERATE_MIXED_PRECISION, where the next run in
    # this process would read it as the launcher's: each run leaves the variable as it found it.
    launcher_precision = os.environ.get(MIXED_PRECISION_VARIABLE)
    try:
        return _finetune(settings, command, fields)
    finally:
        if launcher_precision is None:
            os.environ.pop(MIXED_PRECISION_VARIABLE, None)
        else:
            os.environ[MIXED_PRECISION_VARIABLE] = launcher_precision


MIXED_PRECISION_VARIABLE = "ACCELERATE_MIXED_PRECISION"


def _finetune(settings: FinetuneConfig | None, command: str | None, fields: dict[str, Any]) -> FinetuneResult:
    if settings is None:
        settings = FinetuneConfig(**fields)
    elif fields:
        settings = dataclasses.replace(settings, **fields)
    began = time.perf_counter()
    _check_trainer_available()
    distributed.check_launch()  # before any work: a launch that started one process of several
    if settings.threads:
        torch.set_num_threads(settings.threads)
    from transformers import default_data_collator, set_seed

    set_seed(settings.seed)
    dga = settings.dga_config()
    model, tokenizer = load_model_and_tokenizer(settings.model, settings.gguf_file)
    prepare_model(model, dga)
    train_rows, train_info = load_windows(settings, tokenizer, held_out=False)
    eval_rows, eval_info = load_windows(settings, tokenizer, held_out=True)
    if settings.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)  # the tied output head shares it
    counts = {"parameters": sum(p.numel() for p in model.parameters()),  # before FSDP/DeepSpeed shard them
              "trainable_parameters": _trainable_count(model, settings.freeze_embeddings)}
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False  # a training forward needs no KV cache

    trainer = _trainer_class()(
        model=model,
        args=training_arguments(settings, use_bf16(settings.bf16), eval_rows is not None),
        data_collator=default_data_collator,
        train_dataset=WindowDataset(train_rows),
        eval_dataset=None if eval_rows is None else WindowDataset(eval_rows),
        processing_class=tokenizer,
    )
    processes = check_processes(trainer, settings, train_rows.shape[0])
    setup_seconds = time.perf_counter() - began
    train_output = trainer.train()
    final_eval = None if eval_rows is None else _final_evaluation(trainer)
    model = _restore_for_inference(trainer.accelerator.unwrap_model(trainer.model), settings, use_cache)
    processes["parameter_digests"] = replica_digests(trainer, model)
    out = Path(settings.output_dir)
    trainer.save_model(str(out))  # model (config.json keeps config.dga) and tokenizer
    if trainer.args.should_save:  # a pickle of TrainingArguments: the JSON log below has every setting
        (out / "training_args.bin").unlink(missing_ok=True)

    log = _training_log(settings, dga, model, trainer, train_output, (train_info, eval_info), final_eval)
    log.update(counts, processes=processes, setup_seconds=round(setup_seconds, 2))
    log["wall_seconds"] = round(time.perf_counter() - began, 2)
    log["command"] = command
    if trainer.args.should_save:
        (out / LOG_FILE).write_text(json.dumps(log, indent=2, default=str))
    return FinetuneResult(model=model.eval(), tokenizer=tokenizer, output_dir=out, log=log)


def check_processes(trainer, settings: FinetuneConfig, windows: int) -> dict[str, Any]:
    """What accelerate set up against what the launcher and the settings asked for (`LaunchError`,
    `ValueError` when they disagree); returns how the run is spread over processes, for the log."""
    accelerator = trainer.accelerator
    distributed.check_sharding(accelerator.distributed_type)
    precision = str(accelerator.mixed_precision)
    if settings.bf16 is False and precision != "no":
        raise LaunchError(
            f"FinetuneConfig.bf16=False (--bf16 no) but the launcher set mixed precision {precision!r} "
            f"(accelerate launch --mixed_precision, or mixed_precision in its config file): make them agree"
        )
    world = trainer.args.world_size
    global_batch = settings.batch_size * settings.gradient_accumulation * world
    if windows < global_batch:
        raise ValueError(
            f"the training text gives {windows} windows of context_length={settings.context_length}, fewer than one "
            f"optimizer step reads: batch_size={settings.batch_size} x gradient_accumulation="
            f"{settings.gradient_accumulation} x {world} processes = {global_batch}; give more text or a smaller "
            f"batch, accumulation or number of processes"
        )
    return {"count": world, "distributed_type": str(accelerator.distributed_type.name), "mixed_precision": precision,
            "global_batch_windows": global_batch}


def replica_digests(trainer, model) -> list[str] | None:
    """Each data-parallel replica's `distributed.parameter_digest`, in rank order; raises when they differ.
    None with one process, and when FSDP or DeepSpeed shard the parameters (no process holds them all)."""
    kind = trainer.accelerator.distributed_type.name
    if trainer.args.world_size == 1 or kind in distributed.SHARDING_VARIABLES:
        return None
    digests = distributed.all_gather(distributed.parameter_digest(model))
    if len(set(digests)) > 1:
        raise RuntimeError(f"data-parallel replicas ended with different parameters (digests by rank: {digests}); "
                           f"nothing was saved")
    return digests


def _final_evaluation(trainer) -> dict[str, Any]:
    """The held-out metrics after the last step: the last evaluation if it ran at that step, else one more."""
    last = [e for e in trainer.state.log_history if "eval_loss" in e]
    if last and last[-1].get("step") == trainer.state.global_step:
        return {k: v for k, v in last[-1].items() if k.startswith("eval_")}
    final_eval = trainer.evaluate()
    final_eval["eval_perplexity"] = math.exp(min(float(final_eval["eval_loss"]), 700.0))
    return final_eval


def _restore_for_inference(model, settings: FinetuneConfig, use_cache: bool | None):
    """Undo what training changed on the model (frozen embeddings, no KV cache, checkpointing)."""
    if settings.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(True)
    if use_cache is not None:
        model.config.use_cache = use_cache
    if settings.gradient_checkpointing:
        disable = getattr(model, "activation_checkpointing_disable", None) or getattr(model, "gradient_checkpointing_disable")
        disable()
    return model


def _training_log(settings: FinetuneConfig, dga: DGAConfig | None, model, trainer, train_output,
                  data_info: tuple[dict, dict], final_eval: dict | None) -> dict[str, Any]:
    """The JSON log of a run (settings, data, losses, evaluations, versions); the caller adds the times, the
    parameter counts and the processes."""
    train_info, eval_info = data_info
    log = {
        "settings": settings.to_dict(),
        "dga": None if dga is None else dga.to_dict(),
        "bf16": str(trainer.accelerator.mixed_precision) == "bf16",
        "device": str(next(model.parameters()).device),
        "torch_threads": torch.get_num_threads(),
        "train_data": train_info,
        "eval_data": eval_info or None,
        "tokens_per_step": settings.context_length * settings.batch_size * settings.gradient_accumulation * trainer.args.world_size,
        "steps": trainer.state.global_step,
        "train_metrics": dict(train_output.metrics),
        "final_eval": final_eval,
        "losses": [{"step": e["step"], "loss": e["loss"], "learning_rate": e.get("learning_rate")} for e in trainer.state.log_history if "loss" in e],
        "evaluations": [
            {"step": e["step"], "eval_loss": e["eval_loss"], "eval_perplexity": e.get("eval_perplexity")}
            for e in trainer.state.log_history
            if "eval_loss" in e
        ],
        "log_history": trainer.state.log_history,
        "train_seconds": round(float(train_output.metrics.get("train_runtime", 0.0)), 2),
        "versions": package_versions(VERSIONED),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if final_eval is not None and not any(e["step"] == trainer.state.global_step for e in log["evaluations"]):
        log["evaluations"].append({"step": trainer.state.global_step, "eval_loss": final_eval["eval_loss"], "eval_perplexity": final_eval["eval_perplexity"]})
    return log


def _trainable_count(model, frozen_embeddings: bool) -> int:
    frozen = {id(model.get_input_embeddings().weight)} if frozen_embeddings else set()
    seen: set[int] = set()
    total = 0
    for parameter in model.parameters():  # parameters() yields a tied weight once
        if id(parameter) not in frozen and id(parameter) not in seen:
            seen.add(id(parameter))
            total += parameter.numel()
    return total


def _check_trainer_available() -> None:
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:  # Transformers' Trainer needs it
        raise ImportError("dga-finetune needs accelerate (Transformers' Trainer): pip install 'dga-hf[train]'")


# ------------------------------------------------------------------------------------------------ CLI


def parse_args(argv: Sequence[str] | None = None) -> FinetuneConfig:
    defaults = {f.name: f.default for f in dataclasses.fields(FinetuneConfig)}
    parser = argparse.ArgumentParser(prog="dga-finetune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--model", required=True, help="Hugging Face model directory (or Hub name)")
    add("--gguf-file", help="a GGUF file inside --model to load (de-quantised to float32)")
    add("--dga", default=defaults["dga"], help=f"DGA settings: a preset ({', '.join(preset_names())}), a JSON file, or 'none' for the dense control (default: %(default)s)")
    add("--train", nargs="+", default=[], metavar="PATH", help="training text: files and/or directories of *.txt")
    add("--train-dataset", help="training text from a datasets dataset (name, or folder from save_to_disk)")
    add("--eval", nargs="+", default=[], metavar="PATH", help="held-out text: files and/or directories of *.txt")
    add("--eval-dataset", help="held-out text from a datasets dataset")
    add("--dataset-config", help="configuration name for load_dataset (e.g. wikitext-2-raw-v1)")
    add("--train-split", default=defaults["train_split"], help="(default: %(default)s)")
    add("--eval-split", default=defaults["eval_split"], help="(default: %(default)s)")
    add("--text-column", default=defaults["text_column"], help="(default: %(default)s)")
    add("--context-length", type=int, default=defaults["context_length"], help="tokens per window (default: %(default)s)")
    add("--max-steps", type=int, default=defaults["max_steps"], help="optimizer steps (default: %(default)s)")
    add("--lr", type=float, default=defaults["learning_rate"], help="peak learning rate (default: %(default)s)")
    add("--warmup-steps", type=int, default=defaults["warmup_steps"], help="(default: %(default)s)")
    add("--lr-scheduler", default=defaults["lr_scheduler"], choices=SCHEDULERS, help="(default: %(default)s)")
    add("--weight-decay", type=float, default=defaults["weight_decay"], help="(default: %(default)s)")
    add("--max-grad-norm", type=float, default=defaults["max_grad_norm"], help="gradient clipping, 0 = off (default: %(default)s)")
    add("--batch-size", type=int, default=defaults["batch_size"], help="windows per device and micro-step (default: %(default)s)")
    add("--grad-accum", type=int, default=defaults["gradient_accumulation"], help="micro-steps per optimizer step (default: %(default)s)")
    add("--gradient-checkpointing", action="store_true", help="recompute activations in the backward pass")
    add("--bf16", default="auto", choices=["auto", "yes", "no"], help="bf16 mixed precision; auto: on GPUs that support it (default: %(default)s)")
    add("--freeze-embeddings", action="store_true", help="do not train the input embeddings (and the tied output head)")
    add("--eval-every", type=int, default=defaults["eval_every"], help="held-out evaluation every N steps, 0 = at the end only (default: %(default)s)")
    add("--no-eval-at-start", action="store_true", help="skip the held-out evaluation before the first step")
    add("--eval-windows", type=int, help="at most this many held-out windows, evenly spaced (default: all)")
    add("--logging-steps", type=int, default=defaults["logging_steps"], help="(default: %(default)s)")
    add("--seed", type=int, default=defaults["seed"], help="(default: %(default)s)")
    add("--threads", type=int, help="CPU threads for torch (default: torch's, one per core)")
    add("--out", required=True, help="output folder: model, tokenizer, training_log.json")
    args = parser.parse_args(argv)
    try:
        return FinetuneConfig(
            model=args.model,
            output_dir=args.out,
            gguf_file=args.gguf_file,
            dga=args.dga,
            train_files=tuple(args.train),
            train_dataset=args.train_dataset,
            eval_files=tuple(args.eval),
            eval_dataset=args.eval_dataset,
            dataset_config=args.dataset_config,
            train_split=args.train_split,
            eval_split=args.eval_split,
            text_column=args.text_column,
            context_length=args.context_length,
            max_steps=args.max_steps,
            learning_rate=args.lr,
            warmup_steps=args.warmup_steps,
            lr_scheduler=args.lr_scheduler,
            weight_decay=args.weight_decay,
            max_grad_norm=args.max_grad_norm,
            batch_size=args.batch_size,
            gradient_accumulation=args.grad_accum,
            gradient_checkpointing=args.gradient_checkpointing,
            bf16=args.bf16,
            freeze_embeddings=args.freeze_embeddings,
            eval_every=args.eval_every,
            eval_at_start=not args.no_eval_at_start,
            max_eval_windows=args.eval_windows,
            logging_steps=args.logging_steps,
            seed=args.seed,
            threads=args.threads,
        )
    except ValueError as error:
        parser.error(str(error))


def main(argv: Sequence[str] | None = None) -> None:
    """The console script (`dga-finetune`); its return value becomes the exit status, so it returns nothing."""
    settings = parse_args(argv)
    try:
        result = finetune(settings, command=shlex.join(["dga-finetune", *(sys.argv[1:] if argv is None else argv)]))
    except LaunchError as error:
        raise SystemExit(f"dga-finetune: {error}") from None
    if distributed.rank() != 0:  # the first process speaks for all
        return
    log = result.log
    final = log.get("final_eval") or {}
    summary = f"dga-finetune: {log['wall_seconds']} s, final training loss {log['losses'][-1]['loss'] if log['losses'] else 'n/a'}"
    if final:
        summary += f", held-out loss {final['eval_loss']:.4f} (perplexity {final['eval_perplexity']:.3f})"
    print(summary + f"; model and {LOG_FILE} in {settings.output_dir}/")


if __name__ == "__main__":
    main()
