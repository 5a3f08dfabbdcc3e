"""`dga-eval`: dense attention vs DGA configurations on one model, on identical samples, with a report.

    dga-eval --quick --out runs/quick                 # ~minutes on a laptop CPU: 1K and 2K tokens
    dga-eval --config eval/configs/eval_full.json --out runs/full --device cuda --dtype bfloat16
    dga-eval --model Qwen/Qwen3-0.6B --device-map auto --config my_run.json
    accelerate launch --multi_gpu --num_processes 2 $(which dga-eval) --config my_run.json --out runs/dp
    dga-eval --config eval/configs/eval_long.json --out runs/long --resume   # go on after a stop

Writes every finished (task, length, configuration) cell at once to OUT/cells/, and after each cell rewrites
OUT/results.json (every number and its settings), OUT/report.md and OUT/*.png from all cells, so a run that
stops leaves a partial report. --resume reuses the cells of OUT whose settings match and runs the others; an OUT
holding cells is refused without it. Under a launcher each process loads the model once and scores its share
of the samples; the first process writes the results, the same as one process would (docs/evaluation.md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from dga_hf import distributed
from dga_hf.environment import package_versions

from .cells import CellStore, refusal
from .harness import Processes, run_tasks
from .models import EMBEDDED_MODELS, display_name, load_model, resolve_model_path, weights_digest
from .report import write_report
from .runconfig import dga_configs, load_run_config

VERSIONED = ("torch", "transformers", "dga-hf", "lm_eval", "accelerate")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dga-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the shipped quick run (eval/configs/eval_quick.json)")
    parser.add_argument("--config", help="run configuration JSON (default: the shipped eval/configs/eval_full.json, or the quick one)")
    parser.add_argument("--out", default="runs/eval", help="output folder (default: runs/eval)")
    parser.add_argument(
        "--resume", action="store_true",
        help="go on with the run whose cells OUT/cells holds (after a stop): reuse every cell computed with the same "
        "settings (task settings, length, configuration, model, dtype, seed, device, processes; not the package "
        "versions), run the others. Without it an OUT that holds cells is refused",
    )
    parser.add_argument(
        "--model",
        help=f"an embedded model ({', '.join(EMBEDDED_MODELS)}; converted once into ~/.cache/dga-hf or $DGA_HF_CACHE), "
        "a local path or a Hub name (default: the run configuration's, else the embedded smollm2-135m)",
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--device-map", type=device_map_argument, metavar="auto|balanced|sequential|MAP.json",
        help="spread the model's layers over devices (accelerate): a strategy of from_pretrained, or a JSON "
        "object (file or inline) mapping module names to devices, e.g. {\"model.layers.0\": 0, ...}",
    )
    parser.add_argument("--seed", type=int, help="overrides the run configuration's seed")
    parser.add_argument(
        "--threads", type=int,
        help="CPU threads for torch (default: torch's, one per core); 1 on a machine shared with other jobs, where "
        "waiting threads can make each small decoding step 10-100x slower",
    )
    args = parser.parse_args(argv)
    if args.quick and args.config:
        parser.error("--quick and --config are alternatives: the quick run is eval/configs/eval_quick.json")
    if distributed.world_size() > 1 and args.device_map:
        parser.error(f"--device-map {args.device_map} spreads one model over the devices, but every process of a "
                     f"launch loads a whole model: use several processes or a device map, not both")
    if distributed.world_size() > 1 and args.device not in ("cpu", "cuda"):
        parser.error(f"--device {args.device} names one device, but every process of a launch takes its own: "
                     f"allowed values with several processes are cpu and cuda")
    return args


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def device_map_argument(value: str) -> str | dict:
    """A `from_pretrained` strategy name, or a JSON object {module name: device} given inline or as a file."""
    if value in DEVICE_MAP_STRATEGIES:
        return value
    text = value if value.lstrip().startswith("{") else (Path(value).read_text() if Path(value).is_file() else None)
    try:
        device_map = None if text is None else json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"{value!r} is not JSON ({error})") from None
    if not isinstance(device_map, dict) or not all(isinstance(d, (str, int)) for d in device_map.values()):
        raise argparse.ArgumentTypeError(
            f"{value!r} is invalid: allowed values are {', '.join(DEVICE_MAP_STRATEGIES)}, or a JSON object (inline "
            f"or a file) mapping module names to devices (a name such as \"cpu\" or \"cuda:1\", or a GPU index)"
        )
    return device_map


def main(argv: list[str] | None = None) -> None:
    """The console script: its return value becomes the exit status, so it returns nothing."""
    run(parse_args(argv), argv)


def run(args: argparse.Namespace, argv: list[str] | None = None) -> dict:
    began = time.perf_counter()
    spec = load_run_config(args.config, quick=args.quick)
    if args.seed is not None:
        spec["seed"] = args.seed
    if args.model:
        spec["model"] = args.model
    configs = dga_configs(spec)
    processes, device = start_processes(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    # before the model loads, so that a wrong OUT fails at once; the first process alone reads OUT (harness.run_tasks)
    problem = processes.broadcast(refusal(out, args.resume) if processes.rank == 0 else None)
    if problem is not None:
        raise SystemExit(f"dga-eval: {problem}")
    out.mkdir(parents=True, exist_ok=True)

    model, tokenizer = load_model(spec.get("model"), dtype=args.dtype, device=device, device_map=args.device_map)
    print(f"dga-eval [process {processes.rank + 1} of {processes.count}]: model loaded on {model.device} in "
          f"{time.perf_counter() - began:.1f} s", file=sys.stderr, flush=True)
    layers = getattr(model.config, "num_hidden_layers", None)
    results = {"settings": run_settings(args, argv, spec, model), "configs": describe_configs(configs, spec, layers), "tasks": {}}
    results["settings"]["processes"] = processes.count
    store = CellStore(out, cell_fingerprint_settings(results["settings"]), results["settings"]["versions"])

    def save(task_results: dict, task: str | None = None) -> None:
        """The report of every cell so far; the plots of `task` alone (None: all), the only ones that changed."""
        results["tasks"] = task_results
        results["settings"]["wall_seconds"] = round(time.perf_counter() - began, 1)
        if processes.rank == 0:  # every process holds the same results: one writes them
            write_report(results, out, None if task is None else [task])

    save(run_tasks(model, tokenizer, spec, configs, out, store, on_cell_done=save, processes=processes))
    if processes.rank == 0:
        print((out / "report.md").read_text())
        print(f"dga-eval: {results['settings']['wall_seconds']} s; results in {out}/")
    return results


def start_processes(device: str) -> tuple[Processes, str]:
    """This process's place among those a launcher started, and the device it evaluates on: with several
    processes, accelerate's process group (gloo on the CPU, nccl on GPUs) and its device for this process
    (cuda:LOCAL_RANK)."""
    try:
        distributed.check_launch()
    except distributed.LaunchError as error:
        raise SystemExit(f"dga-eval: {error}") from None
    if distributed.world_size() == 1:
        return Processes(), device
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu")
    return Processes(rank=state.process_index, count=state.num_processes), str(state.device)


def run_settings(args: argparse.Namespace, argv: list[str] | None, spec: dict, model) -> dict:
    return {
        "model": display_name(spec.get("model")),
        "model_path": resolve_model_path(spec.get("model")),
        "model_type": model.config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights": weights_digest(model),
        "device": str(model.device),
        "device_map": args.device_map,
        "hf_device_map": getattr(model, "hf_device_map", None),  # where from_pretrained put each module
        "device_name": torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "seed": int(spec.get("seed", 0)),
        "lengths": all_lengths(spec),
        "command": shlex.join(["dga-eval", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": package_versions(VERSIONED),
        "run_config": spec,
    }


FINGERPRINTED_SETTINGS = ("model", "model_type", "parameters", "weights", "dtype", "seed", "device_name", "device_map", "processes")


def cell_fingerprint_settings(settings: dict) -> dict:
    """The run's part of every cell's fingerprint (eval/cells.py); the device by its type and name (cuda and the
    GPU's name, not cuda:1: the same GPU at another index computes the same cells)."""
    return {**{name: settings[name] for name in FINGERPRINTED_SETTINGS}, "device": torch.device(settings["device"]).type}


def all_lengths(spec: dict) -> list[int]:
    lengths = set(spec["lengths"])
    for task in spec["tasks"].values():
        lengths.update(task.get("lengths", []))
    return sorted(int(n) for n in lengths)


def describe_configs(configs: dict, spec: dict, layers: int | None) -> dict:
    """Settings of each configuration and the share of dense attention's keys it reads at each length."""
    return {
        name: None if setting.dga is None else {
            "settings": setting.describe(),
            "keys_share": {str(n): keys_share(setting.dga, n, layers) for n in all_lengths(spec)},
        }
        for name, setting in configs.items()
    }


def keys_share(config, length: int, layers: int | None) -> float:
    """The spec's keys-per-query share, averaged over layers: dense (1.0) below `min_seq_len` and on
    `dense_layers`."""
    if length < config.min_seq_len:
        return 1.0
    share = config.keys_per_query_share(length)
    if not layers:
        return share
    dense = len([i for i in config.dense_layers if i < layers])
    return (share * (layers - dense) + dense) / layers


if __name__ == "__main__":
    main()
