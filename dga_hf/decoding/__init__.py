"""Decoding with DGA: `DGACache`, a `DynamicCache` whose layers hold a DGA decode state.

The rule implemented here is written out in docs/decoding.md; in short, per batch row and kv head, after a
prefill (or a refresh) has chosen the focal set F:

- a query at position i (block beta = i // m) attends, in one softmax, to the focal tokens of the blocks
  old for it (`rule.is_old_block`: blocks before `rule.first_local_block(beta, n)` = beta - n + 1), the
  aggregates of those blocks (+ log count with group_bias="log_size") and the raw tokens of the later
  blocks up to i: the spec's stage 5 with the current F;
- the aggregate of block c is computed when its last position e_c is processed, from its non-focal
  members, with q_bar_c = mean over the G query heads of the query at e_c (recorded for later refreshes);
- keep_full: each query of a step (one-token steps and chunks) reads the raw tokens of the
  `DGAConfig.expand_blocks` old blocks whose aggregates score highest for it instead of their aggregates
  (docs/spec.md step 6, `ops.layout.choose_expanded`, as in prefill);
- every `refresh_every` tokens (default `rule.refresh_interval`) F is re-selected with the latest query
  (after that step's output) and the aggregates whose membership changed are recomputed.

How the attention function reaches the state: Transformers does not hand the cache to the attention
function, but it hands over exactly the key/value tensors that `cache.update` returned. `DGALayer.update`
returns the new key/value states with the layer's state attached (``key._dga_state``); the "dga" attention
backend (dga_hf.integration) runs `state.attend` when the key carries one. Only the new tokens are returned:
the decode step reads the state's own buffers, never a full-length key tensor.

Modes (one storage policy each, `storage.py`): ``"keep_full"`` keeps every token's key/value (compacted per
row), so a refresh can re-select any token: it saves time, not memory. ``"compact"`` drops the non-focal
tokens once they leave the local window (they live on in their block's aggregate): it holds about
gamma + 1/m + n*m/t of the dense KV bytes, and a refresh can only re-rank the tokens it still holds (see
docs/decoding.md). Rows still dense (shorter than min_seq_len, or on an all-focal layer: dense_layers or
focal_ratio=1) hold every token in the focal buffer; in keep_full mode a row shorter than min_seq_len holds
a second copy in the archive until it switches (an all-focal layer keeps no archive).

Padding: each row is kept in compacted coordinates (its real tokens at 0..len_b-1), as in ops/layout.py;
padded positions of the [B, kv_len] padding mask the attention function receives are never stored. What
Transformers sees (get_seq_length, get_mask_sizes) stays the absolute cache length, padding included, so
positions and masks are those of a DynamicCache.

The package, by responsibility:
- `cache.py`: `DGACache`, `DGALayer` (the Cache side) and `cache_keyword`, `dense_cache`, `cache_nbytes`;
- `generation.py`: the generate() hook: `enable_decoding`, `disable_decoding`, `decoding_options`, `cache_for`;
- `state.py`: `DGADecodeState`, one layer's state: update, attend, prefill, step (orchestration only);
- `settings.py`: what the prefill fixes for a layer (`DecodeSettings`);
- `buffers.py`: the common tensors, their growth, row selection, bytes and the packed workspace;
- `storage.py`: the keep_full (`ArchiveStorage`) and compact (`CompactStorage`) storage policies;
- `blocks.py`: blocks closing and their aggregates, folds;
- `refresh.py`: re-selecting F;
- `steps.py`: the attention of a step (chunk, dense, packed, Triton; block expansion).
The stages the prefill and decoding share (importance, selection, aggregates) live in ops/layout.py;
the float64 transcription of the decoding rule the tests check against is `ops/naive/decoding.py`.
"""

from ..rule import refresh_interval
from .cache import DGACache, DGALayer, cache_keyword, cache_nbytes, dense_cache
from .generation import cache_for, decoding_options, disable_decoding, enable_decoding
from .state import DGADecodeState

__all__ = [
    "DGACache",
    "DGADecodeState",
    "DGALayer",
    "cache_for",
    "cache_keyword",
    "cache_nbytes",
    "decoding_options",
    "dense_cache",
    "disable_decoding",
    "enable_decoding",
    "refresh_interval",
]
