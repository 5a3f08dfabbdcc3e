"""Stages 1-4 of docs/spec.md, vectorised over batch and heads: importance, focal selection, block
aggregates. Shared by every fast backend, which then only differ in how they run stage 5 (the attention
over focal keys, aggregates and local keys).

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
    batch, heads, group, seq_len, _ = query.shape
    device = query.device
    positions = torch.arange(seq_len, device=device)
    real = positions[None, :] < lengths[:, None]  # [B, L]

    with torch.no_grad():  # the selection is a discrete choice: no gradient, nothing saved for one
        importance = _importance(query, key, lengths, config.probe_queries, scale)
        focal = _select_focal(importance, lengths, real, config)
    focal_pos, focal_key, focal_value = _gather_focal(focal, key, value, lengths, config)
    agg_key, agg_value, agg_bias = _aggregate(query, key, value, focal, real, lengths, config, scale)
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
    )


def _importance(query: torch.Tensor, key: torch.Tensor, lengths: torch.Tensor, probes: int, scale: float) -> torch.Tensor:
    """imp[b, h, j] = sum over the group's heads and the last min(r, L_b) queries of their causal
    attention weight on j."""
    batch, heads, group, seq_len, dim = query.shape
    probes = min(probes, seq_len)
    probe_pos = lengths[:, None] - probes + torch.arange(probes, device=query.device)  # [B, r]; < 0 = unused
    index = probe_pos.clamp(min=0).view(batch, 1, 1, probes, 1).expand(batch, heads, group, probes, dim)
    dtype = compute_dtype(query.dtype)
    probe_q = query.gather(3, index).to(dtype)
    keys = torch.arange(seq_len, device=query.device)
    hidden = (keys.view(1, 1, seq_len) > probe_pos.unsqueeze(-1)) | (probe_pos.unsqueeze(-1) < 0)  # [B, r, L]
    rows_per_chunk = max(1, min(probes, IMPORTANCE_CHUNK_SCORES // max(batch * seq_len, 1)))
    importance = torch.zeros(batch, heads, seq_len, dtype=dtype, device=query.device)
    for head in range(heads):  # one kv head, one query head of its group and a chunk of probes at a time
        keys_t = key[:, head].to(dtype).transpose(-1, -2)
        for g in range(group):
            for lo in range(0, probes, rows_per_chunk):
                logits = scale * probe_q[:, head, g, lo : lo + rows_per_chunk] @ keys_t  # [B, rows, L]
                weights = torch.softmax(logits.masked_fill_(hidden[:, lo : lo + rows_per_chunk], -math.inf), dim=-1)
                importance[:, head] += weights.nan_to_num_(0.0).sum(dim=1)  # unused probe rows (all -inf) count 0
    return importance


def _budgets(lengths: torch.Tensor, config: DGAConfig) -> torch.Tensor:
    """Focal tokens per row: k (at least the sinks); the whole row when it is below min_seq_len."""
    budgets = [
        rule.focal_budget(length, config.focal_ratio, config.sink_tokens, dense=length < config.min_seq_len)
        for length in lengths.tolist()
    ]
    return torch.tensor(budgets, dtype=torch.long, device=lengths.device)


def _select_focal(importance: torch.Tensor, lengths: torch.Tensor, real: torch.Tensor, config: DGAConfig) -> torch.Tensor:
    batch, heads, seq_len = importance.shape
    score = importance.masked_fill(~real[:, None, :], -math.inf)
    sinks = torch.arange(seq_len, device=score.device) < config.sink_tokens
    score = score.masked_fill((sinks[None, :] & real)[:, None, :], math.inf)
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices  # ties: earlier position first
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(seq_len, device=score.device).expand_as(order))
    return rank < _budgets(lengths, config).view(batch, 1, 1)


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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

    agg_keys, agg_values = [], []
    chunk = max(1, AGGREGATE_CHUNK_TOKENS // m)
    for first in range(0, num_blocks, chunk):
        last = min(num_blocks, first + chunk)
        block_keys, block_values = blocked(key, first, last), blocked(value, first, last)
        logits = scale * torch.einsum("bhcmd,bhcd->bhcm", block_keys, query_bar(first, last))
        weights = torch.softmax(logits.masked_fill(~members[:, :, first:last], -math.inf), dim=-1).nan_to_num(0.0)
        agg_keys.append(torch.einsum("bhcm,bhcmd->bhcd", weights, block_keys))
        agg_values.append(torch.einsum("bhcm,bhcmd->bhcd", weights, block_values))
    agg_key = agg_keys[0] if len(agg_keys) == 1 else torch.cat(agg_keys, dim=2)
    agg_value = agg_values[0] if len(agg_values) == 1 else torch.cat(agg_values, dim=2)
    counts = members.sum(-1).to(dtype)
    bias = counts.clamp(min=1).log() if config.group_bias == "log_size" else torch.zeros_like(counts)
    return agg_key, agg_value, bias.masked_fill(counts == 0, -math.inf)
