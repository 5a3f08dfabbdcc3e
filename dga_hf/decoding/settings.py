"""What a decode state's prefill fixes for the rest of its life: the layer's DGA settings and the decoding
options, resolved for this layer (docs/decoding.md)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import rule
from ..config import DecodingConfig, DGAConfig
from ..ops.layout import compute_dtype, scores_principal


def every_token_focal(config: DGAConfig, dense_layer: bool) -> bool:
    """Whether every selection of a layer takes every token (docs/decoding.md, "Exact settings"): a layer
    of `dense_layers`, or focal_ratio = 1 (budget(t) = t for every t). Its new tokens join F at once, as a
    dense row's do, so that a token leaving the window before the next refresh is not aggregated."""
    return dense_layer or config.focal_ratio >= 1


@dataclass(frozen=True)
class DecodeSettings:
    config: DGAConfig
    all_focal: bool  # every token is focal for good, nothing is re-selected (`every_token_focal`)
    keep_archive: bool  # keep_full where something is re-selected (an all-focal layer needs no archive)
    expand: int  # E, DGAConfig.expand_blocks: old blocks each query reads raw (keep_full; 0 without an archive)
    refresh_every: int  # tokens between refreshes; 0 = never
    dense_share: float | None  # keep_full: a one-token step that would read this share of the keys is dense
    compute_dtype: torch.dtype  # of q_bar, logits and aggregates before they are stored

    @classmethod
    def resolve(cls, options: DecodingConfig, config: DGAConfig, dense_layer: bool, dtype: torch.dtype) -> DecodeSettings:
        options.check_model_settings(config)
        all_focal = every_token_focal(config, dense_layer)
        keep_archive = options.mode == "keep_full" and not all_focal
        # an all-focal layer aggregates nothing, so it has no block to expand
        expand = config.expand_blocks if keep_archive else 0
        window = config.group_size * config.local_blocks
        if options.refresh_every == "auto":
            every = rule.refresh_interval(config.group_size, window if expand else 0)
        else:
            every = options.refresh_every or 0
        return cls(
            config=config,
            all_focal=all_focal,
            keep_archive=keep_archive,
            expand=expand,
            refresh_every=0 if all_focal else every,
            dense_share=options.dense_step_share if keep_archive else None,
            compute_dtype=compute_dtype(dtype),
        )

    @property
    def principal_score(self) -> bool:
        """Whether expansion scores blocks by their principal ends (docs/spec.md step 6): E > 0 here and
        expand_score="principal". Only then do the buffers hold them."""
        return scores_principal(self.expand, self.config.expand_score)

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
        return self.all_focal or length < self.config.min_seq_len
