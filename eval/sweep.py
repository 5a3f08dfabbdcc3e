"""Perplexity sweep over DGA settings on fixed corpus windows (how the shipped default was chosen).

    python -m dga_eval.sweep --out runs/sweep      # the shipped search, eval/configs/sweep_defaults.json
    python -m dga_eval.sweep --config my_sweep.json --out runs/my_sweep

A window is ``[start, end]`` tokens of the prose corpus, or ``{"corpus": name, "tokens": [start, end]}``
(`dga_eval.corpus.CORPORA`). Each result records the perplexity of the window's second half, the share
of dense attention's keys the model's queries actually read (`dga_hf.ops.stats.counting_keys`, over every
layer) beside the cost formula's estimate, and the wall time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

import dga_hf
from dga_hf import DGAConfig
from dga_hf.ops.stats import counting_keys

from .corpus import corpus_tokens
from .models import load_model
from .perplexity import perplexity
from .runconfig import shipped_config

SHIPPED_SWEEP = "sweep_defaults.json"


def window_corpus(window) -> tuple[str, int, int]:
    """(corpus, start, end) of a window of a sweep file."""
    if isinstance(window, dict):
        start, end = window["tokens"]
        return window.get("corpus", "pydoc"), start, end
    start, end = window
    return "pydoc", start, end


def run_sweep(spec: dict, out: Path, only: list[str] | None = None) -> dict:
    model, tokenizer = load_model(spec.get("model"))
    tokens = {}
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "sweep.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    jobs = [
        (name, window)
        for name, entry in spec["settings"].items()
        for window in entry.get("windows", list(spec["windows"]))
        if not only or name in only
    ]
    for name, window in tqdm(jobs, desc="sweep"):
        if window in results.get(name, {}):
            continue
        settings = spec["settings"][name]["dga"]
        if settings is None:
            if dga_hf.is_patched(model):
                dga_hf.unpatch(model)
        else:
            dga_hf.patch(model, DGAConfig(**settings))
        corpus, start, end = window_corpus(spec["windows"][window])
        if corpus not in tokens:
            tokens[corpus] = torch.tensor(corpus_tokens(tokenizer, corpus))
        began = time.time()
        with counting_keys() as count:
            value = perplexity(model, [tokens[corpus][start:end]])
        entry = results.setdefault(name, {"settings": settings})
        entry[window] = value
        entry[f"{window}_seconds"] = round(time.time() - began, 1)
        entry[f"{window}_keys_read"] = count.share if count.calls else 1.0
        if settings is not None:
            entry[f"{window}_keys_share"] = DGAConfig(**settings).keys_per_query_share(end - start)
        results_path.write_text(json.dumps(results, indent=2))
    (out / "sweep.md").write_text(markdown_table(results, list(spec["windows"])))
    return results


def markdown_table(results: dict, windows: list[str]) -> str:
    """Perplexity and keys read (measured; the formula's estimate where no measurement was recorded)."""
    header = "| setting | " + " | ".join(f"ppl {w} | keys read {w}" for w in windows) + " |"
    lines = [header, "|---|" + "---|---|" * len(windows)]
    for name, entry in results.items():
        cells = []
        for w in windows:
            ppl = entry.get(w)
            share = entry.get(f"{w}_keys_read", entry.get(f"{w}_keys_share", 1.0 if entry.get("settings") is None else None))
            cells.append(f"{ppl:.2f}" if ppl is not None else "")
            cells.append(f"{share:.1%}" if share is not None else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help=f"sweep settings (JSON; default: the shipped eval/configs/{SHIPPED_SWEEP})")
    parser.add_argument("--out", default="runs/sweep")
    parser.add_argument("--only", nargs="*", help="run only these setting names")
    args = parser.parse_args(argv)
    spec = json.loads(Path(args.config).read_text()) if args.config else shipped_config(SHIPPED_SWEEP)
    run_sweep(spec, Path(args.out), args.only)
    print((Path(args.out) / "sweep.md").read_text())


if __name__ == "__main__":
    main()
