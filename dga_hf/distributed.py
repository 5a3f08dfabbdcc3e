"""Several processes (`accelerate launch`, `torchrun`): which process this is, the launches that cannot work,
and what `dga-finetune` and `dga-eval` share to split work and compare replicas (docs/training.md,
docs/evaluation.md).

Two facts of accelerate (1.x, `accelerate/commands/launch.py`, `accelerate/state.py`) shape the checks:

- `accelerate launch --cpu --num_processes N` starts ONE process: its `--cpu` launcher runs several only
  through mpirun (`--mpirun_hostfile`). Several CPU processes come from the torchrun launcher,
  `accelerate launch --multi_gpu --num_processes N` (or `configs/accelerate/ddp.yaml`): without CUDA each
  process runs on the CPU and talks over gloo.
- FSDP exists in accelerate on GPUs only: a process on the CPU launched with it gets plain data
  parallelism (`MULTI_CPU`) without a word. (DeepSpeed ZeRO does run on the CPU, over gloo.)
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

# the launchers' names for the number of processes and this process's index (torchrun, then the MPI flavours)
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
RANK_VARIABLES = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
# what accelerate's launcher sets when its configuration asks for sharded training
SHARDING_VARIABLES = {"FSDP": "ACCELERATE_USE_FSDP", "DEEPSPEED": "ACCELERATE_USE_DEEPSPEED"}
SEVERAL_CPU_PROCESSES = (
    "accelerate launch --multi_gpu --num_processes N (or --config_file configs/accelerate/ddp.yaml): "
    "torchrun starts N processes, each on the CPU with gloo when there is no CUDA"
)


class LaunchError(RuntimeError):
    """The processes were launched in a way that cannot give what the launch asked for."""


def _first_int(environ: Mapping[str, str], names: Sequence[str], default: int) -> int:
    for name in names:
        if environ.get(name):
            return int(environ[name])
    return default


def world_size(environ: Mapping[str, str] | None = None) -> int:
    """How many processes the launcher started (1 without a launcher)."""
    return _first_int(os.environ if environ is None else environ, WORLD_SIZE_VARIABLES, 1)


def rank(environ: Mapping[str, str] | None = None) -> int:
    """This process's index among them (0 without a launcher)."""
    return _first_int(os.environ if environ is None else environ, RANK_VARIABLES, 0)


def _flag(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def check_launch(environ: Mapping[str, str] | None = None) -> None:
    """Raise `LaunchError` when accelerate's `--cpu` launcher was asked for several processes and started one.
    Its signature: ACCELERATE_USE_CPU, and MASTER_ADDR (set only for several processes or machines) without
    any process count."""
    environ = os.environ if environ is None else environ
    if _flag(environ.get("ACCELERATE_USE_CPU")) and environ.get("MASTER_ADDR") and world_size(environ) == 1:
        raise LaunchError(
            "accelerate launch --cpu with --num_processes > 1 (or --num_machines > 1) started one process: "
            "accelerate's --cpu launcher starts several only through mpirun (--mpirun_hostfile). For several "
            f"processes on one machine use {SEVERAL_CPU_PROCESSES}"
        )


def check_sharding(distributed_type: Any, environ: Mapping[str, str] | None = None) -> None:
    """Raise `LaunchError` when the launcher asked for FSDP or DeepSpeed and accelerate set up something else,
    as it does for FSDP on the CPU (`distributed_type`: accelerate's `DistributedType` of the run, or its name)."""
    environ = os.environ if environ is None else environ
    got = str(getattr(distributed_type, "name", distributed_type)).split(".")[-1]
    for wanted, variable in SHARDING_VARIABLES.items():
        if _flag(environ.get(variable)) and got != wanted:
            raise LaunchError(
                f"the launcher asked for {wanted} ({variable}=true) but accelerate set up {got}, which does not "
                f"shard the model (accelerate has FSDP on GPUs only; on the CPU it falls back to plain data "
                f"parallelism). Run {wanted} on GPUs, DeepSpeed ZeRO on the CPU, or plain data parallelism: "
                f"{SEVERAL_CPU_PROCESSES}"
            )


def parameter_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter's name and bytes, in `named_parameters` order (a tied weight once): equal
    digests mean bitwise equal parameters. Each parameter passes through host memory once."""
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        digest.update(name.encode())
        digest.update(parameter.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def all_gather(value: Any) -> list[Any]:
    """Every process's `value` (any picklable object) on every process, in rank order. A collective call:
    torch.distributed is initialised (accelerate does it) and every process makes it."""
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def shard(items: Sequence[Any], index: int, count: int) -> list[Any]:
    """Process `index`'s share of `items` among `count` processes: every `count`-th item from `index` on."""
    return list(items[index::count])


def unshard(shares: Sequence[Sequence[Any]]) -> list[Any]:
    """The items in their original order again, from every process's `shard` (in rank order)."""
    count = len(shares)
    total = sum(len(share) for share in shares)
    return [shares[position % count][position // count] for position in range(total)]
