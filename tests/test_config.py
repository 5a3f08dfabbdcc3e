"""DGAConfig: validation (every field, every message names the field, the value and what is allowed),
dict/JSON round trips, presets, resolve_config, and the cost formula `keys_per_query_share`."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from importlib import resources

import pytest

from dga_hf import DecodingConfig, DGAConfig, preset_names
from dga_hf.config import BACKENDS, EXPAND_SCORES, GROUP_BIASES, resolve_config


def _message(field: str, value: object, allowed: str) -> str:
    """A regex that needs the field name, the repr of the bad value and the allowed range, in that order."""
    return rf"DGAConfig\.{field}={re.escape(repr(value))} is invalid: allowed .*{allowed}"


INT_FIELDS = {  # field -> smallest allowed value
    "group_size": 1,
    "probe_queries": 1,
    "local_blocks": 1,
    "sink_tokens": 0,
    "min_seq_len": 0,
}


@pytest.mark.parametrize("field, minimum", INT_FIELDS.items())
@pytest.mark.parametrize("offset", [1, 5])
def test_int_field_below_range(field, minimum, offset):
    value = minimum - offset
    with pytest.raises(ValueError, match=_message(field, value, rf"an integer >= {minimum}")):
        DGAConfig(**{field: value})


@pytest.mark.parametrize("field, minimum", INT_FIELDS.items())
@pytest.mark.parametrize("value", [2.0, 16.5, "16", None, True, [4]])
def test_int_field_bad_type(field, minimum, value):
    # bool is an int subclass but never a sensible count; floats (even integral ones) are refused too
    with pytest.raises(ValueError, match=_message(field, value, rf"an integer >= {minimum}")):
        DGAConfig(**{field: value})


@pytest.mark.parametrize("field, minimum", INT_FIELDS.items())
def test_int_field_smallest_allowed(field, minimum):
    assert getattr(DGAConfig(**{field: minimum}), field) == minimum


@pytest.mark.parametrize("value", [0, 0.0, -0.1, 1.0000001, 2, float("nan"), float("inf"), -float("inf")])
def test_focal_ratio_out_of_range(value):
    with pytest.raises(ValueError, match=_message("focal_ratio", value, r"0 < focal_ratio <= 1")):
        DGAConfig(focal_ratio=value)


@pytest.mark.parametrize("value", ["0.1", None, True, [0.1]])
def test_focal_ratio_bad_type(value):
    with pytest.raises(ValueError, match=_message("focal_ratio", value, r"0 < focal_ratio <= 1")):
        DGAConfig(focal_ratio=value)


@pytest.mark.parametrize("value, expected", [(1, 1.0), (1.0, 1.0), (0.25, 0.25), (1e-9, 1e-9)])
def test_focal_ratio_allowed_is_stored_as_float(value, expected):
    ratio = DGAConfig(focal_ratio=value).focal_ratio
    assert type(ratio) is float and ratio == expected


@pytest.mark.parametrize("field, allowed", [("expand_score", EXPAND_SCORES), ("group_bias", GROUP_BIASES), ("backend", BACKENDS)])
@pytest.mark.parametrize("value", ["LOG_SIZE", "cuda", "", None, 1])
def test_choice_fields(field, allowed, value):
    with pytest.raises(ValueError, match=_message(field, value, re.escape(repr(allowed)))):
        DGAConfig(**{field: value})


@pytest.mark.parametrize("field, allowed", [("expand_score", EXPAND_SCORES), ("group_bias", GROUP_BIASES), ("backend", BACKENDS)])
def test_choice_fields_accept_every_allowed_value(field, allowed):
    for value in allowed:
        assert getattr(DGAConfig(**{field: value}), field) == value


@pytest.mark.parametrize("value", [3, "0,1", b"01", None, 1.5])
def test_dense_layers_not_a_list(value):
    with pytest.raises(ValueError, match=_message("dense_layers", value, r"a list of layer indices >= 0")):
        DGAConfig(dense_layers=value)


@pytest.mark.parametrize("value", [[-1], [0, -3], [1.0], ["2"], [True], [0, None]])
def test_dense_layers_bad_index(value):
    with pytest.raises(ValueError, match=_message("dense_layers", list(value), r"layer indices >= 0")):
        DGAConfig(dense_layers=value)


def test_dense_layers_normalised():
    config = DGAConfig(dense_layers=[3, 0, 3, 1])
    assert config.dense_layers == (0, 1, 3)
    assert DGAConfig(dense_layers=range(2)).dense_layers == (0, 1)
    assert DGAConfig(dense_layers=()).dense_layers == ()


def test_replace_validates():
    config = DGAConfig()
    assert config.replace(group_size=8).group_size == 8
    with pytest.raises(ValueError, match=_message("group_size", 0, "an integer >= 1")):
        config.replace(group_size=0)


def test_frozen_and_hashable():
    config = DGAConfig(dense_layers=[1])
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.group_size = 4  # type: ignore[misc]
    assert hash(config) == hash(DGAConfig(dense_layers=(1,)))


SAMPLE = DGAConfig(
    group_size=8, focal_ratio=0.2, probe_queries=32, local_blocks=3, expand_blocks=5, expand_score="principal",
    sink_tokens=4, group_bias="log_size", min_seq_len=128, dense_layers=(0, 5), backend="torch",
)


@pytest.mark.parametrize("config", [DGAConfig(), SAMPLE])
def test_dict_round_trip(config):
    data = config.to_dict()
    assert isinstance(data["dense_layers"], list)
    assert set(data) == set(DGAConfig.__dataclass_fields__)
    assert DGAConfig.from_dict(data) == config
    # what model.config.dga stores goes through config.json
    assert DGAConfig.from_dict(json.loads(json.dumps(data))) == config


def test_from_dict_partial_uses_defaults():
    assert DGAConfig.from_dict({"group_size": 4}) == DGAConfig(group_size=4)


def test_from_dict_unknown_field():
    with pytest.raises(ValueError, match=r"unknown fields \['gamma', 'm'\]: allowed fields are \[.*'focal_ratio'.*'group_size'"):
        DGAConfig.from_dict({"m": 16, "gamma": 0.1, "local_blocks": 2})


def test_from_dict_validates_values():
    with pytest.raises(ValueError, match=_message("local_blocks", 0, "an integer >= 1")):
        DGAConfig.from_dict({"local_blocks": 0})


def test_presets():
    names = preset_names()
    assert {"default", "paper"} <= set(names)
    for name in names:
        assert isinstance(DGAConfig.preset(name), DGAConfig)
    paper = DGAConfig.preset("paper")
    assert (paper.group_size, paper.focal_ratio, paper.local_blocks) == (16, 0.1, 1)
    assert paper.group_bias == "none" and paper.sink_tokens == 0 and paper.dense_layers == ()


def test_preset_folder_holds_only_presets():
    """`preset_names` lists `configs/*.json` without reading them: every file there must be a preset
    (a description and DGAConfig fields); the harness's run configurations live in eval/configs/."""
    folder = resources.files("dga_hf.configs")
    assert preset_names() == ["balanced", "default", "expand", "paper"]
    for name in preset_names():
        preset = json.loads(folder.joinpath(f"{name}.json").read_text())
        assert set(preset) == {"description", "dga"}, name
        assert DGAConfig.from_dict(preset["dga"]) == DGAConfig.preset(name)


def test_unknown_preset():
    with pytest.raises(ValueError, match=r"unknown DGA preset 'nope': available presets are \[.*'default'.*'paper'"):
        DGAConfig.preset("nope")


def test_resolve_config_variants():
    default = DGAConfig.preset("default")
    assert resolve_config(None) == default
    assert resolve_config("default") == default
    assert resolve_config("paper") == DGAConfig.preset("paper")
    assert resolve_config(SAMPLE) is SAMPLE
    assert resolve_config(SAMPLE.to_dict()) == SAMPLE
    with pytest.raises(ValueError, match=r"DGA settings \{\} set no field"):  # one default: {} is neither
        resolve_config({})
    with pytest.raises(ValueError, match="unknown DGA preset"):
        resolve_config("no-such-preset")
    with pytest.raises(ValueError, match="unknown fields"):
        resolve_config({"bogus": 1})
    for bad in (3, 0.5, ["default"]):
        with pytest.raises(TypeError, match=rf"expected a DGAConfig, a dict or a preset name, got {type(bad).__name__}"):
            resolve_config(bad)


@pytest.mark.parametrize("group_size, seq_len", [(16, 16), (16, 100), (16, 1000), (8, 777), (1, 50)])
def test_keys_per_query_share_is_one_when_everything_is_local(group_size, seq_len):
    for focal_ratio in (0.01, 0.1, 1.0):
        config = DGAConfig(group_size=group_size, focal_ratio=focal_ratio, local_blocks=math.ceil(seq_len / group_size))
        assert config.keys_per_query_share(seq_len) == pytest.approx(1.0, abs=1e-12)


def test_keys_per_query_share_paper_preset():
    paper = DGAConfig.preset("paper")
    lengths = [256, 1024, 4096, 16384, 65536]
    shares = [paper.keys_per_query_share(length) for length in lengths]
    assert all(0 < share < 1 for share in shares)
    assert all(a > b for a, b in zip(shares, shares[1:])), shares
    # spec: gamma + (1 - gamma) / m = 0.15625 at long L (about 6.4x fewer keys than dense)
    assert 0.14 < shares[-1] < 0.18
    assert shares[-1] == pytest.approx(0.1 + 0.9 / 16, abs=0.01)


def test_keys_per_query_share_monotone_in_settings():
    length = 4096
    base = DGAConfig(group_size=16, focal_ratio=0.1, local_blocks=1)
    assert base.replace(local_blocks=8).keys_per_query_share(length) > base.keys_per_query_share(length)
    assert base.replace(focal_ratio=0.3).keys_per_query_share(length) > base.keys_per_query_share(length)
    assert base.replace(group_size=64).keys_per_query_share(length) < base.replace(group_size=16, local_blocks=4).keys_per_query_share(length)


# ------------------------------------------------------------------------------------------------ DecodingConfig


def test_decoding_config_resolves_auto_per_mode():
    full, compact = DecodingConfig(), DecodingConfig(mode="compact")
    assert full.dense_step_share == 0.35
    assert compact.dense_step_share is None
    explicit = DecodingConfig(refresh_every=0, dense_share=1)
    assert explicit.dense_step_share == 1.0
    assert isinstance(explicit.dense_share, float)
    assert DecodingConfig(dense_share=None).dense_step_share is None


def test_block_expansion_is_a_dga_setting_and_compact_cannot_expand():
    """DecodingConfig has no expand_blocks: every way of passing it names the setting that replaced it
    (DGAConfig.expand_blocks); compact refuses DGA settings that expand blocks, keep_full takes them."""
    moved = r"DecodingConfig.expand_blocks=8 is refused: the setting moved to DGAConfig.expand_blocks, the model's DGA settings"
    assert "expand_blocks" not in DecodingConfig().to_dict()
    for make in (lambda: DecodingConfig(expand_blocks=8), lambda: DecodingConfig().replace(expand_blocks=8),
                 lambda: DecodingConfig.from_value({"mode": "keep_full", "expand_blocks": 8})):
        with pytest.raises(ValueError, match=moved):
            make()
    expanding = DGAConfig(expand_blocks=3)
    DecodingConfig().check_model_settings(expanding)
    DecodingConfig(mode="compact").check_model_settings(DGAConfig())
    with pytest.raises(ValueError, match=r"DecodingConfig.mode='compact' cannot decode with DGAConfig.expand_blocks=3"):
        DecodingConfig(mode="compact").check_model_settings(expanding)


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"mode": "full"}, r"DecodingConfig.mode='full' is invalid: allowed values are \('keep_full', 'compact'\)"),
        ({"refresh_every": -1}, r"DecodingConfig.refresh_every=-1 is invalid: allowed range is an integer >= 0"),
        ({"refresh_every": True}, r"DecodingConfig.refresh_every=True is invalid"),
        ({"refresh_every": 2.5}, r"DecodingConfig.refresh_every=2.5 is invalid"),
        ({"expand_blocks": -1}, r"DecodingConfig.expand_blocks=-1 is refused: the setting moved to DGAConfig.expand_blocks"),
        ({"expand_blocks": "all"}, r"DecodingConfig.expand_blocks='all' is refused: the setting moved to DGAConfig.expand_blocks"),
        ({"mode": "compact", "expand_blocks": 4}, r"DecodingConfig.expand_blocks=4 is refused: the setting moved to DGAConfig.expand_blocks"),
        ({"dense_share": 0}, r"DecodingConfig.dense_share=0 is invalid: allowed values are 'auto', None \(never\) or a number in \(0, 1\]"),
        ({"dense_share": 1.5}, r"dense_share=1.5 is invalid"),
        ({"dense_share": "half"}, r"dense_share='half' is invalid"),
        ({"dense_share": True}, r"dense_share=True is invalid"),
        ({"mode": "compact", "dense_share": 0.5}, r"dense_share=0.5 needs mode='keep_full'"),
    ],
)
def test_decoding_config_rejects_bad_values(fields, message):
    with pytest.raises(ValueError, match=message):
        DecodingConfig(**fields)
    with pytest.raises(ValueError, match=message):  # replace validates too
        DecodingConfig().replace(**fields)


def test_decoding_config_from_value():
    assert DecodingConfig.from_value("compact") == DecodingConfig(mode="compact")
    options = {"mode": "keep_full", "refresh_every": 18, "dense_share": None}
    assert DecodingConfig.from_value(options).to_dict() == options
    config = DecodingConfig(refresh_every=16)
    assert DecodingConfig.from_value(config) is config
    with pytest.raises(ValueError, match=r"unknown fields \['expand'\]: allowed fields are \['dense_share', 'mode', 'refresh_every'\]"):
        DecodingConfig.from_value({"expand": 3})
    with pytest.raises(TypeError, match="mode name"):
        DecodingConfig.from_value(3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.mode = "compact"
