"""The PyTorch backend against the naive float64 transcription of docs/spec.md, and the spec's invariants.

Inputs are fresh random tensors (hypothesis draws shapes, settings and seeds)."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dga_hf import DGAConfig, dense_attention, dga_attention, naive_dga_attention
from helpers import dense_reference, dga_config_strategy, left_padding, qkv

FP32_TOL = 2e-5  # float32 vs float64 on O(1) outputs


shapes = st.tuples(
    st.integers(1, 3),  # batch
    st.sampled_from([(1, 1), (2, 1), (3, 1), (4, 2), (8, 2), (4, 4)]),  # (Hq, Hkv)
    st.integers(1, 90),  # L, rarely a multiple of group_size
    st.sampled_from([4, 8, 16]),  # head dim
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=dga_config_strategy, shape=shapes, padded=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_torch_backend_matches_naive_reference(config, shape, padded, seed):
    batch, (q_heads, kv_heads), seq_len, dim = shape
    q, k, v = qkv(batch, q_heads, kv_heads, seq_len, dim, seed=seed)
    mask = left_padding(batch, seq_len, seed=seed) if padded else None
    expected = naive_dga_attention(q, k, v, config, padding_mask=mask)
    actual = dga_attention(q, k, v, config, backend="torch", padding_mask=mask)
    assert actual.dtype == q.dtype and actual.shape == q.shape
    torch.testing.assert_close(actual.double(), expected, atol=FP32_TOL, rtol=FP32_TOL)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=dga_config_strategy, shape=shapes, padded=st.booleans(), seed=st.integers(0, 2**31 - 1), tile=st.integers(1, 5))
def test_inference_tiles_match_naive_reference(config, shape, padded, seed, tile):
    """Inference runs one SDPA per query tile over buffers that persist across tiles (old keys copied
    once, mask columns of fully old blocks written once): in tiles of 1-5 blocks, which the default
    tile size (at least MIN_TILE_QUERIES queries) never reaches at these lengths, the output equals
    the float64 transcription to float64 precision."""
    from unittest import mock

    from dga_hf.ops import torch_backend

    batch, (q_heads, kv_heads), seq_len, dim = shape
    q, k, v = qkv(batch, q_heads, kv_heads, seq_len, dim, seed=seed, dtype=torch.float64)
    mask = left_padding(batch, seq_len, seed=seed) if padded else None
    expected = naive_dga_attention(q, k, v, config, padding_mask=mask)
    with mock.patch.object(torch_backend, "tile_blocks", return_value=tile) as tiles:
        actual = dga_attention(q, k, v, config, backend="torch", padding_mask=mask)
    assert tiles.called or (mask is None and seq_len < config.min_seq_len) or all_local(config, seq_len)
    torch.testing.assert_close(actual, expected, atol=1e-12, rtol=1e-12)


def all_local(config: DGAConfig, seq_len: int) -> bool:
    """No query of a `seq_len`-token sequence has an old block: the window spans the sequence."""
    from dga_hf import rule

    bounded = config.for_length(seq_len)
    return rule.old_block_count(rule.block_of(seq_len - 1, bounded.group_size), bounded.local_blocks) == 0


@pytest.mark.parametrize("expand_blocks", [0, 3])
def test_a_window_that_spans_the_sequence_runs_dense_attention(expand_blocks):
    """When no query has an old block (L <= local_blocks * group_size), DGA is dense attention by the spec's
    invariant, and `dga_attention` runs the dense kernel without building a selection; one token more and
    the selection is built. A decode state builds it anyway (its prompt's blocks leave the window later)."""
    from unittest import mock

    from dga_hf.ops import dispatch

    config = DGAConfig(group_size=4, focal_ratio=0.2, local_blocks=3, expand_blocks=expand_blocks, probe_queries=3,
                       min_seq_len=0)
    q, k, v = qkv(1, 4, 2, 13, 8, seed=3, dtype=torch.float64)
    with mock.patch.object(dispatch, "build_layout", wraps=dispatch.build_layout) as layouts:
        spanned = dga_attention(q[:, :, :12], k[:, :, :12], v[:, :, :12], config, backend="torch")
        assert not layouts.called
        torch.testing.assert_close(spanned, dense_attention(q[:, :, :12], k[:, :, :12], v[:, :, :12]), atol=1e-12, rtol=1e-12)
        longer = dga_attention(q, k, v, config, backend="torch")
        assert layouts.call_count == 1
        torch.testing.assert_close(longer, naive_dga_attention(q, k, v, config), atol=1e-12, rtol=1e-12)
        prompt = dispatch.prefill(q[:, :, :12].view(1, 2, 2, 12, 8).flatten(1, 2), k[:, :, :12], v[:, :, :12], config,
                                  scale=8**-0.5, keep_selection=True)
        assert layouts.call_count == 2 and not prompt.focal.all()


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_half_precision_inputs(dtype, tol):
    config = DGAConfig(group_size=4, focal_ratio=0.2, local_blocks=2, probe_queries=8)
    q, k, v = qkv(2, 6, 2, 77, 16, seed=1, dtype=dtype)
    mask = left_padding(2, 77, seed=1)
    expected = naive_dga_attention(q, k, v, config, padding_mask=mask)
    actual = dga_attention(q, k, v, config, backend="torch", padding_mask=mask)
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.double(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, None), (torch.bfloat16, 1.6e-2)])
def test_layout_computed_in_chunks_matches_the_reference(monkeypatch, dtype, tol):
    """The layout aggregates AGGREGATE_CHUNK_TOKENS tokens of blocks at a time and scores
    IMPORTANCE_CHUNK_SCORES probe scores at a time (bounded float32 copies); with tiny chunks (3 blocks;
    3 of the 8 probes of one query head), several chunks, a partial last one and a zero-padded last block
    give the reference's output."""
    from dga_hf.ops import layout

    monkeypatch.setattr(layout, "AGGREGATE_CHUNK_TOKENS", 12)  # 3 blocks of 4 per chunk
    monkeypatch.setattr(layout, "IMPORTANCE_CHUNK_SCORES", 3 * 2 * 79)  # 3 probe rows of both batch rows
    config = DGAConfig(group_size=4, focal_ratio=0.2, local_blocks=2, probe_queries=8, group_bias="log_size")
    q, k, v = qkv(2, 6, 2, 79, 16, seed=5, dtype=dtype)
    mask = left_padding(2, 79, seed=5)
    expected = naive_dga_attention(q, k, v, config, padding_mask=mask)
    actual = dga_attention(q, k, v, config, backend="torch", padding_mask=mask)
    torch.testing.assert_close(actual.double(), expected, atol=tol or FP32_TOL, rtol=tol or FP32_TOL)


def test_sparse_setting_differs_from_dense():
    """Guards the equality tests below from passing because DGA silently became dense."""
    q, k, v = qkv(1, 2, 1, 64, 8, seed=3)
    out = dga_attention(q, k, v, DGAConfig(group_size=4, focal_ratio=0.1), backend="torch")
    assert (out.double() - dense_reference(q, k, v)).abs().max() > 1e-2


@pytest.mark.parametrize(
    "exact",
    [
        dict(group_size=1),
        dict(focal_ratio=1.0),
        dict(group_size=8, local_blocks=9),  # ceil(70 / 8) = 9 local blocks cover everything
        dict(min_seq_len=71),
        dict(expand_blocks=18),  # ceil(70 / 4) = 18 blocks: every old block is expanded
        dict(expand_blocks=18, expand_score="principal"),  # whatever the score
    ],
    ids=["group_size=1", "focal_ratio=1", "local_blocks>=ceil(L/m)", "below_min_seq_len", "expand_blocks>=ceil(L/m)",
         "expand_blocks>=ceil(L/m)-principal"],
)
@pytest.mark.parametrize("others", [dict(), dict(sink_tokens=3, group_bias="log_size", probe_queries=2, local_blocks=2)])
@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_exact_settings_equal_dense(exact, others, backend):
    config = DGAConfig(**{"group_size": 4, "focal_ratio": 0.1, **others, **exact})
    q, k, v = qkv(2, 4, 2, 70, 8, seed=7)
    mask = left_padding(2, 70, seed=7)
    for padding in (None, mask):
        actual = dga_attention(q, k, v, config, backend=backend, padding_mask=padding)
        torch.testing.assert_close(actual.double(), dense_reference(q, k, v, padding), atol=FP32_TOL, rtol=FP32_TOL)


def attention_mass(config, seq_len, padding_mask=None, seed=0):
    """With V = identity, output row i is the attention mass query i puts on each position
    (an aggregate spreads its weight over its members)."""
    q, k, _ = qkv(1 if padding_mask is None else padding_mask.shape[0], 4, 2, seq_len, 16, seed=seed)
    v = torch.eye(seq_len).expand(q.shape[0], 2, seq_len, seq_len).contiguous()
    return dga_attention(q, k, v, config, backend="torch", padding_mask=padding_mask)


@pytest.mark.parametrize("config", [
    DGAConfig(group_size=4, focal_ratio=0.2, local_blocks=1),
    DGAConfig(group_size=5, focal_ratio=0.1, local_blocks=2, sink_tokens=2),
    DGAConfig(group_size=4, focal_ratio=0.2, local_blocks=1, expand_blocks=3),
    DGAConfig(group_size=4, focal_ratio=0.2, local_blocks=1, expand_blocks=3, expand_score="principal"),
])
def test_no_query_sees_a_later_key_and_mass_sums_to_one(config):
    mass = attention_mass(config, 45)
    later = torch.ones(45, 45, dtype=torch.bool).triu(diagonal=1)
    assert mass[..., later].abs().max() == 0
    torch.testing.assert_close(mass.sum(-1), torch.ones_like(mass.sum(-1)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("expand_blocks,expand_score", [(0, "aggregate"), (2, "aggregate"), (2, "principal")])
def test_padding_is_never_attended_selected_or_aggregated(expand_blocks, expand_score):
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, :13] = False
    config = DGAConfig(group_size=4, focal_ratio=0.3, local_blocks=1, sink_tokens=2, expand_blocks=expand_blocks,
                       expand_score=expand_score)
    mass = attention_mass(config, 40, mask, seed=5)
    assert mass[1, :, :, :13].abs().max() == 0  # no query puts weight on a padded key
    assert mass[1, :, :13].abs().max() == 0  # padded queries output zeros
    torch.testing.assert_close(mass[1, :, 13:].sum(-1), torch.ones(4, 27), atol=1e-5, rtol=0)


def test_left_padded_row_equals_its_unpadded_sequence():
    config = DGAConfig(group_size=4, focal_ratio=0.15, local_blocks=2, sink_tokens=1, probe_queries=6)
    q, k, v = qkv(2, 4, 2, 50, 8, seed=11)
    mask = torch.ones(2, 50, dtype=torch.bool)
    mask[1, :17] = False
    batched = dga_attention(q, k, v, config, backend="torch", padding_mask=mask)
    alone = dga_attention(q[1:, :, 17:], k[1:, :, 17:], v[1:, :, 17:], config, backend="torch")
    torch.testing.assert_close(batched[1, :, 17:], alone[0], atol=1e-6, rtol=1e-6)
    assert batched[1, :, :17].abs().max() == 0


def test_output_is_finite_for_extreme_inputs():
    config = DGAConfig(group_size=3, focal_ratio=0.1, local_blocks=1)
    q, k, v = qkv(2, 2, 1, 60, 8, seed=2, spread=300.0)
    mask = left_padding(2, 60, seed=2)
    out = dga_attention(q, k, v, config, backend="torch", padding_mask=mask)
    assert torch.isfinite(out).all()
    fully_padded = torch.zeros(2, 60, dtype=torch.bool)
    fully_padded[0] = True
    assert torch.isfinite(dga_attention(q, k, v, config, backend="torch", padding_mask=fully_padded)).all()


def test_focal_tokens_all_in_recent_blocks():
    """Old blocks may hold no focal token at all (an empty focal stream for early query tiles)."""
    config = DGAConfig(group_size=4, focal_ratio=0.05, local_blocks=1, probe_queries=4)
    q, k, v = qkv(1, 2, 1, 80, 8, seed=4)
    k[..., -4:, :] = 20 * q[..., -1:, :].mean(1, keepdim=True)  # the probes look only at the last tokens
    expected = naive_dga_attention(q, k, v, config)
    torch.testing.assert_close(dga_attention(q, k, v, config, backend="torch").double(), expected, atol=FP32_TOL, rtol=FP32_TOL)


def test_ties_in_importance_pick_the_earlier_position():
    """Identical keys give identical importance: the focal set must be the earliest ones."""
    config = DGAConfig(group_size=4, focal_ratio=0.25, local_blocks=1, probe_queries=1)
    q, _, v = qkv(1, 1, 1, 16, 4, seed=9)
    k = torch.zeros(1, 1, 16, 4)
    q[..., -1, :] = 0.0  # the probe sees all keys as equal
    expected = naive_dga_attention(q, k, v, config)
    torch.testing.assert_close(dga_attention(q, k, v, config, backend="torch").double(), expected, atol=FP32_TOL, rtol=FP32_TOL)


# ------------------------------------------------------------------------------------------------ expansion


def brute_force_expansion(q, layout, config, scale, block_keys):
    """docs/spec.md step 6 one query at a time: [B, H, L, X] chosen blocks, ascending, padded with nb. Block c
    of row b, kv head h, with members (its real positions outside F, from the layout's F) is scored by the
    largest logit over the G heads of the keys `block_keys(b, h, c, members)` [S, d]."""
    batch, heads, group, seq_len, _ = q.shape
    m = config.group_size
    num_blocks = layout.agg_key.shape[2]
    width = min(config.expand_blocks, max(0, (seq_len - 1) // m - config.local_blocks + 1))
    chosen = torch.full((batch, heads, seq_len, width), num_blocks, dtype=torch.long)
    for b in range(batch):
        length = int(layout.lengths[b])
        for h in range(heads):
            score = {}
            for c in range(num_blocks):
                members = [j for j in range(c * m, min((c + 1) * m, length)) if not layout.focal[b, h, j]]
                assert bool(members) == bool(torch.isfinite(layout.agg_bias[b, h, c]))
                if members:
                    score[c] = (scale * q[b, h].double() @ block_keys(b, h, c, members).double().T).amax(dim=(0, 2))
            for i in range(seq_len):
                old = i // m - config.local_blocks + 1
                candidates = [c for c in range(max(0, old)) if c in score]
                picked = sorted(sorted(candidates, key=lambda c: (-score[c][i].item(), c))[: config.expand_blocks])
                chosen[b, h, i, : len(picked)] = torch.tensor(picked, dtype=torch.long)
    return chosen


def expansion_inputs(seed=5, collinear=False):
    """float64 q [2, 2, 3, 61, 8], k, v [2, 2, 61, 8] and row lengths [61, 38] (m = 4 gives 16 blocks, the last
    one short). `collinear`: the keys of each block of 4 lie on a line of their own."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 2, 3, 61, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 61, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    if collinear:
        base, direction = (torch.randn(2, 2, 16, 1, 8, generator=gen, dtype=torch.float64) for _ in range(2))
        along = 2 * torch.randn(2, 2, 16, 4, 1, generator=gen, dtype=torch.float64)
        k = (base + along * direction).flatten(2, 3)[:, :, :61].contiguous()
    return q, k, v, torch.tensor([61, 38])


@pytest.mark.parametrize("expand_score", ["aggregate", "principal"])
@pytest.mark.parametrize("config", [
    DGAConfig(group_size=4, focal_ratio=0.2, local_blocks=1, expand_blocks=2, probe_queries=5),
    DGAConfig(group_size=3, focal_ratio=0.1, local_blocks=3, expand_blocks=5, probe_queries=5, group_bias="log_size"),
    DGAConfig(group_size=2, focal_ratio=0.5, local_blocks=1, expand_blocks=40),
])
def test_expanded_blocks_are_the_top_scored_old_blocks(monkeypatch, config, expand_score):
    """The layout's choice (scored in chunks of query blocks; a tiny chunk budget makes several) equals
    the spec's, written one query at a time, each block's score keys (its aggregate, or its principal ends)
    from the naive transcription over its members; the bias of log_size never enters the score."""
    from dga_hf.ops import layout as layout_module
    from dga_hf.ops.naive.expansion import block_score_keys

    config = config.replace(expand_score=expand_score)
    q, k, v, lengths = expansion_inputs()
    monkeypatch.setattr(layout_module, "EXPANSION_CHUNK_SCORES", 400)
    layout = layout_module.build_layout(q, k, v, lengths, config, 0.4)
    assert layout.score_key.shape[3] == (2 if expand_score == "principal" else 1)
    expected = brute_force_expansion(
        q, layout, config, 0.4, lambda b, h, c, members: block_score_keys(k[b, h, members], layout.agg_key[b, h, c], expand_score)
    )
    real = torch.arange(61)[None, :] < lengths[:, None]
    assert torch.equal(layout.expanded.permute(0, 2, 1, 3)[real], expected.permute(0, 2, 1, 3)[real])
    assert (layout.expanded < layout.agg_key.shape[2]).any()


def test_principal_score_of_collinear_members_is_their_largest_logit():
    """docs/spec.md step 6: members on a line are their own rank-1 approximation, so the principal ends are
    the two extreme members and a block's principal score is the exact largest logit of its members: the
    layout expands the blocks that exact score picks (the aggregate score picks others), and the output is the
    naive transcription's."""
    from dga_hf.ops.layout import build_layout

    config = DGAConfig(group_size=4, focal_ratio=0.2, local_blocks=1, expand_blocks=3, probe_queries=5,
                       expand_score="principal")
    q, k, v, lengths = expansion_inputs(seed=8, collinear=True)
    layout = build_layout(q, k, v, lengths, config, 0.4)
    exact = brute_force_expansion(q, layout, config, 0.4, lambda b, h, c, members: k[b, h, members])
    real = torch.arange(61)[None, :] < lengths[:, None]
    assert torch.equal(layout.expanded.permute(0, 2, 1, 3)[real], exact.permute(0, 2, 1, 3)[real])
    aggregate = build_layout(q, k, v, lengths, config.replace(expand_score="aggregate"), 0.4)
    assert not torch.equal(aggregate.expanded, layout.expanded)
    grouped = q.flatten(1, 2)  # [B, Hq, L, d]: query head h * G + g
    expected = naive_dga_attention(grouped, k, v, config, scale=0.4, padding_mask=real)
    actual = dga_attention(grouped, k, v, config, scale=0.4, padding_mask=real, backend="torch")
    torch.testing.assert_close(actual, expected, atol=1e-12, rtol=1e-12)


def test_principal_ends_of_a_line_one_member_and_no_member():
    """The batched ends (`principal_ends`) and the naive transcription's agree: on a line they are the
    extreme members (so the largest logit of any query over them is the members' largest); one member gives
    that key twice; a block without members gives zeros."""
    from dga_hf.ops.layout import principal_ends
    from dga_hf.ops.naive.expansion import block_score_keys

    gen = torch.Generator().manual_seed(2)
    base, direction = torch.randn(2, 8, generator=gen, dtype=torch.float64)
    keys = base + torch.tensor([0.3, -1.2, 2.5, 0.9, 0.1], dtype=torch.float64)[:, None] * direction  # [5, 8]
    members = torch.tensor([True, True, True, True, False])  # the fifth key is not a member
    ends = principal_ends(keys[None], members[None])[0]  # [2, 8]
    extremes = torch.stack([keys[2], keys[1]])
    order = lambda x: x[torch.argsort((x - base) @ direction)]  # noqa: E731 - the ends in either order
    torch.testing.assert_close(order(ends), order(extremes), atol=1e-12, rtol=0)
    torch.testing.assert_close(order(block_score_keys(keys[:4], keys[0], "principal")), order(extremes), atol=1e-12, rtol=0)
    queries = torch.randn(50, 8, generator=gen, dtype=torch.float64)
    torch.testing.assert_close((queries @ ends.T).amax(-1), (queries @ keys[:4].T).amax(-1), atol=1e-12, rtol=0)

    one = torch.tensor([False, False, True, False, False])
    torch.testing.assert_close(principal_ends(keys[None], one[None])[0], keys[2].expand(2, 8), atol=1e-15, rtol=0)
    torch.testing.assert_close(block_score_keys(keys[2:3], keys[2], "principal"), keys[2].expand(2, 8), atol=0, rtol=0)
    assert torch.equal(principal_ends(keys[None], torch.zeros(1, 5, dtype=torch.bool))[0], torch.zeros(2, 8, dtype=torch.float64))


def test_principal_ends_match_the_naive_transcription_on_random_blocks():
    """Random blocks with random members (float64): the batched Gram-matrix ends equal the naive per-block ends
    (in either order: the sign of the principal axis is free)."""
    from dga_hf.ops.layout import principal_ends
    from dga_hf.ops.naive.expansion import block_score_keys

    gen = torch.Generator().manual_seed(4)
    keys = torch.randn(3, 7, 6, 5, generator=gen, dtype=torch.float64)  # [.., c, m, d]: m > d too
    members = torch.rand(3, 7, 6, generator=gen) < 0.7
    members[:, 0] = False
    ends = principal_ends(keys, members)
    for a in range(3):
        for c in range(7):
            if not members[a, c].any():
                assert torch.equal(ends[a, c], torch.zeros(2, 5, dtype=torch.float64))
                continue
            naive = block_score_keys(keys[a, c, members[a, c]], keys[a, c, 0], "principal")
            same = torch.allclose(ends[a, c], naive, atol=1e-12, rtol=0)
            assert same or torch.allclose(ends[a, c].flip(0), naive, atol=1e-12, rtol=0), (a, c)


def test_aggregate_score_is_the_aggregate_logit_bit_for_bit():
    """expand_score="aggregate", the default, is the rule before the score became a setting: the layout scores a
    view of its aggregates, and `choose_expanded` on it is select_focal over max_g s*Q*K_hat, to the bit.
    With expand_blocks = 0 the score is accepted and changes nothing."""
    from dga_hf.ops.layout import build_layout, choose_expanded, select_focal

    assert DGAConfig().expand_score == "aggregate" and DGAConfig() == DGAConfig(expand_score="aggregate")
    config = DGAConfig(group_size=4, focal_ratio=0.2, local_blocks=1, expand_blocks=3, probe_queries=5)
    q, k, v, lengths = (x.float() if x.is_floating_point() else x for x in expansion_inputs())
    layout = build_layout(q, k, v, lengths, config, 0.4)
    assert layout.score_key.shape == (*layout.agg_key.shape[:3], 1, 8)
    assert layout.score_key.data_ptr() == layout.agg_key.data_ptr()  # a view: no copy
    query_block = (torch.arange(61) // 4)[None]
    has_members = torch.isfinite(layout.agg_bias)
    picked = choose_expanded(q, query_block, layout.score_key, has_members, 3, 1)
    score = (0.4 * q @ layout.agg_key[:, :, None].transpose(-1, -2)).amax(2)
    eligible = (torch.arange(16) < query_block[..., None]) & has_members[:, :, None, :]
    expected = select_focal(score, eligible, torch.zeros((), dtype=torch.bool), torch.full((1, 1, 1, 1), 3))
    assert torch.equal(picked, expected) and picked.any()

    unused = build_layout(q, k, v, lengths, config.replace(expand_blocks=0, expand_score="principal"), 0.4)
    assert unused.score_key is None and unused.expanded is None
    grouped = q.flatten(1, 2)
    torch.testing.assert_close(dga_attention(grouped, k, v, config.replace(expand_blocks=0, expand_score="principal")),
                               dga_attention(grouped, k, v, config.replace(expand_blocks=0)), atol=0, rtol=0)


def test_expansion_scores_in_chunks_that_count_the_score_keys(monkeypatch):
    """The expansion's scores are bounded by EXPANSION_CHUNK_SCORES logits per chunk, the S score keys of a
    block counted (the principal score has two per block, so its chunks hold half the queries)."""
    from dga_hf.ops import layout as layout_module

    calls = []
    choose = layout_module.choose_expanded_blocks

    def counting(query, query_block, score_key, *args, **kwargs):
        calls.append(query.shape[:4].numel() * score_key.shape[2] * score_key.shape[3])
        return choose(query, query_block, score_key, *args, **kwargs)

    q, k, v, lengths = expansion_inputs()
    per_query_block = 2 * 2 * 3 * 4 * 16  # B * H * G * m * blocks
    monkeypatch.setattr(layout_module, "EXPANSION_CHUNK_SCORES", 3 * per_query_block)
    monkeypatch.setattr(layout_module, "choose_expanded_blocks", counting)
    config = DGAConfig(group_size=4, focal_ratio=0.2, local_blocks=1, expand_blocks=3, probe_queries=5)
    for expand_score, chunks in (("aggregate", 5), ("principal", 15)):  # 15 query blocks have old blocks
        calls.clear()
        layout_module.build_layout(q, k, v, lengths, config.replace(expand_score=expand_score), 0.4)
        assert len(calls) == chunks and max(calls) <= 3 * per_query_block, (expand_score, calls)


def test_ties_in_expansion_pick_the_earlier_block():
    """Identical aggregates score alike: each query expands the earliest of them (the focal set, the
    first two positions, leaves members in every block)."""
    config = DGAConfig(group_size=4, focal_ratio=0.05, local_blocks=1, expand_blocks=2, probe_queries=2)
    q, _, v = qkv(1, 2, 1, 40, 4, seed=9)
    k = torch.ones(1, 1, 40, 4)
    from dga_hf.ops.layout import build_layout

    layout = build_layout(q.view(1, 1, 2, 40, 4), k, v, torch.tensor([40]), config, 0.5)
    old = torch.arange(40) // 4  # a query of block b has b old blocks: it expands blocks 0 and 1
    expected = torch.stack([torch.where(old >= 1, 0, 10), torch.where(old >= 2, 1, 10)], dim=-1)
    assert torch.equal(layout.expanded[0, 0], expected)
    expected_out = naive_dga_attention(q, k, v, config)
    torch.testing.assert_close(dga_attention(q, k, v, config, backend="torch").double(), expected_out, atol=FP32_TOL, rtol=FP32_TOL)


@pytest.mark.parametrize("expand_score", ["aggregate", "principal"])
@pytest.mark.parametrize("tile", [1, 2, 7])
def test_expanding_inference_matches_the_reference(monkeypatch, tile, expand_score):
    """Inference with expansion: per tile one SDPA whose keys include the union of the blocks its queries
    expand (each query masked to its own), the expanded aggregates hidden in its mask row for that tile
    only; tiles of 1, 2 and 7 blocks, a left-padded batch, and values of another head size than the keys.
    Equal to the float64 transcription."""
    from dga_hf.ops import torch_backend

    config = DGAConfig(group_size=4, focal_ratio=0.15, local_blocks=2, expand_blocks=3, probe_queries=5, sink_tokens=1,
                       expand_score=expand_score)
    q, k, v = qkv(2, 6, 2, 77, 8, seed=21, dtype=torch.float64)
    v = torch.cat([v, v[..., :3] ** 2], dim=-1)
    mask = left_padding(2, 77, seed=21)
    monkeypatch.setattr(torch_backend, "tile_blocks", lambda *args: tile)
    with torch.no_grad():
        actual = dga_attention(q, k, v, config, backend="torch", padding_mask=mask)
    torch.testing.assert_close(actual, naive_dga_attention(q, k, v, config, padding_mask=mask), atol=1e-12, rtol=1e-12)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    config=dga_config_strategy.map(lambda c: c.replace(expand_blocks=max(1, c.expand_blocks), min_seq_len=0)),
    heads=st.sampled_from([(2, 2), (3, 1), (6, 2), (7, 1), (14, 2)]),  # G = 1, 3, 3, 7, 7
    seq_len=st.integers(20, 83),
    padded=st.booleans(),
    tile_blocks=st.integers(1, 3),
    chunk_tiles=st.integers(1, 3),
    similar=st.sampled_from([1.0, 1.15, 100.0]),
    call_scores=st.sampled_from([1, 2**24]),
    in_place=st.sampled_from([0.0, 0.8, 2.0]),
    shared_tile=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
)
def test_expanded_stream_tiles_match_the_reference(config, heads, seq_len, padded, tile_blocks, chunk_tiles, similar,
                                                   call_scores, in_place, shared_tile, seed):
    """Inference with expansion in two streams (the shared tiles of old keys and local windows; the expanded
    stream's tiles over the union of their queries' blocks, sorted by union size into fused calls, or over all
    their old blocks in place, merged by log-sum-exp): tiles of 1-3 query blocks (a last tile past the
    sequence), chunks of 1-3 tiles, groups of one tile (call budget 1, or no two widths alike) or of all, every
    tile in place, some or none, GQA groups of 1, 3 and 7, left padding.
    Float64, with head dim = value dim, so on the CPU both streams run PyTorch's fused flash kernel; equal to the
    float64 transcription of docs/spec.md."""
    from unittest import mock

    from dga_hf.ops import torch_backend

    q_heads, kv_heads = heads
    q, k, v = qkv(2, q_heads, kv_heads, seq_len, 8, seed=seed, dtype=torch.float64)
    mask = left_padding(2, seq_len, seed=seed) if padded else None
    knobs = dict(EXPANDED_TILE_BLOCKS=tile_blocks, EXPANDED_CHUNK_TILES=chunk_tiles, SIMILAR_WIDTH=similar,
                 EXPANDED_CALL_SCORES=call_scores, IN_PLACE_UNION_SHARE=in_place)
    with mock.patch.multiple(torch_backend, **knobs), mock.patch.object(torch_backend, "tile_blocks", return_value=shared_tile), \
            torch.no_grad():
        actual = dga_attention(q, k, v, config, backend="torch", padding_mask=mask)
    torch.testing.assert_close(actual, naive_dga_attention(q, k, v, config, padding_mask=mask), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("value_dim", [8, 11])  # the CPU's fused kernel (value dim = head dim), materialised logits
def test_fused_attention_log_sum_exp(value_dim):
    """The stream attention behind the merge: output and log-sum-exp of the visible logits, for GQA (keys shared
    by the G heads) and a broadcast additive mask; a row that sees nothing outputs 0 (its log-sum-exp is the
    caller's to mark)."""
    from dga_hf.ops.torch_backend import _fused_attention

    gen = torch.Generator().manual_seed(4)
    query = torch.randn(5, 3, 7, 8, generator=gen, dtype=torch.float64)
    key = torch.randn(5, 1, 13, 8, generator=gen, dtype=torch.float64)
    value = torch.randn(5, 1, 13, value_dim, generator=gen, dtype=torch.float64)
    hidden = torch.rand(5, 1, 7, 13, generator=gen) < 0.5
    hidden[2, 0, 4] = True  # a row that sees no key
    mask = torch.zeros(hidden.shape, dtype=torch.float64).masked_fill(hidden, -math.inf)
    out, lse = _fused_attention(query, key, value, mask, 0.3, with_lse=True)
    logits = 0.3 * query @ key.transpose(-1, -2) + mask
    sees = ~hidden.all(-1).expand(5, 3, 7)
    torch.testing.assert_close(lse[sees], logits.logsumexp(-1)[sees], atol=1e-12, rtol=1e-12)
    expected = (logits.softmax(-1) @ value).nan_to_num(0.0)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    assert out[2, :, 4].abs().max() == 0
    plain, none = _fused_attention(query, key, value, mask[:, :, :, :], 0.3, with_lse=False)
    assert none is None
    torch.testing.assert_close(plain[sees], expected[sees], atol=1e-12, rtol=1e-12)


def test_similar_widths_groups_cover_every_tile_within_the_bounds():
    from dga_hf.ops import torch_backend

    ascending = [0, 0, 3, 3, 4, 9, 10, 10, 11, 40, 41, 200]
    for widths in (ascending, [10, 3, 3, 11, 200, 0, 41, 40, 9, 10, 4, 0]):
        for budget in (1, 25, 10**6):
            groups = torch_backend._similar_widths(widths, budget)
            assert [g[0] for g in groups] == [0] + [g[1] for g in groups[:-1]] and groups[-1][1] == len(widths)
            for begin, end, widest in groups:
                assert widest == max(widths[begin:end])
                assert end - begin == 1 or (widest <= torch_backend.SIMILAR_WIDTH * min(widths[begin:end]) + 1
                                            and widest * (end - begin) <= budget)
    assert [g[:2] for g in torch_backend._similar_widths(ascending, 10**6)] == [(0, 2), (2, 5), (5, 9), (9, 11), (11, 12)]
    assert torch_backend._similar_widths([], 5) == []


def test_expansion_choice_with_ties_in_some_queries_only():
    """Blocks 1 and 2 hold one repeated key each, the same one: their aggregates are equal, so a query that
    ranks them at the boundary of its top E has a tie (the spec's rule: the earlier block), while the other
    queries' top E is decided by distinct scores. Both kinds in one choice equal the spec's, query by query."""
    from dga_hf.ops.layout import build_layout

    config = DGAConfig(group_size=4, focal_ratio=0.05, local_blocks=1, expand_blocks=2, probe_queries=2)
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(1, 2, 3, 64, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 2, 64, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(1, 2, 64, 8, generator=gen, dtype=torch.float64)
    k[:, :, 4:12] = k[:, :, 40:41] * 3  # large: often among the top two
    layout = build_layout(q, k, v, torch.tensor([64]), config, 0.5)
    expected = brute_force_expansion(q, layout, config, 0.5, lambda b, h, c, members: layout.agg_key[b, h, c][None])
    assert torch.equal(layout.expanded, expected)
    score = (0.5 * q @ layout.agg_key[:, :, None].transpose(-1, -2)).amax(2)  # [1, H, L, nb]
    old = torch.arange(16) < (torch.arange(64)[:, None] // 4)
    top = score.masked_fill(~old, -math.inf).topk(3, dim=-1).values
    at_boundary = (top[..., 1] == top[..., 2]) & torch.isfinite(top[..., 2])
    assert at_boundary.any() and (~at_boundary[..., 12:]).any()  # both kinds of query occur


def test_expansion_reads_the_members_of_the_chosen_blocks():
    """With V = identity, a query's mass on an expanded block's members follows their own logits, and
    query-aware expansion moves every output towards dense attention."""
    q, k, v = qkv(1, 4, 2, 64, 16, seed=6)
    base = DGAConfig(group_size=4, focal_ratio=0.1, local_blocks=1, probe_queries=4)
    errors = []
    for expand in (0, 2, 8):
        out = dga_attention(q, k, v, base.replace(expand_blocks=expand), backend="torch").double()
        errors.append(float((out - dense_reference(q, k, v)).pow(2).mean()))
    assert errors[0] > errors[1] > errors[2] > 0


def test_default_dense_fallback_matches_reference():
    q, k, v = qkv(2, 4, 2, 33, 8, seed=12)
    mask = left_padding(2, 33, seed=12)
    torch.testing.assert_close(dense_attention(q, k, v, padding_mask=mask).double(), dense_reference(q, k, v, mask), atol=FP32_TOL, rtol=FP32_TOL)


@pytest.mark.parametrize("padding", ["none", "left", "padded query"])
@pytest.mark.parametrize("heads", [(4, 2), (6, 3), (3, 1), (2, 2)])
def test_decode_step_dense_fallback_sees_all_real_past_keys(padding, heads):
    """A one-query step (the G query heads of a kv head passed as SDPA positions) equals the last row
    of causal attention; a row whose new token is padding outputs zeros, not NaN."""
    q, k, v = qkv(3, *heads, 20, 8, seed=13)
    mask = None if padding == "none" else left_padding(3, 20, seed=13)
    if padding == "padded query":
        mask[1, -1] = False
    full = dense_reference(q, k, v, mask)
    step = dense_attention(q[:, :, -1:], k, v, padding_mask=mask)
    assert torch.isfinite(step).all()
    torch.testing.assert_close(step.double(), full[:, :, -1:], atol=FP32_TOL, rtol=FP32_TOL)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda q, k, v, c: dga_attention(q[0], k, v, c), "4-D"),
        (lambda q, k, v, c: dga_attention(q[:, :3], k, v, c), "multiple"),
        (lambda q, k, v, c: dga_attention(q[:, :, :5], k, v, c), "q_len"),
        (lambda q, k, v, c: dga_attention(q, k, v, c, backend="cuda"), "backend"),
        (lambda q, k, v, c: dga_attention(q, k, v, c, padding_mask=torch.ones(1, 3, dtype=torch.bool)), "padding_mask"),
    ],
)
def test_bad_arguments_raise_clear_errors(call, match):
    q, k, v = qkv(1, 4, 2, 10, 8, seed=0)
    with pytest.raises(ValueError, match=match):
        call(q, k, v, DGAConfig())


def test_memory_stays_bounded_at_32k():
    """Peak extra memory at L = 32768 stays a few times q+k+v (an L x L float32 score tensor alone
    would be 4 GiB per head). Measured in a fresh process through the peak resident set size."""
    script = textwrap.dedent(
        """
        import resource, torch
        from dga_hf import DGAConfig, dga_attention
        torch.manual_seed(0)
        L = 32768
        q, k, v = torch.randn(1, 2, L, 32), torch.randn(1, 1, L, 32), torch.randn(1, 1, L, 32)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out = dga_attention(q, k, v, DGAConfig(group_size=16, focal_ratio=0.1, local_blocks=4), backend="torch")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        qkv_bytes = sum(t.numel() * t.element_size() for t in (q, k, v))
        print(peak - base, qkv_bytes, bool(torch.isfinite(out).all()))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    extra, qkv_bytes, finite = result.stdout.split()
    assert finite == "True"
    assert int(extra) < 6 * int(qkv_bytes), f"peak extra {int(extra) / 2**20:.0f} MiB for {int(qkv_bytes) / 2**20:.0f} MiB of q, k, v"


def test_layout_of_bf16_inputs_holds_no_float32_copy_of_k_and_v():
    """Stages 1-4 on bf16 K/V (the Triton path's inputs) at L = 65536 with the Llama-3-8B kv shape: the peak
    extra memory stays below three quarters of one float32 copy of K and V, because the float32 copies are
    made per kv head (scores) and per chunk of blocks (aggregates). The layout used to convert K and V whole
    and pad them again into blocks (about 2x that copy)."""
    script = textwrap.dedent(
        """
        import resource, torch
        from dga_hf import DGAConfig
        from dga_hf.ops.layout import build_layout
        torch.manual_seed(0)
        L, heads, group, dim = 65536, 8, 4, 128
        q = torch.randn(1, heads, group, L, dim, dtype=torch.bfloat16)
        k, v = torch.randn(1, heads, L, dim, dtype=torch.bfloat16), torch.randn(1, heads, L, dim, dtype=torch.bfloat16)
        lengths = torch.tensor([L])
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        layout = build_layout(q, k, v, lengths, DGAConfig(), dim ** -0.5)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(peak - base, 2 * k.numel() * 4, layout.agg_key.dtype, bool(torch.isfinite(layout.agg_key).all()))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    extra, fp32_kv, dtype, finite = result.stdout.split()
    assert dtype == "torch.float32" and finite == "True"
    assert int(extra) < 0.75 * int(fp32_kv), f"peak extra {int(extra) / 2**20:.0f} MiB; float32 K+V {int(fp32_kv) / 2**20:.0f} MiB"


# ------------------------------------------------------------------------------------------------ keys read


def keys_read_one_by_one(layout, config, lengths):
    """docs/spec.md steps 5-6 counted key by key: raw keys a query reads, plus the aggregates it reads."""
    m, n = config.group_size, config.local_blocks
    total = 0
    for b in range(layout.focal.shape[0]):
        length = int(lengths[b])
        for h in range(layout.focal.shape[1]):
            focal = layout.focal[b, h]
            for i in range(length):
                first = i // m - n + 1
                expanded = set(layout.expanded[b, h, i].tolist()) if layout.expanded is not None else set()
                total += sum(1 for j in range(i + 1) if j // m >= first or focal[j] or j // m in expanded)
                for c in range(max(0, first)):
                    has_members = any(not focal[j] for j in range(c * m, min((c + 1) * m, length)))
                    total += has_members and c not in expanded
    return total


@pytest.mark.parametrize("expand_blocks", [0, 2, 5])
def test_counted_keys_are_the_keys_the_rule_reads(expand_blocks):
    from dga_hf.ops import stats
    from dga_hf.ops.layout import build_layout, compact_padding

    config = DGAConfig(group_size=4, focal_ratio=0.2, local_blocks=2, expand_blocks=expand_blocks, probe_queries=3)
    q, k, v = qkv(2, 4, 2, 57, 8, seed=expand_blocks)
    mask = left_padding(2, 57, seed=1)
    with stats.counting_keys() as count:
        dga_attention(q, k, v, config, backend="torch", padding_mask=mask)
        dga_attention(q[:, :, :9], k[:, :, :9], v[:, :, :9], config.replace(min_seq_len=10), backend="torch")
    compact_q, compact_k, compact_v, lengths, _ = compact_padding(q, k, v, mask)
    layout = build_layout(compact_q.view(2, 2, 2, 57, 8), compact_k, compact_v, lengths, config, 8**-0.5)
    dense = int((lengths * (lengths + 1) // 2).sum()) * 2
    assert count.calls == 2 and count.per_call[1] == 1.0  # the short call is dense: 2 rows x 2 heads x 45 keys
    assert count.read == keys_read_one_by_one(layout, config, lengths) + 4 * 45
    assert count.dense == dense + 4 * 45
    assert stats.counting() is False
