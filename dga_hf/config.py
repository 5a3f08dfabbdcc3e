"""`DGAConfig`: the settings of Dynamic Group Attention, validated on construction.

The meaning of every field is defined in docs/spec.md. Named presets live as JSON files in `configs/`
(installed as `dga_hf.configs`).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import math
import numbers
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Mapping

import numpy as np

from . import rule

GROUP_BIASES = ("none", "log_size")
EXPAND_SCORES = ("aggregate", "principal")
BACKENDS = ("auto", "torch", "triton", "naive")
DEFAULT_PRESET = "default"
# The largest value of an integer setting. Sequences never come near it, the dispatch bounds every
# length-like setting by the sequence anyway (`DGAConfig.for_length`), and products of two settings
# (local_blocks * group_size) stay exact in the int64 position arithmetic of the kernels.
MAX_INT_SETTING = 2**31 - 1
_INT_FIELD_MINIMA = {
    "group_size": 1, "probe_queries": 1, "local_blocks": 1, "expand_blocks": 0, "sink_tokens": 0, "min_seq_len": 0,
}


@dataclass(frozen=True)
class DGAConfig:
    """Settings of Dynamic Group Attention (the meaning of each field: docs/spec.md).

    The field defaults are the paper's settings: ``DGAConfig() == DGAConfig.preset("paper")``, and fields
    left out of ``DGAConfig(...)`` or of a settings dict take the paper's values. The shipped default,
    ``DGAConfig.preset("default")`` (configs/default.json, chosen by measurement), is what a model gets when
    it is given no settings at all: ``patch(model)``, ``patch(model, None)``, ``from_pretrained(...,
    attn_implementation="dga")`` without a ``"dga"`` entry or with ``"dga": null``, and
    ``dga_attention(q, k, v, None)``. An empty settings dict (``{}``, ``"dga": {}``) says neither and is
    refused (`resolve_config`), so the two cannot be mixed up by accident.

    Attributes:
        group_size: tokens per group (block), ``m`` in the paper. Integer in [1, 2**31 - 1].
        focal_ratio: share of tokens kept individually, ``gamma``. ``0 < focal_ratio <= 1``.
        probe_queries: the last ``r`` queries used to score token importance. Integer in [1, 2**31 - 1].
        local_blocks: a query sees the raw tokens of its own block and the ``local_blocks - 1`` blocks
            before it. Integer in [1, 2**31 - 1].
        expand_blocks: each query also reads raw every member of the ``E`` old blocks whose aggregates score
            highest for it (``max_g s*Q[g,i]*K_hat_c``), instead of their aggregates (query-aware expansion,
            docs/spec.md). 0 is the rule without expansion. Integer in [0, 2**31 - 1].
        expand_score: how expansion scores an old block (docs/spec.md step 6), used only when
            ``expand_blocks > 0`` (with 0 it is accepted and changes nothing): ``"aggregate"``, the
            aggregate's logit ``max_g s*Q[g,i]*K_hat_c``; or ``"principal"``, the largest logit of the two
            ends of the block's members projected on their principal axis (a rank-1 approximation of the
            members: closer to the best member's logit, at one m x m eigendecomposition per block).
        sink_tokens: the first tokens of a sequence are always focal (inside the focal budget). Integer
            in [0, 2**31 - 1].
        group_bias: ``"none"``, or ``"log_size"`` to add ``log(members)`` to an aggregate's logit.
        min_seq_len: sequences shorter than this use plain dense causal attention. Integer in
            [0, 2**31 - 1].
        dense_layers: indices of layers that always use dense attention.
        backend: ``"auto"`` (Triton on CUDA when installed, else PyTorch), ``"torch"``, ``"triton"``
            or ``"naive"`` (the float64 reference, for tests only).

    Integers may be numpy integers and ``focal_ratio`` a numpy float (they come from sweeps); they are
    stored as Python ``int``/``float``. Length-like settings larger than a sequence are allowed: on a
    sequence they act as their bounded equivalents (`for_length`).
    """

    group_size: int = 16
    focal_ratio: float = 0.1
    probe_queries: int = 64
    local_blocks: int = 1
    expand_blocks: int = 0
    expand_score: str = "aggregate"
    sink_tokens: int = 0
    group_bias: str = "none"
    min_seq_len: int = 0
    dense_layers: tuple[int, ...] = field(default_factory=tuple)
    backend: str = "auto"

    def __post_init__(self) -> None:
        for name, minimum in _INT_FIELD_MINIMA.items():
            object.__setattr__(self, name, _check_int(name, getattr(self, name), minimum=minimum))
        ratio = self.focal_ratio
        if not _is_real(ratio) or not (0.0 < ratio <= 1.0):
            raise ValueError(f"DGAConfig.focal_ratio={ratio!r} is invalid: allowed range is 0 < focal_ratio <= 1")
        object.__setattr__(self, "focal_ratio", _as_float(ratio))
        for name, allowed in (("expand_score", EXPAND_SCORES), ("group_bias", GROUP_BIASES), ("backend", BACKENDS)):
            value = getattr(self, name)
            if not isinstance(value, str) or value not in allowed:
                raise ValueError(f"DGAConfig.{name}={value!r} is invalid: allowed values are {allowed}")
            object.__setattr__(self, name, str(value))
        layers = self.dense_layers
        if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
            raise ValueError(
                f"DGAConfig.dense_layers={layers!r} is invalid: allowed values are a list of layer indices >= 0"
            )
        layers = tuple(layers)
        if not all(_is_integer(index) and index >= 0 for index in layers):
            raise ValueError(
                f"DGAConfig.dense_layers={list(layers)!r} is invalid: allowed values are layer indices >= 0"
            )
        object.__setattr__(self, "dense_layers", tuple(sorted({int(index) for index in layers})))
        text = ";".join(f"{field.name}={getattr(self, field.name)!r}" for field in dataclasses.fields(self))
        object.__setattr__(self, "_text", text)  # `to_text`, built here once

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["dense_layers"] = list(self.dense_layers)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DGAConfig":
        """``DGAConfig(**data)``: fields left out take the defaults (the paper's values); unknown names
        are refused."""
        return _from_fields(cls, data)

    @classmethod
    def preset(cls, name: str) -> "DGAConfig":
        """Load a named preset shipped in `configs/` (e.g. ``"default"``, ``"paper"``)."""
        available = preset_names()
        if name not in available:
            raise ValueError(f"unknown DGA preset {name!r}: available presets are {available}")
        text = resources.files("dga_hf.configs").joinpath(f"{name}.json").read_text()
        return cls.from_dict(json.loads(text)["dga"])

    def replace(self, **changes: Any) -> "DGAConfig":
        return dataclasses.replace(self, **changes)

    def to_text(self) -> str:
        """The settings as one text, ``name=<Python literal>`` per field in field order, joined by ``;``: how
        they reach the operator ``dga_hf::prefill`` (ops/dispatch.py), whose schema takes strings, not objects;
        `from_text` reads it back. Built once, when the settings are made: a compiled forward reads it as a
        constant and formats nothing (with dynamic shapes Dynamo may trace a number setting as a symbolic
        value, which it cannot format)."""
        return self._text

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def from_text(text: str) -> "DGAConfig":
        """The settings that `to_text` wrote, parsed once per distinct text (the operator reads them at every
        call)."""
        try:
            fields = dict(item.split("=", 1) for item in text.split(";"))
            values = {name: ast.literal_eval(value) for name, value in fields.items()}
        except (ValueError, SyntaxError):
            raise ValueError(
                f"DGA settings text {text!r} is not in DGAConfig.to_text()'s form 'name=<Python literal>;...'"
            ) from None
        return DGAConfig.from_dict(values)

    def for_length(self, seq_len: int) -> "DGAConfig":
        """The settings that compute the same function (docs/spec.md) on every sequence of at most `seq_len`
        tokens, each length-like field at most what such a sequence can use: one block of `seq_len` tokens
        already holds them all (group_size), every block is local once the window spans all blocks
        (local_blocks), and sink_tokens, probe_queries and min_seq_len count positions. The dispatch calls
        it once per call, so no backend sizes a buffer by a setting: memory follows the sequence. Expanding
        every old block is expanding as many as there are blocks (expand_blocks)."""
        length = max(int(seq_len), 1)
        group_size = min(self.group_size, length)
        blocks = rule.block_of(length - 1, group_size) + 1
        bounded = {
            "group_size": group_size,
            "local_blocks": min(self.local_blocks, blocks),
            "expand_blocks": min(self.expand_blocks, blocks),
            "sink_tokens": min(self.sink_tokens, length),
            "probe_queries": min(self.probe_queries, length),
            "min_seq_len": min(self.min_seq_len, length + 1),
        }
        if all(getattr(self, name) == value for name, value in bounded.items()):
            return self
        return dataclasses.replace(self, **bounded)

    def keys_per_query_share(self, seq_len: int) -> float:
        """Average share of dense attention's keys a query reads at ``seq_len`` (the spec's cost formula,
        counted exactly for the layout, with focal tokens spread evenly over the sequence: an expanded block
        reads its non-focal members instead of its aggregate). The exact count of a given input:
        `dga_hf.ops.stats.counting_keys`."""
        total_dense = seq_len * (seq_len + 1) / 2
        m, n = self.group_size, self.local_blocks
        density = rule.focal_count(seq_len, self.focal_ratio) / seq_len
        total = 0.0
        for block in range(math.ceil(seq_len / m)):
            first_local = rule.first_local_position(block, m, n)
            old_tokens = first_local
            old_blocks = rule.old_block_count(block, n)
            expanded = min(self.expand_blocks, old_blocks)
            for i in range(block * m, min((block + 1) * m, seq_len)):
                local = i - first_local + 1
                total += local + density * old_tokens + old_blocks + expanded * (m * (1 - density) - 1)
        return total / total_dense


def _from_fields(cls: type, data: Mapping[str, Any]) -> Any:
    """cls(**data), refusing names that are not its fields (a misspelt setting must not be dropped); a
    removed setting `cls` still names (an init-only variable) reaches `cls`, which says where it went."""
    if not isinstance(data, Mapping):
        raise TypeError(
            f"{cls.__name__}.from_dict expected a mapping of field names to values, got {type(data).__name__} {data!r}"
        )
    known = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(data) - set(inspect.signature(cls).parameters))  # the fields and init-only variables
    if unknown:
        raise ValueError(f"{cls.__name__} got unknown fields {unknown}: allowed fields are {known}")
    return cls(**dict(data))


def moved_expand_blocks(value: Any) -> str:
    """The error for ``expand_blocks`` given as a decoding option (it is a DGA setting now)."""
    return (
        f"DecodingConfig.expand_blocks={value!r} is refused: the setting moved to DGAConfig.expand_blocks, the "
        "model's DGA settings (docs/spec.md step 6), which prefill and decoding both follow. Set it there, e.g. "
        "dga_hf.patch(model, settings.replace(expand_blocks=E)); DecodingConfig, enable_decoding and DGACache take "
        "mode, refresh_every and dense_share"
    )


def _is_integer(value: Any) -> bool:
    """A Python or numpy integer; never a bool (an int subclass, but not a sensible count) or an integral float."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    """A Python or numpy real number; never a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _as_float(value: Any) -> float:
    """A real number as a Python float; a numpy float narrower than float64 by its shortest decimal, the value
    that was written (np.float32(0.1) -> 0.1, not 0.10000000149011612, which buys one more focal token at 30
    tokens)."""
    if isinstance(value, np.floating) and np.finfo(value.dtype).bits < 64:
        return float(str(value))
    return float(value)


def _check_int(name: str, value: Any, *, minimum: int, owner: str = "DGAConfig") -> int:
    """`value` as a Python int, or a ValueError naming the field, the value and the allowed range."""
    if not _is_integer(value) or not minimum <= value <= MAX_INT_SETTING:
        raise ValueError(
            f"{owner}.{name}={value!r} is invalid: allowed range is an integer >= {minimum} and <= {MAX_INT_SETTING}"
        )
    return int(value)


DECODING_MODES = ("keep_full", "compact")
# a keep_full one-token step that would read at least this share of the cached keys runs dense attention
# over the archive instead (exact). Measured on the CPU with SmolLM2-135M, the shipped preset, DGA steps and
# dense steps interleaved (docs/decoding.md): at 8K a DGA step reads 52% of the keys and the model decoded
# at 137 ms per token with DGA steps, 113 ms with dense steps; at 16K (34%) 145 vs 140 ms, a tie. Not
# measured on a GPU.
DEFAULT_DENSE_SHARE = 0.35
_NOT_GIVEN = object()  # the default of a removed setting: anything else passed for it is refused


@dataclass(frozen=True)
class DecodingConfig:
    """Settings of DGA decoding (`dga_hf.DGACache`, `dga_hf.enable_decoding`; the rule: docs/decoding.md).

    How many old blocks each query expands (reads raw instead of as its aggregate) is the model's DGA
    setting `DGAConfig.expand_blocks` (docs/spec.md step 6), in decoding as in prefill: a decode step is a
    prefill row. ``DecodingConfig(expand_blocks=...)`` is refused and says so.

    Attributes:
        mode: ``"keep_full"`` (every token kept, refreshes may pick any; saves time, not memory) or
            ``"compact"`` (non-focal tokens are dropped once aggregated; refreshes re-rank the held tokens).
            compact cannot expand blocks (it drops their raw tokens): a compact cache for a model whose
            ``DGAConfig.expand_blocks`` > 0 is refused.
        refresh_every: re-select the focal set every this many tokens. ``"auto"`` = ceil(1.1 * group_size)
            (the paper's schedule), or max(that, local window / 8) when keep_full expands blocks
            (``DGAConfig.expand_blocks`` > 0); ``None`` or ``0`` = never (aggregates still follow new
            blocks); else an integer ``>= 1``.
        dense_share: keep_full only: a one-token step that would read at least this share of the cached
            keys is dense attention over all of them (exact, and cheaper there). ``"auto"`` = 0.35 in
            keep_full, ``None`` (never) in compact; else a number in ``(0, 1]``.
    """

    mode: str = "keep_full"
    refresh_every: int | str | None = "auto"
    dense_share: float | str | None = "auto"
    expand_blocks: dataclasses.InitVar[Any] = _NOT_GIVEN  # removed: refused with the setting that replaced it

    def __post_init__(self, expand_blocks: Any) -> None:
        if expand_blocks is not _NOT_GIVEN:
            raise ValueError(moved_expand_blocks(expand_blocks))
        if self.mode not in DECODING_MODES:
            raise ValueError(f"DecodingConfig.mode={self.mode!r} is invalid: allowed values are {DECODING_MODES}")
        if self.refresh_every not in ("auto", None):
            object.__setattr__(
                self, "refresh_every", _check_int("refresh_every", self.refresh_every, minimum=0, owner="DecodingConfig")
            )
        share = self.dense_share
        if share not in ("auto", None):
            if not _is_real(share) or not 0 < share <= 1:
                raise ValueError(
                    f"DecodingConfig.dense_share={share!r} is invalid: allowed values are 'auto', None (never) "
                    "or a number in (0, 1]"
                )
            if self.mode != "keep_full":
                raise ValueError(
                    f"DecodingConfig.dense_share={share} needs mode='keep_full': mode={self.mode!r} keeps no "
                    "archive to read"
                )
            object.__setattr__(self, "dense_share", _as_float(share))

    @property
    def dense_step_share(self) -> float | None:
        """The share of the cached keys from which a keep_full one-token step is dense ("auto" resolved)."""
        if self.dense_share == "auto":
            return DEFAULT_DENSE_SHARE if self.mode == "keep_full" else None
        return self.dense_share

    def check_model_settings(self, config: DGAConfig) -> None:
        """Refuse a mode that cannot decode the model's DGA settings `config`: compact drops the raw tokens of
        old blocks, so it cannot expand them (``DGAConfig.expand_blocks`` > 0)."""
        if self.mode == "compact" and config.expand_blocks:
            raise ValueError(
                f"DecodingConfig.mode='compact' cannot decode with DGAConfig.expand_blocks={config.expand_blocks}: "
                "compact drops the raw tokens of old blocks, which block expansion reads (docs/spec.md step 6). "
                "Use DecodingConfig(mode='keep_full'), or DGA settings with expand_blocks=0"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_value(cls, value: "DecodingConfig | Mapping[str, Any] | str") -> "DecodingConfig":
        """A `DecodingConfig` from a config, a dict of its fields or a mode name."""
        if isinstance(value, DecodingConfig):
            return value
        if isinstance(value, str):
            return cls(mode=value)
        if isinstance(value, Mapping):
            return _from_fields(cls, value)
        raise TypeError(f"expected a DecodingConfig, a dict of its fields or a mode name, got {type(value).__name__}")

    def replace(self, **changes: Any) -> "DecodingConfig":
        return dataclasses.replace(self, **changes)


def preset_names() -> list[str]:
    """Names of the shipped presets: every `configs/*.json` (package data of `dga_hf.configs`) is one,
    `{"description": ..., "dga": {DGAConfig fields}}`; the harness's run configurations live apart, in
    `eval/configs/`."""
    folder = resources.files("dga_hf.configs")
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def resolve_config(value: "DGAConfig | Mapping[str, Any] | str | None") -> DGAConfig:
    """The settings that `patch`, a model's ``config.dga`` (config.json's ``"dga"`` entry) and `dga_attention`
    accept: a `DGAConfig`; a dict of its fields (left-out fields take the paper's values, as in
    ``DGAConfig(**fields)``); a preset name; or None for the shipped default (configs/default.json). An empty
    dict is refused: it would read as "the default" but give the paper's values (see `DGAConfig`)."""
    if value is None:
        return DGAConfig.preset(DEFAULT_PRESET)
    if isinstance(value, DGAConfig):
        return value
    if isinstance(value, StoredDGAConfig):
        return value.config
    if isinstance(value, str):
        return DGAConfig.preset(value)
    if isinstance(value, Mapping):
        if not value:
            raise ValueError(
                "DGA settings {} set no field: pass None (in config.json null, or no \"dga\" entry) for the shipped "
                f"default ({DEFAULT_PRESET!r}, configs/{DEFAULT_PRESET}.json), a preset name {preset_names()}, or the "
                "fields to set (fields left out take DGAConfig's defaults, the paper's values)"
            )
        return DGAConfig.from_dict(value)
    raise TypeError(
        f"expected a DGAConfig, a dict or a preset name, got {type(value).__name__} ({value!r}); None means the "
        "shipped default"
    )


class StoredDGAConfig(dict):
    """A `DGAConfig` as a model keeps it in ``config.dga``: the dict of its fields (what `save_pretrained`
    writes to config.json) carrying the validated `DGAConfig` in ``.config``, so that the attention reads the
    settings without parsing them on every call. `patch` and loading with ``attn_implementation="dga"``
    store it. A change in place is validated at once (`resolve_config`'s errors) and keeps ``.config`` in
    step; the dict always lists every field (a removed field comes back with its default)."""

    __slots__ = ("config",)

    def __init__(self, config: DGAConfig) -> None:
        super().__init__(config.to_dict())
        self.config = config

    def _change(name: str) -> Any:  # noqa: N805 - builds the methods below
        apply = getattr(dict, name)

        def change(self: "StoredDGAConfig", *args: Any, **kwargs: Any) -> Any:
            changed = dict(self)
            result = apply(changed, *args, **kwargs)  # on a copy first: an invalid change leaves self as it was
            self.config = resolve_config(changed)
            dict.clear(self)
            dict.update(self, self.config.to_dict())
            return self if result is changed else result

        change.__name__ = name
        return change

    __setitem__ = _change("__setitem__")
    __delitem__ = _change("__delitem__")
    __ior__ = _change("__ior__")
    update = _change("update")
    pop = _change("pop")
    popitem = _change("popitem")
    setdefault = _change("setdefault")
    clear = _change("clear")
    del _change

    def __reduce__(self) -> tuple[type, tuple[DGAConfig]]:
        return StoredDGAConfig, (self.config,)

    def __copy__(self) -> "StoredDGAConfig":
        return StoredDGAConfig(self.config)

    def __deepcopy__(self, memo: dict) -> "StoredDGAConfig":
        return StoredDGAConfig(self.config)  # a DGAConfig is immutable: the copies share it
