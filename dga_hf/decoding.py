"""Decoding with DGA: `DGACache`, a `DynamicCache` whose layers hold a DGA decode state.

The rule implemented here is written out in docs/decoding.md; in short, per batch row and kv head, after a
prefill (or a refresh) has chosen the focal set F:

- a query at position i (block beta = i // m) attends, in one softmax, to the focal tokens of blocks
  <= beta - n, the aggregates of blocks <= beta - n (+ log count with group_bias="log_size") and the raw
  tokens of blocks > beta - n up to i: the spec's step 5 with the current F;
- the aggregate of block c is computed when its last position e_c is processed, from its non-focal
  members, with q_bar_c = mean over the G query heads of the query at e_c (recorded for later refreshes);
- keep_full one-token steps read the raw tokens of the `expand_blocks` old blocks whose key bound scores
  highest for the step's query instead of their aggregates;
- every `refresh_every` tokens (default ceil(1.1 * m), the paper's schedule; with block expansion every
  max(that, window / 8)) F is re-selected with the latest query (after that step's output) and the
  aggregates whose membership changed are recomputed.

How the attention function reaches the state: Transformers does not hand the cache to the attention
function, but it hands over exactly the key/value tensors that `cache.update` returned. `DGALayer.update`
returns the new key/value states with the layer's state attached (``key._dga_state``); the "dga" attention
backend (dga_hf.integration) runs `state.attend` when the key carries one. Only the new tokens are returned:
the decode step reads the state's own buffers, never a full-length key tensor.

Modes: ``"keep_full"`` keeps every token's key/value (compacted per row), so a refresh can re-select any
token: it saves time, not memory. ``"compact"`` drops the non-focal tokens once they leave the local window
(they live on in their block's aggregate): it holds about gamma + 1/m + n*m/t of the dense KV bytes, and a
refresh can only re-rank the tokens it still holds (see docs/decoding.md). Rows still dense (shorter than
min_seq_len) hold every token in the focal buffer; in keep_full mode that is a second copy until they switch.

Padding: each row is kept in compacted coordinates (its real tokens at 0..len_b-1), as in ops/layout.py;
padded positions of the [B, kv_len] padding mask the attention function receives are never stored. What
Transformers sees (get_seq_length, get_mask_sizes) stays the absolute cache length, padding included, so
positions and masks are those of a DynamicCache.
"""

from __future__ import annotations

import functools
import inspect
import math
import types
from typing import Any

import torch
from transformers import DynamicCache

from .config import DecodingConfig, DGAConfig
from .ops import torch_backend
from .ops.torch_backend import additive_mask
from .ops.dense import dense_attention, single_query_attention
from .ops.dispatch import resolve_backend
from .ops.layout import build_layout, compact_padding, compute_dtype, uncompact
from .ops.naive import naive_dga_attention
from .rule import focal_count

try:  # transformers >= 4.54: caches are lists of layer objects
    from transformers.cache_utils import DynamicLayer as _LayerBase
except ImportError:  # pragma: no cover - transformers 4.53: DGACache keeps its own layer list
    _LayerBase = object

# the buffers a one-token PyTorch step reads as views of one workspace (keys, then values)
PACKED = ("focal_k", "agg_k", "ring_k", "focal_v", "agg_v", "ring_v")
SENTINEL = 2**62  # position of an unused focal slot: its block is never old
GROWTH = 1.25  # buffers grow geometrically (x1.25 + a fixed step), never by one token
GROWTH_STEP = 64
QUERY_TILE = 256  # queries per tile in a chunked-prefill step
PREFILL_SPARE = 256  # decoded tokens the buffers sized at prefill can take before growing
def refresh_interval(group_size: int, expanding_window: int = 0) -> int:
    """The paper's schedule: re-select every ceil(1.1 * m) generated tokens. With block expansion (keep_full),
    `expanding_window` = the local window n * m: every max(ceil(1.1 * m), window // 8) tokens. The step's
    own expansion already follows the query through old context (the job the paper's frequent refresh
    does); a refresh is left only to bring generated tokens into F before they leave the raw window, and
    eight per window do that. Measured on SmolLM2-135M at 4K (docs/decoding.md): copy and the perplexity of
    256 decoded tokens are equal with a refresh every 18 tokens, every 64, and none."""
    paper = max(1, math.ceil(1.1 * group_size - 1e-9))
    return max(paper, expanding_window // 8)


def _grow(
    x: torch.Tensor, dim: int, needed: int, fill: float | int | bool = 0, exact: bool = False, multiple: int = 1
) -> torch.Tensor:
    """x with room for `needed` entries along `dim` (grown geometrically unless `exact`; the new capacity
    rounded up to `multiple`)."""
    capacity = x.shape[dim]
    if needed <= capacity:
        return x
    size = needed if exact else max(needed, int(capacity * GROWTH) + GROWTH_STEP)
    size = -(-size // multiple) * multiple
    shape = list(x.shape)
    shape[dim] = size
    y = x.new_full(shape, fill)
    y.narrow(dim, 0, capacity).copy_(x)
    return y


def _gather_rows(x: torch.Tensor, index: torch.Tensor, rows_per_item: int = 1) -> torch.Tensor:
    """x [B, H, N, d], index [B, H, K] (or [B, 1, K]) -> x[b, h, index[b, h, k]] as [B, H, K, d].
    With rows_per_item = m (N a multiple of m), index holds block numbers and each item is the block's m
    rows: [B, H, K*m, d]. One index_select of whole rows: a gather along dim 2 with an index expanded over
    d is several times slower on the CPU."""
    batch, heads, length, dim = x.shape
    base = torch.arange(batch * heads, device=x.device).view(batch, heads, 1) * (length // rows_per_item)
    flat = (index.expand(batch, heads, index.shape[-1]) + base).flatten()
    return _take_items(x, flat, rows_per_item).view(batch, heads, -1, dim)


def _take_items(x: torch.Tensor, flat: torch.Tensor, rows_per_item: int) -> torch.Tensor:
    """x [B, H, N, d] seen as B*H*N/rows_per_item items of rows_per_item rows -> items `flat`, [K, rows, d]."""
    return x.reshape(-1, rows_per_item * x.shape[-1]).index_select(0, flat).view(-1, rows_per_item, x.shape[-1])


def _aggregate(
    qbar: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, members: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spec step 4 for a set of blocks. qbar [..., c, d] (compute dtype), keys/values [..., c, m, d],
    members [..., c, m] bool. Returns K_hat, V_hat (compute dtype), the log normaliser lse (-inf for an
    empty block; it lets a refresh add members to the aggregate exactly) and the member count."""
    dtype = qbar.dtype
    keys, values = keys.to(dtype), values.to(dtype)
    logits = scale * torch.einsum("...cmd,...cd->...cm", keys, qbar)
    logits = logits.masked_fill(~members, -math.inf)
    lse = torch.logsumexp(logits, dim=-1)
    weights = torch.exp(logits - lse.unsqueeze(-1)).nan_to_num(0.0)
    agg_key = torch.einsum("...cm,...cmd->...cd", weights, keys)
    agg_value = torch.einsum("...cm,...cmd->...cd", weights, values)
    return agg_key, agg_value, lse, members.sum(-1).to(dtype)


def _select(
    score: torch.Tensor, eligible: torch.Tensor, sink: torch.Tensor, budget: torch.Tensor, pos: torch.Tensor | None
) -> torch.Tensor:
    """Spec step 2 over candidate lists [B, H, N]: sinks first, then the highest scores, ties to the earlier
    position; at most `budget` ([B, H, 1] or broadcastable) eligible candidates. `pos` None means the
    candidates are already in position order.

    Without a sort of N: the budget-th highest score is the threshold; every candidate above it is in, and
    of those equal to it the earliest fill the rest (a top-k of the budget is several times cheaper than a
    stable sort of all N on the CPU, and a refresh in keep_full ranks every cached token)."""
    score = score.masked_fill(~eligible, -math.inf).masked_fill(sink & eligible, math.inf)
    budget = budget.expand(*score.shape[:-1], 1)
    most = min(score.shape[-1], int(budget.max()))
    if most == 0:
        return torch.zeros_like(eligible)
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


class DGADecodeState:
    """The DGA decode state of one layer: focal buffer, local ring, block aggregates (+ the full archive
    in keep_full mode), for B rows and H kv heads, each row in compacted coordinates.

    Tensors (capacities grow geometrically; unused slots are masked by position):
      focal_k/v [B, H, Fcap, d], focal_pos [B, H, Fcap] (SENTINEL = unused), focal_cnt [B, H]
      ring_k/v [B, H, W, d] (W = n*m; slot = position % W), ring_pos [B, W] (-1 = empty), ring_focal [B, H, W]
      agg_k/v [B, H, NBcap, d], agg_bias/agg_lse/agg_cnt [B, H, NBcap]
      qbar: keep_full [B, H, NBcap, d] (every block, for re-aggregating from the archive); compact
        [B, H, n, d] (the window's blocks, slot = block % n) plus focal_logit [B, H, Fcap] = s * q_bar of the
        token's block . its key (NaN until the block is complete): all a fold into an old block needs
      arch_k/v [B, H, Tcap, d] (keep_full only)
      blk_bound [B, H, NBcap, 2d] (keep_full with expand_blocks): the elementwise maximum, then minimum, of
        each complete block's keys, for the upper bound of a block's best logit
    Host bookkeeping: lengths (real tokens per row), dense_rows, seen (absolute cache length).
    """

    _BATCHED = (
        "focal_k", "focal_v", "focal_pos", "focal_cnt", "ring_k", "ring_v", "ring_pos", "ring_focal",
        "agg_k", "agg_v", "agg_bias", "agg_lse", "agg_cnt", "qbar", "focal_logit", "arch_k", "arch_v",
        "blk_bound",
    )

    def __init__(self, options: DecodingConfig | None = None, shared: dict | None = None):
        options = options or DecodingConfig()
        self.mode = options.mode
        self.refresh_every = options.refresh_every
        self.expand_blocks = options.expanded_blocks
        self.dense_share = options.dense_step_share
        self.shared = {} if shared is None else shared
        self.seen = 0
        self.pending = 0
        self.ready = False
        self._packed = None
        self.ws_k = self.ws_v = None
        self.tail = 0
        for name in self._BATCHED:
            setattr(self, name, None)

    # ------------------------------------------------------------------------------------------ cache side

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pending:
            raise RuntimeError(
                "DGACache: the keys of the previous step were never read by the DGA attention. A DGACache only "
                "works with a model patched with dga_hf (attn_implementation='dga') on every layer it caches."
            )
        self.pending = key_states.shape[-2]
        self.seen += self.pending
        key_states._dga_state = self
        return key_states, value_states

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep / reorder / repeat batch rows (beam search, contrastive search, num_return_sequences)."""
        if not self.ready:
            return
        rows = index.tolist()
        for name in self._BATCHED:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.index_select(0, index.to(value.device)))
        self.lengths = [self.lengths[r] for r in rows]
        self.dense_rows = [self.dense_rows[r] for r in rows]

    def nbytes(self) -> int:
        """Bytes of every tensor the state holds (allocated capacity; the workspace and its views once)."""
        storages = {}
        for name in (*self._BATCHED, "ws_k", "ws_v"):
            tensor = getattr(self, name)
            if tensor is not None:
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())

    # ------------------------------------------------------------------------------------------ attention side

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        padding_mask: torch.Tensor | None,
        config: DGAConfig,
        scale: float | None,
        *,
        dense: bool = False,
    ) -> torch.Tensor:
        """query [B, Hq, q, d]; key/value [B, Hkv, q, d]: the new tokens `update` returned; padding_mask
        [B, kv_len] (absolute, True = real) or None. `dense`: the layer is one of `dense_layers`.
        Returns [B, Hq, q, dv] in the query's dtype."""
        if key.shape[-2] != self.pending or query.shape[-2] != self.pending:
            raise RuntimeError(
                f"DGACache: attention got {query.shape[-2]} queries and {key.shape[-2]} keys for a step of "
                f"{self.pending} new tokens"
            )
        self.pending = 0
        if padding_mask is not None and padding_mask.shape[-1] != self.seen:
            raise ValueError(
                f"DGACache: a padding mask of length {padding_mask.shape[-1]} for a cache of {self.seen} positions"
            )
        scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
        if not self.ready:
            return self._prefill(query, key, value, padding_mask, config, scale, dense)
        with torch.no_grad():
            return self._step(query, key, value, padding_mask, scale)

    # ------------------------------------------------------------------------------------------ prefill

    def _prefill(self, query, key, value, padding_mask, config: DGAConfig, scale: float, dense: bool) -> torch.Tensor:
        batch, q_heads, seq_len, head_dim = query.shape
        heads = key.shape[1]
        self.config = config
        self.m, self.n = config.group_size, config.local_blocks
        self.window = self.m * self.n
        self.dense_layer = dense
        self.keep_archive = self.mode == "keep_full" and not dense
        self.expand = self.expand_blocks if self.keep_archive else 0
        if self.refresh_every == "auto":
            every = refresh_interval(self.m, self.window if self.expand else 0)
        else:
            every = self.refresh_every or 0
        self.every = 0 if dense else every
        # compact: q_bar only for the window's blocks, and each focal token's logit for folds
        self.track_logits = not self.keep_archive and bool(self.every)
        self.since_refresh = 0
        self.cd = compute_dtype(query.dtype)
        q, k, v, lengths, order = compact_padding(query, key, value, padding_mask)
        q5 = q.view(batch, heads, q_heads // heads, seq_len, head_dim)
        chosen = resolve_backend(config.backend, query.device)
        # one-token steps on the Triton backend run its decode kernels (float64 has no kernel: PyTorch path)
        self.fused = chosen == "triton" and query.dtype in (torch.float32, torch.bfloat16, torch.float16)
        if dense or seq_len < config.min_seq_len:
            out = dense_attention(query, key, value, scale=scale, padding_mask=padding_mask)
            real = torch.arange(seq_len, device=query.device)[None, :] < lengths[:, None]
            focal = real[:, None, :].expand(batch, heads, seq_len)
        else:
            layout = build_layout(q5, k, v, lengths, config, scale)
            if chosen == "naive":
                out = naive_dga_attention(query, key, value, config, scale=scale, padding_mask=padding_mask).to(query)
            else:
                if chosen == "triton":
                    from .ops import triton_backend

                    o = triton_backend.attend(q5, k, v, layout, config, scale)
                else:
                    o = torch_backend.attend(q5.to(self.cd), k.to(self.cd), v.to(self.cd), layout, config, scale)
                out = uncompact(o.reshape(batch, q_heads, seq_len, -1), order).to(query.dtype)
            focal = layout.focal
        with torch.no_grad():
            self._init_state(q5, k, v, lengths, focal, scale)
        return out

    def _budget(self, length: int) -> int:
        if self.dense_layer or length < self.config.min_seq_len:
            return length
        return max(focal_count(length, self.config.focal_ratio), min(self.config.sink_tokens, length)) if length else 0

    def _is_dense(self, length: int) -> bool:
        return self.dense_layer or length < self.config.min_seq_len

    def _bias(self, lse: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        bias = count.clamp(min=1).log() if self.config.group_bias == "log_size" else torch.zeros_like(count)
        return bias.masked_fill(~torch.isfinite(lse) | (count == 0), -math.inf)

    def _init_state(self, q5, k, v, lengths, focal, scale: float) -> None:
        batch, heads, group, seq_len, dim = q5.shape
        device, m, window = q5.device, self.m, self.window
        self.lengths = lengths.tolist()
        self.dense_rows = [self._is_dense(t) for t in self.lengths]
        positions = torch.arange(seq_len, device=device)
        real = positions[None, :] < lengths[:, None]

        # focal buffer: positions ascending, unused slots SENTINEL
        count = focal.sum(-1)
        slots = int(count.max()) if count.numel() else 0
        focal_pos = torch.where(focal, positions, SENTINEL).sort(dim=-1).values[..., :slots]
        index = focal_pos.clamp(max=max(seq_len - 1, 0))
        spare = GROWTH_STEP if any(self.dense_rows) else 0
        self.focal_pos = _grow(focal_pos, 2, slots + spare, SENTINEL, exact=True)
        self.focal_k = _grow(_gather_rows(k, index), 2, slots + spare, exact=True)
        self.focal_v = _grow(_gather_rows(v, index), 2, slots + spare, exact=True)
        self.focal_cnt = count
        self.focal_hi = slots

        # local ring: slot s holds the latest position p < len with p = s (mod W)
        s = torch.arange(window, device=device)
        base = lengths[:, None] - 1 - s
        ring_pos = torch.where(base >= 0, s + window * torch.div(base, window, rounding_mode="floor"), -1)
        gather = ring_pos.clamp(min=0)[:, None, :]
        self.ring_pos = ring_pos
        self.ring_k = _gather_rows(k, gather)
        self.ring_v = _gather_rows(v, gather)
        self.ring_focal = focal.gather(2, gather.expand(batch, heads, window)) & (ring_pos >= 0)[:, None, :]

        # aggregates and block-end query means of the complete blocks
        num_blocks = math.ceil(seq_len / m)
        pad = num_blocks * m - seq_len
        blocks = torch.arange(num_blocks, device=device)
        complete = (blocks[None, :] + 1) * m <= lengths[:, None]  # [B, nb]
        ends = ((blocks + 1) * m - 1).clamp(max=seq_len - 1)
        qbar = q5[:, :, :, ends].to(self.cd).mean(2) * complete[:, None, :, None]
        members = torch.nn.functional.pad(~focal & real[:, None, :], (0, pad)).view(batch, heads, num_blocks, m)
        members &= complete[:, None, :, None]

        def blocked(x):
            return torch.nn.functional.pad(x, (0, 0, 0, pad)).view(batch, heads, num_blocks, m, x.shape[-1])

        block_keys = blocked(k)  # a padded copy: made once for the aggregates and the key bounds
        agg_k, agg_v, lse, cnt = _aggregate(qbar, block_keys, blocked(v), members, scale)
        capacity = num_blocks + 1 + PREFILL_SPARE // m
        if self.keep_archive:
            self.qbar = _grow(qbar, 2, capacity, exact=True)
        else:  # slot s: the window block c = s (mod n) of each row (the latest such c <= the row's last block)
            last = torch.div(lengths - 1, m, rounding_mode="floor")[:, None]  # [B, 1]
            slot = torch.arange(self.n, device=device)
            owner = slot + self.n * torch.div(last - slot, self.n, rounding_mode="floor")  # [B, n]
            ring = _gather_rows(qbar, owner.clamp(min=0, max=num_blocks - 1)[:, None, :])
            self.qbar = ring * (owner >= 0)[:, None, :, None]
        if self.track_logits:
            fblock = torch.div(self.focal_pos, m, rounding_mode="floor")
            done = (fblock + 1) * m <= lengths[:, None, None]
            fq = _gather_rows(qbar, fblock.clamp(max=num_blocks - 1))
            logit = scale * (self.focal_k.to(self.cd) * fq).sum(-1)
            self.focal_logit = torch.where(done, logit, math.nan)
        self.agg_k = _grow(agg_k.to(k.dtype), 2, capacity, exact=True)
        self.agg_v = _grow(agg_v.to(v.dtype), 2, capacity, exact=True)
        self.agg_lse = _grow(lse, 2, capacity, -math.inf, exact=True)
        self.agg_cnt = _grow(cnt, 2, capacity, exact=True)
        self.agg_bias = self._bias(self.agg_lse, self.agg_cnt)
        if self.expand:
            self.blk_bound = _grow(torch.cat([block_keys.amax(3), block_keys.amin(3)], dim=-1), 2, capacity, exact=True)

        if self.keep_archive:  # room for PREFILL_SPARE decoded tokens before the first growth
            self.arch_k = _grow(k, 2, seq_len + PREFILL_SPARE, exact=True, multiple=m)
            self.arch_v = _grow(v, 2, seq_len + PREFILL_SPARE, exact=True, multiple=m)
        self.ready = True

    # ------------------------------------------------------------------------------------------ decode / chunk

    def _new_token_counts(self, padding_mask: torch.Tensor | None, q_len: int, batch: int) -> list[int] | None:
        """Real new tokens per row, or None when every new token is real. Memoised per forward: every
        layer receives the same mask tensor, so the host sync happens once per step, not once per layer."""
        if padding_mask is None:
            return None
        memo_key = (id(padding_mask), padding_mask.data_ptr(), self.seen)
        memo = self.shared.get("mask")
        if memo is not None and memo[0] == memo_key:
            return memo[1]
        counts = padding_mask[:, -q_len:].to(torch.bool).sum(-1).tolist()
        result = None if all(c == q_len for c in counts) else counts
        self.shared["mask"] = (memo_key, result)
        return result

    def _device_rows(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Row lengths and dense flags as device tensors, rebuilt only when the host lists changed."""
        cached = getattr(self, "_rows_dev", None)
        if cached is None or cached[0] is not self.lengths or cached[1] is not self.dense_rows:
            cached = (self.lengths, self.dense_rows, torch.tensor(self.lengths, device=device),
                      torch.tensor(self.dense_rows, device=device))
            self._rows_dev = cached
        return cached[2], cached[3]

    def _ensure_capacity(self, new_lengths: list[int], q_len: int) -> None:
        top = max(new_lengths) if new_lengths else 0
        m = self.m
        blocks = -(-top // m) + 1
        names = (("agg_k", 0), ("agg_v", 0), ("agg_cnt", 0), ("agg_lse", -math.inf), ("agg_bias", -math.inf))
        names += (("qbar", 0),) if self.keep_archive else ()
        names += (("blk_bound", 0),) if self.expand else ()
        for name, fill in names:
            setattr(self, name, _grow(getattr(self, name), 2, blocks, fill))
        if self.keep_archive:
            need = max(top, max(self.lengths) + q_len)
            self.arch_k = _grow(self.arch_k, 2, need, multiple=m)  # whole blocks: block expansion gathers blocks
            self.arch_v = _grow(self.arch_v, 2, need, multiple=m)
        if any(self.dense_rows):
            need = self.focal_hi + q_len
            self.focal_k = _grow(self.focal_k, 2, need)
            self.focal_v = _grow(self.focal_v, 2, need)
            self.focal_pos = _grow(self.focal_pos, 2, need, SENTINEL)
            if self.track_logits:
                self.focal_logit = _grow(self.focal_logit, 2, need, math.nan)

    def _step(self, query, key, value, padding_mask, scale: float) -> torch.Tensor:
        batch, q_heads, q_len, head_dim = query.shape
        heads = key.shape[1]
        group = q_heads // heads
        device, window = query.device, self.window
        counts = self._new_token_counts(padding_mask, q_len, batch)
        order = None
        if counts is None:
            counts = [q_len] * batch
            qn, kn, vn = query, key, value
        else:
            qn, kn, vn, _, order = compact_padding(query, key, value, padding_mask[:, -q_len:].to(torch.bool))
        old = self.lengths
        new = [t + a for t, a in zip(old, counts)]
        all_valid = all(a == q_len for a in counts)
        self._ensure_capacity(new, q_len)

        # host lists drive the control flow; their device copies are cached, so that a decoding step
        # without padding copies nothing from the host (on a GPU such copies would serialise the stream)
        t_dev, dense_dev = self._device_rows(device)
        steps = torch.arange(q_len, device=device)
        pos_new = t_dev[:, None] + steps  # [B, q]
        if all_valid:
            valid_new = torch.ones(batch, q_len, dtype=torch.bool, device=device)
            self._rows_dev = (new, self.dense_rows, t_dev + q_len, dense_dev)
        else:
            valid_new = steps[None, :] < torch.tensor(counts, device=device)[:, None]
        q5 = qn.reshape(batch, heads, group, q_len, head_dim)

        # archive (keep_full): positions past a row's real tokens get scratch values, overwritten later
        uniform = all_valid and len(set(old)) == 1  # every row at the same length: plain slices
        if self.keep_archive and uniform:
            self.arch_k[:, :, old[0] : old[0] + q_len] = kn
            self.arch_v[:, :, old[0] : old[0] + q_len] = vn
        elif self.keep_archive:
            index = pos_new[:, None, :, None].expand(batch, heads, q_len, head_dim)
            self.arch_k.scatter_(2, index, kn.to(self.arch_k.dtype))
            self.arch_v.scatter_(2, pos_new[:, None, :, None].expand(batch, heads, q_len, vn.shape[-1]), vn.to(self.arch_v.dtype))

        # rows still dense (shorter than min_seq_len, or a dense layer): new tokens join F
        if any(self.dense_rows):
            slot = self.focal_cnt[:, :, None] + steps  # [B, H, q]
            self.focal_k.scatter_(2, slot[..., None].expand(-1, -1, -1, head_dim), kn.to(self.focal_k.dtype))
            self.focal_v.scatter_(2, slot[..., None].expand(-1, -1, -1, vn.shape[-1]), vn.to(self.focal_v.dtype))
            joined = valid_new & dense_dev[:, None]
            self.focal_pos.scatter_(2, slot, torch.where(joined, pos_new, SENTINEL)[:, None, :].expand(batch, heads, q_len))
            if self.track_logits:  # known once the token's block is complete
                self.focal_logit.scatter_(2, slot, math.nan)
            self.focal_cnt = self.focal_cnt + joined.sum(-1)[:, None]
            self.focal_hi += max(a for a, d in zip(counts, self.dense_rows) if d)

        # raw workspace: the ring (the new token written in) for one token, else ring + chunk
        new_focal = (valid_new & dense_dev[:, None])[:, None, :].expand(batch, heads, q_len)
        if q_len == 1:
            rows = torch.arange(batch, device=device)
            slot = pos_new[:, 0] % window
            if uniform:
                at = old[0] % window
                self.ring_pos[:, at] = old[0]
                self.ring_k[:, :, at] = kn[:, :, 0]
                self.ring_v[:, :, at] = vn[:, :, 0]
                self.ring_focal[:, :, at] = new_focal[:, :, 0]
            elif all_valid:
                self.ring_pos[rows, slot] = pos_new[:, 0]
                self.ring_k[rows, :, slot] = kn[:, :, 0].to(self.ring_k.dtype)
                self.ring_v[rows, :, slot] = vn[:, :, 0].to(self.ring_v.dtype)
                self.ring_focal[rows, :, slot] = new_focal[:, :, 0]
            else:
                keep = valid_new[:, 0]
                self.ring_pos[rows, slot] = torch.where(keep, pos_new[:, 0], self.ring_pos[rows, slot])
                self.ring_k[rows, :, slot] = torch.where(keep[:, None, None], kn[:, :, 0].to(self.ring_k.dtype), self.ring_k[rows, :, slot])
                self.ring_v[rows, :, slot] = torch.where(keep[:, None, None], vn[:, :, 0].to(self.ring_v.dtype), self.ring_v[rows, :, slot])
                self.ring_focal[rows, :, slot] = torch.where(keep[:, None], new_focal[:, :, 0], self.ring_focal[rows, :, slot])
            ws_k, ws_v, ws_pos, ws_focal = self.ring_k, self.ring_v, self.ring_pos, self.ring_focal
        else:
            ws_k = torch.cat([self.ring_k, kn.to(self.ring_k.dtype)], dim=2)
            ws_v = torch.cat([self.ring_v, vn.to(self.ring_v.dtype)], dim=2)
            ws_pos = torch.cat([self.ring_pos, torch.where(valid_new, pos_new, -1)], dim=1)
            ws_focal = torch.cat([self.ring_focal, new_focal], dim=2)

        self._close_blocks(q5, ws_k, ws_v, ws_pos, ws_focal, old, counts, scale)
        if q_len == 1 and self.dense_share is not None and self.keep_archive and self._reads_most_keys(new):
            out = self._attend_archive(q5, new, scale, all_valid)
        elif q_len == 1 and self.fused:
            out = self._attend_fused(q5, pos_new, new, scale)
        elif q_len == 1:
            out = self._attend_packed(q5, pos_new, new, scale, all_valid)
        else:
            out = self._attend_streams(q5, ws_k, ws_v, ws_pos, pos_new, new, scale, q_len, all_valid)
        out = out.reshape(batch, q_heads, q_len, -1)
        if not all_valid:
            out = out * valid_new[:, None, :, None]
        out = uncompact(out, order).to(query.dtype)

        if q_len > 1:  # the ring keeps the last W positions of every row
            s = torch.arange(window, device=device)
            base = torch.tensor(new, device=device)[:, None] - 1 - s
            ring_pos = torch.where(base >= 0, s + window * torch.div(base, window, rounding_mode="floor"), -1)
            index = _ws_index(ring_pos.clamp(min=0), t_dev[:, None], window, True)[:, None, :]
            self.ring_k, self.ring_v = _gather_rows(ws_k, index), _gather_rows(ws_v, index)
            self.ring_focal = ws_focal.gather(2, index.expand(batch, heads, window)) & (ring_pos >= 0)[:, None, :]
            self.ring_pos = ring_pos
        self.lengths = new
        self.since_refresh += q_len
        if self.every and self.since_refresh >= self.every:
            self._refresh(q5, old, counts, scale)
            self.since_refresh = 0
        return out

    def _close_blocks(self, q5, ws_k, ws_v, ws_pos, ws_focal, old, counts, scale) -> None:
        """Blocks whose last position is among this step's tokens: record q_bar and their aggregate."""
        m = self.m
        pairs = [(b, c) for b, (t, a) in enumerate(zip(old, counts)) for c in range(t // m, (t + a) // m)]
        if not pairs:
            return
        device = q5.device
        batch, heads, group, q_len, dim = q5.shape
        rows = torch.tensor([b for b, _ in pairs], device=device)
        blocks = torch.tensor([c for _, c in pairs], device=device)
        starts = torch.tensor([old[b] for b, _ in pairs], device=device)
        ends = (blocks + 1) * m - 1
        qbar = q5[rows, :, :, ends - starts].to(self.cd).mean(2)  # [N, H, G, d] -> [N, H, d]
        positions = blocks[:, None] * m + torch.arange(m, device=device)  # [N, m]
        index = _ws_index(positions, starts[:, None], self.window, q_len > 1)
        keys = ws_k[rows[:, None], :, index].transpose(1, 2)  # [N, H, m, d]
        values = ws_v[rows[:, None], :, index].transpose(1, 2)
        held = ws_pos[rows[:, None], index] == positions  # [N, m]
        members = ~ws_focal[rows[:, None], :, index].transpose(1, 2) & held[:, None, :]
        agg_k, agg_v, lse, cnt = _aggregate(qbar[:, :, None], keys[:, :, None], values[:, :, None], members[:, :, None], scale)
        if self.keep_archive:
            self.qbar[rows, :, blocks] = qbar
            if self.expand:
                self.blk_bound[rows, :, blocks] = torch.cat([keys.amax(2), keys.amin(2)], dim=-1).to(self.blk_bound.dtype)
        else:  # ring of the window's blocks: of several blocks sharing a slot only the latest is kept
            last = {b: (old[b] + counts[b]) // m - 1 for b, _ in pairs}
            keep = [i for i, (b, c) in enumerate(pairs) if c > last[b] - self.n]
            keep_t = torch.tensor(keep, device=device)
            self.qbar[rows[keep_t], :, blocks[keep_t] % self.n] = qbar[keep_t]
        if self.track_logits and self.focal_hi:  # focal tokens of the closed blocks get their logit
            slots = self.focal_hi
            fblock = torch.div(self.focal_pos[rows, :, :slots], m, rounding_mode="floor")  # [N, H, F]
            hit = fblock == blocks[:, None, None]
            logit = scale * (self.focal_k[rows, :, :slots].to(self.cd) * qbar[:, :, None, :]).sum(-1)
            total = torch.zeros_like(self.focal_logit[:, :, :slots]).index_add_(0, rows, torch.where(hit, logit, 0.0))
            found = torch.zeros_like(total).index_add_(0, rows, hit.to(total.dtype)) > 0
            self.focal_logit[:, :, :slots] = torch.where(found, total, self.focal_logit[:, :, :slots])
        self.agg_k[rows, :, blocks] = agg_k[:, :, 0].to(self.agg_k.dtype)
        self.agg_v[rows, :, blocks] = agg_v[:, :, 0].to(self.agg_v.dtype)
        self.agg_lse[rows, :, blocks] = lse[:, :, 0]
        self.agg_cnt[rows, :, blocks] = cnt[:, :, 0]
        self.agg_bias[rows, :, blocks] = self._bias(lse[:, :, 0], cnt[:, :, 0])

    def _attend_streams(self, q5, ws_k, ws_v, ws_pos, pos_new, new, scale, q_len, all_valid) -> torch.Tensor:
        """A multi-token step (chunked prefill): per query tile, one SDPA over [focal slots | aggregates of
        old blocks | raw tokens of the ring and the chunk] with the rule as an additive mask. q5
        [B, H, G, q, d] -> [B, H, G, q, dv] (compute dtype). One-token steps take `_attend_packed` (or the
        Triton kernels).

        With first = (beta - n + 1) * m the window's first position: a focal token is old iff its position
        is < first (unused slots hold SENTINEL), a block c is old iff c < beta - n + 1, and a raw token is in
        the window iff first <= its position <= the query's (empty ring slots hold -1)."""
        m, n, window = self.m, self.n, self.window
        old_blocks = self._old_blocks(new)
        focal_slots = self.focal_hi
        batch, heads, group, _, dim = q5.shape
        dtype = self.ring_k.dtype
        focal_k, focal_v = self.focal_k[:, :, :focal_slots], self.focal_v[:, :, :focal_slots]
        agg_k, agg_v = self.agg_k[:, :, :old_blocks], self.agg_v[:, :, :old_blocks]
        focal_pos = self.focal_pos[:, :, None, :focal_slots]
        agg_bias = self.agg_bias[:, :, None, :old_blocks]
        agg_blocks = torch.arange(old_blocks, device=q5.device)
        first_block = torch.div(pos_new, m, rounding_mode="floor") - (n - 1)  # [B, q]: blocks < it are old
        first_pos = (first_block * m).clamp(min=0)
        outputs = []
        tile = q_len if q_len <= QUERY_TILE else QUERY_TILE
        for lo in range(0, q_len, tile):
            hi = min(q_len, lo + tile)
            start = first_pos[:, None, lo:hi, None]  # [B, 1, T, 1]
            if ws_k.shape[2] <= window + hi:
                raw_k, raw_v, raw_pos = ws_k, ws_v, ws_pos
            else:  # ring + the chunk keys a query of this tile can see
                begin = window + max(0, lo - window)
                raw_k = torch.cat([ws_k[:, :, :window], ws_k[:, :, begin : window + hi]], dim=2)
                raw_v = torch.cat([ws_v[:, :, :window], ws_v[:, :, begin : window + hi]], dim=2)
                raw_pos = torch.cat([ws_pos[:, :window], ws_pos[:, begin : window + hi]], dim=1)
            rp = raw_pos[:, None, None, :]
            mask = torch.cat([
                additive_mask((focal_pos >= start).expand(-1, -1, hi - lo, -1), dtype),
                additive_mask((agg_blocks >= first_block[:, None, lo:hi, None]).expand(-1, heads, -1, -1), dtype, agg_bias),
                additive_mask(((rp < start) | (rp > pos_new[:, None, lo:hi, None])).expand(-1, heads, -1, -1), dtype),
            ], dim=-1)
            keys = torch.cat([focal_k, agg_k, raw_k], dim=2).flatten(0, 1)[:, None]
            values = torch.cat([focal_v, agg_v, raw_v], dim=2).flatten(0, 1)[:, None]
            query = q5[:, :, :, lo:hi].to(dtype).flatten(0, 1)
            out = torch.nn.functional.scaled_dot_product_attention(
                query, keys, values, attn_mask=mask.flatten(0, 1)[:, None], scale=scale, enable_gqa=True
            )
            if not all_valid:  # a padded query sees nothing: 0 on the CPU, NaN on some GPU SDPA backends
                out = out.nan_to_num_(0.0)
            outputs.append(out.view(batch, heads, group, hi - lo, -1))
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=3)
        return out.to(self.cd)

    def _old_blocks(self, new: list[int]) -> int:
        """Blocks old for the longest row's last new token: its window starts at block beta - n + 1."""
        return max(0, max((t - 1) // self.m for t in new) - self.n + 1)

    def _reads_most_keys(self, new: list[int]) -> bool:
        """The dense-step rule (keep_full, one-token steps): the keys a DGA step may read (every focal slot,
        every old block, the expanded blocks' tokens, the window) are at least `dense_share` of the
        shortest row's tokens."""
        old_blocks = self._old_blocks(new)
        reads = self.focal_hi + old_blocks + min(self.expand, old_blocks) * self.m + self.window
        return reads >= self.dense_share * min(new)

    def _attend_archive(self, q5, new: list[int], scale: float, all_valid: bool) -> torch.Tensor:
        """Dense attention of each row's new token over the row's cached tokens (archive positions < new_b;
        the new token is already written). q5 [B, H, G, 1, d] -> [B, H, G, 1, dv] in the compute dtype."""
        batch, heads, group, _, dim = q5.shape
        top = max(new)
        keys, values = self.arch_k[:, :, :top], self.arch_v[:, :, :top]
        real = None
        if min(new) != top:
            real = torch.arange(top, device=q5.device) < torch.tensor(new, device=q5.device)[:, None]
        query = q5.reshape(batch, heads * group, 1, dim).to(keys.dtype)
        out = single_query_attention(query, keys, values, scale=scale, key_mask=real)
        if not all_valid:  # a row without a real new token (and possibly no token at all) outputs zeros
            out = out.nan_to_num(0.0)
        return out.view(batch, heads, group, 1, -1).to(self.cd)

    def _expansion(self, q5, first_block, old_blocks: int, scale: float):
        """The old blocks a one-token keep_full step reads raw: per kv head, the bound
        max_g sum_d max(q_d * min_d, q_d * max_d) of each visible block (old for the row: < first_block [B];
        non-empty) ranks them and the top ``expand`` are taken. q5 [B, H, G, 1, d]. Returns the chosen
        blocks [B, H, E], which of them are usable (visible) [B, H, E] and the expanded blocks [B, H, nb]."""
        blocks = torch.arange(old_blocks, device=q5.device)
        visible = (blocks < first_block[:, None, None]) & torch.isfinite(self.agg_bias[..., :old_blocks])
        q = (q5[:, :, :, 0].to(self.ring_k.dtype) * scale).to(self.cd)
        # sum_d max(q_d min_d, q_d max_d) = relu(q) . max + min(q, 0) . min: one matmul against [max, min]
        signed = torch.cat([q.clamp(min=0), q.clamp(max=0)], dim=-1)  # [B, H, G, 2d]
        bound = (signed @ self.blk_bound[:, :, :old_blocks].to(self.cd).transpose(-1, -2)).amax(2)  # [B, H, nb]
        bound = bound.masked_fill(~visible, -math.inf)
        count = min(self.expand, old_blocks)
        # a top-k, not a stable sort (3x cheaper): an exact tie of two float bounds at the cut is broken by
        # torch.topk, not by position (the only departure from the rule; such ties need identical key boxes)
        chosen = torch.topk(bound, count, dim=-1, sorted=False).indices  # [B, H, E]
        usable = visible.gather(2, chosen)
        return chosen, usable, torch.zeros_like(visible).scatter_(2, chosen, usable)

    def _attend_packed(self, q5, pos_new, new: list[int], scale: float, all_valid: bool) -> torch.Tensor:
        """A one-token step on the PyTorch path: one SDPA (`single_query_attention`) over the packed
        workspace (focal slots, aggregates, ring, and in keep_full the raw tokens of the expanded blocks
        copied into its tail) with an additive mask holding each key's visibility under the rule (and the
        aggregates' bias). q5 [B, H, G, 1, d] -> [B, H, G, 1, dv] in the compute dtype."""
        if self._packed is None or not all(getattr(self, name) is view for name, view in zip(PACKED, self._packed)):
            self._pack()
        m = self.m
        batch, heads, group, _, dim = q5.shape
        dtype, device = self.ws_k.dtype, q5.device
        capacity = self.focal_k.shape[2]
        first_block = torch.div(pos_new[:, 0], m, rounding_mode="floor") - (self.n - 1)  # [B]: blocks < it are old
        first_pos = (first_block * m).clamp(min=0)
        focal_pos = self.focal_pos[:, :, :capacity]
        focal_hidden = focal_pos >= first_pos[:, None, None]
        agg_visible = torch.arange(self.agg_k.shape[2], device=device) < first_block[:, None, None]
        agg_bias = self.agg_bias.masked_fill(~agg_visible, -math.inf)
        ring_hidden = (self.ring_pos < first_pos[:, None])[:, None, :].expand(batch, heads, -1)
        tail_visible = torch.zeros(batch, heads, self.tail, dtype=torch.bool, device=device)  # stale rows hidden
        old_blocks = self._old_blocks(new)
        if self.expand and old_blocks:
            chosen, usable, expanded = self._expansion(q5, first_block, old_blocks, scale)
            agg_bias[..., :old_blocks].masked_fill_(expanded, -math.inf)
            block = torch.div(focal_pos, m, rounding_mode="floor").clamp_(max=old_blocks - 1)
            focal_hidden |= expanded.gather(2, block)  # a focal token of an expanded block is read with its block
            rows = chosen.shape[-1] * m  # min(E, old blocks) blocks
            self.ws_k[:, :, -self.tail :][:, :, :rows] = _gather_rows(self.arch_k, chosen, m)
            self.ws_v[:, :, -self.tail :][:, :, :rows] = _gather_rows(self.arch_v, chosen, m)
            tail_visible[..., :rows] = usable.repeat_interleave(m, dim=2)

        mask = torch.cat([additive_mask(focal_hidden, dtype), agg_bias.to(dtype), additive_mask(ring_hidden, dtype),
                          additive_mask(~tail_visible, dtype)], dim=-1)
        query = q5.reshape(batch, heads * group, 1, dim).to(dtype)
        out = single_query_attention(query, self.ws_k, self.ws_v, scale=scale, key_mask=mask)
        if not all_valid:  # a row without a real new token may see nothing: 0/0
            out = out.nan_to_num(0.0)
        return out.view(batch, heads, group, 1, -1).to(self.cd)

    def _pack(self) -> None:
        """(Re)build the workspace of one-token PyTorch steps: the focal, aggregate and ring buffers become
        views of one [B, H, N, d] tensor for keys and one for values, followed by `tail` = E*m rows for the
        expanded blocks. Called when a buffer was reallocated (growth, refresh, chunked step, row selection);
        in-place writes to the buffers (new tokens, closed blocks) land in the workspace."""
        self.tail = self.expand * self.m
        for names, ws_name in ((PACKED[:3], "ws_k"), (PACKED[3:], "ws_v")):
            parts = [getattr(self, name) for name in names]
            batch, heads, _, dim = parts[0].shape
            ws = parts[0].new_zeros(batch, heads, sum(p.shape[2] for p in parts) + self.tail, dim)
            offset = 0
            for name, part in zip(names, parts):
                view = ws[:, :, offset : offset + part.shape[2]]
                view.copy_(part)
                setattr(self, name, view)
                offset += part.shape[2]
            setattr(self, ws_name, ws)
        self._packed = tuple(getattr(self, name) for name in PACKED)

    def _attend_fused(self, q5, pos_new, new: list[int], scale: float) -> torch.Tensor:
        """A one-token step in Triton kernels (ops/triton_decode.py): the same keys and rule as
        `_attend_packed`, read where they lie (no workspace, no copy of the expanded blocks), in two
        launches. q5 [B, H, G, 1, d] -> [B, H, G, 1, dv] in the compute dtype."""
        from .ops import triton_decode

        m, hi = self.m, self.focal_hi
        old_blocks = self._old_blocks(new)
        first_block = torch.div(pos_new[:, 0], m, rounding_mode="floor") - (self.n - 1)  # [B]
        query = q5[:, :, :, 0]
        agg_bias = self.agg_bias[:, :, :old_blocks]
        expanded = None
        if self.expand and old_blocks:
            chosen, usable, mask = self._expansion(q5, first_block, old_blocks, scale)
            expanded = (mask, chosen, usable, self.arch_k, self.arch_v)
        out = triton_decode.attend_step(
            query, (first_block * m).clamp(min=0),
            (self.focal_k[:, :, :hi], self.focal_v[:, :, :hi], self.focal_pos[:, :, :hi]),
            (self.agg_k[:, :, :old_blocks], self.agg_v[:, :, :old_blocks], agg_bias),
            expanded, (self.ring_k, self.ring_v, self.ring_pos), m, scale,
        )
        return out[:, :, :, None].to(self.cd)

    # ------------------------------------------------------------------------------------------ refresh

    def _probes(self, q5, counts):
        """The last min(r, a_b) real queries of the step: [B, H, G, P, d] and their step index [B, P]
        (-1 = no probe)."""
        probes = min(self.config.probe_queries, max(counts))
        a = torch.tensor(counts, device=q5.device)
        index = a[:, None] - probes + torch.arange(probes, device=q5.device)
        batch, heads, group, _, dim = q5.shape
        gathered = q5.gather(3, index.clamp(min=0).view(batch, 1, 1, probes, 1).expand(batch, heads, group, probes, dim))
        return gathered.to(self.cd), torch.where(index >= 0, index, -1)

    def _importance(self, probe_q, probe_pos, keys, key_pos, eligible, scale) -> torch.Tensor:
        """imp[b, h, j] = sum over the G heads and the probes of the probe's softmax over the eligible keys
        at positions <= the probe's. keys [B, H, N, d], key_pos [B, H, N] or [B, 1, N]."""
        hidden = (key_pos[:, :, None, :] > probe_pos[:, None, :, None]) | (probe_pos < 0)[:, None, :, None]
        hidden = hidden | ~eligible[:, :, None, :]  # [B, H|1, P, N]
        importance = []
        batch, _, group, probes, dim = probe_q.shape
        for h in range(keys.shape[1]):  # one kv head at a time bounds the [G, P, N] scores
            rows = probe_q[:, h].reshape(batch, group * probes, dim)  # keys are read once, not per head
            logits = (scale * rows @ keys[:, h].to(self.cd).transpose(-1, -2)).view(batch, group, probes, -1)
            mask = hidden[:, h if hidden.shape[1] > 1 else 0, None]
            weights = torch.softmax(logits.masked_fill_(mask, -math.inf), dim=-1).nan_to_num_(0.0)
            importance.append(weights.sum(dim=(1, 2)))
        return torch.stack(importance, dim=1)

    def _refresh(self, q5, old, counts, scale) -> None:
        if self.keep_archive:
            self._refresh_full(q5, old, counts, scale)
        else:
            self._refresh_compact(q5, old, counts, scale)
        self.dense_rows = [self._is_dense(t) for t in self.lengths]

    def _refresh_full(self, q5, old, counts, scale) -> None:
        """keep_full: re-select F over every cached token, recompute every complete block's aggregate."""
        device, m = q5.device, self.m
        batch, heads = q5.shape[:2]
        lengths = torch.tensor(self.lengths, device=device)
        top = max(self.lengths)
        positions = torch.arange(top, device=device)
        real = positions[None, :] < lengths[:, None]  # [B, T]
        probe_q, probe_index = self._probes(q5, counts)
        probe_pos = torch.where(probe_index >= 0, torch.tensor(old, device=device)[:, None] + probe_index, -1)
        keys = self.arch_k[:, :, :top]
        score = self._importance(probe_q, probe_pos, keys, positions.view(1, 1, -1), real[:, None, :], scale)
        budget = torch.tensor([self._budget(t) for t in self.lengths], device=device).view(batch, 1, 1)
        eligible = real[:, None, :].expand(batch, heads, top)
        sink = (positions < self.config.sink_tokens).view(1, 1, -1)
        skip = [a == 0 for a in counts]
        if any(skip):  # rows without a new token keep their F
            was_focal = torch.zeros(batch, heads, top + 1, dtype=torch.bool, device=device)
            was_focal = was_focal.scatter_(2, self.focal_pos[:, :, : self.focal_hi].clamp(max=top), True)[..., :top]
            keep = torch.tensor(skip, device=device).view(batch, 1, 1)
            score = torch.where(keep, torch.where(was_focal, math.inf, -math.inf), score)
            budget = torch.where(keep, self.focal_cnt[..., None], budget)
        focal = _select(score, eligible, sink, budget, None)
        previous = torch.zeros(batch, heads, top + 1, dtype=torch.bool, device=device)
        previous.scatter_(2, self.focal_pos[:, :, : self.focal_hi].clamp(max=top), True)
        previous = previous[..., :top]

        # the focal buffer, positions ascending (slot = number of focal tokens before it)
        count = focal.sum(-1)
        slots = int(count.max())
        spare = GROWTH_STEP if any(self._is_dense(t) for t in self.lengths) else 0
        slot = torch.where(focal, focal.cumsum(-1) - 1, slots + spare)  # unselected -> a scratch slot
        focal_pos = torch.full((batch, heads, slots + spare + 1), SENTINEL, dtype=torch.long, device=device)
        focal_pos = focal_pos.scatter_(2, slot, positions.expand(batch, heads, top))[..., : slots + spare]
        index = focal_pos[..., :slots].clamp(max=top - 1)
        self.focal_pos = focal_pos
        self.focal_k = _grow(_gather_rows(self.arch_k, index), 2, slots + spare, exact=True)
        self.focal_v = _grow(_gather_rows(self.arch_v, index), 2, slots + spare, exact=True)
        self.focal_cnt, self.focal_hi = count, slots

        # aggregates: only the complete blocks whose membership changed (the others are unchanged)
        num_blocks = top // m
        if num_blocks:
            span = num_blocks * m
            flipped = (focal[..., :span] != previous[..., :span]).view(batch, heads, num_blocks, m).any(-1)
            flipped &= ((torch.arange(num_blocks, device=device) + 1) * m <= lengths[:, None])[:, None, :]
            b_idx, h_idx, c_idx = flipped.nonzero(as_tuple=True)
            if b_idx.numel():
                item = (b_idx * heads + h_idx) * (self.arch_k.shape[2] // m) + c_idx
                keys, values = _take_items(self.arch_k, item, m), _take_items(self.arch_v, item, m)  # [N, m, d]
                members = ~focal[..., :span].view(batch, heads, num_blocks, m)[b_idx, h_idx, c_idx]
                qbar = self.qbar[b_idx, h_idx, c_idx]
                agg_k, agg_v, lse, cnt = _aggregate(qbar[:, None], keys[:, None], values[:, None], members[:, None], scale)
                self.agg_k[b_idx, h_idx, c_idx] = agg_k[:, 0].to(self.agg_k.dtype)
                self.agg_v[b_idx, h_idx, c_idx] = agg_v[:, 0].to(self.agg_v.dtype)
                self.agg_lse[b_idx, h_idx, c_idx] = lse[:, 0]
                self.agg_cnt[b_idx, h_idx, c_idx] = cnt[:, 0]
                self.agg_bias[b_idx, h_idx, c_idx] = self._bias(lse[:, 0], cnt[:, 0])
        gather = self.ring_pos.clamp(min=0, max=top - 1)[:, None, :].expand(batch, heads, -1)
        self.ring_focal = focal.gather(2, gather) & (self.ring_pos >= 0)[:, None, :]

    def _refresh_compact(self, q5, old, counts, scale) -> None:
        """compact: re-rank the held raw tokens (F and the local window of the step's last token); focal
        tokens dropped from F in old blocks are folded into their block's aggregate; the aggregates of the
        window's complete blocks are recomputed from the ring."""
        device, m, n, window = q5.device, self.m, self.n, self.window
        batch, heads = q5.shape[:2]
        lengths = torch.tensor(self.lengths, device=device)
        last_block = torch.div(lengths - 1, m, rounding_mode="floor")  # [B]
        limit = (last_block - n)[:, None, None]  # old blocks <= limit
        slots = self.focal_hi
        focal_pos = self.focal_pos[:, :, :slots]
        ring_pos = self.ring_pos[:, None, :].expand(batch, heads, window)
        in_window = (ring_pos >= 0) & (torch.div(ring_pos, m, rounding_mode="floor") > limit)
        from_ring = in_window & ~self.ring_focal
        cand_pos = torch.cat([focal_pos, torch.where(from_ring, ring_pos, SENTINEL)], dim=2)
        cand_k = torch.cat([self.focal_k[:, :, :slots], self.ring_k], dim=2)
        cand_v = torch.cat([self.focal_v[:, :, :slots], self.ring_v], dim=2)
        eligible = cand_pos < SENTINEL

        probe_q, probe_index = self._probes(q5, counts)
        probe_pos = torch.where(probe_index >= 0, torch.tensor(old, device=device)[:, None] + probe_index, -1)
        score = self._importance(probe_q, probe_pos, cand_k, cand_pos, eligible, scale)
        budget = torch.tensor([self._budget(t) for t in self.lengths], device=device).view(batch, 1, 1)
        skip = [a == 0 for a in counts]
        if any(skip):  # rows without a new token keep their F
            keep = torch.tensor(skip, device=device).view(batch, 1, 1)
            was_focal = torch.cat([eligible[..., :slots], torch.zeros_like(from_ring)], dim=2)
            score = torch.where(keep, torch.where(was_focal, math.inf, -math.inf), score)
            budget = torch.where(keep, self.focal_cnt[..., None], budget)
        sink = cand_pos < self.config.sink_tokens
        chosen = _select(score, eligible, sink, budget, cand_pos)

        # demoted focal tokens of old blocks join their block's aggregate (exactly, through its lse)
        demoted = eligible[..., :slots] & ~chosen[..., :slots]
        fold = demoted & (torch.div(focal_pos, m, rounding_mode="floor") <= limit)
        if bool(fold.any()):
            self._fold(fold, focal_pos, self.focal_k[:, :, :slots], self.focal_v[:, :, :slots], self.focal_logit[:, :, :slots])

        # the new focal buffer, positions ascending
        count = chosen.sum(-1)
        kept = int(count.max())
        order = torch.where(chosen, cand_pos, SENTINEL).sort(dim=-1)
        index = order.indices[..., :kept]
        spare = GROWTH_STEP if any(self._is_dense(t) for t in self.lengths) else 0
        self.focal_pos = _grow(order.values[..., :kept], 2, kept + spare, SENTINEL, exact=True)
        self.focal_k = _grow(_gather_rows(cand_k, index), 2, kept + spare, exact=True)
        self.focal_v = _grow(_gather_rows(cand_v, index), 2, kept + spare, exact=True)
        # logits of the ring candidates: from the q_bar ring when their block is complete, else NaN
        ring_block = torch.div(ring_pos.clamp(min=0), m, rounding_mode="floor")
        ring_qbar = _gather_rows(self.qbar, ring_block % n)
        ring_logit = scale * (self.ring_k.to(self.cd) * ring_qbar).sum(-1)
        ring_logit = torch.where((ring_block + 1) * m <= lengths[:, None, None], ring_logit, math.nan)
        cand_logit = torch.cat([self.focal_logit[:, :, :slots], ring_logit], dim=2)
        self.focal_logit = _grow(cand_logit.gather(2, index), 2, kept + spare, math.nan, exact=True)
        self.focal_cnt, self.focal_hi = count, kept

        # ring membership: ring candidates chosen, or focal entries still chosen whose position is in the ring
        slot = focal_pos.clamp(max=SENTINEL - 1) % window
        hit = chosen[..., :slots] & (self.ring_pos.gather(1, slot.view(batch, -1)).view_as(slot) == focal_pos)
        marks = torch.zeros(batch, heads, window, dtype=torch.int32, device=device).scatter_add_(2, slot, hit.int())
        self.ring_focal = (marks > 0) | chosen[..., slots:]

        # the complete blocks of the local window: aggregates from the ring with the new membership
        pairs = [
            (b, c) for b, t in enumerate(self.lengths) for c in range(max(0, (t - 1) // m - n + 1), (t - 1) // m + 1)
            if (c + 1) * m <= t
        ]
        if pairs:
            rows = torch.tensor([b for b, _ in pairs], device=device)
            blocks = torch.tensor([c for _, c in pairs], device=device)
            index = (blocks % n)[:, None] * m + torch.arange(m, device=device)  # ring slots of the block
            keys = self.ring_k[rows[:, None], :, index].transpose(1, 2)  # [N, H, m, d]
            values = self.ring_v[rows[:, None], :, index].transpose(1, 2)
            held = self.ring_pos[rows[:, None], index] == blocks[:, None] * m + torch.arange(m, device=device)
            members = ~self.ring_focal[rows[:, None], :, index].transpose(1, 2) & held[:, None, :]
            qbar = self.qbar[rows, :, blocks % n]
            agg_k, agg_v, lse, cnt = _aggregate(qbar[:, :, None], keys[:, :, None], values[:, :, None], members[:, :, None], scale)
            self.agg_k[rows, :, blocks] = agg_k[:, :, 0].to(self.agg_k.dtype)
            self.agg_v[rows, :, blocks] = agg_v[:, :, 0].to(self.agg_v.dtype)
            self.agg_lse[rows, :, blocks] = lse[:, :, 0]
            self.agg_cnt[rows, :, blocks] = cnt[:, :, 0]
            self.agg_bias[rows, :, blocks] = self._bias(lse[:, :, 0], cnt[:, :, 0])

    def _fold(self, fold, focal_pos, focal_k, focal_v, focal_logit) -> None:
        """Add the `fold` tokens to their blocks' aggregates: the result is the aggregate (spec step 4) over
        the block's previous members and these tokens, from K_hat, V_hat, the block's lse and each token's
        logit s * q_bar_c . k_j (recorded when its block closed)."""
        m = self.m
        blocks = torch.div(focal_pos.clamp(max=SENTINEL - 1), m, rounding_mode="floor").clamp(max=self.agg_lse.shape[2] - 1)
        blocks = torch.where(fold, blocks, 0)
        keys, values = focal_k.to(self.cd), focal_v.to(self.cd)
        logits = focal_logit.masked_fill(~fold, -math.inf)  # [B, H, F]
        lse = self.agg_lse
        peak = lse.scatter_reduce(2, blocks, logits, reduce="amax")  # [B, H, NB]
        peak_safe = torch.where(torch.isfinite(peak), peak, 0.0)
        old_weight = torch.exp(lse - peak_safe)  # 0 for an empty block
        new_weight = torch.exp(logits - peak_safe.gather(2, blocks)).masked_fill(~fold, 0.0)
        total = old_weight + torch.zeros_like(lse).scatter_add_(2, blocks, new_weight)
        agg_k = old_weight[..., None] * self.agg_k.to(self.cd)
        agg_k = agg_k.scatter_add_(2, blocks[..., None].expand_as(keys), new_weight[..., None] * keys)
        agg_v = old_weight[..., None] * self.agg_v.to(self.cd)
        agg_v = agg_v.scatter_add_(2, blocks[..., None].expand_as(values), new_weight[..., None] * values)
        changed = torch.zeros(lse.shape, dtype=torch.int32, device=lse.device).scatter_add_(2, blocks, fold.int()) > 0
        denominator = total.clamp(min=torch.finfo(total.dtype).tiny)[..., None]
        self.agg_k = torch.where(changed[..., None], (agg_k / denominator).to(self.agg_k.dtype), self.agg_k)
        self.agg_v = torch.where(changed[..., None], (agg_v / denominator).to(self.agg_v.dtype), self.agg_v)
        self.agg_lse = torch.where(changed, peak_safe + total.log(), lse)
        added = torch.zeros_like(self.agg_cnt).scatter_add_(2, blocks, fold.to(self.agg_cnt.dtype))
        self.agg_cnt = self.agg_cnt + added
        self.agg_bias = self._bias(self.agg_lse, self.agg_cnt)


def _ws_index(pos: torch.Tensor, start: torch.Tensor, window: int, chunk: bool) -> torch.Tensor:
    """Index in the step's raw workspace of `pos` (compacted positions of the rows whose first new
    position is `start`, broadcastable): the ring (slot = pos % W), then, for a chunk, its tokens."""
    if not chunk:
        return pos % window
    return torch.where(pos >= start, window + pos - start, pos % window)


# ---------------------------------------------------------------------------------------------- the cache


class DGALayer(_LayerBase):
    """One layer of a DGACache: a DynamicLayer whose storage is a DGADecodeState."""

    is_sliding = False
    is_croppable = False
    is_compileable = False

    def __init__(self, options: DecodingConfig | None = None, shared: dict | None = None):
        if _LayerBase is not object:
            super().__init__()
        self.keys = self.values = None
        self.is_initialized = False
        self._options = (options, shared)
        self.state = DGADecodeState(*self._options)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self.state.update(key_states, value_states)

    def get_seq_length(self) -> int:
        return self.state.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.state.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.state = DGADecodeState(*self._options)
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("a DGACache cannot be cropped (assisted generation / rollback): use a DynamicCache")

    def offload(self) -> None:  # the state stays where it is
        return None

    def prefetch(self) -> None:
        return None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.state.select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not isinstance(indices, torch.Tensor):
            indices = torch.as_tensor(indices)
        if indices.dtype == torch.bool:
            indices = indices.nonzero().flatten()
        self.state.select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state.ready:
            rows = torch.arange(len(self.state.lengths)).repeat_interleave(repeats)
            self.state.select_rows(rows)

    @property
    def batch_size(self) -> int:
        return len(self.state.lengths) if self.state.ready else -1


class DGACache(DynamicCache):
    """A DynamicCache for models patched with DGA: decoding steps attend to the focal tokens, the block
    aggregates and the local window instead of the whole cache (docs/decoding.md).

        cache = dga_hf.DGACache(model)                       # keep_full, 64 expanded blocks per step
        cache = dga_hf.DGACache(model, mode="compact")       # also drops what DGA does not read
        model.generate(ids, past_key_values=cache, ...)      # `cache=` on transformers >= 5.x

    Args:
        model_or_config: the model (or its config), to create one layer per decoder layer up front; None
            creates layers as they are first used.
        options: a `DecodingConfig` (default: its defaults); keyword arguments (its fields: mode,
            refresh_every, expand_blocks, dense_share) override it.
    """

    def __init__(self, model_or_config: Any = None, options: DecodingConfig | None = None, **fields: Any):
        self.options = (options or DecodingConfig()).replace(**fields)
        self._shared: dict = {}
        config = getattr(model_or_config, "config", model_or_config)
        layers = None
        if config is not None:
            text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
            layers = getattr(text, "num_hidden_layers", None)
        self._factory = functools.partial(DGALayer, self.options, self._shared)
        if _LayerBase is object:  # pragma: no cover - transformers 4.53
            DynamicCache.__init__(self)
            self.layers = [self._factory() for _ in range(layers or 0)]
            self.layer_class_to_replicate = self._factory
        elif layers:
            super(DynamicCache, self).__init__(layers=[self._factory() for _ in range(layers)])
        else:
            super(DynamicCache, self).__init__(layer_class_to_replicate=self._factory)

    # Overridden at the cache level so the same code serves every supported transformers version.
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(self._factory())
        return self.layers[layer_idx].update(key_states, value_states)

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        layer_idx = layer_idx or 0
        return self.layers[layer_idx].get_seq_length() if layer_idx < len(self.layers) else 0

    def get_mask_sizes(self, query_length: Any, layer_idx: int = 0) -> tuple[int, int]:
        if isinstance(query_length, torch.Tensor):  # transformers < 5: the cache positions
            query_length = query_length.shape[0]
        return self.get_seq_length(layer_idx) + int(query_length), 0

    def get_max_cache_shape(self) -> int | None:  # transformers < 5
        return None

    def __len__(self) -> int:
        return len(self.layers)

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for layer in self.layers:
            layer.reorder_cache(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for layer in self.layers:
            layer.batch_select_indices(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for layer in self.layers:
            layer.batch_repeat_interleave(repeats)

    def crop(self, tokens_to_remove: int) -> None:
        for layer in self.layers:
            layer.crop(tokens_to_remove)

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return False

    def kv_bytes(self) -> int:
        """Bytes held by every layer's state (allocated capacity, all buffers included)."""
        return sum(layer.state.nbytes() for layer in self.layers)

    def __iter__(self):
        for layer in self.layers:
            yield layer.keys, layer.values, None

    def __repr__(self) -> str:
        return f"DGACache({self.options!r}, layers={len(self.layers)})"


# ---------------------------------------------------------------------------------------------- generate()

_HOOK = "_prepare_cache_for_generation"
_OPTIONS = "_dga_decoding"


def enable_decoding(model: Any, options: DecodingConfig | None = None, **fields: Any) -> Any:
    """Make `model.generate()` decode with a `DGACache(model, options)` whenever the model is patched and
    generate would otherwise create a plain DynamicCache (opt-in: `dga_hf.patch` alone keeps decoding
    dense). `options`: a `DecodingConfig` (default: its defaults); keyword arguments (its fields) override
    it. A cache passed by the caller is always kept as is; assisted generation (which needs a croppable
    cache) and static/quantized/offloaded caches are left alone.

    Transformers has no public hook for the cache class generate() creates (`cache_implementation` only
    accepts its own names), so this wraps the model instance's `_prepare_cache_for_generation`: the wrapper
    calls the original and then swaps the DynamicCache it created. Nothing changes at class level."""
    model.__dict__[_OPTIONS] = (options or DecodingConfig()).replace(**fields)
    hook = model.__dict__.get(_HOOK)
    if not (isinstance(hook, types.MethodType) and hook.__func__ is _prepare_cache_hook):
        model.__dict__[_HOOK] = types.MethodType(_prepare_cache_hook, model)
    return model


def disable_decoding(model: Any) -> Any:
    """Undo `enable_decoding`: generate() creates the model's usual DynamicCache again (dense decoding)."""
    model.__dict__.pop(_HOOK, None)
    model.__dict__.pop(_OPTIONS, None)
    return model


def decoding_options(model: Any) -> DecodingConfig | None:
    """The `DecodingConfig` `enable_decoding` set on `model`, or None."""
    return model.__dict__.get(_OPTIONS)


def cache_for(model: Any) -> "DGACache | None":
    """A fresh DGACache with the options `enable_decoding` set on `model`, or None when the model is not
    patched or DGA decoding is disabled. For loops that call `model(...)` themselves instead of generate():
    ``model(ids, cache=dga_hf.decoding.cache_for(model), use_cache=True)`` (None: the model's DynamicCache)."""
    options = model.__dict__.get(_OPTIONS)
    if options is None or getattr(model.config, "_attn_implementation", None) != "dga":
        return None
    return DGACache(model, options)


def cache_keyword(model: Any) -> str:
    """The name under which `model(...)` takes a KV cache: `cache` since transformers renamed
    `past_key_values` (4.x has only the old name)."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def dense_cache(model: Any) -> DynamicCache:
    """An empty DynamicCache for `model` (transformers 5 builds it from the model's config; 4.x takes none)."""
    if "config" in inspect.signature(DynamicCache.__init__).parameters:
        return DynamicCache(config=model.config)
    return DynamicCache()


def cache_nbytes(cache: Any) -> int:
    """Bytes of keys/values a cache holds: a DGACache's whole state (`DGACache.kv_bytes`), else the
    tensors of every layer of a DynamicCache."""
    if isinstance(cache, DGACache):
        return cache.kv_bytes()
    if hasattr(cache, "layers"):
        tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    else:  # transformers < 4.54: key_cache / value_cache lists
        tensors = [*cache.key_cache, *cache.value_cache]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _assisted(args: tuple, kwargs: dict) -> bool:
    try:
        from transformers.generation.configuration_utils import GenerationMode
    except ImportError:  # pragma: no cover
        GenerationMode = None
    for value in (*args, *kwargs.values()):
        if GenerationMode is not None and isinstance(value, GenerationMode) and "ASSISTED" in value.name:
            return True
        if isinstance(value, torch.nn.Module):  # transformers < 5 passes the assistant model
            return True
    return False


def _prepare_cache_hook(self, generation_config, model_kwargs, *args, **kwargs):
    names = ("cache", "past_key_values")
    before = {name: model_kwargs.get(name) for name in names}
    result = type(self)._prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs)
    options = self.__dict__.get(_OPTIONS)
    if options is None or getattr(self.config, "_attn_implementation", None) != "dga":
        return result
    if getattr(generation_config, "is_assistant", False) or _assisted(args, kwargs):
        return result
    for name in names:
        cache = model_kwargs.get(name)
        if type(cache) is DynamicCache and cache is not before[name]:  # created by generate, not passed in
            model_kwargs[name] = DGACache(self, options)
    return result
