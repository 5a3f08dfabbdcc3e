"""Beyond one process (docs/training.md, docs/evaluation.md): two processes on the CPU, started by accelerate's
torchrun launcher with the commands of the docs, talking over gloo, give what one process gives.

- dga-finetune: two processes with one window each per step train like one process with two windows (the
  same global batch of the same windows): losses, held-out loss and parameters; both processes end with
  identical parameters (each one's digest, checked against the saved model); the checkpoint carries the DGA
  settings; launches that cannot work stop with an error; bf16 autocast and gradient checkpointing on the CPU.
- sharding: FSDP2 on a DGA model (scripts/fsdp_check.py; accelerate has no FSDP on the CPU) against one
  process; the shipped accelerate configurations (configs/accelerate/) load.
- dga-eval and hf-dga (lm-eval): two processes give the metrics and the per-sample results of one; each
  process loads the model once; the results are written once.
- device maps: a model loaded with a map that names every module (all on the CPU, or one decoder layer
  offloaded to disk behind accelerate's hooks) runs DGA prefill and DGACache decoding as the plain model does,
  each layer's decoding state on that layer's device; dga-eval --device-map takes such a map.

The processes are tiny and run one torch thread each: this machine has two cores shared with other jobs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import dga_hf
from dga_hf import DGAConfig, distributed, integration, training
from dga_hf.distributed import LaunchError
from dga_hf.environment import dtype_argument
from helpers import ROOT, repeated_text, save_char_model

PAPER = DGAConfig.preset("paper")
# `accelerate launch` is this module of the venv's accelerate (its console script runs the same function)
ACCELERATE_LAUNCH = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch"]
TWO_PROCESSES = ["--multi_gpu", "--num_processes", "2", "--main_process_port", "0"]
DDP_CONFIG = ROOT / "configs" / "accelerate" / "ddp.yaml"
SCRIPTS = Path(sys.executable).parent  # $(which dga-finetune) etc.: the console scripts of this venv

# Measured here (2 processes vs 1, 4 steps, gradient checkpointing, float32): the losses differ by at most
# 1.1e-7 relative, the held-out loss not at all, the parameters by at most 8.7e-8 (the training moves them by
# 6e-3): the gradient sums run in another order. The tolerances are about 10x the measured differences.
LOSS_RTOL = 1e-6
PARAMETER_ATOL = 1e-6
FINETUNE_ARGS = ["--dga", "paper", "--context-length", "96", "--max-steps", "4", "--lr", "3e-3", "--warmup-steps", "1",
                 "--eval-windows", "4", "--gradient-checkpointing", "--seed", "0", "--threads", "1"]


def launch(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`accelerate launch ARGS`, offline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([*ACCELERATE_LAUNCH, *args], env=env, capture_output=True, text=True, timeout=timeout)


def expect_success(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


# ------------------------------------------------------------------------------------------------ dga-finetune


@pytest.fixture(scope="module")
def finetune_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("several-processes")
    (root / "train.txt").write_text(repeated_text())
    (root / "heldout.txt").write_text(repeated_text(5, copies=2))
    return {"root": root, "model": save_char_model(root / "tiny"), "train": root / "train.txt", "heldout": root / "heldout.txt"}


def finetune_command(data: dict[str, Path], *extra: str) -> list[str]:
    return ["--model", str(data["model"]), "--train", str(data["train"]), "--eval", str(data["heldout"]), *FINETUNE_ARGS, *extra]


@pytest.fixture(scope="module")
def finetune_runs(finetune_data) -> dict:
    """The same fine-tune with the same global batch of 2 windows: two processes of 1 (docs/training.md's
    command), and one process of 2 (in this process)."""
    root = finetune_data["root"]
    two = expect_success(launch(*TWO_PROCESSES, str(SCRIPTS / "dga-finetune"),
                                *finetune_command(finetune_data, "--batch-size", "1", "--out", str(root / "two"))))
    training.main(finetune_command(finetune_data, "--batch-size", "2", "--out", str(root / "one")))
    logs = {name: json.loads((root / name / training.LOG_FILE).read_text()) for name in ("one", "two")}
    return {"root": root, "two": two, "logs": logs}


def test_two_processes_train_like_one_process_with_the_same_global_batch(finetune_runs):
    one, two = finetune_runs["logs"]["one"], finetune_runs["logs"]["two"]
    assert two["processes"]["count"] == 2 and two["processes"]["distributed_type"] == "MULTI_CPU"
    assert one["processes"]["count"] == 1 and one["processes"]["distributed_type"] == "NO"
    assert one["processes"]["global_batch_windows"] == two["processes"]["global_batch_windows"] == 2
    assert one["tokens_per_step"] == two["tokens_per_step"] == 2 * 96
    assert [e["step"] for e in two["losses"]] == [1, 2, 3, 4]
    assert [e["loss"] for e in two["losses"]] == pytest.approx([e["loss"] for e in one["losses"]], rel=LOSS_RTOL)
    assert two["final_eval"]["eval_loss"] == pytest.approx(one["final_eval"]["eval_loss"], rel=LOSS_RTOL)
    root = finetune_runs["root"]
    initial, first, second = (load_file(root / name / "model.safetensors") for name in ("tiny", "one", "two"))
    assert sorted(first) == sorted(second)
    difference = max(float((first[name] - second[name]).abs().max()) for name in first)
    change = max(float((first[name] - initial[name]).abs().max()) for name in first)
    assert difference <= PARAMETER_ATOL and change > 1000 * PARAMETER_ATOL, (difference, change)


def test_both_processes_end_with_identical_parameters(finetune_runs):
    digests = finetune_runs["logs"]["two"]["processes"]["parameter_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    saved = AutoModelForCausalLM.from_pretrained(finetune_runs["root"] / "two", **dtype_argument(torch.float32))
    assert distributed.parameter_digest(saved) == digests[0]  # the digest is of what the processes held
    # ... and it sees differences of 1e-7: the one-process run's parameters have another
    one = AutoModelForCausalLM.from_pretrained(finetune_runs["root"] / "one", **dtype_argument(torch.float32))
    assert distributed.parameter_digest(one) != digests[0]
    assert finetune_runs["logs"]["one"]["processes"]["parameter_digests"] is None


def test_the_checkpoint_carries_dga_and_one_process_writes(finetune_runs):
    out = finetune_runs["root"] / "two"
    assert json.loads((out / "config.json").read_text())["dga"] == PAPER.to_dict()
    loaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="dga")
    assert dga_hf.is_patched(loaded) and integration.config_of(loaded) == PAPER
    written = {p.name for p in out.iterdir()}  # (tokenizer files vary with the transformers version)
    assert {"config.json", "model.safetensors", "tokenizer.json", "training_log.json"} <= written
    assert "training_args.bin" not in written
    assert finetune_runs["two"].stdout.count("dga-finetune: ") == 1  # the summary of the first process only
    assert finetune_runs["logs"]["two"]["parameters"] == finetune_runs["logs"]["one"]["parameters"]


def test_accelerate_cpu_launcher_with_several_processes_is_refused(finetune_data):
    """`accelerate launch --cpu --num_processes 2` starts one process: dga-finetune says so before any work."""
    out = finetune_data["root"] / "cpu-launcher"
    result = launch("--cpu", "--num_processes", "2", str(SCRIPTS / "dga-finetune"),
                    *finetune_command(finetune_data, "--out", str(out)))
    assert result.returncode != 0
    assert "dga-finetune: accelerate launch --cpu with --num_processes > 1 (or --num_machines > 1) started one process" in result.stderr
    assert "accelerate launch --multi_gpu --num_processes N" in result.stderr
    assert not out.exists()


def test_fsdp_launched_on_the_cpu_is_refused(finetune_data):
    """accelerate has FSDP on GPUs only and would silently train without it: the shipped fsdp.yaml on the CPU."""
    out = finetune_data["root"] / "fsdp-on-cpu"
    result = launch("--config_file", str(ROOT / "configs" / "accelerate" / "fsdp.yaml"), str(SCRIPTS / "dga-finetune"),
                    *finetune_command(finetune_data, "--batch-size", "1", "--out", str(out)))
    assert result.returncode != 0
    assert "dga-finetune: the launcher asked for FSDP (ACCELERATE_USE_FSDP=true) but accelerate set up MULTI_CPU" in result.stderr
    assert not (out / "model.safetensors").exists()


def test_launch_checks_read_what_the_launchers_set(monkeypatch):
    cpu_launcher = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    with pytest.raises(LaunchError, match="started one process"):
        distributed.check_launch(cpu_launcher)
    distributed.check_launch({**cpu_launcher, "WORLD_SIZE": "2", "RANK": "1"})  # mpirun / torchrun: several started
    distributed.check_launch({"ACCELERATE_USE_CPU": "True"})  # --cpu with one process
    distributed.check_launch({})
    with pytest.raises(LaunchError, match=r"asked for FSDP \(ACCELERATE_USE_FSDP=true\) but accelerate set up MULTI_CPU"):
        distributed.check_sharding("DistributedType.MULTI_CPU", {"ACCELERATE_USE_FSDP": "true"})
    with pytest.raises(LaunchError, match="asked for DEEPSPEED"):
        distributed.check_sharding("MULTI_GPU", {"ACCELERATE_USE_DEEPSPEED": "true"})
    distributed.check_sharding("FSDP", {"ACCELERATE_USE_FSDP": "true"})
    distributed.check_sharding("MULTI_CPU", {"ACCELERATE_USE_FSDP": "false"})
    assert (distributed.world_size({"PMI_SIZE": "4"}), distributed.rank({"PMI_RANK": "3"})) == (4, 3)
    assert (distributed.world_size({}), distributed.rank({})) == (1, 0)
    # dga-eval checks the launch the same way, before loading anything
    from dga_eval import cli

    for name in distributed.WORLD_SIZE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in cpu_launcher.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit, match="dga-eval: accelerate launch --cpu with --num_processes > 1"):
        cli.main(["--quick", "--out", "unused"])


def test_shares_of_processes_go_back_in_order():
    items = list(range(7))
    shares = [distributed.shard(items, index, 3) for index in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]] and distributed.unshard(shares) == items
    assert distributed.unshard([distributed.shard(items, 0, 1)]) == items


def test_settings_the_launch_cannot_satisfy_are_refused(finetune_data, monkeypatch):
    base = dict(model=str(finetune_data["model"]), train_files=[str(finetune_data["train"])], context_length=96,
                max_steps=1, threads=1, dga="paper")
    # 2880 characters: 30 windows of 96; one step would read 16 x 2 = 32
    with pytest.raises(ValueError, match=r"gives 30 windows .* fewer than one optimizer step reads: batch_size=16 x "
                                         r"gradient_accumulation=2 x 1 processes = 32"):
        training.finetune(**base, output_dir=str(finetune_data["root"] / "too-few"), batch_size=16, gradient_accumulation=2)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision bf16` sets
    with pytest.raises(LaunchError, match=r"bf16=False \(--bf16 no\) but the launcher set mixed precision 'bf16'"):
        training.finetune(**base, output_dir=str(finetune_data["root"] / "precision"), bf16=False)


@contextlib.contextmanager
def dga_value_dtypes():
    """The dtype of the values of every DGA call that tracks gradients (under autocast the projections give
    bf16; Llama's rotary embedding turns queries and keys back to float32)."""
    dtypes: list[torch.dtype] = []
    original = integration.dga_attention

    def recording(query, key, value, *args, **kwargs):
        if torch.is_grad_enabled() and query.requires_grad:
            dtypes.append(value.dtype)
        return original(query, key, value, *args, **kwargs)

    integration.dga_attention = recording
    try:
        yield dtypes
    finally:
        integration.dga_attention = original


@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_bf16_autocast_with_gradient_checkpointing_trains_dga_on_the_cpu(finetune_data, backend):
    """Mixed precision on the CPU is bf16 autocast: DGA then runs on bf16 values, checkpointing runs each
    layer twice, and the losses follow float32's to bf16's precision (measured: 5e-4 relative at most)."""
    common = dict(model=str(finetune_data["model"]), train_files=[str(finetune_data["train"])], context_length=96,
                  max_steps=3, warmup_steps=0, learning_rate=3e-3, threads=1, dga=PAPER.replace(backend=backend),
                  gradient_checkpointing=True)
    with dga_value_dtypes() as full_dtypes:
        full = training.finetune(**common, output_dir=str(finetune_data["root"] / f"float32-{backend}"), bf16=False)
    with dga_value_dtypes() as mixed_dtypes:
        mixed = training.finetune(**common, output_dir=str(finetune_data["root"] / f"bf16-{backend}"), bf16=True)
    assert full_dtypes == [torch.float32] * 12 and mixed_dtypes == [torch.bfloat16] * 12  # 3 steps x 2 layers x 2
    assert mixed.log["bf16"] is True and mixed.log["processes"]["mixed_precision"] == "bf16"
    assert full.log["processes"]["mixed_precision"] == "no"
    mixed_losses, full_losses = ([e["loss"] for e in run.log["losses"]] for run in (mixed, full))
    assert mixed_losses == pytest.approx(full_losses, rel=5e-3) and mixed_losses != full_losses
    assert next(mixed.model.parameters()).dtype == torch.float32  # autocast: the weights stay float32


# ------------------------------------------------------------------------------------------------ sharding


def test_fsdp2_sharding_trains_dga_like_one_process(finetune_data, tmp_path):
    """scripts/fsdp_check.py: each of two processes holds half of every parameter (FSDP2, one unit per decoder
    layer), with gradient checkpointing; measured: losses equal to 1e-7 relative, parameters to 1.7e-6
    (moved by 9e-3 by the training)."""
    report_file = tmp_path / "fsdp.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "scripts" / "fsdp_check.py"), "--model", str(finetune_data["model"]), "--gradient-checkpointing",
               "--out", str(report_file)]
    result = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(report_file.read_text())
    assert report["processes"] == 2 and report["parameter_share_held"] == [0.5, 0.5]
    assert report["dga_calls_with_gradients"] == report["steps"] * 2 * 2  # 2 layers, each run twice (checkpointing)
    assert report["sharded_losses"] == pytest.approx(report["reference_losses"], rel=LOSS_RTOL)
    assert report["max_parameter_difference"] <= 2e-5 and report["max_parameter_change"] > 100 * 2e-5, report


def test_shipped_accelerate_configurations_load():
    from accelerate.commands.config.config_args import load_config_from_file

    folder = ROOT / "configs" / "accelerate"
    assert sorted(p.name for p in folder.iterdir()) == ["ddp.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml", "fsdp.yaml"]
    configs = {path.stem: load_config_from_file(str(path)) for path in folder.iterdir()}
    assert {name: config.distributed_type.name for name, config in configs.items()} == {
        "ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed_zero2": "DEEPSPEED", "deepspeed_zero3": "DEEPSPEED"}
    assert configs["fsdp"].fsdp_config["fsdp_version"] == 2
    assert configs["fsdp"].fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # save_pretrained: a whole model
    assert [configs[f"deepspeed_zero{stage}"].deepspeed_config["zero_stage"] for stage in (2, 3)] == [2, 3]
    assert all(config.main_process_port == 0 and config.num_processes == 2 for config in configs.values())


# ------------------------------------------------------------------------------------------------ dga-eval


EVAL_RUN = {
    "seed": 1,
    "lengths": [300, 400],  # a passkey prompt of the character tokenizer needs ~250 tokens
    "dga_configs": ["paper", {"name": "paper+compact", "preset": "paper", "decoding": "compact"}],
    "tasks": {  # 3 samples per length: the processes get 2 and 1; speed's one prompt goes to the first
        "passkey": {"depths": [0.2, 0.5, 0.8], "samples_per_depth": 1, "max_new_tokens": 6},
        "copy": {"samples": 3, "passage_tokens": 16, "lead_tokens": 4},
        "perplexity": {"windows": 3},
        "speed": {"new_tokens": 4, "repeats": 1},
    },
}


@pytest.fixture(scope="module")
def eval_runs(finetune_data) -> dict:
    """The same dga-eval run: two processes (docs/evaluation.md's command, through configs/accelerate/ddp.yaml)
    and one (in this process)."""
    root = finetune_data["root"]
    (root / "run.json").write_text(json.dumps(EVAL_RUN))
    common = ["--config", str(root / "run.json"), "--model", str(finetune_data["model"]), "--device", "cpu", "--threads", "1"]
    two = expect_success(launch("--config_file", str(DDP_CONFIG), str(SCRIPTS / "dga-eval"), *common, "--out", str(root / "eval-two")))
    from dga_eval import cli

    cli.main([*common, "--out", str(root / "eval-one")])
    results = {name: json.loads((root / f"eval-{name}" / "results.json").read_text()) for name in ("one", "two")}
    return {"two": two, "results": results, "outs": {name: root / f"eval-{name}" for name in ("one", "two")}, "common": common}


def test_two_processes_evaluate_like_one(eval_runs):
    one, two = eval_runs["results"]["one"], eval_runs["results"]["two"]
    assert (one["settings"]["processes"], two["settings"]["processes"]) == (1, 2)
    assert list(two["tasks"]) == ["passkey", "copy", "perplexity", "speed"]
    for task in ("passkey", "copy", "perplexity"):
        for config in ("dense", "paper", "paper+compact"):
            for length in ("300", "400"):
                expected, got = one["tasks"][task]["results"][config][length], two["tasks"][task]["results"][config][length]
                assert "error" not in got, got.get("error")
                assert got["metrics"] == expected["metrics"] and got["details"] == expected["details"], (task, config, length)
                assert (got["samples_per_process"], expected["samples_per_process"]) == ([2, 1], [3])
    for config in ("dense", "paper", "paper+compact"):
        for length in ("300", "400"):  # timings differ; what the cache holds does not
            expected, got = one["tasks"]["speed"]["results"][config][length], two["tasks"]["speed"]["results"][config][length]
            assert got["metrics"]["kv_cache_mb"] == expected["metrics"]["kv_cache_mb"] and len(got["details"]) == 1
            assert got["samples_per_process"] == [1, 0]
    # the DGA settings mattered: DGA's perplexity differs from dense's
    assert two["tasks"]["perplexity"]["results"]["paper"]["400"]["metrics"] != two["tasks"]["perplexity"]["results"]["dense"]["400"]["metrics"]


def test_each_process_loads_the_model_once_and_the_first_writes(eval_runs):
    stderr, stdout = eval_runs["two"].stderr, eval_runs["two"].stdout
    for process in (1, 2):
        assert stderr.count(f"dga-eval [process {process} of 2]: model loaded") == 1, stderr[-3000:]
    assert stdout.count("dga-eval: ") == 1 and stdout.count("## passkey") == 1  # the report, printed once


def test_two_processes_resume_a_stopped_run_like_one_process(eval_runs, tmp_path):
    """A two-process run stopped part-way (here: cells taken out of a finished run's OUT) and resumed by two
    processes: the first decides which cells are reused and tells the other (harness.Processes.broadcast), both
    compute the missing ones, the first writes them; the results are those of one process."""
    out = tmp_path / "resumed"
    shutil.copytree(eval_runs["outs"]["two"], out)
    missing = ["passkey/400/paper+compact", "copy/300/dense", "perplexity/300/paper", "perplexity/400/paper", "speed/300/dense"]
    for key in missing:
        (out / "cells" / f"{key}.json").unlink()
    kept = {str(path.relative_to(out / "cells").with_suffix("")): json.loads(path.read_text())["written"]
            for path in (out / "cells").glob("*/*/*.json")}
    assert len(kept) == 4 * 2 * 3 - len(missing)
    command = ["--config_file", str(DDP_CONFIG), str(SCRIPTS / "dga-eval"), *eval_runs["common"], "--out", str(out)]
    refused = launch(*command)
    assert refused.returncode != 0  # both processes stop, before loading the model
    assert refused.stderr.count(f"dga-eval: {out} already holds 19 cells of an earlier run") == 2, refused.stderr[-3000:]
    assert "model loaded" not in refused.stderr

    expect_success(launch(*command, "--resume"))
    resumed = json.loads((out / "results.json").read_text())
    reused = {f"{task}/{length}/{config}": written for task, entry in resumed["tasks"].items()
              for config, cells in entry["reused"].items() for length, written in cells.items()}
    assert reused == kept
    one = eval_runs["results"]["one"]["tasks"]
    for task in ("passkey", "copy", "perplexity"):
        for config, cells in one[task]["results"].items():
            for length, expected in cells.items():
                got = resumed["tasks"][task]["results"][config][length]
                assert (got["metrics"], got["details"]) == (expected["metrics"], expected["details"]), (task, config, length)
                assert got["samples_per_process"] == [2, 1]
    speed = resumed["tasks"]["speed"]["results"]["dense"]["300"]
    assert speed["metrics"]["kv_cache_mb"] == one["speed"]["results"]["dense"]["300"]["metrics"]["kv_cache_mb"]
    for key in missing:
        record = json.loads((out / "cells" / f"{key}.json").read_text())
        stored = resumed["tasks"][record["task"]]["results"][record["config"]][str(record["length"])]
        assert record["fingerprint"]["run"]["processes"] == 2 and record["cell"] == stored, key


def test_several_processes_refuse_a_device_map_or_a_named_device(monkeypatch, capsys):
    from dga_eval import cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    for argv, message in ((["--device-map", "auto"], "--device-map auto spreads one model over the devices"),
                          (["--device", "cuda:1"], "--device cuda:1 names one device")):
        with pytest.raises(SystemExit):
            cli.parse_args(["--quick", *argv])
        assert message in capsys.readouterr().err


LENGTH_TASK = """
task: tiny_lengths
dataset_path: ""
dataset_name: ""
output_type: generate_until
test_split: test
custom_dataset: !function tiny_lengths_data.dataset
doc_to_text: "{{input}}"
doc_to_target: "{{target}}"
process_results: !function tiny_lengths_data.process_results
generation_kwargs: {do_sample: false, max_gen_toks: 2, until: []}
metadata: {version: 1.0}
"""
LENGTH_DATA = '''
import datasets

def dataset(**kwargs):  # as RULER's tasks do: samples of each length of metadata["max_seq_lengths"], scored by length
    docs = [{"input": f"the key is {i} " * (n // 13), "target": str(i), "length": n}
            for n in kwargs["max_seq_lengths"] for i in range(2)]
    return {"test": datasets.Dataset.from_list(docs)}

def process_results(doc, results):
    return {str(doc["length"]): float(results[0].strip().startswith(doc["target"]))}
'''


@dataclasses.dataclass(frozen=True)
class ReplayedPartner:
    """Process `rank` of two in one process: each round its partner hands in `partner[round]` (None once there is
    none), and what this process hands in is appended to `handed_in` (harness.Processes.gather's contract)."""

    rank: int
    partner: tuple = ()
    handed_in: list = dataclasses.field(default_factory=list)
    count: int = 2

    def share(self, items: list) -> list:
        return distributed.shard(items, self.rank, self.count)

    def gather(self, value):
        self.handed_in.append(value)
        round_ = len(self.handed_in) - 1
        theirs = self.partner[round_] if round_ < len(self.partner) else None
        return [value, theirs] if self.rank == 0 else [theirs, value]


def test_ruler_lengths_shared_by_two_processes_merge_into_the_results_of_one(finetune_data, tmp_path, monkeypatch):
    """With several processes dga-eval runs RULER at each process's share of the lengths, and every round of
    cells is gathered (harness.ruler_cells); here the second process runs first, in this process, and its
    hand-ins are replayed to the first. Each (configuration, length) costs an lm-eval run of ~2 s here."""
    lm_eval_tasks = pytest.importorskip("lm_eval.tasks", reason="lm-eval is not installed (pip install dga-hf[eval])")
    import functools

    from tqdm import tqdm

    from dga_eval import harness
    from dga_eval.cells import CellKey
    from dga_eval.models import load_model
    from dga_eval.runconfig import Setting

    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_lengths.yaml").write_text(LENGTH_TASK)
    (tmp_path / "tasks" / "tiny_lengths_data.py").write_text(LENGTH_DATA)
    # only this task folder: indexing lm-eval's thousands of tasks would take 15 s
    monkeypatch.setattr(lm_eval_tasks, "TaskManager", functools.partial(
        lm_eval_tasks.TaskManager, include_defaults=False, include_path=str(tmp_path / "tasks")))
    model, tokenizer = load_model(str(finetune_data["model"]))
    configs = {"paper": Setting(PAPER)}
    spec = {"tasks": ["tiny_lengths"]}
    pending = [CellKey("ruler", length, "paper") for length in (64, 96, 128)]  # shares of 2 and 1 length

    def cells(processes, folder: str) -> dict:
        return dict(harness.ruler_cells(model, tokenizer, configs, spec, pending, 0, tmp_path / folder, processes,
                                        tqdm(disable=True)))

    one = cells(harness.Processes(), "one")
    second = ReplayedPartner(rank=1)
    cells(second, "process1")
    first = ReplayedPartner(rank=0, partner=tuple(second.handed_in))
    merged = cells(first, "process0")
    # the same number of collective calls, the second process's last one with nothing to hand in
    assert [item[0] for item in first.handed_in] == [pending[0], pending[2]]
    assert [item and item[0] for item in second.handed_in] == [pending[1], None]

    def answers(table):  # everything but the timings
        return {key: (cell["metrics"], cell["errors"], cell["details"]["tiny_lengths"]["answers"]) for key, cell in table.items()}

    assert answers(merged) == answers(one)
    assert list(merged) == pending and not one[pending[1]]["errors"]
    assert one[pending[1]]["details"]["tiny_lengths"]["attention"] == "dga"


# ------------------------------------------------------------------------------------------------ hf-dga (lm-eval)

CHOICE_TASK = """
task: tiny_choice
dataset_path: ""
dataset_name: ""
output_type: multiple_choice
test_split: test
custom_dataset: !function tiny_choice_data.dataset
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata: {version: 1.0}
"""
CHOICE_DATA = '''
import datasets

def dataset(**kwargs):  # 7 documents: the processes get 4 and 3
    docs = [{"context": f"the key is {i} and again the key is", "choices": [f" {i}", f" {i + 1}", " x"], "label": 0}
            for i in range(7)]
    return {"test": datasets.Dataset.from_list(docs)}
'''


@pytest.fixture(scope="module")
def lm_eval_runs(finetune_data) -> dict:
    """A multiple-choice task of 7 documents through hf-dga: two processes (docs/evaluation.md's command) and one
    (lm_eval.simple_evaluate in this process)."""
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install dga-hf[eval])")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("hf-dga on several CPU processes needs transformers >= 5 (lm-eval's device_map 'cpu:<rank>' is "
                    "refused by 4.x; hf-dga says so with a clear error)")
    import lm_eval
    from lm_eval.tasks import TaskManager

    import dga_eval.lm_eval_model  # noqa: F401 - registers hf-dga

    root = finetune_data["root"]
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "tiny_choice.yaml").write_text(CHOICE_TASK)
    (tasks / "tiny_choice_data.py").write_text(CHOICE_DATA)
    model_args = f"pretrained={finetune_data['model']},dga=paper"
    out = root / "lm-eval-two"
    two = expect_success(launch(*TWO_PROCESSES, "-m", "dga_eval.lm_eval_model", "run", "--model", "hf-dga", "--model_args",
                                model_args, "--tasks", "tiny_choice", "--include_path", str(tasks), "--device", "cpu",
                                "--batch_size", "1", "--output_path", str(out), "--log_samples"))
    one = lm_eval.simple_evaluate(model="hf-dga", model_args=model_args, tasks=["tiny_choice"], device="cpu", batch_size=1,
                                  task_manager=TaskManager(include_path=str(tasks), include_defaults=False), log_samples=True)
    return {"two": two, "one": one, "out": out}


def test_hf_dga_on_two_processes_scores_like_one(lm_eval_runs):
    written = sorted(p.name.split("_")[0] for p in lm_eval_runs["out"].rglob("*.json*"))
    assert written == ["results", "samples"]  # written once
    results = json.loads(next(lm_eval_runs["out"].rglob("results_*.json")).read_text())
    samples = [json.loads(line) for line in next(lm_eval_runs["out"].rglob("samples_*.jsonl")).read_text().splitlines()]
    one = lm_eval_runs["one"]
    assert results["results"]["tiny_choice"]["acc,none"] == one["results"]["tiny_choice"]["acc,none"]
    assert results["results"]["tiny_choice"]["sample_len"] == 7
    # every document's log-likelihoods, as lm-eval writes them (strings)
    expected = {s["doc_id"]: [[str(v) for v in resp] for resp in s["filtered_resps"]] for s in one["samples"]["tiny_choice"]}
    assert {s["doc_id"]: s["filtered_resps"] for s in samples} == expected
    assert len(expected) == 7


def test_hf_dga_processes_each_load_the_model_once(lm_eval_runs):
    stderr = lm_eval_runs["two"].stderr
    for process in (1, 2):
        assert stderr.count(f"hf-dga [process {process} of 2]: model loaded and patched") == 1, stderr[-3000:]
    # each built its own share of the requests (lm-eval's hf gives every CPU process all of them)
    assert "Building contexts for tiny_choice on rank 1" in stderr


# ------------------------------------------------------------------------------------------------ device maps


def every_module(layer_device: str = "cpu") -> dict[str, str]:
    """A device map of the tiny Llama that names every module: all on the CPU, the last decoder layer on
    `layer_device` ("disk": offloaded, behind accelerate's hooks, as a layer on another GPU would be)."""
    names = ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "model.rotary_emb", "lm_head"]
    return {**dict.fromkeys(names, "cpu"), "model.layers.1": layer_device}


def execution_device(layer: torch.nn.Module) -> torch.device:
    """Where a layer computes: its hook's device when accelerate dispatched it, else its parameters'."""
    hook = getattr(layer, "_hf_hook", None)
    if hook is not None and getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    return next(layer.parameters()).device


@pytest.mark.parametrize("layer_device", ["cpu", "disk"])
def test_a_device_map_runs_dga_like_the_plain_model_with_each_layer_state_on_its_device(finetune_data, tmp_path, layer_device):
    sparse = PAPER.replace(backend="torch")
    mapped = AutoModelForCausalLM.from_pretrained(finetune_data["model"], device_map=every_module(layer_device),
                                                  attn_implementation="dga", offload_folder=str(tmp_path)).eval()
    plain = AutoModelForCausalLM.from_pretrained(finetune_data["model"], attn_implementation="dga").eval()
    if layer_device == "disk":  # the offloaded layer's weights are loaded for each forward
        assert hasattr(mapped.model.layers[1], "_hf_hook") and mapped.model.layers[1].self_attn.q_proj.weight.device.type == "meta"
    ids = torch.randint(2, 90, (1, 200))
    with torch.no_grad():
        for model in (mapped, plain):
            dga_hf.patch(model, sparse)
            dga_hf.enable_decoding(model, mode="compact")
        torch.testing.assert_close(mapped(ids).logits, plain(ids).logits, rtol=0, atol=1e-6)
        tokens = {name: model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
                  for name, model in (("mapped", mapped), ("plain", plain))}
        assert torch.equal(tokens["mapped"], tokens["plain"])
        cache = dga_hf.decoding.cache_for(mapped)
        mapped(ids, use_cache=True, **{dga_hf.decoding.cache_keyword(mapped): cache})
    for index, layer in enumerate(mapped.model.layers):
        tensors = cache.layers[index].state.tensors()
        assert tensors and {tensor.device for tensor in tensors} == {execution_device(layer)}, index


def test_dga_eval_with_a_device_map_evaluates_like_without(eval_runs, finetune_data, tmp_path):
    from dga_eval import cli

    run = {**EVAL_RUN, "tasks": {task: EVAL_RUN["tasks"][task] for task in ("copy", "perplexity")}}
    (tmp_path / "run.json").write_text(json.dumps(run))
    (tmp_path / "map.json").write_text(json.dumps(every_module()))
    results = cli.run(cli.parse_args(["--config", str(tmp_path / "run.json"), "--model", str(finetune_data["model"]),
                                      "--device-map", str(tmp_path / "map.json"), "--threads", "1", "--out", str(tmp_path / "out")]))
    assert results["settings"]["device_map"] == every_module()
    expected = eval_runs["results"]["one"]["tasks"]
    for task in ("copy", "perplexity"):
        for config, cells in results["tasks"][task]["results"].items():
            for length, cell in cells.items():
                assert cell["details"] == expected[task]["results"][config][length]["details"], (task, config, length)
    with pytest.raises(SystemExit):
        cli.parse_args(["--quick", "--device-map", '{"model.layers.0": ["cpu"]}'])
