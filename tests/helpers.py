"""Tiny models and inputs shared by the test modules (test modules import this module, never each other).

- models: `ARCHS`, `TINY_CONFIG`, `tiny_config`, `make_model`, `save_tiny_model`, `random_ids`, `left_pad`,
  and the sparse settings `SPARSE_PAPER_LIKE` / `SPARSE_SINKS_LOGSIZE` they are patched with;
- training and evaluation runs: `char_tokenizer`, `save_char_model` (a tiny model of it), `repeated_text`;
- operator inputs: `qkv`, `left_padding`, the hypothesis strategy `dga_config_strategy`, and
  `dense_reference` (causal softmax attention in float64, what exact DGA settings must equal; docs/spec.md);
- decode state: `DECODE_CFG`, `decode_qkv`, `run_cache` (a prompt then steps through one DGACache layer) and
  `decode_reference` (the decoding transcription it must equal);
- Triton kernels: the devices they run on (`DEVICES`, `INTERPRET`, `CUDA_COMPILED`) and small settings `CFG_A`..`CFG_D`.
"""

from __future__ import annotations

import importlib.util
import math
import os
import random
import string
from pathlib import Path

import pytest
import torch
from hypothesis import strategies as st
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import dga_hf
from dga_hf import DGACache, DGAConfig
from dga_hf.ops.naive import naive_decode

ROOT = Path(__file__).resolve().parent.parent


def load_script(name: str):
    """A script of scripts/ (not a package) as a module, e.g. ``load_script("import_graph")``."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

# ------------------------------------------------------------------------------------------------ tiny models

# The architectures the tests build tiny random models of: name -> (config class, model class, the config
# arguments that give full causal attention).
ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"use_sliding_window": False}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"use_sliding_window": False, "head_dim": 16}),
}

VOCAB = 128
LAYERS = 2
TINY_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=4096,
    bos_token_id=None,
    eos_token_id=None,  # a random model must not stop early: rows alone and batched stay comparable
    pad_token_id=0,
    # sharper attention than the default 0.02, so that a wrong key set shows in the logits
    initializer_range=0.2,
)

# DGA really sparse at L ~ 150: 10 focal tokens, one local block of 16, aggregates for the rest.
SPARSE_PAPER_LIKE = DGAConfig(group_size=16, focal_ratio=0.1, probe_queries=16, local_blocks=1, min_seq_len=0, backend="torch")
# Another corner of the parameter space: sinks, log-size bias, several local blocks, small groups.
SPARSE_SINKS_LOGSIZE = DGAConfig(
    group_size=8, focal_ratio=0.2, probe_queries=4, local_blocks=2, sink_tokens=3, group_bias="log_size",
    min_seq_len=0, backend="torch",
)


def tiny_config(arch: str, **overrides) -> PretrainedConfig:
    """`TINY_CONFIG` for `arch` (full causal attention), `overrides` replacing any field."""
    config_class, _, extra = ARCHS[arch]
    return config_class(**{**TINY_CONFIG, **extra, **overrides})


def make_model(arch: str, seed: int = 0, attn_implementation: str | None = None, **overrides) -> PreTrainedModel:
    """A tiny random model in eval mode whose generate() never stops early (no EOS) and pads with 0."""
    config = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    if attn_implementation is None:
        model = ARCHS[arch][1](config)
    else:
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def save_tiny_model(path: Path, tokenizer, arch: str = "llama", *, seed: int = 0, dga: DGAConfig | None = None,
                    **overrides) -> Path:
    """A tiny random model with `tokenizer`'s vocabulary saved in `path` with the tokenizer (what
    `from_pretrained` and the harness load); patched with `dga` first when given, so the checkpoint carries
    the settings."""
    config = tiny_config(arch, vocab_size=len(tokenizer), **overrides)
    torch.manual_seed(seed)
    model = ARCHS[arch][1](config)
    if dga is not None:
        dga_hf.patch(model, dga)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character (printable ASCII), <eos> = 1: no download, same on every version."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(sorted(set(string.printable)))}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")


def save_char_model(path: Path, arch: str = "llama", dga: DGAConfig | None = None) -> Path:
    """A tiny model of the character tokenizer (<eos> = 1 ends and pads), tied embeddings, saved with it."""
    return save_tiny_model(path, char_tokenizer(), arch, dga=dga, max_position_embeddings=1024, eos_token_id=1,
                           pad_token_id=1, tie_word_embeddings=True)


def repeated_text(seed: int = 0, length: int = 240, copies: int = 12) -> str:
    """`copies` repetitions of `length` random characters: text a tiny model learns in a few steps."""
    rng = random.Random(seed)
    return "".join(rng.choice("abcdefghijklmnop \n") for _ in range(length)) * copies


def random_ids(*shape: int, seed: int | None = None) -> torch.Tensor:
    """Token ids in [1, VOCAB) (0 is the pad id): from a generator seeded with `seed`, else from torch's
    global generator (the caller seeds it)."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, shape, generator=generator)


def left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask and position_ids of a left-padded batch (tokenizer-free)."""
    width = max(len(row) for row in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, width - len(row) :] = row
        mask[b, width - len(row) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


# ------------------------------------------------------------------------------------------------ operator inputs


def qkv(batch, q_heads, kv_heads, seq_len, dim, *, seed, dtype=torch.float32, spread=1.0):
    """Random query, key and value tensors (batch, heads, seq_len, dim), all scaled by `spread`."""
    gen = torch.Generator().manual_seed(seed)
    make = lambda heads: (spread * torch.randn(batch, heads, seq_len, dim, generator=gen)).to(dtype)
    return make(q_heads), make(kv_heads), make(kv_heads)


def left_padding(batch, seq_len, *, seed):
    """A boolean padding mask: row 0 unpadded, each later row left-padded by a random amount."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, seq_len, dtype=torch.bool)
    for row in range(1, batch):
        mask[row, : int(torch.randint(0, seq_len, (1,), generator=gen))] = False
    return mask


def dense_reference(q, k, v, padding_mask=None):
    """Plain causal softmax attention in float64 (GQA by repeating heads)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    seq_len = q.shape[2]
    allowed = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()[None, None]
    if padding_mask is not None:
        allowed = allowed & padding_mask[:, None, None, :]
    logits = (q.double() @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    out = logits.masked_fill(~allowed, -math.inf).softmax(-1).nan_to_num(0.0) @ v
    if padding_mask is not None:
        out = out * padding_mask[:, None, :, None]
    return out


# hypothesis: DGA settings over the whole parameter space, at the sizes the operator tests draw
dga_config_strategy = st.builds(
    DGAConfig,
    group_size=st.integers(1, 9),
    focal_ratio=st.sampled_from([0.05, 0.1, 0.25, 0.5, 1.0]),
    probe_queries=st.integers(1, 40),
    local_blocks=st.integers(1, 4),
    expand_blocks=st.sampled_from([0, 0, 1, 2, 5]),
    expand_score=st.sampled_from(["aggregate", "principal"]),
    sink_tokens=st.integers(0, 6),
    group_bias=st.sampled_from(["none", "log_size"]),
    min_seq_len=st.sampled_from([0, 0, 0, 30]),
)


# ------------------------------------------------------------------------------------------------ Triton kernels
# (tests/test_triton_backend.py, tests/test_triton_backward.py, tests/test_triton_decode.py)
#
# Two devices, never both in one process:
# * ``cpu``: Triton's interpreter runs the kernels on CPU tensors. Triton picks interpreter or compiler when it is
#   first imported, so ``TRITON_INTERPRET=1`` must be in the environment by then: conftest.py sets it on a machine
#   without CUDA; if triton was imported before that, the CPU cases skip and say so.
# * ``cuda``: the compiled kernels on a GPU; runs only when CUDA is available and ``TRITON_INTERPRET`` is unset
#   (``scripts/gpu_check.sh``).

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
CUDA_COMPILED = not INTERPRET and torch.cuda.is_available()
NOT_CUDA_COMPILED = "needs CUDA and TRITON_INTERPRET unset (compiled kernels)"
# a test of the Triton backend on whichever device runs it: only a process where triton was imported before
# conftest.py could set TRITON_INTERPRET=1, on a machine without CUDA, has neither (the README's command has it)
needs_triton = pytest.mark.skipif(
    not (INTERPRET or CUDA_COMPILED),
    reason="the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1 before triton is first imported) "
    "or compiled on CUDA; this process has neither",
)

DEVICES = [
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(
            not INTERPRET,
            reason="the CPU path runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1 in the "
            "environment before triton is first imported",
        ),
    ),
    pytest.param("cuda", marks=pytest.mark.skipif(not CUDA_COMPILED, reason=NOT_CUDA_COMPILED)),
]

# Small settings whose tiles, blocks and windows make every loop of the prefill kernels run at tiny lengths.
CFG_A = DGAConfig(group_size=4, focal_ratio=0.25, probe_queries=8, local_blocks=1)
CFG_B = DGAConfig(group_size=4, focal_ratio=0.2, probe_queries=6, local_blocks=3, sink_tokens=2, group_bias="log_size")
CFG_C = DGAConfig(group_size=16, focal_ratio=0.1, probe_queries=8, local_blocks=1)
CFG_D = DGAConfig(group_size=8, focal_ratio=0.15, probe_queries=8, local_blocks=2)


# ------------------------------------------------------------------------------------------------ decode state
# (tests/test_decoding.py, tests/test_triton_decode.py): one layer of a DGACache fed a prompt, then steps.

DECODE_KV_HEADS, DECODE_GROUP, DECODE_HEAD_DIM = 2, 2, 8
DECODE_SCALE = DECODE_HEAD_DIM**-0.5
DECODE_CFG = DGAConfig(
    group_size=8, focal_ratio=0.2, probe_queries=8, local_blocks=2, sink_tokens=2, group_bias="log_size",
    min_seq_len=0, backend="torch",
)


def decode_qkv(batch: int, length: int, seed: int):
    """float64 query/key/value of one decode layer (the heads above), queries and keys of spread 2."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, DECODE_KV_HEADS * DECODE_GROUP, length, DECODE_HEAD_DIM, generator=g, dtype=torch.float64) * 2
    k = torch.randn(batch, DECODE_KV_HEADS, length, DECODE_HEAD_DIM, generator=g, dtype=torch.float64) * 2
    v = torch.randn(batch, DECODE_KV_HEADS, length, DECODE_HEAD_DIM, generator=g, dtype=torch.float64)
    return q, k, v


def run_cache(q, k, v, cfg, prompt_len, steps, mode, every, mask=None, dense=False, cache=None):
    """Feed the prompt then the steps through one layer of a DGACache; outputs [B, Hq, T, d]. Block expansion
    is cfg.expand_blocks (the DGA settings), as in a model."""
    cache = cache if cache is not None else DGACache(mode=mode, refresh_every=every, dense_share=None)
    t, outs = 0, []
    for size in [prompt_len, *steps]:
        key, value = cache.update(k[:, :, t : t + size], v[:, :, t : t + size], 0)
        step_mask = None if mask is None else mask[:, : t + size]
        outs.append(key._dga_state.attend(q[:, :, t : t + size], key, value, step_mask, cfg, DECODE_SCALE, dense=dense))
        t += size
    return torch.cat(outs, dim=2), cache


def triton_decoding(cfg):
    """cfg for a cache whose prefill and one-token steps run the Triton kernels (with expansion too)."""
    return cfg.replace(backend="triton")


def decode_reference(q, k, v, cfg, prompt_len, steps, mode, every, dense=False):
    """What `run_cache` must output: the decoding transcription (dga_hf.ops.naive.naive_decode) per row and kv head."""
    fed = prompt_len + sum(steps)
    q, k, v = q[:, :, :fed], k[:, :, :fed], v[:, :, :fed]
    out = torch.zeros(q.shape[0], q.shape[1], q.shape[2], v.shape[-1], dtype=torch.float64)
    for b in range(q.shape[0]):
        for h in range(DECODE_KV_HEADS):
            out[b, h * DECODE_GROUP : (h + 1) * DECODE_GROUP] = naive_decode(
                q[b, h * DECODE_GROUP : (h + 1) * DECODE_GROUP], k[b, h], v[b, h], cfg, DECODE_SCALE, prompt_len, every, mode, steps, dense
            )
    return out
