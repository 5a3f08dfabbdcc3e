"""The `Cache` side of DGA decoding: `DGACache`, a `DynamicCache` whose layers (`DGALayer`) each hold a
`DGADecodeState` (docs/decoding.md), and helpers for caches of any kind."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from transformers import DynamicCache

from ..config import DecodingConfig, DGAConfig, resolve_config
from .state import DGADecodeState

try:  # transformers >= 4.54: caches are lists of layer objects
    from transformers.cache_utils import DynamicLayer as _LayerBase
except ImportError:  # pragma: no cover - transformers 4.53: DGACache keeps its own layer list
    _LayerBase = object


class DGALayer(_LayerBase):
    """One layer of a DGACache: a DynamicLayer whose storage is a DGADecodeState."""

    is_sliding = False
    is_croppable = False
    is_compileable = False

    def __init__(self, options: DecodingConfig | None = None, shared: dict | None = None):
        if _LayerBase is not object:
            super().__init__()
        self.keys = self.values = None
        self.is_initialized = False
        self.device = self.dtype = None  # of the first keys: set by lazy_initialization, transformers' protocol
        self._options = (options, shared)
        self.state = DGADecodeState(*self._options)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self.state.update(key_states, value_states)

    def get_seq_length(self) -> int:
        return self.state.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.state.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.state = DGADecodeState(*self._options)
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("a DGACache cannot be cropped (assisted generation / rollback): use a DynamicCache")

    def offload(self) -> None:  # the state stays where it is
        return None

    def prefetch(self) -> None:
        return None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.state.select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not isinstance(indices, torch.Tensor):
            indices = torch.as_tensor(indices)
        if indices.dtype == torch.bool:
            indices = indices.nonzero().flatten()
        self.state.select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state.ready:
            self.state.select_rows(torch.arange(self.state.batch_size).repeat_interleave(repeats))

    @property
    def batch_size(self) -> int:
        return self.state.batch_size


class DGACache(DynamicCache):
    """A DynamicCache for models patched with DGA: decoding steps attend to the focal tokens, the block
    aggregates and the local window instead of the whole cache (docs/decoding.md).

        cache = dga_hf.DGACache(model)                       # keep_full
        cache = dga_hf.DGACache(model, mode="compact")       # also drops what DGA does not read
        model.generate(ids, past_key_values=cache, ...)      # `cache=` on transformers >= 5.x

    Args:
        model_or_config: the model (or its config), to create one layer per decoder layer up front; None
            creates layers as they are first used.
        options: a `DecodingConfig` (default: its defaults); keyword arguments (its fields: mode,
            refresh_every, dense_share) override it.

    Block expansion follows the model's DGA settings (`DGAConfig.expand_blocks`). A compact cache for a model
    whose settings expand blocks is refused here when the model (or its config) is given, else at the
    prefill (`DecodingConfig.check_model_settings`).
    """

    def __init__(self, model_or_config: Any = None, options: DecodingConfig | None = None, **fields: Any):
        self.options = (options or DecodingConfig()).replace(**fields)
        self._shared: dict = {}
        config = getattr(model_or_config, "config", model_or_config)
        settings = model_dga_settings(config)
        if settings is not None:
            self.options.check_model_settings(settings)
        layers = None
        if config is not None:
            text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
            layers = getattr(text, "num_hidden_layers", None)
        self._factory = functools.partial(DGALayer, self.options, self._shared)
        if _LayerBase is object:  # pragma: no cover - transformers 4.53
            DynamicCache.__init__(self)
            self.layers = [self._factory() for _ in range(layers or 0)]
            self.layer_class_to_replicate = self._factory
        elif layers:
            super(DynamicCache, self).__init__(layers=[self._factory() for _ in range(layers)])
        else:
            super(DynamicCache, self).__init__(layer_class_to_replicate=self._factory)

    # Overridden at the cache level so the same code serves every supported transformers version.
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(self._factory())
        return self.layers[layer_idx].update(key_states, value_states)

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        layer_idx = layer_idx or 0
        return self.layers[layer_idx].get_seq_length() if layer_idx < len(self.layers) else 0

    def get_mask_sizes(self, query_length: Any, layer_idx: int = 0) -> tuple[int, int]:
        if isinstance(query_length, torch.Tensor):  # transformers < 5: the cache positions
            query_length = query_length.shape[0]
        return self.get_seq_length(layer_idx) + int(query_length), 0

    def get_max_cache_shape(self) -> int | None:  # transformers < 5
        return None

    def __len__(self) -> int:
        return len(self.layers)

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for layer in self.layers:
            layer.reorder_cache(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for layer in self.layers:
            layer.batch_select_indices(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for layer in self.layers:
            layer.batch_repeat_interleave(repeats)

    def crop(self, tokens_to_remove: int) -> None:
        for layer in self.layers:
            layer.crop(tokens_to_remove)

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return False

    def kv_bytes(self) -> int:
        """Bytes held by every layer's state (allocated capacity, all buffers included)."""
        return sum(layer.state.nbytes() for layer in self.layers)

    def __iter__(self):
        for layer in self.layers:
            yield layer.keys, layer.values, None

    def __repr__(self) -> str:
        return f"DGACache({self.options!r}, layers={len(self.layers)})"


def model_dga_settings(config: Any) -> DGAConfig | None:
    """The DGA settings a model config holds (``config.dga``, set by `patch` or by loading with
    attn_implementation="dga"; on a multimodal model its text config's), or None when it holds none."""
    if config is None:
        return None
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    stored = getattr(text, "dga", None)
    if stored is None:
        stored = getattr(config, "dga", None)
    return None if stored is None else resolve_config(stored)


def cache_keyword(model: Any) -> str:
    """The name under which `model(...)` takes a KV cache: `cache` since transformers renamed
    `past_key_values` (4.x has only the old name)."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def dense_cache(model: Any) -> DynamicCache:
    """An empty DynamicCache for `model` (transformers 5 builds it from the model's config; 4.x takes none)."""
    if "config" in inspect.signature(DynamicCache.__init__).parameters:
        return DynamicCache(config=model.config)
    return DynamicCache()


def cache_nbytes(cache: Any) -> int:
    """Bytes of keys/values a cache holds: a DGACache's whole state (`DGACache.kv_bytes`), else the
    tensors of every layer of a DynamicCache."""
    if isinstance(cache, DGACache):
        return cache.kv_bytes()
    if hasattr(cache, "layers"):
        tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    else:  # transformers < 4.54: key_cache / value_cache lists
        tensors = [*cache.key_cache, *cache.value_cache]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
