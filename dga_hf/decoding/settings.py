"""What a decode state's prefill fixes for the rest of its life: the layer's DGA settings and the decoding
options, resolved for this layer (docs/decoding.md)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import rule
from ..config import DecodingConfig, DGAConfig
from ..ops.layout import compute_dtype


@dataclass(frozen=True)
class DecodeSettings:
    config: DGAConfig
    dense_layer: bool  # a layer of `dense_layers`: every token is focal, nothing is re-selected
    keep_archive: bool  # keep_full on a DGA layer (a dense layer has nothing to re-select: no archive)
    expand: int  # old blocks a keep_full one-token step reads raw instead of their aggregates
    refresh_every: int  # tokens between refreshes; 0 = never
    dense_share: float | None  # keep_full: a one-token step that would read this share of the keys is dense
    compute_dtype: torch.dtype  # of q_bar, logits and aggregates before they are stored

    @classmethod
    def resolve(cls, options: DecodingConfig, config: DGAConfig, dense_layer: bool, dtype: torch.dtype) -> DecodeSettings:
        keep_archive = options.mode == "keep_full" and not dense_layer
        expand = options.expanded_blocks if keep_archive else 0
        window = config.group_size * config.local_blocks
        if options.refresh_every == "auto":
            every = rule.refresh_interval(config.group_size, window if expand else 0)
        else:
            every = options.refresh_every or 0
        return cls(
            config=config,
            dense_layer=dense_layer,
            keep_archive=keep_archive,
            expand=expand,
            refresh_every=0 if dense_layer else every,
            dense_share=options.dense_step_share if keep_archive else None,
            compute_dtype=compute_dtype(dtype),
        )

    @property
    def group_size(self) -> int:
        return self.config.group_size

    @property
    def local_blocks(self) -> int:
        return self.config.local_blocks

    @property
    def window(self) -> int:
        """The ring's slots: the local window of n blocks of m tokens."""
        return self.config.group_size * self.config.local_blocks

    def is_dense(self, length: int) -> bool:
        """Whether a row of `length` real tokens attends densely (every token focal)."""
        return self.dense_layer or length < self.config.min_seq_len
