"""Triton kernels of the row contract (see ``deltal_kernels.dispatch``).

Two kernels, both a persistent grid-stride loop over rows (one row per program when
N <= MAX_PROGRAMS, which is the common case; no grid dimension limits N):

``_forward_kernel``
    One online-softmax pass over V per scored row: the logits are read in their own dtype, scaled
    by 1/tau and reduced in float32 (running max m, sum-exp s and, for the entropy, the running
    sum of e^(z-m) * (z-m)), then the per-row epilogue of ``torch_backend.row_terms`` (PPO clip,
    dual clip, k1/k2/k3, entropy bonus, dl/dlogp, flags) runs on the row's scalars in registers.
    Unscored rows do no V work: they write zeros to their [N] outputs and move on.
    With WRITE_GRAD (the fused mode, ``forward_grad_rows``) the program then makes a second pass
    over the row it just reduced and writes the row's gradient with ``_grad_row``, the same code
    as the gradient kernel, so fused and separate gradients are the same bits.

``_grad_kernel`` (per row: ``_grad_row``)
    dL/dx = (g * (onehot(y) - p) - h * p * (log p + H)) / tau with p recomputed from the saved lse,
    written in the output's dtype. Rows with g == 0 and h == 0 store zeros without reading the
    logits. ``out`` may alias ``logits`` (in-place backward): each chunk is read before it is
    written and programs own disjoint rows.

Offsets: a row's base is ``row (int64) * stride`` and every column offset is added to that 64-bit
base, so N * V >= 2^31 is safe. ``tl.cast`` (not ``.to``) is used because under TRITON_INTERPRET
a loop variable may be a plain Python int.
"""
from __future__ import annotations

import triton
import triton.language as tl

# Globals a @triton.jit function reads must be tl.constexpr (the GPU compiler rejects plain ones;
# the interpreter does not check).
LOG_RATIO_CLAMP = tl.constexpr(20.0)  # deltal_kernels.reference.LOG_RATIO_CLAMP
K3_CLAMP = tl.constexpr(10.0)  # deltal_kernels.reference.K3_CLAMP
NEG_BIG = tl.constexpr(-3.4028234663852886e38)  # -FLT_MAX: a finite start for the running max (no inf * 0)


@triton.jit
def _round_to(x, DTYPE: tl.constexpr, BF16_BY_HAND: tl.constexpr):
    """float32 -> DTYPE, rounding to nearest even.

    The GPU's conversion is round-to-nearest-even. Triton's interpreter (3.8) truncates
    float32 -> bfloat16 instead (and its explicit "rtne" mode mishandles a carry into the
    exponent), so under the interpreter bfloat16 is rounded here with integer ops; a GPU build
    passes BF16_BY_HAND=False and uses the hardware conversion. (Inf is kept; NaN stays NaN.)
    """
    if BF16_BY_HAND and DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def _forward_kernel(
    logits_ptr, stride_row, targets_ptr, scored_ptr, old_ptr, ref_ptr, adv_ptr,
    logp_ptr, entropy_ptr, lse_ptr, loss_ptr, dlogp_ptr, kl_ptr, flags_ptr,
    N, V, inv_tau, ratio_lo, ratio_hi, dual_clip, kl_coef, entropy_coef,
    weights_ptr, grad_ptr, stride_grad, grad_scale,
    KL_TYPE: tl.constexpr, HAS_DUAL: tl.constexpr, NEED_ENTROPY: tl.constexpr,
    ENTROPY_IN_LOSS: tl.constexpr, BLOCK: tl.constexpr, WRITE_GRAD: tl.constexpr, BF16_BY_HAND: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    for row in tl.range(pid, N, nprog):
        row64 = tl.cast(row, tl.int64)
        scored = tl.load(scored_ptr + row64)
        if scored != 0:
            x_row = logits_ptr + row64 * stride_row  # 64-bit row base
            m = tl.cast(NEG_BIG, tl.float32)  # running max of z = x / tau
            s = tl.cast(0.0, tl.float32)  # running sum of exp(z - m)
            t = tl.cast(0.0, tl.float32)  # running sum of exp(z - m) * (z - m)  (entropy)
            for start in tl.range(0, V, BLOCK):
                offs = start + cols
                mask = offs < V
                z = tl.load(x_row + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_tau
                m_new = tl.maximum(m, tl.max(z, axis=0))
                alpha = tl.exp(m - m_new)
                zc = z - m_new  # -inf on the masked tail
                e = tl.exp(zc)  # 0 on the masked tail
                if NEED_ENTROPY:
                    # re-centre the old partial sum on m_new: sum e'(z - m_new) = alpha (t + (m - m_new) s)
                    # (e > 0: the masked tail and -inf logits add 0, not 0 * -inf)
                    t = alpha * (t + (m - m_new) * s) + tl.sum(e * tl.where(e > 0.0, zc, 0.0), axis=0)
                s = s * alpha + tl.sum(e, axis=0)
                m = m_new
            log_s = tl.log(s)
            target = tl.load(targets_ptr + row64)
            # validation rejects targets outside [0, V) eagerly, but not under torch.compile: an
            # out-of-range target gives logp = NaN here instead of a read out of bounds
            z_y = tl.load(x_row + target, mask=(target >= 0) & (target < V), other=float("nan"))
            z_y = z_y.to(tl.float32) * inv_tau
            logp = (z_y - m) - log_s
            lse = m + log_s
            if NEED_ENTROPY:
                entropy = log_s - t / s  # -sum p log p = log s - sum p (z - m)
            else:
                entropy = tl.cast(0.0, tl.float32)

            # ---- per-row epilogue: torch_backend.row_terms on scalars ----
            old = tl.load(old_ptr + row64)
            adv = tl.load(adv_ptr + row64)
            log_ratio = logp - old
            ratio = tl.exp(tl.minimum(tl.maximum(log_ratio, -LOG_RATIO_CLAMP), LOG_RATIO_CLAMP))
            dratio = tl.where(tl.abs(log_ratio) <= LOG_RATIO_CLAMP, ratio, 0.0)
            pg_unclipped = -adv * ratio
            pg_clipped = -adv * tl.minimum(tl.maximum(ratio, ratio_lo), ratio_hi)
            clipped = pg_clipped > pg_unclipped
            pg = tl.where(clipped, pg_clipped, pg_unclipped)
            dpg = tl.where(clipped, 0.0, -adv * dratio)
            flags = tl.where(clipped, 1, 0)
            if HAS_DUAL:
                lower = -adv * dual_clip
                dual = (adv < 0.0) & (pg > lower)
                pg = tl.where(dual, lower, pg)
                dpg = tl.where(dual, 0.0, dpg)
                flags = flags + tl.where(dual, 2, 0)

            if KL_TYPE == 1:
                ref = tl.load(ref_ptr + row64)
                kl = logp - ref
                dkl = tl.cast(1.0, tl.float32)
            elif KL_TYPE == 2:
                ref = tl.load(ref_ptr + row64)
                kl = 0.5 * (logp - ref) * (logp - ref)
                dkl = logp - ref
            elif KL_TYPE == 3:
                ref = tl.load(ref_ptr + row64)
                diff = ref - logp
                d = tl.minimum(tl.maximum(diff, -LOG_RATIO_CLAMP), LOG_RATIO_CLAMP)
                exp_d = tl.exp(d)
                value = exp_d - d - 1.0
                kl = tl.minimum(tl.maximum(value, -K3_CLAMP), K3_CLAMP)
                passes = (tl.abs(diff) <= LOG_RATIO_CLAMP) & (value <= K3_CLAMP)
                dkl = tl.where(passes, -(exp_d - 1.0), 0.0)
            else:
                kl = tl.cast(0.0, tl.float32)
                dkl = tl.cast(0.0, tl.float32)

            loss = pg + kl_coef * kl
            if ENTROPY_IN_LOSS:
                loss = loss - entropy_coef * entropy
            dlogp = dpg + kl_coef * dkl

            if WRITE_GRAD:
                # the gradient of grad_scale * sum_t w_t l_t, as dispatch's backward forms it from
                # d_loss = grad_output * w_t; a second pass over the row, which is still in L2 for
                # most rows, instead of a full re-read of the logits in the backward launch
                d_loss = grad_scale * tl.load(weights_ptr + row64)
                _grad_row(x_row, grad_ptr + row64 * stride_grad, V, target, lse, entropy,
                          d_loss * dlogp, d_loss * -entropy_coef, inv_tau, BLOCK, BF16_BY_HAND)
        else:  # unscored: no V work, zeros in every output
            zero = tl.cast(0.0, tl.float32)
            logp, entropy, lse, loss, dlogp, kl = zero, zero, zero, zero, zero, zero
            flags = tl.cast(0, tl.int32)
            if WRITE_GRAD:
                _grad_row(logits_ptr, grad_ptr + row64 * stride_grad, V, 0, zero, zero, zero, zero, inv_tau,
                          BLOCK, BF16_BY_HAND)
        tl.store(logp_ptr + row64, logp)
        tl.store(entropy_ptr + row64, entropy)
        tl.store(lse_ptr + row64, lse)
        tl.store(loss_ptr + row64, loss)
        tl.store(dlogp_ptr + row64, dlogp)
        tl.store(kl_ptr + row64, kl)
        tl.store(flags_ptr + row64, flags.to(tl.uint8))


@triton.jit
def _grad_row(x_row, out_row, V, target, lse, entropy, g, h, inv_tau, BLOCK: tl.constexpr,
              BF16_BY_HAND: tl.constexpr):
    """One row of dL/dx = (g * (onehot(y) - p) - h * p * (log p + H)) / tau, written to out_row."""
    cols = tl.arange(0, BLOCK)
    if (g != 0.0) | (h != 0.0):
        for start in tl.range(0, V, BLOCK):
            offs = start + cols
            mask = offs < V
            x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            log_p = tl.where(mask, x * inv_tau - lse, 0.0)  # finite on the tail (never stored)
            p = tl.exp(log_p)
            # p * (log p + H) is 0 where p is 0 (a -inf logit), not 0 * -inf
            grad = tl.where(offs == target, g, 0.0) - g * p - h * p * tl.where(p > 0.0, log_p + entropy, 0.0)
            tl.store(out_row + offs, _round_to(grad * inv_tau, out_row.dtype.element_ty, BF16_BY_HAND), mask=mask)
    else:  # g == h == 0 (unscored or zero-weight rows): exact zeros, the logits are not read
        zeros = tl.zeros([BLOCK], dtype=out_row.dtype.element_ty)
        for start in tl.range(0, V, BLOCK):
            offs = start + cols
            tl.store(out_row + offs, zeros, mask=offs < V)


@triton.jit
def _grad_kernel(
    logits_ptr, stride_x, out_ptr, stride_out, targets_ptr, lse_ptr, entropy_ptr, g_ptr, h_ptr,
    N, V, inv_tau, BLOCK: tl.constexpr, BF16_BY_HAND: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    for row in tl.range(pid, N, nprog):
        row64 = tl.cast(row, tl.int64)
        g = tl.load(g_ptr + row64)
        h = tl.load(h_ptr + row64)
        # lse/entropy/target are only used when g or h != 0 (loading them is harmless otherwise)
        _grad_row(logits_ptr + row64 * stride_x, out_ptr + row64 * stride_out, V,  # 64-bit row bases
                  tl.load(targets_ptr + row64), tl.load(lse_ptr + row64), tl.load(entropy_ptr + row64),
                  g, h, inv_tau, BLOCK, BF16_BY_HAND)
