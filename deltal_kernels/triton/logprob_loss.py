"""Triton kernels of the row contract (see ``deltal_kernels.dispatch``).

Two kernels, both a persistent grid-stride loop over rows (one row per program when
N <= MAX_PROGRAMS, which is the common case; no grid dimension limits N):

``_forward_kernel``
    One online-softmax pass over V per scored row. A chunk of BLOCK logits is a [BLOCK // VEC, VEC]
    tile, VEC = 16 bytes of logits, so every thread owns whole 16-byte packets (one 128-bit load
    each) and keeps running statistics per packet slot: max m, sum of e = 2^d and sum of e * d, with
    d = x * log2(e) / tau - m in log2 units (one FFMA and one ex2 per element). The slots are merged
    once per row (three block reductions per row, none per chunk). Then the per-row epilogue of
    ``torch_backend.row_terms`` (PPO clip, dual clip, k1/k2/k3, entropy bonus, dl/dlogp, flags) runs
    on the row's scalars in registers. Unscored rows do no V work: they write zeros to their [N]
    outputs and move on. With WRITE_GRAD (the fused mode, ``forward_grad_rows``) the program then
    makes a second pass over the row it just reduced and writes the row's gradient with
    ``_grad_row``, the same code as the gradient kernel, so fused and separate gradients are the same
    bits.

``_grad_kernel`` (per row: ``_grad_row``)
    dL/dx = (g * (onehot(y) - p) - h * p * (log p + H)) / tau with p = 2^(x * log2(e) / tau - lse2)
    recomputed from the saved lse, written in the output's dtype: p * (b + a * d) with per-row
    constants a, b (4-6 instructions per element); the one-hot term is added to the target's element
    after the row (a barrier, then one store). Rows with g == 0 and h == 0 store zeros without
    reading the logits. Rows of huge logits (|lse| * log2(e) >= 2^24, where the float32 lse has lost
    log s) are first reduced again as the forward's exact pass does, and use m and log s instead: in
    the separate gradient by a launch of their own (ROWS = HUGE_ROWS), so that the ordinary launch
    (ORDINARY_ROWS) has no exact pass in its code (it took 34 registers more with Triton 3.6, and half
    the fp32 kernel's resident programs); the fused forward and the shard gradient keep both bodies.
    ``out`` may alias ``logits`` (in-place backward): each element is read by the thread that writes
    it, before it writes it; x[y] is read before the row's first store.

The vocabulary-parallel kernels of ``shard.py`` are built from the same pieces: the forward's row
reduction with its exact pass (``_row_stats_checked``) and ``_grad_row`` with SHARD (the whole row's
merged m and log s given).

The exponential: on the GPU ``ex2.approx.ftz.f32`` (MUFU.EX2; relative error <= 2^-22, see the README
"Numerics of the fast exp"); under the interpreter ``tl.exp2``.

Full chunks are loaded unmasked; the last chunk is masked to V rounded down to a whole packet
(still 128-bit loads), or element by element when V is not a multiple of VEC. With ROW_ALIGNED
(every row starts on a 16-byte boundary: the host checks the pointers and the row strides) the
row offsets are declared multiples of VEC, so aligned rows get 128-bit loads whatever V is.

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
NEG_BIG = tl.constexpr(-3.4028234663852886e38)  # -FLT_MAX: a finite floor for the running max (no inf - inf)
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# log2-unit offsets below this have 2^d == 0 in float32 (the ftz ex2 flushes below -126): the
# entropy terms e * d use d clamped here, so a -inf logit adds 0, not 0 * -inf
D_FLOOR = tl.constexpr(-1024.0)
# |max x * log2(e) / tau| from which the offsets are recomputed with rounded products (ulp >= 2 there)
HUGE_LOG2 = tl.constexpr(16777216.0)
# bfloat16 logits below this (-inf) are raised to it in the forward's fast pass: 2^(x k - m) is exactly 0
# for them beside any logit above -1e30 / 2^24 in the row, and e * d stays finite with no per-element
# clamp. A row whose maximum is this (every logit -inf) has |m| >= HUGE_LOG2 and is redone exactly.
BF16_FLOOR = tl.constexpr(-9.95135670051536e29)  # bfloat16 0xF149
BF16_FLOOR_X2 = tl.constexpr(0xF149F149)
# float16: -65504 (the lowest finite half). A row whose maximum is within 160 (log2 units) of the floor
# times log2(e) / tau could take mass from floored -inf values: it is redone exactly too.
F16_FLOOR = tl.constexpr(-65504.0)
F16_FLOOR_X2 = tl.constexpr(0xFBFFFBFF)


@triton.jit
def _exp2(x, FAST_EXP: tl.constexpr):
    """2^x: MUFU.EX2 (ex2.approx.ftz.f32) on the GPU, tl.exp2 under the interpreter."""
    if FAST_EXP:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.exp2(x)


@triton.jit
def _mul_rn(x, k, FAST_EXP: tl.constexpr):
    """x * k rounded on its own (never contracted into an FMA with a following subtraction)."""
    if FAST_EXP:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [x, tl.zeros_like(x) + k],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return x * k


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
def _tile(BLOCK: tl.constexpr, VEC: tl.constexpr):
    """Column offsets 0..BLOCK-1 as a [BLOCK // VEC, VEC] tile: one 16-byte packet per tile row."""
    return tl.arange(0, BLOCK // VEC)[:, None] * VEC + tl.arange(0, VEC)[None, :]


@triton.jit
def _word_tile(BLOCK: tl.constexpr, VEC: tl.constexpr):
    """32-bit word offsets of a chunk of 16-bit values, [BLOCK // VEC, VEC // 2]: two values a word."""
    return tl.arange(0, BLOCK // VEC)[:, None] * (VEC // 2) + tl.arange(0, VEC // 2)[None, :]


@triton.jit
def _half_words(ptr, BLOCK: tl.constexpr, VEC: tl.constexpr, n_words, MASKED: tl.constexpr, FLOOR: tl.constexpr,
                FAST_EXP: tl.constexpr, IS_BF16: tl.constexpr):
    """A chunk of 16-bit values (bfloat16, or float16 when not IS_BF16) from ptr as two float32 tiles:
    the lower and upper value of each 32-bit word. bfloat16: one shift or one and per value (the dtype
    conversion costs two); float16: one conversion per value.
    MASKED: load only the words below n_words (a whole-packet bound; the others read as -inf).
    FLOOR: values below the dtype's floor (-inf) raised to it, NaN kept, two at a time (max.NaN.x2)."""
    words = _word_tile(BLOCK, VEC)
    wptr = ptr.to(tl.pointer_type(tl.uint32))
    if MASKED:
        other: tl.constexpr = 0xFF80FF80 if IS_BF16 else 0xFC00FC00  # two -inf
        w = tl.load(wptr + words, mask=words < n_words, other=other)
    else:
        w = tl.load(wptr + words)
    if FLOOR and FAST_EXP:
        if IS_BF16:
            w = tl.inline_asm_elementwise("max.NaN.bf16x2 $0, $1, $2;", "=r,r,r", [w, tl.zeros_like(w) + BF16_FLOOR_X2],
                                          dtype=tl.uint32, is_pure=True, pack=1)
        else:
            w = tl.inline_asm_elementwise("max.NaN.f16x2 $0, $1, $2;", "=r,r,r", [w, tl.zeros_like(w) + F16_FLOOR_X2],
                                          dtype=tl.uint32, is_pure=True, pack=1)
    if IS_BF16:
        lo = (w << 16).to(tl.float32, bitcast=True)
        hi = (w & 0xFFFF0000).to(tl.float32, bitcast=True)
    elif FAST_EXP:
        lo, hi = tl.inline_asm_elementwise(
            "{ .reg .b16 l, h; mov.b32 {l, h}, $2; cvt.f32.f16 $0, l; cvt.f32.f16 $1, h; }", "=f,=f,r", [w],
            dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
    else:
        lo = (w & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = (w >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    if FLOOR and not FAST_EXP:  # the interpreter: the same values, one at a time
        floor: tl.constexpr = BF16_FLOOR if IS_BF16 else F16_FLOOR
        lo = tl.maximum(lo, floor, propagate_nan=tl.PropagateNan.ALL)
        hi = tl.maximum(hi, floor, propagate_nan=tl.PropagateNan.ALL)
    return lo, hi


@triton.jit
def _bf16_words(ptr, BLOCK: tl.constexpr, VEC: tl.constexpr, n_words, MASKED: tl.constexpr):
    """bfloat16 words as two float32 tiles (the gradient's loads: no floor)."""
    return _half_words(ptr, BLOCK, VEC, n_words, MASKED, False, False, True)


@triton.jit
def _pack_bf16(lo, hi, BF16_BY_HAND: tl.constexpr):
    """Two float32 tiles rounded to nearest even into bfloat16 words (lo in the lower half)."""
    if BF16_BY_HAND:
        lo_bits = lo.to(tl.uint32, bitcast=True)
        hi_bits = hi.to(tl.uint32, bitcast=True)
        lo_r = (lo_bits + 0x7FFF + ((lo_bits >> 16) & 1)) >> 16
        hi_r = (hi_bits + 0x7FFF + ((hi_bits >> 16) & 1)) >> 16
        return (hi_r << 16) | lo_r
    else:
        return tl.inline_asm_elementwise("cvt.rn.bf16x2.f32 $0, $1, $2;", "=r,f,f", [hi, lo], dtype=tl.uint32,
                                         is_pure=True, pack=1)


@triton.jit
def _dm_s(dm, s, EXACT: tl.constexpr):
    """dm * s, the rescale of the entropy sum. EXACT (rows of huge logits): 0 for a slot that has seen
    nothing (s = 0, its maximum still the floor -FLT_MAX), where dm = floor - max overflows to -inf
    once the maximum exceeds ~1e31 (and -inf * 0 would make the entropy NaN)."""
    if EXACT:
        return tl.where(s == 0.0, 0.0, dm * s)
    else:
        return dm * s


@triton.jit
def _stats_add2(lo, hi, mk, s, t, k, NEED_ENTROPY: tl.constexpr, FAST_EXP: tl.constexpr, EXACT: tl.constexpr):
    """_stats_add for a tile given as its two halves (bfloat16 words)."""
    mk_new = tl.maximum(mk, tl.maximum(tl.maximum(tl.max(lo, axis=1), tl.max(hi, axis=1)) * k, NEG_BIG))
    dm = mk - mk_new
    c = _exp2(dm, FAST_EXP)
    if EXACT:
        d_lo = _mul_rn(lo, k, FAST_EXP) - mk_new[:, None]
        d_hi = _mul_rn(hi, k, FAST_EXP) - mk_new[:, None]
    else:
        d_lo = lo * k - mk_new[:, None]
        d_hi = hi * k - mk_new[:, None]
    if NEED_ENTROPY:
        d_lo = tl.maximum(d_lo, D_FLOOR, propagate_nan=tl.PropagateNan.ALL)
        d_hi = tl.maximum(d_hi, D_FLOOR, propagate_nan=tl.PropagateNan.ALL)
        e_lo = _exp2(d_lo, FAST_EXP)
        e_hi = _exp2(d_hi, FAST_EXP)
        t = c * (t + _dm_s(dm, s, EXACT)) + tl.sum(e_lo * d_lo + e_hi * d_hi, axis=1)
    else:
        e_lo = _exp2(d_lo, FAST_EXP)
        e_hi = _exp2(d_hi, FAST_EXP)
    s = s * c + tl.sum(e_lo + e_hi, axis=1)
    return mk_new, s, t


@triton.jit
def _stats_add4(a, b, c_, d_, mk, s, t, k, NEED_ENTROPY: tl.constexpr, FAST_EXP: tl.constexpr, EXACT: tl.constexpr,
                CLAMP: tl.constexpr = True):
    """_stats_add for a slot given as four tiles (two bfloat16 packets, each as its two halves).
    CLAMP=False: the values are floored (no -inf), the entropy terms need no clamp."""
    top = tl.maximum(tl.maximum(tl.max(a, axis=1), tl.max(b, axis=1)),
                     tl.maximum(tl.max(c_, axis=1), tl.max(d_, axis=1)))
    mk_new = tl.maximum(mk, tl.maximum(top * k, NEG_BIG))
    dm = mk - mk_new
    c = _exp2(dm, FAST_EXP)
    s_new, t_new = _terms(a, mk_new, k, NEED_ENTROPY, FAST_EXP, EXACT, CLAMP)
    s2, t2 = _terms(b, mk_new, k, NEED_ENTROPY, FAST_EXP, EXACT, CLAMP)
    s3, t3 = _terms(c_, mk_new, k, NEED_ENTROPY, FAST_EXP, EXACT, CLAMP)
    s4, t4 = _terms(d_, mk_new, k, NEED_ENTROPY, FAST_EXP, EXACT, CLAMP)
    if NEED_ENTROPY:
        t = c * (t + _dm_s(dm, s, EXACT)) + ((t_new + t2) + (t3 + t4))
    s = s * c + ((s_new + s2) + (s3 + s4))
    return mk_new, s, t


@triton.jit
def _terms(x, mk_new, k, NEED_ENTROPY: tl.constexpr, FAST_EXP: tl.constexpr, EXACT: tl.constexpr,
           CLAMP: tl.constexpr = True):
    """(sum e, sum e d) over a tile's rows, e = 2^d, d = x k - mk (floored for the entropy sum)."""
    if EXACT:
        d = _mul_rn(x, k, FAST_EXP) - mk_new[:, None]
    else:
        d = x * k - mk_new[:, None]
    if NEED_ENTROPY:
        if CLAMP:
            d = tl.maximum(d, D_FLOOR, propagate_nan=tl.PropagateNan.ALL)
        e = _exp2(d, FAST_EXP)
        return tl.sum(e, axis=1), tl.sum(e * d, axis=1)
    else:
        e = _exp2(d, FAST_EXP)
        return tl.sum(e, axis=1), tl.zeros_like(mk_new)


@triton.jit
def _stats_add(x, mk, s, t, k, NEED_ENTROPY: tl.constexpr, FAST_EXP: tl.constexpr, EXACT: tl.constexpr):
    """Add a [R, VEC] tile of raw logits x to per-slot statistics (all [R], log2 units):
    mk = max x * k (floored at -FLT_MAX), s = sum 2^(x k - mk), t = sum 2^(x k - mk) (x k - mk).
    The offsets are one FMA (exact product minus the rounded maximum); EXACT rounds the product first,
    so the maximum's own offset is exactly 0 whatever the magnitude (rows of huge logits)."""
    mk_new = tl.maximum(mk, tl.maximum(tl.max(x, axis=1) * k, NEG_BIG))
    dm = mk - mk_new  # <= 0 (NaN only with a NaN logit, which makes s NaN anyway)
    c = _exp2(dm, FAST_EXP)
    if EXACT:
        d = _mul_rn(x, k, FAST_EXP) - mk_new[:, None]
    else:
        d = x * k - mk_new[:, None]
    if NEED_ENTROPY:
        d = tl.maximum(d, D_FLOOR, propagate_nan=tl.PropagateNan.ALL)  # -inf logits: e = 0, e * d = 0; NaN stays
        e = _exp2(d, FAST_EXP)
        t = c * (t + _dm_s(dm, s, EXACT)) + tl.sum(e * d, axis=1)
    else:
        e = _exp2(d, FAST_EXP)
    s = s * c + tl.sum(e, axis=1)
    return mk_new, s, t


@triton.jit
def _row_stats(x_row, V, k, BLOCK: tl.constexpr, VEC: tl.constexpr, IS_BF16: tl.constexpr, IS_16BIT: tl.constexpr,
               NEED_ENTROPY: tl.constexpr, FAST_EXP: tl.constexpr, EXACT: tl.constexpr):
    """(m2, s, t) of one row in log2 units: per-slot running statistics over the chunks, merged once.
    A slot is two packets, one from each half of the chunk (one rescale per 16 bf16 values).
    No L2 eviction hints: Triton re-creates the cache policy for every access (createpolicy and
    uniform-register set-up in the loop, 0.3-0.4 instructions per element, which took the bf16 loop
    over its budget of 8); the CUDA kernels carry them (evict_last / evict_first / st.global.cs)."""
    FLOOR: tl.constexpr = not EXACT  # 16-bit: -inf raised to the dtype's floor on the fast pass (see there)
    H: tl.constexpr = BLOCK // 2
    R: tl.constexpr = H // VEC
    tile = _tile(H, VEC)
    v_full = (V // BLOCK) * BLOCK  # columns in whole chunks
    v_vec = (V // VEC) * VEC  # columns in whole packets
    mk = tl.full([R], NEG_BIG, tl.float32)
    s = tl.zeros([R], tl.float32)
    t = tl.zeros([R], tl.float32)
    for start in tl.range(0, v_full, BLOCK):
        if IS_16BIT:
            lo_a, hi_a = _half_words(x_row + start, H, VEC, 0, False, FLOOR, FAST_EXP, IS_BF16)
            lo_b, hi_b = _half_words(x_row + start + H, H, VEC, 0, False, FLOOR, FAST_EXP, IS_BF16)
            mk, s, t = _stats_add4(lo_a, hi_a, lo_b, hi_b, mk, s, t, k, NEED_ENTROPY, FAST_EXP, EXACT, not FLOOR)
        else:
            xa = tl.load(x_row + start + tile).to(tl.float32)
            xb = tl.load(x_row + start + H + tile).to(tl.float32)
            mk, s, t = _stats_add2(xa, xb, mk, s, t, k, NEED_ENTROPY, FAST_EXP, EXACT)
    if v_full < V:  # the last, partial chunk
        offs_a = v_full + tile
        offs_b = v_full + H + tile
        if v_vec == V:  # whole packets
            if IS_16BIT:
                n_words = (v_vec - v_full) // 2
                lo_a, hi_a = _half_words(x_row + v_full, H, VEC, n_words, True, FLOOR, FAST_EXP, IS_BF16)
                lo_b, hi_b = _half_words(x_row + v_full + H, H, VEC, n_words - H // 2, True, FLOOR, FAST_EXP,
                                         IS_BF16)
                mk, s, t = _stats_add4(lo_a, hi_a, lo_b, hi_b, mk, s, t, k, NEED_ENTROPY, FAST_EXP, EXACT,
                                       not FLOOR)
            else:
                xa = tl.load(x_row + offs_a, mask=offs_a < v_vec, other=float("-inf"))
                xb = tl.load(x_row + offs_b, mask=offs_b < v_vec, other=float("-inf"))
                mk, s, t = _stats_add2(xa.to(tl.float32), xb.to(tl.float32), mk, s, t, k, NEED_ENTROPY, FAST_EXP,
                                       EXACT)
        else:
            xa = tl.load(x_row + offs_a, mask=offs_a < V, other=float("-inf"))
            xb = tl.load(x_row + offs_b, mask=offs_b < V, other=float("-inf"))
            mk, s, t = _stats_add2(xa.to(tl.float32), xb.to(tl.float32), mk, s, t, k, NEED_ENTROPY, FAST_EXP, EXACT)
    # merge the slots (once per row): three block reductions
    m2 = tl.max(mk, axis=0)
    dm = mk - m2
    c = _exp2(dm, FAST_EXP)
    s_row = tl.sum(s * c, axis=0)
    if NEED_ENTROPY:
        t_row = tl.sum(c * (t + _dm_s(dm, s, EXACT)), axis=0)
    else:
        t_row = tl.cast(0.0, tl.float32)
    return m2, s_row, t_row


@triton.jit
def _row_stats_checked(x_row, x_y, V, k, BLOCK: tl.constexpr, VEC: tl.constexpr, IS_BF16: tl.constexpr,
                       IS_16BIT: tl.constexpr, NEED_ENTROPY: tl.constexpr, FAST_EXP: tl.constexpr):
    """(m2, s, t, zy_off) of one row in log2 units, zy_off = x_y k - m2 the offset of x_y (the target's
    logit) to the row maximum: the fast pass, then for huge logits, or (float16) a maximum near the floor,
    the exact pass (never in practice)."""
    m2, s_row, t_row = _row_stats(x_row, V, k, BLOCK, VEC, IS_BF16, IS_16BIT, NEED_ENTROPY, FAST_EXP, False)
    zy_off = x_y * k - m2
    redo = tl.abs(m2) >= HUGE_LOG2
    if IS_16BIT and not IS_BF16:
        redo = redo | (m2 < k * F16_FLOOR + 160.0)
    if redo:
        m2, s_row, t_row = _row_stats(x_row, V, k, BLOCK, VEC, IS_BF16, IS_16BIT, NEED_ENTROPY, FAST_EXP, True)
        zy_off = _mul_rn(x_y, k, FAST_EXP) - m2
    return m2, s_row, t_row, zy_off


@triton.jit
def _forward_kernel(
    logits_ptr, stride_row, targets_ptr, scored_ptr, old_ptr, ref_ptr, adv_ptr,
    logp_ptr, entropy_ptr, lse_ptr, loss_ptr, dlogp_ptr, kl_ptr, flags_ptr,
    N, V, inv_tau, ratio_lo, ratio_hi, dual_clip, kl_coef, entropy_coef,
    weights_ptr, grad_ptr, stride_grad, grad_scale,
    KL_TYPE: tl.constexpr, HAS_DUAL: tl.constexpr, NEED_ENTROPY: tl.constexpr,
    ENTROPY_IN_LOSS: tl.constexpr, BLOCK: tl.constexpr, WRITE_GRAD: tl.constexpr, BF16_BY_HAND: tl.constexpr,
    VEC: tl.constexpr = 8, ROW_ALIGNED: tl.constexpr = False, FAST_EXP: tl.constexpr = False,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    IS_BF16: tl.constexpr = logits_ptr.dtype.element_ty == tl.bfloat16
    IS_16BIT: tl.constexpr = (logits_ptr.dtype.element_ty == tl.bfloat16) | (logits_ptr.dtype.element_ty == tl.float16)
    k = inv_tau * LOG2E  # z * log2(e), z = x / tau
    for row in tl.range(pid, N, nprog):
        row64 = tl.cast(row, tl.int64)
        scored = tl.load(scored_ptr + row64)
        if scored != 0:
            row_off = row64 * stride_row
            if ROW_ALIGNED:
                row_off = tl.multiple_of(row_off, VEC)
            x_row = logits_ptr + row_off  # 64-bit row base
            target = tl.load(targets_ptr + row64)
            # x[y] first: with the gradient written in place, other warps overwrite the row once the
            # row's statistics are reduced (a barrier every warp passes after this load).
            # validation rejects targets outside [0, V) eagerly, but not under torch.compile: an
            # out-of-range target gives logp = NaN here instead of a read out of bounds
            x_y = tl.load(x_row + target, mask=(target >= 0) & (target < V), other=float("nan")).to(tl.float32)
            m2, s_row, t_row, zy_off = _row_stats_checked(x_row, x_y, V, k, BLOCK, VEC, IS_BF16, IS_16BIT,
                                                          NEED_ENTROPY, FAST_EXP)
            log2_s = tl.log2(s_row)
            lse = (m2 + log2_s) * LN2
            logp = (zy_off - log2_s) * LN2
            if NEED_ENTROPY:
                entropy = (log2_s - t_row / s_row) * LN2  # log s - sum p (z - m), in log2 units * ln 2
            else:
                entropy = tl.cast(0.0, tl.float32)

            # ---- per-row epilogue: torch_backend.row_terms on scalars ----
            old = tl.load(old_ptr + row64)
            adv = tl.load(adv_ptr + row64)
            log_ratio = logp - old
            # the clamp keeps NaN (a NaN logp or old log-prob gives a NaN ratio and loss, as in the
            # reference): min/max drop NaN, hence the where
            ratio = tl.exp(tl.where(log_ratio != log_ratio, log_ratio,
                                    tl.minimum(tl.maximum(log_ratio, -LOG_RATIO_CLAMP), LOG_RATIO_CLAMP)))
            # the clamp's derivative is 0 outside its closed interval, and at NaN (autograd's mask)
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
                d = tl.where(diff != diff, diff, tl.minimum(tl.maximum(diff, -LOG_RATIO_CLAMP), LOG_RATIO_CLAMP))
                exp_d = tl.exp(d)
                value = exp_d - d - 1.0
                kl = tl.where(value != value, value, tl.minimum(tl.maximum(value, -K3_CLAMP), K3_CLAMP))
                passes = (tl.abs(diff) <= LOG_RATIO_CLAMP) & (value <= K3_CLAMP)
                dkl = tl.where(passes, -(exp_d - 1.0), 0.0)
            else:
                kl = tl.cast(0.0, tl.float32)
                dkl = tl.cast(0.0, tl.float32)

            if KL_TYPE != 0:  # kl_coef == 0: no KL term at all (a NaN ref log-prob does not leak)
                loss = tl.where(kl_coef != 0.0, pg + kl_coef * kl, pg)
                dlogp = tl.where(kl_coef != 0.0, dpg + kl_coef * dkl, dpg)
            else:
                loss = pg
                dlogp = dpg
            if ENTROPY_IN_LOSS:
                loss = loss - entropy_coef * entropy

            if WRITE_GRAD:
                # the gradient of grad_scale * sum_t w_t l_t, as dispatch's backward forms it from
                # d_loss = grad_output * w_t; a second pass over the row (see the README's schedule)
                d_loss = grad_scale * tl.load(weights_ptr + row64)
                out_off = row64 * stride_grad
                if ROW_ALIGNED:
                    out_off = tl.multiple_of(out_off, VEC)
                _grad_row(x_row, grad_ptr + out_off, V, target, x_y, lse, entropy,
                          d_loss * dlogp, d_loss * -entropy_coef, inv_tau, BLOCK, BF16_BY_HAND, VEC,
                          ROW_ALIGNED, FAST_EXP)
        else:  # unscored: no V work, zeros in every output
            zero = tl.cast(0.0, tl.float32)
            logp, entropy, lse, loss, dlogp, kl = zero, zero, zero, zero, zero, zero
            flags = tl.cast(0, tl.int32)
            if WRITE_GRAD:
                _grad_row(logits_ptr, grad_ptr + row64 * stride_grad, V, 0, zero, zero, zero, zero, zero, inv_tau,
                          BLOCK, BF16_BY_HAND, VEC, ROW_ALIGNED, FAST_EXP)
        tl.store(logp_ptr + row64, logp)
        tl.store(entropy_ptr + row64, entropy)
        tl.store(lse_ptr + row64, lse)
        tl.store(loss_ptr + row64, loss)
        tl.store(dlogp_ptr + row64, dlogp)
        tl.store(kl_ptr + row64, kl)
        tl.store(flags_ptr + row64, flags.to(tl.uint8))


@triton.jit
def _grad_value(x, k, lse2, a, b, HAS_H: tl.constexpr, FAST_EXP: tl.constexpr):
    """p * (b + a * d) with d = x k - lse2 = log2 p: the gradient without its one-hot term."""
    return _grad_of(x * k - lse2, a, b, HAS_H, FAST_EXP)


@triton.jit
def _grad_value_exact(x, k, m2, log2_s, a, b, FAST_EXP: tl.constexpr, NATURAL_M: tl.constexpr = False):
    """_grad_value for a row of huge logits: d = (x k rounded - m2) - log2 s, from the row's own maximum m2
    (of the rounded products) and log2 s, which its lse2 = m2 + log2 s has lost.
    NATURAL_M: m2 is the maximum in natural units as the shard statistics give it, (x k rounded) * ln 2
    rounded: the offset is taken between values rounded alike, so that the maximum's is exactly 0."""
    if NATURAL_M:
        d = (_mul_rn(_mul_rn(x, k, FAST_EXP), LN2, FAST_EXP) - m2) * LOG2E - log2_s
    else:
        d = (_mul_rn(x, k, FAST_EXP) - m2) - log2_s
    return _grad_of(d, a, b, True, FAST_EXP)


@triton.jit
def _grad_of(d, a, b, HAS_H: tl.constexpr, FAST_EXP: tl.constexpr):
    """p * (b + a * d) with d = log2 p."""
    p = _exp2(d, FAST_EXP)
    if HAS_H:
        # p * (log p + H) is 0 where p is 0 (a -inf logit), not 0 * -inf: d floored
        return p * (b + a * tl.maximum(d, D_FLOOR, propagate_nan=tl.PropagateNan.ALL))
    else:
        return p * b


@triton.jit
def _grad_chunks(x_row, out_row, V, k, lse2, a, b, HAS_H: tl.constexpr, BLOCK: tl.constexpr,
                 BF16_BY_HAND: tl.constexpr, VEC: tl.constexpr, FAST_EXP: tl.constexpr):
    """The streaming part of a row's gradient (all but the one-hot term)."""
    tile = _tile(BLOCK, VEC)
    v_full = (V // BLOCK) * BLOCK
    v_vec = (V // VEC) * VEC
    dtype = out_row.dtype.element_ty
    IS_BF16: tl.constexpr = (dtype == tl.bfloat16) & (x_row.dtype.element_ty == tl.bfloat16)
    words = _word_tile(BLOCK, VEC)
    for start in tl.range(0, v_full, BLOCK):
        if IS_BF16:
            lo, hi = _bf16_words(x_row + start, BLOCK, VEC, 0, False)
            g_lo = _grad_value(lo, k, lse2, a, b, HAS_H, FAST_EXP)
            g_hi = _grad_value(hi, k, lse2, a, b, HAS_H, FAST_EXP)
            tl.store((out_row + start).to(tl.pointer_type(tl.uint32)) + words, _pack_bf16(g_lo, g_hi, BF16_BY_HAND))
        else:
            x = tl.load(x_row + start + tile).to(tl.float32)
            grad = _grad_value(x, k, lse2, a, b, HAS_H, FAST_EXP)
            tl.store(out_row + start + tile, _round_to(grad, dtype, BF16_BY_HAND))
    if v_full < V:
        offs = v_full + tile
        if v_vec == V:  # whole packets: 128-bit loads and stores
            if IS_BF16:
                n_words = (v_vec - v_full) // 2
                lo, hi = _bf16_words(x_row + v_full, BLOCK, VEC, n_words, True)
                g_lo = _grad_value(lo, k, lse2, a, b, HAS_H, FAST_EXP)
                g_hi = _grad_value(hi, k, lse2, a, b, HAS_H, FAST_EXP)
                tl.store((out_row + v_full).to(tl.pointer_type(tl.uint32)) + words,
                         _pack_bf16(g_lo, g_hi, BF16_BY_HAND), mask=words < n_words)
            else:
                mask = offs < v_vec
                x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
                grad = _grad_value(x, k, lse2, a, b, HAS_H, FAST_EXP)
                tl.store(out_row + offs, _round_to(grad, dtype, BF16_BY_HAND), mask=mask)
        else:
            mask = offs < V
            x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            grad = _grad_value(x, k, lse2, a, b, HAS_H, FAST_EXP)
            tl.store(out_row + offs, _round_to(grad, dtype, BF16_BY_HAND), mask=mask)


@triton.jit
def _grad_exact(x_row, out_row, V, k, m2, log2_s, a, b, BLOCK: tl.constexpr, BF16_BY_HAND: tl.constexpr,
                FAST_EXP: tl.constexpr, NATURAL_M: tl.constexpr = False):
    """The gradient of a row of huge logits but its one-hot term (_grad_value_exact). Never met with a
    trained model's logits: plain chunks of half the streaming loops' size (each element stored by the
    thread that loaded it), kept apart from the loops the kernel report budgets (it takes the
    gradient's loops with the most 128-bit loads)."""
    cols = tl.arange(0, BLOCK // 2)
    for start in tl.range(0, V, BLOCK // 2):
        offs = start + cols
        x = tl.load(x_row + offs, mask=offs < V, other=0.0).to(tl.float32)
        grad = _grad_value_exact(x, k, m2, log2_s, a, b, FAST_EXP, NATURAL_M)
        tl.store(out_row + offs, _round_to(grad, out_row.dtype.element_ty, BF16_BY_HAND), mask=offs < V)


# Which rows a _grad_row call writes: all of them (the fused forward, the shard gradient), or, for the
# separate gradient kernel's two launches, only the ordinary rows or only the rows of huge logits.
ALL_ROWS = tl.constexpr(0)
ORDINARY_ROWS = tl.constexpr(1)
HUGE_ROWS = tl.constexpr(2)


@triton.jit
def _is_huge(lse2):
    """A row of huge logits: |lse| * log2(e) >= 2^24 and finite (its float32 lse has lost log s)."""
    return (tl.abs(lse2) >= HUGE_LOG2) & (tl.abs(lse2) < float("inf"))


@triton.jit
def _grad_body(x_row, out_row, V, k, lse2, a, b, h, BLOCK: tl.constexpr, BF16_BY_HAND: tl.constexpr,
               VEC: tl.constexpr, FAST_EXP: tl.constexpr):
    """An ordinary row's gradient but its one-hot term, from the saved lse (the streaming loops)."""
    if h != 0.0:
        _grad_chunks(x_row, out_row, V, k, lse2, a, b, True, BLOCK, BF16_BY_HAND, VEC, FAST_EXP)
    else:
        _grad_chunks(x_row, out_row, V, k, lse2, a, b, False, BLOCK, BF16_BY_HAND, VEC, FAST_EXP)


@triton.jit
def _grad_body_huge(x_row, out_row, V, k, a, b, BLOCK: tl.constexpr, BF16_BY_HAND: tl.constexpr,
                    VEC: tl.constexpr, FAST_EXP: tl.constexpr, SHARD: tl.constexpr, m, log_s):
    """A huge row's gradient but its one-hot term; returns the row's (m2, log2 s). lse = m + log s has lost
    log s (p = 1 for 1/V at 1e30), and x k - lse2 the product's rounding residual: the row's statistics
    again, as the forward's exact pass computes them (its reductions read the row before any store), or
    with SHARD the whole row's merged m and log s, given (a shard has only part of the row). a is 0
    without h."""
    if SHARD:
        m2 = m
        log2_s = log_s * LOG2E
    else:
        IS_BF16: tl.constexpr = x_row.dtype.element_ty == tl.bfloat16
        IS_16BIT: tl.constexpr = IS_BF16 | (x_row.dtype.element_ty == tl.float16)
        m2, s_row, _ = _row_stats(x_row, V, k, BLOCK, VEC, IS_BF16, IS_16BIT, False, FAST_EXP, True)
        log2_s = tl.log2(s_row)
    _grad_exact(x_row, out_row, V, k, m2, log2_s, a, b, BLOCK, BF16_BY_HAND, FAST_EXP, SHARD)
    return m2, log2_s


@triton.jit
def _grad_row(x_row, out_row, V, target, x_y, lse, entropy, g, h, inv_tau, BLOCK: tl.constexpr,
              BF16_BY_HAND: tl.constexpr, VEC: tl.constexpr, ROW_ALIGNED: tl.constexpr, FAST_EXP: tl.constexpr,
              SHARD: tl.constexpr = False, m=0.0, log_s=0.0, ROWS: tl.constexpr = ALL_ROWS):
    """One row of dL/dx = (g * (onehot(y) - p) - h * p * (log p + H)) / tau, written to out_row.

    x_y (the target's logit, float32) was read by the caller before any store to the row.
    SHARD: the row is one vocabulary shard of a whole row (target relative to the shard, outside it when
    not in [0, V)) whose merged statistics m and log s (natural units, shard.py) are given, lse = m + log s:
    huge rows take their offsets from them, as the shard cannot reduce the whole row.
    ROWS: ALL_ROWS takes either body by the row's lse; ORDINARY_ROWS and HUGE_ROWS compile only one of
    them, for a caller that gives only such rows (_grad_kernel's two launches; _is_huge decides)."""
    if SHARD:  # the shard contract: only a NaN m or log s makes a row with g == h == 0 NaN
        active = (g != 0.0) | (h != 0.0) | (m != m) | (log_s != log_s)
    else:
        # a lse that is not finite (a NaN or +inf logit, a row of -inf) gives a NaN row even where
        # g == h == 0, as 0 * NaN does in autograd
        active = (g != 0.0) | (h != 0.0) | (tl.abs(lse) == float("inf")) | (lse != lse)
    if active:
        k = inv_tau * LOG2E
        lse2 = lse * LOG2E
        # dL/dx_j = p_j * (b + a * log2 p_j) (+ g / tau at the target), log p = log2 p * ln 2
        a = -(h * LN2) * inv_tau
        b = -(g + h * entropy) * inv_tau
        if ROWS == ORDINARY_ROWS:
            _grad_body(x_row, out_row, V, k, lse2, a, b, h, BLOCK, BF16_BY_HAND, VEC, FAST_EXP)
            grad_y = _grad_value(x_y, k, lse2, a, b, True, FAST_EXP)
        elif ROWS == HUGE_ROWS:
            m2, log2_s = _grad_body_huge(x_row, out_row, V, k, a, b, BLOCK, BF16_BY_HAND, VEC, FAST_EXP, SHARD, m,
                                         log_s)
            grad_y = _grad_value_exact(x_y, k, m2, log2_s, a, b, FAST_EXP, SHARD)
        else:
            # _is_huge(lse2), written out: the call's inlining scope moved ptxas's line labels and cost the
            # fp16 fused kernel two registers
            if (tl.abs(lse2) >= HUGE_LOG2) & (tl.abs(lse2) < float("inf")):
                m2, log2_s = _grad_body_huge(x_row, out_row, V, k, a, b, BLOCK, BF16_BY_HAND, VEC, FAST_EXP, SHARD,
                                             m, log_s)
                grad_y = _grad_value_exact(x_y, k, m2, log2_s, a, b, FAST_EXP, SHARD)
            else:
                _grad_body(x_row, out_row, V, k, lse2, a, b, h, BLOCK, BF16_BY_HAND, VEC, FAST_EXP)
                grad_y = _grad_value(x_y, k, lse2, a, b, True, FAST_EXP)
        # the one-hot term: every thread has stored its part of the row (the barrier orders those
        # stores before this one, which overwrites the target's element)
        tl.debug_barrier()
        grad_y = grad_y + g * inv_tau
        tl.store(out_row + target, _round_to(grad_y, out_row.dtype.element_ty, BF16_BY_HAND),
                 mask=(target >= 0) & (target < V))
    else:  # g == h == 0 (unscored or zero-weight rows, finite lse): exact zeros, the logits are not read
        tile = _tile(BLOCK, VEC)
        zeros = tl.zeros([BLOCK // VEC, VEC], dtype=out_row.dtype.element_ty)
        for start in tl.range(0, V, BLOCK):
            offs = start + tile
            tl.store(out_row + offs, zeros, mask=offs < V)


@triton.jit
def _grad_kernel_row(logits_ptr, stride_x, out_ptr, stride_out, targets_ptr, lse_ptr, entropy_ptr, g_ptr, h_ptr,
                     row64, V, inv_tau, BLOCK: tl.constexpr, BF16_BY_HAND: tl.constexpr, VEC: tl.constexpr,
                     ROW_ALIGNED: tl.constexpr, FAST_EXP: tl.constexpr, ROWS: tl.constexpr):
    """_grad_kernel's row row64 if it is one of ROWS (ORDINARY_ROWS or HUGE_ROWS, by _is_huge of its lse);
    nothing is stored to the other rows."""
    g = tl.load(g_ptr + row64)
    h = tl.load(h_ptr + row64)
    x_off = row64 * stride_x
    out_off = row64 * stride_out
    if ROW_ALIGNED:
        x_off = tl.multiple_of(x_off, VEC)
        out_off = tl.multiple_of(out_off, VEC)
    x_row = logits_ptr + x_off  # 64-bit row bases
    target = tl.load(targets_ptr + row64)
    # x[y] before the row's first store (out may be the logits)
    x_y = tl.load(x_row + target, mask=(target >= 0) & (target < V), other=0.0).to(tl.float32)
    tl.debug_barrier()  # every warp has read x[y] before any warp stores over it (in place)
    lse = tl.load(lse_ptr + row64)
    huge = _is_huge(lse * LOG2E)
    if ROWS == HUGE_ROWS:
        mine = huge  # (the caller has checked it already)
    else:
        mine = not huge
    if mine:
        # entropy/target are only used when g or h != 0 (loading them is harmless otherwise)
        _grad_row(x_row, out_ptr + out_off, V, target, x_y, lse, tl.load(entropy_ptr + row64), g, h, inv_tau,
                  BLOCK, BF16_BY_HAND, VEC, ROW_ALIGNED, FAST_EXP, False, 0.0, 0.0, ROWS)


@triton.jit
def _grad_kernel(
    logits_ptr, stride_x, out_ptr, stride_out, targets_ptr, lse_ptr, entropy_ptr, g_ptr, h_ptr,
    N, V, inv_tau, BLOCK: tl.constexpr, BF16_BY_HAND: tl.constexpr,
    VEC: tl.constexpr = 8, ROW_ALIGNED: tl.constexpr = False, FAST_EXP: tl.constexpr = False,
    ROWS: tl.constexpr = ORDINARY_ROWS,
):
    """The rows whose saved lse is not huge (ROWS = ORDINARY_ROWS: the streaming loops, no exact pass in
    the code), or only the rows of huge logits (HUGE_ROWS: the exact pass; every other row costs it a load
    of lse and a branch). grad_rows launches both: each row is written by exactly one of them, so out
    may be the logits."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    for row in tl.range(pid, N, nprog):
        row64 = tl.cast(row, tl.int64)
        if ROWS == HUGE_ROWS:
            if _is_huge(tl.load(lse_ptr + row64) * LOG2E):
                _grad_kernel_row(logits_ptr, stride_x, out_ptr, stride_out, targets_ptr, lse_ptr, entropy_ptr,
                                 g_ptr, h_ptr, row64, V, inv_tau, BLOCK, BF16_BY_HAND, VEC, ROW_ALIGNED, FAST_EXP,
                                 ROWS)
        else:
            _grad_kernel_row(logits_ptr, stride_x, out_ptr, stride_out, targets_ptr, lse_ptr, entropy_ptr, g_ptr,
                             h_ptr, row64, V, inv_tau, BLOCK, BF16_BY_HAND, VEC, ROW_ALIGNED, FAST_EXP, ROWS)
