"""Gradients of DGA (issue: training): the PyTorch backend's memory-bounded backward against float64
references, the spec's invariants for gradients, and gradients through a patched model's loss.

The focal selection is a discrete choice and passes no gradient; everything else (stage 5 and the
aggregation weights) does, so the naive transcription of the spec differentiated by autograd is the
reference."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dga_hf import DGAConfig, dga_attention, naive_dga_attention, patch
from dga_hf.ops import torch_backend
from dga_hf.ops.layout import build_layout
from dga_hf.ops.naive import stage5_reference
from helpers import (
    SPARSE_PAPER_LIKE, SPARSE_SINKS_LOGSIZE, dense_reference, dga_config_strategy, left_padding, make_model, qkv, random_ids,
)

FP32_GRAD_TOL = 5e-5  # float32 backend vs float64 reference, O(1) gradients


def grads_of(function, inputs, upstream):
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    return torch.autograd.grad((function(*inputs) * upstream).sum(), inputs)


@pytest.mark.parametrize(
    "config,shape,padded,fast",
    [
        (DGAConfig(group_size=3, focal_ratio=0.25, probe_queries=3, local_blocks=1, min_seq_len=0), (1, 2, 1, 10, 3), False, False),
        (DGAConfig(group_size=4, focal_ratio=0.25, probe_queries=5, local_blocks=1, min_seq_len=0), (2, 4, 2, 14, 4), False, True),
        (DGAConfig(group_size=3, focal_ratio=0.2, probe_queries=4, local_blocks=2, sink_tokens=2,
                   group_bias="log_size", min_seq_len=0), (2, 4, 2, 14, 4), True, True),
        (DGAConfig(group_size=2, focal_ratio=0.2, probe_queries=4, local_blocks=1, expand_blocks=2, min_seq_len=0),
         (2, 4, 2, 15, 4), True, True),
        (DGAConfig(group_size=3, focal_ratio=0.2, probe_queries=4, local_blocks=1, expand_blocks=2, min_seq_len=0,
                   expand_score="principal"), (2, 4, 2, 16, 4), True, True),
    ],
    ids=["n1-full-jacobian", "n1-gqa", "n2-sinks-logsize-padded", "n1-expand2-padded", "n1-expand2-principal-padded"],
)
def test_gradcheck_float64(config, shape, padded, fast):
    """Analytic gradients of the torch backend equal finite differences (the selection stays fixed
    under the tiny perturbations: random inputs have no near-ties in importance). ``fast`` checks
    random projections of the Jacobian instead of every entry."""
    q, k, v = (x.double().requires_grad_() for x in qkv(*shape, seed=1))
    mask = left_padding(shape[0], shape[3], seed=3) if padded else None
    assert torch.autograd.gradcheck(
        lambda q, k, v: dga_attention(q, k, v, config, backend="torch", padding_mask=mask), (q, k, v), fast_mode=fast
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=dga_config_strategy, padded=st.booleans(), seed=st.integers(0, 2**31 - 1),
       shape=st.tuples(st.integers(1, 2), st.sampled_from([(1, 1), (3, 1), (4, 2), (8, 2)]), st.integers(1, 70)))
def test_torch_backend_gradients_match_naive_reference(config, padded, seed, shape):
    batch, (q_heads, kv_heads), seq_len = shape
    q, k, v = qkv(batch, q_heads, kv_heads, seq_len, 8, seed=seed)
    mask = left_padding(batch, seq_len, seed=seed) if padded else None
    upstream = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    expected = grads_of(lambda *x: naive_dga_attention(*x, config, padding_mask=mask), [t.double() for t in (q, k, v)], upstream)
    actual = grads_of(lambda *x: dga_attention(*x, config, backend="torch", padding_mask=mask), (q, k, v), upstream.float())
    for name, got, want in zip("qkv", actual, expected):
        assert got.dtype == torch.float32, name
        torch.testing.assert_close(got.double(), want, atol=FP32_GRAD_TOL, rtol=FP32_GRAD_TOL, msg=f"grad of {name}")


@pytest.mark.parametrize(
    "config,lengths",
    [
        (DGAConfig(group_size=4, focal_ratio=0.2, probe_queries=6, local_blocks=1), [45, 45]),
        (DGAConfig(group_size=5, focal_ratio=0.15, probe_queries=6, local_blocks=3, sink_tokens=2, group_bias="log_size"), [45, 21]),
        (DGAConfig(group_size=4, focal_ratio=0.2, local_blocks=1), [30, 0]),  # an empty row
        (DGAConfig(group_size=4, focal_ratio=0.2, probe_queries=6, local_blocks=1, expand_blocks=3), [45, 33]),
        (DGAConfig(group_size=3, focal_ratio=0.25, probe_queries=6, local_blocks=2, expand_blocks=1, sink_tokens=2,
                   group_bias="log_size"), [45, 21]),
        (DGAConfig(group_size=4, focal_ratio=0.2, probe_queries=6, local_blocks=1, expand_blocks=3,
                   expand_score="principal"), [45, 33]),
    ],
    ids=["n1", "n3-sinks-logsize-short-row", "empty-row", "n1-expand3", "n2-expand1-sinks-logsize", "n1-expand3-principal"],
)
def test_stage5_backward_matches_explicit_mask_reference(config, lengths):
    """All seven gradients of attend_backward (q, k, v and the layout's focal keys/values and aggregates)
    against autograd through the explicit-mask transcription of step 5, in float64, on a fixed layout;
    small tiles so that several tiles and prefixes of each stream occur."""
    gen = torch.Generator().manual_seed(0)
    batch, heads, group, seq_len, dim = 2, 2, 3, 45, 8
    q = torch.randn(batch, heads, group, seq_len, dim, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(batch, heads, seq_len, dim, generator=gen, dtype=torch.float64) for _ in range(2))
    lens = torch.tensor(lengths)
    layout = build_layout(q, k, v, lens, config, 0.3)
    inputs = [q, k, v, layout.focal_key, layout.focal_value, layout.agg_key, layout.agg_value]
    upstream = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    expected = grads_of(lambda *x: stage5_reference(*x, layout, config, 0.3), inputs, upstream)

    original_budget = torch_backend.TILE_LOGITS_BUDGET
    torch_backend.TILE_LOGITS_BUDGET = 2000  # a handful of blocks per tile
    try:
        out, lse = torch_backend.attend_forward(q, k, v, layout, config, 0.3)
        actual = torch_backend.attend_backward(q, k, v, layout, config, 0.3, out, lse, upstream)
    finally:
        torch_backend.TILE_LOGITS_BUDGET = original_budget
    torch.testing.assert_close(out, stage5_reference(*inputs, layout, config, 0.3), atol=1e-12, rtol=1e-12)
    names = ["query", "key", "value", "focal_key", "focal_value", "agg_key", "agg_value"]
    for name, got, want in zip(names, actual, expected):
        assert got.shape == want.shape, name
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10, msg=f"grad of {name}")
    padded = torch.arange(seq_len)[None, :] >= lens[:, None]
    assert torch.isinf(lse.permute(0, 3, 1, 2)[padded]).all() and torch.isfinite(lse.permute(0, 3, 1, 2)[~padded]).all()


@pytest.mark.parametrize("exact", [dict(focal_ratio=1.0), dict(group_size=1), dict(local_blocks=20), dict(expand_blocks=18),
                                   dict(expand_blocks=18, expand_score="principal")])
def test_exact_settings_give_dense_gradients(exact):
    config = DGAConfig(**{"group_size": 4, "focal_ratio": 0.1, "local_blocks": 1, **exact})
    q, k, v = qkv(2, 4, 2, 70, 8, seed=7)
    mask = left_padding(2, 70, seed=7)
    upstream = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    actual = grads_of(lambda *x: dga_attention(*x, config, backend="torch", padding_mask=mask), (q, k, v), upstream)
    expected = grads_of(lambda *x: dense_reference(*x, mask).float(), (q, k, v), upstream)
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want, atol=FP32_GRAD_TOL, rtol=FP32_GRAD_TOL)


def test_sparse_gradients_differ_from_dense():
    """Guards the test above from passing because the sparse path silently became dense."""
    config = DGAConfig(group_size=4, focal_ratio=0.1, local_blocks=1)
    q, k, v = qkv(1, 2, 1, 64, 8, seed=3)
    upstream = torch.randn(q.shape, generator=torch.Generator().manual_seed(2))
    sparse = grads_of(lambda *x: dga_attention(*x, config, backend="torch"), (q, k, v), upstream)
    dense = grads_of(lambda *x: dense_reference(*x).float(), (q, k, v), upstream)
    assert all((a - b).abs().max() > 1e-2 for a, b in zip(sparse, dense))


def test_no_gradient_reaches_a_later_position():
    """Causality of the backward: the output at position i depends on no key/value/query after i."""
    config = DGAConfig(group_size=4, focal_ratio=0.2, local_blocks=2, probe_queries=4)
    q, k, v = qkv(1, 4, 2, 40, 8, seed=5)
    upstream = torch.zeros(q.shape)
    upstream[:, :, 25] = 1.0  # only the output of position 25
    grads = grads_of(lambda *x: dga_attention(*x, config, backend="torch"), (q, k, v), upstream)
    for grad in grads:
        assert grad[:, :, 26:].abs().max() == 0
    # an earlier query influences position 25 only as the end of a block (q-bar of its aggregate)
    not_block_end = torch.arange(25) % 4 != 3
    assert grads[0][:, :, :25][:, :, not_block_end].abs().max() == 0
    assert grads[0][:, :, :25][:, :, ~not_block_end].abs().max() > 0
    assert all(grad[:, :, :26].abs().max() > 0 for grad in grads[1:])


def test_backward_memory_stays_bounded_at_32k():
    """Forward + backward at L = 32768: peak extra memory stays a few times q+k+v (the gradients
    themselves are one q+k+v; plain autograd through the tiles would keep every tile's logits, over
    80x q+k+v here)."""
    script = textwrap.dedent(
        """
        import resource, torch
        from dga_hf import DGAConfig, dga_attention
        torch.manual_seed(0)
        L = 32768
        q, k, v = (torch.randn(1, heads, L, 32, requires_grad=True) for heads in (2, 1, 1))
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out = dga_attention(q, k, v, DGAConfig(group_size=16, focal_ratio=0.1, local_blocks=4), backend="torch")
        out.backward(torch.randn_like(out))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        qkv_bytes = sum(t.numel() * t.element_size() for t in (q, k, v))
        finite = all(bool(torch.isfinite(t.grad).all()) for t in (q, k, v))
        print(peak - base, qkv_bytes, finite)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    extra, qkv_bytes, finite = result.stdout.split()
    assert finite == "True"
    assert int(extra) < 8 * int(qkv_bytes), f"peak extra {int(extra) / 2**20:.0f} MiB for {int(qkv_bytes) / 2**20:.0f} MiB of q, k, v"


def loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("config", [SPARSE_PAPER_LIKE, SPARSE_SINKS_LOGSIZE], ids=["sparse", "sparse2"])
def test_patched_model_gradients_match_naive_backend(arch, config):
    """Training a patched model: the loss and every parameter's gradient with the torch backend equal
    those with the naive float64 reference backend, and differ from the dense model's."""
    ids = random_ids(2, 150)
    dense = make_model(arch).train()
    dense_loss, dense_grads = loss_and_grads(dense, ids)
    fast, reference = make_model(arch).train(), make_model(arch).train()
    patch(fast, config)
    patch(reference, config.replace(backend="naive"))
    loss, grads = loss_and_grads(fast, ids)
    ref_loss, ref_grads = loss_and_grads(reference, ids)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys() == dense_grads.keys()
    for name in grads:
        scale = ref_grads[name].abs().max()
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-4 * scale, rtol=1e-3, msg=name)
    assert abs(loss - dense_loss) > 1e-3
    assert (grads["model.layers.0.self_attn.q_proj.weight"] - dense_grads["model.layers.0.self_attn.q_proj.weight"]).abs().max() > 1e-4
