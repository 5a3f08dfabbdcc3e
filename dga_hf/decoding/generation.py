"""`generate()` with a DGACache: `enable_decoding` installs a hook on a model instance so that generate()
creates a `DGACache` where it would create a plain DynamicCache (docs/decoding.md, "Use")."""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache

from ..config import DecodingConfig
from .cache import DGACache, model_dga_settings

_HOOK = "_prepare_cache_for_generation"
_OPTIONS = "_dga_decoding"


def enable_decoding(model: Any, options: DecodingConfig | None = None, **fields: Any) -> Any:
    """Make `model.generate()` decode with a `DGACache(model, options)` whenever the model is patched and
    generate would otherwise create a plain DynamicCache (opt-in: `dga_hf.patch` alone keeps decoding
    dense). `options`: a `DecodingConfig` (default: its defaults); keyword arguments (its fields) override
    it. A cache passed by the caller is always kept as is; assisted generation (which needs a croppable
    cache) and static/quantized/offloaded caches are left alone. Block expansion follows the model's DGA
    settings (`DGAConfig.expand_blocks`); options that cannot decode them (compact with expand_blocks > 0)
    are refused here, and again by the cache if the model is patched with such settings later.

    Transformers has no public hook for the cache class generate() creates (`cache_implementation` only
    accepts its own names), so this wraps the model instance's `_prepare_cache_for_generation`: the wrapper
    calls the original and then swaps the DynamicCache it created (a `CacheHook`: the model pickles with
    it). Nothing changes at class level."""
    options = (options or DecodingConfig()).replace(**fields)
    settings = model_dga_settings(getattr(model, "config", None))
    if settings is not None:
        options.check_model_settings(settings)
    model.__dict__[_OPTIONS] = options
    hook = model.__dict__.get(_HOOK)
    if not (isinstance(hook, CacheHook) and hook.model is model):
        model.__dict__[_HOOK] = CacheHook(model)
    return model


def disable_decoding(model: Any) -> Any:
    """Undo `enable_decoding`: generate() creates the model's usual DynamicCache again (dense decoding)."""
    model.__dict__.pop(_HOOK, None)
    model.__dict__.pop(_OPTIONS, None)
    return model


def decoding_options(model: Any) -> DecodingConfig | None:
    """The `DecodingConfig` `enable_decoding` set on `model`, or None."""
    return model.__dict__.get(_OPTIONS)


def cache_for(model: Any) -> "DGACache | None":
    """A fresh DGACache with the options `enable_decoding` set on `model`, or None when the model is not
    patched or DGA decoding is disabled. For loops that call `model(...)` themselves instead of generate():
    ``model(ids, cache=dga_hf.decoding.cache_for(model), use_cache=True)`` (None: the model's DynamicCache)."""
    options = model.__dict__.get(_OPTIONS)
    if options is None or getattr(model.config, "_attn_implementation", None) != "dga":
        return None
    return DGACache(model, options)


def _assisted(args: tuple, kwargs: dict) -> bool:
    try:
        from transformers.generation.configuration_utils import GenerationMode
    except ImportError:  # pragma: no cover
        GenerationMode = None
    for value in (*args, *kwargs.values()):
        if GenerationMode is not None and isinstance(value, GenerationMode) and "ASSISTED" in value.name:
            return True
        if isinstance(value, torch.nn.Module):  # transformers < 5 passes the assistant model
            return True
    return False


class CacheHook:
    """What `enable_decoding` installs as the model instance's `_prepare_cache_for_generation`: calls the
    class's method, then swaps the DynamicCache generate() created for a DGACache.

    An object of a module-level class rather than a bound method, so that the model pickles and unpickles
    (pickle, torch.save / torch.load): a bound method pickles as ``getattr(model, its function's name)``,
    which the unpickled model does not have, while this class is found by its import path and `model`
    is pickled with the model (the same object, so the copy's hook serves the copy)."""

    def __init__(self, model: Any):
        self.model = model

    def __call__(self, generation_config, model_kwargs, *args, **kwargs):
        model = self.model
        names = ("cache", "past_key_values")
        before = {name: model_kwargs.get(name) for name in names}
        result = type(model)._prepare_cache_for_generation(model, generation_config, model_kwargs, *args, **kwargs)
        options = model.__dict__.get(_OPTIONS)
        if options is None or getattr(model.config, "_attn_implementation", None) != "dga":
            return result
        if getattr(generation_config, "is_assistant", False) or _assisted(args, kwargs):
            return result
        for name in names:
            cache = model_kwargs.get(name)
            if type(cache) is DynamicCache and cache is not before[name]:  # created by generate, not passed in
                model_kwargs[name] = DGACache(model, options)
        return result
