"""Triton kernels of vocabulary-parallel rows: each rank holds the columns [vocab_start, vocab_start + V)
of every row (see ``deltal_kernels.triton.shard_stats`` and ``shard_grad_rows``).

``_shard_stats_kernel``
    The forward's reduction of a row (``_row_stats_checked``: the fast pass, the exact pass for huge
    logits) over one shard, stored in natural units as the parts a parallel layer merges in rank order
    (softmax_merge): m = m2 ln 2, s, u = t ln 2, and zt = m + (x_y k - m2) ln 2, the target's z where the
    target is in the shard. m and zt are both taken from the rounded log2-unit values the forward compares,
    so a target at the maximum has zt == m exactly, at any magnitude. No epilogue: the loss needs the
    merged row.

``_shard_grad_kernel``
    ``_grad_row`` with SHARD: the row's gradient from the merged m and log s (lse = m + log s on the
    streaming loops; huge rows take the offsets (x k rounded) ln 2 rounded - m, between values rounded as
    the statistics' m was), the one-hot term only where the target is in the shard.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .logprob_loss import LN2, LOG2E, _grad_row, _row_stats_checked


@triton.jit
def _shard_stats_kernel(
    logits_ptr, stride_row, targets_ptr, scored_ptr, m_ptr, s_ptr, u_ptr, zt_ptr,
    N, V, vocab_start, inv_tau, NEED_ENTROPY: tl.constexpr, BLOCK: tl.constexpr,
    VEC: tl.constexpr = 8, ROW_ALIGNED: tl.constexpr = False, FAST_EXP: tl.constexpr = False,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    IS_BF16: tl.constexpr = logits_ptr.dtype.element_ty == tl.bfloat16
    IS_16BIT: tl.constexpr = (logits_ptr.dtype.element_ty == tl.bfloat16) | (logits_ptr.dtype.element_ty == tl.float16)
    k = inv_tau * LOG2E
    for row in tl.range(pid, N, nprog):
        row64 = tl.cast(row, tl.int64)
        scored = tl.load(scored_ptr + row64)
        if scored != 0:
            row_off = row64 * stride_row
            if ROW_ALIGNED:
                row_off = tl.multiple_of(row_off, VEC)
            x_row = logits_ptr + row_off
            target = tl.load(targets_ptr + row64) - vocab_start  # global id -> this shard's column
            in_shard = (target >= 0) & (target < V)
            x_y = tl.load(x_row + target, mask=in_shard, other=0.0).to(tl.float32)
            m2, s, t, zy_off = _row_stats_checked(x_row, x_y, V, k, BLOCK, VEC, IS_BF16, IS_16BIT, NEED_ENTROPY,
                                                  FAST_EXP)
            # a shard of -inf logits (s = 0, its maximum still the floor -FLT_MAX) is the empty part
            m = tl.where(s == 0.0, float("-inf"), m2 * LN2)
            u = t * LN2
            zt = tl.where(in_shard, m + zy_off * LN2, 0.0)
        else:  # unscored: the empty part, no V work
            m = tl.cast(float("-inf"), tl.float32)
            s = tl.cast(0.0, tl.float32)
            u = tl.cast(0.0, tl.float32)
            zt = tl.cast(0.0, tl.float32)
        tl.store(m_ptr + row64, m)
        tl.store(s_ptr + row64, s)
        tl.store(u_ptr + row64, u)
        tl.store(zt_ptr + row64, zt)


@triton.jit
def _shard_grad_kernel(
    logits_ptr, stride_x, out_ptr, stride_out, targets_ptr, m_ptr, log_s_ptr, entropy_ptr, g_ptr, h_ptr,
    N, V, vocab_start, inv_tau, BLOCK: tl.constexpr, BF16_BY_HAND: tl.constexpr,
    VEC: tl.constexpr = 8, ROW_ALIGNED: tl.constexpr = False, FAST_EXP: tl.constexpr = False,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    for row in tl.range(pid, N, nprog):
        row64 = tl.cast(row, tl.int64)
        x_off = row64 * stride_x
        out_off = row64 * stride_out
        if ROW_ALIGNED:
            x_off = tl.multiple_of(x_off, VEC)
            out_off = tl.multiple_of(out_off, VEC)
        x_row = logits_ptr + x_off
        target = tl.load(targets_ptr + row64) - vocab_start
        # x[y] before the row's first store (out may be the logits)
        x_y = tl.load(x_row + target, mask=(target >= 0) & (target < V), other=0.0).to(tl.float32)
        tl.debug_barrier()
        m = tl.load(m_ptr + row64)
        log_s = tl.load(log_s_ptr + row64)
        _grad_row(x_row, out_ptr + out_off, V, target, x_y, m + log_s, tl.load(entropy_ptr + row64),
                  tl.load(g_ptr + row64), tl.load(h_ptr + row64), inv_tau, BLOCK, BF16_BY_HAND, VEC, ROW_ALIGNED,
                  FAST_EXP, True, m, log_s)
