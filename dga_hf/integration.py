"""Transformers integration: the "dga" attention backend, its mask function, patch() and unpatch().

One backend is one function with the standard `AttentionInterface` signature. Settings live in the
model's config (`config.dga`, a dict), so they are saved with `save_pretrained`, come back with
`from_pretrained`, and two models in one process never share them. They are validated and resolved once
per model, when it is patched or built with attn_implementation="dga" (`config.dga` then holds a
`StoredDGAConfig`), never per attention call.

Where DGA is used and where dense attention is (the one place that decides it, `_use_dga`):
- prefill (q_len == kv_len) of at least `min_seq_len` tokens, on layers not in `dense_layers`: DGA;
- shorter prompts, `dense_layers`, and every step with q_len < kv_len (decoding, chunked prefill):
  dense attention over the given keys with causal and padding masks (documented fallback);
- keys returned by a `DGACache` (they carry `_dga_state`; generate() uses one after dga_hf.enable_decoding): the
  layer's decode state runs the prefill, the decoding steps and chunks (docs/decoding.md).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable

import torch
from transformers import AttentionInterface, PretrainedConfig, PreTrainedModel

from . import decoding
from .config import DGAConfig, StoredDGAConfig, resolve_config
from .ops import dense_attention, dga_attention, stats

try:  # AttentionMaskInterface appeared in transformers 4.53
    from transformers import AttentionMaskInterface
    from transformers import masking_utils
    from transformers.masking_utils import causal_mask_function
except ImportError as error:  # pragma: no cover - guarded by install_requires
    raise ImportError("dga_hf needs transformers>=4.53 (AttentionMaskInterface)") from error

ATTN_NAME = "dga"
# Transformers detects packed sequences (position ids restarting inside a row) in its masks from 4.56 on, and
# then hands `dga_mask` a mask function that the check below refuses; before that the attention function
# refuses them itself from the position ids the decoder layer passes it.
_MASKS_DETECT_PACKING = hasattr(masking_utils, "find_packed_sequence_indices")
_ORIGINAL_ATTN = "_dga_original_attn_implementation"


_SHIPPED_DEFAULT: list[DGAConfig] = []


def shipped_default() -> DGAConfig:
    """The shipped default preset (configs/default.json), read from its file once."""
    if not _SHIPPED_DEFAULT:
        _SHIPPED_DEFAULT.append(resolve_config(None))
    return _SHIPPED_DEFAULT[0]


def config_of(module: torch.nn.Module) -> DGAConfig:
    """The DGA settings of the model that owns `module` (the shipped default when its config has none).

    Resolved once per model: `patch` and loading with attn_implementation="dga" store a `StoredDGAConfig`
    in ``config.dga``, so an attention call reads an attribute and parses nothing (which is also what lets
    ``torch.compile(model, fullgraph=True)`` trace it). Settings assigned to ``config.dga`` by hand are
    validated at their first use and stored resolved the same way."""
    config = getattr(module, "config", None)
    stored = getattr(config, "dga", None)
    if isinstance(stored, StoredDGAConfig):
        return stored.config
    if stored is None:
        return shipped_default()
    resolved = StoredDGAConfig(resolve_config(stored))
    config.dga = resolved
    return resolved.config


def dga_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """`AttentionInterface` backend. query [B, Hq, q_len, d], key/value [B, Hkv, kv_len, d];
    `attention_mask` is what `dga_mask` made: a [B, kv_len] padding mask or None."""
    if kwargs.get("sliding_window") is not None:
        raise ValueError(
            f"DGA does not support sliding-window attention ({type(module).__name__}, "
            f"sliding_window={kwargs['sliding_window']}); set config.sliding_window=None or use another backend"
        )
    if dropout and module.training:
        raise ValueError("DGA attention does not implement attention dropout; set attention_dropout=0")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"DGA expects the [batch, kv_len] padding mask made by its mask function, got a "
            f"{attention_mask.dim()}-D mask of shape {tuple(attention_mask.shape)} (custom 4-D masks are not supported)"
        )
    if not _MASKS_DETECT_PACKING and attention_mask is None:
        _refuse_packed_positions(kwargs.get("position_ids"))
    state = getattr(key, "_dga_state", None)  # set by a DGACache (dga_hf.decoding) on the keys it returns
    if state is None and attention_mask is not None and attention_mask.shape[-1] != key.shape[-2]:
        raise ValueError(
            f"DGA needs a cache whose keys end at the current query (DynamicCache); got a padding mask of "
            f"length {attention_mask.shape[-1]} for {key.shape[-2]} keys"
        )
    config = config_of(module)
    if state is not None:  # a DGACache layer: its state runs the prefill, the decoding steps and chunks
        dense = getattr(module, "layer_idx", None) in config.dense_layers
        out = state.attend(query, key, value, attention_mask, config, scaling, dense=dense)
    elif _use_dga(module, query, key, config):
        out = dga_attention(query, key, value, config, scale=scaling, padding_mask=attention_mask)
    else:
        out = dense_attention(query, key, value, scale=scaling, padding_mask=attention_mask)
        if stats.counting() and query.shape[-2] == key.shape[-2]:  # a dense prefill (not a decoding step)
            lengths = torch.full((key.shape[0],), key.shape[-2], device=key.device) if attention_mask is None else attention_mask.sum(-1)
            stats.record_dense(lengths, key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def _refuse_packed_positions(position_ids: torch.Tensor | None) -> None:
    """Transformers < 4.56: refuse position ids that restart inside a row (as later versions' masks do, only
    without a padding mask: with one, generate's position ids jump over the padding)."""
    if position_ids is not None and position_ids.shape[-1] > 1:
        _require(
            (position_ids.diff(dim=-1) == 1).all(),
            "DGA implements plain causal attention with a padding mask; the position ids restart inside a row "
            "(packed sequences), which DGA does not support",
        )


def _use_dga(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, config: DGAConfig) -> bool:
    q_len, kv_len = query.shape[-2], key.shape[-2]
    if q_len != kv_len or q_len < config.min_seq_len:
        return False
    return getattr(module, "layer_idx", None) not in config.dense_layers


def dga_mask(
    batch_size: int,
    kv_length: int,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """`AttentionMaskInterface` function: instead of a [B, 1, q, kv] mask it returns the [B, kv]
    padding mask (None when nothing is padded); causality is applied inside the attention.

    Works with both calling conventions of Transformers: `q_length`/`q_offset` (recent 5.x) and
    `cache_position` (4.53 to early 5.x). Refuses what it cannot honour instead of computing another
    function: mask functions other than plain causal, and caches whose keys do not end at the query.
    Under torch.compile the checks that depend on tensor values are asserted inside the graph (`_require`),
    and the padding mask is returned even when nothing is padded (the same result, no data-dependent branch)."""
    q_start, q_end, q_count = _query_span(kwargs)
    if q_end is not None:
        _require(
            q_end == kv_offset + kv_length,
            "DGA needs a cache whose keys end at the current query (DynamicCache); a static or pre-allocated "
            "cache? use the default DynamicCache",
            lambda: f": the queries end at position {int(q_end)} but the cache holds {kv_length} key slots from "
            f"offset {kv_offset}",
        )
    mask_function = kwargs.get("mask_function")
    if mask_function is not None and mask_function is not causal_mask_function and q_end is not None:
        _check_causal(mask_function, batch_size, q_start, q_end, q_count, kv_offset, kv_length, kwargs, attention_mask)
    if attention_mask is None:
        return None
    mask = attention_mask[:, kv_offset : kv_offset + kv_length].to(torch.bool)
    if mask.shape[-1] < kv_length:  # keys past the given mask (e.g. a cache longer than the mask)
        mask = torch.nn.functional.pad(mask, (0, kv_length - mask.shape[-1]), value=True)
    if torch.compiler.is_compiling():
        return mask
    return None if bool(mask.all()) else mask


def _query_span(kwargs: dict[str, Any]) -> tuple[int | torch.Tensor | None, int | torch.Tensor | None, int]:
    """Position of the first query, one past the last (ints, or 0-d tensors under the `cache_position`
    convention) and the number of queries, from either mask-interface calling convention."""
    if kwargs.get("q_length") is not None:
        start, count = int(kwargs.get("q_offset") or 0), int(kwargs["q_length"])
        return start, start + count, count
    cache_position = kwargs.get("cache_position")
    if isinstance(cache_position, torch.Tensor) and cache_position.numel():
        return cache_position[0], cache_position[-1] + 1, cache_position.numel()
    return None, None, 0


def _require(condition: bool | torch.Tensor, message: str, details: Callable[[], str] | None = None) -> None:
    """Raise ValueError(message + details()) unless `condition`. A tensor condition under torch.compile is
    asserted inside the compiled graph instead (a RuntimeError with `message`), so the check stays without
    a data-dependent branch."""
    if isinstance(condition, torch.Tensor) and torch.compiler.is_compiling():
        torch._assert_async(condition, message)
    elif not bool(condition):
        raise ValueError(message + (details() if details else ""))


def _check_causal(
    mask_function: Any,
    batch_size: int,
    q_start: int | torch.Tensor,
    q_end: int | torch.Tensor,
    q_count: int,
    kv_offset: int,
    kv_length: int,
    kwargs: dict[str, Any],
    attention_mask: torch.Tensor | None,
) -> None:
    """DGA computes plain causal attention (plus padding) whatever mask function the model asks for.
    Transformers sometimes wraps the causal function in one that changes nothing (4.57 adds a packed-sequence
    term to every forward without a cache, and every forward under torch.compile), so the function is
    checked, in O(batch x kv_len) and never as an L x L mask, where a different function would show: the last
    query must see every key (this fails for packed sequences, sliding windows shorter than the sequence,
    chunked attention) and the first query must not see the next key (this fails for bidirectional
    attention)."""
    device = kwargs.get("device")
    if device is None:
        reference = kwargs.get("cache_position", attention_mask)
        device = reference.device if isinstance(reference, torch.Tensor) else "cpu"
    batch = torch.arange(batch_size, device=device)[:, None]
    head = torch.zeros((), dtype=torch.long, device=device)
    keys = torch.arange(kv_offset, kv_offset + kv_length, device=device)[None, :]
    name = getattr(mask_function, "__name__", type(mask_function).__name__)
    message = (
        f"DGA implements plain causal attention with a padding mask; this model asked for another attention "
        f"pattern (mask function {name}: packed sequences, bidirectional, sliding-window or chunked "
        "attention, or extra and/or mask functions), which DGA does not support"
    )
    try:
        last = _position(q_end - 1, device)
        causal = torch.as_tensor(mask_function(batch, head, last, keys)).all()
        if q_count > 1:
            first = _position(q_start, device)
            ahead = mask_function(batch, head, first, (first + 1).view(1, 1))
            causal = causal & ~torch.as_tensor(ahead).any()
    except Exception:  # a mask function that only works element-wise: cannot be checked, so not supported
        raise ValueError(message) from None
    _require(causal, message)


def _position(position: int | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A query position as the one-element tensor a mask function is called with. One element, not 0-d: a
    mask function that indexes a tensor with it (packed sequences) would read a 0-d index as an int, a
    data-dependent value under torch.compile; and an int is filled in, not converted with torch.as_tensor,
    which under torch.compile(dynamic=True) would fix the sequence length in the graph."""
    if isinstance(position, torch.Tensor):
        return position.reshape(1).to(device)
    return torch.full((1,), position, dtype=torch.long, device=device)


def register() -> None:
    """Register "dga" with Transformers and check models where they are built (done on `import dga_hf`)."""
    AttentionInterface.register(ATTN_NAME, dga_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, dga_mask)
    _check_models_when_built()


def _check_models_when_built() -> None:
    """Transformers calls nothing of an attention backend before the first forward, so a model loaded with
    attn_implementation="dga" would only fail there. Two methods that every Transformers model runs in its
    __init__, before from_pretrained loads the weights, are wrapped once: the check of the requested attention
    at its start (`_check_and_adjust_attn_implementation` from 4.54 on, the class method
    `_autoset_attn_implementation` on 4.53), where a class whose attention does not go through
    AttentionInterface is refused before it fails building its layers for "dga"; and `post_init` at its end,
    where the built model is checked (`_check_built_model`)."""

    def requested(model: PreTrainedModel, implementation: str) -> None:
        if implementation == ATTN_NAME:
            _check_class(type(model))

    def requested_on_4_53(model_class: type, config: PretrainedConfig) -> None:
        if config._attn_implementation == ATTN_NAME:
            _check_class(model_class)

    _check_after("_check_and_adjust_attn_implementation", requested)
    _check_after("_autoset_attn_implementation", requested_on_4_53)
    _check_after("post_init", lambda model, _: _check_built_model(model))


def _check_after(name: str, check: Callable[[Any, Any], Any]) -> None:
    """Wrap `PreTrainedModel.<name>` (a method or a class method, where this Transformers has it) once, so
    that ``check(self or cls, its result)`` runs after it."""
    raw = PreTrainedModel.__dict__.get(name)
    is_classmethod = isinstance(raw, classmethod)
    function = raw.__func__ if is_classmethod else raw
    if function is None or getattr(function, "_dga_check", False):
        return

    @functools.wraps(function)
    def checked(owner: Any, *args: Any, **kwargs: Any) -> Any:
        result = function(owner, *args, **kwargs)
        check(owner, result)
        return result

    checked._dga_check = True  # type: ignore[attr-defined]
    setattr(PreTrainedModel, name, classmethod(checked) if is_classmethod else checked)


def _check_built_model(model: PreTrainedModel) -> None:
    """A model built with attn_implementation="dga": refuse it as `patch` would and resolve the settings in
    its config now, with `DGAConfig`'s messages. A model built with another attention whose config holds
    DGA settings (a saved DGA model loaded without attn_implementation="dga"): warn that they are unused."""
    implementation = model.config._attn_implementation
    if implementation != ATTN_NAME:
        if getattr(model.config, "dga", None) is not None:
            # one message per checkpoint, not per nested model (a CausalLM builds its base model first)
            warnings.warn(
                f"the model from {model.config.name_or_path or 'its config'!r} holds DGA settings (config.dga) but "
                f"was built with attn_implementation={implementation!r}, so they are unused: load it with "
                'attn_implementation="dga" or call dga_hf.patch(model) to use them (dga_hf.unpatch(model) drops them)',
                UserWarning,
                stacklevel=1,
            )
        return
    check_supported(model)
    for config in _configs(model):
        stored = getattr(config, "dga", None)
        if stored is None or isinstance(stored, StoredDGAConfig):
            continue
        try:
            config.dga = StoredDGAConfig(resolve_config(stored))
        except (TypeError, ValueError) as error:
            raise type(error)(
                f"{type(model).__name__} was built with attn_implementation=\"dga\" and invalid DGA settings in its "
                f"config (config.dga, config.json's \"dga\" entry): {error}"
            ) from None
    shipped_default()  # read the preset file now, not in a (possibly compiled) forward


def _configs(model: PreTrainedModel) -> list[PretrainedConfig]:
    """Every distinct config object that an attention module of the model reads."""
    seen: dict[int, PretrainedConfig] = {id(model.config): model.config}
    for module in model.modules():
        config = getattr(module, "config", None)
        if isinstance(config, PretrainedConfig):
            seen.setdefault(id(config), config)
    return list(seen.values())


def _supported() -> str:
    from dga_hf.patches import TESTED_MODEL_TYPES

    return f"supported: models whose attention goes through transformers' AttentionInterface (tested: {', '.join(TESTED_MODEL_TYPES)})"


def _check_class(model_class: type) -> None:
    if not getattr(model_class, "_supports_attention_backend", False):
        raise TypeError(
            f"{model_class.__name__} cannot be patched with DGA: its attention does not use AttentionInterface; {_supported()}"
        )


def check_supported(model: torch.nn.Module) -> None:
    """Raise a clear error for models DGA cannot run on."""
    from dga_hf.patches import sliding_window_layers

    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"dga_hf.patch expects a transformers PreTrainedModel, got {type(model).__name__}; {_supported()}")
    _check_class(type(model))
    for config in _configs(model):
        layers = sliding_window_layers(config)
        if layers:
            raise ValueError(
                f"{type(model).__name__} uses sliding-window attention on layers {layers[:8]}{'...' if len(layers) > 8 else ''} "
                f"(sliding_window={config.sliding_window}); DGA is defined for full causal attention. "
                "Load the model with sliding_window=None to patch it."
            )
    # Transformers' attention modules say whether they are causal (what its SDPA backend reads)
    not_causal = [name for name, module in model.named_modules() if getattr(module, "is_causal", True) is False]
    if not_causal:
        raise ValueError(
            f"{type(model).__name__} has attention that is not causal in {not_causal[:4]}"
            f"{'...' if len(not_causal) > 4 else ''} (is_causal=False: a bidirectional encoder or cross-attention); "
            "DGA is defined for causal self-attention"
        )


def patch(model: PreTrainedModel, config: DGAConfig | dict | str | None = None) -> PreTrainedModel:
    """Make `model` use DGA. `config`: a DGAConfig, a dict, a preset name, or None (the settings already
    in ``model.config.dga``, else the shipped default). Patching again only changes the settings."""
    check_supported(model)
    if config is None and getattr(model.config, "dga", None) is not None:
        settings = config_of(model)
    else:
        settings = resolve_config(config)
    if model.config._attn_implementation != ATTN_NAME:
        setattr(model, _ORIGINAL_ATTN, model.config._attn_implementation)
    stored = StoredDGAConfig(settings)
    for sub_config in _configs(model):
        sub_config.dga = stored
    _set_attn_implementation(model, ATTN_NAME)
    # DGA decoding stays opt-in (dga_hf.enable_decoding) until it meets its quality target: measured on
    # SmolLM2 it keeps passkeys but loses long-range copying (docs/decoding.md)
    return model


def unpatch(model: PreTrainedModel) -> PreTrainedModel:
    """Restore the attention implementation the model had before `patch` (sdpa, or eager where the model
    has no sdpa, for a model loaded with attn_implementation="dga") and remove the DGA settings from its
    config. A model that is not patched keeps its attention implementation."""
    if is_patched(model):
        fallback = "sdpa" if getattr(model, "_supports_sdpa", False) else "eager"
        _set_attn_implementation(model, getattr(model, _ORIGINAL_ATTN, None) or fallback)
    for sub_config in _configs(model):
        if hasattr(sub_config, "dga"):
            delattr(sub_config, "dga")
    if hasattr(model, _ORIGINAL_ATTN):
        delattr(model, _ORIGINAL_ATTN)
    decoding.disable_decoding(model)
    return model


def _set_attn_implementation(model: PreTrainedModel, name: str) -> None:
    """`set_attn_implementation` where it exists (transformers >= 4.54); before it, the models read
    `config._attn_implementation` at every forward, so setting it on every config is the switch."""
    setter = getattr(model, "set_attn_implementation", None)
    if callable(setter):
        setter(name)
        return
    for config in _configs(model):
        config._attn_implementation = name


def is_patched(model: PreTrainedModel) -> bool:
    return model.config._attn_implementation == ATTN_NAME
