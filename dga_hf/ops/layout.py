"""Stages 1-4 of docs/spec.md, vectorised over batch and heads: importance, focal selection, block
aggregates. Shared by every fast backend, which then only differ in how they run stage 5 (the attention
over focal keys, aggregates and local keys), and by the decode state (dga_hf/decoding), whose refreshes,
closing blocks and steps call the same stages (`last_queries`, `importance`, `focal_budgets`, `select_focal`,
`aggregate_blocks` with its score keys, `aggregate_bias`, `choose_expanded`) on the tokens it holds.

Memory: O(r * L) for the scores and O(L * d) for the rest; nothing is L x L. Keys and values stay in
their own dtype: float32 copies are made one kv head (scores) or AGGREGATE_CHUNK_TOKENS tokens (aggregates)
at a time, so with bf16 inputs at 128K the layout never holds a float32 copy of the whole K or V.
Padding is handled by compaction: the real tokens of each row are moved to the front (stable), so every
row is a right-padded sequence of length ``lengths[b]`` whose blocks start at position 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import rule
from ..config import DGAConfig

AGGREGATE_CHUNK_TOKENS = 8192  # tokens whose blocks are aggregated at once (bounds the float32 copies)
EXPANSION_CHUNK_SCORES = 2**21  # score-key logits computed at once by the expansion (8 MiB in float32: near the cache, measured faster on the CPU than 64 MiB)
IMPORTANCE_CHUNK_SCORES = 2**23  # probe scores computed at once (32 MiB in float32; rows of whole length L)


@dataclass
class DGALayout:
    """Everything stage 5 needs, for queries/keys in compacted (right-padded) order.

    Shapes: B rows, H kv heads, L positions, nb blocks, F focal slots, d head dim.
    """

    lengths: torch.Tensor  # [B] int64, real tokens per row
    focal_pos: torch.Tensor  # [B, H, F] int64, focal positions sorted ascending; unused slots = L
    focal_key: torch.Tensor  # [B, H, F, d]
    focal_value: torch.Tensor  # [B, H, F, dv]
    agg_key: torch.Tensor  # [B, H, nb, d]
    agg_value: torch.Tensor  # [B, H, nb, dv]
    agg_bias: torch.Tensor  # [B, H, nb]: 0 or log(members), -inf for blocks with no non-focal member
    focal: torch.Tensor  # [B, H, L] bool
    group_size: int
    # [B, H, L, X] int64: the blocks each query expands (docs/spec.md step 6), ascending, then the
    # sentinel nb; X = min(expand_blocks, old blocks of the last query). None without expansion.
    expanded: torch.Tensor | None = None
    # [B, H, nb, S, d]: the keys step 6 scores each block by (`block_score_keys`): S = 1, a view of
    # agg_key, for expand_score="aggregate"; S = 2, the principal ends, for "principal". None without expansion.
    score_key: torch.Tensor | None = None

    @property
    def focal_block(self) -> torch.Tensor:
        """Block of each focal slot; unused slots land past the last block."""
        return self.focal_pos // self.group_size


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def compact_padding(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, padding_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Move each row's real tokens to the front. Returns q, k, v, lengths and the permutation
    (None when there is no padding, so the common case copies nothing)."""
    batch, seq_len = query.shape[0], query.shape[-2]
    if padding_mask is None or bool(padding_mask.all()):
        lengths = torch.full((batch,), seq_len, dtype=torch.long, device=query.device)
        return query, key, value, lengths, None
    mask = padding_mask.to(device=query.device, dtype=torch.bool)
    order = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices  # real tokens first, in order

    def gather(x: torch.Tensor) -> torch.Tensor:
        index = order.view(batch, *([1] * (x.dim() - 3)), seq_len, 1).expand(*x.shape[:-1], x.shape[-1])
        return x.gather(-2, index)

    return gather(query), gather(key), gather(value), mask.sum(-1), order


def uncompact(out: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """Inverse of `compact_padding` for an output [B, ..., L, d] (padded positions are already zero)."""
    if order is None:
        return out
    batch, seq_len = order.shape
    index = order.view(batch, *([1] * (out.dim() - 3)), seq_len, 1).expand_as(out)
    return torch.zeros_like(out).scatter_(-2, index, out)


def build_layout(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, lengths: torch.Tensor, config: DGAConfig, scale: float
) -> DGALayout:
    """query [B, H, G, L, d], key/value [B, H, L, d], compacted, in any float dtype. Selection and
    aggregates are computed in float32 (float64 for float64 input) on copies of one kv head or one chunk
    of blocks at a time; of the queries only the probes and the block ends are read. The focal keys and
    values and the aggregates are returned in that compute dtype."""
    seq_len = query.shape[3]
    device = query.device
    positions = torch.arange(seq_len, device=device)
    real = positions[None, :] < lengths[:, None]  # [B, L]

    with torch.no_grad():  # the selection is a discrete choice: no gradient, nothing saved for one
        probe_query, probe_pos = last_queries(query, lengths, min(config.probe_queries, seq_len))
        score = importance(probe_query, probe_pos, key, positions.view(1, 1, seq_len), scale)
        sinks = (positions < config.sink_tokens).view(1, 1, seq_len)
        budget = focal_budgets(lengths.tolist(), config, device).view(-1, 1, 1)
        focal = select_focal(score, real[:, None, :], sinks, budget)
    focal_pos, focal_key, focal_value = _gather_focal(focal, key, value, lengths, config)
    principal = scores_principal(config.expand_blocks, config.expand_score)
    agg_key, agg_value, agg_bias, ends = _aggregate(query, key, value, focal, real, lengths, config, scale, principal)
    expanded = score_key = None
    if config.expand_blocks:
        score_key = block_score_keys(agg_key, ends)
        with torch.no_grad():
            expanded = select_expanded(query, score_key, agg_bias, config)
    return DGALayout(
        lengths=lengths,
        focal_pos=focal_pos,
        focal_key=focal_key,
        focal_value=focal_value,
        agg_key=agg_key,
        agg_value=agg_value,
        agg_bias=agg_bias,
        focal=focal,
        group_size=config.group_size,
        expanded=expanded,
        score_key=score_key,
    )


def select_expanded(query: torch.Tensor, score_key: torch.Tensor, agg_bias: torch.Tensor, config: DGAConfig) -> torch.Tensor:
    """Step 6 of docs/spec.md over a prefill (`choose_expanded_blocks` for every query). query [B, H, G, L, d],
    score_key [B, H, nb, S, d] (`block_score_keys`) and agg_bias [B, H, nb] (-inf: no members) -> [B, H, L, X]
    block indices, ascending, padded with nb (see `DGALayout.expanded`). Scored a chunk of whole blocks of
    queries at a time (EXPANSION_CHUNK_SCORES logits, the S score keys of a block counted apart), each over
    the blocks old for the chunk's last query only."""
    batch, heads, group, seq_len, _ = query.shape
    m, n = config.group_size, config.local_blocks
    num_blocks, per_block = score_key.shape[2:4]
    last_block = rule.block_of(seq_len - 1, m)
    width = min(config.expand_blocks, rule.old_block_count(last_block, n))
    chosen = torch.full((batch, heads, seq_len, width), num_blocks, dtype=torch.long, device=query.device)
    if width == 0:
        return chosen
    has_members = torch.isfinite(agg_bias)
    all_have_members = bool(has_members.all())
    first_block = rule.first_block_seeing_as_old(0, n)  # earlier queries have no old block
    per_chunk = max(1, EXPANSION_CHUNK_SCORES // max(batch * heads * group * m * num_blocks * per_block, 1))
    for first in range(first_block, last_block + 1, per_chunk):
        last = min(last_block, first + per_chunk - 1)
        q_lo, q_hi = first * m, min(seq_len, (last + 1) * m)
        old = rule.old_block_count(last, n)
        q_block = rule.block_of(torch.arange(q_lo, q_hi, device=query.device), m).view(1, -1)
        listed = choose_expanded_blocks(query[:, :, :, q_lo:q_hi], q_block, score_key[:, :, :old],
                                        None if all_have_members else has_members[:, :, :old],
                                        config.expand_blocks, n, old_for_all=rule.old_block_count(first, n))
        count = min(width, old)
        chosen[:, :, q_lo:q_hi, :count] = torch.where(listed[..., :count] < old, listed[..., :count], num_blocks)
    return chosen


def choose_expanded(
    query: torch.Tensor,
    query_block: torch.Tensor,
    score_key: torch.Tensor,
    has_members: torch.Tensor,
    expand_blocks: int,
    local_blocks: int,
) -> torch.Tensor:
    """`choose_expanded_blocks` as [B, H, T, nb] bool, True at the blocks each query expands (what a decoding
    step's mask takes)."""
    listed = choose_expanded_blocks(query, query_block, score_key, has_members, expand_blocks, local_blocks)
    return expanded_mask(listed, score_key.shape[2])


def block_scores(query: torch.Tensor, score_key: torch.Tensor) -> torch.Tensor:
    """``max_g max_S Q[g,i] . score_key[c, S]`` for queries [B, H, G, T, d] and score keys [B, H, nb, S, d]:
    [B, H, T, nb] in the compute dtype of the score keys. The spec's factor s > 0 is left out: it orders the
    scores alike. One matrix product of the T*G query rows (query-major) with the S*nb keys (S-major), so
    that the G*S logits of a query and block lie nb apart and reduce over a middle dimension (on the CPU five
    times faster than reducing the inner S and then G)."""
    batch, heads, group, queries, dim = query.shape
    num_blocks, per_block = score_key.shape[2:4]
    dtype = compute_dtype(score_key.dtype)
    rows = query.to(dtype).transpose(2, 3).reshape(batch, heads, queries * group, dim)
    keys = score_key.to(dtype).transpose(2, 3).reshape(batch, heads, per_block * num_blocks, dim)
    logits = rows @ keys.transpose(-1, -2)  # [B, H, T * G, S * nb]
    return logits.view(batch, heads, queries, group * per_block, num_blocks).amax(dim=3)


def choose_expanded_blocks(
    query: torch.Tensor,
    query_block: torch.Tensor,
    score_key: torch.Tensor,
    has_members: torch.Tensor | None,
    expand_blocks: int,
    local_blocks: int,
    old_for_all: int = 0,
) -> torch.Tensor:
    """The choice of docs/spec.md step 6, the one implementation of it: prefill (`select_expanded`) and every
    decoding step (one-token steps and chunks, dga_hf/decoding/steps.py, through `choose_expanded`) call it.

    For queries [B, H, G, T, d] in blocks `query_block` [B or 1, T], over the score keys score_key
    [B, H, nb, S, d] of blocks 0..nb-1 (`block_score_keys`: the aggregates K_hat_c, or the principal ends
    P+_c, P-_c; `has_members` [B, H, nb]: the block has members outside F, None when every block has): per
    query and kv head, the `expand_blocks` blocks old for the query (`rule.is_old_block`) with members whose
    score (`block_scores`) is highest, ties to the earlier block, as block indices
    [B, H, T, min(expand_blocks, nb)], ascending, then nb where a query has fewer candidates. `old_for_all`:
    how many leading blocks the caller knows to be old for every query (only the blocks after them are
    masked by query).

    One top-k of the scores decides every query whose E-th highest score differs from its (E+1)-th (with
    continuous scores, all of them); the queries where they are equal take stage 2's `select_focal` (budget E,
    no sinks), whose ties go to the earlier block. (Measured on the CPU at 16K, `select_focal` for every query,
    then a top-k of the picked blocks' positions, took twice as long.)"""
    num_blocks = score_key.shape[2]
    count = min(expand_blocks, num_blocks)
    if count == 0:
        return torch.full((*query.shape[:2], query.shape[3], 0), num_blocks, dtype=torch.long, device=query.device)
    score = block_scores(query, score_key)

    blocks = torch.arange(num_blocks, device=query.device)
    candidates = score
    if has_members is not None:
        candidates = candidates.masked_fill(~has_members[:, :, None, :], -math.inf)
    if old_for_all < num_blocks:  # in place: nothing reads the unmasked scores again
        tail = candidates[..., old_for_all:]
        tail.masked_fill_(~rule.is_old_block(blocks[old_for_all:], query_block[:, None, :, None], local_blocks), -math.inf)
    # the top count + 1: the last one tells whether the count-th score is tied with one left out
    top, listed = torch.topk(candidates, min(count + 1, num_blocks), dim=-1)
    tied = torch.isfinite(top[..., count - 1]) & (top[..., count - 1] == top[..., -1]) if count < num_blocks else None
    top, listed = top[..., :count], listed[..., :count]
    listed = listed.masked_fill(top == -math.inf, num_blocks)  # fewer candidates than E: all of them
    if tied is not None and bool(tied.any()):
        rows = tied.nonzero(as_tuple=True)
        tied_candidates = candidates[rows]  # the ineligible are -inf there, every score of a block is finite
        no_sink = torch.zeros((), dtype=torch.bool, device=query.device)
        budget = torch.full((1, 1), expand_blocks, dtype=torch.long, device=query.device)
        picked = select_focal(tied_candidates, torch.isfinite(tied_candidates), no_sink, budget)
        listed[rows] = expanded_indices(picked, count, num_blocks)
    return listed.sort(dim=-1).values


def expanded_indices(picked: torch.Tensor, count: int, sentinel: int) -> torch.Tensor:
    """The blocks `choose_expanded` picked ([..., nb] bool, at most `count` per query) as indices
    [..., count], ascending, padded with `sentinel` where a query picked fewer."""
    index = torch.where(picked, torch.arange(picked.shape[-1], device=picked.device), sentinel)
    return torch.topk(index, count, dim=-1, largest=False).values


def expanded_mask(expanded: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """The inverse of `expanded_indices`: block indices [..., X] -> [..., num_blocks] bool, True at the blocks
    listed; indices >= num_blocks (the sentinel, or blocks past a prefix) are dropped."""
    mask = torch.zeros(*expanded.shape[:-1], num_blocks + 1, dtype=torch.bool, device=expanded.device)
    return mask.scatter_(-1, expanded.clamp(max=num_blocks), True)[..., :num_blocks]


def last_queries(query: torch.Tensor, counts: torch.Tensor, probes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1's probes: the last ``probes`` queries of each row whose ``counts[b]`` real queries come first.
    query [B, H, G, L, d] (probes <= L) -> the probes in the compute dtype [B, H, G, P, d] and their index
    in the row [B, P]; -1 where a row has fewer real queries (that probe counts for nothing)."""
    batch, heads, group, _, dim = query.shape
    index = counts[:, None] - probes + torch.arange(probes, device=query.device)  # [B, P]
    gathered = query.gather(3, index.clamp(min=0).view(batch, 1, 1, probes, 1).expand(batch, heads, group, probes, dim))
    return gathered.to(compute_dtype(query.dtype)), torch.where(index >= 0, index, -1)


def importance(
    probe_query: torch.Tensor,
    probe_pos: torch.Tensor,
    key: torch.Tensor,
    key_pos: torch.Tensor,
    scale: float,
    eligible: torch.Tensor | None = None,
) -> torch.Tensor:
    """Stage 1 over any candidate keys: imp[b, h, j] = sum over the G query heads of kv head h and the
    probes of each probe's softmax over the eligible keys at positions <= its own.

    probe_query [B, H, G, P, d] (compute dtype), probe_pos [B, P] (-1: no probe, counts 0), key [B, H, N, d]
    (any float dtype), key_pos [B or 1, H or 1, N], eligible [B, H or 1, N] bool or None (all). The prefill
    scores every position of a row; a decode refresh scores the tokens it holds. Memory: one kv head's keys
    in the compute dtype and IMPORTANCE_CHUNK_SCORES scores at a time, one query head of the group at a
    time (chunks of one head's probes keep the scores in cache: measured on the CPU at 16K, a chunk of all
    G heads' probes was 1.5x slower)."""
    batch, heads, group, probes, _ = probe_query.shape
    length = key.shape[2]
    hidden = (key_pos[..., None, :] > probe_pos[:, None, :, None]) | (probe_pos < 0)[:, None, :, None]
    if eligible is not None:
        hidden = hidden | ~eligible[:, :, None, :]  # [B, H or 1, P, N]
    per_chunk = max(1, min(probes, IMPORTANCE_CHUNK_SCORES // max(batch * length, 1)))
    scores = torch.zeros(batch, heads, length, dtype=probe_query.dtype, device=probe_query.device)
    for head in range(heads):
        keys_t = key[:, head].to(probe_query.dtype).transpose(-1, -2)
        head_hidden = hidden[:, head if hidden.shape[1] > 1 else 0]  # [B, P, N]
        for g in range(group):
            for lo in range(0, probes, per_chunk):
                logits = scale * probe_query[:, head, g, lo : lo + per_chunk] @ keys_t  # [B, rows, N]
                weights = torch.softmax(logits.masked_fill_(head_hidden[:, lo : lo + per_chunk], -math.inf), dim=-1)
                scores[:, head] += weights.nan_to_num_(0.0).sum(dim=1)  # unused probes (all -inf) count 0
    return scores


def focal_budgets(lengths: list[int], config: DGAConfig, device: torch.device, dense_layer: bool = False) -> torch.Tensor:
    """Focal tokens per row [B] (`rule.focal_budget`): the whole row where it is dense (a dense layer, or
    shorter than min_seq_len)."""
    budgets = [
        rule.focal_budget(length, config.focal_ratio, config.sink_tokens, dense=dense_layer or length < config.min_seq_len)
        for length in lengths
    ]
    return torch.tensor(budgets, dtype=torch.long, device=device)


def select_focal(
    score: torch.Tensor,
    eligible: torch.Tensor,
    sink: torch.Tensor,
    budget: torch.Tensor,
    pos: torch.Tensor | None = None,
) -> torch.Tensor:
    """Stage 2 over candidate lists [B, H, N]: sinks first, then the highest scores, ties to the earlier
    position; at most `budget` ([B, H or 1, 1]) of the `eligible` candidates. `sink` marks the sink
    candidates; `pos` holds the candidates' positions, None when they are in position order. All masks
    broadcast to [B, H, N].

    Without a sort of N: the budget-th highest score is the threshold; every candidate above it is in, and
    of those equal to it the earliest fill the rest (a top-k of the budget is several times cheaper than a
    stable sort of all N on the CPU, and a keep_full refresh ranks every cached token)."""
    score = score.masked_fill(~eligible, -math.inf).masked_fill(sink & eligible, math.inf)
    budget = budget.expand(*score.shape[:-1], 1)
    most = min(score.shape[-1], int(budget.max()))
    if most == 0:
        return torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    top = torch.topk(score, most, dim=-1).values  # descending
    threshold = top.gather(-1, (budget - 1).clamp(min=0, max=most - 1))
    above = score > threshold
    need = budget - above.sum(-1, keepdim=True)
    tie = score == threshold
    if pos is None:
        tied = tie & (tie.cumsum(-1) <= need)
    else:  # the earliest `need` tied positions: a bottom-k of the tied candidates' positions
        tie_pos = pos.masked_fill(~tie, torch.iinfo(pos.dtype).max)
        fill = min(score.shape[-1], max(1, int(need.max())))
        last = torch.topk(tie_pos, fill, dim=-1, largest=False).values.gather(-1, (need - 1).clamp(min=0, max=fill - 1))
        tied = tie & (pos <= last) & (need > 0)
    return (above | tied) & eligible & (budget > 0)


def _gather_focal(
    focal: torch.Tensor, key: torch.Tensor, value: torch.Tensor, lengths: torch.Tensor, config: DGAConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    seq_len = focal.shape[-1]
    slots = int(focal.sum(-1).max())
    positions = torch.arange(seq_len, device=focal.device).expand_as(focal)
    focal_pos = torch.where(focal, positions, seq_len).sort(dim=-1).values[..., :slots]
    index = focal_pos.clamp(max=seq_len - 1).unsqueeze(-1)
    dtype = compute_dtype(key.dtype)
    focal_key = key.gather(2, index.expand(*index.shape[:-1], key.shape[-1])).to(dtype)
    focal_value = value.gather(2, index.expand(*index.shape[:-1], value.shape[-1])).to(dtype)
    return focal_pos, focal_key, focal_value


def _aggregate(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    focal: torch.Tensor,
    real: torch.Tensor,
    lengths: torch.Tensor,
    config: DGAConfig,
    scale: float,
    principal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Stage 4 over every block, AGGREGATE_CHUNK_TOKENS tokens of blocks at a time: K_hat, V_hat, the bias,
    and with `principal` the blocks' principal ends [B, H, nb, 2, d] (else None)."""
    batch, heads, group, seq_len, dim = query.shape
    m = config.group_size
    dtype = compute_dtype(query.dtype)
    num_blocks = math.ceil(seq_len / m)
    pad = num_blocks * m - seq_len
    members = torch.nn.functional.pad(~focal & real[:, None, :], (0, pad)).view(batch, heads, num_blocks, m)
    block_ends = torch.minimum(
        (torch.arange(num_blocks, device=query.device) + 1) * m, lengths[:, None]
    ).clamp(min=1) - 1  # [B, nb]

    def query_bar(first: int, last: int) -> torch.Tensor:
        """Mean over the G query heads of each block's last query, blocks first..last-1: [B, H, c, d]."""
        index = block_ends[:, None, None, first:last, None].expand(batch, heads, group, last - first, dim)
        return query.gather(3, index).to(dtype).mean(2)

    def blocked(x: torch.Tensor, first: int, last: int) -> torch.Tensor:
        """Blocks first..last-1 of x as [B, H, c, m, d] in the compute dtype (the last block zero-padded)."""
        part = x[:, :, first * m : last * m].to(dtype)
        missing = (last - first) * m - part.shape[2]
        if missing:
            part = torch.nn.functional.pad(part, (0, 0, 0, missing))
        return part.view(batch, heads, last - first, m, x.shape[-1])

    chunk = max(1, AGGREGATE_CHUNK_TOKENS // m)
    parts = []
    for first in range(0, num_blocks, chunk):
        last = min(num_blocks, first + chunk)
        keys, values = blocked(key, first, last), blocked(value, first, last)
        parts.append(aggregate_blocks(query_bar(first, last), keys, values, members[:, :, first:last], scale, principal))
    agg_key, agg_value, _, count, ends = (
        part[0] if len(parts) == 1 or part[0] is None else torch.cat(part, dim=2) for part in zip(*parts)
    )
    return agg_key, agg_value, aggregate_bias(count, config.group_bias), ends


def aggregate_blocks(
    query_bar: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    members: torch.Tensor,
    scale: float,
    principal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Stage 4 for a set of blocks: each block's aggregate key and value, the softmax (by its query mean
    q_bar . k) weighted mean of its members. query_bar [..., c, d] (the compute dtype), keys/values
    [..., c, m, d] (any float dtype), members [..., c, m] bool. Returns K_hat, V_hat (compute dtype; 0 for
    a block without members), the log normaliser lse [..., c] (-inf for an empty block; a decode state
    adds members to an aggregate exactly through it), the member count [..., c], and with `principal` the
    blocks' principal ends [..., c, 2, d] (`principal_ends`, the score keys of expand_score="principal";
    else None). Every place that aggregates blocks (prefill, a decode state's prompt, closing blocks and
    refreshes) calls it, so the score keys always follow the members."""
    dtype = query_bar.dtype
    keys, values = keys.to(dtype), values.to(dtype)
    logits = (scale * torch.einsum("...cmd,...cd->...cm", keys, query_bar)).masked_fill(~members, -math.inf)
    weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    agg_key = torch.einsum("...cm,...cmd->...cd", weights, keys)
    agg_value = torch.einsum("...cm,...cmd->...cd", weights, values)
    ends = None
    if principal:
        with torch.no_grad():  # a score for a discrete choice: no gradient (eigh's is unstable at equal eigenvalues)
            ends = principal_ends(keys.detach(), members)
    return agg_key, agg_value, torch.logsumexp(logits, dim=-1), members.sum(-1).to(dtype), ends


def principal_ends(keys: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """The score keys of expand_score="principal" (docs/spec.md step 6): for each block, with mu_c the
    unweighted mean of its members, u_c the unit principal axis of the centred members and a_j = (K_j -
    mu_c) . u_c, the two ends mu_c + (max_j a_j) u_c and mu_c + (min_j a_j) u_c. keys [..., c, m, d] (the
    dtype they are scored in), members [..., c, m] bool -> [..., c, 2, d]; both ends are mu_c when the members
    do not spread (one member), 0 for a block without members (never scored: it is not eligible).

    u_c comes from the m x m Gram matrix of the centred members (a batched `torch.linalg.eigh`; u = cen^T v /
    |cen^T v|, v its top eigenvector), which is smaller than the d x d covariance for blocks of m <= d keys.
    The sign of u_c, which eigh leaves open, only swaps the two ends."""
    weight = members.to(keys.dtype).unsqueeze(-1)  # [..., c, m, 1]
    mean = (keys * weight).sum(-2, keepdim=True) / weight.sum(-2, keepdim=True).clamp(min=1)  # [..., c, 1, d]
    centred = (keys - mean) * weight  # a non-member is a zero row: it adds nothing to the Gram matrix
    top = torch.linalg.eigh(centred @ centred.transpose(-1, -2)).eigenvectors[..., -1:]  # [..., c, m, 1]
    axis = centred.transpose(-1, -2) @ top  # [..., c, d, 1]
    norm = axis.norm(dim=-2, keepdim=True)
    axis = torch.where(norm > 0, axis / norm.clamp(min=torch.finfo(keys.dtype).tiny), 0.0)
    along = (centred @ axis).squeeze(-1)  # [..., c, m]: a_j
    ends = torch.stack([along.masked_fill(~members, -math.inf).amax(-1),
                        along.masked_fill(~members, math.inf).amin(-1)], dim=-1)  # [..., c, 2]
    ends = torch.where(members.any(-1, keepdim=True), ends, 0.0)
    return mean + ends.unsqueeze(-1) * axis.transpose(-1, -2)


def scores_principal(expand_blocks: int, expand_score: str) -> bool:
    """Whether blocks need their principal ends: step 6 runs (expand_blocks > 0) with expand_score="principal"."""
    return expand_blocks > 0 and expand_score == "principal"


def block_score_keys(agg_key: torch.Tensor, ends: torch.Tensor | None) -> torch.Tensor:
    """The keys step 6 scores blocks by, [B, H, nb, S, d]: the principal ends (S = 2) where there are some
    (`aggregate_blocks` with `principal`), else the aggregates themselves (S = 1, a view)."""
    return agg_key.unsqueeze(3) if ends is None else ends


def aggregate_bias(count: torch.Tensor, group_bias: str) -> torch.Tensor:
    """The logit bias of each aggregate in stage 5: log of its member count with group_bias="log_size",
    else 0; -inf for a block without members (it is not read)."""
    bias = count.clamp(min=1).log() if group_bias == "log_size" else torch.zeros_like(count)
    return bias.masked_fill(count == 0, -math.inf)
