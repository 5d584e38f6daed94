"""Sharded rows on the row contract: vocabulary-parallel (tensor-parallel) logits.

Rank r of ``vocab_group`` holds the columns [vocab_start, vocab_start + V_r) of every row (Megatron's
column-parallel LM head; shards may be unequal, in any rank order, as long as they tile [0, V)).
Targets are global ids. Per call:

1. one all-gather of a few int64 per rank checks that the shards tile the vocabulary and that the
   ranks agree on N, the targets and the device type;
2. each rank's backend reduces its shard: ``shard_stats`` gives per row m = max z, s = sum e^(z - m),
   u = sum e^(z - m) (z - m) over the shard and the target's z where the target is in it;
3. one all-gather of those [4, N] (4 N floats per rank: O(N), never O(N V)); every rank merges the
   parts in rank order with the softmax merge of the CUDA cluster kernel (row_math.h's
   ``softmax_merge``), so every rank holds bitwise the same m, log s, entropy and log-prob;
4. the objective is the [N]-sized torch code every other path uses (``reference.objective_terms``),
   run identically on every rank: every rank returns the same loss and metrics;
5. backward: dL/dlogp_t and dL/dH_t are the same on every rank (the objective is replicated), so
   each rank's ``shard_grad_rows`` writes its own shard's gradient from the merged statistics with no
   communication at all.

The merge is exact in the sense of the cluster kernel: parts of a row in a fixed order, so runs are
bitwise repeatable; it equals the unsharded answer to float32 rounding, not bitwise.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor


# device types as they travel in the metadata all-gather
_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "meta")


class VocabShard(NamedTuple):
    """This rank's vocabulary shard and its group, as checked by ``vocab_shard``."""
    group: object
    start: int  # first global vocabulary id of this rank's columns
    size: int  # V_r
    vocab_size: int  # V, the sum of every rank's V_r
    starts: Tuple[int, ...]  # every rank's first id, by rank
    sizes: Tuple[int, ...]  # every rank's V_r, by rank


def _dist():
    import torch.distributed as dist  # not imported by the package unless sharded rows are asked for

    return dist


def _gather(x: Tensor, group) -> list:
    """x of every rank of ``group``, in rank order."""
    parts = [torch.empty_like(x) for _ in range(_dist().get_world_size(group))]
    _dist().all_gather(parts, x.contiguous(), group=group)
    return parts


def _group_given(name: str, group, companion: str, companion_value, what: str) -> bool:
    """Whether a process group was given (then torch.distributed must be ready and the call eager);
    without one, its companion argument must be absent too."""
    if group is None:
        if companion_value is not None:
            raise ValueError(f"{companion}: given without {name} (the process group {what} is split over); "
                             "pass both, or neither")
        return False
    dist = _dist()
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"{name}: torch.distributed is not initialized")
    if torch.compiler.is_compiling():
        raise RuntimeError(f"{name}: sharded rows run eagerly only (their checks read gathered values)")
    return True


def _checksums(targets: Tensor, loss_mask: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """Two int64 sums that differ when two ranks' targets or masks differ (by value or by position)."""
    t = targets.to(torch.int64) + 1
    if isinstance(loss_mask, Tensor) and loss_mask.shape == targets.shape:  # a masked row counts as target -1
        t = torch.where(loss_mask.to(t.device) != 0, t, 0)
    position = torch.arange(1, t.numel() + 1, device=t.device, dtype=torch.int64) % 65521 + 1
    return t.sum(), (t * position).sum()


def vocab_shard(logits_shape, device, targets, vocab_start, vocab_group, loss_mask=None) -> Optional[VocabShard]:
    """None when the rows are whole (no ``vocab_group``), else this rank's checked ``VocabShard``.

    Every rank of the group must call it (one all-gather); a bad shard on any rank raises the same
    ValueError on every rank, so none is left waiting in a later collective.
    """
    if not _group_given("vocab_group", vocab_group, "vocab_start", vocab_start, "the vocabulary"):
        return None
    N, size = logits_shape
    if not isinstance(targets, Tensor) or tuple(targets.shape) != (N,):
        raise ValueError(f"targets: expected a tensor of shape ({N},), one global vocabulary id per row")
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"vocab_start: expected the shard's first vocabulary id, an int >= 0, got {vocab_start!r}")
    device_type = torch.device(device).type
    code = _DEVICE_TYPES.index(device_type) if device_type in _DEVICE_TYPES else len(_DEVICE_TYPES)
    plain, weighted = _checksums(targets, loss_mask)
    mine = torch.stack([torch.tensor(v, dtype=torch.int64, device=plain.device)
                        for v in (vocab_start, size, N, code)] + [plain, weighted])
    table = torch.stack(_gather(mine, vocab_group)).tolist()  # [world, 6]: one host sync per call
    world = len(table)
    starts = tuple(row[0] for row in table)
    sizes = tuple(row[1] for row in table)

    problems = []  # (argument, what is wrong), the same list on every rank
    if len({row[2] for row in table}) > 1:
        problems.append(("logits", f"the ranks hold different numbers of rows N: {[row[2] for row in table]}"))
    if len({row[3] for row in table}) > 1:
        problems.append(("logits", "the ranks' logits sit on different device types: "
                                   f"{[(_DEVICE_TYPES + ('other',))[row[3]] for row in table]}"))
    if len({(row[4], row[5]) for row in table}) > 1:
        problems.append(("targets", "the ranks' targets or loss_mask differ (every rank passes the same global "
                                    "target ids and mask)"))
    edge = 0
    for r in sorted(range(world), key=lambda r: starts[r]):
        if starts[r] != edge:
            problems.append(("vocab_start", f"the shards do not tile the vocabulary: (start, size) by rank "
                                            f"{list(zip(starts, sizes))} has a "
                                            f"{'gap' if starts[r] > edge else 'overlap'} at id {edge}"))
            break
        edge += sizes[r]
    if problems:
        raise ValueError(f"{problems[0][0]}: " + "; ".join(text for _, text in problems))
    return VocabShard(vocab_group, vocab_start, size, edge, starts, sizes)


def check_shard_kernels(shard: Optional[VocabShard], backend: str) -> None:
    """Sharded rows need the backend's shard_stats / shard_grad_rows: an error naming it otherwise."""
    from .dispatch import _load

    if shard is not None and not hasattr(_load(backend), "shard_stats"):
        raise ValueError(f"backend: {backend!r} has no kernels for vocabulary-sharded rows (vocab_group)")


def softmax_merge(a, b):
    """row_math.h's softmax_merge on [N] columns: (m, s, u) of two parts of every row, symmetric."""
    (am, as_, au), (bm, bs, bu) = a, b
    swap = am < bm
    hm, hs, hu = torch.where(swap, bm, am), torch.where(swap, bs, as_), torch.where(swap, bu, au)
    lm, ls, lu = torch.where(swap, am, bm), torch.where(swap, as_, bs), torch.where(swap, au, bu)
    empty = lm == float("-inf")  # nothing, or a NaN seen before any value (s NaN): kept
    d = torch.where(empty, 0.0, lm - hm)
    c = torch.exp(d)
    s = torch.where(empty, torch.where(ls == 0, hs, float("nan")), hs + c * ls)
    u = torch.where(empty, hu, hu + c * (lu + d * ls))
    return hm, s, u


class MergedRows(NamedTuple):
    """The merged (global) statistics of sharded rows, the same bits on every rank ([N], compute dtype)."""
    m: Tensor
    log_s: Tensor
    logp: Tensor  # 0 on unscored rows
    entropy: Tensor  # 0 on unscored rows, and 0 unless need_entropy


def merged_rows(module, logits, targets, scored, shard: VocabShard, temperature, need_entropy) -> MergedRows:
    """Each rank's shard statistics, all-gathered and merged in rank order; the target's z from its owner."""
    m, s, u, zt = module.shard_stats(logits, targets, scored, shard.start, temperature, need_entropy)
    parts = _gather(torch.stack([m, s, u, zt]), shard.group)
    M, S, U = parts[0][0], parts[0][1], parts[0][2]
    for part in parts[1:]:
        M, S, U = softmax_merge((M, S, U), (part[0], part[1], part[2]))
    # the owner of each row's target: the rank whose [start, start + size) holds it
    starts = torch.tensor(shard.starts, device=targets.device)
    ends = starts + torch.tensor(shard.sizes, device=targets.device)
    owner = ((targets[:, None] >= starts) & (targets[:, None] < ends)).to(torch.int64).argmax(1)
    zt = torch.stack([part[3] for part in parts]).gather(0, owner[None]).squeeze(0)
    log_s = torch.log(S)
    zero = torch.zeros((), dtype=M.dtype, device=M.device)
    logp = torch.where(scored, (zt - M) - log_s, zero)
    entropy = torch.where(scored, log_s - U / S, zero) if need_entropy else torch.zeros_like(logp)
    return MergedRows(M, log_s, logp, entropy)


class VocabParallelRows(torch.autograd.Function):
    """logp_t and H_t of vocabulary-sharded rows, differentiable w.r.t. this rank's logits shard."""

    @staticmethod
    def forward(ctx, logits, targets, scored, shard, backend, temperature, need_entropy, inplace):
        from .dispatch import _load  # (dispatch imports validation, which imports this module)

        module = _load(backend)
        rows = merged_rows(module, logits, targets, scored, shard, temperature, need_entropy)
        ctx.save_for_backward(logits, targets, scored, rows.m, rows.log_s, rows.entropy)
        ctx.module, ctx.shard, ctx.temperature, ctx.inplace = module, shard, temperature, inplace
        return rows.logp, rows.entropy

    @staticmethod
    def backward(ctx, d_logp, d_entropy):
        from .dispatch import check_first_order

        check_first_order()
        if getattr(ctx, "logits_overwritten", False):
            raise RuntimeError("inplace_backward: the first backward through this policy loss wrote the gradient "
                               "into the logits' storage, so a second backward has no logits to read. Call "
                               "backward once, or pass inplace_backward=False.")
        logits, targets, scored, m, log_s, entropy = ctx.saved_tensors
        zero = torch.zeros((), dtype=m.dtype, device=m.device)
        g = torch.where(scored, d_logp, zero) if d_logp is not None else torch.zeros_like(m)
        h = torch.where(scored, d_entropy, zero) if d_entropy is not None else torch.zeros_like(m)
        out = logits if ctx.inplace else torch.empty_like(logits)
        ctx.module.shard_grad_rows(logits, targets, ctx.shard.start, m, log_s, entropy, g.to(m.dtype),
                                   h.to(m.dtype), ctx.temperature, out)
        ctx.logits_overwritten = ctx.inplace
        return out, None, None, None, None, None, None, None


def vocab_parallel_rows(b, backend: str, shard: VocabShard, inplace: bool):
    """(logp, entropy) [N] of the prepared batch ``b`` whose logits are this rank's shard."""
    p = b.params
    logits = b.logits.contiguous()
    if torch.is_grad_enabled() and logits.requires_grad:
        return VocabParallelRows.apply(logits, b.targets, b.scored, shard, backend, p.temperature,
                                       b.need_entropy, inplace)
    from .dispatch import _load

    rows = merged_rows(_load(backend), logits.detach(), b.targets, b.scored, shard, p.temperature, b.need_entropy)
    return rows.logp, rows.entropy


# ---- sequence/context parallelism: a sequence's rows spread over the ranks of a group ----
#
# Each rank passes its own rows, the global cu_seqlens and row_index (each local row's position in the
# global packed batch, increasing: a contiguous split and Megatron CP's two-chunk layout alike). A
# sequence's local rows are then contiguous, so the local per-sequence sums are prefix sums as in the
# unsharded case; every sequence-level quantity (scored lengths, GSPO's mean log-ratio, the sequence
# rollout correction) is their sum over the group: all-gathered and added in rank order, the same bits
# on every rank. The loss and the metrics are the whole batch's on every rank; the loss's gradient on
# each rank is that of its own rows.

class SequenceShard(NamedTuple):
    """This rank's rows of a sequence-parallel group, as checked by ``sequence_shard``."""
    group: object
    row_index: Tensor  # [N_r] int64, increasing: each local row's position in the whole packed batch
    seq: Tensor  # [N_r] int64: each local row's sequence
    local_cu_seqlens: Tensor  # [S+1] int64: the local rows of sequence i are local_cu[i]:local_cu[i+1]


def sum_over_group(x: Tensor, group) -> Tensor:
    """x summed over the ranks of ``group``: all-gathered and added in rank order (deterministic)."""
    parts = _gather(x, group)
    total = parts[0].clone()
    for part in parts[1:]:
        total += part
    return total


def sequence_shard(cu_seqlens: Tensor, row_index, sequence_group, N: int) -> Optional[SequenceShard]:
    """None without ``sequence_group``, else this rank's checked rows; cu_seqlens are the whole batch's
    (already forced into a valid shape). One all-gather checks that the ranks agree on the batch and
    that their rows add up to it (the same ValueError on every rank)."""
    if not _group_given("sequence_group", sequence_group, "row_index", row_index, "the sequences"):
        return None
    if not isinstance(row_index, Tensor) or tuple(row_index.shape) != (N,) or row_index.dtype != torch.int64:
        raise ValueError(f"row_index: expected an int64 tensor of shape ({N},) (each local row's position in the "
                         f"whole packed batch), got {row_index!r:.80}")
    if row_index.device != cu_seqlens.device:
        raise ValueError(f"row_index: expected a tensor on {cu_seqlens.device}, got one on {row_index.device}")
    total = int(cu_seqlens[-1]) if cu_seqlens.numel() else 0
    bad_local = bool(((row_index[1:] <= row_index[:-1]).any() if N > 1 else False)
                     or (N > 0 and (int(row_index[0]) < 0 or int(row_index[-1]) >= total)))
    S = cu_seqlens.numel() - 1
    mine = torch.tensor([S, total, N, int(bad_local)], dtype=torch.int64, device=cu_seqlens.device)
    table = torch.stack([t for t in _gather(mine, sequence_group)]).tolist()
    problems = []
    if any(row[3] for row in table):
        problems.append(("row_index", f"on rank(s) {[r for r, row in enumerate(table) if row[3]]} it is not "
                                      f"strictly increasing within [0, {total}) (the whole batch's rows)"))
    if len({(row[0], row[1]) for row in table}) > 1:
        problems.append(("cu_seqlens", "the ranks pass different cu_seqlens (every rank passes the whole "
                                       f"batch's): (S, rows) by rank {[(row[0], row[1]) for row in table]}"))
    elif sum(row[2] for row in table) != total:
        problems.append(("row_index", f"the ranks hold {sum(row[2] for row in table)} rows in all, the batch has "
                                      f"{total}: every row must be held by exactly one rank"))
    if problems:
        raise ValueError(f"{problems[0][0]}: " + "; ".join(text for _, text in problems))
    seq = torch.searchsorted(cu_seqlens[1:], row_index, right=True)
    counts = torch.bincount(seq, minlength=S) if N else torch.zeros(S, dtype=torch.int64, device=seq.device)
    local_cu = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    return SequenceShard(sequence_group, row_index, seq, local_cu)




def whole_batch_output(loss: Tensor, metrics: dict, scored: Tensor, shard: SequenceShard):
    """The whole batch's loss and metrics on every rank from this rank's: the loss's value is the sum
    over the group, its gradient this rank's rows'; token means are re-weighted by the global count."""
    count = scored.sum().to(torch.float64)
    means = [k for k in metrics if k != "rollout_weight_max"]
    local = torch.stack([loss.detach().to(torch.float64), count]
                        + [metrics[k].detach().to(torch.float64) * count for k in means])
    total = sum_over_group(local, shard.group)
    whole = (loss - loss.detach()) + total[0].to(loss.dtype)  # exactly the total's bits, on every rank
    out = {k: (total[2 + i] / total[1].clamp(min=1)).to(metrics[k].dtype) for i, k in enumerate(means)}
    if "rollout_weight_max" in metrics:
        out["rollout_weight_max"] = torch.stack(_gather(metrics["rollout_weight_max"].reshape(1),
                                                        shard.group)).max()
    return whole, out
