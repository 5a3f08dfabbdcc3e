"""Naive float64 transcription of docs/spec.md: the reference every backend is tested against.

Written for clarity, not speed: one (row, kv head) at a time, explicit L x L masks. Never use it on
long sequences.
"""

from __future__ import annotations

import math

import torch

from ... import rule
from ...config import DGAConfig
from .expansion import block_score_keys


def naive_dga_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    config: DGAConfig,
    *,
    scale: float | None = None,
    padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """query [B, Hq, L, d], key/value [B, Hkv, L, d], padding_mask [B, L] (True = real token).

    Returns float64 [B, Hq, L, d]; padded query positions get zeros.
    """
    batch, q_heads, seq_len, head_dim = query.shape
    kv_heads = key.shape[1]
    group = q_heads // kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    out = torch.zeros(batch, q_heads, seq_len, value.shape[-1], dtype=torch.float64)
    for b in range(batch):
        positions = torch.arange(seq_len) if padding_mask is None else padding_mask[b].nonzero().flatten().cpu()
        for h in range(kv_heads):
            heads = slice(h * group, (h + 1) * group)
            q = query[b, heads][:, positions].double().cpu()
            k = key[b, h][positions].double().cpu()
            v = value[b, h][positions].double().cpu()
            out[b, heads, positions] = _one_head(q, k, v, config, scale)
    return out


def _one_head(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: DGAConfig, s: float) -> torch.Tensor:
    """q [G, L, d], k/v [L, d] of one unpadded sequence."""
    seq_len = k.shape[0]
    if seq_len == 0:
        return q.new_zeros(q.shape[0], 0, v.shape[-1])
    idx = torch.arange(seq_len)
    causal = idx[None, :] <= idx[:, None]
    if seq_len < cfg.min_seq_len:
        return _softmax_attend(s * q @ k.T, causal, v)

    # 1. importance from the last r queries
    probes = idx[seq_len - min(cfg.probe_queries, seq_len):]
    probe_logits = (s * q[:, probes] @ k.T).masked_fill(~causal[probes], -math.inf)
    importance = probe_logits.softmax(-1).sum(dim=(0, 1))

    # 2. focal set: sinks first, then highest importance (ties: earlier position)
    budget = rule.focal_count(seq_len, cfg.focal_ratio)
    focal = torch.zeros(seq_len, dtype=torch.bool)
    focal[: min(cfg.sink_tokens, seq_len)] = True
    ranked = sorted(range(seq_len), key=lambda j: (-importance[j].item(), j))
    for j in ranked:
        if int(focal.sum()) >= budget:
            break
        focal[j] = True

    # 3-4. blocks and aggregates of their non-focal members
    m, n = cfg.group_size, cfg.local_blocks
    block = idx // m
    num_blocks = math.ceil(seq_len / m)
    agg_k = torch.zeros(num_blocks, k.shape[-1], dtype=k.dtype)
    agg_v = torch.zeros(num_blocks, v.shape[-1], dtype=v.dtype)
    members = torch.zeros(num_blocks, dtype=torch.float64)
    for c in range(num_blocks):
        in_block = (block == c) & ~focal
        if not in_block.any():
            continue
        last = min((c + 1) * m, seq_len) - 1
        q_bar = q[:, last].mean(0)
        w = (s * k[in_block] @ q_bar).softmax(0)
        agg_k[c], agg_v[c] = w @ k[in_block], w @ v[in_block]
        members[c] = in_block.sum()

    # 5. one softmax over raw focal + local tokens and the aggregates of old blocks
    q_block = block[:, None]
    raw_allowed = causal & (focal[None, :] | ~rule.is_old_block(block[None, :], q_block, n))
    agg_allowed = rule.is_old_block(torch.arange(num_blocks)[None, :], q_block, n) & (members[None, :] > 0)
    agg_logits = s * q @ agg_k.T

    # 6. each query expands the E aggregated blocks it scores highest (ties: the earlier block), its score
    #    the largest logit of the block's score keys (the aggregate, or the principal ends) over the G heads
    if cfg.expand_blocks:
        score = torch.full((seq_len, num_blocks), -math.inf, dtype=torch.float64)
        for c in range(num_blocks):
            if members[c] > 0:
                keys = block_score_keys(k[(block == c) & ~focal], agg_k[c], cfg.expand_score)  # [S, d]
                score[:, c] = (s * q @ keys.T).amax(dim=(0, 2))
        for i in range(seq_len):
            candidates = agg_allowed[i].nonzero().flatten().tolist()
            chosen = sorted(candidates, key=lambda c: (-score[i, c].item(), c))[: cfg.expand_blocks]
            for c in chosen:
                agg_allowed[i, c] = False
                raw_allowed[i] |= block == c
    if cfg.group_bias == "log_size":
        agg_logits = agg_logits + members.clamp(min=1).log()
    logits = torch.cat([s * q @ k.T, agg_logits], dim=-1)
    allowed = torch.cat([raw_allowed, agg_allowed], dim=-1)
    return _softmax_attend(logits, allowed, torch.cat([v, agg_v], dim=0))


def _softmax_attend(logits: torch.Tensor, allowed: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return logits.masked_fill(~allowed, -math.inf).softmax(-1) @ values
