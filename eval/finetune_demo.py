"""Does a little continued pre-training close the gap between DGA and dense attention?

    python -m dga_eval.finetune_demo --config eval/configs/finetune_demo.json --out runs/finetune

On the embedded default model (SmolLM2-135M-Instruct) and the offline corpus `pydoc_data.topics`:

1. split the corpus by topic (never inside a topic) into training and held-out topics, written as text
   files under OUT/data/ (one file per topic);
2. measure held-out perplexity of (a) the dense model and (b) DGA without training (the config's DGA
   settings, the paper preset in the shipped config);
3. fine-tune (c) a dense copy and (d) a DGA copy with the same data, seed, schedule and number of steps
   (`dga_hf.training.finetune`, Transformers' Trainer), and measure both from their saved checkpoints
   (reloaded with `from_pretrained`, `attn_implementation="dga"` for the DGA one);
4. report the four perplexities and the share of the gap closed,
   (DGA free - DGA fine-tuned) / (DGA free - dense fine-tuned), in OUT/results.json and OUT/report.md.

Held-out perplexity is measured on windows of exactly the training context length, cut from the
held-out topics like the training windows (topics joined with EOS): the main number scores every token of
the second half of each window (as `dga-eval`'s perplexity task does), the other one every token.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import dga_hf
from dga_hf import training
from dga_hf.environment import dtype_argument, package_versions

from .cli import VERSIONED
from .models import DEFAULT_MODEL, resolve_model_path

DEFAULTS: dict[str, Any] = {
    "model": "default",
    "dga_settings": "paper",
    "seed": 0,
    "heldout_share": 0.1,
    "context_length": 512,
    "eval_windows": 16,
    "max_steps": 100,
    "learning_rate": 3e-4,
    "warmup_steps": 10,
    "lr_scheduler": "cosine",
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "batch_size": 1,
    "gradient_accumulation": 1,
    "freeze_embeddings": True,
    "gradient_checkpointing": False,
    "train_eval_every": 0,
    "train_eval_windows": 4,
    "threads": 2,
    "target_gap_closed": 0.5,
}
SHARED_LINE_CHARS = 40
RUNS = ("dense", "dga_free", "dense_finetuned", "dga_finetuned")
LABELS = {
    "dense": "(a) dense, no training",
    "dga_free": "(b) DGA, training-free",
    "dense_finetuned": "(c) dense, fine-tuned",
    "dga_finetuned": "(d) DGA, fine-tuned",
}


# ------------------------------------------------------------------------------------------------ data


def shared_line_components(min_chars: int = SHARED_LINE_CHARS) -> list[list[str]]:
    """Topics of `pydoc_data.topics` grouped so that two topics sharing any line of at least `min_chars`
    characters are in one group (many topics are sections of others: "customization" is part of
    "specialnames", "for" of "compound", ...). Groups sorted by their first key, keys sorted inside."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    parent = {key: key for key in keys}

    def root(key: str) -> str:
        while parent[key] != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    owner: dict[str, str] = {}
    for key in keys:
        for line in long_lines(topics[key], min_chars):
            if line in owner:
                parent[root(key)] = root(owner[line])
            else:
                owner[line] = key
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(root(key), []).append(key)
    return sorted(groups.values(), key=lambda group: group[0])


def long_lines(text: str, min_chars: int = SHARED_LINE_CHARS) -> set[str]:
    return {line.strip() for line in text.split("\n") if len(line.strip()) >= min_chars}


def split_topics(share: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """Training and held-out topic keys: whole groups of `shared_line_components` are held out, taken in
    the order of SHA-256(seed/first key) while the held-out text stays within `share` of the corpus
    (characters); a group that would exceed it is skipped. Deterministic; no held-out line of
    `SHARED_LINE_CHARS` or more characters occurs in a training topic."""
    from pydoc_data.topics import topics

    total = sum(len(text) for text in topics.values())
    order = sorted(shared_line_components(), key=lambda g: hashlib.sha256(f"{seed}/{g[0]}".encode()).hexdigest())
    held_out: list[str] = []
    size = 0
    for group in order:
        group_size = sum(len(topics[key]) for key in group)
        if size + group_size <= share * total:
            held_out.extend(group)
            size += group_size
    held = set(held_out)
    return [key for key in sorted(topics) if key not in held], sorted(held)


def shared_lines(train: list[str], held_out: list[str]) -> int:
    """Lines of `SHARED_LINE_CHARS` or more characters that occur in a held-out and in a training topic."""
    from pydoc_data.topics import topics

    seen = set().union(*(long_lines(topics[key]) for key in train))
    return sum(len(long_lines(topics[key]) & seen) for key in held_out)


def write_topics(keys: list[str], folder: Path) -> list[Path]:
    """One UTF-8 file per topic, named so that sorted file order is the sorted key order."""
    from pydoc_data.topics import topics

    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.txt"):
        stale.unlink()
    paths = []
    for index, key in enumerate(keys):
        path = folder / f"{index:04d}_{key}.txt"
        path.write_text(topics[key], encoding="utf-8")
        paths.append(path)
    return paths


def fingerprint(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ measurement


@torch.no_grad()
def window_nll(model, window: torch.Tensor) -> dict[str, float]:
    """Summed NLL and token counts of one window: every predicted token, and the second half only (the
    tokens half .. L-1, each from all tokens before it, as `dga_eval.perplexity.second_half_nll`)."""
    ids = window.view(1, -1).to(model.device)
    length, half = ids.shape[1], ids.shape[1] // 2
    logits = model(ids, use_cache=False).logits[0].float()
    nll = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="none")
    return {"all": float(nll.sum()), "all_tokens": length - 1, "second_half": float(nll[half - 1 :].sum()), "second_half_tokens": length - half}


def measure(model, windows: torch.Tensor, name: str) -> dict[str, Any]:
    model.eval()
    began = time.perf_counter()
    parts = []
    with tqdm(total=windows.shape[0], desc=f"held-out {name}", unit="window") as progress:
        for window in windows:
            parts.append(window_nll(model, window))
            progress.update(1)
        meter = str(progress)
    second = sum(p["second_half"] for p in parts) / sum(p["second_half_tokens"] for p in parts)
    every = sum(p["all"] for p in parts) / sum(p["all_tokens"] for p in parts)
    return {
        "perplexity": math.exp(second),
        "perplexity_all_tokens": math.exp(every),
        "per_window_perplexity": [math.exp(p["second_half"] / p["second_half_tokens"]) for p in parts],
        "windows": int(windows.shape[0]),
        "seconds": round(time.perf_counter() - began, 1),
        "progress": meter,
    }


def gap_closed(values: dict[str, dict]) -> float | None:
    """(DGA free - DGA fine-tuned) / (DGA free - dense fine-tuned) of the main perplexity."""
    try:
        free, tuned, dense_tuned = (values[k]["perplexity"] for k in ("dga_free", "dga_finetuned", "dense_finetuned"))
    except KeyError:
        return None
    return (free - tuned) / (free - dense_tuned) if free != dense_tuned else None


# ------------------------------------------------------------------------------------------------ run


def load_spec(path: str | None) -> dict[str, Any]:
    spec = dict(DEFAULTS)
    if path:
        given = json.loads(Path(path).read_text())
        unknown = sorted(set(given) - set(DEFAULTS) - {"description"})
        if unknown:
            raise ValueError(f"unknown settings {unknown} in {path}: known settings are {sorted(DEFAULTS)}")
        spec.update(given)
    return spec


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dga_eval.finetune_demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="demo settings (JSON; default: the built-in values; the documented run is eval/configs/finetune_demo.json)")
    parser.add_argument("--out", default="runs/finetune", help="output folder (default: %(default)s)")
    parser.add_argument("--model", help="overrides the config's model (a local Hugging Face directory)")
    parser.add_argument("--max-steps", type=int, help="overrides the config's steps (e.g. a short check of the pipeline)")
    parser.add_argument("--eval-windows", type=int, help="overrides the config's number of held-out windows")
    parser.add_argument("--threads", type=int, help="overrides the config's CPU threads")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv), argv)


def run(args: argparse.Namespace, argv: list[str] | None = None) -> dict:
    began = time.perf_counter()
    spec = load_spec(args.config)
    for name in ("model", "max_steps", "eval_windows", "threads"):
        if getattr(args, name) is not None:
            spec[name] = getattr(args, name)
    dga = training.resolve_dga(spec["dga_settings"])
    if dga is None:
        raise ValueError("the demo compares DGA with dense attention: dga_settings must name DGA settings, not 'none'")
    torch.set_num_threads(int(spec["threads"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_path = resolve_model_path(spec["model"])

    train_keys, heldout_keys = split_topics(float(spec["heldout_share"]), int(spec["seed"]))
    leaked = shared_lines(train_keys, heldout_keys)
    if set(train_keys) & set(heldout_keys) or leaked:
        raise RuntimeError(f"the held-out topics share {leaked} lines with the training topics")
    train_files = write_topics(train_keys, out / "data" / "train")
    heldout_files = write_topics(heldout_keys, out / "data" / "heldout")

    results: dict[str, Any] = {
        "settings": {
            "command": shlex.join(["python", "-m", "dga_eval.finetune_demo", *(sys.argv[1:] if argv is None else argv)]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": DEFAULT_MODEL if spec["model"] in (None, "", "default") else spec["model"],
            "model_path": model_path,
            "dga": dga.to_dict(),
            "keys_share": dga.keys_per_query_share(int(spec["context_length"])),
            "torch_threads": torch.get_num_threads(),
            "versions": package_versions(VERSIONED),
            "spec": spec,
        },
        "data": {},
        "measurements": {},
        "training": {},
        "phase_seconds": {},
    }

    def save() -> None:
        results["gap_closed"] = gap_closed(results["measurements"])
        results["wall_seconds"] = round(time.perf_counter() - began, 1)
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
        (out / "report.md").write_text(markdown_report(results))

    # (a), (b): one copy of the weights, patched and unpatched in place
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    length = int(spec["context_length"])
    heldout_ids = training.token_stream(tokenizer, [p.read_text(encoding="utf-8") for p in heldout_files])
    all_windows = training.windows(heldout_ids, length)
    eval_windows = training.spaced(all_windows, int(spec["eval_windows"]))
    train_tokens = len(training.token_stream(tokenizer, [p.read_text(encoding="utf-8") for p in train_files]))
    results["data"] = {
        "split": (
            f"pydoc_data.topics by topic: topics that share a line of >= {SHARED_LINE_CHARS} characters are grouped, "
            f"whole groups held out (up to {spec['heldout_share']:.0%} of the characters, groups in seeded hash order)"
        ),
        "shared_lines": leaked,
        "train_topics": len(train_keys),
        "heldout_topics": len(heldout_keys),
        "heldout_topic_names": heldout_keys,
        "train_tokens": train_tokens,
        "heldout_tokens": len(heldout_ids),
        "heldout_windows_available": int(all_windows.shape[0]),
        "eval_windows": int(eval_windows.shape[0]),
        "context_length": length,
        "train_files_sha256": fingerprint(train_files),
        "heldout_files_sha256": fingerprint(heldout_files),
    }
    save()

    phase = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_path, attn_implementation="sdpa", **dtype_argument(torch.float32))
    results["measurements"]["dense"] = measure(model, eval_windows, "dense")
    save()
    dga_hf.patch(model, dga)
    results["measurements"]["dga_free"] = measure(model, eval_windows, "DGA free")
    del model
    results["phase_seconds"]["training_free"] = round(time.perf_counter() - phase, 1)
    save()

    for name, settings in (("dense_finetuned", "none"), ("dga_finetuned", dga)):
        phase = time.perf_counter()
        folder = out / name
        evaluate = int(spec["train_eval_every"]) > 0
        result = training.finetune(
            model=model_path,
            output_dir=str(folder),
            dga=settings,
            train_files=[str(out / "data" / "train")],
            eval_files=[str(out / "data" / "heldout")] if evaluate else (),
            context_length=length,
            max_steps=int(spec["max_steps"]),
            learning_rate=float(spec["learning_rate"]),
            warmup_steps=int(spec["warmup_steps"]),
            lr_scheduler=spec["lr_scheduler"],
            weight_decay=float(spec["weight_decay"]),
            max_grad_norm=float(spec["max_grad_norm"]),
            batch_size=int(spec["batch_size"]),
            gradient_accumulation=int(spec["gradient_accumulation"]),
            gradient_checkpointing=bool(spec["gradient_checkpointing"]),
            freeze_embeddings=bool(spec["freeze_embeddings"]),
            eval_every=int(spec["train_eval_every"]),
            eval_at_start=False,
            max_eval_windows=int(spec["train_eval_windows"]),
            bf16=False,
            seed=int(spec["seed"]),
            threads=int(spec["threads"]),
            command=results["settings"]["command"],
        )
        steps = int(result.log["steps"])
        results["training"][name] = {
            "output_dir": str(folder),
            "train_seconds": result.log["train_seconds"],
            "seconds_per_step": round(result.log["train_seconds"] / max(steps, 1), 2),
            "progress": tqdm.format_meter(steps, int(spec["max_steps"]), result.log["train_seconds"], unit="step"),
            "first_loss": result.log["losses"][0]["loss"] if result.log["losses"] else None,
            "last_loss": result.log["losses"][-1]["loss"] if result.log["losses"] else None,
            "losses": result.log["losses"],
            "evaluations": result.log["evaluations"],
            "trainable_parameters": result.log["trainable_parameters"],
            "tokens_per_step": result.log["tokens_per_step"],
            "train_windows": result.log["train_data"]["windows"],
        }
        del result
        # measured on the saved checkpoint: what from_pretrained gives back is what is reported
        kwargs = {"attn_implementation": "dga"} if settings != "none" else {"attn_implementation": "sdpa"}
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs, **dtype_argument(torch.float32))
        if settings != "none":
            assert dga_hf.integration.config_of(model) == dga, "the checkpoint lost its DGA settings"
        results["measurements"][name] = measure(model, eval_windows, name.replace("_", " "))
        del model
        results["phase_seconds"][name] = round(time.perf_counter() - phase, 1)
        save()

    save()
    print((out / "report.md").read_text())
    print(f"finetune_demo: {results['wall_seconds']} s; results in {out}/")
    return results


# ------------------------------------------------------------------------------------------------ report


def markdown_report(results: dict) -> str:
    settings, spec, data = results["settings"], results["settings"]["spec"], results["data"]
    dga = ", ".join(f"{k}={v}" for k, v in settings["dga"].items())
    lines = [
        f"# Fine-tuning closes the DGA gap? {settings['model']}",
        "",
        f"{settings['date']} · CPU threads {settings['torch_threads']} · wall time {results.get('wall_seconds', '?')} s",
        "",
        f"`{settings['command']}`",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in settings["versions"].items()),
        "",
        f"DGA settings: {dga} ({settings['keys_share']:.1%} of dense attention's keys at {spec['context_length']} tokens).",
        "",
    ]
    if data:
        lines += [
            f"Data: {data['split']}: {data['train_topics']} training topics ({data['train_tokens']} tokens), "
            f"{data['heldout_topics']} held-out topics ({data['heldout_tokens']} tokens). Held-out perplexity on "
            f"{data['eval_windows']} of {data['heldout_windows_available']} windows of {data['context_length']} tokens "
            "(the training context length), evenly spaced; the main number scores every token of the second half of "
            "each window (as dga-eval does), the last column every token.",
            "",
        ]
    lines += [
        f"Training (c and d alike): {spec['max_steps']} steps × {spec['batch_size'] * spec['gradient_accumulation']} window(s) of "
        f"{spec['context_length']} tokens, AdamW lr {spec['learning_rate']} ({spec['lr_scheduler']}, {spec['warmup_steps']} warm-up steps), "
        f"weight decay {spec['weight_decay']}, embeddings {'frozen' if spec['freeze_embeddings'] else 'trained'}, float32, seed {spec['seed']}.",
        "",
        "| model | held-out perplexity | ÷ dense (a) | all tokens | time |",
        "|---|---|---|---|---|",
    ]
    measured = results["measurements"]
    base = measured.get("dense", {}).get("perplexity")
    for name in RUNS:
        entry = measured.get(name)
        if entry is None:
            lines.append(f"| {LABELS[name]} | — | — | — | — |")
            continue
        ratio = f"{entry['perplexity'] / base:.2f}×" if base else "—"
        seconds = entry["seconds"] + results["training"].get(name, {}).get("train_seconds", 0)
        lines.append(f"| {LABELS[name]} | {entry['perplexity']:.3f} | {ratio} | {entry['perplexity_all_tokens']:.3f} | {seconds:.0f} s |")
    closed = results.get("gap_closed")
    lines += ["", "**Share of the gap closed** = (b − d) / (b − c) = "
              + (f"**{closed:.2f}**" if closed is not None else "—") + f" (target ≥ {spec['target_gap_closed']})."]
    if results["training"]:
        lines += ["", "## Training", "", "| run | first loss | last loss | time | progress |", "|---|---|---|---|---|"]
        for name, entry in results["training"].items():
            first = f"{entry['first_loss']:.3f}" if entry["first_loss"] is not None else "—"
            last = f"{entry['last_loss']:.3f}" if entry["last_loss"] is not None else "—"
            lines.append(f"| {LABELS[name]} | {first} | {last} | {entry['train_seconds']:.0f} s ({entry['seconds_per_step']} s/step) | `{entry['progress']}` |")
    lines += ["", "## Progress", ""]
    lines += [f"- {LABELS[name]}, held-out: `{entry['progress']}`" for name, entry in measured.items()]
    lines += [f"- phase {name}: {seconds} s" for name, seconds in results["phase_seconds"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
