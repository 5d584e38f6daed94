"""Getting a trainer's batch into the packed form and back.

Packed form: S sequences back to back in N rows, no padding; ``cu_seqlens`` [S+1] marks sequence i
as rows cu_seqlens[i] .. cu_seqlens[i+1]-1. Trainers hold padded [B, T] tensors with an attention
mask (which positions exist) and a response/loss mask (which positions are scored).
"""
from __future__ import annotations

from typing import NamedTuple

import torch


def lengths_from_cu_seqlens(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """[S] row count of each sequence."""
    return (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)


def cu_seqlens_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """[S+1] int64 offsets, starting at 0."""
    lengths = lengths.to(torch.int64)
    return torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])


def sequence_ids(cu_seqlens: torch.Tensor, num_rows: int) -> torch.Tensor:
    """[N] index of the sequence each row belongs to."""
    lengths = lengths_from_cu_seqlens(cu_seqlens)
    ids = torch.arange(lengths.numel(), device=cu_seqlens.device)
    return torch.repeat_interleave(ids, lengths, output_size=num_rows)


def scored_lengths(cu_seqlens: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[S] L_i, the number of scored rows of each sequence (all rows when there is no mask)."""
    if loss_mask is None:
        return lengths_from_cu_seqlens(cu_seqlens)
    # prefix sums instead of a scatter-add: exact and deterministic on every device
    csum = torch.cat([loss_mask.new_zeros(1, dtype=torch.int64), torch.cumsum((loss_mask != 0).to(torch.int64), 0)])
    cu = cu_seqlens.to(torch.int64)
    return csum[cu[1:]] - csum[cu[:-1]]


class Packed(NamedTuple):
    values: torch.Tensor  # [N, ...] the present positions, row after row
    cu_seqlens: torch.Tensor  # [B+1] int64


def pack(padded: torch.Tensor, attention_mask: torch.Tensor) -> Packed:
    """Padded [B, T, ...] + attention mask [B, T] -> packed rows [N, ...] + cu_seqlens [B+1].

    Works for left, right or interior padding: the present positions of each sequence are kept
    in order. Every one of the B sequences gets an entry in cu_seqlens, even an empty one.
    """
    if attention_mask.shape != padded.shape[:2]:
        raise ValueError(f"attention_mask: expected shape {tuple(padded.shape[:2])}, got {tuple(attention_mask.shape)}")
    present = attention_mask != 0
    return Packed(padded[present], cu_seqlens_from_lengths(present.sum(1)))


def unpack(packed: torch.Tensor, attention_mask: torch.Tensor, fill=0) -> torch.Tensor:
    """Inverse of ``pack``: packed rows [N, ...] back to [B, T, ...] at the mask's positions."""
    present = attention_mask != 0
    out = packed.new_full((*attention_mask.shape, *packed.shape[1:]), fill)
    out[present] = packed
    return out


def next_token_targets(input_ids: torch.Tensor, cu_seqlens: torch.Tensor, fill: int = 0):
    """Next-token targets of packed sequences: row t predicts input_ids[t+1] of the same sequence.

    Returns (targets [N], valid [N] bool). The last row of each sequence has no next token inside its
    sequence (the shift never crosses a boundary): its target is ``fill`` and ``valid`` is False.
    """
    N = input_ids.shape[0]
    targets = torch.full_like(input_ids, fill)
    targets[:-1] = input_ids[1:]
    valid = torch.ones(N, dtype=torch.bool, device=input_ids.device)
    ends = cu_seqlens[1:].to(torch.int64)
    ends = ends[(ends > 0) & (ends > cu_seqlens[:-1].to(torch.int64))] - 1  # last row of each non-empty sequence
    valid[ends] = False
    targets[~valid] = fill
    return targets, valid
