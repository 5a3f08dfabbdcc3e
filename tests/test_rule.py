"""dga_hf.rule against the spec's wording (docs/spec.md, step 5), for Python ints and tensors alike."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dga_hf import rule

small = st.integers(min_value=0, max_value=200)
positive = st.integers(min_value=1, max_value=40)


@settings(max_examples=200, deadline=None)
@given(query_pos=small, key_pos=small, m=positive, n=positive)
def test_visibility_matches_the_spec_wording(query_pos, key_pos, m, n):
    """Raw: j <= i and beta - c(j) < n; old: c <= beta - n. Ints and 0-d tensors give the same answers."""
    beta, c = query_pos // m, key_pos // m
    assert rule.block_of(key_pos, m) == c
    assert rule.reads_raw(key_pos, query_pos, m, n) == (key_pos <= query_pos and beta - c < n)
    assert rule.is_old_block(c, beta, n) == (c <= beta - n)
    assert rule.old_block_count(beta, n) == sum(1 for b in range(beta + 1) if b <= beta - n)
    assert rule.is_old_block(c, beta, n) == (beta >= rule.first_block_seeing_as_old(c, n))
    assert rule.first_local_position(beta, m, n) == min(
        [j for j in range(query_pos + 1) if rule.reads_raw(j, query_pos, m, n)]
    )
    as_tensor = torch.tensor
    assert bool(rule.reads_raw(as_tensor(key_pos), as_tensor(query_pos), m, n)) == rule.reads_raw(key_pos, query_pos, m, n)
    assert bool(rule.is_old_block(as_tensor(c), as_tensor(beta), n)) == rule.is_old_block(c, beta, n)
    assert int(rule.old_block_count(as_tensor(beta), n)) == rule.old_block_count(beta, n)
    assert int(rule.first_local_position(as_tensor(beta), m, n)) == rule.first_local_position(beta, m, n)


def test_block_of_floors_negative_slots():
    """An empty ring slot (-1) is in block -1, never in block 0."""
    assert rule.block_of(-1, 16) == -1
    assert rule.block_of(torch.tensor([-1, 0, 15, 16]), 16).tolist() == [-1, 0, 0, 1]


@settings(max_examples=200, deadline=None)
@given(length=st.integers(min_value=0, max_value=500), ratio=st.floats(min_value=1e-4, max_value=1.0),
       sinks=st.integers(min_value=0, max_value=600))
def test_focal_budget(length, ratio, sinks):
    k = rule.focal_count(length, ratio)
    assert k == min(length, max(1, math.ceil(round(ratio * length, 9))))
    budget = rule.focal_budget(length, ratio, sinks)
    assert budget == (max(k, min(sinks, length)) if length else 0)
    assert rule.focal_budget(length, ratio, sinks, dense=True) == length


def test_focal_count_ignores_float_error():
    assert 0.07 * 100 > 7 and rule.focal_count(100, 0.07) == 7


@settings(max_examples=100, deadline=None)
@given(lengths=st.lists(st.integers(min_value=0, max_value=100), min_size=1, max_size=4),
       window=st.integers(min_value=1, max_value=40))
def test_ring_positions(lengths, window):
    ring = rule.ring_positions(torch.tensor(lengths), window).tolist()
    for row, length in zip(ring, lengths):
        for slot, position in enumerate(row):
            held = [p for p in range(length) if p % window == slot]
            assert position == (held[-1] if held else -1)


def test_refresh_interval():
    assert [rule.refresh_interval(m) for m in (1, 8, 16)] == [2, 9, 18]
    assert rule.refresh_interval(16, 2048) == 256 and rule.refresh_interval(16, 64) == 18
