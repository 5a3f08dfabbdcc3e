"""Naive float64 transcriptions of docs/spec.md: the references every backend is tested against, kept
together beside the kernels (flash-linear-attention's `naive.py` pattern). Written for clarity, not
speed: never use them on long sequences.

- `prefill`: the whole spec (stages 1-5) for one sequence, `naive_dga_attention`.
- `stage5`: stage 5 alone over a given layout, differentiable, `stage5_reference` (the gradients every
  backend's stage-5 backward must reproduce), and its masked logits `stage5_logits` (whose log-sum-exp
  is every backend's saved lse).
- `decoding`: the decoding rule of docs/decoding.md (prefill, steps, chunks, refreshes, block expansion)
  for one row and kv head, `naive_decode`, and the output of one query, `naive_decode_query`.
- `expansion`: the keys step 6 scores one block by (its aggregate, or its principal ends), which both
  transcriptions above use, `block_score_keys`.
"""

from .decoding import naive_decode, naive_decode_query
from .prefill import naive_dga_attention
from .stage5 import stage5_logits, stage5_reference

__all__ = ["naive_decode", "naive_decode_query", "naive_dga_attention", "stage5_logits", "stage5_reference"]
