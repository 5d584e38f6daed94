// The per-row math of SPEC section 1, written once for the CPU and the CUDA kernels.
//
// Everything here is float32 and inline, __host__ __device__ under nvcc, so the CPU tests run the
// same arithmetic (same formulas, same order of operations, same tie conventions) as the GPU.
// deltal_kernels/torch_backend.py (row_terms, grad_rows) is the readable PyTorch template of it.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define DK_HD __host__ __device__ __forceinline__
#else
#define DK_HD inline
#endif

namespace deltal_kernels {

constexpr float kLogRatioClamp = 20.0f;  // reference.LOG_RATIO_CLAMP
constexpr float kK3Clamp = 10.0f;        // reference.K3_CLAMP

constexpr uint8_t kFlagClipped = 1;      // pg_t took the clipped branch
constexpr uint8_t kFlagDualClipped = 2;  // the dual clip bound was active

DK_HD float dk_exp(float x) { return expf(x); }
DK_HD float dk_log(float x) { return logf(x); }
DK_HD float dk_clamp(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }
DK_HD float dk_abs(float x) { return fabsf(x); }

// ---------------------------------------------------------------------------------------------
// Online softmax statistics of a set of values z (one row of x / tau, or any part of it):
//   m = max z,  s = sum exp(z - m),  u = sum exp(z - m) * (z - m)
// from which lse = m + log s and the entropy H = log s - u / s. Parts are merged in any fixed
// order (per thread, per warp, per block; per SIMD lane on the CPU) with softmax_merge.
// An empty part is {-inf, 0, 0}; an element with exp(z - m) == 0 (e.g. z = -inf) adds nothing.
// ---------------------------------------------------------------------------------------------
struct SoftmaxStats {
  float m;
  float s;
  float u;
};

DK_HD SoftmaxStats softmax_empty() { return {-INFINITY, 0.0f, 0.0f}; }

// Re-express the statistics relative to a new maximum new_m >= st.m.
// (A part with m = -inf has s = u = 0, or s = NaN once it has seen a NaN: kept.)
DK_HD SoftmaxStats softmax_rescale(SoftmaxStats st, float new_m) {
  if (st.m == -INFINITY) return {new_m, st.s, st.u};
  const float d = st.m - new_m;  // <= 0
  const float c = dk_exp(d);
  return {new_m, st.s * c, c * (st.u + d * st.s)};
}

// Add one value z <= st.m (st.m already covers it; st.m is finite).
DK_HD void softmax_add(SoftmaxStats& st, float z) {
  const float d = z - st.m;
  const float e = dk_exp(d);
  st.s += e;
  st.u += e > 0.0f ? e * d : 0.0f;
}

// Add one value, raising the maximum first if needed (-inf adds nothing).
DK_HD void softmax_push(SoftmaxStats& st, float z) {
  if (z == -INFINITY) return;
  if (z > st.m) st = softmax_rescale(st, z);
  softmax_add(st, z);
}

// x * y rounded to float32 on its own, never contracted into an FMA with what follows. Rows of huge
// logits are reduced from these: a fused x * inv_tau - m keeps the product's rounding residual, which
// reaches 1 and more once |m| >= 2^24 ln 2 (and overflows exp from ~2^31), so that the maximum's own
// offset would not be 0 there.
DK_HD float rounded_mul(float x, float y) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(x, y);
#else
  volatile float p = x * y;  // (a store and a load: only on the path of huge rows)
  return p;
#endif
}

// Merge two parts. Symmetric: merge(a, b) and merge(b, a) give bitwise the same result, so a
// butterfly (xor-shuffle) reduction leaves every lane with the same value.
DK_HD SoftmaxStats softmax_merge(SoftmaxStats a, SoftmaxStats b) {
  if (a.m < b.m) {
    const SoftmaxStats t = a;
    a = b;
    b = t;
  }
  if (b.m == -INFINITY) return {a.m, b.s == 0.0f ? a.s : NAN, a.u};  // nothing, or a NaN seen before any value
  const float d = b.m - a.m;  // <= 0
  const float c = dk_exp(d);
  return {a.m, a.s + c * b.s, a.u + c * (b.u + d * b.s)};
}

DK_HD float softmax_lse(SoftmaxStats st) { return st.m + dk_log(st.s); }
DK_HD float softmax_entropy(SoftmaxStats st) { return dk_log(st.s) - st.u / st.s; }

// ---------------------------------------------------------------------------------------------
// The per-row epilogue: from logp_t and H_t to l_t, dl_t/dlogp_t, kl_t and the clip flags.
// Derivatives follow autograd's conventions on the reference: a clamp passes the gradient on its
// closed interval; where the clipped PPO branch is strictly larger, or the dual clip bound is
// strictly smaller, the gradient is 0.
// ---------------------------------------------------------------------------------------------
struct RowParams {
  float ratio_lo;      // 1 - clip_low
  float ratio_hi;      // 1 + clip_high
  float dual_clip;     // 0: off
  float kl_coef;
  float entropy_coef;
  int kl_type;         // 0: none, 1: k1, 2: k2, 3: k3
};

struct RowTerms {
  float loss;
  float dlogp;
  float kl;
  uint8_t flags;
};

// exp(clamp(logp - old, -20, 20)) and its derivative w.r.t. logp (0 outside the closed interval)
DK_HD void log_ratio_exp(float logp, float old, float& ratio, float& dratio) {
  const float log_ratio = logp - old;
  ratio = dk_exp(dk_clamp(log_ratio, -kLogRatioClamp, kLogRatioClamp));
  dratio = dk_abs(log_ratio) <= kLogRatioClamp ? ratio : 0.0f;
}

// PPO clipped surrogate with optional dual clip; returns pg and writes dpg/dratio and flags.
DK_HD float clipped_surrogate(float ratio, float dratio, float adv, const RowParams& p, float& dpg,
                              uint8_t& flags) {
  const float pg_unclipped = -adv * ratio;
  const float pg_clipped = -adv * dk_clamp(ratio, p.ratio_lo, p.ratio_hi);
  const bool clipped = pg_clipped > pg_unclipped;
  float pg = clipped ? pg_clipped : pg_unclipped;
  dpg = clipped ? 0.0f : -adv * dratio;
  flags = clipped ? kFlagClipped : 0;
  if (p.dual_clip != 0.0f) {
    const float lower = -adv * p.dual_clip;
    if (adv < 0.0f && pg > lower) {
      pg = lower;
      dpg = 0.0f;
      flags |= kFlagDualClipped;
    }
  }
  return pg;
}

// KL estimator kl_t (k1/k2/k3) and its derivative w.r.t. logp
DK_HD float kl_term(float logp, float ref, int kl_type, float& dkl) {
  if (kl_type == 1) {
    dkl = 1.0f;
    return logp - ref;
  }
  if (kl_type == 2) {
    const float diff = logp - ref;
    dkl = diff;
    return 0.5f * (diff * diff);
  }
  if (kl_type == 3) {
    const float diff = ref - logp;
    const float d = dk_clamp(diff, -kLogRatioClamp, kLogRatioClamp);
    const float ed = dk_exp(d);
    const float value = ed - d - 1.0f;
    const bool passes = dk_abs(diff) <= kLogRatioClamp && value <= kK3Clamp;
    dkl = passes ? -(ed - 1.0f) : 0.0f;
    return dk_clamp(value, -kK3Clamp, kK3Clamp);
  }
  dkl = 0.0f;
  return 0.0f;
}

DK_HD RowTerms row_terms(float logp, float entropy, float old, float ref, float adv, const RowParams& p) {
  RowTerms t;
  float ratio, dratio, dpg, dkl;
  log_ratio_exp(logp, old, ratio, dratio);
  const float pg = clipped_surrogate(ratio, dratio, adv, p, dpg, t.flags);
  t.kl = kl_term(logp, ref, p.kl_type, dkl);
  // the KL and entropy terms enter only with a non-zero coefficient (as in the reference), so a NaN
  // KL estimate (a NaN ref log-prob) stays a metric: 0 * NaN would make the loss NaN
  float loss = pg;
  t.dlogp = dpg;
  if (p.kl_coef != 0.0f) {
    loss = loss + p.kl_coef * t.kl;
    t.dlogp = t.dlogp + p.kl_coef * dkl;
  }
  if (p.entropy_coef != 0.0f) loss = loss - p.entropy_coef * entropy;
  t.loss = loss;
  return t;
}

// Everything the forward writes for one scored row, from the row's softmax statistics and its
// target logit zy = x[y] / tau (the CPU and CUDA forward and fused kernels all end a row with this).
struct RowResult {
  float logp;
  float entropy;  // 0 unless need_entropy
  float lse;
  RowTerms terms;
};

// logp = (zy - m) - log s rather than zy - lse: lse = m + log s rounds log s away where |m| is huge
// (uniform logits of 1e30 would give logp = 0 instead of -log V).
DK_HD RowResult row_epilogue(SoftmaxStats st, float zy, bool need_entropy, float old, float ref, float adv,
                             const RowParams& p) {
  RowResult r;
  r.lse = softmax_lse(st);
  r.logp = (zy - st.m) - dk_log(st.s);
  r.entropy = need_entropy ? softmax_entropy(st) : 0.0f;
  r.terms = row_terms(r.logp, r.entropy, old, ref, adv, p);
  return r;
}

// The per-row factors g = dL/dlogp_t and h = dL/dH_t of the gradient of
// grad_scale * sum_t w_t * l_t (the fused forward + gradient kernels): the values dispatch's
// backward forms from the saved dl_t/dlogp_t, with d = grad_scale * w_t the upstream gradient of l_t,
// so that the fused and the separate gradient are the same bits.
struct GradFactors {
  float g;
  float h;
};

DK_HD GradFactors weighted_grad_factors(float weight, float grad_scale, float dlogp, float entropy_coef) {
  const float d = grad_scale * weight;
  return {d * dlogp, d * -entropy_coef};
}

// ---------------------------------------------------------------------------------------------
// The logits gradient of one element: dL/dx_j = (g * (onehot_j - p_j) - h * p_j * (log p_j + H)) / tau
// with log p_j = z_j - lse; written in the order torch_backend.grad_rows evaluates it. The
// entropy factor p * (log p + H) is 0 where p underflows to 0 (also for z = -inf).
// ---------------------------------------------------------------------------------------------
DK_HD float entropy_grad_factor(float p, float log_p, float entropy) {
  return p > 0.0f ? p * (log_p + entropy) : 0.0f;
}

// log_p = z_j - lse and p = exp(log_p) come from the caller (its own exp: expf on the GPU, the
// vectorised polynomial on the CPU).
DK_HD float logit_grad(float log_p, float p, bool is_target, float entropy, float g, float h, float inv_tau) {
  float grad = -g * p;
  if (is_target) grad += g;
  grad -= h * entropy_grad_factor(p, log_p, entropy);
  return grad * inv_tau;
}

// ---------------------------------------------------------------------------------------------
// Rows of huge logits. From |m| = 2^24 ln 2 (of x / tau) on, the forward reduces a row again from
// rounded products (rounded_mul), and the gradient cannot use the saved float32 lse = m + log s:
// log s is rounded away there (uniform logits of 1e30 would give p = 1 instead of 1/V), and the
// fused x * (1 / tau) - lse keeps the product's rounding residual. A row whose finite lse is that
// large is reduced again by the gradient kernels (the row's own statistics, from rounded products
// as in the forward), and log p_j = (z_j - m) - log s. Never for a trained model's logits.
// ---------------------------------------------------------------------------------------------
constexpr float kHugeZ = 16777216.0f * 0.6931471805599453f;

// Whether a row's maximum z (or its lse) is that large. (A NaN or infinite value keeps the NaN row of the
// ordinary path.)
DK_HD bool huge_z(float z) { return dk_abs(z) >= kHugeZ && dk_abs(z) < INFINITY; }

// dL/dx_j of one element of such a row, from its raw logit x, the row's statistics m and log s
// (also every element of a vocabulary shard of such a row: m and log s are then the merged row's)
DK_HD float huge_logit_grad(float x, bool is_target, float m, float log_s, float entropy, float g, float h,
                            float inv_tau) {
  const float log_p = (rounded_mul(x, inv_tau) - m) - log_s;
  return logit_grad(log_p, dk_exp(log_p), is_target, entropy, g, h, inv_tau);
}

// ---------------------------------------------------------------------------------------------
// Vocabulary shards (tensor-parallel logits): a rank holds the columns [vocab_start, vocab_start + V)
// of every row. shard_stats reduces each shard as the forward reduces a row; the caller merges the
// shards' statistics in rank order (softmax_merge) and shard_grad_rows takes the merged m and log s.
// ---------------------------------------------------------------------------------------------

// The column of the (global) target y in the shard, or -1 when y is outside it (any value: another
// shard's target, or out of every range); never overflows.
DK_HD int64_t shard_column(int64_t y, int64_t vocab_start, int64_t V) {
  return y >= vocab_start && y - vocab_start < V ? y - vocab_start : -1;
}

// A shard row whose gradient is exact zeros without reading the logits: g = h = 0 and merged statistics
// that are not NaN (an unscored row's are {-inf, log 0 = -inf}; a NaN or +inf logit makes them NaN,
// and the row NaN, as grad_rows does for a NaN lse).
DK_HD bool shard_grad_zero(float m, float log_s, float g, float h) {
  return g == 0.0f && h == 0.0f && !isnan(m) && !isnan(log_s);
}

}  // namespace deltal_kernels
