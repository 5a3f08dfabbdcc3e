"""Naive float64 transcription of the decoding rule of docs/decoding.md: the reference `DGACache`
(dga_hf/decoding) is tested against, step by step. One row and one kv head at a time, with Python sets
for the focal set F and the block members M_c; written for clarity, not speed. Independent of the decode
state's code: it shares only the rule (`dga_hf.rule`) with it.
"""

from __future__ import annotations

import math

import torch

from ... import rule
from ...config import DGAConfig
from .expansion import block_score_keys


def naive_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: DGAConfig,
    s: float,
    prompt_len: int,
    every: int | None,
    mode: str = "keep_full",
    steps: list[int] | None = None,
    dense_layer: bool = False,
) -> torch.Tensor:
    """The outputs [G, T, dv] of every position of one row and one kv head: a prefill of `prompt_len`
    tokens, then the calls of `steps` (token counts; default: 1 each), refreshing every `every` tokens
    (None or 0: never). q [G, T, d], k/v [T, d]; `mode` "keep_full" or "compact" (which cannot expand
    blocks: refused with cfg.expand_blocks > 0); `dense_layer`: a layer of `dense_layers`. Every query,
    prompt and decoded, expands cfg.expand_blocks blocks (`naive_decode_query`)."""
    if mode == "compact" and cfg.expand_blocks:
        raise ValueError(f"compact decoding cannot expand blocks (expand_blocks={cfg.expand_blocks})")
    q, k, v = q.double(), k.double(), v.double()
    m = cfg.group_size
    t = prompt_len
    # docs/decoding.md, "Exact settings": with focal_ratio = 1 every selection takes every token, so the
    # layer is all-focal like a dense layer (new tokens join F at once, nothing is re-selected)
    dense_layer = dense_layer or cfg.focal_ratio >= 1
    if dense_layer or t < cfg.min_seq_len:
        focal = set(range(t))
    else:
        probes = range(t - min(cfg.probe_queries, t), t)
        focal = _select(_importance(q, k, probes, set(range(t)), s), set(range(t)), cfg, _budget(t, cfg, False))
    members = {c: set(range(c * m, (c + 1) * m)) - focal for c in range(t // m)}
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=torch.float64)
    for i in range(t):
        out[:, i] = naive_decode_query(q, k, v, i, focal, members, cfg, s)
    dense = dense_layer or t < cfg.min_seq_len
    since = 0
    for size in steps or [1] * (q.shape[1] - t):
        new = list(range(t, t + size))
        if dense:
            focal |= set(new)
        for i in new:
            if (i + 1) % m == 0:
                members[i // m] = set(range(i + 1 - m, i + 1)) - focal
        for i in new:
            out[:, i] = naive_decode_query(q, k, v, i, focal, members, cfg, s)
        t += size
        since += size
        if not every or since < every or dense_layer:
            continue
        since = 0
        focal, members = _refresh(q, k, new, t, focal, members, cfg, s, mode)
        dense = t < cfg.min_seq_len
    return out


def naive_decode_query(q, k, v, i: int, focal: set, members: dict, cfg: DGAConfig, s: float) -> torch.Tensor:
    """Output [G, dv] of the query at position i, given F and the members M_c of the complete blocks: the
    spec's steps 5 and 6 (docs/spec.md) with this F and these members. Of the old blocks with M_c
    non-empty, the cfg.expand_blocks that score highest, max_g s*Q[g,i]*K_hat_c or with
    expand_score="principal" the largest logit of the members' principal ends (ties: the earlier block),
    enter as their raw members instead of their aggregate."""
    m, n = cfg.group_size, cfg.local_blocks
    beta = i // m
    raw = [j for j in range(i + 1) if j in focal or not rule.is_old_block(j // m, beta, n)]
    old = [c for c in sorted(members) if rule.is_old_block(c, beta, n) and members[c]]
    aggregates = {}
    for c in old:
        idx = sorted(members[c])
        w = (s * k[idx] @ q[:, (c + 1) * m - 1].mean(0)).softmax(0)
        aggregates[c] = (w @ k[idx], w @ v[idx], len(idx))
    score = {
        c: float((s * q[:, i] @ block_score_keys(k[sorted(members[c])], aggregates[c][0], cfg.expand_score).T).max())
        for c in old
    }
    expanded = set(sorted(old, key=lambda c: (-score[c], c))[: cfg.expand_blocks])
    raw += [j for c in sorted(expanded) for j in sorted(members[c])]
    logits, values = [s * q[:, i] @ k[raw].T], [v[raw]]
    for c in old:
        if c not in expanded:
            agg_k, agg_v, count = aggregates[c]
            logit = s * q[:, i] @ agg_k
            if cfg.group_bias == "log_size":
                logit = logit + math.log(count)
            logits.append(logit[:, None])
            values.append(agg_v[None])
    return torch.cat(logits, -1).softmax(-1) @ torch.cat(values, 0)


def _refresh(q, k, new: list[int], t: int, focal: set, members: dict, cfg: DGAConfig, s: float, mode: str):
    """F' and the members after a refresh at length t, probed by the step's last min(r, a) queries."""
    m, n = cfg.group_size, cfg.local_blocks
    beta = (t - 1) // m
    if mode == "keep_full":
        candidates = set(range(t))
    else:
        candidates = focal | {j for j in range(t) if not rule.is_old_block(j // m, beta, n)}
    imp = _importance(q, k, new[-min(cfg.probe_queries, len(new)):], candidates, s)
    chosen = _select(imp, candidates, cfg, min(_budget(t, cfg, False), len(candidates)))
    if mode == "keep_full":
        return chosen, {c: set(range(c * m, (c + 1) * m)) - chosen for c in range(t // m)}
    for j in focal - chosen:
        if rule.is_old_block(j // m, beta, n):
            members[j // m].add(j)
    for c in range(rule.old_block_count(beta, n), beta + 1):
        if (c + 1) * m <= t:
            members[c] = set(range(c * m, (c + 1) * m)) - chosen
    return chosen, members


def _budget(t: int, cfg: DGAConfig, dense_layer: bool) -> int:
    return rule.focal_budget(t, cfg.focal_ratio, cfg.sink_tokens, dense=dense_layer or t < cfg.min_seq_len)


def _select(imp: dict, candidates: set, cfg: DGAConfig, budget: int) -> set:
    """Sinks first, then the highest importance, ties to the earlier position, up to `budget`."""
    chosen = {j for j in candidates if j < cfg.sink_tokens}
    for j in sorted((j for j in candidates if j not in chosen), key=lambda j: (-imp[j], j)):
        if len(chosen) >= budget:
            break
        chosen.add(j)
    return chosen


def _importance(q, k, probes, candidates: set, s: float) -> dict:
    """imp[j] = sum over the G heads and the probes p of p's softmax over the candidates j <= p."""
    imp = {j: 0.0 for j in candidates}
    for p in probes:
        visible = [j for j in sorted(candidates) if j <= p]
        weights = (s * q[:, p] @ k[visible].T).softmax(-1).sum(0)
        for index, j in enumerate(visible):
            imp[j] += float(weights[index])
    return imp
