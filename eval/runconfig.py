"""Run configurations of the harness (JSON files in `eval/configs/`, kvpress style) and DGA settings by name.

A run configuration names the model, the seed, the context lengths, the tasks with their sizes, and the
DGA settings to compare with dense attention:

    {"model": "default", "seed": 0, "lengths": [1024, 2048],
     "dga_configs": ["default", {"name": "n=8", "preset": "default", "local_blocks": 8},
                     {"name": "default+compact", "preset": "default", "decoding": "compact"}],
     "tasks": {"passkey": {"depths": [0.1, 0.5, 0.9], "samples_per_depth": 1}, ...}}

A DGA entry is a preset name, or a dict: `preset` (optional) is the starting point and every other key
except `name` and `decoding` is a `DGAConfig` field overriding it; without `preset` the fields start from
`DGAConfig()`'s own defaults, as `DGAConfig(**fields)` would. `decoding` chooses the KV cache of the
generation steps: "dense" (the model's DynamicCache, what `dga_hf.patch` alone gives; the default), a
`DGACache` mode, "keep_full" or "compact", or a dict of `dga_hf.DecodingConfig` fields such as
{"mode": "keep_full", "refresh_every": 18, "dense_share": null} (`dga_hf.enable_decoding`). Block expansion
is a DGA field (`"expand_blocks": 16` beside `preset`): prefill and decoding both follow it.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from dga_hf import DecodingConfig, DGAConfig

DENSE = "dense"
QUICK_CONFIG = "eval_quick.json"
FULL_CONFIG = "eval_full.json"
TASK_NAMES = ("passkey", "copy", "perplexity", "speed", "ruler")


def shipped_config(name: str) -> dict[str, Any]:
    """A run configuration shipped with the harness: `eval/configs/<name>`, installed as `dga_eval.configs`."""
    return json.loads(resources.files("dga_eval.configs").joinpath(name).read_text())


def load_run_config(path: str | Path | None = None, *, quick: bool = False) -> dict[str, Any]:
    """The run configuration in `path`, else the shipped quick or full one (`shipped_config`)."""
    if path is not None:
        spec = json.loads(Path(path).read_text())
    else:
        spec = shipped_config(QUICK_CONFIG if quick else FULL_CONFIG)
    check_run_config(spec)
    return spec


def check_run_config(spec: Mapping[str, Any]) -> None:
    """Fail before any model work on a misspelt task or DGA setting (a long run should not die at the end)."""
    unknown = sorted(set(spec.get("tasks", {})) - set(TASK_NAMES))
    if unknown:
        raise ValueError(f"unknown tasks {unknown} in the run configuration: known tasks are {list(TASK_NAMES)}")
    if not spec.get("lengths"):
        raise ValueError("the run configuration needs a non-empty list of context `lengths`")
    dga_configs(spec)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One configuration of a run: the attention (None: dense) and the cache its decoding steps use
    (None: the model's DynamicCache, i.e. dense decoding)."""

    dga: DGAConfig | None = None
    decoding: DecodingConfig | None = None

    def __post_init__(self) -> None:
        if self.dga is None and self.decoding is not None:
            raise ValueError(f"decoding={self.decoding!r} needs DGA settings; dense attention decodes densely")
        if self.decoding is not None:  # before any model loads: compact cannot expand blocks
            self.decoding.check_model_settings(self.dga)

    def describe(self) -> dict[str, Any]:
        return {**self.dga.to_dict(), "decoding": DENSE if self.decoding is None else self.decoding.to_dict()}


def decoding_setting(value: Any) -> DecodingConfig | None:
    """The decoding entry of a DGA configuration: "dense" (None), a DGACache mode or DecodingConfig fields."""
    if value == DENSE:
        return None
    try:
        return DecodingConfig.from_value(value)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"decoding={value!r} is invalid: allowed values are 'dense', a DGACache mode ('keep_full', 'compact') "
            f"or a dict of DecodingConfig fields ({error})"
        ) from None


def dga_configs(spec: Mapping[str, Any]) -> dict[str, Setting]:
    """Name -> setting of every configuration of the run, dense first."""
    configs: dict[str, Setting] = {DENSE: Setting()}
    for index, entry in enumerate(spec.get("dga_configs", ["default"])):
        decoding = None
        if isinstance(entry, Mapping):
            decoding = decoding_setting(entry.get("decoding", DENSE))
            entry = {key: value for key, value in entry.items() if key != "decoding"}
        name, config = named_dga_config(entry, index)
        if name in configs:
            raise ValueError(f"two configurations of the run are named {name!r}; give each dict a distinct `name`")
        configs[name] = Setting(config, decoding)
    return configs


def named_dga_config(entry: str | Mapping[str, Any], index: int = 0) -> tuple[str, DGAConfig]:
    if isinstance(entry, str):
        return entry, DGAConfig.preset(entry)
    fields = dict(entry)
    name = fields.pop("name", None) or f"dga{index}"
    preset = fields.pop("preset", None)
    base = DGAConfig.preset(preset) if preset else DGAConfig()
    return str(name), base.replace(**parse_dga_fields(fields))


def parse_dga_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """`DGAConfig` field values from strings or JSON values, each cast to its field's type
    (`lm_eval --model_args` hands over strings or numbers; `dense_layers` may be "0;1;2" or a list)."""
    types = typing.get_type_hints(DGAConfig)
    known = {f.name for f in dataclasses.fields(DGAConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"unknown DGA settings {unknown}: allowed settings are {sorted(known)}")
    return {name: _cast(name, value, types[name]) for name, value in fields.items()}


def _cast(name: str, value: Any, kind: Any) -> Any:
    if typing.get_origin(kind) is tuple:
        if isinstance(value, str):
            value = [part for part in value.replace(";", " ").replace("|", " ").replace(",", " ").split() if part]
        elif isinstance(value, int):
            value = [value]
        return tuple(_cast(name, item, int) for item in value)
    if kind is int and isinstance(value, str):
        return int(value)
    if kind is float and isinstance(value, (str, int)) and not isinstance(value, bool):
        return float(value)
    return value  # DGAConfig validates the rest and names the field in its error


def task_lengths(spec: Mapping[str, Any], task: str) -> list[int]:
    """A task's own `lengths` if it sets them, else the run's."""
    return [int(n) for n in spec["tasks"][task].get("lengths", spec["lengths"])]
