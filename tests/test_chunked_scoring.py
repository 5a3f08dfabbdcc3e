"""Perplexity scoring in chunks of positions (dga_eval.perplexity): the decoder runs once, the lm head per
chunk, and the result is the one of the model's own full logits."""

from __future__ import annotations

import pytest
import torch

from dga_eval import perplexity
from helpers import ARCHS, make_model

import dga_hf


def tiny_model(arch: str, **overrides):
    """helpers' tiny model with a vocabulary of 97 (not a power of two) and room for the windows here."""
    return make_model(arch, vocab_size=97, hidden_size=32, intermediate_size=64, max_position_embeddings=256, **overrides)


def full_logits_nll(model, window: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(window.view(1, -1)).logits[0].float()
    half = len(window) // 2
    return float(torch.nn.functional.cross_entropy(logits[half - 1 : -1], window[half:], reduction="sum"))


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_chunked_nll_equals_unchunked_and_the_full_logits(arch):
    """Chunks that divide the scored half, chunks that do not, one position each, and all at once."""
    model = tiny_model(arch)
    window = torch.randint(0, 97, (131,), generator=torch.Generator().manual_seed(1))
    scored = 131 - 131 // 2
    whole, count = perplexity.second_half_nll(model, window, chunk=scored)
    assert count == scored
    assert whole == pytest.approx(full_logits_nll(model, window), rel=1e-6)
    for chunk in (1, 11, 33, scored - 1, 4 * scored):
        assert perplexity.second_half_nll(model, window, chunk=chunk) == (pytest.approx(whole, rel=1e-6), scored)


def test_chunked_nll_of_a_patched_model_equals_its_full_logits():
    """The decoder is called directly: DGA (set on the config) must still be what runs."""
    model = tiny_model("qwen2")
    window = torch.randint(0, 97, (128,), generator=torch.Generator().manual_seed(2))
    dense = perplexity.second_half_nll(model, window, chunk=5)[0]
    dga_hf.patch(model, dga_hf.DGAConfig(group_size=4, focal_ratio=0.1, local_blocks=1, min_seq_len=0, backend="torch"))
    patched = perplexity.second_half_nll(model, window, chunk=5)[0]
    assert patched == pytest.approx(full_logits_nll(model, window), rel=1e-6)
    # DGA with one local block is not dense on 128 tokens; a random tiny model's attention is nearly uniform, so
    # the two differ little (2e-5 relative, measured), but far above float32 rounding
    assert patched != pytest.approx(dense, rel=1e-6)


def test_models_whose_logits_are_not_the_lm_head_output_are_refused():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, final_logit_softcapping=30.0)
    model = Gemma2ForCausalLM(config).eval()
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
        perplexity.second_half_nll(model, torch.arange(16))


def test_chunk_must_be_positive():
    with pytest.raises(ValueError, match="chunk=0"):
        perplexity.second_half_nll(tiny_model("llama"), torch.arange(16), chunk=0)
