"""The Triton kernels of a DGA decoding step (dga_hf/ops/triton_decode.py).

A DGACache whose config has ``backend="triton"`` runs its one-token steps in these kernels. They are checked
step by step against the float64 transcription of the decode rule (dga_hf.ops.naive.naive_decode: refreshes,
block expansion, compact and keep_full, rows still dense) and, where the transcription's fixed head
layout does not fit (GQA 1/3/4/8, head dims 64/80/96/128, left padding, bf16), against the PyTorch path of
the same cache, which test_decoding checks against the transcription.

Devices as tests/helpers.py sets them up: ``cpu`` runs the kernels in Triton's
interpreter, ``cuda`` the compiled kernels. The chunks are made small (16 keys, one dot per program) so
that at these lengths every stream spans one or more chunks and some chunks end part-way.
"""

from __future__ import annotations

import pytest
import torch

from helpers import DECODE_CFG, DEVICES, INTERPRET, decode_qkv, decode_reference, run_cache, triton_decoding

pytest.importorskip("triton", reason="triton is not installed")

from dga_hf import DGAConfig  # noqa: E402
from dga_hf.ops import triton_decode  # noqa: E402


@pytest.fixture
def kernel_calls(request, monkeypatch):
    """Counts the decode kernel's launches; small chunks unless the test is marked `default_chunks`."""
    calls = []
    original = triton_decode.attend_step
    small = {} if request.node.get_closest_marker("default_chunks") else {"block_n": 16, "chunk_iters": 1}

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **small, **kwargs)

    monkeypatch.setattr(triton_decode, "attend_step", counted)
    return calls


def _on(device, *tensors):
    return [t.to(device) for t in tensors]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "mode,expand,every,cfg",
    [
        ("keep_full", 3, 5, DECODE_CFG),
        ("keep_full", 0, None, DECODE_CFG.replace(local_blocks=1, sink_tokens=0, group_bias="none")),
        ("compact", 0, 5, DECODE_CFG),
        ("keep_full", 2, 4, DECODE_CFG.replace(group_size=4, local_blocks=3, focal_ratio=0.15, min_seq_len=76)),
        ("keep_full", 3, 5, DECODE_CFG.replace(expand_score="principal")),
    ],
    ids=["keep_full-expand-refresh", "keep_full-one-local-block", "compact-refresh", "m4-n3-dense-rows-switch",
         "keep_full-expand-principal-refresh"],
)
def test_steps_match_the_transcription(mode, expand, every, cfg, device, kernel_calls):
    cfg = cfg.replace(expand_blocks=expand)
    q, k, v = decode_qkv(1, 86, seed=21)
    steps = [1] * 16
    expected = decode_reference(q, k, v, cfg, 70, steps, mode, every)
    q, k, v = _on(device, q.float(), k.float(), v.float())
    out, cache = run_cache(q, k, v, triton_decoding(cfg), 70, steps, mode, every)
    assert cache.layers[0].state.fused and len(kernel_calls) == len(steps)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double().cpu(), expected, atol=2e-5, rtol=1e-5)


def _random(batch, kv_heads, group, length, dim, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * group, length, dim, generator=gen) * 1.5
    k = torch.randn(batch, kv_heads, length, dim, generator=gen) * 1.5
    v = torch.randn(batch, kv_heads, length, dim, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _both_paths(device, q, k, v, cfg, prompt, steps, mode, every, mask=None):
    torch_out, _ = run_cache(q, k, v, cfg.replace(backend="torch"), prompt, steps, mode, every, mask=mask)
    q, k, v = _on(device, q, k, v)
    mask = None if mask is None else mask.to(device)
    fused, cache = run_cache(q, k, v, triton_decoding(cfg), prompt, steps, mode, every, mask=mask)
    return torch_out, fused.cpu(), cache


CFG_GQA = DGAConfig(group_size=4, focal_ratio=0.2, probe_queries=6, local_blocks=3, sink_tokens=2, group_bias="log_size")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "group,dim,mode",
    [(1, 64, "keep_full"), (3, 80, "compact"), (4, 96, "keep_full"), (8, 128, "keep_full")],
    ids=["G1-d64", "G3-d80-compact", "G4-d96", "G8-d128"],
)
def test_gqa_head_dims_and_left_padding_match_the_pytorch_path(group, dim, mode, device, kernel_calls):
    q, k, v = _random(2, 2, group, 84, dim, seed=group * dim)
    mask = torch.ones(2, 84, dtype=torch.bool)
    mask[1, :19] = False  # row 1: 51 real prompt tokens
    mask[1, 77] = False  # ... and one padded new token (its row outputs zeros, its state is left as it was)
    steps = [1] * 14
    cfg = CFG_GQA.replace(expand_blocks=3 if mode == "keep_full" else 0)
    expected, got, cache = _both_paths(device, q, k, v, cfg, 70, steps, mode, 6, mask)
    assert cache.layers[0].state.fused and len(kernel_calls) == len(steps)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    assert got[1, :, 77].abs().max() == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.default_chunks
def test_bfloat16_with_default_chunks_stays_close_to_float32(device, kernel_calls):
    """bf16 state, fp32 logits and accumulation in the kernel: measured against the float32 PyTorch path on
    the same rounded inputs (the bf16 PyTorch path is as far off: max 0.023, mean 0.0012)."""
    q, k, v = _random(1, 2, 4, 90, 64, seed=5, dtype=torch.bfloat16)
    steps = [1] * 10
    cfg = CFG_GQA.replace(expand_blocks=4)
    _, got, _ = _both_paths(device, q, k, v, cfg, 72, steps, "keep_full", 5)
    assert got.dtype == torch.bfloat16 and len(kernel_calls) == len(steps)
    reference_fp32, _ = run_cache(q.float(), k.float(), v.float(), cfg.replace(backend="torch"), 72, steps, "keep_full", 5)
    error = (got.float() - reference_fp32)[:, :, 72:].abs()
    assert error.max() < 0.03 and error.mean() < 2e-3, (error.max(), error.mean())


def test_float64_and_chunked_steps_take_the_pytorch_path(kernel_calls):
    """The kernels have no float64 path and take one token per row: float64 caches and multi-token steps
    (chunked prefill) run the PyTorch streams, with the same results as a torch-backend cache."""
    q, k, v = decode_qkv(1, 100, seed=3)
    expanding = DECODE_CFG.replace(expand_blocks=2)
    out, cache = run_cache(q, k, v, triton_decoding(expanding), 70, [1] * 5, "keep_full", 4)
    assert not cache.layers[0].state.fused and not kernel_calls
    expected, _ = run_cache(q, k, v, expanding, 70, [1] * 5, "keep_full", 4)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    cfg = DECODE_CFG.replace(backend="triton")
    out, cache = run_cache(q, k, v, cfg, 70, [1] * 5, "keep_full", 4)
    assert not cache.layers[0].state.fused and not kernel_calls
    expected, _ = run_cache(q, k, v, DECODE_CFG, 70, [1] * 5, "keep_full", 4)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    q, k, v = (x.float() for x in (q, k, v))
    chunked, cache = run_cache(q, k, v, cfg, 60, [12, 1], "compact", None)
    assert cache.layers[0].state.fused and len(kernel_calls) == 1  # only the one-token step
    expected, _ = run_cache(q, k, v, DECODE_CFG, 60, [12, 1], "compact", None)
    torch.testing.assert_close(chunked, expected, atol=2e-5, rtol=1e-5)


def test_attention_step_benchmark_times_both_decode_paths(kernel_calls):
    """On the Triton backend the decoding table has keep_full twice: Triton kernels and PyTorch path."""
    from dga_hf.bench.decoding import attention_step

    rows = attention_step([100], CFG_GQA.replace(backend="triton"), device="cpu", steps=2, q_heads=4, kv_heads=2, head_dim=16)
    assert [(r["cache"], r["backend"]) for r in rows] == [
        ("dense", "sdpa"), ("dense", "sdpa-grouped"), ("keep_full", "triton"), ("compact", "triton"), ("keep_full", "torch")]
    # compact's three steps (one warm-up); keep_full's steps read most of 100 keys, so they are dense steps
    assert len(kernel_calls) == 3


def _streams_reference(query, first, focal, aggregates, expanded, ring, m, scale):
    """The kernels' contract written plainly: per row and kv head, one softmax over the visible keys."""
    (fk, fv, fp), (ak, av, ab), (xmask, xblk, xuse, xk, xv), (rk, rv, rp) = focal, aggregates, expanded, ring
    batch, heads, group, _ = query.shape
    out = torch.zeros(batch, heads, group, rv.shape[-1], dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            keys, values, bias = [], [], []
            for slot in range(fk.shape[2]):
                pos = int(fp[b, h, slot])
                if pos < first[b] and not xmask[b, h, pos // m]:
                    keys.append(fk[b, h, slot]), values.append(fv[b, h, slot]), bias.append(0.0)
            for c in range(ak.shape[2]):
                if c * m < first[b] and not xmask[b, h, c]:
                    keys.append(ak[b, h, c]), values.append(av[b, h, c]), bias.append(float(ab[b, h, c]))
            for e in range(xblk.shape[2]):
                if xuse[b, h, e]:
                    for t in range(int(xblk[b, h, e]) * m, (int(xblk[b, h, e]) + 1) * m):
                        keys.append(xk[b, h, t]), values.append(xv[b, h, t]), bias.append(0.0)
            for slot in range(rk.shape[2]):
                if rp[b, slot] >= first[b]:
                    keys.append(rk[b, h, slot]), values.append(rv[b, h, slot]), bias.append(0.0)
            if keys:
                logits = scale * query[b, h].double() @ torch.stack(keys).double().T + torch.tensor(bias, dtype=torch.float64)
                out[b, h] = torch.softmax(logits, dim=-1) @ torch.stack(values).double()
    return out


def test_kernels_match_a_plain_reference_on_random_streams(kernel_calls):
    """attend_step alone on fresh random streams: hidden focal slots and aggregates of expanded blocks,
    unusable expanded entries, empty ring slots, -inf biases (empty blocks), a row that sees nothing (zeros),
    and strided inputs (copied where the kernels need packed items) give the same result."""
    gen = torch.Generator().manual_seed(13)
    batch, heads, group, dim, m = 3, 2, 3, 32, 4
    old, focal_slots, window, archive = 9, 11, 8, 48

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    first = torch.tensor([36, 20, 0])  # row 2: its window starts at 0: no old block, no focal slot visible
    focal_pos = torch.sort(torch.randint(0, 40, (batch, heads, focal_slots), generator=gen), dim=-1).values
    bias = randn(batch, heads, old).masked_fill(torch.rand(batch, heads, old, generator=gen) < 0.2, float("-inf"))
    mask = torch.zeros(batch, heads, old, dtype=torch.bool)
    blocks = torch.stack([torch.randperm(old, generator=gen)[:2] for _ in range(batch * heads)]).view(batch, heads, 2)
    usable = (blocks * m < first[:, None, None]) & torch.isfinite(bias.gather(2, blocks))
    mask.scatter_(2, blocks, usable)
    ring_pos = torch.randint(-1, 48, (batch, window), generator=gen)
    ring_pos[2] = -1  # row 2 has an empty ring: it sees nothing
    streams = dict(
        focal=(randn(batch, heads, focal_slots, dim), randn(batch, heads, focal_slots, dim), focal_pos),
        aggregates=(randn(batch, heads, old, dim), randn(batch, heads, old, dim), bias),
        expanded=(mask, blocks, usable, randn(batch, heads, archive, dim), randn(batch, heads, archive, dim)),
        ring=(randn(batch, heads, window, dim), randn(batch, heads, window, dim), ring_pos),
    )
    query = randn(batch, heads, group, dim)
    expected = _streams_reference(query, first, **streams, m=m, scale=0.3)
    got = triton_decode.attend_step(query, first, *streams.values(), m, 0.3)
    torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=1e-5)
    assert expected[2].abs().max() == 0 and expected[:2].abs().min() > 0

    def strided(x):  # same values, heads-major storage: stride(0) != H * stride(1)
        return x.transpose(0, 1).contiguous().transpose(0, 1)

    restrided = {name: tuple(strided(x) if x.dim() >= 3 else x for x in parts) for name, parts in streams.items()}
    again = triton_decode.attend_step(query, first, *restrided.values(), m, 0.3)
    torch.testing.assert_close(again, got, atol=0, rtol=0)


def test_plan_rejects_bad_tiles():
    assert triton_decode.plan(torch.bfloat16, 128, 128, 4) == {
        "BLOCK_N": 64, "CHUNK_ITERS": 4, "BLOCK_G": 16, "BLOCK_D": 128, "BLOCK_DV": 128, "num_warps": 4}
    assert triton_decode.plan(torch.float32, 80, 80, 32)["BLOCK_G"] == 32
    with pytest.raises(ValueError, match="power of two"):
        triton_decode.plan(torch.float32, 64, 64, 4, block_n=24)


@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs CUDA (compiled kernels, long rows)")
@pytest.mark.default_chunks
def test_cuda_long_context_shipped_preset(kernel_calls):
    """The shipped preset at 6K tokens, Llama-3 head layout (GQA 4, d 128), bf16, default chunks."""
    cfg = DGAConfig.preset("default")
    q, k, v = _random(1, 2, 4, 6144 + 24, 128, seed=7, dtype=torch.bfloat16)
    expected, got, _ = _both_paths("cuda", q.cuda(), k.cuda(), v.cuda(), cfg, 6144, [1] * 24, "keep_full", None, 64)
    assert len(kernel_calls) == 24
    torch.testing.assert_close(got.float(), expected.float().cpu(), atol=2e-2, rtol=2e-2)
