// CPU row kernels: parallel over rows (at::parallel_for), vectorised within a row.
//
// One row is handled by one thread, so results do not depend on the thread count (deterministic).
// Within a row the logits are converted to float32 (times 1/tau) a chunk at a time into an
// L1-resident buffer; the loops over the buffer use 16-lane float32 vectors (GCC/Clang vector
// extensions), which the compiler lowers to the SIMD of each function clone: AVX-512, AVX2 or the
// x86-64 baseline SSE2, picked at load time for the running CPU (target_clones). The exponential is
// a branch-free polynomial on those vectors; bfloat16/float16 loads and stores are vectorised too.
// The softmax statistics are online per chunk (one pass over the row) and rescaled with the shared
// row_math.h functions; nothing [N, V]-sized is allocated. The fused forward + gradient runs both
// per-row functions back to back on one thread, so the gradient pass re-reads a row that is still in
// that core's cache. Needs GCC or Clang (vector extensions).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>

#include "deltal_kernels/kernels.h"
#include "deltal_kernels/row_math.h"
#include "deltal_kernels/row_pointers.h"

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(DK_NO_TARGET_CLONES) && \
    (!defined(__clang__) || __clang_major__ >= 14)
#define DK_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DK_CPU_CLONES
#endif
#if defined(__GNUC__)
#define DK_CPU_INLINE inline __attribute__((always_inline))
#else
#define DK_CPU_INLINE inline
#endif

// The 64-byte vector type below is only ever passed between always_inline functions, so no vector
// crosses a call boundary and GCC's note that such a call's ABI differs with AVX-512 does not apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace deltal_kernels {
namespace cpu {

constexpr int W = 16;            // lanes of one vector (one AVX-512 register, two AVX2, four SSE2)
constexpr int64_t CHUNK = 1024;  // elements converted to float32 at a time (4 KiB: stays in L1)

// GCC/Clang vector extensions: 16 float32 lanes, lowered to the widest SIMD the function is compiled
// for (see DK_CPU_CLONES), with no intrinsics to keep per instruction set.
typedef float vfloat __attribute__((vector_size(W * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(W * sizeof(int32_t))));

DK_CPU_INLINE vfloat splat(float v) { return vfloat{} + v; }
DK_CPU_INLINE vfloat load(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
DK_CPU_INLINE void store(float* p, const vfloat& v) { std::memcpy(p, &v, sizeof(v)); }
DK_CPU_INLINE vfloat select(const vint& mask, const vfloat& a, const vfloat& b) { return mask ? a : b; }

// exp(x) for x <= 0 (larger x is clamped to 88): Cody-Waite reduction x = n ln2 + r, a degree-6
// polynomial for exp(r) (Cephes expf, ~1 ulp), and 2^n built in the exponent bits. Returns exactly
// 0 below -87 (where float32 exp is subnormal; relative to a softmax sum >= 1 it is nothing) and for
// -inf. exp_lane and exp_vec are the same sequence of IEEE operations, per lane.
template <typename F>
DK_CPU_INLINE F exp_reduced(const F& xc, F& n) {  // xc already clamped; returns exp(r), sets n
  n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // + 1.5 * 2^23 rounds to an integer
  F r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  F y = r * 1.9875691500e-4f + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  return y * (r * r) + r + 1.0f;
}

DK_CPU_INLINE float exp_lane(float x) {
  const float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  float n;
  const float y = exp_reduced(xc, n);
  const float scale = std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
  return x < -87.0f ? 0.0f : y * scale;
}

DK_CPU_INLINE vfloat exp_vec(const vfloat& x) {
  const vfloat lo = splat(-87.0f), hi = splat(88.0f);
  const vfloat xc = select(x < lo, lo, select(x > hi, hi, x));
  vfloat n;
  const vfloat y = exp_reduced(xc, n);
  const vint bits = (__builtin_convertvector(n, vint) + 127) << 23;
  return select(x < lo, splat(0.0f), y * (vfloat)bits);
}

typedef uint16_t vu16 __attribute__((vector_size(W * sizeof(uint16_t))));
typedef uint32_t vu32 __attribute__((vector_size(W * sizeof(uint32_t))));

// buf[i] = float(x[i]) * scale
template <typename T>
DK_CPU_INLINE void to_float(const T* x, int64_t n, float scale, float* buf) {
  for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(x[i]) * scale;
}

// bfloat16 is the top half of a float32: widen W at a time
template <>
DK_CPU_INLINE void to_float<c10::BFloat16>(const c10::BFloat16* x, int64_t n, float scale, float* buf) {
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    vu16 raw;
    std::memcpy(&raw, x + i, sizeof(raw));
    const vu32 bits = __builtin_convertvector(raw, vu32) << 16;
    store(buf + i, (vfloat)bits * scale);
  }
  for (; i < n; ++i) buf[i] = static_cast<float>(x[i]) * scale;
}

// out[i] = T(buf[i]) (round to nearest even)
template <typename T>
DK_CPU_INLINE void from_float(const float* buf, int64_t n, T* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = T(buf[i]);
}

// c10::BFloat16(float), W at a time: round to nearest even, NaN -> 0x7FC0
template <>
DK_CPU_INLINE void from_float<c10::BFloat16>(const float* buf, int64_t n, c10::BFloat16* out) {
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const vfloat v = load(buf + i);
    const vu32 bits = (vu32)v;
    const vu32 rounded = (bits + (((bits >> 16) & 1u) + 0x7FFFu)) >> 16;
    const vu32 result = (vu32)((vint)(v != v) ? (vint)(vu32{} + 0x7FC0u) : (vint)rounded);
    const vu16 narrow = __builtin_convertvector(result, vu16);
    std::memcpy(out + i, &narrow, sizeof(narrow));
  }
  for (; i < n; ++i) out[i] = c10::BFloat16(buf[i]);
}

DK_CPU_INLINE vu32 select_u32(const vint& mask, const vu32& a, const vu32& b) {
  return (vu32)(mask ? (vint)a : (vint)b);
}

// c10::Half(float) (fp16_ieee_from_fp32_value: round to nearest even, overflow to inf, NaN -> 0x7E00),
// W at a time
template <>
DK_CPU_INLINE void from_float<c10::Half>(const float* buf, int64_t n, c10::Half* out) {
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const vu32 w = (vu32)load(buf + i);
    vfloat base = ((vfloat)(w & 0x7FFFFFFFu) * 0x1.0p+112f) * 0x1.0p-110f;
    const vu32 shl1_w = w + w;
    const vu32 sign = w & 0x80000000u;
    vu32 bias = shl1_w & 0xFF000000u;
    bias = select_u32(bias < 0x71000000u, vu32{} + 0x71000000u, bias);
    base = (vfloat)((bias >> 1) + 0x07800000u) + base;
    const vu32 bits = (vu32)base;
    const vu32 nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    const vu32 result = (sign >> 16) | select_u32(shl1_w > 0xFF000000u, vu32{} + 0x7E00u, nonsign);
    const vu16 narrow = __builtin_convertvector(result, vu16);
    std::memcpy(out + i, &narrow, sizeof(narrow));
  }
  for (; i < n; ++i) out[i] = c10::Half(buf[i]);
}

// buf[0, n) = x * inv_tau; buf[n, round_up(n, W)) = -inf (adds nothing to the statistics)
template <typename T>
DK_CPU_INLINE int64_t load_chunk(const T* x, int64_t n, float inv_tau, float* buf) {
  to_float(x, n, inv_tau, buf);
  const int64_t padded = (n + W - 1) / W * W;
  for (int64_t i = n; i < padded; ++i) buf[i] = -INFINITY;
  return padded;
}

DK_CPU_INLINE float hmax(const vfloat& v) {
  float m = v[0];
  for (int l = 1; l < W; ++l) m = v[l] > m ? v[l] : m;
  return m;
}

// Softmax statistics of z = x * inv_tau over one row, in one pass: per lane online (s, u) relative to
// the running maximum m, rescaled when a chunk raises it; the lanes are summed in a fixed order.
template <typename T>
DK_CPU_INLINE SoftmaxStats row_stats(const T* x, int64_t V, float inv_tau) {
  alignas(64) float buf[CHUNK];
  vfloat s = splat(0.0f), u = splat(0.0f);
  float m = -INFINITY;
  for (int64_t c0 = 0; c0 < V; c0 += CHUNK) {
    const int64_t nb = load_chunk(x + c0, std::min(CHUNK, V - c0), inv_tau, buf);
    vfloat cm = splat(-INFINITY);
    for (int64_t i = 0; i < nb; i += W) {
      const vfloat z = load(buf + i);
      cm = select(z > cm, z, cm);
    }
    const float chunk_max = hmax(cm);
    if (chunk_max == -INFINITY) continue;  // nothing but -inf in this chunk
    if (chunk_max > m) {
      for (int l = 0; l < W; ++l) {
        const SoftmaxStats r = softmax_rescale({m, s[l], u[l]}, chunk_max);
        s[l] = r.s;
        u[l] = r.u;
      }
      m = chunk_max;
    }
    const vfloat mv = splat(m), zero = splat(0.0f);
    for (int64_t i = 0; i < nb; i += W) {
      const vfloat d = load(buf + i) - mv;
      const vfloat e = exp_vec(d);
      s += e;
      u += select(e > zero, e * d, zero);
    }
  }
  SoftmaxStats st{m, 0.0f, 0.0f};
  for (int l = 0; l < W; ++l) {
    st.s += s[l];
    st.u += u[l];
  }
  return st;
}

// One scored row x = logits[row]: one pass over V, the epilogue, the [N] outputs written.
// (An out-of-range target throws here, before the row is read; the CUDA kernels, which cannot throw,
// give NaN instead.)
template <typename T>
DK_CPU_INLINE RowResult forward_row(const ForwardPointers& a, int64_t row, const T* x) {
  const int64_t y = a.targets[row];
  TORCH_CHECK_INDEX(y >= 0 && y < a.V, "targets: row ", row, " has target ", y, ", outside [0, V=", a.V, ")");
  const SoftmaxStats st = row_stats(x, a.V, a.inv_tau);
  const RowResult r = forward_row_result(a, row, st, static_cast<float>(x[y]) * a.inv_tau);
  store_row(a, row, r);
  return r;
}

template <typename T>
DK_CPU_INLINE void forward_range(const ForwardPointers& a, int64_t begin, int64_t end) {
  const T* logits = static_cast<const T*>(a.logits);
  for (int64_t row = begin; row < end; ++row) {
    if (a.scored[row]) {
      forward_row(a, row, logits + row * a.V);
    } else {
      store_unscored_row(a, row);
    }
  }
}

DK_CPU_CLONES void forward_range_f32(const ForwardPointers& a, int64_t b, int64_t e) { forward_range<float>(a, b, e); }
DK_CPU_CLONES void forward_range_f16(const ForwardPointers& a, int64_t b, int64_t e) {
  forward_range<c10::Half>(a, b, e);
}
DK_CPU_CLONES void forward_range_bf16(const ForwardPointers& a, int64_t b, int64_t e) {
  forward_range<c10::BFloat16>(a, b, e);
}

// One row of the gradient into out (may be x itself: every chunk is read before it is written).
// buf: a CHUNK-float scratch buffer.
template <typename T>
DK_CPU_INLINE void grad_row(const T* x, T* out, int64_t V, int64_t row, int64_t y, float lse, float H, float g,
                            float h, float inv_tau, float* buf) {
  if (g == 0.0f && h == 0.0f) {  // exact zeros, the logits are not read
    for (int64_t i = 0; i < V; ++i) out[i] = T(0.0f);
    return;
  }
  TORCH_CHECK_INDEX(y >= 0 && y < V, "targets: row ", row, " has target ", y, ", outside [0, V=", V, ")");
  const float zy = static_cast<float>(x[y]) * inv_tau;  // read before out (maybe x itself) is written
  const vfloat lse_v = splat(lse), H_v = splat(H), zero = splat(0.0f);
  for (int64_t c0 = 0; c0 < V; c0 += CHUNK) {
    const int64_t n = std::min(CHUNK, V - c0);
    const int64_t nb = load_chunk(x + c0, n, inv_tau, buf);
    for (int64_t i = 0; i < nb; i += W) {  // logit_grad of row_math.h, W lanes at a time
      const vfloat log_p = load(buf + i) - lse_v;
      const vfloat p = exp_vec(log_p);
      vfloat grad = -g * p;
      grad -= h * select(p > zero, p * (log_p + H_v), zero);
      store(buf + i, grad * inv_tau);
    }
    from_float(buf, n, out + c0);
  }
  const float log_py = zy - lse;
  out[y] = T(logit_grad(log_py, exp_lane(log_py), true, H, g, h, inv_tau));
}

template <typename T>
DK_CPU_INLINE void grad_range(const GradPointers& a, int64_t begin, int64_t end) {
  alignas(64) float buf[CHUNK];
  for (int64_t row = begin; row < end; ++row) {
    grad_row(static_cast<const T*>(a.logits) + row * a.V, static_cast<T*>(a.out) + row * a.V, a.V, row,
             a.targets[row], a.lse[row], a.entropy[row], a.g[row], a.h[row], a.inv_tau, buf);
  }
}

DK_CPU_CLONES void grad_range_f32(const GradPointers& a, int64_t b, int64_t e) { grad_range<float>(a, b, e); }
DK_CPU_CLONES void grad_range_f16(const GradPointers& a, int64_t b, int64_t e) { grad_range<c10::Half>(a, b, e); }
DK_CPU_CLONES void grad_range_bf16(const GradPointers& a, int64_t b, int64_t e) {
  grad_range<c10::BFloat16>(a, b, e);
}

// forward_range and grad_range in one pass over the rows: each row is reduced, then re-read for its
// gradient while it is still in this core's cache (<= 1 MiB for V <= 256k float32), instead of from
// DRAM in a later backward pass. Same functions, same arguments: the same bits as the two passes.
template <typename T>
DK_CPU_INLINE void forward_grad_range(const FusedPointers& a, int64_t begin, int64_t end) {
  const ForwardPointers& f = a.fwd;
  const int64_t V = f.V;
  alignas(64) float buf[CHUNK];
  for (int64_t row = begin; row < end; ++row) {
    const T* x = static_cast<const T*>(f.logits) + row * V;
    T* out = static_cast<T*>(a.out) + row * V;
    if (!f.scored[row]) {
      store_unscored_row(f, row);
      grad_row(x, out, V, row, 0, 0.0f, 0.0f, 0.0f, 0.0f, f.inv_tau, buf);  // zeros
      continue;
    }
    const RowResult r = forward_row(f, row, x);
    const GradFactors gh = fused_grad_factors(a, row, r);
    grad_row(x, out, V, row, f.targets[row], r.lse, r.entropy, gh.g, gh.h, f.inv_tau, buf);
  }
}

DK_CPU_CLONES void forward_grad_range_f32(const FusedPointers& a, int64_t b, int64_t e) {
  forward_grad_range<float>(a, b, e);
}
DK_CPU_CLONES void forward_grad_range_f16(const FusedPointers& a, int64_t b, int64_t e) {
  forward_grad_range<c10::Half>(a, b, e);
}
DK_CPU_CLONES void forward_grad_range_bf16(const FusedPointers& a, int64_t b, int64_t e) {
  forward_grad_range<c10::BFloat16>(a, b, e);
}

// rows per parallel task: about 64k elements each, so small-V batches are not split too finely
int64_t grain(int64_t V) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(V, 1)); }

}  // namespace cpu

void forward_rows_cpu(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& scored,
                      const at::Tensor& old_logprobs, const at::Tensor& ref_logprobs,
                      const at::Tensor& advantages, const RowParams& params, float inv_tau,
                      bool need_entropy, ForwardOutputs& out) {
  const ForwardPointers a =
      forward_pointers(logits, targets, scored, old_logprobs, ref_logprobs, advantages, params, inv_tau, need_entropy, out);
  const auto fn = by_logits_dtype(logits, cpu::forward_range_f32, cpu::forward_range_f16, cpu::forward_range_bf16);
  at::parallel_for(0, a.N, cpu::grain(a.V), [&](int64_t b, int64_t e) { fn(a, b, e); });
}

void forward_grad_rows_cpu(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& scored,
                           const at::Tensor& old_logprobs, const at::Tensor& ref_logprobs,
                           const at::Tensor& advantages, const RowParams& params, float inv_tau,
                           bool need_entropy, const at::Tensor& row_weights, float grad_scale,
                           ForwardOutputs& out, const at::Tensor& grad) {
  const FusedPointers a = fused_pointers(logits, targets, scored, old_logprobs, ref_logprobs, advantages, params,
                                         inv_tau, need_entropy, row_weights, grad_scale, out, grad);
  const auto fn = by_logits_dtype(logits, cpu::forward_grad_range_f32, cpu::forward_grad_range_f16,
                                  cpu::forward_grad_range_bf16);
  at::parallel_for(0, a.fwd.N, cpu::grain(a.fwd.V), [&](int64_t b, int64_t e) { fn(a, b, e); });
}

void grad_rows_cpu(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                   const at::Tensor& entropy, const at::Tensor& g, const at::Tensor& h, float inv_tau,
                   const at::Tensor& out) {
  const GradPointers a = grad_pointers(logits, targets, lse, entropy, g, h, inv_tau, out);
  const auto fn = by_logits_dtype(logits, cpu::grad_range_f32, cpu::grad_range_f16, cpu::grad_range_bf16);
  at::parallel_for(0, a.N, cpu::grain(a.V), [&](int64_t b, int64_t e) { fn(a, b, e); });
}

}  // namespace deltal_kernels
