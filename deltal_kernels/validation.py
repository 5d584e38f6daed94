"""Argument checks of SPEC section 3 and the row-level view of a packed batch.

Every backend (and the reference) goes through ``prepare``: nothing reaches a kernel before the
shapes, dtypes, devices and values are known to be valid.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import torch

from ._checks import describe, is_number
from .aggregation import check_agg_options, sequence_weights
from .packing import scored_lengths, sequence_ids
from .parallel import sequence_shard, sum_over_group

KL_TYPES = {"k1": 1, "kl": 1, "k2": 2, "mse": 2, "k3": 3, "low_var_kl": 3}
LOGITS_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class LossParams(NamedTuple):
    """The scalar options of the per-row loss term, as the kernels take them."""
    clip_low: float
    clip_high: float
    dual_clip: float  # 0.0: off
    kl_coef: float
    kl_type: int  # 0: no KL term (no ref_logprobs), 1/2/3: k1/k2/k3
    entropy_coef: float
    temperature: float


RATIO_LEVELS = ("token", "sequence")
OBJECTIVES = ("ppo", "cispo")
ROLLOUT_CORRECTIONS = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


class Objective(NamedTuple):
    """The policy-term options beyond the per-row PPO term the kernels compute (issue 14)."""
    ratio_level: str = "token"  # "token" | "sequence" (GSPO)
    objective: str = "ppo"  # "ppo" | "cispo"
    rollout_correction: Optional[str] = None  # one of ROLLOUT_CORRECTIONS
    rollout_clip: tuple = (None, 3.0)  # (min, max), either may be None
    kl_entropy_agg: Optional[str] = None  # canonical aggregation name, or None: the policy term's weights

    @property
    def is_default(self) -> bool:
        """Token-level PPO, no rollout correction, KL and entropy weighted like the policy term: what the
        kernels compute per row (and the fused schedule can finish in the forward)."""
        return (self.ratio_level == "token" and self.objective == "ppo" and self.rollout_correction is None
                and self.kl_entropy_agg is None)


class Batch(NamedTuple):
    """A validated packed batch, seen row by row (unscored rows hold zeros in every row input)."""
    logits: torch.Tensor  # [N, V], the caller's tensor (possibly strided: each path makes it contiguous)
    targets: torch.Tensor  # [N] int64
    scored: torch.Tensor  # [N] bool
    old_logprobs: torch.Tensor  # [N] compute dtype
    ref_logprobs: Optional[torch.Tensor]  # [N] compute dtype, or None
    advantages: torch.Tensor  # [N] compute dtype, per row
    row_weights: torch.Tensor  # [N] compute dtype: w_i of the row's sequence, 0 where unscored
    params: LossParams
    need_entropy: bool
    objective: Objective
    cu_seqlens: torch.Tensor  # [S+1] int64, in a valid shape (see safe_offsets)
    seq: torch.Tensor  # [N] int64: the sequence of each row
    rollout_logprobs: Optional[torch.Tensor]  # [N] compute dtype (0 on unscored rows), or None
    kl_entropy_row_weights: Optional[torch.Tensor]  # [N] compute dtype, or None: row_weights
    # sequence-parallel rows (parallel.SequenceShard), or None; then cu_seqlens are the local rows'
    # offsets per sequence, and per-sequence sums are summed over its group
    sequences: Optional[object] = None


def compute_dtype(logits: torch.Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 logits, float64 for float64 logits."""
    return torch.promote_types(logits.dtype, torch.float32)


def check_matrix(name, x, dims):
    """x: a 2-D tensor of a dtype the kernels take (logits, hidden states); dims names the shape, e.g. "[N, V]"."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor {dims}, got {describe(x)}")
    if x.dim() != 2:
        raise ValueError(f"{name}: expected shape {dims}, got {describe(x)}")
    if x.dtype not in LOGITS_DTYPES:
        raise TypeError(f"{name}: expected float32, float16, bfloat16 or float64, got {x.dtype}")


def _check_tensor(name, x, *, shape, dtypes, device, kind="float", rows="the logits"):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {describe(x)}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {describe(x)}")
    if x.dtype not in dtypes:
        raise TypeError(f"{name}: expected a {kind} dtype ({', '.join(map(str, dtypes))}), got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the device of {rows}), got one on {x.device}")


_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INDICES = (torch.int32, torch.int64)
_MASKS = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16,
          torch.float32, torch.float64)


# the float32 range the kernels compute in: a temperature outside it has no finite float32 reciprocal
_F32_TINY = float(torch.finfo(torch.float32).tiny)
_F32_MAX = float(torch.finfo(torch.float32).max)


def _is_finite_number(x) -> bool:
    return is_number(x) and math.isfinite(x)


def check_options(*, clip_low, clip_high, dual_clip, kl_coef, kl_type, entropy_coef, temperature,
                  has_ref: bool, objective: str = "ppo") -> LossParams:
    """The scalar options, checked once for every backend (the kernels' own checks never differ)."""
    if objective == "cispo":  # clip_low = 1: no lower bound on the clipped weight (TRL's "cispo")
        if not is_number(clip_low) or not 0.0 <= clip_low <= 1.0:
            raise ValueError(f"clip_low: expected a number in [0, 1] (objective='cispo'), got {clip_low!r}")
    elif not is_number(clip_low) or not 0.0 <= clip_low < 1.0:
        raise ValueError(f"clip_low: expected a number in [0, 1), got {clip_low!r}")
    if not _is_finite_number(clip_high) or not clip_high >= 0.0:
        raise ValueError(f"clip_high: expected a finite number >= 0, got {clip_high!r} (for no upper clip, "
                         "pass a large finite value such as 1e9)")
    if dual_clip is not None and (not _is_finite_number(dual_clip) or not dual_clip > 1.0):
        raise ValueError(f"dual_clip: expected None or a finite number > 1, got {dual_clip!r}")
    if not _is_finite_number(kl_coef):
        raise ValueError(f"kl_coef: expected a finite number, got {kl_coef!r}")
    if kl_type not in KL_TYPES:
        raise ValueError(f"kl_type: expected one of {sorted(KL_TYPES)}, got {kl_type!r}")
    if kl_coef != 0.0 and not has_ref:
        raise ValueError("ref_logprobs: kl_coef != 0 needs ref_logprobs")
    if not _is_finite_number(entropy_coef):
        raise ValueError(f"entropy_coef: expected a finite number, got {entropy_coef!r}")
    if not is_number(temperature) or not _F32_TINY <= temperature <= _F32_MAX:
        raise ValueError(f"temperature: expected a number in [{_F32_TINY:.3g}, {_F32_MAX:.3g}] (finite, > 0, with "
                         f"a finite float32 reciprocal), got {temperature!r}")
    return LossParams(float(clip_low), float(clip_high), float(dual_clip or 0.0), float(kl_coef),
                      KL_TYPES[kl_type] if has_ref else 0, float(entropy_coef), float(temperature))


def check_objective(*, ratio_level, objective, rollout_logprobs, rollout_correction, rollout_clip, kl_entropy_agg,
                    kl_entropy_weights, dual_clip, alpha, max_len) -> Objective:
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"ratio_level: expected one of {RATIO_LEVELS}, got {ratio_level!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective: expected one of {OBJECTIVES}, got {objective!r}")
    if objective == "cispo" and dual_clip is not None:
        raise ValueError("dual_clip: applies to objective='ppo' only (CISPO has no clipped branch to bound)")
    if rollout_correction is not None and rollout_correction not in ROLLOUT_CORRECTIONS:
        raise ValueError(f"rollout_correction: expected None or one of {ROLLOUT_CORRECTIONS}, got {rollout_correction!r}")
    if (rollout_correction is None) != (rollout_logprobs is None):
        raise ValueError("rollout_correction: rollout_logprobs and rollout_correction go together (got "
                         f"rollout_correction={rollout_correction!r} with rollout_logprobs "
                         f"{'given' if rollout_logprobs is not None else 'None'})")
    if not isinstance(rollout_clip, (tuple, list)) or len(rollout_clip) != 2:
        raise ValueError(f"rollout_clip: expected a pair (min, max), got {rollout_clip!r}")
    lo, hi = rollout_clip
    for bound in (lo, hi):
        if bound is not None and (not _is_finite_number(bound) or bound < 0):
            raise ValueError(f"rollout_clip: bounds must be None or finite numbers >= 0, got {rollout_clip!r}")
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"rollout_clip: min must not exceed max, got {rollout_clip!r}")
    if rollout_correction is not None and lo is None and hi is None:
        raise ValueError("rollout_clip: at least one bound is needed with a rollout correction")
    if kl_entropy_agg is not None:
        if kl_entropy_weights is not None:
            raise ValueError("kl_entropy_weights: give kl_entropy_agg or kl_entropy_weights, not both")
        kl_entropy_agg = check_agg_options(kl_entropy_agg, alpha, max_len)
    return Objective(ratio_level, objective, rollout_correction,
                     (None if lo is None else float(lo), None if hi is None else float(hi)),
                     kl_entropy_agg if kl_entropy_weights is None else "weights")


def check_values(N, V, cu_seqlens, targets, advantages, loss_mask, weights, kl_entropy_weights,
                 rows="the logits") -> None:
    """The checks that read the tensors' values (SPEC section 3). Each costs a host sync, and under
    torch.compile they would break the graph: ``prepare`` runs them eagerly only, and
    ``deltal_kernels.validate`` runs them on demand (once, eagerly, before a compiled loop)."""
    cu = cu_seqlens.to(torch.int64)
    if int(cu[0]) != 0:
        raise ValueError(f"cu_seqlens: must start at 0, starts at {int(cu[0])}")
    if cu.numel() > 1 and bool((cu[1:] < cu[:-1]).any()):
        raise ValueError("cu_seqlens: must be non-decreasing")
    if int(cu[-1]) != N:
        raise ValueError(f"cu_seqlens: must end at N={N} (the number of rows of {rows}), ends at {int(cu[-1])}")
    if N > 0 and bool(((targets < 0) | (targets >= V)).any()):
        raise ValueError(f"targets: every target must lie in [0, V={V})")
    if not bool(advantages.isfinite().all()):
        raise ValueError("advantages: contain NaN or inf")
    if loss_mask is not None and loss_mask.dtype != torch.bool and not bool(((loss_mask == 0) | (loss_mask == 1)).all()):
        raise ValueError("loss_mask: values must be 0 or 1")
    for name, w in (("weights", weights), ("kl_entropy_weights", kl_entropy_weights)):
        if w is not None and not bool(w.isfinite().all()):
            raise ValueError(f"{name}: contain NaN or inf")


def safe_offsets(cu_seqlens: torch.Tensor, N: int) -> torch.Tensor:
    """cu_seqlens as int64, forced into a valid shape (start 0, non-decreasing, end N) with [S]-sized
    ops and no sync. Equal to cu_seqlens when it is valid; when the value checks were skipped (torch
    compile) and it is not, the result is garbage but every index built from it stays in bounds."""
    cu = cu_seqlens.to(torch.int64)
    if cu.numel() < 2:
        return cu.new_zeros(cu.numel())
    inner = torch.cummax(cu[1:-1].clamp(0, N), 0).values
    return torch.cat([cu.new_zeros(1), inner, cu.new_full((1,), N)])


def prepare(logits, targets, old_logprobs, advantages, cu_seqlens, *, loss_mask, ref_logprobs, weights,
            agg, alpha, max_len, clip_low, clip_high, dual_clip, kl_coef, kl_type, entropy_coef,
            temperature, with_entropy, ratio_level="token", objective="ppo", rollout_logprobs=None,
            rollout_correction=None, rollout_clip=(None, 3.0), kl_entropy_agg=None,
            kl_entropy_weights=None, rows="the logits", vocab_size=None, row_index=None,
            sequence_group=None) -> Batch:
    """Check every argument (SPEC section 3) and build the row-level view of the batch.

    rows: what the errors call the [N, ...] tensor the rows come from ("the hidden states" for the
    fused LM head, whose logits the caller never sees). vocab_size: the whole vocabulary V when the
    logits are one shard of it (targets are global ids), else the logits' width. sequence_group,
    row_index: the rows are this rank's part of the batch that cu_seqlens describes (``parallel``)."""
    check_matrix("logits", logits, "[N, V]")
    N, V = logits.shape
    if V == 0:
        raise ValueError("logits: the vocabulary dimension V is 0")
    dev = logits.device
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens: expected a 1-D tensor [S+1], got {describe(cu_seqlens)}")
    S = cu_seqlens.numel() - 1
    check = functools.partial(_check_tensor, rows=rows)
    check("cu_seqlens", cu_seqlens, shape=(S + 1,), dtypes=_INDICES, device=dev, kind="int32/int64")
    check("targets", targets, shape=(N,), dtypes=_INDICES, device=dev, kind="int32/int64")
    check("old_logprobs", old_logprobs, shape=(N,), dtypes=_FLOATS, device=dev)
    if ref_logprobs is not None:
        check("ref_logprobs", ref_logprobs, shape=(N,), dtypes=_FLOATS, device=dev)
    if not isinstance(advantages, torch.Tensor) or advantages.dim() != 1 or advantages.shape[0] not in (N, S):
        raise ValueError(f"advantages: expected shape [N]={N} (per row) or [S]={S} (per sequence), "
                         f"got {describe(advantages)}")
    check("advantages", advantages, shape=advantages.shape, dtypes=_FLOATS, device=dev)
    if loss_mask is not None:
        check("loss_mask", loss_mask, shape=(N,), dtypes=_MASKS, device=dev, kind="bool, integer or float 0/1")
    if weights is not None:
        check("weights", weights, shape=(S,), dtypes=_FLOATS, device=dev)
    else:
        check_agg_options(agg, alpha, max_len)
    if rollout_logprobs is not None:
        check("rollout_logprobs", rollout_logprobs, shape=(N,), dtypes=_FLOATS, device=dev)
    if kl_entropy_weights is not None:
        check("kl_entropy_weights", kl_entropy_weights, shape=(S,), dtypes=_FLOATS, device=dev)
    for name, w in (("weights", weights), ("kl_entropy_weights", kl_entropy_weights)):
        if w is not None and logits.dtype == torch.float64 and w.dtype != torch.float64:
            raise TypeError(f"{name}: float64 logits compute in float64, but these weights are {w.dtype} (already "
                            "rounded); pass float64 weights, e.g. sequence_weights(..., dtype=torch.float64)")
    obj = check_objective(ratio_level=ratio_level, objective=objective, rollout_logprobs=rollout_logprobs,
                          rollout_correction=rollout_correction, rollout_clip=rollout_clip,
                          kl_entropy_agg=kl_entropy_agg, kl_entropy_weights=kl_entropy_weights,
                          dual_clip=dual_clip, alpha=alpha, max_len=max_len)
    params = check_options(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef,
                           kl_type=kl_type, entropy_coef=entropy_coef, temperature=temperature,
                           has_ref=ref_logprobs is not None, objective=objective)
    if not isinstance(with_entropy, bool):
        raise TypeError(f"with_entropy: expected a bool, got {with_entropy!r}")

    # value checks need the data; under torch.compile they would break the graph, so they run eagerly only
    # sequence-parallel: cu_seqlens describe the whole batch, of which this rank holds N rows
    total_rows = N if sequence_group is None else int(cu_seqlens[-1])
    if not torch.compiler.is_compiling():
        check_values(total_rows, vocab_size or V, cu_seqlens, targets, advantages, loss_mask, weights,
                     kl_entropy_weights, rows)
    cu_seqlens = safe_offsets(cu_seqlens, total_rows)

    cd = compute_dtype(logits)
    scored = torch.ones(N, dtype=torch.bool, device=dev) if loss_mask is None else loss_mask != 0
    sequences = sequence_shard(cu_seqlens, row_index, sequence_group, N)
    if sequences is None:
        seq = sequence_ids(cu_seqlens, N)
        lengths = scored_lengths(cu_seqlens, scored)
    else:  # the local rows of each sequence, and the scored lengths over the group
        seq, cu_seqlens = sequences.seq, sequences.local_cu_seqlens
        lengths = sum_over_group(scored_lengths(cu_seqlens, scored), sequences.group)
    if weights is None:
        weights = sequence_weights(lengths, agg, alpha=alpha, max_len=max_len, dtype=cd)
    if obj.kl_entropy_agg not in (None, "weights"):
        kl_entropy_weights = sequence_weights(lengths, obj.kl_entropy_agg, alpha=alpha, max_len=max_len, dtype=cd)
    adv = advantages if advantages.shape[0] == N else advantages[seq]
    zero = torch.zeros((), dtype=cd, device=dev)

    def rows(x):  # a row input in the compute dtype, zero on unscored rows
        return torch.where(scored, x.to(cd), zero)

    return Batch(
        logits=logits,
        targets=targets.to(torch.int64).contiguous(),
        scored=scored,
        old_logprobs=rows(old_logprobs),
        ref_logprobs=None if ref_logprobs is None else rows(ref_logprobs),
        advantages=rows(adv),
        row_weights=rows(weights[seq]),
        params=params,
        need_entropy=with_entropy or params.entropy_coef != 0.0,
        objective=obj,
        cu_seqlens=cu_seqlens,
        seq=seq,
        rollout_logprobs=None if rollout_logprobs is None else rows(rollout_logprobs),
        kl_entropy_row_weights=None if kl_entropy_weights is None else rows(kl_entropy_weights[seq]),
        sequences=sequences,
    )
