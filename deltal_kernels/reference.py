"""The definition of the product: SPEC section 1 (and the objectives of section 2.1) in plain PyTorch.

Every backend is tested against this. It is differentiable through ordinary autograd, runs in the
logits' dtype promoted to at least float32 (float64 logits give a float64 truth), and like most
trainers it materialises [N, V] log-softmax tensors: readable, not fast.

``policy_loss`` computes logp_t and H_t from the logits, then ``objective_terms`` turns them into the
loss. The second half works on [N]-sized vectors only, so the package's own path for the objectives
beyond per-token PPO (GSPO's sequence ratio, CISPO, rollout correction, separate KL/entropy weights)
runs it too, on the kernels' logp_t and H_t, between their statistics pass and their gradient pass;
those formulas are checked against TRL's and verl's own implementations and hand-derived values.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from .output import PolicyLossOutput, token_means
from .validation import Batch, prepare

LOG_RATIO_CLAMP = 20.0
K3_CLAMP = 10.0


def policy_loss(logits, targets, old_logprobs, advantages, cu_seqlens, *, loss_mask=None, ref_logprobs=None,
                weights=None, agg="delta-l", alpha=1.0, max_len=None, clip_low=0.2, clip_high=0.2,
                dual_clip=None, kl_coef=0.0, kl_type="k3", entropy_coef=0.0, temperature=1.0,
                ratio_level="token", objective="ppo", rollout_logprobs=None, rollout_correction=None,
                rollout_clip=(None, 3.0), kl_entropy_agg=None, kl_entropy_weights=None,
                with_entropy=False, inplace_backward=False, backend="auto") -> PolicyLossOutput:
    """Same signature and result as ``deltal_kernels.policy_loss``; ``inplace_backward`` and
    ``backend`` are accepted for signature parity and ignored."""
    b = prepare(logits, targets, old_logprobs, advantages, cu_seqlens, loss_mask=loss_mask,
                ref_logprobs=ref_logprobs, weights=weights, agg=agg, alpha=alpha, max_len=max_len,
                clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef,
                kl_type=kl_type, entropy_coef=entropy_coef, temperature=temperature, with_entropy=with_entropy,
                ratio_level=ratio_level, objective=objective, rollout_logprobs=rollout_logprobs,
                rollout_correction=rollout_correction, rollout_clip=rollout_clip, kl_entropy_agg=kl_entropy_agg,
                kl_entropy_weights=kl_entropy_weights)
    dtype = b.advantages.dtype
    N = b.scored.shape[0]
    rows = b.scored.nonzero().squeeze(1)  # only scored rows take part; the others get zero gradient

    def full(v):  # per-row values over all N rows, 0 where not scored (differentiable w.r.t. v)
        return torch.zeros(N, dtype=dtype, device=logits.device).index_copy(0, rows, v.to(dtype))

    # logp_t = log_softmax(x_t / tau)[y_t]
    x = logits[rows].to(dtype) / b.params.temperature
    log_probs = torch.log_softmax(x, dim=-1)
    logp = full(log_probs.gather(-1, b.targets[rows, None]).squeeze(-1))

    # H_t = entropy of softmax(x_t / tau)
    entropy = None
    if b.need_entropy:  # p log p is 0 where p = 0 (a -inf logit: a masked vocabulary entry)
        entropy = full(-(log_probs.exp() * torch.where(log_probs.isneginf(), 0.0, log_probs)).sum(-1))

    loss, metrics = objective_terms(logp, entropy, b)
    return PolicyLossOutput(loss=loss, logprobs=logp.detach(), entropy=None if entropy is None else entropy.detach(),
                            metrics=metrics)


def objective_terms(logp: Tensor, entropy: Optional[Tensor], b: Batch) -> Tuple[Tensor, Dict[str, Tensor]]:
    """The loss and the metrics from logp_t and H_t ([N], 0 on unscored rows; differentiable).

    loss = sum_t w_t * c_t * pg_t + sum_t w'_t * (kl_coef * kl_t - entropy_coef * H_t), with w_t the row's
    sequence weight, c_t the rollout correction weight (1 without one) and w'_t = w_t unless
    kl_entropy_agg/kl_entropy_weights give other weights.
    """
    p, o = b.params, b.objective
    old, A, w = b.old_logprobs, b.advantages, b.row_weights

    # r_t = exp(clamp(logp_t - old_logp_t, -20, 20)); GSPO ("sequence"): the log-ratio's value is its
    # sequence's mean over scored rows, its gradient that of the token's own logp_t (GSPO-token form)
    log_ratio = logp - old
    if o.ratio_level == "sequence":
        log_ratio = logp - logp.detach() + segment_mean(log_ratio.detach(), b)
    ratio = torch.exp(torch.clamp(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    lo, hi = 1.0 - p.clip_low, 1.0 + p.clip_high

    dual_active = torch.zeros_like(b.scored)
    if o.objective == "ppo":
        # pg_t = max(-A_t * r_t, -A_t * clamp(r_t, 1 - clip_low, 1 + clip_high))
        pg_unclipped = -A * ratio
        pg_clipped = -A * torch.clamp(ratio, lo, hi)
        pg = torch.maximum(pg_unclipped, pg_clipped)
        clipped = pg_clipped > pg_unclipped
        # dual clip: if A_t < 0, pg_t = min(pg_t, -A_t * c)
        if p.dual_clip:
            lower = -A * p.dual_clip
            dual_active = (A < 0) & (pg > lower)
            pg = torch.where(A < 0, torch.minimum(pg, lower), pg)
    else:
        # CISPO: pg_t = -sg(clamp(r_t, 1 - clip_low, 1 + clip_high)) * A_t * logp_t
        clamped = torch.clamp(ratio, lo, hi).detach()
        pg = -clamped * A * logp
        clipped = (clamped != ratio.detach()) & b.scored

    # rollout correction: a weight on the policy term only, never differentiated
    rollout = rollout_weights(b)
    if rollout is not None:
        pg = pg * rollout

    # kl_t against the reference policy (a metric; in the loss when kl_coef != 0)
    kl = None
    if b.ref_logprobs is not None:
        ref = b.ref_logprobs
        if p.kl_type == 1:  # k1
            kl = logp - ref
        elif p.kl_type == 2:  # k2
            kl = 0.5 * (logp - ref) ** 2
        else:  # k3, with d = clamp(ref - logp, -20, 20), result clamped to [-10, 10]
            d = torch.clamp(ref - logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
            kl = torch.clamp(torch.exp(d) - d - 1.0, -K3_CLAMP, K3_CLAMP)
        kl = torch.where(b.scored, kl, torch.zeros_like(kl))

    # l_t = pg_t + kl_coef * kl_t - entropy_coef * H_t, and loss = sum_i w_i * sum_{scored t in i} l_t
    other = torch.zeros_like(pg)
    if kl is not None and p.kl_coef != 0.0:
        other = other + p.kl_coef * kl
    if entropy is not None and p.entropy_coef != 0.0:
        other = other - p.entropy_coef * entropy
    if b.kl_entropy_row_weights is None:
        loss = (w * (pg + other)).sum()
    else:
        loss = (w * pg).sum() + (b.kl_entropy_row_weights * other).sum()

    dtype = logp.dtype
    metrics = token_means(
        b.scored,
        clipfrac=clipped.to(dtype),
        clipfrac_lower=dual_active.to(dtype),
        approx_kl=(old - logp).detach(),  # both 0 on unscored rows
        kl=None if kl is None else kl.detach(),
        entropy=None if entropy is None else entropy.detach(),
        rollout_weight_mean=rollout,
        rollout_masked_frac=None if rollout is None or not o.rollout_correction.endswith("mask") else
        ((rollout == 0) & b.scored).to(dtype),
    )
    if rollout is not None:
        metrics["rollout_weight_max"] = rollout.max() if rollout.numel() else rollout.new_zeros(())
    return loss, metrics


def segment_sum(x: Tensor, b: Batch) -> Tensor:
    """[N]: for each row, the sum of x over the rows of its sequence (x is 0 on unscored rows). Prefix
    sums in float64: exact enough for any batch, deterministic on every device, no atomics. With
    sequence-parallel rows, over every rank's rows of the sequence (x must then be detached: the sum
    over the group carries no gradient, and every use here is of detached values)."""
    csum = torch.cat([x.new_zeros(1, dtype=torch.float64), torch.cumsum(x.to(torch.float64), 0)])
    per_seq = csum[b.cu_seqlens[1:]] - csum[b.cu_seqlens[:-1]]
    if b.sequences is not None:
        from .parallel import sum_over_group

        assert not x.requires_grad, "segment_sum over a sequence-parallel group is not differentiable"
        per_seq = sum_over_group(per_seq, b.sequences.group)
    return per_seq[b.seq].to(x.dtype)


def segment_mean(x: Tensor, b: Batch) -> Tensor:
    """[N]: for each row, the mean of x over the scored rows of its sequence."""
    count = segment_sum(b.scored.to(x.dtype), b)
    return segment_sum(x, b) / count.clamp(min=1)


def rollout_weights(b: Batch) -> Optional[Tensor]:
    """[N] c_t = exp(old_logp_t - rollout_logp_t) per token, or exp of its sum over the sequence's scored
    rows (each clamped to [-20, 20] first, as verl does), then clamped into rollout_clip (truncate) or
    zeroed outside it (mask); 0 on unscored rows; None without a rollout correction. A non-finite
    rollout log-prob counts as a zero difference (TRL's rule for log-probs the sampler did not return)."""
    o = b.objective
    if o.rollout_correction is None:
        return None
    diff = b.old_logprobs - b.rollout_logprobs
    diff = torch.where(b.scored & b.rollout_logprobs.isfinite(), diff, torch.zeros_like(diff))
    if o.rollout_correction.startswith("sequence"):
        diff = segment_sum(diff, b)
    c = torch.exp(torch.clamp(diff, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    lo, hi = o.rollout_clip
    if o.rollout_correction.endswith("truncate"):
        c = torch.clamp(c, min=lo, max=hi)
    else:
        keep = torch.ones_like(b.scored)
        if lo is not None:
            keep = keep & (c >= lo)
        if hi is not None:
            keep = keep & (c <= hi)
        c = torch.where(keep, c, torch.zeros_like(c))
    return torch.where(b.scored, c, torch.zeros_like(c)).detach()
