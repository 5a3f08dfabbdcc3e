"""torch.compile of a patched model whose prefill runs DGA (issue 16, item 16).

The DGA prefill is the operator ``dga_hf::prefill`` under torch.compile (ops/dispatch.py): opaque to the
compiler, so ``fullgraph=True`` captures a prefill whose focal selection has data-dependent shapes, and the
compiled model computes what the eager one does (the function of docs/spec.md, which tests/test_ops.py checks
against the naive reference), forward and backward. The dense fallback's capture is tested in
tests/test_reliability.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import VOCAB, left_padding, load_script, make_model, needs_triton, qkv, save_char_model

import dga_hf
from dga_hf import DGAConfig
from dga_hf.ops import dga_attention, stats
from dga_hf.ops.dispatch import prefill_backward_operator, prefill_operator

# DGA at every layer of a 70-token prefill (min_seq_len=0): blocks of 4, one local block, 7 focal tokens and
# aggregates for the rest; with and without block expansion
PLAIN = DGAConfig(group_size=4, focal_ratio=0.1, probe_queries=8, local_blocks=1, min_seq_len=0, backend="torch")
SETTINGS = {"plain": PLAIN, "expand": PLAIN.replace(expand_blocks=2)}
LENGTH = 70
TRITON_PADDED = pytest.param("triton", True, 21, marks=needs_triton, id="triton-True-21")


@pytest.fixture(autouse=True)
def fresh_compiler():
    """Each test compiles from scratch and leaves no compiled code behind."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _prompt(length: int = LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of token ids and their padding mask, the second row left-padded by 9."""
    ids = torch.randint(1, VOCAB, (2, length))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    return ids, mask


def _logits(model, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, attention_mask=mask, use_cache=False).logits


def _check_compiled(compiled, model, ids, mask, *, tolerance: float) -> None:
    """The compiled model's logits are the eager model's, and every layer ran DGA (read fewer keys than dense)."""
    expected = _logits(model, ids, mask)
    with stats.counting_keys() as count:
        actual = _logits(compiled, ids, mask)
    assert count.calls == model.config.num_hidden_layers and count.share < 1
    torch.testing.assert_close(actual, expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v projections with bias
def test_dga_prefill_compiles_with_fullgraph(arch, settings):
    """Before the operator, Dynamo broke the graph in the selection (`.item()`, data-dependent shapes), which
    fullgraph=True turns into an error."""
    model = dga_hf.patch(make_model(arch), SETTINGS[settings])
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    ids, mask = _prompt()
    for attention_mask in (None, mask):
        _check_compiled(compiled, model, ids, attention_mask, tolerance=1e-6)


def test_dga_prefill_compiles_with_inductor():
    """Inductor generates the code around the operator, which runs as it does in eager mode."""
    model = dga_hf.patch(make_model("qwen2"), SETTINGS["expand"])
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    ids, mask = _prompt()
    _check_compiled(compiled, model, ids, mask, tolerance=1e-4)


def test_dga_prefill_compiles_once_for_dynamic_lengths():
    """dynamic=True: one graph serves prompts of other lengths (a recompile is an error here)."""
    model = dga_hf.patch(make_model("llama"), SETTINGS["expand"])
    compiled = torch.compile(model, fullgraph=True, backend="eager", dynamic=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for length in (LENGTH, 83):
            _check_compiled(compiled, model, *_prompt(length), tolerance=1e-6)


def test_gradients_through_the_compiled_prefill():
    """Training: AOTAutograd traces the operator's backward (dga_hf::prefill_backward, which recomputes the
    forward and runs the PyTorch backend's backward); the gradients are the eager model's."""
    model = dga_hf.patch(make_model("qwen2"), SETTINGS["expand"]).train()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ids, mask = _prompt()

    def gradients(forward) -> dict[str, torch.Tensor]:
        model.zero_grad()
        forward(ids, attention_mask=mask, use_cache=False).logits.square().mean().backward()
        return {name: parameter.grad.clone() for name, parameter in model.named_parameters()}

    expected, actual = gradients(model), gradients(compiled)
    assert expected.keys() == actual.keys() and all(grad.abs().sum() > 0 for grad in expected.values())
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)


@needs_triton
def test_triton_backend_compiles_with_fullgraph():
    """The Triton backend runs inside the operator too (interpreted on the CPU)."""
    model = dga_hf.patch(make_model("llama"), SETTINGS["expand"].replace(backend="triton"))
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    ids, mask = _prompt(24)
    _check_compiled(compiled, model, ids, mask, tolerance=1e-6)


@pytest.mark.parametrize("backend, padded, length", [("torch", False, 40), ("torch", True, 40), TRITON_PADDED])
def test_operator_is_dga_attention_and_registered_correctly(backend, padded, length):
    """The operator returns dga_attention's output and gradients (GQA: 4 query heads on 2 kv heads, a
    non-default scale, a padding mask), and torch.library.opcheck finds its schema, fake implementation and
    autograd registration consistent. (Triton's interpreter is slow: one shorter case.)"""
    settings = SETTINGS["expand"]
    query, key, value = (t.requires_grad_() for t in qkv(2, 4, 2, length, 8, seed=3))
    mask = left_padding(2, length, seed=4) if padded else None
    arguments = (query, key, value, mask, settings.to_text(), 0.3, backend)
    expected = dga_attention(query, key, value, settings, scale=0.3, backend=backend, padding_mask=mask)
    actual = prefill_operator(*arguments)
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-6)
    grad_out = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, (query, key, value), grad_out)
    actual_grads = torch.autograd.grad(actual, (query, key, value), grad_out)
    for name, got, want in zip(("query", "key", "value"), actual_grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6, msg=name)
    results = torch.library.opcheck(prefill_operator, arguments)
    assert set(results.values()) == {"SUCCESS"}, results


def test_backward_operator_is_registered_correctly():
    """opcheck of dga_hf::prefill_backward (its registration does not depend on the backend)."""
    query, key, value = qkv(2, 4, 2, 40, 8, seed=5)
    grad_out = torch.randn_like(query)
    arguments = (grad_out, query, key, value, left_padding(2, 40, seed=6), SETTINGS["expand"].to_text(), 0.3, "torch")
    results = torch.library.opcheck(prefill_backward_operator, arguments)
    assert set(results.values()) == {"SUCCESS"}, results


def test_settings_reach_the_operator_as_one_text():
    """The operator's schema takes strings: the settings travel as DGAConfig.to_text(), built when they are
    made (a compiled graph holds it as a constant) and parsed by the operator once per text. dga_attention
    itself compiles with fullgraph, with settings made outside the compiled function."""
    settings = SETTINGS["expand"].replace(dense_layers=[3, 1], group_bias="log_size", focal_ratio=0.15)
    text = settings.to_text()
    assert DGAConfig.from_text(text) == settings
    assert DGAConfig.from_text(text) is DGAConfig.from_text(text)
    assert PLAIN.to_text() != SETTINGS["expand"].to_text()
    for malformed in ("group_size", "group_size=4;backend"):
        with pytest.raises(ValueError, match=r"is not in DGAConfig.to_text\(\)'s form 'name=<Python literal>;...'"):
            DGAConfig.from_text(malformed)
    with pytest.raises(ValueError, match=r"DGAConfig got unknown fields \['width'\]"):
        DGAConfig.from_text("width=3")
    query, key, value = qkv(2, 4, 2, 40, 8, seed=7)
    compiled = torch.compile(lambda q, k, v: dga_attention(q, k, v, settings), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(query, key, value), dga_attention(query, key, value, settings), atol=1e-6, rtol=1e-6)


def test_compile_bench_script_runs(tmp_path):
    """scripts/compile_bench.py (the measurement in docs/results.md) on a tiny model: both attentions timed
    eager and compiled, the compiled logits the eager ones."""
    model_path = save_char_model(tmp_path / "model")
    load_script("compile_bench").main(
        ["--model", str(model_path), "--lengths", "48", "--repeats", "1", "--threads", "1", "--out", str(tmp_path)]
    )
    rows = json.loads((tmp_path / "compile_bench.json").read_text())["rows"]
    assert [(row["attention"], row["length"]) for row in rows] == [("dga", 48), ("dense", 48)]
    for row in rows:
        assert row["eager_ms"] > 0 and row["compiled_ms"] > 0 and row["compile_s"] > 0
        assert row["max_logit_difference"] < 1e-4
    assert "| dga | 48 |" in (tmp_path / "compile_bench.md").read_text()
