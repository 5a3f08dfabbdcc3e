"""GPU smoke check of the Transformers integration: a small random Llama in bf16 on CUDA, patched with
DGA, Triton backend vs PyTorch backend logits (left-padded batch), and generate()."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import dga_hf

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
print(f"triton vs torch backend logits max|diff| = {diff:.4f}; DGA vs dense max|diff| = {gap:.4f}")
out = model.generate(ids[:, :2000], attention_mask=mask[:, :2000], max_new_tokens=8, do_sample=False)
print("generate", tuple(out.shape))
assert diff < 0.1 * max(gap, 1e-3) + 0.05, "triton and torch backends disagree"
