"""`DGADecodeState`, the DGA decode state of one layer: it receives the layer's new tokens (`update`) and
computes their attention (`attend`): the prefill through the one dispatch of `ops/dispatch.py`, then
decoding steps and chunks by the rule of docs/decoding.md. It orchestrates; the work lives in
`buffers.py` (tensors), `storage.py` (keep_full / compact), `blocks.py`, `refresh.py` and `steps.py`."""

from __future__ import annotations

import torch

from ..config import DecodingConfig, DGAConfig
from ..ops import dispatch
from ..ops.layout import compact_padding, uncompact
from . import steps
from .blocks import close_blocks, prefill_blocks
from .buffers import DecodeBuffers, NewTokens, PrefillCapacity, Rows, block_slots, nbytes
from .settings import DecodeSettings
from .storage import ArchiveStorage, CompactStorage, storage_for

# one-token steps on the Triton backend run its decode kernels in these dtypes (float64 has no kernel)
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class DGADecodeState:
    """The decode state of one layer, for B rows and H kv heads, each row in compacted coordinates (its real
    tokens at 0..t-1; padding is never stored). Until the prefill only the cache-side counters exist;
    the prefill creates `settings`, `rows`, `buffers` and `storage`."""

    def __init__(self, options: DecodingConfig | None = None, shared: dict | None = None):
        self.options = options or DecodingConfig()
        self.shared = {} if shared is None else shared  # per cache: the new-token counts of the current step
        self.seen = 0  # absolute cache length, padding included (what Transformers sees)
        self.pending = 0  # tokens `update` returned that `attend` has not read yet
        self.settings: DecodeSettings | None = None
        self.rows: Rows | None = None
        self.buffers: DecodeBuffers | None = None
        self.storage: ArchiveStorage | CompactStorage | None = None
        self.since_refresh = 0
        self.fused = False  # one-token steps run the Triton decode kernels

    @property
    def ready(self) -> bool:
        """Whether the prefill has run."""
        return self.buffers is not None

    @property
    def batch_size(self) -> int:
        return len(self.rows.lengths) if self.ready else -1

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
        self.buffers.select_rows(index)
        self.storage.select_rows(index)
        self.rows.select(index.tolist())

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the state holds (none before its prefill); they live on the layer's device."""
        if not self.ready:
            return []
        return [tensor for tensor in (*self.buffers.held(), *self.storage.held()) if tensor is not None]

    def nbytes(self) -> int:
        """Bytes of every tensor the state holds (allocated capacity; the workspace and its views once)."""
        return nbytes(self.tensors())

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

    def _prefill(self, query, key, value, padding_mask, config: DGAConfig, scale: float, dense_layer: bool) -> torch.Tensor:
        """The prompt's attention (dense where the row is: an all-focal layer, or shorter than
        min_seq_len), then the state from its selection."""
        settings = DecodeSettings.resolve(self.options, config, dense_layer, query.dtype)
        prefill = dispatch.prefill(query, key, value, config, scale=scale, padding_mask=padding_mask,
                                   dense=settings.is_dense(query.shape[2]), keep_selection=True)
        # the decode kernels expand blocks, which the prefill kernel does not yet: with expand_blocks > 0,
        # backend "auto" runs the prefill on PyTorch and the one-token steps still in the kernels
        decode_backend = dispatch.resolve_backend(config.backend, query.device)
        self.fused = decode_backend == "triton" and query.dtype in FUSED_DTYPES
        with torch.no_grad():
            lengths = prefill.lengths.tolist()
            self.rows = Rows(lengths, [settings.is_dense(t) for t in lengths])
            blocks = prefill_blocks(prefill, settings.group_size, scale, settings.compute_dtype, settings.principal_score)
            capacity = PrefillCapacity.of(query.shape[2], settings.group_size)
            self.buffers = DecodeBuffers(prefill, blocks, self.rows.dense, settings.window, config.group_bias, capacity)
            self.storage = storage_for(settings, prefill, blocks, self.buffers, scale, capacity)
        self.settings = settings
        self.since_refresh = 0
        return prefill.output

    # ------------------------------------------------------------------------------------------ decode / chunk

    def _step(self, query, key, value, padding_mask, scale: float) -> torch.Tensor:
        """A decoding step or a chunk: store the new tokens, close the blocks they complete, attend, keep the
        ring, and refresh F when it is due."""
        settings, buffers, storage = self.settings, self.buffers, self.storage
        tokens = self._new_tokens(query, key, value, padding_mask)
        any_dense = any(self.rows.dense)
        blocks = block_slots(max(tokens.new), settings.group_size)
        focal_slots = buffers.focal_hi + tokens.size if any_dense else None
        buffers.ensure_capacity(blocks, focal_slots, max(tokens.new))
        storage.ensure_capacity(blocks, tokens, focal_slots)
        storage.append(tokens)
        if any_dense:  # rows still dense (below min_seq_len, or an all-focal layer): new tokens join F
            storage.new_focal_slots(buffers.append_focal(tokens, self.rows.dense))
        raw = buffers.raw_keys(tokens)
        closed = close_blocks(buffers, tokens, raw, settings.group_size, scale, settings.compute_dtype)
        if closed is not None:
            storage.record_closed(closed, buffers, tokens, scale)

        out = self._attend_new(tokens, raw, scale).reshape(*query.shape[:3], -1)
        if not tokens.all_valid:
            out = out * tokens.valid[:, None, :, None]
        out = uncompact(out, tokens.order).to(query.dtype)

        if tokens.size > 1:  # the ring keeps the last W positions of every row
            buffers.refill_ring(torch.tensor(tokens.new, device=query.device), tokens.start, raw)
        self.rows.advance(tokens.new, tokens.start + tokens.size if tokens.all_valid else None)
        self.since_refresh += tokens.size
        if settings.refresh_every and self.since_refresh >= settings.refresh_every:
            self.rows.dense = [settings.is_dense(t) for t in self.rows.lengths]
            storage.refresh(buffers, self.rows, tokens, scale)
            self.since_refresh = 0
        return out

    def _attend_new(self, tokens: NewTokens, raw, scale: float) -> torch.Tensor:
        """Which attention a step takes: chunks the chunk SDPA; one-token steps a dense step where the rule
        says so (keep_full), else the Triton kernels or the packed PyTorch step."""
        settings = self.settings
        if tokens.size > 1:
            return steps.attend_chunk(self.buffers, self.storage, settings, tokens, raw, scale)
        if settings.dense_share is not None and steps.reads_most_keys(settings, self.buffers.focal_hi, tokens.new):
            return steps.attend_dense(self.storage, settings, tokens, scale)
        if self.fused:
            return steps.attend_fused(self.buffers, self.storage, settings, tokens, scale)
        return steps.attend_packed(self.buffers, self.storage, settings, tokens, scale)

    def _new_tokens(self, query, key, value, padding_mask) -> NewTokens:
        batch, q_heads, q_len, head_dim = query.shape
        heads = key.shape[1]
        counts = self._new_token_counts(padding_mask, q_len)
        order = None
        if counts is None:
            counts = [q_len] * batch
        else:
            query, key, value, _, order = compact_padding(query, key, value, padding_mask[:, -q_len:].to(torch.bool))
        device = query.device
        start, dense = self.rows.on_device(device)
        offsets = torch.arange(q_len, device=device)
        all_valid = all(count == q_len for count in counts)
        if all_valid:
            valid = torch.ones(batch, q_len, dtype=torch.bool, device=device)
        else:
            valid = offsets[None, :] < torch.tensor(counts, device=device)[:, None]
        old = self.rows.lengths
        return NewTokens(
            query=query.reshape(batch, heads, q_heads // heads, q_len, head_dim), key=key, value=value, order=order,
            counts=counts, old=old, new=[t + a for t, a in zip(old, counts)], start=start, dense=dense,
            positions=start[:, None] + offsets, valid=valid, all_valid=all_valid,
            uniform=all_valid and len(set(old)) == 1,
        )

    def _new_token_counts(self, padding_mask: torch.Tensor | None, q_len: int) -> list[int] | None:
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
