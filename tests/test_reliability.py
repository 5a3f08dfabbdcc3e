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
