"""Naive float64 transcription of the keys docs/spec.md step 6 scores a block by, for one block: shared by
the prefill (`prefill.py`) and decoding (`decoding.py`) transcriptions, independent of the layout's batched
`block_score_keys` / `principal_ends` that the backends use."""

from __future__ import annotations

import torch


def block_score_keys(member_keys: torch.Tensor, aggregate_key: torch.Tensor, expand_score: str) -> torch.Tensor:
    """The keys [S, d] whose largest logit max_g s*Q[g,i].P is query i's score of a block with members
    `member_keys` [N, d] (N >= 1) and aggregate K_hat_c `aggregate_key` [d]:
    - "aggregate": K_hat_c alone;
    - "principal": the two ends of the members' projection on their principal axis, mu_c + (max_j a_j) u_c and
      mu_c + (min_j a_j) u_c, with mu_c the unweighted mean of the members, u_c a unit eigenvector of the
      largest eigenvalue of sum_j (K_j - mu_c)(K_j - mu_c)^T (found through the N x N Gram matrix of the
      centred members: u_c = cen^T v / |cen^T v| for its top eigenvector v) and a_j = (K_j - mu_c) . u_c."""
    if expand_score == "aggregate":
        return aggregate_key[None]
    mean = member_keys.mean(0)
    centred = member_keys - mean
    top = torch.linalg.eigh(centred @ centred.T).eigenvectors[:, -1]  # eigenvalues ascend: the largest is last
    axis = centred.T @ top
    if axis.norm() > 0:  # else the members do not spread (one member): both ends are the mean
        axis = axis / axis.norm()
    along = centred @ axis
    return torch.stack([mean + along.max() * axis, mean + along.min() * axis])
