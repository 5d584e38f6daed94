"""backend="torch": the row contract of ``dispatch`` in PyTorch ops, chunked over rows.

It never holds more than a chunk of rows in float32, and it computes the derivatives explicitly
(as the kernels do) rather than through autograd, so it doubles as the readable template of what
every compiled backend computes per row. ``row_terms`` is the per-row epilogue shared by every
backend written in Python (the compiled backends carry the same formulas in their kernels).
"""
from __future__ import annotations

import bisect
from typing import Optional

import torch

from .reference import K3_CLAMP, LOG_RATIO_CLAMP
from .validation import LossParams

# rows per chunk: about 2^22 elements (16 MB of float32) per [rows, V] temporary
CHUNK_ELEMENTS = 1 << 22

FLAG_CLIPPED = 1  # pg_t took the clipped branch
FLAG_DUAL_CLIPPED = 2  # the dual clip bound was active


def unavailable_reason(device: torch.device) -> Optional[str]:
    return None  # runs wherever PyTorch runs


def _chunks(n: int, V: int):
    step = max(1, CHUNK_ELEMENTS // max(V, 1))
    for start in range(0, n, step):
        yield start, min(n, start + step)


def _row_sums(x):
    """x.sum(-1) for x [rows, V], each row summed whole by one thread: a row's bits do not depend on
    the other rows, the thread count or the chunking.

    PyTorch's CPU reduction gives each thread whole output elements, all summed by the same serial
    loop, except when there is exactly one output element (and at least 32768 inputs): that one row is
    then split across the threads and their partial sums added (TensorIterator's two-pass reduction),
    which rounds differently. A lone row is therefore summed as two stride-0 copies of itself, which
    takes the per-output path (with 1 thread, or 2 threads taking one copy each).
    """
    if x.shape[0] == 1:
        return x.expand(2, -1).sum(-1)[:1]
    return x.sum(-1)


def _centered(z):
    """Each row of z [rows, V] relative to its maximum m: (m [rows, 1], z - m, log s [rows]) with
    s = sum exp(z - m), so that logsumexp(z) = m + log s. NaN, +inf and all -inf rows give NaN."""
    m = z.amax(-1, keepdim=True)
    zc = z - m
    return m, zc, torch.log(_row_sums(torch.exp(zc)))


def row_terms(logp, entropy, old, ref, adv, p: LossParams):
    """Per-row loss l_t, dl_t/dlogp_t, kl_t and flags from logp_t and H_t (SPEC section 1).

    Derivatives follow autograd's conventions on the reference: a clamp passes the gradient on its
    closed interval; where the clipped PPO branch is strictly larger, or the dual clip bound is
    strictly smaller, the gradient is 0.
    """
    log_ratio = logp - old
    ratio = torch.exp(torch.clamp(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    dratio = torch.where(log_ratio.abs() <= LOG_RATIO_CLAMP, ratio, torch.zeros_like(ratio))
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * torch.clamp(ratio, 1.0 - p.clip_low, 1.0 + p.clip_high)
    clipped = pg_clipped > pg_unclipped
    pg = torch.where(clipped, pg_clipped, pg_unclipped)
    dpg = torch.where(clipped, torch.zeros_like(ratio), -adv * dratio)
    dual = torch.zeros_like(clipped)
    if p.dual_clip:
        lower = -adv * p.dual_clip
        dual = (adv < 0) & (pg > lower)
        pg = torch.where(dual, lower, pg)
        dpg = torch.where(dual, torch.zeros_like(dpg), dpg)

    kl = torch.zeros_like(logp)
    dkl = torch.zeros_like(logp)
    if p.kl_type == 1:
        kl, dkl = logp - ref, torch.ones_like(logp)
    elif p.kl_type == 2:
        kl, dkl = 0.5 * (logp - ref) ** 2, logp - ref
    elif p.kl_type == 3:
        diff = ref - logp
        d = torch.clamp(diff, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        value = torch.exp(d) - d - 1.0
        kl = torch.clamp(value, -K3_CLAMP, K3_CLAMP)
        passes = (diff.abs() <= LOG_RATIO_CLAMP) & (value <= K3_CLAMP)
        dkl = torch.where(passes, -(torch.exp(d) - 1.0), torch.zeros_like(d))

    loss, dlogp = pg, dpg
    if p.kl_coef != 0.0:  # kl_t stays a metric otherwise: a NaN ref_logprobs must not reach the loss (0 * NaN)
        loss = loss + p.kl_coef * kl
        dlogp = dlogp + p.kl_coef * dkl
    if p.entropy_coef != 0.0:
        loss = loss - p.entropy_coef * entropy
    flags = clipped.to(torch.uint8) * FLAG_CLIPPED + dual.to(torch.uint8) * FLAG_DUAL_CLIPPED
    return loss, dlogp, kl, flags


def forward_rows(logits, targets, scored, old_logprobs, ref_logprobs, advantages, p: LossParams, need_entropy):
    """The forward row contract (see ``dispatch.rows_forward``)."""
    N, V = logits.shape
    dtype = old_logprobs.dtype
    logp = torch.zeros(N, dtype=dtype, device=logits.device)
    entropy = torch.zeros_like(logp)
    lse = torch.zeros_like(logp)
    rows = scored.nonzero().squeeze(1)  # unscored rows do no V work
    for start, end in _chunks(rows.numel(), V):
        idx = rows[start:end]
        z = logits[idx].to(dtype) / p.temperature
        # everything relative to the row maximum m (NaN, +inf and all -inf rows give NaN, as in the
        # reference): logp = (z_y - m) - log s keeps log V when |m| is huge, and the entropy
        # log s - sum p (z - m) does not cancel two large numbers
        m, zc, log_s = _centered(z)
        lse[idx] = m.squeeze(1) + log_s
        logp[idx] = zc.gather(1, targets[idx, None]).squeeze(1) - log_s
        if need_entropy:  # p (z - m) is 0 where p = 0 (a -inf logit)
            probs = torch.exp(zc - log_s[:, None])
            entropy[idx] = log_s - _row_sums(probs * torch.where(zc.isneginf(), 0.0, zc))
    loss, dlogp, kl, flags = row_terms(logp, entropy, old_logprobs, ref_logprobs, advantages, p)
    zero = torch.zeros((), dtype=dtype, device=logits.device)
    return (logp, entropy, lse, torch.where(scored, loss, zero), torch.where(scored, dlogp, zero),
            torch.where(scored, kl, zero), torch.where(scored, flags, torch.zeros_like(flags)))


def grad_rows(logits, targets, lse, entropy, g, h, temperature, out):
    """The gradient row contract (see ``dispatch.rows_grad``): writes dL/dlogits into ``out``.

    dL/dx = (g * (onehot(y) - p) - h * p * (log p + H)) / tau; ``out`` may be ``logits`` itself.
    """
    N, V = logits.shape
    dtype = g.dtype
    # From |lse| = 0.5 / eps (2^22 in float32) on, the spacing of lse is >= 0.5, comparable to log V:
    # lse = m + log s has lost (part of) log s to rounding, and z - lse would misplace every p (p = 1 for
    # V uniform logits of 1e30). Such rows, rare enough to be listed once (in order), get log p =
    # (z - m) - log s from m and log s reduced again, as the forward's logp is; z is the forward's own
    # rounded x / tau, so z - m is exact near the maximum at any temperature.
    huge = (lse.abs() >= 0.5 / torch.finfo(dtype).eps).nonzero().squeeze(1).tolist()
    for start, end in _chunks(N, V):
        z = logits[start:end].to(dtype) / temperature
        log_p = z - lse[start:end, None]
        redo = huge[bisect.bisect_left(huge, start):bisect.bisect_left(huge, end)]
        if redo:
            redo = torch.tensor(redo, device=z.device) - start
            _, zc, log_s = _centered(z[redo])
            log_p[redo] = zc - log_s[:, None]
        gc, hc = g[start:end, None], h[start:end, None]
        # untouched rows are exact zeros whatever their logits hold; a row whose softmax is NaN (a NaN or
        # +inf logit) gets NaN, as the reference's log_softmax backward gives, whatever g and h are
        active = (gc != 0) | (hc != 0) | lse[start:end, None].isnan()
        grad = _logit_grad(log_p, targets[start:end, None], gc, gc, hc, entropy[start:end, None], temperature, active)
        out[start:end] = grad.to(out.dtype)


def _logit_grad(log_p, cols, target_g, g, h, entropy, temperature, active):
    """dL/dx = (g * (onehot - p) - h * p * (log p + H)) / tau of a chunk of rows from their log p, with
    target_g added at column cols of each row (g, or 0 where the target is not among the columns);
    exact zeros on the rows that are not active."""
    probs = torch.exp(log_p)
    log_p = torch.where(log_p.isneginf(), 0.0, log_p)  # p log p is 0 where p = 0
    grad = -g * probs
    grad.scatter_add_(1, cols, target_g)
    grad -= h * probs * (log_p + entropy)
    return torch.where(active, grad / temperature, torch.zeros_like(grad))


# ---- vocabulary shards (tensor-parallel logits): the columns [vocab_start, vocab_start + V) of each row ----

def _shard_columns(targets, vocab_start: int, V: int):
    """The targets' columns in the shard (clamped into it) and whether the shard holds them: targets are
    global ids, any value."""
    inside = (targets >= vocab_start) & (targets - vocab_start < V)
    return (targets - vocab_start).clamp(0, V - 1), inside


def shard_stats(logits, targets, scored, vocab_start, temperature, need_entropy):
    """The shard row contract (see ``dispatch``): m = max z, s = sum exp(z - m), u = sum exp(z - m) (z - m)
    (0 unless need_entropy) and zt = z of the target where this shard holds it (else 0), z = x / tau as
    ``forward_rows`` computes it. Unscored rows: m = -inf, s = u = zt = 0, no V work. Merged in rank order
    (row_math.h's softmax_merge), the shards' statistics are the row's."""
    N, V = logits.shape
    dtype = torch.promote_types(logits.dtype, torch.float32)
    m = torch.full((N,), -torch.inf, dtype=dtype, device=logits.device)
    s = torch.zeros_like(m)
    u = torch.zeros_like(m)
    zt = torch.zeros_like(m)
    rows = scored.nonzero().squeeze(1)
    for start, end in _chunks(rows.numel(), V):
        idx = rows[start:end]
        z = logits[idx].to(dtype) / temperature
        mc = z.amax(-1, keepdim=True)  # NaN with a NaN logit; inf - inf = NaN with a +inf one: s is NaN
        # a shard of -inf only is the empty part {-inf, 0, 0}: its offsets from 0 are -inf, exp 0
        zc = z - torch.where(mc.isneginf(), 0.0, mc)
        e = torch.exp(zc)
        m[idx] = mc.squeeze(1)
        s[idx] = _row_sums(e)
        if need_entropy:  # e (z - m) is 0 where e = 0 (a -inf logit)
            u[idx] = _row_sums(e * torch.where(zc.isneginf(), 0.0, zc))
        cols, inside = _shard_columns(targets[idx], vocab_start, V)
        zt[idx] = torch.where(inside, z.gather(1, cols[:, None]).squeeze(1), 0.0)
    return m, s, u, zt


def shard_grad_rows(logits, targets, vocab_start, m, log_s, entropy, g, h, temperature, out):
    """The shard gradient contract (see ``dispatch``): ``grad_rows``' dL/dx of the shard's columns from the
    merged row statistics, with log p = (z - m) - log s (a float32 lse = m + log s would lose log s where
    |m| is huge). Rows with g = h = 0 get exact zeros unless m or log s is NaN (then NaN, as grad_rows
    gives for a NaN lse); ``out`` may be ``logits`` itself."""
    N, V = logits.shape
    for start, end in _chunks(N, V):
        z = logits[start:end].to(m.dtype) / temperature
        mc, log_sc = m[start:end, None], log_s[start:end, None]
        log_p = (z - mc) - log_sc
        gc, hc = g[start:end, None], h[start:end, None]
        cols, inside = _shard_columns(targets[start:end, None], vocab_start, V)
        active = (gc != 0) | (hc != 0) | mc.isnan() | log_sc.isnan()
        grad = _logit_grad(log_p, cols, torch.where(inside, gc, 0.0), gc, hc, entropy[start:end, None], temperature,
                           active)
        out[start:end] = grad.to(out.dtype)
