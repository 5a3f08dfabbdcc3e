"""Dense causal attention: DGA's documented fallback for short sequences, decoding steps and
`dense_layers`, with the same padding convention as DGA."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dense_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float | None = None,
    padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """query [B, Hq, q_len, d], key/value [B, Hkv, kv_len, d]; the queries are the last q_len positions
    of the keys (prefill, chunked prefill and decoding with a dynamic cache). padding_mask [B, kv_len]
    (True = real token). Padded query rows return zeros."""
    q_len, kv_len = query.shape[-2], key.shape[-2]
    group = query.shape[1] // key.shape[1]
    if padding_mask is None and q_len == kv_len:
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale, enable_gqa=group > 1)
    q_pos = torch.arange(kv_len - q_len, kv_len, device=query.device)
    allowed = torch.arange(kv_len, device=query.device)[None, :] <= q_pos[:, None]  # [q_len, kv_len]
    if padding_mask is None:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scale, enable_gqa=group > 1)
    padding_mask = padding_mask.to(device=query.device, dtype=torch.bool)
    allowed = allowed[None, None] & padding_mask[:, None, None, :]
    real_query = padding_mask[:, kv_len - q_len :]
    # a padded query row sees its own slot so softmax stays finite; its output is then zeroed
    allowed = allowed | (~real_query[:, None, :, None] & (q_pos[:, None] == torch.arange(kv_len, device=query.device)))
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scale, enable_gqa=group > 1)
    return out * real_query[:, None, :, None].to(out.dtype)
