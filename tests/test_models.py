"""DGA inside real Transformers models (tiny random Llama, Mistral, Qwen2, Qwen3 built here).

What is checked, per architecture where it matters:
- exact settings (group_size=1, focal_ratio=1, local_blocks >= ceil(L/m)) give the unpatched logits;
- sparse settings change the logits and match the model run with the naive float64 reference;
- generate(): greedy and sampling, left-padded batch of 2, dense decoding by default (a DGACache after
  dga_hf.enable_decoding, covered in tests/test_decoding.py); each padded row equals the row alone;
- padding: a left-padded row gets the logits of its unpadded sequence;
- dense fallbacks: prompts below min_seq_len, dense_layers, and decoding steps over a plain DynamicCache;
- per-model settings, patch/unpatch round trips, save/from_pretrained, clear errors.

Settings live in `model.config.dga`; `patch` switches `config._attn_implementation` to "dga".
"""

from __future__ import annotations

import copy
import inspect
import json
import math

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    PreTrainedModel,
)

import dga_hf
from dga_hf import DGAConfig, is_patched, patch, unpatch
from dga_hf import integration
from dga_hf.integration import config_of
from helpers import (
    ARCHS, LAYERS, SPARSE_PAPER_LIKE, SPARSE_SINKS_LOGSIZE, TINY_CONFIG, VOCAB, left_pad, make_model, random_ids,
)

ARCH_NAMES = list(ARCHS)


@torch.no_grad()
def logits(model, ids, attention_mask=None, position_ids=None) -> torch.Tensor:
    return model(
        input_ids=ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).logits.float()


def cache_kwarg(model) -> str:
    """The name of the cache argument of forward(): `cache` in recent Transformers, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ------------------------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_exact_settings_equal_dense(arch):
    model = make_model(arch)
    torch.manual_seed(1)
    length = 150
    ids = random_ids(2, length)
    dense = logits(model, ids)
    exact = [
        SPARSE_PAPER_LIKE.replace(group_size=1),
        SPARSE_PAPER_LIKE.replace(focal_ratio=1.0),
        SPARSE_PAPER_LIKE.replace(local_blocks=math.ceil(length / SPARSE_PAPER_LIKE.group_size)),
        SPARSE_SINKS_LOGSIZE.replace(local_blocks=math.ceil(length / SPARSE_SINKS_LOGSIZE.group_size)),
    ]
    for settings in exact:
        patch(model, settings)
        assert max_diff(logits(model, ids), dense) < 1e-5, settings
    unpatch(model)


@pytest.mark.parametrize("arch", ARCH_NAMES)
@pytest.mark.parametrize("settings", [SPARSE_PAPER_LIKE, SPARSE_SINKS_LOGSIZE], ids=["paper-like", "sinks-logsize"])
def test_sparse_differs_from_dense_and_matches_naive(arch, settings):
    model = make_model(arch)
    torch.manual_seed(2)
    ids = random_ids(1, 150)
    dense = logits(model, ids)
    patch(model, settings)
    fast = logits(model, ids)
    patch(model, settings.replace(backend="naive"))
    reference = logits(model, ids)
    unpatch(model)
    assert max_diff(fast, dense) > 1e-2  # DGA really changed something, so the next line can fail
    assert max_diff(fast, reference) < 1e-4


# ------------------------------------------------------------------------------------------------ generate

GENERATE = SPARSE_PAPER_LIKE.replace(min_seq_len=64)


class _CountDGA:
    """Counts the calls of the DGA kernel (as opposed to the dense fallback) made by the backend."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[int, int]] = []
        real = integration.dga_attention

        def counted(query, key, *args, **kwargs):
            self.calls.append((query.shape[-2], key.shape[-2]))
            return real(query, key, *args, **kwargs)

        monkeypatch.setattr(integration, "dga_attention", counted)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_generate_greedy_left_padded_equals_rows_alone(arch):
    """generate() on a patched model: DGA prefill, then dense decoding (DGA decoding is opt-in through
    dga_hf.enable_decoding and tested in tests/test_decoding.py)."""
    model = patch(make_model(arch), GENERATE)
    torch.manual_seed(3)
    rows = [random_ids(120), random_ids(90)]
    ids, mask, positions = left_pad(rows)
    new = 5
    kwargs = dict(max_new_tokens=new, do_sample=False, use_cache=True, output_scores=True, return_dict_in_generate=True)
    out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert out.sequences.shape == (2, 120 + new) and len(out.scores) == new
    assert torch.equal(out.sequences[:, :120], ids)
    # the first new token comes from the DGA prefill (prompt length >= min_seq_len), not from dense attention
    prefill = logits(model, ids, mask, positions)[:, -1]
    assert max_diff(out.scores[0], prefill) < 1e-5
    unpatch(model)
    assert max_diff(out.scores[0], logits(model, ids, mask, positions)[:, -1]) > 1e-3
    patch(model, GENERATE)
    for b, row in enumerate(rows):
        alone = model.generate(input_ids=row[None], attention_mask=torch.ones(1, len(row), dtype=torch.long), **kwargs)
        assert torch.equal(out.sequences[b, -new:], alone.sequences[0, -new:]), (b, out.sequences[b, -new:], alone.sequences[0, -new:])
        for step, (batched_scores, alone_scores) in enumerate(zip(out.scores, alone.scores)):
            assert max_diff(batched_scores[b], alone_scores[0]) < 1e-4, (b, step)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_generate_with_dense_decoding(arch, monkeypatch):
    """dga_hf.disable_decoding: generate() keeps its DynamicCache, so only the prefill runs DGA and every
    decoding step is dense attention over the cache (the left-padded batch still matches the rows alone)."""
    model = dga_hf.disable_decoding(patch(make_model(arch), GENERATE))
    counter = _CountDGA(monkeypatch)
    torch.manual_seed(19)
    rows = [random_ids(110), random_ids(80)]
    ids, mask, _ = left_pad(rows)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, use_cache=True)
    assert out.shape == (2, 114)
    assert counter.calls == [(110, 110)] * LAYERS  # the prefill, on every layer; no decoding step
    for b, row in enumerate(rows):
        alone = model.generate(
            input_ids=row[None], attention_mask=torch.ones(1, len(row), dtype=torch.long),
            max_new_tokens=4, do_sample=False, use_cache=True,
        )
        assert torch.equal(out[b, -4:], alone[0, -4:])


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_generate_sampling(arch):
    model = patch(make_model(arch), GENERATE)
    torch.manual_seed(4)
    ids, mask, _ = left_pad([random_ids(100), random_ids(80)])
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=True, top_k=0, use_cache=True)
    torch.manual_seed(11)
    first = model.generate(**kwargs)
    torch.manual_seed(11)
    again = model.generate(**kwargs)
    assert first.shape == (2, 105)
    assert torch.equal(first, again)
    assert int(first.min()) >= 0 and int(first.max()) < VOCAB


# ------------------------------------------------------------------------------------------------ padding


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_left_padding_gives_each_row_its_unpadded_logits(arch):
    model = patch(make_model(arch), SPARSE_SINKS_LOGSIZE.replace(min_seq_len=64))
    torch.manual_seed(5)
    # 40 < min_seq_len: that row stays dense inside a DGA batch, as it would alone
    rows = [random_ids(150), random_ids(111), random_ids(40)]
    ids, mask, positions = left_pad(rows)
    batched = logits(model, ids, mask, positions)
    for b, row in enumerate(rows):
        alone = logits(model, row[None])
        assert max_diff(batched[b, -len(row) :], alone[0]) < 1e-5, b
    assert torch.isfinite(batched).all()


# ------------------------------------------------------------------------------------------------ dense fallbacks


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_short_prompt_is_dense(arch):
    model = make_model(arch)
    torch.manual_seed(6)
    ids = random_ids(2, 100)
    dense = logits(model, ids)
    patch(model, SPARSE_PAPER_LIKE.replace(min_seq_len=101))
    assert max_diff(logits(model, ids), dense) < 1e-6
    patch(model, SPARSE_PAPER_LIKE.replace(min_seq_len=100))  # at min_seq_len DGA starts
    assert max_diff(logits(model, ids), dense) > 1e-2


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_dense_layers(arch):
    model = make_model(arch)
    torch.manual_seed(7)
    ids = random_ids(1, 150)
    dense = logits(model, ids)
    patch(model, SPARSE_PAPER_LIKE.replace(dense_layers=list(range(LAYERS))))
    assert max_diff(logits(model, ids), dense) < 1e-6
    patch(model, SPARSE_PAPER_LIKE)
    all_dga = logits(model, ids)
    patch(model, SPARSE_PAPER_LIKE.replace(dense_layers=[0]))
    first_dense = logits(model, ids)
    patch(model, SPARSE_PAPER_LIKE.replace(dense_layers=[0], backend="naive"))
    first_dense_reference = logits(model, ids)
    assert max_diff(first_dense, dense) > 1e-2 and max_diff(first_dense, all_dga) > 1e-2
    assert max_diff(first_dense, first_dense_reference) < 1e-4


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_huge_min_seq_len_generates_like_dense(arch):
    model = make_model(arch)
    torch.manual_seed(8)
    ids, mask, _ = left_pad([random_ids(100), random_ids(70)])
    kwargs = dict(
        input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, use_cache=True,
        output_scores=True, return_dict_in_generate=True,
    )
    dense = model.generate(**kwargs)
    patch(model, SPARSE_PAPER_LIKE.replace(min_seq_len=10**9))
    patched = model.generate(**kwargs)
    assert torch.equal(patched.sequences, dense.sequences)
    for a, b in zip(patched.scores, dense.scores):  # another kernel for the same function: float rounding
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_decode_step_is_dense_over_a_dynamic_cache(arch):
    """A plain forward with the model's own DynamicCache (not a DGACache): prefill with DGA fills the cache,
    and the next step (q_len=1 < kv_len) is dense attention over it: the same step run by the unpatched
    model on a copy of that cache gives the same logits."""
    model = patch(make_model(arch), SPARSE_PAPER_LIKE)
    torch.manual_seed(9)
    ids, mask, positions = left_pad([random_ids(140), random_ids(100)])
    step_ids = random_ids(2, 1)
    step_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    step_positions = positions[:, -1:] + 1
    cache_arg = cache_kwarg(model)
    with torch.no_grad():
        prefill = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        cache = prefill.past_key_values
        saved = copy.deepcopy(cache)
        dga_step = model(step_ids, attention_mask=step_mask, position_ids=step_positions, **{cache_arg: cache}).logits
        unpatch(model)
        dense_step = model(step_ids, attention_mask=step_mask, position_ids=step_positions, **{cache_arg: saved}).logits
        # sanity: the cache itself came from DGA (a dense prefill gives another step)
        fresh = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True).past_key_values
        dense_everywhere = model(step_ids, attention_mask=step_mask, position_ids=step_positions, **{cache_arg: fresh}).logits
    assert max_diff(dga_step, dense_step) < 1e-5
    assert max_diff(dga_step, dense_everywhere) > 1e-3


# ------------------------------------------------------------------------------------------------ per-model state


def test_two_models_keep_their_own_settings():
    torch.manual_seed(10)
    ids = random_ids(1, 150)
    first, second = make_model("llama"), make_model("llama")  # same weights: only the settings differ
    patch(first, SPARSE_PAPER_LIKE)
    first_alone = logits(first, ids)
    unpatch(first)
    patch(second, SPARSE_SINKS_LOGSIZE)
    second_alone = logits(second, ids)
    patch(first, SPARSE_PAPER_LIKE)
    assert max_diff(first_alone, second_alone) > 1e-2
    for _ in range(2):  # interleaved
        assert torch.equal(logits(first, ids), first_alone)
        assert torch.equal(logits(second, ids), second_alone)
    assert config_of(first.model.layers[0].self_attn) == SPARSE_PAPER_LIKE
    assert config_of(second.model.layers[0].self_attn) == SPARSE_SINKS_LOGSIZE


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_unpatch_restores_bit_for_bit(arch):
    model = make_model(arch)
    torch.manual_seed(12)
    ids = random_ids(2, 150)
    original = logits(model, ids)
    before = model.config._attn_implementation
    patch(model, SPARSE_PAPER_LIKE)
    assert is_patched(model) and model.config._attn_implementation == "dga"
    assert max_diff(logits(model, ids), original) > 1e-2
    unpatch(model)
    assert not is_patched(model)
    assert model.config._attn_implementation == before
    assert getattr(model.config, "dga", None) is None
    assert torch.equal(logits(model, ids), original)


def test_patching_twice_is_harmless():
    model = make_model("qwen2", attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    torch.manual_seed(13)
    ids = random_ids(1, 150)
    original = logits(model, ids)
    patch(model, SPARSE_PAPER_LIKE)
    once = logits(model, ids)
    patch(model, SPARSE_PAPER_LIKE)
    assert torch.equal(logits(model, ids), once)
    patch(model, SPARSE_SINKS_LOGSIZE)  # patching again changes only the settings
    assert max_diff(logits(model, ids), once) > 1e-2
    patch(model)  # None: keep the settings stored in the config
    assert config_of(model.model.layers[0].self_attn) == SPARSE_SINKS_LOGSIZE
    unpatch(model)
    assert model.config._attn_implementation == "eager"  # remembered across both patches
    assert torch.equal(logits(model, ids), original)
    unpatch(model)  # unpatching a model that is not patched changes nothing
    assert model.config._attn_implementation == "eager"
    assert torch.equal(logits(model, ids), original)


# ------------------------------------------------------------------------------------------------ save / load


@pytest.mark.parametrize("arch,settings", [
    ("llama", SPARSE_SINKS_LOGSIZE), ("qwen3", SPARSE_SINKS_LOGSIZE),
    ("llama", SPARSE_SINKS_LOGSIZE.replace(expand_blocks=3, expand_score="principal")),
], ids=["llama", "qwen3", "llama-principal-expansion"])
def test_save_and_load_keep_settings_and_logits(arch, settings, tmp_path):
    model = patch(make_model(arch), settings)
    torch.manual_seed(14)
    ids = random_ids(1, 150)
    expected = logits(model, ids)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dga"] == settings.to_dict()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="dga").eval()
    assert is_patched(loaded)
    assert DGAConfig.from_dict(loaded.config.dga) == settings
    assert config_of(loaded.model.layers[1].self_attn) == settings
    assert torch.equal(logits(loaded, ids), expected)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # settings come along, unused
    assert not is_patched(plain) and DGAConfig.from_dict(plain.config.dga) == settings
    patch(plain)  # ...until patched with no explicit settings
    assert torch.equal(logits(plain, ids), expected)


def test_load_with_dga_and_no_settings_uses_default_preset(tmp_path):
    model = make_model("llama")
    model.save_pretrained(tmp_path)
    default = DGAConfig.preset("default")
    length = max(default.min_seq_len, default.group_size * default.local_blocks) + 100  # DGA is sparse here
    torch.manual_seed(15)
    ids = random_ids(1, length)
    dense = logits(model, ids)
    patch(model, "default")
    expected = logits(model, ids)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="dga").eval()
    assert is_patched(loaded) and getattr(loaded.config, "dga", None) is None
    assert config_of(loaded.model.layers[0].self_attn) == default
    actual = logits(loaded, ids)
    assert max_diff(actual, dense) > 1e-3
    assert torch.equal(actual, expected)
    unpatch(loaded)
    assert loaded.config._attn_implementation == "sdpa"


# ------------------------------------------------------------------------------------------------ errors


def test_patch_rejects_a_plain_module():
    with pytest.raises(TypeError, match=r"expects a transformers PreTrainedModel, got Linear.*llama, mistral, qwen2, qwen3"):
        patch(nn.Linear(4, 4))


class NoAttentionInterfaceModel(PreTrainedModel):
    """A PreTrainedModel whose attention is its own code (no AttentionInterface)."""

    config_class = LlamaConfig
    base_model_prefix = "model"
    _supports_attention_backend = False

    def __init__(self, config):
        super().__init__(config)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.post_init()


def test_patch_rejects_a_model_without_attention_interface():
    model = NoAttentionInterfaceModel(LlamaConfig(**TINY_CONFIG))
    with pytest.raises(TypeError, match=r"NoAttentionInterfaceModel cannot be patched with DGA: its attention does not use AttentionInterface"):
        patch(model)
    assert getattr(model.config, "dga", None) is None


def test_patch_rejects_mistral_sliding_window():
    model = make_model("mistral", sliding_window=4096)
    with pytest.raises(ValueError, match=r"MistralForCausalLM uses sliding-window attention on layers \[0, 1\] \(sliding_window=4096\)"):
        patch(model)
    assert not is_patched(model) and getattr(model.config, "dga", None) is None


def test_patch_rejects_qwen2_sliding_window():
    model = make_model("qwen2", use_sliding_window=True, sliding_window=64, max_window_layers=1)
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    with pytest.raises(ValueError, match=r"Qwen2ForCausalLM uses sliding-window attention on layers \[1\]"):
        patch(model)
    # a sliding window that no layer uses is fine
    patch(make_model("qwen2", use_sliding_window=True, sliding_window=64, max_window_layers=LAYERS))


@pytest.mark.parametrize("sliding_window", [None, 64])
def test_untested_architecture_with_a_global_sliding_window(sliding_window):
    """Mixtral has no per-layer `layer_types`: its `sliding_window`, when set, applies to every layer."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(**TINY_CONFIG, num_local_experts=2, num_experts_per_tok=1, sliding_window=sliding_window)
    model = MixtralForCausalLM(config)
    if sliding_window is None:
        assert is_patched(patch(model, SPARSE_PAPER_LIKE))
    else:
        with pytest.raises(ValueError, match=r"MixtralForCausalLM uses sliding-window attention on layers \[0, 1\] \(sliding_window=64\)"):
            patch(model, SPARSE_PAPER_LIKE)


def test_custom_4d_mask_is_refused():
    model = patch(make_model("llama"), SPARSE_PAPER_LIKE)
    torch.manual_seed(16)
    ids = random_ids(1, 100)
    mask = torch.ones(100, 100, dtype=torch.bool).tril()[None, None]
    with pytest.raises(ValueError, match=r"got a 4-D mask of shape \(1, 1, 100, 100\) \(custom 4-D masks are not supported\)"):
        logits(model, ids, attention_mask=mask)


def test_packed_sequences_are_refused():
    """Refused by the mask check (transformers >= 4.56 marks packing in the mask function) or, before, by
    the attention function from the position ids; a single row's ordinary positions still run."""
    model = patch(make_model("llama"), SPARSE_PAPER_LIKE)
    torch.manual_seed(17)
    ids = random_ids(1, 100)
    positions = torch.cat([torch.arange(60), torch.arange(40)])[None]  # two documents in one row
    with pytest.raises(ValueError, match="packed sequences"):
        logits(model, ids, position_ids=positions)
    assert torch.isfinite(logits(model, ids, position_ids=torch.arange(100)[None])).all()


def _mask_call(convention: str, q_start: int, q_end: int) -> dict:
    if convention == "q_length":  # recent Transformers
        return {"q_length": q_end - q_start, "q_offset": q_start}
    return {"cache_position": torch.arange(q_start, q_end)}  # 4.53 to early 5.x


@pytest.mark.parametrize("convention", ["q_length", "cache_position"])
def test_mask_function_checks(convention):
    """dga_mask computes no L x L mask; it refuses mask functions whose pattern is not plain causal."""
    masking_utils = pytest.importorskip("transformers.masking_utils")
    dga_mask = integration.dga_mask
    padding = torch.ones(2, 50, dtype=torch.long)
    padding[1, :7] = 0

    def call(mask_function, q_start=0, q_end=50, kv_length=50, attention_mask=padding):
        return dga_mask(
            batch_size=2, kv_length=kv_length, kv_offset=0, attention_mask=attention_mask,
            mask_function=mask_function, **_mask_call(convention, q_start, q_end),
        )

    assert torch.equal(call(masking_utils.causal_mask_function), padding.bool())
    assert call(masking_utils.causal_mask_function, attention_mask=torch.ones(2, 50)) is None
    assert call(masking_utils.causal_mask_function, q_start=49) is not None  # one decoding step
    sliding = masking_utils.sliding_window_causal_mask_function
    assert call(sliding(64)) is not None  # a window longer than the sequence changes nothing
    with pytest.raises(ValueError, match="sliding-window"):
        call(sliding(16))
    if hasattr(masking_utils, "bidirectional_mask_function"):
        with pytest.raises(ValueError, match="bidirectional"):
            call(masking_utils.bidirectional_mask_function)
    if hasattr(masking_utils, "packed_sequence_mask_function"):
        one_document = torch.zeros(2, 50, dtype=torch.long)
        two_documents = (torch.arange(50) >= 30).long().expand(2, 50)
        wrap = lambda ids: masking_utils.and_masks(  # noqa: E731
            masking_utils.causal_mask_function, masking_utils.packed_sequence_mask_function(ids)
        )
        assert call(wrap(one_document)) is not None  # what 4.57 passes for every forward without a cache
        with pytest.raises(ValueError, match="packed sequences"):
            call(wrap(two_documents))
    with pytest.raises(ValueError, match="DynamicCache"):  # a pre-allocated cache longer than the queries
        call(masking_utils.causal_mask_function, q_start=20, q_end=21, kv_length=50)


def test_static_cache_is_refused():
    model = patch(make_model("llama"), SPARSE_PAPER_LIKE.replace(min_seq_len=10**9))
    torch.manual_seed(18)
    ids = random_ids(1, 40)
    with pytest.raises(ValueError, match=r"DynamicCache"):
        model.generate(ids, max_new_tokens=3, do_sample=False, cache_implementation="static")


def test_dga_registered_on_import():
    from transformers import AttentionInterface, AttentionMaskInterface

    assert "dga" in AttentionInterface._global_mapping
    assert "dga" in AttentionMaskInterface._global_mapping
    assert dga_hf.integration.ATTN_NAME == "dga"
