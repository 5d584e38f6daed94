"""Sequence weights w_i of SPEC section 1: loss = sum_i w_i * sum_{scored t in i} l_t.

The normaliser statistics (sum_j L_j^-alpha, sum_j L_j, G) are over the whole optimizer batch.
Pass ``group`` to all-reduce them over a torch.distributed process group; slice the result per
micro-batch and hand it to ``policy_loss(weights=...)`` for gradient accumulation.
"""
from __future__ import annotations

import torch

from ._checks import describe

# canonical name -> aliases accepted for it
AGGREGATIONS = {
    "delta-l": ("delta-l", "delta_l", "deltal"),
    "token-mean": ("token-mean", "dapo"),
    "seq-mean-token-mean": ("seq-mean-token-mean", "grpo"),
    "seq-mean-token-sum": ("seq-mean-token-sum",),
    "seq-mean-token-sum-norm": ("seq-mean-token-sum-norm", "dr-grpo", "dr_grpo"),
}
_CANONICAL = {alias: name for name, aliases in AGGREGATIONS.items() for alias in aliases}
NEEDS_MAX_LEN = frozenset({"delta-l", "seq-mean-token-sum-norm"})


def canonical_agg(agg: str) -> str:
    """The canonical aggregation name for ``agg`` or one of its aliases."""
    if not isinstance(agg, str) or agg not in _CANONICAL:
        raise ValueError(f"agg: unknown aggregation {agg!r}; expected one of {sorted(_CANONICAL)}")
    return _CANONICAL[agg]


def check_agg_options(agg: str, alpha: float, max_len) -> str:
    """Validate the aggregation options (SPEC section 3); returns the canonical agg name."""
    name = canonical_agg(agg)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: expected a number in [0, 1], got {alpha!r}")
    if name in NEEDS_MAX_LEN:
        if max_len is None:
            raise ValueError(f"max_len: agg={agg!r} needs max_len (the rollout's maximum response length)")
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len <= 0):
        raise ValueError(f"max_len: expected a positive int, got {max_len!r}")
    return name


def _is_sub_multiset(values: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """Whether every value occurs in ``pool`` at least as often as in ``values`` (a bool tensor, no sync)."""
    if values.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=values.device)
    pool = torch.sort(pool.to(torch.int64)).values
    distinct, counts = torch.unique(values.to(torch.int64), return_counts=True)
    available = (torch.searchsorted(pool, distinct, right=True) - torch.searchsorted(pool, distinct))
    return (available >= counts).all()


def sequence_weights(lengths: torch.Tensor, agg: str = "delta-l", *, alpha: float = 1.0,
                     max_len: int | None = None, group=None, grad_reduction: str = "mean",
                     rollout_lengths: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-sequence weights w_i ([S], torch's default dtype unless ``dtype``) of the aggregation ``agg``
    (SPEC section 1).

    lengths: [S] integer tensor, the scored-token count L_i of each of this rank's sequences.
    Sequences with L_i = 0 get weight 0 and count nowhere (not in G, not in the sums).
    group: a torch.distributed process group; the statistics are all-reduced over it so the
    weights are those of the formula over every rank's sequences. grad_reduction="mean" (DDP and
    FSDP average gradients over ranks) then multiplies the weights by the group's size; "sum" does
    not. Without a group there is no scaling. The arithmetic is float64; the result is rounded once to
    ``dtype`` (default: ``torch.get_default_dtype()``, as torch's factory functions do). For float64
    logits pass ``dtype=torch.float64``: ``policy_loss`` refuses less precise weights there.

    rollout_lengths: [S_R] the scored-token counts of the whole rollout batch R that ``lengths`` (one
    optimizer mini-batch k of it) was drawn from. The normaliser statistics are then R's, and the
    weights are scaled by B_R / B_k (the counts of sequences with L_i > 0 in R and in k): the Delta-L
    authors' scope, w_i = (B_R / B_k) L_i^-alpha / (M sum_{j in R} L_j^-alpha), where each mini-batch's
    loss is divided by B_k M. With a group, R's statistics and B_k are all-reduced too. The scored
    lengths must be drawn from R: each nonzero value of ``lengths`` must occur in ``rollout_lengths``
    at least as often (checked on every rank, eagerly; a failure on any rank raises on all of them).
    """
    name = check_agg_options(agg, alpha, max_len)
    if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1:
        raise ValueError(f"lengths: expected a 1-D integer tensor, got {describe(lengths)}")
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool or lengths.is_complex():
        raise TypeError(f"lengths: expected an integer dtype, got {lengths.dtype}")
    if grad_reduction not in ("mean", "sum"):
        raise ValueError(f"grad_reduction: expected 'mean' or 'sum', got {grad_reduction!r}")
    if not torch.compiler.is_compiling() and bool((lengths < 0).any()):
        raise ValueError("lengths: expected non-negative lengths")

    if rollout_lengths is not None:
        if (not isinstance(rollout_lengths, torch.Tensor) or rollout_lengths.dim() != 1
                or rollout_lengths.dtype.is_floating_point or rollout_lengths.dtype == torch.bool):
            raise ValueError(f"rollout_lengths: expected a 1-D integer tensor, got {describe(rollout_lengths)}")
        if rollout_lengths.device != lengths.device:
            raise ValueError(f"rollout_lengths: expected a tensor on {lengths.device} (the lengths' device)")
        if not torch.compiler.is_compiling() and bool((rollout_lengths < 0).any()):
            raise ValueError("rollout_lengths: expected non-negative lengths")

    def inverse_powers(L):  # L_i^-alpha, 0 where L_i = 0
        return torch.where(L > 0, L.clamp(min=1).pow(-alpha), torch.zeros_like(L))

    L = lengths.to(torch.float64)
    live = L > 0
    L_safe = torch.where(live, L, torch.ones_like(L))
    inv_pow = inverse_powers(L)
    # the normaliser statistics sum_j L_j^-alpha, sum_j L_j, G over the batch they are taken over (the
    # rollout batch R when given), and B_k (this batch's G, for the rollout scope), all-reduced as one tensor
    R = L if rollout_lengths is None else rollout_lengths.to(torch.float64)
    stats = [inverse_powers(R).sum(), R.sum(), (R > 0).sum().to(torch.float64), live.sum().to(torch.float64)]
    check_drawn = rollout_lengths is not None and not torch.compiler.is_compiling()
    if check_drawn:  # ranks whose mini-batch is not drawn from their rollout batch: reduced with the rest
        stats.append(torch.logical_not(_is_sub_multiset(lengths[lengths > 0], rollout_lengths)).to(torch.float64))
    stats = torch.stack(stats)
    world = 1
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
        world = dist.get_world_size(group) if grad_reduction == "mean" else 1
    if check_drawn and float(stats[4]) > 0:
        raise ValueError(
            f"rollout_lengths: on {int(stats[4])} rank(s) the mini-batch's scored lengths are not drawn from the "
            "rollout batch (some length occurs more often in lengths than in rollout_lengths; an empty or all-zero "
            "rollout_lengths holds none). Pass the scored lengths of the whole rollout batch this mini-batch was "
            "split from, on each rank its own.")
    sum_inv_pow, sum_len, num_live, num_live_k = stats[:4].unbind()
    if rollout_lengths is not None:  # B_R / B_k: one mini-batch's share of the rollout batch
        world = world * num_live / torch.where(num_live_k > 0, num_live_k, torch.ones_like(num_live_k))

    def safe(x):  # a batch with no scored row: every weight is 0, never NaN
        return torch.where(x > 0, x, torch.ones_like(x))

    if name == "delta-l":
        w = inv_pow / (max_len * safe(sum_inv_pow))
    elif name == "token-mean":
        w = torch.ones_like(L) / safe(sum_len)
    elif name == "seq-mean-token-mean":
        w = 1.0 / (safe(num_live) * L_safe)
    elif name == "seq-mean-token-sum":
        w = torch.ones_like(L) / safe(num_live)
    else:  # seq-mean-token-sum-norm (Dr. GRPO)
        w = torch.ones_like(L) / (safe(num_live) * max_len)
    w = torch.where(live, w * world, torch.zeros_like(w))
    return w.to(torch.get_default_dtype() if dtype is None else dtype)
