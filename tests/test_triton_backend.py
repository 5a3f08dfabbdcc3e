"""The Triton backend of stage 5 against the PyTorch backend (same layout) and the naive reference, and
the kernels' tile plan and rule twin (`dga_hf.ops.triton_plan`, `dga_hf.ops.triton_common`) against
their PyTorch sides.

Devices (``cpu``: Triton's interpreter, ``cuda``: compiled kernels) as tests/conftest.py and tests/helpers.py set them up; the
suite is meant to be run as ``TRITON_INTERPRET=1 python -m pytest tests/test_triton_backend.py``.
Skipped as a whole only when triton is not installed. Shapes stay tiny (the interpreter is slow);
explicit small tiles (``block_rows``/``block_n``) make several tiles, unmasked and masked chunks appear
at these lengths. The GPU-only cases check the benchmark's shape and presets (``dga_hf.bench.attention``
does not check correctness itself).
"""

from __future__ import annotations

from helpers import CFG_A, CFG_B, CFG_C, CFG_D, CUDA_COMPILED, DEVICES, NOT_CUDA_COMPILED  # noqa: I001

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")
import triton.language as tl  # noqa: E402

from dga_hf import rule  # noqa: E402
from dga_hf.bench.attention import PRESETS as BENCH_PRESETS  # noqa: E402
from dga_hf.bench.attention_workload import LLAMA3_8B, executed_pairs, random_qkv, stage5_inputs, visible_pairs  # noqa: E402
from dga_hf.config import DGAConfig  # noqa: E402
from dga_hf.ops import dga_attention, naive_dga_attention, torch_backend, triton_backend, triton_plan  # noqa: E402
from dga_hf.ops.layout import build_layout  # noqa: E402
from dga_hf.ops.naive import stage5_logits  # noqa: E402
from dga_hf.ops.triton_common import first_block_seeing_as_old, first_local_block  # noqa: E402
from dga_hf.ops.triton_expand import expanded_hit, expanded_rows  # noqa: E402
from dga_hf.ops.triton_plan import tile_key_ranges  # noqa: E402


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
# query-aware expansion (docs/spec.md step 6): E = 1, a few, and more than the blocks (every old block)
EXPAND_CASES = {
    "E1-G3-pad": (2, 1, 3, 37, 64, CFG_D.replace(expand_blocks=1), [37, 22], 16, 16),
    "E3-G4-sink-bias-n3": (1, 2, 4, 45, 64, CFG_B.replace(expand_blocks=3), None, 32, 16),
    "E-all-G8-pad": (2, 1, 8, 70, 64, CFG_A.replace(expand_blocks=20), [70, 41], 64, 16),
    "E2-G1-d128": (1, 1, 1, 30, 128, CFG_A.replace(expand_blocks=2), None, 16, 32),
    "E1-m20-G2-d16": (1, 1, 2, 61, 16, CFG_C.replace(group_size=20, expand_blocks=1), None, 16, 16),
    "E2-G4-default-tiles": (1, 1, 4, 70, 64, CFG_D.replace(expand_blocks=2), [50], None, None),
    # the principal score (docs/spec.md step 6) chooses other blocks; the kernels read the layout's choice
    "E1-G3-pad-principal": (2, 1, 3, 37, 64, CFG_D.replace(expand_blocks=1, expand_score="principal"), [37, 22], 16, 16),
    "E3-G4-sink-bias-n3-principal": (1, 2, 4, 45, 64, CFG_B.replace(expand_blocks=3, expand_score="principal"), None,
                                     32, 16),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES) + list(EXPAND_CASES))
def test_matches_torch_backend_fp32(case, device):
    batch, heads, group, seq_len, dim, cfg, lengths, rows, block_n = {**CASES, **EXPAND_CASES}[case]
    _compare(device, batch, heads, group, seq_len, dim, cfg, lengths=lengths, rows=rows, block_n=block_n)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype,rows,block_n",
    [(torch.bfloat16, 32, 16), (torch.bfloat16, None, None), (torch.float16, 16, 32)],
    ids=["bf16", "bf16-default-tiles", "fp16"],
)
@pytest.mark.parametrize("expand_blocks", [0, 2], ids=["E0", "E2"])
def test_matches_torch_backend_16bit(dtype, rows, block_n, expand_blocks, device):
    cfg = CFG_D.replace(expand_blocks=expand_blocks)
    _compare(device, 2, 1, 4, 70, 64, cfg, lengths=[70, 50], rows=rows, block_n=block_n, dtype=dtype, seed=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "group,seq_len,cfg,left_pad",
    [
        (4, 33, CFG_A, [0, 7]),
        (3, 17, CFG_B, [5, 0]),
        (1, 40, CFG_C.replace(min_seq_len=24), [0, 20]),  # second row shorter than min_seq_len: dense
        (2, 12, CFG_A, [0, 12]),  # an all-padding row: zeros, no NaN
        (3, 29, CFG_A.replace(expand_blocks=2), [0, 6]),
        (8, 35, CFG_B.replace(expand_blocks=1), [4, 0]),
        (1, 26, CFG_A.replace(expand_blocks=7), [0, 9]),  # 7 blocks: every old block is expanded
        (3, 29, CFG_A.replace(expand_blocks=2, expand_score="principal"), [0, 6]),
        (8, 35, CFG_B.replace(expand_blocks=1, expand_score="principal"), [4, 0]),
    ],
    ids=["G4-L33", "G3-L17", "G1-L40-minlen", "G2-empty-row", "G3-L29-E2", "G8-L35-E1", "G1-L26-E-all",
         "G3-L29-E2-principal", "G8-L35-E1-principal"],
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
@pytest.mark.parametrize("cfg", [CFG_A.replace(focal_ratio=1.0), CFG_B.replace(expand_blocks=8),
                                 CFG_B.replace(expand_blocks=8, expand_score="principal")],
                         ids=["focal_ratio=1", "expand_blocks>=blocks", "expand_blocks>=blocks-principal"])
def test_exact_settings_are_dense(cfg, device):
    """focal_ratio = 1 (every earlier token is focal) or expand_blocks >= the number of blocks (every old
    block is expanded): the result is dense causal attention (docs/spec.md, Invariants)."""
    q, k, v, lens = _inputs(1, 2, 2, 30, 64, device, seed=5)
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


def _check_backends_on_bench_inputs(device, seq_len, q_heads, kv_heads, head_dim, dtype, config):
    """Triton against the PyTorch backend on the benchmark's inputs and layout
    (`dga_hf.bench.attention_workload`): the whole dispatch path (output in the model dtype), stage 5
    alone in fp32 on the same layout, and stage 5 fed the model dtype (against the fp32 PyTorch stage 5)."""
    q, k, v = random_qkv(seq_len, device, dtype, q_heads, kv_heads, head_dim, seed=1)
    got = dga_attention(q, k, v, config, backend="triton")
    expected = dga_attention(q, k, v, config, backend="torch")
    assert got.dtype == dtype and torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), expected.float(), **_tol(device, dtype))
    q32, k32, v32, scale, build = stage5_inputs(q, k, v, config)
    layout = build()
    expected = torch_backend.attend(q32, k32, v32, layout, config, scale)
    got = triton_backend.attend(q32, k32, v32, layout, config, scale)
    torch.testing.assert_close(got, expected, **_tol(device, torch.float32))
    got = triton_backend.attend(q.view_as(q32), k, v, layout, config, scale)
    torch.testing.assert_close(got.float(), expected, **_tol(device, dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_matches_torch_backend_on_bench_inputs(device):
    _check_backends_on_bench_inputs(device, 40, 4, 2, 64, torch.float32, CFG_C)


@pytest.mark.skipif(not CUDA_COMPILED, reason=NOT_CUDA_COMPILED)
@pytest.mark.parametrize("preset", BENCH_PRESETS)
def test_cuda_matches_torch_backend_at_bench_shape(preset):
    """The benchmark's shape (Llama-3-8B attention, bf16) and presets, at 4K tokens."""
    _check_backends_on_bench_inputs("cuda", 4096, LLAMA3_8B["q_heads"], LLAMA3_8B["kv_heads"], LLAMA3_8B["head_dim"],
                                    torch.bfloat16, DGAConfig.preset(preset))


@pytest.mark.parametrize(
    "preset,dtype,expand_blocks",
    [("default", torch.bfloat16, 0), ("paper", torch.bfloat16, 0), ("paper", torch.float32, 0),
     ("paper", torch.bfloat16, 16), ("paper", torch.float32, 16)],
)
@pytest.mark.skipif(not CUDA_COMPILED, reason=NOT_CUDA_COMPILED)
def test_cuda_long_rows_default_tiles(preset, dtype, expand_blocks):
    """Real shapes on the GPU: default tiles, several thousand tokens, GQA 4, padding; with and without
    query-aware expansion."""
    cfg = DGAConfig.preset(preset).replace(expand_blocks=expand_blocks)
    _compare("cuda", 2, 2, 4, 3000, 128, cfg, lengths=[3000, 2222], dtype=dtype, seed=11)


# ------------------------------------------------------------------------------ the rule twin and the tile plan
@triton.jit
def _rule_twins_kernel(BLOCKS, FIRST_LOCAL, SEEING_OLD, COUNT, LOCAL_BLOCKS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < COUNT
    blocks = tl.load(BLOCKS + offs, mask=inside, other=0)
    tl.store(FIRST_LOCAL + offs, first_local_block(blocks, LOCAL_BLOCKS), mask=inside)
    tl.store(SEEING_OLD + offs, first_block_seeing_as_old(blocks, LOCAL_BLOCKS), mask=inside)


@pytest.mark.parametrize("device", DEVICES)
def test_kernels_rule_twins_are_the_rule(device):
    """The kernels' jit twins of the visibility rule compute `rule.first_local_block` and
    `rule.first_block_seeing_as_old`."""
    gen = torch.Generator().manual_seed(0)
    blocks = torch.cat([torch.arange(-2, 3000), torch.randint(0, 2**24, (3000,), generator=gen)])
    blocks = blocks.to(device=device, dtype=torch.int32)
    for local_blocks in (1, 2, 3, 5, 8, 64, 128, 4096):
        first_local, seeing_old = (torch.full_like(blocks, -(2**31)) for _ in range(2))
        _rule_twins_kernel[(triton.cdiv(blocks.numel(), 1024),)](
            blocks, first_local, seeing_old, blocks.numel(), LOCAL_BLOCKS=local_blocks, BLOCK=1024)
        assert torch.equal(first_local, rule.first_local_block(blocks, local_blocks)), local_blocks
        assert torch.equal(seeing_old, rule.first_block_seeing_as_old(blocks, local_blocks)), local_blocks


@triton.jit
def _tile_key_ranges_kernel(FCNT, LENS, OUT, H, NUM_TILES, BLOCK_M: tl.constexpr, GROUP_SIZE: tl.constexpr,
                            LOCAL_BLOCKS: tl.constexpr):
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    length = tl.load(LENS + bh // H)
    focal_lo, focal_hi, old_lo, old_hi, win_lo, win_hi = tile_key_ranges(
        FCNT, bh.to(tl.int64), tile, tile * BLOCK_M, length, NUM_TILES, BLOCK_M, GROUP_SIZE, LOCAL_BLOCKS)
    out = OUT + (bh * NUM_TILES + tile) * 6
    tl.store(out, focal_lo)
    tl.store(out + 1, focal_hi)
    tl.store(out + 2, old_lo)
    tl.store(out + 3, old_hi)
    tl.store(out + 4, win_lo)
    tl.store(out + 5, win_hi)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg", [CFG_A, CFG_B, CFG_C, CFG_D, CFG_B.replace(local_blocks=9)], ids=["A", "B", "C", "D", "n9"])
@pytest.mark.parametrize("block_m", [16, 32, 64])
def test_tile_plan_in_pytorch_is_the_kernels(cfg, block_m, device):
    """`all_tile_key_ranges` (what the benchmark counts the kernel's work from) equals the kernels'
    `tile_key_ranges` on every tile, padding-only tiles and an empty row included."""
    batch, heads, seq_len = 3, 2, 75
    q, k, v, lens = _inputs(batch, heads, 2, seq_len, 16, device, seed=9, lengths=[75, 38, 0])
    layout = build_layout(q, k, v, lens, cfg, 0.25)
    focal_pos = layout.focal_pos.to(torch.int32)
    counts = triton_plan.focal_tile_counts(focal_pos, layout.lengths, cfg, seq_len, block_m)
    tiles = counts.shape[2]
    got = torch.full((batch * heads, tiles, 6), -1, dtype=torch.int32, device=device)
    _tile_key_ranges_kernel[(tiles, batch * heads)](
        counts, layout.lengths.to(device=device, dtype=torch.int32), got, heads, tiles,
        BLOCK_M=block_m, GROUP_SIZE=cfg.group_size, LOCAL_BLOCKS=cfg.local_blocks)
    ranges = triton_plan.all_tile_key_ranges(counts, layout.lengths, cfg, seq_len, block_m)
    fields = ("focal_lo", "focal_hi", "old_lo", "old_hi", "win_lo", "win_hi")
    expected = torch.stack([getattr(ranges, f).expand(batch, heads, tiles) for f in fields], dim=-1)
    assert torch.equal(got.view(batch, heads, tiles, 6).long(), expected)
    empty_row = expected[2]  # visits nothing: no focal slot, no aggregate, an empty window
    assert (empty_row[..., [1, 3]] == 0).all() and torch.equal(empty_row[..., 4], empty_row[..., 5])


@triton.jit
def _expanded_hit_kernel(CHOSEN, OUT, width, NB, start, ROWS: tl.constexpr, BLOCK_X: tl.constexpr,
                         BLOCK_N: tl.constexpr, KEYS_FIRST: tl.constexpr):
    rows = tl.arange(0, ROWS)
    lanes = tl.arange(0, BLOCK_N)
    hit = expanded_hit(expanded_rows(CHOSEN + rows * width, rows < ROWS - 1, width, NB, BLOCK_X), start, BLOCK_N,
                       KEYS_FIRST)
    if KEYS_FIRST:
        tl.store(OUT + lanes[:, None] * ROWS + rows[None, :], hit.to(tl.int8))
    else:
        tl.store(OUT + rows[:, None] * BLOCK_N + lanes[None, :], hit.to(tl.int8))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_n,keys_first", [(64, False), (64, True), (16, False)])
def test_expansion_mask_is_membership(block_n, keys_first, device):
    """The kernels' expansion mask (`expanded_rows` + `expanded_hit`): row r hides block start + j iff
    start + j is among its chosen blocks (the last row is no row: it hides nothing), the 64th bit
    (the sign of the word) included."""
    rows, width, num_blocks, start = 16, 5, 200, 37
    gen = torch.Generator().manual_seed(2)
    chosen = torch.stack([torch.randperm(num_blocks, generator=gen)[:width].sort().values for _ in range(rows)])
    chosen[0, :3] = torch.tensor([start - 1, start, start + block_n - 1])  # both edges of the chunk and one before
    chosen[1, -2:] = num_blocks  # sentinels
    out = torch.zeros(rows, block_n, dtype=torch.int8, device=device)
    _expanded_hit_kernel[(1,)](chosen.to(device=device, dtype=torch.int32).contiguous(), out, width, num_blocks, start,
                               ROWS=rows, BLOCK_X=8, BLOCK_N=block_n, KEYS_FIRST=keys_first)
    got = out.view(block_n, rows).T if keys_first else out
    blocks = torch.arange(start, start + block_n)
    expected = (blocks[None, :, None] == chosen[:, None, :]).any(-1)
    expected[-1] = False
    assert expected[0, 0] and expected[0, -1] and expected.sum() > 2
    assert torch.equal(got.cpu().bool(), expected)


def test_expansion_refuses_chunks_wider_than_its_mask():
    q, k, v, lens = _inputs(1, 1, 2, 30, 16, "cpu")
    cfg = CFG_A.replace(expand_blocks=2)
    layout = build_layout(q, k, v, lens, cfg, 0.25)
    with pytest.raises(ValueError, match=r"block_n=128 is too wide with expand_blocks.*block_n <= 64"):
        triton_backend.attend_forward(q, k, v, layout, cfg, 0.25, block_n=128)


@pytest.mark.parametrize("expand_blocks", [0, 3], ids=["E0", "E3"])
def test_bench_pair_counts_bound_each_other(expand_blocks):
    """The benchmark's useful pairs are the (query, key) pairs stage 5 reads (the finite logits of
    `stage5_logits`, expansion included); the kernels compute every one of them (and whole chunks more);
    dense attention would compute the causal triangle of every real row."""
    q, k, v, lens = _inputs(2, 2, 3, 200, 16, "cpu", seed=4, lengths=[200, 130])
    cfg = CFG_D.replace(min_seq_len=0, expand_blocks=expand_blocks)
    layout = build_layout(q, k, v, lens, cfg, 0.25)
    useful = visible_pairs(layout, cfg, 200, group=3)
    read = stage5_logits(q, k, layout.focal_key, layout.agg_key, layout, cfg, 0.25).isfinite().sum()
    assert useful == int(read)
    executed = executed_pairs(layout, cfg, 200, group=3, dtype=torch.float32)
    dense = sum(n * (n + 1) // 2 for n in (200, 130)) * 2 * 3
    assert 0 < useful < dense and useful <= executed
