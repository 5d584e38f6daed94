"""Gradient accumulation with a whole-batch normaliser.

Delta-L (and every other aggregation) normalises over the whole optimizer batch: all micro-batches
of gradient accumulation and all data-parallel ranks. The recipe:

1. before the first micro-batch, collect the scored length L_i of every sequence of every
   micro-batch of this optimizer step (``dk.packing.scored_lengths`` or ``mask.sum(1)``);
2. compute the weights once for all of them (``accumulation_weights``; with ``group=`` the
   statistics are all-reduced over the ranks, once per step);
3. run each micro-batch with ``dk.policy_loss(..., weights=weights[k])`` and call ``backward()``
   on its loss as it is: no division by the number of micro-batches, the weights already sum the
   micro-batches up to the whole-batch loss.

Then the accumulated gradient equals the gradient of one call on the whole batch.
"""
from __future__ import annotations

from typing import List, Sequence

import torch

from ..aggregation import sequence_weights


def accumulation_weights(micro_batch_lengths: Sequence[torch.Tensor], agg: str = "delta-l", *,
                         alpha: float = 1.0, max_len: int | None = None, group=None,
                         grad_reduction: str = "mean", dtype: torch.dtype | None = None) -> List[torch.Tensor]:
    """Weights of the whole optimizer batch, split back into one [S_k] tensor per micro-batch.

    micro_batch_lengths: for each micro-batch k, the [S_k] scored lengths of its sequences.
    The other arguments are those of ``dk.sequence_weights``; the result's k-th entry is the
    ``weights=`` argument of micro-batch k's ``dk.policy_loss`` call.
    """
    if isinstance(micro_batch_lengths, torch.Tensor) or len(micro_batch_lengths) == 0:
        raise ValueError("micro_batch_lengths: expected a non-empty list of [S_k] length tensors, one per micro-batch")
    sizes = [int(lengths.shape[0]) if isinstance(lengths, torch.Tensor) and lengths.dim() == 1 else -1
             for lengths in micro_batch_lengths]
    if -1 in sizes:
        raise ValueError("micro_batch_lengths: every entry must be a 1-D integer tensor of scored lengths")
    weights = sequence_weights(torch.cat(list(micro_batch_lengths)), agg, alpha=alpha, max_len=max_len,
                               group=group, grad_reduction=grad_reduction, dtype=dtype)
    return list(weights.split(sizes))
