"""GPU smoke check of the Transformers integration: a small random Llama in bf16 on CUDA, patched with
DGA, Triton backend vs PyTorch backend logits (left-padded batch), and generate(); then decoding through a
DGACache: teacher-forced steps with the Triton decode kernels vs the PyTorch path, and generate() with
`enable_decoding`. A random model's logits hardly depend on its attention: this checks the wiring (the
kernels run, the results are finite and agree); tests/test_triton_decode.py checks the precision."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import dga_hf
from dga_hf.ops import triton_decode

torch.manual_seed(0)
config = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                     num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=8192)
model = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
ids = torch.randint(0, 512, (2, 3000), device="cuda")
mask = torch.ones_like(ids)
mask[1, :777] = 0
with torch.no_grad():
    dense = model(ids, attention_mask=mask).logits.float()
    logits = {}
    for backend in ("torch", "triton"):
        dga_hf.patch(model, dga_hf.DGAConfig.preset("default").replace(backend=backend, min_seq_len=0))
        logits[backend] = model(ids, attention_mask=mask).logits.float()
real = mask.bool()
diff = (logits["triton"] - logits["torch"])[real].abs().max().item()
gap = (logits["torch"] - dense)[real].abs().max().item()
print(f"triton vs torch backend logits max|diff| = {diff:.3e}; DGA vs dense max|diff| = {gap:.3e}")
out = model.generate(ids[:, :2000], attention_mask=mask[:, :2000], max_new_tokens=8, do_sample=False)
print("generate", tuple(out.shape))
assert diff < 0.1 * max(gap, 1e-3) + 0.05, "triton and torch backends disagree"

# decoding: DGA steps throughout (dense_share=None: no dense steps), a 256-token window
window_preset = dga_hf.DGAConfig.preset("default").replace(min_seq_len=0, local_blocks=16)
keyword = dga_hf.decoding.cache_keyword(model)
prompt, steps = 2900, 32
launches = []
kernels = triton_decode.attend_step
triton_decode.attend_step = lambda *args, **kwargs: launches.append(1) or kernels(*args, **kwargs)


def teacher_forced(cache):
    with torch.no_grad():
        model(ids[:, :prompt], attention_mask=mask[:, :prompt], use_cache=True, **{keyword: cache})
        return torch.cat([model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], use_cache=True,
                                **{keyword: cache}).logits.float() for t in range(prompt, prompt + steps)], dim=1)


decoded, calls = {}, {}
for backend in ("torch", "triton"):
    dga_hf.patch(model, window_preset.replace(backend=backend))
    launches.clear()
    decoded[backend] = teacher_forced(dga_hf.DGACache(model, dense_share=None))
    calls[backend] = len(launches)
decoded["dense"] = teacher_forced(dga_hf.decoding.dense_cache(model))
diff = (decoded["triton"] - decoded["torch"]).abs().max().item()
gap = (decoded["torch"] - decoded["dense"]).abs().max().item()
print(f"decode steps: triton kernels vs torch path logits max|diff| = {diff:.3e}; DGA vs dense decoding "
      f"max|diff| = {gap:.3e}; decode kernel launches per backend: {calls}")
dga_hf.enable_decoding(model)
out = model.generate(ids[:, :2000], attention_mask=mask[:, :2000], max_new_tokens=8, do_sample=False)
print("generate with DGA decoding", tuple(out.shape))
assert calls == {"torch": 0, "triton": steps * config.num_hidden_layers}, calls
assert torch.isfinite(decoded["triton"]).all()
assert diff < 0.1 * max(gap, 1e-3) + 0.05, "the Triton decode kernels and the PyTorch path disagree"
