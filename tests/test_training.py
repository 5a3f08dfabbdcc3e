"""dga-finetune (dga_hf.training) on tiny random models with a character tokenizer built here.

- a few steps on repeated text lower the held-out loss, and training really runs the DGA path;
- the checkpoint restores the DGA settings through from_pretrained(..., attn_implementation="dga") and
  gives the trained model's logits; the dense control saves a plain model;
- gradient checkpointing gives the same training as without it;
- validation errors name the field; the CLI runs end to end; datasets input; the data pipeline.
"""

from __future__ import annotations

import contextlib
import json
import re
from importlib import resources

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import dga_hf
from dga_hf import DGAConfig, integration
from dga_hf import training
from dga_hf.training import FinetuneConfig, finetune
from helpers import char_tokenizer, repeated_text, save_char_model

PAPER = DGAConfig.preset("paper")
CONTEXT = 96  # > 4 blocks of 16: the paper preset keeps ~10 focal tokens, 1 local block and aggregates


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    (root / "train.txt").write_text(repeated_text())
    return {"root": root, "model": save_char_model(root / "tiny"), "train": root / "train.txt"}


def run(data, out: str, **fields):
    base = dict(
        model=str(data["model"]), output_dir=str(data["root"] / out), train_files=[str(data["train"])],
        context_length=CONTEXT, learning_rate=3e-3, warmup_steps=1, threads=1, seed=0,
    )
    return finetune(**{**base, **fields})


@contextlib.contextmanager
def dga_calls():
    """Records, for every call of the DGA operator from the attention backend, whether it tracks gradients."""
    calls: list[bool] = []
    original = integration.dga_attention

    def counting(query, *args, **kwargs):
        calls.append(torch.is_grad_enabled() and query.requires_grad)
        return original(query, *args, **kwargs)

    integration.dga_attention = counting
    try:
        yield calls
    finally:
        integration.dga_attention = original


@pytest.fixture(scope="module")
def paper_run(data):
    """12 steps with the paper preset, held-out text = the training text; counts DGA calls in training."""
    with dga_calls() as calls:
        result = run(data, "paper", dga="paper", max_steps=12, eval_files=[str(data["train"])], eval_every=6, max_eval_windows=4)
    return result, calls


@pytest.fixture(scope="module")
def dense_run(data):
    return run(data, "dense", dga="none", max_steps=2)


# ------------------------------------------------------------------------------------------------ training


def test_loss_goes_down_and_log_is_written(paper_run):
    result, _ = paper_run
    evaluations = result.log["evaluations"]
    assert [e["step"] for e in evaluations] == [0, 6, 12]
    first, last = evaluations[0]["eval_loss"], evaluations[-1]["eval_loss"]
    assert last < 0.85 * first, evaluations
    assert evaluations[-1]["eval_perplexity"] == pytest.approx(torch.tensor(last).exp().item(), rel=1e-4)
    losses = [entry["loss"] for entry in result.log["losses"]]
    assert len(losses) == 12 and losses[-1] < 0.85 * losses[0]
    log = json.loads((result.output_dir / "training_log.json").read_text())
    assert log["dga"] == PAPER.to_dict() and log["settings"]["max_steps"] == 12
    assert log["eval_data"]["windows"] == 4 and log["train_data"]["windows"] == len(repeated_text()) // CONTEXT
    assert log["wall_seconds"] > 0 and log["train_seconds"] > 0


def test_training_runs_the_dga_path(paper_run, dense_run):
    _, calls = paper_run
    # 12 steps x 2 layers with gradients; the evaluations (3 x 4 windows x 2 layers) without
    assert calls.count(True) == 24 and calls.count(False) == 24, (calls.count(True), calls.count(False))
    # the first logged loss is the first batch under the initial weights: same batch, same weights
    dga_loss, dense_loss = paper_run[0].log["losses"][0]["loss"], dense_run.log["losses"][0]["loss"]
    assert abs(dga_loss - dense_loss) > 1e-3, (dga_loss, dense_loss)


def test_checkpoint_restores_dga_settings_and_logits(paper_run):
    result, _ = paper_run
    saved = json.loads((result.output_dir / "config.json").read_text())
    assert saved["dga"] == PAPER.to_dict()
    loaded = AutoModelForCausalLM.from_pretrained(result.output_dir, attn_implementation="dga").eval()
    assert dga_hf.is_patched(loaded) and integration.config_of(loaded) == PAPER
    assert loaded.config.use_cache is True  # training turned the cache off; the checkpoint has it back
    ids = torch.randint(2, len(result.tokenizer), (2, 2 * CONTEXT))
    with torch.no_grad():
        expected = result.model(ids, use_cache=False).logits
        got = loaded(ids, use_cache=False).logits
        plain = AutoModelForCausalLM.from_pretrained(result.output_dir)(ids, use_cache=False).logits  # sdpa
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (plain - expected).abs().max() > 1e-3  # the DGA settings matter at this length
    assert AutoTokenizer.from_pretrained(result.output_dir)("ab")["input_ids"] == result.tokenizer("ab")["input_ids"]


def test_dense_control_saves_a_plain_model(data, tmp_path):
    # start from a checkpoint that carries DGA settings: the dense control removes them
    source = save_char_model(tmp_path / "patched", dga=PAPER)
    result = run(data, "dense_from_patched", model=str(source), dga="none", max_steps=1)
    saved = json.loads((result.output_dir / "config.json").read_text())
    assert "dga" not in saved and result.log["dga"] is None
    assert not dga_hf.is_patched(result.model)
    loaded = AutoModelForCausalLM.from_pretrained(result.output_dir).eval()
    ids = torch.randint(2, 90, (1, 2 * CONTEXT))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, result.model(ids).logits, rtol=0, atol=1e-5)


def test_gradient_checkpointing_trains_the_same(data):
    common = dict(dga=PAPER.replace(backend="torch"), max_steps=2, warmup_steps=0)
    with dga_calls() as plain_calls:
        plain = run(data, "gc_off", **common)
    with dga_calls() as checkpointed_calls:
        checkpointed = run(data, "gc_on", gradient_checkpointing=True, **common)
    # 2 layers x 2 steps; checkpointing runs each layer's forward again in the backward pass
    assert len(plain_calls) == 4 and len(checkpointed_calls) == 8 and all(plain_calls)
    assert [e["loss"] for e in checkpointed.log["losses"]] == pytest.approx([e["loss"] for e in plain.log["losses"]], rel=1e-5)
    for (name, a), (_, b) in zip(plain.model.named_parameters(), checkpointed.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    model = checkpointed.model  # checkpointing is switched off before saving (5.x renamed the property)
    flag = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else "is_gradient_checkpointing"
    assert not getattr(model, flag)


def test_freeze_embeddings_and_qwen2(tmp_path):
    model = save_char_model(tmp_path / "qwen2", arch="qwen2")
    (tmp_path / "train.txt").write_text(repeated_text(1))
    before = AutoModelForCausalLM.from_pretrained(model).get_input_embeddings().weight.detach().clone()
    result = finetune(
        model=str(model), output_dir=str(tmp_path / "out"), train_files=[str(tmp_path / "train.txt")], dga="paper",
        context_length=CONTEXT, max_steps=2, learning_rate=1e-2, warmup_steps=0, freeze_embeddings=True, threads=1,
    )
    after = result.model.get_input_embeddings().weight
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert result.log["trainable_parameters"] == result.log["parameters"] - before.numel()
    assert any((a - b).abs().max() > 0 for a, b in zip(
        AutoModelForCausalLM.from_pretrained(model).model.layers[0].parameters(), result.model.model.layers[0].parameters()
    ))


# ------------------------------------------------------------------------------------------------ settings


def test_validation_errors_name_the_field(data):
    good = dict(model=str(data["model"]), output_dir="out", train_files=[str(data["train"])])
    FinetuneConfig(**good)
    cases = {
        "context_length": 1,
        "max_steps": 0,
        "learning_rate": 0.0,
        "warmup_steps": -1,
        "weight_decay": -0.1,
        "batch_size": 1.5,
        "gradient_accumulation": 0,
        "eval_every": -2,
        "max_eval_windows": 0,
        "threads": 0,
        "seed": -1,
        "bf16": "maybe",
        "lr_scheduler": "exotic",
        "gradient_checkpointing": "yes",
        "dga": "no-such-preset",
    }
    for name, value in cases.items():
        with pytest.raises(ValueError, match=re.escape(f"FinetuneConfig.{name}={value!r} is invalid: allowed")):
            FinetuneConfig(**{**good, name: value})
    with pytest.raises(ValueError, match=r"FinetuneConfig\.train_files: '/no/such/file.txt' does not exist"):
        FinetuneConfig(**{**good, "train_files": ["/no/such/file.txt"]})
    with pytest.raises(ValueError, match=r"FinetuneConfig\.train_files=\(\) is invalid"):
        FinetuneConfig(model="m", output_dir="out")
    assert FinetuneConfig(**good, bf16="no").bf16 is False and FinetuneConfig(**good).bf16 == "auto"
    assert training.use_bf16("auto") == bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def test_dga_settings_from_preset_file_or_none(tmp_path):
    assert training.resolve_dga("none") is None and training.resolve_dga(None) is None
    assert training.resolve_dga("paper") == PAPER
    preset_file = tmp_path / "preset.json"
    preset_file.write_text(json.dumps({"description": "x", "dga": PAPER.replace(local_blocks=4).to_dict()}))
    assert training.resolve_dga(str(preset_file)) == PAPER.replace(local_blocks=4)
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"group_size": 8, "focal_ratio": 0.2}))
    assert training.resolve_dga(str(bare)) == DGAConfig(group_size=8, focal_ratio=0.2)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"dga": {"group_size": 0}}))
    with pytest.raises(ValueError, match=r"DGAConfig\.group_size=0 is invalid"):
        training.resolve_dga(str(bad))


def test_data_pipeline(tmp_path):
    tokenizer = char_tokenizer()
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("bb")
    (folder / "sub" / "a.txt").write_text("aaa")
    (folder / "skip.md").write_text("not text")
    assert [p.name for p in training.text_files([str(folder)])] == ["b.txt", "a.txt"]
    ids = training.token_stream(tokenizer, training.read_texts([str(folder)]))
    b, a, eos = tokenizer.convert_tokens_to_ids(["b", "a", "<eos>"])
    assert ids == [b, b, eos, a, a, a]  # EOS between documents, none after the last
    rows = training.windows(ids, 4)
    assert rows.tolist() == [[b, b, eos, a]]  # non-overlapping, the short tail dropped
    assert training.spaced(torch.arange(10)[:, None], 3).flatten().tolist() == [0, 4, 9]
    example = training.WindowDataset(rows)[0]
    assert torch.equal(example["input_ids"], example["labels"])


def test_datasets_input(data, tmp_path):
    datasets = pytest.importorskip("datasets")
    text = repeated_text(2, copies=3)
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"body": [text, text[::-1]]}),
        "validation": datasets.Dataset.from_dict({"body": [text]}),
    }).save_to_disk(str(tmp_path / "ds"))
    result = run(data, "from_datasets", train_files=[], train_dataset=str(tmp_path / "ds"), eval_dataset=str(tmp_path / "ds"),
                 text_column="body", dga="paper", max_steps=1)
    assert result.log["train_data"]["documents"] == 2 and result.log["eval_data"]["documents"] == 1
    assert result.log["final_eval"]["eval_loss"] > 0
    with pytest.raises(ValueError, match="no column 'text'"):
        training.dataset_texts(str(tmp_path / "ds"), None, "train", "text")


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_end_to_end(data, tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "one.txt").write_text(repeated_text(3, copies=2))
    (docs / "two.txt").write_text(repeated_text(4, copies=2))
    (tmp_path / "heldout.txt").write_text(repeated_text(5, copies=2))
    out = tmp_path / "out"
    training.main([
        "--model", str(data["model"]), "--dga", "paper", "--train", str(docs), "--eval", str(tmp_path / "heldout.txt"),
        "--context-length", str(CONTEXT), "--max-steps", "2", "--lr", "1e-3", "--warmup-steps", "1", "--batch-size", "2",
        "--grad-accum", "2", "--eval-every", "1", "--eval-windows", "2", "--no-eval-at-start", "--bf16", "no",
        "--weight-decay", "0.01", "--seed", "3", "--threads", "1", "--out", str(out),
    ])
    printed = capsys.readouterr().out
    assert "held-out loss" in printed and str(out) in printed
    log = json.loads((out / "training_log.json").read_text())
    assert log["command"].startswith("dga-finetune --model") and log["settings"]["gradient_accumulation"] == 2
    assert [e["step"] for e in log["evaluations"]] == [1, 2] and log["tokens_per_step"] == 4 * CONTEXT
    assert log["train_data"]["documents"] == 2 and log["bf16"] is False
    assert json.loads((out / "config.json").read_text())["dga"] == PAPER.to_dict()
    assert (out / "tokenizer.json").exists() and not (out / "training_args.bin").exists()
    with pytest.raises(SystemExit):
        training.main(["--model", str(data["model"]), "--train", str(docs), "--out", str(out), "--context-length", "0"])
    assert "FinetuneConfig.context_length=0 is invalid" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ demo driver


def test_demo_split_holds_out_whole_topic_groups():
    from pydoc_data.topics import topics

    from dga_eval import finetune_demo

    train, held_out = finetune_demo.split_topics(0.1, seed=0)
    assert (train, held_out) == finetune_demo.split_topics(0.1, seed=0)  # deterministic
    assert not set(train) & set(held_out) and sorted(train + held_out) == sorted(topics)
    share = sum(len(topics[k]) for k in held_out) / sum(len(t) for t in topics.values())
    assert 0.05 < share <= 0.1
    assert finetune_demo.shared_lines(train, held_out) == 0
    # "customization" is a section of "specialnames": both on one side
    assert ("customization" in held_out) == ("specialnames" in held_out)
    assert finetune_demo.shared_lines(["specialnames"], ["customization"]) > 0


def test_demo_gap_and_report(tmp_path):
    from dga_eval import finetune_demo

    values = {"dense": 10.0, "dga_free": 30.0, "dense_finetuned": 8.0, "dga_finetuned": 19.0}
    measurements = {k: {"perplexity": v, "perplexity_all_tokens": v, "seconds": 1.0, "progress": "x"} for k, v in values.items()}
    assert finetune_demo.gap_closed(measurements) == pytest.approx(0.5)
    spec = finetune_demo.load_spec(str(resources.files("dga_eval.configs").joinpath("finetune_demo.json")))
    results = {
        "settings": {"model": "m", "date": "d", "torch_threads": 1, "command": "c", "versions": {}, "dga": PAPER.to_dict(),
                     "keys_share": 0.2, "spec": spec},
        "data": {}, "measurements": {"dense": measurements["dense"]}, "training": {}, "phase_seconds": {},
    }
    report = finetune_demo.markdown_report(results)  # a partial run (only dense measured) renders
    assert "(a) dense, no training | 10.000" in report and "(d) DGA, fine-tuned | —" in report
    (tmp_path / "typo.json").write_text(json.dumps({"max_step": 3}))
    with pytest.raises(ValueError, match=r"unknown settings \['max_step'\]"):
        finetune_demo.load_spec(str(tmp_path / "typo.json"))
