"""The backward pass of the Triton stage-5 kernel (`triton_backend.attend_forward` / `attend_backward`).

All seven gradients (query, key, value, focal keys/values, aggregate keys/values), the output and the
logsumexp are compared with autograd through `stage5_reference` (`dga_hf.ops.naive.stage5`, the
differentiable transcription of docs/spec.md step 5) in float64 on the same inputs and the same layout,
and (fp32) with the PyTorch backend's `attend_backward`. Devices as tests/conftest.py and tests/helpers.py set them up:
``cpu`` runs the kernels in Triton's interpreter, ``cuda`` the compiled kernels. The GPU-only cases
check the benchmark's shape and presets (``dga_hf.bench.attention`` does not check correctness itself).

Shapes are tiny (the interpreter is slow) and the tiles explicit and small, chosen so that every loop of
the kernels runs: several query tiles and key chunks, the unmasked and the masked chunks of every stream
in the dq kernel, and in the key-major dk/dv kernels the unmasked query tiles of the focal and aggregate
streams ("L90-G4-unmasked") and the unmasked middle and masked tail of the raw-key stream
("L70-window": a 32-token local window wider than the 16-key chunks).
"""

from __future__ import annotations

import pytest
import torch

from helpers import CFG_A, CFG_B, CFG_C, CFG_D, CUDA_COMPILED, DEVICES, INTERPRET, NOT_CUDA_COMPILED  # noqa: I001

pytest.importorskip("triton", reason="triton is not installed")

from dga_hf.bench.attention import PRESETS as BENCH_PRESETS  # noqa: E402
from dga_hf.bench.attention_workload import LLAMA3_8B, random_qkv, stage5_inputs  # noqa: E402
from dga_hf.config import DGAConfig  # noqa: E402
from dga_hf.ops import dga_attention, naive_dga_attention, torch_backend, triton_backend  # noqa: E402
from dga_hf.ops.layout import build_layout  # noqa: E402
from dga_hf.ops.naive import stage5_logits, stage5_reference  # noqa: E402

CFG_WINDOW = DGAConfig(group_size=4, focal_ratio=0.2, probe_queries=8, local_blocks=8)
NAMES = ("query", "key", "value", "focal_key", "focal_value", "agg_key", "agg_value")

# (batch, kv heads, G, L, d, config, lengths, block_rows, block_n)
CASES = {
    "L17-G3-pad-n2": (2, 1, 3, 17, 64, CFG_D, [17, 9], 16, 16),
    "L33-G4-sink-bias-n3": (1, 1, 4, 33, 64, CFG_B, None, 32, 16),
    "L70-G8-pad-empty-row": (2, 1, 8, 70, 64, CFG_C, [70, 0], 64, 16),
    "L90-G4-unmasked": (2, 1, 4, 90, 64, CFG_A, [90, 77], 32, 16),
    "L70-window": (1, 2, 1, 70, 64, CFG_WINDOW, None, 16, 16),
    "L70-G1-default-tiles": (1, 1, 1, 70, 64, CFG_A, None, None, None),
    "d80-G3": (1, 1, 3, 21, 80, CFG_A, None, 16, 16),
    "d96-G4": (1, 1, 4, 21, 96, CFG_D, None, 32, 16),
    "d128-G2-n3": (1, 1, 2, 21, 128, CFG_B, None, 16, 32),
    # query-aware expansion (docs/spec.md step 6): E = 1, a few, more than the blocks (every old block);
    # block sizes below, at and above the 16-member chunk of the key-major expansion kernel
    "E1-G3-pad-d128": (2, 1, 3, 37, 128, CFG_D.replace(expand_blocks=1), [37, 22], 16, 16),
    "E3-G4-sink-bias-n3": (1, 2, 4, 45, 64, CFG_B.replace(expand_blocks=3), None, 32, 16),
    "E-all-G8-pad-empty-row": (2, 1, 8, 42, 64, CFG_A.replace(expand_blocks=11), [42, 0], 64, 16),
    "E2-G1-m20": (1, 1, 1, 70, 64, CFG_C.replace(group_size=20, expand_blocks=2), [61], 16, 16),
    "E2-G4-m16-default-tiles": (1, 1, 4, 90, 64, CFG_C.replace(expand_blocks=2), None, None, None),
    "E3-G4-sink-bias-n3-principal": (1, 2, 4, 45, 64, CFG_B.replace(expand_blocks=3, expand_score="principal"), None,
                                     32, 16),
}
# the kernels compile once per head dim / tiles / config: the GPU run (scripts/gpu_check.sh, one time-boxed
# step) takes the cases that run every loop, and test_cuda_long_rows_default_tiles the real shapes
CUDA_CASES = ("L70-G8-pad-empty-row", "L90-G4-unmasked", "L70-window", "E3-G4-sink-bias-n3", "E-all-G8-pad-empty-row")


def _tol(device: str, dtype: torch.dtype) -> float:
    """Relative to the largest |value| of each reference tensor (and elementwise rtol)."""
    if dtype == torch.float32:
        # interpreter: exact fp32 dots (errors ~5e-7 here); GPU: tf32x3 dots, about fp32 accuracy
        return 1e-5 if device == "cpu" else 5e-5
    # 16-bit: the forward rounds P to the input dtype before P.V and stores O rounded; the backward rounds
    # P and dS before their dots (as FlashAttention does) and D = rowsum(dO * O) sees the rounded O. The
    # gradients carry a few units of the format's epsilon (bf16 2^-8: measured <= 7e-3 of the largest
    # gradient; fp16 2^-11: <= 5e-4).
    return 3e-2 if dtype == torch.bfloat16 else 3e-3


def _setup(case: str, device: str, dtype=torch.float32, seed=0):
    """Inputs rounded to ``dtype`` (kept fp32), the layout (its tensors also rounded to ``dtype``, so the
    kernels' cast to the query dtype is exact and the reference sees the same numbers), grad_out."""
    batch, heads, group, seq_len, dim, cfg, lengths, rows, block_n = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, group, seq_len, dim, generator=gen)
    k = torch.randn(batch, heads, seq_len, dim, generator=gen)
    v = torch.randn(batch, heads, seq_len, dim, generator=gen)
    grad_out = torch.randn(batch, heads, group, seq_len, dim, generator=gen)
    q, k, v, grad_out = (x.to(dtype).float().to(device) for x in (q, k, v, grad_out))
    lens = torch.tensor([seq_len] * batch if lengths is None else lengths, device=device)
    scale = dim**-0.5
    layout = build_layout(q, k, v, lens, cfg, scale)
    for name in NAMES[3:]:
        setattr(layout, name, getattr(layout, name).to(dtype).float())
    return q, k, v, grad_out, layout, cfg, scale, {"block_rows": rows, "block_n": block_n}


def _reference(q, k, v, grad_out, layout, cfg, scale):
    """out, lse and the seven gradients in float64, by autograd through stage5_reference; lse is the
    log-sum-exp of `stage5_logits` (-inf for padded rows)."""
    leaves = [x.double().requires_grad_() for x in (q, k, v, *(getattr(layout, n) for n in NAMES[3:]))]
    out = stage5_reference(*leaves, layout, cfg, scale)
    out.backward(grad_out.double())
    detached = [x.detach() for x in leaves]
    logits = stage5_logits(detached[0], detached[1], detached[3], detached[5], layout, cfg, scale)
    return out.detach(), torch.logsumexp(logits, dim=-1), [x.grad for x in leaves]


def _assert_close(got: torch.Tensor, expected: torch.Tensor, tol: float, name: str) -> None:
    got = got.double()
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(got), finite), f"{name}: non-finite entries differ"
    atol = tol * float(expected[finite].abs().max()) if finite.any() else tol
    torch.testing.assert_close(got[finite], expected[finite], atol=atol, rtol=tol, msg=lambda m: f"{name}: {m}")


def _run(q, k, v, grad_out, layout, cfg, scale, dtype, tiles):
    out, lse = triton_backend.attend_forward(q.to(dtype), k.to(dtype), v.to(dtype), layout, cfg, scale, **tiles)
    grads = triton_backend.attend_backward(q.to(dtype), k.to(dtype), v.to(dtype), layout, cfg, scale, out, lse,
                                           grad_out.to(dtype), **tiles)
    return out, lse, grads


def _check(case: str, device: str, dtype=torch.float32, seed=0):
    q, k, v, grad_out, layout, cfg, scale, tiles = _setup(case, device, dtype, seed)
    out, lse, grads = _run(q, k, v, grad_out, layout, cfg, scale, dtype, tiles)
    ref_out, ref_lse, ref_grads = _reference(q, k, v, grad_out, layout, cfg, scale)
    tol = _tol(device, dtype)

    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == out.shape[:-1]
    _assert_close(out, ref_out, tol, "out")
    _assert_close(lse, ref_lse, tol, "lse")
    expected_dtypes = [dtype] * 3 + [torch.float32] * 4  # the layout's tensors are fp32: so are their grads
    for name, got, expected, want in zip(NAMES, grads, ref_grads, expected_dtypes):
        assert got.shape == expected.shape and got.dtype == want, (name, got.shape, got.dtype)
        _assert_close(got, expected, tol, name)

    # padding: padded query rows have zero gradient, keys past the length get none
    padded = torch.arange(q.shape[3], device=q.device)[None, :] >= layout.lengths[:, None]  # [B, L]
    assert (grads[0].permute(0, 3, 1, 2, 4)[padded] == 0).all()
    assert (grads[1].permute(0, 2, 1, 3)[padded] == 0).all() and (grads[2].permute(0, 2, 1, 3)[padded] == 0).all()
    return q, k, v, grad_out, layout, cfg, scale, grads


def _cases_for(device_param):
    device = device_param.values[0]
    return [pytest.param(case, device_param.values[0], marks=device_param.marks, id=f"{case}-{device}")
            for case in CASES if device == "cpu" or case in CUDA_CASES]


@pytest.mark.parametrize("case,device", [p for d in DEVICES for p in _cases_for(d)])
def test_gradients_match_reference_fp32(case, device):
    """Against the float64 reference, and against the PyTorch backend's attend_backward (fp32, same
    layout, its own saved out/lse)."""
    q, k, v, grad_out, layout, cfg, scale, grads = _check(case, device)
    out, lse = torch_backend.attend_forward(q, k, v, layout, cfg, scale)
    expected = torch_backend.attend_backward(q, k, v, layout, cfg, scale, out, lse, grad_out)
    for name, got, ref in zip(NAMES, grads, expected):
        _assert_close(got, ref.double(), _tol(device, torch.float32), f"{name} vs torch_backend")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype,case",
    [(torch.bfloat16, "L17-G3-pad-n2"), (torch.bfloat16, "L70-G1-default-tiles"), (torch.float16, "L33-G4-sink-bias-n3"),
     (torch.bfloat16, "E3-G4-sink-bias-n3"), (torch.float16, "E1-G3-pad-d128")],
    ids=["bf16", "bf16-default-tiles", "fp16", "bf16-expand", "fp16-expand"],
)
def test_gradients_match_reference_16bit(dtype, case, device):
    _check(case, device, dtype, seed=1)


def test_expanding_queries_inverts_the_expansion():
    """Per kv head and block, the real queries that expand it, ascending: what the key-major expansion
    kernel walks (`triton_expand_backward.expanding_queries`), against a loop over the layout."""
    from dga_hf.ops.triton_expand_backward import expanding_queries

    q, k, v, _, layout, cfg, _, _ = _setup("E3-G4-sink-bias-n3", "cpu")
    layout.lengths = torch.tensor([37])  # the queries past it are padding: never listed
    offsets, queries = expanding_queries(layout.expanded, layout.lengths, layout.agg_key.shape[2])
    batch, heads, seq_len, _ = layout.expanded.shape
    num_blocks = layout.agg_key.shape[2]
    assert offsets.dtype == queries.dtype == torch.int32 and offsets.shape == (batch * heads * num_blocks + 1,)
    for bh in range(batch * heads):
        chosen = layout.expanded.flatten(0, 1)[bh]  # [L, X]
        for block in range(num_blocks):
            expected = [i for i in range(37) if block in chosen[i].tolist()]
            slot = bh * num_blocks + block
            assert queries[offsets[slot]:offsets[slot + 1]].tolist() == expected, (bh, block)
    assert int(offsets[-1]) == int(((layout.expanded < num_blocks)[:, :, :37]).sum()) > 0


def test_float64_falls_back_to_torch_backend():
    q, k, v, grad_out, layout, cfg, scale, _ = _setup("L17-G3-pad-n2", "cpu")
    q, k, v, grad_out = q.double(), k.double(), v.double(), grad_out.double()
    for name in NAMES[3:]:
        setattr(layout, name, getattr(layout, name).double())
    out, lse = triton_backend.attend_forward(q, k, v, layout, cfg, scale)
    ref_out, ref_lse = torch_backend.attend_forward(q, k, v, layout, cfg, scale)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref_out, atol=0, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=0, rtol=0)
    grads = triton_backend.attend_backward(q, k, v, layout, cfg, scale, out, lse, grad_out)
    expected = torch_backend.attend_backward(q, k, v, layout, cfg, scale, out, lse, grad_out)
    for got, ref in zip(grads, expected):
        torch.testing.assert_close(got, ref, atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg", [CFG_B, CFG_B.replace(expand_blocks=2), CFG_B.replace(expand_blocks=2, expand_score="principal")],
                         ids=["E0", "E2", "E2-principal"])
def test_dispatch_gradients_match_naive(cfg, device):
    """Whole path: dga_attention(backend="triton") with left padding, gradients of q, k, v (through the
    layout's gathers and aggregates too) against autograd through the float64 naive transcription."""
    batch, kv_heads, group, seq_len, dim = 2, 1, 2, 23, 64
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(batch, kv_heads * group, seq_len, dim, generator=gen)
    k = torch.randn(batch, kv_heads, seq_len, dim, generator=gen)
    v = torch.randn(batch, kv_heads, seq_len, dim, generator=gen)
    grad_out = torch.randn(batch, kv_heads * group, seq_len, dim, generator=gen)
    mask = torch.arange(seq_len)[None, :] >= torch.tensor([0, 6])[:, None]
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    naive_dga_attention(*leaves, cfg, padding_mask=mask).backward(grad_out.double())
    inputs = [x.to(device).requires_grad_() for x in (q, k, v)]
    out = dga_attention(*inputs, cfg, backend="triton", padding_mask=mask.to(device))
    out.backward(grad_out.to(device))
    for name, got, ref in zip(NAMES, inputs, leaves):
        _assert_close(got.grad.cpu(), ref.grad, 5e-5, name)


def _check_training_on_bench_inputs(device, seq_len, q_heads, kv_heads, head_dim, dtype, config):
    """Gradients, Triton against the PyTorch backend on the benchmark's inputs and layout
    (`dga_hf.bench.attention_workload`): stage 5 alone on one layout (the Triton ``attend_forward`` /
    ``attend_backward`` fed the model dtype, against the PyTorch backend's in fp32), and the whole path
    (autograd through ``dga_attention``, gradients of q, k, v)."""
    q, k, v = random_qkv(seq_len, device, dtype, q_heads, kv_heads, head_dim, seed=2)
    grad_out = random_qkv(seq_len, device, dtype, q_heads, kv_heads, head_dim, seed=3)[0]
    tol = _tol(device, dtype)

    q32, k32, v32, scale, build = stage5_inputs(q, k, v, config)
    layout = build()
    out, lse = torch_backend.attend_forward(q32, k32, v32, layout, config, scale)
    expected = torch_backend.attend_backward(q32, k32, v32, layout, config, scale, out, lse, grad_out.float().view_as(q32))
    grouped = q.view_as(q32)
    out, lse = triton_backend.attend_forward(grouped, k, v, layout, config, scale)
    grads = triton_backend.attend_backward(grouped, k, v, layout, config, scale, out, lse, grad_out.view_as(q32))
    for name, got, ref in zip(NAMES, grads, expected):
        _assert_close(got, ref.double(), tol, f"stage 5 {name}")
    del grads, expected, out, lse, layout, q32, k32, v32

    grads = {}
    for backend in ("triton", "torch"):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        dga_attention(*leaves, config, backend=backend).backward(grad_out)
        grads[backend] = [x.grad for x in leaves]
    for name, got, ref in zip(NAMES, grads["triton"], grads["torch"]):
        _assert_close(got, ref.double(), tol, f"whole path {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_match_torch_backend_on_bench_inputs(device):
    _check_training_on_bench_inputs(device, 40, 4, 2, 64, torch.float32, CFG_C)


@pytest.mark.skipif(not CUDA_COMPILED, reason=NOT_CUDA_COMPILED)
@pytest.mark.parametrize("preset", BENCH_PRESETS)
def test_cuda_gradients_match_torch_backend_at_bench_shape(preset):
    """The benchmark's shape (Llama-3-8B attention, bf16) and presets, at 4K tokens."""
    _check_training_on_bench_inputs("cuda", 4096, LLAMA3_8B["q_heads"], LLAMA3_8B["kv_heads"], LLAMA3_8B["head_dim"],
                                    torch.bfloat16, DGAConfig.preset(preset))


@pytest.mark.skipif(
    not INTERPRET,
    reason="runs the Triton kernels on CPU tensors, which needs TRITON_INTERPRET=1 (as `make test` and CI set it); "
    "on a GPU machine scripts/gpu_check.sh runs the real training table",
)
def test_bench_training_table_cpu_dry_run(tmp_path):
    """run_training end to end at a tiny shape on CPU: the table is added to an existing prefill report."""
    import json

    from dga_hf.bench.attention import run_training

    (tmp_path / "attention.json").write_text(json.dumps(
        {"meta": {"device": "x", "shape": {}, "torch": "t", "repeats": 1, "fp32_dot_precision": "ieee"},
         "results": [{"method": "sdpa_flash", "seq_len": 8, "ms": 1.0}]}))
    cfg = CFG_C.replace(min_seq_len=0, group_size=4)
    report = run_training([40], tmp_path, repeats=1, device="cpu",
                          shape={"q_heads": 2, "kv_heads": 1, "head_dim": 16},
                          configs={"tiny": cfg, "tiny_e2": cfg.replace(expand_blocks=2)}, dtype=torch.float32)
    saved = json.loads((tmp_path / "attention.json").read_text())
    assert saved["results"][0]["method"] == "sdpa_flash"  # the prefill part is kept
    training = saved["training"]
    assert training["meta"]["complete"] and report["training"]["meta"]["complete"]
    methods = {r["method"]: r for r in training["results"]}
    for method in ("dga_tiny_train", "kernel_tiny_fp32_train", "dga_tiny_e2_train", "kernel_tiny_e2_fp32_train"):
        assert "ms" in methods[method], methods[method]
    assert 0 < methods["dga_tiny_train"]["useful_pairs"] < methods["dga_tiny_e2_train"]["useful_pairs"]
    markdown = (tmp_path / "attention.md").read_text()
    assert "## Training (forward + backward)" in markdown and "| 40 | dga_tiny_train |" in markdown


@pytest.mark.skipif(not CUDA_COMPILED, reason=NOT_CUDA_COMPILED)
@pytest.mark.parametrize("dtype,expand_blocks", [(torch.bfloat16, 0), (torch.float32, 0), (torch.bfloat16, 16)])
def test_cuda_long_rows_default_tiles(dtype, expand_blocks):
    """Real shapes on the GPU with default tiles: several thousand tokens, GQA 4, padding, with and without
    query-aware expansion; against the PyTorch backend's attend_backward in fp32 on the same rounded inputs."""
    cfg = DGAConfig.preset("default").replace(expand_blocks=expand_blocks)
    gen = torch.Generator().manual_seed(11)
    batch, heads, group, seq_len, dim = 2, 2, 4, 3000, 128
    q, grad_out = (torch.randn(batch, heads, group, seq_len, dim, generator=gen).to(dtype).float().cuda() for _ in range(2))
    k, v = (torch.randn(batch, heads, seq_len, dim, generator=gen).to(dtype).float().cuda() for _ in range(2))
    lens = torch.tensor([3000, 2222], device="cuda")
    scale = dim**-0.5
    layout = build_layout(q, k, v, lens, cfg, scale)
    for name in NAMES[3:]:
        setattr(layout, name, getattr(layout, name).to(dtype).float())
    out, lse = triton_backend.attend_forward(q.to(dtype), k.to(dtype), v.to(dtype), layout, cfg, scale)
    grads = triton_backend.attend_backward(q.to(dtype), k.to(dtype), v.to(dtype), layout, cfg, scale, out, lse,
                                           grad_out.to(dtype))
    ref_out, ref_lse = torch_backend.attend_forward(q, k, v, layout, cfg, scale)
    expected = torch_backend.attend_backward(q, k, v, layout, cfg, scale, ref_out, ref_lse, grad_out)
    tol = _tol("cuda", dtype)
    _assert_close(lse, ref_lse.double(), tol, "lse")
    for name, got, ref in zip(NAMES, grads, expected):
        _assert_close(got, ref.double(), tol, name)
