"""DGA under sharded training: N processes train a DGA-patched model whose decoder layers (and the rest) are
sharded with torch's FSDP2 (`fully_shard`), against one process training the whole model on the same global
batch, from the same weights, with the same optimizer. accelerate has no FSDP on the CPU
(dga_hf/distributed.py), so this drives torch directly; on GPUs `configs/accelerate/fsdp.yaml` is the route.

    python -m torch.distributed.run --nproc_per_node 2 scripts/fsdp_check.py --model PATH --out check.json
    python -m torch.distributed.run --nproc_per_node 2 scripts/fsdp_check.py --model PATH --gradient-checkpointing

Without CUDA the processes run on the CPU over gloo; with CUDA each takes its GPU (nccl). The first process
also trains the reference and writes (and prints) a JSON report: both runs' losses, the largest parameter
difference after training, how many DGA calls tracked gradients, and the share of the parameters each
process held. tests/test_multiprocess.py runs it on the CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

import dga_hf
from dga_hf import integration


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a causal LM folder (float32 weights are trained)")
    parser.add_argument("--dga", default="paper", help="DGA preset (default: %(default)s)")
    parser.add_argument("--context-length", type=int, default=96)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the JSON report here")
    return parser.parse_args()


def counting_dga_calls(calls: list[bool]):
    """Wrap the DGA operator the attention backend calls, recording whether each call tracks gradients."""
    original = integration.dga_attention

    def counting(query, *args, **kwargs):
        calls.append(torch.is_grad_enabled() and query.requires_grad)
        return original(query, *args, **kwargs)

    integration.dga_attention = counting


def train(model, batches: list[torch.Tensor], lr: float) -> list[float]:
    """AdamW steps; the loss is the mean over this process's windows, FSDP averages gradients over processes."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return losses


def main() -> None:
    args = parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="dga").to(device)
    dga_hf.patch(model, args.dga)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    reference = copy.deepcopy(model) if rank == 0 else None

    generator = torch.Generator().manual_seed(args.seed)
    vocab = model.config.vocab_size
    global_batches = [torch.randint(2, vocab, (world, args.context_length), generator=generator).to(device)
                      for _ in range(args.steps)]
    calls: list[bool] = []
    counting_dga_calls(calls)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    held = sum(p.to_local().numel() for p in model.parameters() if isinstance(p, DTensor))
    began = time.perf_counter()
    losses = train(model, [batch[rank : rank + 1] for batch in global_batches], args.lr)
    sharded_seconds = time.perf_counter() - began
    for loss in losses:  # the global batch's loss: the mean of the processes' (equal token counts); gloo has no AVG
        dist.all_reduce(loss, op=dist.ReduceOp.SUM)
    losses = [float(loss) / world for loss in losses]
    full = {name: p.full_tensor() if isinstance(p, DTensor) else p for name, p in model.named_parameters()}
    held_shares = [None] * world
    dist.all_gather_object(held_shares, held / sum(p.numel() for p in full.values()))
    if rank == 0:
        reference_losses = [float(loss) for loss in train(reference, global_batches, args.lr)]
        expected = dict(reference.named_parameters())
        report = {
            "processes": world,
            "device": str(device),
            "dga": args.dga,
            "gradient_checkpointing": args.gradient_checkpointing,
            "steps": args.steps,
            "sharded_losses": losses,
            "reference_losses": reference_losses,
            "max_parameter_difference": max(float((full[n].detach() - expected[n].detach()).abs().max()) for n in expected),
            "max_parameter_change": max(float((full[n].detach() - p.detach()).abs().max())
                                        for n, p in AutoModelForCausalLM.from_pretrained(args.model).to(device).named_parameters()),
            "dga_calls_with_gradients": sum(calls),
            "parameter_share_held": held_shares,
            "sharded_seconds": round(sharded_seconds, 2),
        }
        text = json.dumps(report, indent=2)
        print(text)
        if args.out:
            with open(args.out, "w") as file:
                file.write(text)
    # every process leaves together: a process that tears its gloo group down while another still uses
    # it (here while the first trains the reference) can abort in gloo's threads
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
