"""Per-architecture adapters (installed as `dga_hf.patches`).

DGA plugs into Transformers through `AttentionInterface`, so an architecture needs no code of its own
beyond telling which of its layers use a sliding window: DGA is defined for full causal attention, so
such layers are refused at patch time rather than silently given a different function.
"""

from __future__ import annotations

from typing import Callable

from transformers import PretrainedConfig


def _no_sliding_layers(config: PretrainedConfig) -> list[int]:
    return []


def _sliding_window_everywhere(config: PretrainedConfig) -> list[int]:
    """Mistral: one `sliding_window` for every layer, None when disabled."""
    if getattr(config, "sliding_window", None) is None:
        return []
    return list(range(config.num_hidden_layers))


def _sliding_layer_types(config: PretrainedConfig) -> list[int]:
    """Qwen2/Qwen3 (and most recent models): per-layer `layer_types`."""
    layer_types = getattr(config, "layer_types", None) or []
    if getattr(config, "sliding_window", None) is None:
        return []
    return [i for i, kind in enumerate(layer_types) if kind == "sliding_attention"]


# model_type -> which layers use a sliding window. These are tested in tests/test_models.py.
SLIDING_LAYERS: dict[str, Callable[[PretrainedConfig], list[int]]] = {
    "llama": _no_sliding_layers,
    "mistral": _sliding_window_everywhere,
    "qwen2": _sliding_layer_types,
    "qwen3": _sliding_layer_types,
}
TESTED_MODEL_TYPES = tuple(SLIDING_LAYERS)


def _generic(config: PretrainedConfig) -> list[int]:
    """Untested architectures: per-layer `layer_types` where the config has them (how current Transformers
    models declare it); without them a `sliding_window` applies to every layer (Mixtral, Phi-3, Starcoder2)."""
    if getattr(config, "layer_types", None) is not None:
        return _sliding_layer_types(config)
    return _sliding_window_everywhere(config)


def sliding_window_layers(config: PretrainedConfig) -> list[int]:
    """Layers of a model that attend through a sliding window."""
    return SLIDING_LAYERS.get(config.model_type, _generic)(config)
