"""The definition of the product: SPEC section 1 in plain PyTorch, line by line.

Every backend is tested against this. It is differentiable through ordinary autograd, runs in the
logits' dtype promoted to at least float32 (float64 logits give a float64 truth), and like most
trainers it materialises [N, V] log-softmax tensors: readable, not fast.
"""
from __future__ import annotations

import torch

from .output import PolicyLossOutput, token_means
from .validation import prepare

LOG_RATIO_CLAMP = 20.0
K3_CLAMP = 10.0


def policy_loss(logits, targets, old_logprobs, advantages, cu_seqlens, *, loss_mask=None, ref_logprobs=None,
                weights=None, agg="delta-l", alpha=1.0, max_len=None, clip_low=0.2, clip_high=0.2,
                dual_clip=None, kl_coef=0.0, kl_type="k3", entropy_coef=0.0, temperature=1.0,
                with_entropy=False, inplace_backward=False, backend="auto") -> PolicyLossOutput:
    """Same signature and result as ``deltal_kernels.policy_loss``; ``inplace_backward`` and
    ``backend`` are accepted for signature parity and ignored."""
    b = prepare(logits, targets, old_logprobs, advantages, cu_seqlens, loss_mask=loss_mask,
                ref_logprobs=ref_logprobs, weights=weights, agg=agg, alpha=alpha, max_len=max_len,
                clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef,
                kl_type=kl_type, entropy_coef=entropy_coef, temperature=temperature, with_entropy=with_entropy)
    p = b.params
    dtype = b.advantages.dtype
    rows = b.scored.nonzero().squeeze(1)  # only scored rows take part; the others get zero gradient

    # logp_t = log_softmax(x_t / tau)[y_t]
    x = logits[rows].to(dtype) / p.temperature
    log_probs = torch.log_softmax(x, dim=-1)
    logp = log_probs.gather(-1, b.targets[rows, None]).squeeze(-1)
    old, A, w = b.old_logprobs[rows], b.advantages[rows], b.row_weights[rows]

    # r_t = exp(clamp(logp_t - old_logp_t, -20, 20))
    ratio = torch.exp(torch.clamp(logp - old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    # pg_t = max(-A_t * r_t, -A_t * clamp(r_t, 1 - clip_low, 1 + clip_high))
    pg_unclipped = -A * ratio
    pg_clipped = -A * torch.clamp(ratio, 1.0 - p.clip_low, 1.0 + p.clip_high)
    pg = torch.maximum(pg_unclipped, pg_clipped)
    clipped = pg_clipped > pg_unclipped
    # dual clip: if A_t < 0, pg_t = min(pg_t, -A_t * c)
    dual_active = torch.zeros_like(clipped)
    if p.dual_clip:
        lower = -A * p.dual_clip
        dual_active = (A < 0) & (pg > lower)
        pg = torch.where(A < 0, torch.minimum(pg, lower), pg)

    # kl_t against the reference policy
    kl = None
    if b.ref_logprobs is not None:
        ref = b.ref_logprobs[rows]
        if p.kl_type == 1:  # k1
            kl = logp - ref
        elif p.kl_type == 2:  # k2
            kl = 0.5 * (logp - ref) ** 2
        else:  # k3, with d = clamp(ref - logp, -20, 20), result clamped to [-10, 10]
            d = torch.clamp(ref - logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
            kl = torch.clamp(torch.exp(d) - d - 1.0, -K3_CLAMP, K3_CLAMP)

    # H_t = entropy of softmax(x_t / tau)
    entropy = None
    if b.need_entropy:  # p log p is 0 where p = 0 (a -inf logit: a masked vocabulary entry)
        entropy = -(log_probs.exp() * torch.where(log_probs.isneginf(), 0.0, log_probs)).sum(-1)

    # l_t = pg_t + kl_coef * kl_t - entropy_coef * H_t
    loss_t = pg
    if kl is not None and p.kl_coef != 0.0:
        loss_t = loss_t + p.kl_coef * kl
    if entropy is not None and p.entropy_coef != 0.0:
        loss_t = loss_t - p.entropy_coef * entropy

    # loss = sum_i w_i * sum_{scored t in i} l_t
    loss = (w * loss_t).sum()

    def full(v):  # per-row result over all N rows, 0 where not scored, detached
        out = torch.zeros(b.scored.shape[0], dtype=dtype, device=logits.device)
        return out.index_copy(0, rows, v.detach().to(dtype))

    metrics = token_means(
        b.scored,
        clipfrac=full(clipped.to(dtype)),
        clipfrac_lower=full(dual_active.to(dtype)),
        approx_kl=full(old - logp),
        kl=None if kl is None else full(kl),
        entropy=None if entropy is None else full(entropy),
    )
    return PolicyLossOutput(loss=loss, logprobs=full(logp), entropy=None if entropy is None else full(entropy),
                            metrics=metrics)
