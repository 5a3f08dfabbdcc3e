"""The Triton backend of stage 5 against the PyTorch backend (same layout) and the naive reference.

Two devices, never both in one process:

* ``cpu``: Triton's interpreter runs the kernel on CPU tensors. Triton picks interpreter or compiler when
  it is first imported, so ``TRITON_INTERPRET=1`` must be in the environment by then; the suite is meant
  to be run as ``TRITON_INTERPRET=1 python -m pytest tests/test_triton_backend.py``. On a machine without
  CUDA this module sets the variable itself when it is absent and triton is not imported yet (no compiled
  kernel can run there anyway); if another module imported triton first, the CPU cases skip and say so.
* ``cuda``: the compiled kernels on a GPU; runs only when CUDA is available and ``TRITON_INTERPRET`` is
  unset (``scripts/gpu_check.sh``).

Skipped as a whole only when triton is not installed. Shapes stay tiny (the interpreter is slow);
explicit small tiles (``block_rows``/``block_n``) make several tiles, unmasked and masked chunks appear
at these lengths.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

# Triton decides interpreter vs compiler when it is imported (its own helpers such as tl.sum are jitted
# then), so the variable must be in the environment before the first `import triton` of the process.
_TRITON_PRELOADED = "triton" in sys.modules
if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ and not _TRITON_PRELOADED:
    os.environ["TRITON_INTERPRET"] = "1"  # CPU-only machine: the interpreter is the only way to run the kernel
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")

pytest.importorskip("triton", reason="triton is not installed")

from dga_hf.config import DGAConfig  # noqa: E402
from dga_hf.ops import dga_attention, naive_dga_attention, torch_backend, triton_backend  # noqa: E402
from dga_hf.ops.layout import build_layout  # noqa: E402

DEVICES = [
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(
            not INTERPRET,
            reason="the CPU path runs the kernel in Triton's interpreter: set TRITON_INTERPRET=1 in the "
            "environment before triton is first imported",
        ),
    ),
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            INTERPRET or not torch.cuda.is_available(),
            reason="compiled kernels need CUDA and TRITON_INTERPRET unset",
        ),
    ),
]


def _tol(device: str, dtype: torch.dtype) -> dict:
    if dtype == torch.float32:
        # interpreter: exact fp32 dots; GPU: tf32x3 dots (about fp32 accuracy)
        return {"atol": 2e-5, "rtol": 1e-5} if device == "cpu" else {"atol": 5e-5, "rtol": 2e-5}
    return {"atol": 2e-2, "rtol": 2e-2}


def _inputs(batch, heads, group, seq_len, dim, device, seed=0, lengths=None):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, group, seq_len, dim, generator=gen)
    k = torch.randn(batch, heads, seq_len, dim, generator=gen)
    v = torch.randn(batch, heads, seq_len, dim, generator=gen)
    lens = torch.full((batch,), seq_len) if lengths is None else torch.tensor(lengths)
    return q.to(device), k.to(device), v.to(device), lens.to(device)


def _compare(device, batch, heads, group, seq_len, dim, cfg, *, lengths=None, rows=None, block_n=None,
             dtype=torch.float32, seed=0):
    q, k, v, lens = _inputs(batch, heads, group, seq_len, dim, device, seed, lengths)
    if dtype != torch.float32:  # reference on the same rounded inputs, computed in fp32
        q, k, v = (x.to(dtype).float() for x in (q, k, v))
    scale = dim**-0.5
    layout = build_layout(q, k, v, lens, cfg, scale)
    expected = torch_backend.attend(q, k, v, layout, cfg, scale)
    got = triton_backend.attend(q.to(dtype), k.to(dtype), v.to(dtype), layout, cfg, scale,
                                block_rows=rows, block_n=block_n)
    assert got.dtype == dtype and got.shape == expected.shape
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), expected, **_tol(device, dtype))
    padded = torch.arange(seq_len, device=lens.device)[None, :] >= lens[:, None]  # [B, L]
    assert (got.float().permute(0, 3, 1, 2, 4)[padded] == 0).all()


CFG_A = DGAConfig(group_size=4, focal_ratio=0.25, probe_queries=8, local_blocks=1)
CFG_B = DGAConfig(group_size=4, focal_ratio=0.2, probe_queries=6, local_blocks=3, sink_tokens=2, group_bias="log_size")
CFG_C = DGAConfig(group_size=16, focal_ratio=0.1, probe_queries=8, local_blocks=1)
CFG_D = DGAConfig(group_size=8, focal_ratio=0.15, probe_queries=8, local_blocks=2)

# (batch, kv heads, G, L, d, config, lengths, block_rows, block_n)
CASES = {
    "L1": (1, 1, 1, 1, 64, CFG_A, None, 16, 16),
    "L5-h2": (1, 2, 1, 5, 64, CFG_A, None, 16, 16),
    "L17-G3-pad": (2, 1, 3, 17, 64, CFG_D, [17, 9], 16, 16),
    "L33-G4-sink-bias": (1, 1, 4, 33, 64, CFG_B, None, 32, 16),
    "L70-G8-pad": (2, 1, 8, 70, 64, CFG_C, [70, 41], 64, 16),
    "L70-G4-n3": (1, 2, 4, 70, 64, CFG_B, None, 32, 16),
    "L70-G1-default-tiles": (1, 1, 1, 70, 64, CFG_A, None, None, None),
    "d80": (1, 1, 2, 21, 80, CFG_A, None, 16, 16),
    "d96": (1, 1, 2, 21, 96, CFG_D, None, 32, 16),
    "d128": (1, 1, 2, 21, 128, CFG_B, None, 16, 32),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_torch_backend_fp32(case, device):
    batch, heads, group, seq_len, dim, cfg, lengths, rows, block_n = CASES[case]
    _compare(device, batch, heads, group, seq_len, dim, cfg, lengths=lengths, rows=rows, block_n=block_n)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype,rows,block_n",
    [(torch.bfloat16, 32, 16), (torch.bfloat16, None, None), (torch.float16, 16, 32)],
    ids=["bf16", "bf16-default-tiles", "fp16"],
)
def test_matches_torch_backend_16bit(dtype, rows, block_n, device):
    _compare(device, 2, 1, 4, 70, 64, CFG_D, lengths=[70, 50], rows=rows, block_n=block_n, dtype=dtype, seed=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "group,seq_len,cfg,left_pad",
    [
        (4, 33, CFG_A, [0, 7]),
        (3, 17, CFG_B, [5, 0]),
        (1, 40, CFG_C.replace(min_seq_len=24), [0, 20]),  # second row shorter than min_seq_len: dense
        (2, 12, CFG_A, [0, 12]),  # an all-padding row: zeros, no NaN
    ],
    ids=["G4-L33", "G3-L17", "G1-L40-minlen", "G2-empty-row"],
)
def test_dispatch_matches_naive(group, seq_len, cfg, left_pad, device):
    """dga_attention(backend="triton") with left padding, against the float64 transcription of the spec."""
    batch, kv_heads, dim = len(left_pad), 2, 64
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(batch, kv_heads * group, seq_len, dim, generator=gen)
    k = torch.randn(batch, kv_heads, seq_len, dim, generator=gen)
    v = torch.randn(batch, kv_heads, seq_len, dim, generator=gen)
    mask = torch.arange(seq_len)[None, :] >= torch.tensor(left_pad)[:, None]
    expected = naive_dga_attention(q, k, v, cfg, padding_mask=mask)
    got = dga_attention(q.to(device), k.to(device), v.to(device), cfg, backend="triton", padding_mask=mask.to(device))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double().cpu(), expected, atol=5e-5, rtol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_full_focal_is_dense(device):
    """focal_ratio = 1: every earlier token is focal, so the result is dense causal attention."""
    q, k, v, lens = _inputs(1, 2, 2, 30, 64, device, seed=5)
    cfg = CFG_A.replace(focal_ratio=1.0)
    scale = 64**-0.5
    layout = build_layout(q, k, v, lens, cfg, scale)
    got = triton_backend.attend(q, k, v, layout, cfg, scale, block_rows=16, block_n=16)
    logits = scale * q.double() @ k.double()[:, :, None].transpose(-1, -2)  # [B, H, G, L, L]
    causal = torch.ones(30, 30, dtype=torch.bool, device=q.device).tril()
    dense = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1) @ v.double()[:, :, None]
    torch.testing.assert_close(got.double(), dense, **_tol(device, torch.float32))


def test_float64_falls_back_to_torch_backend():
    q, k, v, lens = _inputs(1, 1, 2, 9, 16, "cpu", seed=7)
    q, k, v = q.double(), k.double(), v.double()
    layout = build_layout(q, k, v, lens, CFG_A, 0.25)
    got = triton_backend.attend(q, k, v, layout, CFG_A, 0.25)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, torch_backend.attend(q, k, v, layout, CFG_A, 0.25), atol=0, rtol=0)


def test_plan_shares_keys_across_query_heads():
    plan = triton_backend.plan(4, torch.bfloat16, 128, 128)
    assert plan["HEADS_PER_PROG"] * plan["BLOCK_M"] == 128 and plan["HEAD_CHUNKS"] == 1 and plan["BLOCK_D"] == 128
    assert triton_backend.plan(3, torch.bfloat16, 80, 80)["HEAD_CHUNKS"] == 3
    assert triton_backend.plan(8, torch.float32, 96, 96)["BLOCK_D"] == 128
    with pytest.raises(ValueError, match="powers of two"):
        triton_backend.plan(1, torch.float32, 64, 64, block_rows=24)


@pytest.mark.parametrize("device", DEVICES)
def test_bench_correctness_check_runs(device):
    """The benchmark's pre-timing check (triton vs torch backend on one size), at a tiny size."""
    from dga_hf.bench.attention import check_backends

    report = check_backends(seq_len=40, device=device, q_heads=4, kv_heads=2, head_dim=64,
                            dtype=torch.float32, config=CFG_C)
    assert report["max_abs_err"] < 1e-4, report


@pytest.mark.parametrize(
    "preset,dtype", [("default", torch.bfloat16), ("paper", torch.bfloat16), ("paper", torch.float32)]
)
@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs CUDA (compiled kernels, long rows)")
def test_cuda_long_rows_default_tiles(preset, dtype):
    """Real shapes on the GPU: default tiles, several thousand tokens, GQA 4, padding."""
    cfg = DGAConfig.preset(preset)
    _compare("cuda", 2, 2, 4, 3000, 128, cfg, lengths=[3000, 2222], dtype=dtype, seed=11)
