"""Reliability (issue #16): what a hostile caller meets in the settings, the operator and the integration.

Every refusal is a clear error naming what was wrong; everything accepted computes the function of
docs/spec.md (the float64 reference `naive_dga_attention`), whatever the settings, the dtypes, the masks
or non-finite values; memory follows the sequence, not the settings. The tests name the issue's item.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dga_hf import DecodingConfig, DGAConfig
LARGEST = 2**31 - 1  # the documented bound of the integer settings

INT_FIELDS = {"group_size": 1, "probe_queries": 1, "local_blocks": 1, "sink_tokens": 0, "min_seq_len": 0}

# ------------------------------------------------------------------------------------------------ settings


@pytest.mark.parametrize("field, minimum", INT_FIELDS.items())
def test_integer_settings_are_bounded(field, minimum):
    """Item 2: 2**63 gave a wrong output and 10**30 a TypeError at the forward; now the range is named."""
    assert getattr(DGAConfig(**{field: LARGEST}), field) == LARGEST
    for value in (2**31, 2**63, 10**30):
        message = rf"DGAConfig\.{field}={value} is invalid: allowed range is an integer >= {minimum} and <= 2147483647"
        with pytest.raises(ValueError, match=message):
            DGAConfig(**{field: value})
    with pytest.raises(ValueError, match=r"DecodingConfig\.expand_blocks=2147483648 is invalid: .*<= 2147483647"):
        DecodingConfig(expand_blocks=2**31)


def test_for_length_bounds_every_length_like_setting():
    """Item 2: the equivalent settings on a sequence (the dispatch applies them; equality of the outputs
    with the reference under the unbounded settings is checked by the fuzz test below)."""
    huge = DGAConfig(
        group_size=LARGEST, probe_queries=LARGEST, local_blocks=LARGEST,
        sink_tokens=LARGEST, min_seq_len=LARGEST, focal_ratio=0.3, group_bias="log_size",
    )
    assert huge.for_length(40) == DGAConfig(
        group_size=40, probe_queries=40, local_blocks=1, sink_tokens=40, min_seq_len=41, focal_ratio=0.3,
        group_bias="log_size",
    )
    # the window is bounded by the blocks of the sequence, counted with the bounded group size
    assert DGAConfig(group_size=16, local_blocks=10**6).for_length(40).local_blocks == 3
    assert DGAConfig(group_size=16, local_blocks=10**6).for_length(48).local_blocks == 3
    assert DGAConfig(group_size=16, local_blocks=10**6).for_length(49).local_blocks == 4
    within = DGAConfig(group_size=4, probe_queries=8, local_blocks=2, sink_tokens=1, min_seq_len=40)
    assert within.for_length(40) is within  # nothing to bound: the same object, no copy per call
    assert DGAConfig(group_size=8, sink_tokens=3).for_length(0) == DGAConfig(group_size=1, probe_queries=1, sink_tokens=1)


def test_numpy_scalars_are_accepted_as_python_numbers():
    """Item 13: integers and ratios from numpy (sweeps, configs) are accepted and stored as Python numbers."""
    config = DGAConfig(
        group_size=np.int64(4), probe_queries=np.int32(8), local_blocks=np.uint8(2), sink_tokens=np.int16(1),
        min_seq_len=np.int64(0), focal_ratio=np.float32(0.1), dense_layers=np.arange(2),
        group_bias=np.str_("log_size"),
    )
    assert config == DGAConfig(
        group_size=4, probe_queries=8, local_blocks=2, sink_tokens=1, focal_ratio=0.1, dense_layers=(0, 1),
        group_bias="log_size",
    )
    assert all(type(getattr(config, name)) is int for name in INT_FIELDS)
    assert type(config.focal_ratio) is float and type(config.group_bias) is str
    assert all(type(index) is int for index in config.dense_layers)
    assert json.loads(json.dumps(config.to_dict())) == config.to_dict()
    decoding = DecodingConfig(refresh_every=np.int64(5), expand_blocks=np.int64(3), dense_share=np.float32(0.35))
    assert decoding == DecodingConfig(refresh_every=5, expand_blocks=3, dense_share=0.35)
    assert type(decoding.refresh_every) is int and type(decoding.dense_share) is float
    # numpy floats and bools are not integers, as their Python counterparts are not
    for value in (np.float64(2.0), np.bool_(True)):
        with pytest.raises(ValueError, match=r"DGAConfig\.group_size=.* is invalid: allowed range is an integer >= 1"):
            DGAConfig(group_size=value)


@pytest.mark.parametrize("data", [[("group_size", 8)], "paper", 5, True, None])
def test_from_dict_refuses_what_is_not_a_mapping(data):
    """Item 14: a list of pairs gave "unknown fields [('group_size', 8)]"."""
    name = type(data).__name__
    with pytest.raises(TypeError, match=rf"DGAConfig\.from_dict expected a mapping of field names to values, got {name}"):
        DGAConfig.from_dict(data)


# ------------------------------------------------------------------------------------------------ the operator

SPARSE = DGAConfig(group_size=4, focal_ratio=0.25, probe_queries=6, local_blocks=1, sink_tokens=1)
DENSE_PATH = SPARSE.replace(min_seq_len=1000)  # dga_attention's dense fallback (L < min_seq_len)


def _qkv(batch=2, q_heads=4, kv_heads=2, seq_len=20, dim=8, *, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, seq_len, dim, generator=gen, dtype=dtype) for heads in (q_heads, kv_heads, kv_heads))


def _left_padding(batch=2, seq_len=20):
    mask = torch.ones(batch, seq_len, dtype=torch.bool)
    mask[1, :7] = False
    return mask


@pytest.mark.parametrize("config", [SPARSE, DENSE_PATH], ids=["dga", "dense path"])
def test_padding_mask_is_bool_or_0_1_and_an_additive_mask_is_refused(config):
    """Item 1: an additive float mask (0 real / -inf padded) was read as bool and inverted, silently."""
    from dga_hf import dense_attention, dga_attention, naive_dga_attention

    q, k, v = _qkv()
    mask = _left_padding()
    expected = naive_dga_attention(q, k, v, config, padding_mask=mask)
    for as_numbers in (mask.long(), mask.float(), mask.to(torch.float16)):
        torch.testing.assert_close(dga_attention(q, k, v, config, padding_mask=as_numbers), expected, atol=1e-12, rtol=1e-12)
    additive = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, -math.inf)
    for bad in (additive, additive.float(), mask.long() * 2, torch.full(mask.shape, math.nan)):
        with pytest.raises(ValueError, match=r"padding_mask must be bool or 0/1 \(True/1 = real token\); got torch\.(float|int)"):
            dga_attention(q, k, v, config, padding_mask=bad)
        with pytest.raises(ValueError, match=r"padding_mask must be bool or 0/1"):
            dense_attention(q, k, v, padding_mask=bad)
    with pytest.raises(ValueError, match=r"additive mask .*pass `additive_mask == 0`"):
        dga_attention(q, k, v, config, padding_mask=additive)


@pytest.mark.parametrize("config", [SPARSE, DENSE_PATH], ids=["dga", "dense path"])
@pytest.mark.parametrize("dtypes", [(torch.int64,) * 3, (torch.int32,) * 3, (torch.bool,) * 3, (torch.complex64,) * 3])
def test_non_floating_inputs_are_refused(config, dtypes):
    """Item 4: int64 q/k/v returned an int64 output truncated from float (SDPA raises)."""
    from dga_hf import dense_attention, dga_attention

    q, k, v = (x.to(dtype) for x, dtype in zip(_qkv(), dtypes))
    name = str(dtypes[0]).removeprefix("torch.")
    message = rf"query, key and value must share one floating dtype \(float16, bfloat16, float32, float64\); got query {name}, key {name}, value {name}"
    with pytest.raises(TypeError, match=message):
        dga_attention(q, k, v, config)
    with pytest.raises(TypeError, match=message):
        dense_attention(q, k, v)


@pytest.mark.parametrize("config", [SPARSE, DENSE_PATH], ids=["dga", "dense path"])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float64, torch.float64), (torch.float64, torch.float64, torch.bfloat16)])
def test_mixed_dtypes_are_refused_on_both_paths(config, dtypes):
    """Item 5: mixed dtypes were accepted on the DGA path and refused (by SDPA) on the dense path."""
    from dga_hf import dense_attention, dga_attention

    q, k, v = (x.to(dtype) for x, dtype in zip(_qkv(), dtypes))
    message = r"query, key and value must share one floating dtype .*; got query float\d+, key \w+, value \w+"
    with pytest.raises(TypeError, match=message):
        dga_attention(q, k, v, config)
    with pytest.raises(TypeError, match=message):
        dense_attention(q, k, v)


@pytest.mark.parametrize("scale", [0.0, -0.5, -3.0])
@pytest.mark.parametrize("padded", [False, True])
def test_dense_fallback_agrees_with_dga_for_scale_at_most_zero(scale, padded):
    """Item 6: the dense fallback returned NaN for scale <= 0 (PyTorch's fused causal SDPA on the CPU)."""
    from dga_hf import dense_attention, dga_attention, naive_dga_attention

    q, k, v = _qkv()
    mask = _left_padding() if padded else None
    expected = naive_dga_attention(q, k, v, DENSE_PATH, scale=scale, padding_mask=mask)
    torch.testing.assert_close(dga_attention(q, k, v, DENSE_PATH, scale=scale, padding_mask=mask), expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(dense_attention(q, k, v, scale=scale, padding_mask=mask), expected, atol=1e-12, rtol=1e-12)
    exact = SPARSE.replace(local_blocks=5)  # exact settings: the DGA path is dense attention too
    torch.testing.assert_close(dga_attention(q, k, v, exact, scale=scale, padding_mask=mask), expected, atol=1e-12, rtol=1e-12)
    # one decoding step (the last query over every key) agrees as well
    step = dense_attention(q[:, :, -1:], k, v, scale=scale, padding_mask=mask)
    torch.testing.assert_close(step, expected[:, :, -1:], atol=1e-12, rtol=1e-12)
    for bad in (math.nan, math.inf, "0.5", True):
        with pytest.raises(ValueError, match=r"scale=.* is invalid: allowed values are None \(1/sqrt\(head_dim\)\) or a finite real number"):
            dga_attention(q, k, v, SPARSE, scale=bad)


def test_every_config_form_patch_takes_is_accepted():
    """Item 10: dga_attention(q, k, v, None | dict | "paper") raised AttributeError."""
    from dga_hf import dga_attention, naive_dga_attention

    q, k, v = _qkv(seq_len=40)
    default = DGAConfig.preset("default").replace(min_seq_len=0, local_blocks=2)
    cases = [(None, DGAConfig.preset("default")), ("paper", DGAConfig.preset("paper")),
             (default.to_dict(), default), ({"group_size": 4, "local_blocks": 2}, DGAConfig(group_size=4, local_blocks=2))]
    for given, meant in cases:
        torch.testing.assert_close(dga_attention(q, k, v, given), naive_dga_attention(q, k, v, meant), atol=1e-12, rtol=1e-12)
    for bad in (3, 0.5, ["paper"]):
        with pytest.raises(TypeError, match=rf"expected a DGAConfig, a dict or a preset name, got {type(bad).__name__}"):
            dga_attention(q, k, v, bad)
    with pytest.raises(ValueError, match=r"unknown DGA preset 'fast'"):
        dga_attention(q, k, v, "fast")


def test_batch_mismatch_names_the_query():
    """Item 11: the message named only key and value (which matched)."""
    from dga_hf import dense_attention, dga_attention

    q, k, v = _qkv()
    message = r"query, key and value must have the same batch size \(dim 0\); got query \(2, 4, 20, 8\), key \(1, 2, 20, 8\), value \(1, 2, 20, 8\)"
    with pytest.raises(ValueError, match=message):
        dga_attention(q, k[:1], v[:1], SPARSE)
    with pytest.raises(ValueError, match=message):
        dense_attention(q, k[:1], v[:1])
    with pytest.raises(ValueError, match=r"key and value must have the same heads and length .*value \(2, 1, 20, 8\)"):
        dga_attention(q, k, v[:, :1], SPARSE)


def test_triton_backend_without_triton_is_a_clear_error(monkeypatch):
    """Item 12: backend="triton" without Triton installed raised ModuleNotFoundError."""
    import importlib.util

    from dga_hf import dga_attention

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "triton" else find_spec(name, *args))
    q, k, v = _qkv(dtype=torch.float32)
    message = r"backend='triton' needs the Triton package, which is not installed \(device cpu\): install it with `pip install dga-hf\[triton\]`"
    with pytest.raises(ValueError, match=message):
        dga_attention(q, k, v, SPARSE, backend="triton")
    with pytest.raises(ValueError, match=message):
        dga_attention(q, k, v, SPARSE.replace(backend="triton"))
    # "auto" does not need it
    torch.testing.assert_close(dga_attention(q, k, v, SPARSE), dga_attention(q, k, v, SPARSE, backend="torch"))


@pytest.mark.parametrize("shape", [(2, 4, 2, 0, 8), (0, 4, 2, 9, 8)], ids=["no positions", "no rows"])
def test_empty_inputs_give_empty_outputs(shape):
    """The PyTorch backend raised on an empty sequence or batch (found by the fuzz test); the reference and
    dense attention return an empty output."""
    from dga_hf import dense_attention, dga_attention, naive_dga_attention

    q, k, v = _qkv(*shape)
    expected = naive_dga_attention(q, k, v, SPARSE)
    for backend in ("torch", "naive"):
        out = dga_attention(q, k, v, SPARSE, backend=backend)
        assert out.shape == expected.shape == q.shape and out.dtype == q.dtype
    assert dense_attention(q, k, v).shape == q.shape


class _Allocations(torch.utils._python_dispatch.TorchDispatchMode):
    """The tensors an operator creates, counted at every aten op: the largest and the sum of their sizes
    (views and in-place results excluded). Deterministic, unlike the resident set size."""

    def __init__(self):
        super().__init__()
        self.largest = self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and not func._schema.is_mutable:
            for tensor in torch.utils._pytree.tree_leaves(out):
                if isinstance(tensor, torch.Tensor):
                    self.largest = max(self.largest, tensor.nbytes)
                    self.total += tensor.nbytes
        return out


def _allocations(q, k, v, config, *, train: bool) -> _Allocations:
    from dga_hf import dga_attention

    inputs = [x.detach().requires_grad_(train) for x in (q, k, v)]
    with _Allocations() as allocations, torch.set_grad_enabled(train):
        out = dga_attention(*inputs, config, backend="torch", padding_mask=_left_padding(2, q.shape[2]))
        if train:
            out.sum().backward()
    return allocations


HUGE = {
    "group_size 2**20": {"group_size": 2**20},
    "group_size": {"group_size": LARGEST},
    "local_blocks": {"local_blocks": LARGEST},
    "probe_queries": {"probe_queries": LARGEST},
    "sink_tokens": {"sink_tokens": LARGEST},
    "min_seq_len": {"min_seq_len": LARGEST},
    "all": {name: LARGEST for name in INT_FIELDS},
}


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("settings", HUGE.values(), ids=HUGE.keys())
def test_memory_follows_the_sequence_not_the_settings(settings, train):
    """Item 2: group_size=2**20 on 40 tokens allocated +552 MiB, 2**31 tried 512 GiB. Settings beyond the
    sequence now allocate exactly what their bounded equivalents do, and give the reference's output."""
    from dga_hf import dga_attention, naive_dga_attention

    q, k, v = _qkv(seq_len=40, dtype=torch.float32)
    config = SPARSE.replace(**settings)
    huge = _allocations(q, k, v, config, train=train)
    bounded = _allocations(q, k, v, config.for_length(40), train=train)
    assert (huge.largest, huge.total) == (bounded.largest, bounded.total)
    # and a bound in the sequence alone: no tensor larger than 8 float64 copies of the 40 x 40 scores per head
    assert huge.largest <= 8 * 2 * 4 * 40 * 40 * 8
    mask = _left_padding(2, 40)
    expected = naive_dga_attention(q, k, v, config, padding_mask=mask)
    torch.testing.assert_close(dga_attention(q, k, v, config, backend="torch", padding_mask=mask).double(), expected, atol=2e-5, rtol=2e-5)


def _paths() -> list:
    """(backend, train) pairs that run here (the naive reference has one path): Triton's kernels run on CPU
    tensors only under its interpreter."""
    import importlib.util
    import os

    interpreted = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
    no_triton = pytest.mark.skipif(
        importlib.util.find_spec("triton") is None or not interpreted,
        reason="Triton's kernels run on CPU tensors only under TRITON_INTERPRET=1 (make test sets it)",
    )
    return [
        pytest.param("torch", False, id="torch-inference"),
        pytest.param("torch", True, id="torch-training"),
        pytest.param("naive", False, id="naive"),
        pytest.param("triton", False, id="triton-inference", marks=no_triton),
        pytest.param("triton", True, id="triton-training", marks=no_triton),
    ]


@pytest.mark.parametrize("backend, train", _paths())
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["key", "value", "query"])
def test_a_non_finite_input_reaches_only_the_queries_that_read_it(where, bad, backend, train):
    """Item 3: a NaN key at position 5 made queries 0-4 of its kv head NaN (SDPA keeps them finite). The
    rule (dga_attention's docstring): the outputs that read a non-finite element are NaN (of a key or value
    at j: every query at or after j of its kv head; of a query: that query); everything else reads the
    element as 0, selection included."""
    from dga_hf import dga_attention

    q, k, v = _qkv(seq_len=24, dtype=torch.float32)
    mask = _left_padding(2, 24)  # row 1: positions 0-6 are padding
    tensors = {"query": q, "key": k, "value": v}
    head, row, position = 1, 1, 12  # query head 1 reads kv head 0 (two query heads per kv head)
    poisoned = {name: x.clone() for name, x in tensors.items()}
    zeroed = {name: x.clone() for name, x in tensors.items()}
    index = (row, head if where == "query" else head // 2, position, 3)
    poisoned[where][index], zeroed[where][index] = bad, 0.0

    def run(inputs):
        inputs = [x.detach().requires_grad_(train) for x in (inputs["query"], inputs["key"], inputs["value"])]
        with torch.set_grad_enabled(train):
            return dga_attention(*inputs, SPARSE, backend=backend, padding_mask=mask).detach()

    out, expected = run(poisoned), run(zeroed)
    nan = torch.zeros_like(out, dtype=torch.bool)
    if where == "query":
        nan[row, head, position] = True
    else:
        nan[row, 0:2, position:] = True  # both query heads of kv head 0
    assert torch.isnan(out).equal(nan)
    torch.testing.assert_close(out[~nan], expected[~nan], atol=0, rtol=0)
    # the queries before the position agree with dense attention's behaviour for a non-finite key: finite
    assert torch.isfinite(out[row, :, :position]).all()
    # in a padded position the value is never read: no NaN anywhere
    padded = {name: x.clone() for name, x in tensors.items()}
    padded[where][(row,) + index[1:2] + (3, 3)] = bad
    torch.testing.assert_close(run(padded), run(tensors), atol=0, rtol=0)
