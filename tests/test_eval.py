"""The evaluation harness (dga_eval): task generators, metrics, the report end to end, RULER and `hf-dga`.

Self-contained: a word-level tokenizer trained here on the offline corpus and a tiny random Llama, so
nothing depends on the converted default model or on the network.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dga_eval import copying, passkey, perplexity
from dga_eval.corpus import corpus_tokens, pydoc_text
from dga_eval.report import _setting_text, markdown_report
from dga_eval.runconfig import DENSE, Setting, check_run_config, dga_configs, named_dga_config, parse_dga_fields

import dga_hf


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    # digits one by one, like the real model's tokenizer: any 5-digit pass key is encodable
    raw.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    trainer = trainers.WordLevelTrainer(vocab_size=3000, special_tokens=["[UNK]", "[PAD]", "[EOS]"])
    raw.train_from_iterator([pydoc_text(), " ".join("0123456789")], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


@pytest.fixture(scope="module")
def corpus(tokenizer):
    return corpus_tokens(tokenizer)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from dga_eval.models import load_model

    return load_model(str(tiny_model_dir))


# ---------------------------------------------------------------- task generators


def test_passkey_samples_are_deterministic_and_hide_the_key_at_the_depth(tokenizer, corpus):
    spec = {"depths": [0.1, 0.5, 0.9], "samples_per_depth": 2, "max_new_tokens": 8}
    first = passkey.make_samples(tokenizer, corpus, 1024, spec, random.Random("s"))
    again = passkey.make_samples(tokenizer, corpus, 1024, spec, random.Random("s"))
    other = passkey.make_samples(tokenizer, corpus, 1024, spec, random.Random("t"))
    assert first == again and first != other
    intro = len(tokenizer(passkey.INTRO)["input_ids"])
    for sample in first:
        needle = passkey.encode(tokenizer, passkey.NEEDLE.format(key=sample.key))
        assert len(sample.prompt) == 1024 - 8  # prompt + generated tokens = the context length
        assert sample.prompt[sample.needle_start : sample.needle_start + len(needle)] == needle
        filler = len(sample.prompt) - len(needle) - intro - len(passkey.encode(tokenizer, passkey.QUESTION))
        assert abs((sample.needle_start - intro) / filler - sample.depth) <= 1 / filler
        assert abs(sample.needle_start / len(sample.prompt) - sample.depth) < 0.05
        assert " ".join(sample.key) in tokenizer.decode(sample.prompt) and len(sample.key) == 5
    assert [s.depth for s in first] == [0.1, 0.1, 0.5, 0.5, 0.9, 0.9]


def test_copy_samples_repeat_the_passage_at_the_end(tokenizer, corpus):
    spec = {"samples": 3, "passage_tokens": 24, "lead_tokens": 8}
    samples = copying.make_samples(tokenizer, corpus, 300, spec, random.Random(1))
    assert samples == copying.make_samples(tokenizer, corpus, 300, spec, random.Random(1))
    for sample in samples:
        assert len(sample.ids) == 300 and len(sample.passage) == 24
        assert sample.ids[-24:] == sample.passage == sample.ids[sample.first_start : sample.first_start + 24]
        assert sample.first_start == 8
    assert samples[0].passage != samples[1].passage


def test_copy_through_decoding_steps_scores_the_decoding_cache(tiny_model, tokenizer, corpus, monkeypatch):
    """Dense decoding steps give the one-pass prefill's score; with DGA decoding enabled every token after
    the prompt goes through the model's DGACache."""
    model, _ = tiny_model
    sample = copying.make_samples(tokenizer, corpus, 200, {"samples": 1, "passage_tokens": 24, "lead_tokens": 4},
                                  random.Random(2))[0]
    assert copying.second_copy_accuracy_by_decoding(model, sample) == copying.second_copy_accuracy(model, sample)
    caches = []
    monkeypatch.setattr(copying, "cache_for", lambda m: caches.append(dga_hf.decoding.cache_for(m)) or caches[-1])
    dga_hf.patch(model, dga_hf.DGAConfig(group_size=8, focal_ratio=0.05, local_blocks=1, min_seq_len=0, backend="torch"))
    dga_hf.enable_decoding(model, mode="compact")
    try:
        accuracy = copying.run(model, tokenizer, [sample], {"through": "decoding"})[0]["accuracy"]
    finally:
        dga_hf.disable_decoding(model)
        dga_hf.unpatch(model)
    assert 0.0 <= accuracy <= 1.0
    assert len(caches) == 1 and isinstance(caches[0], dga_hf.DGACache)
    assert caches[0].get_seq_length() == len(sample.ids) - 1  # the prompt, then one step per scored token
    with pytest.raises(ValueError, match="through='decode' is invalid"):
        copying.run(model, tokenizer, [sample], {"through": "decode"})


# ---------------------------------------------------------------- metrics


@pytest.mark.parametrize(
    ("answer", "key", "expected"),
    [(" 12345.", "12345", True), ("12345 is the key", "12345", True), (" 1234", "12345", False),
     (" 123456", "12345", False), (" the key", "12345", False), (" 54321 12345", "12345", False)],
)
def test_passkey_exact_match(answer, key, expected):
    assert passkey.exact_match(answer, key) is expected


def test_token_accuracy():
    assert copying.token_accuracy(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 0, 4])) == 0.75
    assert copying.token_accuracy(torch.tensor([5]), torch.tensor([5])) == 1.0


class KnownDistribution(torch.nn.Module):
    """A stand-in model: probability `p_true` on the actual next token, the rest spread evenly, so the
    perplexity is known in closed form. Perplexity runs a model's decoder once and its lm head on chunks
    of positions: here the decoder gives the log-probabilities and the head is the identity."""

    def __init__(self, vocab: int, p_true: float | None):
        super().__init__()
        self.vocab, self.p_true = vocab, p_true
        self.device = torch.device("cpu")
        self.config = SimpleNamespace(model_type="known-distribution")

    def get_decoder(self):
        return self.log_probabilities

    def get_output_embeddings(self):
        return torch.nn.Identity()

    def log_probabilities(self, input_ids, **kwargs):
        ids = input_ids
        length = ids.shape[1]
        probs = torch.full((1, length, self.vocab), 1.0 / self.vocab)
        if self.p_true is not None:
            probs[:] = (1 - self.p_true) / (self.vocab - 1)
            probs[0, torch.arange(length - 1), ids[0, 1:]] = self.p_true
        return SimpleNamespace(last_hidden_state=probs.log())

    def forward(self, input_ids, logits_to_keep=0, **kwargs):
        logits = self.log_probabilities(input_ids).last_hidden_state
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


def test_perplexity_of_known_distributions():
    windows = [torch.randint(0, 50, (64,)), torch.randint(0, 50, (33,))]
    assert perplexity.perplexity(KnownDistribution(50, None), windows) == pytest.approx(50, rel=1e-5)
    assert perplexity.perplexity(KnownDistribution(50, 0.5), windows) == pytest.approx(2, rel=1e-5)
    metrics, details = perplexity.run(KnownDistribution(50, 0.25), None, windows, {})
    assert metrics["perplexity"] == pytest.approx(4, rel=1e-5)
    assert [d["tokens"] for d in details] == [32, 17]


def test_second_half_nll_equals_the_full_logits_computation(tiny_model):
    model, _ = tiny_model
    for length in (64, 65):
        window = torch.randint(0, model.config.vocab_size, (length,), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            logits = model(window.view(1, -1)).logits[0].float()
        half = length // 2
        full = torch.nn.functional.cross_entropy(logits[half - 1 : -1], window[half:], reduction="sum")
        nll, count = perplexity.second_half_nll(model, window)
        assert count == length - half and nll == pytest.approx(float(full), rel=1e-6)


def test_second_copy_accuracy_of_a_model_that_copies():
    sample = copying.CopySample(ids=[1, 2, 3, 9, 9, 1, 2, 3], passage=[1, 2, 3], first_start=0)
    assert copying.second_copy_accuracy(KnownDistribution(10, 0.9), sample) == 1.0


# ---------------------------------------------------------------- configurations


def test_dga_settings_from_strings_and_run_configs():
    assert parse_dga_fields({"group_size": "8", "focal_ratio": "0.2", "dense_layers": "0;2", "group_bias": "log_size"}) == {
        "group_size": 8, "focal_ratio": 0.2, "dense_layers": (0, 2), "group_bias": "log_size"}
    assert parse_dga_fields({"dense_layers": 3, "local_blocks": 4}) == {"dense_layers": (3,), "local_blocks": 4}
    with pytest.raises(ValueError, match="unknown DGA settings"):
        parse_dga_fields({"groupsize": 8})
    assert named_dga_config("paper") == ("paper", dga_hf.DGAConfig.preset("paper"))
    name, config = named_dga_config({"name": "n=8", "preset": "default", "local_blocks": 8})
    assert name == "n=8" and config == dga_hf.DGAConfig.preset("default").replace(local_blocks=8)
    assert named_dga_config({"group_size": 4}, 3) == ("dga3", dga_hf.DGAConfig(group_size=4))
    assert list(dga_configs({"dga_configs": ["default", "paper"]})) == [DENSE, "default", "paper"]
    settings = dga_configs({"dga_configs": ["paper", {"name": "c", "preset": "paper", "decoding": "compact"},
                                            {"name": "e", "preset": "paper", "expand_blocks": 32,
                                             "decoding": {"refresh_every": 18}}]})
    paper = dga_hf.DGAConfig.preset("paper")
    assert settings[DENSE] == Setting() and settings["paper"] == Setting(paper)
    assert settings["c"] == Setting(paper, dga_hf.DecodingConfig(mode="compact"))
    assert settings["e"].dga == paper.replace(expand_blocks=32)
    assert settings["e"].describe()["decoding"] == {"mode": "keep_full", "refresh_every": 18, "dense_share": "auto"}
    assert settings["paper"].describe()["decoding"] == "dense"
    assert _setting_text(settings["e"].describe()["decoding"]) == "keep_full(refresh_every=18)"
    assert _setting_text(settings["c"].describe()["decoding"]) == "compact"
    with pytest.raises(ValueError, match=r"decoding='full' is invalid: allowed values are 'dense', a DGACache mode"):
        dga_configs({"dga_configs": [{"preset": "paper", "decoding": "full"}]})
    with pytest.raises(ValueError, match=r"decoding=\{'expand': 3\} is invalid: .*unknown fields \['expand'\]"):
        dga_configs({"dga_configs": [{"preset": "paper", "decoding": {"expand": 3}}]})
    with pytest.raises(ValueError, match="needs DGA settings"):
        Setting(None, dga_hf.DecodingConfig())
    with pytest.raises(ValueError, match=r"decoding=\{'expand_blocks': 32\} is invalid: .*moved to DGAConfig.expand_blocks"):
        dga_configs({"dga_configs": [{"preset": "paper", "decoding": {"expand_blocks": 32}}]})
    with pytest.raises(ValueError, match=r"mode='compact' cannot decode with DGAConfig.expand_blocks=4"):
        dga_configs({"dga_configs": [{"preset": "paper", "expand_blocks": 4, "decoding": "compact"}]})
    with pytest.raises(ValueError, match="unknown tasks"):
        check_run_config({"lengths": [8], "tasks": {"passkeys": {}}})


def test_decoding_tool_takes_dga_fields_and_refuses_the_moved_option(monkeypatch, tiny_model_dir, capsys):
    """`python -m dga_eval.decoding`: --dga sets DGA fields over the preset (block expansion among them; the
    memory run then leaves compact out, which cannot expand); bad fields and expand_blocks as a decoding
    option fail before any model loads."""
    from dga_eval import decoding

    with monkeypatch.context() as patched:
        patched.setattr(decoding, "load_model", lambda *args: pytest.fail("a model was loaded"))
        with pytest.raises(ValueError, match=r"DGAConfig got unknown fields \['expand'\]"):
            decoding.main(["--quality", "--dga", '{"expand": 3}'])
        with pytest.raises(ValueError, match=r"DecodingConfig.expand_blocks=4 is refused: the setting moved to DGAConfig"):
            decoding.main(["--quality", "--decoding", '{"expand_blocks": 4}'])
    decoding.main(["--memory-only", "--model", str(tiny_model_dir), "--length", "96", "--memory-steps", "2",
                   "--preset", "paper", "--dga", '{"group_size": 4, "local_blocks": 2, "expand_blocks": 3}'])
    report = json.loads(capsys.readouterr().out)
    assert report["settings"] == {**dga_hf.DGAConfig.preset("paper").to_dict(), "group_size": 4, "local_blocks": 2,
                                  "expand_blocks": 3}
    assert set(report["bytes_per_layer"]) == {"dense", "keep_full", "keep_full/dense"}


# ---------------------------------------------------------------- end to end


def test_quick_report_on_a_tiny_model(tmp_path, tiny_model_dir):
    from dga_eval.cli import main

    spec = {
        "seed": 3,
        "lengths": [128, 256],
        "dga_configs": ["paper", {"name": "tiny", "group_size": 8, "local_blocks": 2, "backend": "torch"},
                        {"name": "tiny+compact", "group_size": 8, "local_blocks": 2, "backend": "torch", "decoding": "compact"}],
        "tasks": {
            "passkey": {"depths": [0.5], "samples_per_depth": 1, "max_new_tokens": 6},
            "copy": {"samples": 1, "passage_tokens": 16, "lead_tokens": 4},
            "perplexity": {"windows": 2},
            "speed": {"new_tokens": 4, "repeats": 1},
        },
    }
    (tmp_path / "run.json").write_text(json.dumps(spec))
    out = tmp_path / "out"
    main(["--config", str(tmp_path / "run.json"), "--model", str(tiny_model_dir), "--out", str(out), "--device", "cpu"])
    for name in ("results.json", "report.md", "passkey_accuracy.png", "copy_accuracy.png", "perplexity.png", "latency.png", "memory.png"):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    assert list(results["configs"]) == [DENSE, "paper", "tiny", "tiny+compact"]
    assert results["configs"]["tiny"]["settings"]["group_size"] == 8
    assert results["configs"]["tiny+compact"]["settings"]["decoding"]["mode"] == "compact"
    assert results["settings"]["seed"] == 3 and results["settings"]["versions"]["torch"] == torch.__version__
    for task, metric in [("passkey", "accuracy"), ("copy", "accuracy"), ("perplexity", "perplexity"), ("speed", "ttft_ms")]:
        for config in (DENSE, "paper", "tiny", "tiny+compact"):
            for length in ("128", "256"):
                cell = results["tasks"][task]["results"][config][length]
                assert "error" not in cell, cell.get("error")
                assert math.isfinite(cell["metrics"][metric])
    # identical samples for every configuration: the same pass keys were asked
    keys = {c: [d["key"] for d in results["tasks"]["passkey"]["results"][c]["128"]["details"]] for c in (DENSE, "tiny")}
    assert keys[DENSE] == keys["tiny"]
    # decoding through a compact DGACache holds less KV than the dense DynamicCache (both caches reported)
    kv = {c: results["tasks"]["speed"]["results"][c]["256"]["metrics"]["kv_cache_mb"] for c in (DENSE, "tiny", "tiny+compact")}
    assert kv["tiny"] == kv[DENSE] and kv["tiny+compact"] < 0.8 * kv[DENSE], kv
    report = (out / "report.md").read_text()
    assert "## passkey" in report and "tiny − dense" in report and "paper ÷ dense" in report
    assert "decoding=compact |" in report and "decoding=dense |" in report
    # keys read are measured on the perplexity windows (dense reads all; the tiny DGA setting far fewer at 256
    # tokens) and the configurations table shows those measurements, not the formula's estimate
    keys = {c: results["tasks"]["perplexity"]["results"][c]["256"]["metrics"]["keys_read"] for c in (DENSE, "tiny", "paper")}
    assert keys[DENSE] == 1.0 and 0 < keys["tiny"] < 0.8 and 0 < keys["paper"] < 0.8, keys
    tiny_row = next(line for line in report.splitlines() if line.startswith("| tiny | "))
    assert tiny_row.endswith(f" | {keys['tiny']:.1%} |") and "≈" not in tiny_row, tiny_row


def test_report_shows_errors_without_hiding_other_cells():
    task = {
        "spec": {}, "lengths": [8],
        "metrics": {"a": {"label": "A", "unit": "share", "higher_is_better": True, "compare": "diff"},
                    "b": {"label": "B", "unit": "share", "higher_is_better": True, "compare": "diff"}},
        "results": {DENSE: {"8": {"metrics": {"a": 0.5}, "errors": {"b": "Traceback\nConnectionError: offline"}}},
                    "x": {"8": {"error": "Traceback\nRuntimeError: out of memory"}}},
    }
    results = {"settings": {"model": "m", "date": "d", "device": "cpu", "dtype": "float32", "seed": 0, "command": "c",
                            "versions": {}, "lengths": [8]},
               "configs": {DENSE: None, "x": {"settings": {}, "keys_share": {"8": 0.5}}}, "tasks": {"t": task}}
    report = markdown_report(results)
    assert "| 8 | 50.0% | error | — |" in report
    assert "ConnectionError: offline" in report and "RuntimeError: out of memory" in report


# ---------------------------------------------------------------- resuming a stopped run (--resume)

RESUMED_RUN = {
    "seed": 2,
    "lengths": [128, 256],
    "dga_configs": [{"name": "tiny", "group_size": 8, "local_blocks": 2, "backend": "torch"}],
    "tasks": {  # 12 cells, run in this order: each task configuration by configuration, then length by length
        "passkey": {"depths": [0.3, 0.7], "samples_per_depth": 1, "max_new_tokens": 6},
        "copy": {"samples": 2, "passage_tokens": 16, "lead_tokens": 4},
        "perplexity": {"windows": 2},
    },
}


class SessionEnds(BaseException):
    """A run stopped from outside (the session ends, Ctrl-C): no Exception, so no cell records it as an error."""


def evaluate(folder: Path, model_dir: Path, spec: dict, out: Path, *options: str) -> dict:
    (folder / "run.json").write_text(json.dumps(spec))
    from dga_eval import cli

    return cli.run(cli.parse_args(["--config", str(folder / "run.json"), "--model", str(model_dir), "--out", str(out),
                                   "--device", "cpu", *options]))


def count_cells(patched: pytest.MonkeyPatch, module, function: str, stop_after: int | None = None) -> list[tuple]:
    """The calls of `module.function` from now on (the harness calls harness.run_share once per cell of a sample
    task, ruler.evaluate_task once per RULER task of a cell), the call after the first `stop_after` ending the
    run."""
    calls = []
    original = getattr(module, function)

    def counted(*args, **kwargs):
        if stop_after is not None and len(calls) == stop_after:
            raise SessionEnds
        calls.append(args)
        return original(*args, **kwargs)

    patched.setattr(module, function, counted)
    return calls


def without_timings(results: dict) -> dict:
    """Every cell of the results, less its timings (the only numbers two runs of the same cell do not share)."""
    def cell_of(cell: dict) -> dict:
        cell = {name: value for name, value in cell.items() if name != "seconds"}
        if isinstance(cell.get("details"), dict):  # RULER's, per lm-eval task
            cell["details"] = {task: {k: v for k, v in details.items() if k != "seconds"} for task, details in cell["details"].items()}
        return cell

    return {task: {config: {length: cell_of(cell) for length, cell in cells.items()} for config, cells in entry["results"].items()}
            for task, entry in results["tasks"].items()}


def stored_cells(out: Path) -> list[str]:
    return sorted(str(path.relative_to(out / "cells").with_suffix("")) for path in (out / "cells").glob("*/*/*.json"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir) -> dict:
    """RESUMED_RUN in one go."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    return {"results": evaluate(folder, tiny_model_dir, RESUMED_RUN, folder / "out"), "out": folder / "out"}


def test_a_stopped_run_resumes_with_the_missing_cells_only(tmp_path, tiny_model_dir, uninterrupted, capsys):
    from dga_eval import harness

    out = tmp_path / "out"
    with pytest.MonkeyPatch.context() as patched:
        computed = count_cells(patched, harness, "run_share", stop_after=5)
        with pytest.raises(SessionEnds):
            evaluate(tmp_path, tiny_model_dir, RESUMED_RUN, out)
    first = ["passkey/128/dense", "passkey/128/tiny", "passkey/256/dense", "passkey/256/tiny", "copy/128/dense"]
    assert len(computed) == 5 and stored_cells(out) == sorted(first)
    # the report of the cells so far is there, readable
    partial = json.loads((out / "results.json").read_text())
    assert sorted(f"{task}/{length}/{config}" for task, entry in partial["tasks"].items()
                  for config, cells in entry["results"].items() for length in cells) == sorted(first)
    assert "## copy" in (out / "report.md").read_text() and (out / "passkey_accuracy.png").stat().st_size > 0
    capsys.readouterr()

    with pytest.MonkeyPatch.context() as patched:
        computed = count_cells(patched, harness, "run_share")
        resumed = evaluate(tmp_path, tiny_model_dir, RESUMED_RUN, out, "--resume")
    assert len(computed) == 12 - 5 and len(stored_cells(out)) == 12
    assert without_timings(resumed) == without_timings(uninterrupted["results"])
    assert json.loads((out / "results.json").read_text())["tasks"] == json.loads(json.dumps(resumed["tasks"]))
    reused = {f"{task}/{length}/{config}": written for task, entry in resumed["tasks"].items()
              for config, cells in entry["reused"].items() for length, written in cells.items()}
    assert sorted(reused) == sorted(first)
    assert all(written == json.loads((out / "cells" / f"{key}.json").read_text())["written"] for key, written in reused.items())
    assert "Resumed (`--resume`): 5 of these 12 cells were computed by earlier sessions" in (out / "report.md").read_text()
    log = capsys.readouterr().err
    assert "running it again" not in log
    # one progress bar of all cells, from the reused ones on
    assert "| 5/12 [" in log and "| 12/12 [" in log and "| 4/12 [" not in log and "/7 [" not in log


def test_changed_settings_errors_and_broken_files_run_their_cells_again(tmp_path, tiny_model_dir, uninterrupted, capsys):
    from dga_eval import harness

    out = tmp_path / "out"
    shutil.copytree(uninterrupted["out"], out)
    written = {key: json.loads((out / "cells" / f"{key}.json").read_text())["written"] for key in stored_cells(out)}
    errored = out / "cells" / "copy" / "128" / "dense.json"
    record = json.loads(errored.read_text())
    errored.write_text(json.dumps({**record, "cell": {"error": "Traceback ...\nRuntimeError: out of memory"}}))
    (out / "cells" / "copy" / "256" / "dense.json").write_text('{"task": "copy", "len')  # written by another tool, cut short
    changed = {**RESUMED_RUN, "dga_configs": [{**RESUMED_RUN["dga_configs"][0], "local_blocks": 3}],
               "tasks": {**RESUMED_RUN["tasks"], "perplexity": {"windows": 1}}}
    with pytest.MonkeyPatch.context() as patched:
        computed = count_cells(patched, harness, "run_share")
        results = evaluate(tmp_path, tiny_model_dir, changed, out, "--resume")
    # reused: dense's passkey cells; run again: tiny's 6 (local_blocks), dense's perplexity (windows), copy (error, file)
    assert len(computed) == 10
    assert {task: entry["reused"] for task, entry in results["tasks"].items()} == {
        "passkey": {DENSE: {"128": written["passkey/128/dense"], "256": written["passkey/256/dense"]}, "tiny": {}},
        "copy": {DENSE: {}, "tiny": {}}, "perplexity": {DENSE: {}, "tiny": {}}}
    log = capsys.readouterr().err
    assert (f"cell perplexity/128/dense of {written['perplexity/128/dense']} was computed with other settings "
            f"(task_spec.windows: 2 -> 1): running it again") in log
    assert (f"cell perplexity/256/tiny of {written['perplexity/256/tiny']} was computed with other settings "
            f"(task_spec.windows: 2 -> 1, config.local_blocks: 2 -> 3): running it again") in log
    assert (f"cell passkey/256/tiny of {written['passkey/256/tiny']} was computed with other settings "
            f"(config.local_blocks: 2 -> 3): running it again") in log
    assert f"cell copy/128/dense of {written['copy/128/dense']} recorded an error (RuntimeError: out of memory): running it again" in log
    assert "cell copy/256/dense in " in log and "does not read" in log
    assert [len(results["tasks"]["perplexity"]["results"][config]["256"]["details"]) for config in (DENSE, "tiny")] == [1, 1]
    expected = without_timings(uninterrupted["results"])
    assert without_timings(results)["copy"][DENSE] == expected["copy"][DENSE]  # run again: the same numbers
    assert json.loads(errored.read_text())["fingerprint"]["task_spec"] == RESUMED_RUN["tasks"]["copy"]


def test_other_weights_under_the_same_path_run_every_cell_again(tmp_path, tiny_model_dir, uninterrupted, capsys):
    """The weights are in the fingerprint: a model saved again under the same path with one weight changed (as
    fine-tuning would) reuses no cell, and says why."""
    from transformers import AutoModelForCausalLM

    from dga_eval import harness

    out, model_dir = tmp_path / "out", tmp_path / "model"
    shutil.copytree(uninterrupted["out"], out)
    shutil.copytree(tiny_model_dir, model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] += 0.5
    model.save_pretrained(model_dir)
    for path in (out / "cells").glob("*/*/*.json"):  # as if the first run had read the model from model_dir
        record = json.loads(path.read_text())
        record["fingerprint"]["run"]["model"] = str(model_dir)
        path.write_text(json.dumps(record))
    before = json.loads((out / "cells" / "copy" / "128" / "dense.json").read_text())["fingerprint"]["run"]["weights"]
    with pytest.MonkeyPatch.context() as patched:
        computed = count_cells(patched, harness, "run_share")
        evaluate(tmp_path, model_dir, RESUMED_RUN, out, "--resume")
    assert len(computed) == 12
    after = json.loads((out / "cells" / "copy" / "128" / "dense.json").read_text())["fingerprint"]["run"]["weights"]
    assert before != after and len(after) == 16
    log = capsys.readouterr().err
    assert f'(run.weights: "{before}" -> "{after}"): running it again' in log and "run.model" not in log


def test_an_out_holding_cells_is_refused_without_resume(tmp_path, tiny_model_dir, uninterrupted, monkeypatch):
    from dga_eval import cli, harness

    out = tmp_path / "out"
    shutil.copytree(uninterrupted["out"], out)
    with monkeypatch.context() as patched:
        patched.setattr(cli, "load_model", lambda *args, **kwargs: pytest.fail("a model was loaded"))
        with pytest.raises(SystemExit, match=rf"dga-eval: {out} already holds 12 cells of an earlier run \(in {out}/cells\): "
                                             r"pass --resume to reuse those whose settings match and run the rest, or "
                                             r"choose another --out"):
            evaluate(tmp_path, tiny_model_dir, RESUMED_RUN, out)
    with monkeypatch.context() as patched:  # a finished run resumed: nothing to compute
        computed = count_cells(patched, harness, "run_share")
        results = evaluate(tmp_path, tiny_model_dir, RESUMED_RUN, out, "--resume")
    assert computed == [] and without_timings(results) == without_timings(uninterrupted["results"])
    assert sum(len(cells) for entry in results["tasks"].values() for cells in entry["reused"].values()) == 12


def test_a_stopped_ruler_run_resumes_with_the_missing_cells_only(tmp_path, tiny_ruler_tasks, tiny_model_dir):
    """RULER's cells are (length, configuration), every lm-eval task of the run in each."""
    from dga_eval import ruler

    spec = {**RESUMED_RUN, "lengths": [64, 96], "tasks": {"ruler": {"tasks": ["tiny_ruler"], "limit": 2}}}
    whole = evaluate(tmp_path, tiny_model_dir, spec, tmp_path / "whole")
    with pytest.MonkeyPatch.context() as patched:
        computed = count_cells(patched, ruler, "evaluate_task", stop_after=3)
        with pytest.raises(SessionEnds):
            evaluate(tmp_path, tiny_model_dir, spec, tmp_path / "out")
    assert stored_cells(tmp_path / "out") == ["ruler/64/dense", "ruler/64/tiny", "ruler/96/dense"]
    with pytest.MonkeyPatch.context() as patched:
        computed = count_cells(patched, ruler, "evaluate_task")
        resumed = evaluate(tmp_path, tiny_model_dir, spec, tmp_path / "out", "--resume")
    assert [args[4] for args in computed] == [96]  # evaluate_task(model, tokenizer, task, name, length, ...)
    assert without_timings(resumed) == without_timings(whole)
    assert resumed["tasks"]["ruler"]["results"]["tiny"]["96"]["metrics"].keys() == {"tiny_ruler"}


# ---------------------------------------------------------------- lm-eval: RULER and hf-dga

TINY_TASK = """
task: tiny_ruler
dataset_path: ""
dataset_name: ""
output_type: generate_until
test_split: test
custom_dataset: !function tiny_utils.dataset
doc_to_text: "{{input}}"
doc_to_target: "{{outputs}}"
gen_prefix: "{{gen_prefix}}"
target_delimiter: " "
process_results: !function tiny_utils.process_results
metric_list:
  - metric: "4096"
    aggregation: !function tiny_utils.aggregate_metrics
    higher_is_better: true
generation_kwargs: {do_sample: false, max_gen_toks: 3, until: []}
metadata: {version: 1.0}
"""
TINY_UTILS = '''
import datasets
from lm_eval.tasks.ruler.common_utils import aggregate_metrics, get_tokenizer, process_results, resolve_tokenizer_name

def dataset(**kwargs):
    tokenizer = get_tokenizer(resolve_tokenizer_name(kwargs))  # as RULER does: fails without a tokenizer
    docs = [{"input": " ".join(["the", "key", "is", str(i)] * 8), "outputs": [str(i)], "max_length": n,
             "gen_prefix": "the key is", "length": len(tokenizer("x").input_ids)}
            for n in kwargs["max_seq_lengths"] for i in range(4)]
    return {"test": datasets.Dataset.from_list(docs)}
'''
NEEDS_DOWNLOAD = """
task: needs_download
dataset_path: no-such-user/no-such-dataset
output_type: generate_until
test_split: test
doc_to_text: "{{input}}"
doc_to_target: "{{output}}"
"""


@pytest.fixture
def tiny_ruler_tasks(tmp_path, monkeypatch) -> None:
    """lm-eval's task manager knows tiny_ruler and needs_download only (indexing lm-eval's thousands of tasks
    would take each test 15 s)."""
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install dga-hf[eval])")
    import lm_eval.tasks

    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    (tasks_dir / "tiny_ruler.yaml").write_text(TINY_TASK)
    (tasks_dir / "tiny_utils.py").write_text(TINY_UTILS)
    (tasks_dir / "needs_download.yaml").write_text(NEEDS_DOWNLOAD)
    manager = functools.partial(lm_eval.tasks.TaskManager, include_defaults=False, include_path=str(tasks_dir))
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", manager)


def test_ruler_runs_offline_on_identical_samples_and_records_failures(tmp_path, tiny_ruler_tasks, tiny_model):
    from dga_eval import harness, ruler

    model, tokenizer = tiny_model
    configs = {DENSE: Setting(), "paper": Setting(dga_hf.DGAConfig.preset("paper"))}
    spec = {"tasks": ["tiny_ruler", "needs_download"], "limit": 2}
    results = dict(ruler.run_ruler(model, tokenizer, configs, harness.apply_config, spec, [(64, name) for name in configs],
                                   0, tmp_path))
    harness.apply_config(model, Setting())
    assert list(results) == [(64, DENSE), (64, "paper")]
    for config in configs:
        cell = results[(64, config)]
        assert 0.0 <= cell["metrics"]["tiny_ruler"] <= 1.0
        assert [a["target"] for a in cell["details"]["tiny_ruler"]["answers"]] == [["0"], ["1"]]
        assert cell["details"]["tiny_ruler"]["attention"] == ("sdpa" if config == DENSE else "dga")
        assert "needs_download" not in cell["metrics"]
        assert "offline" in cell["errors"]["needs_download"].lower()  # refused by offline mode, not downloaded


def test_offline_sets_and_restores_the_flags(monkeypatch):
    import huggingface_hub.constants

    from dga_eval.ruler import offline

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    before = huggingface_hub.constants.HF_HUB_OFFLINE
    with offline():
        assert os.environ["HF_HUB_OFFLINE"] == os.environ["HF_DATASETS_OFFLINE"] == "1"
        assert huggingface_hub.constants.HF_HUB_OFFLINE is True
    assert "HF_HUB_OFFLINE" not in os.environ
    assert huggingface_hub.constants.HF_HUB_OFFLINE == before


def test_hf_dga_is_an_lm_eval_model_that_patches(tiny_model_dir):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install dga-hf[eval])")
    from lm_eval.api.registry import get_model

    from dga_eval.lm_eval_model import DGAHFLM

    assert get_model("hf-dga") is DGAHFLM
    lm = get_model("hf-dga").create_from_arg_string(
        f"pretrained={tiny_model_dir},dga=paper,dga_local_blocks=4,dga_dense_layers=1", {"device": "cpu", "batch_size": 1}
    )
    assert dga_hf.is_patched(lm.model)
    assert lm.dga_config == dga_hf.DGAConfig.preset("paper").replace(local_blocks=4, dense_layers=(1,))
    assert lm.model.config.dga["local_blocks"] == 4
    with pytest.raises(ValueError, match="unknown DGA settings"):
        DGAHFLM(pretrained=str(tiny_model_dir), dga_local_block=4, device="cpu")
