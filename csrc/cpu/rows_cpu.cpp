// CPU row kernels: parallel over rows (at::parallel_for), vectorised within a row.
//
// One row is handled by one thread, so results do not depend on the thread count (deterministic).
// Within a row the logits are converted to float32 (times 1/tau) a chunk at a time into an
// L1-resident buffer, and the loops over the buffer are written over W independent lanes, which the
// compiler maps onto SIMD registers (SSE2 by default, AVX2/AVX-512 through function multiversioning:
// target_clones picks the best the running CPU has). The exponential is a branch-free polynomial so
// it vectorises too. The softmax statistics are online per chunk (one pass over the row), merged
// with the shared row_math.h functions; nothing [N, V]-sized is allocated.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <bit>
#include <cstdint>

#include "deltal_kernels/kernels.h"
#include "deltal_kernels/row_math.h"

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(DK_NO_TARGET_CLONES)
#define DK_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DK_CPU_CLONES
#endif
#if defined(__GNUC__)
#define DK_CPU_INLINE inline __attribute__((always_inline))
#else
#define DK_CPU_INLINE inline
#endif

namespace deltal_kernels {
namespace cpu {

constexpr int W = 16;            // lanes the inner loops are written for (one AVX-512 / two AVX2 registers)
constexpr int64_t CHUNK = 1024;  // elements converted to float32 at a time (4 KiB: stays in L1)

// exp(x) for x <= 0 (larger x is clamped to 88): Cody-Waite reduction x = n ln2 + r, a degree-6
// polynomial for exp(r) (Cephes expf, ~1 ulp), and 2^n built in the exponent bits. Returns exactly
// 0 below -87 (where float32 exp is subnormal; relative to a softmax sum >= 1 it is nothing) and for
// -inf. Branch-free, so the loops that call it vectorise.
DK_CPU_INLINE float exp_lane(float x) {
  const float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (xc * 1.44269504088896341f + shifter) - shifter;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  const float scale = std::bit_cast<float>(bits);
  return x < -87.0f ? 0.0f : y * scale;
}

// buf[0, n) = x * inv_tau; buf[n, round_up(n, W)) = -inf (adds nothing to the statistics)
template <typename T>
DK_CPU_INLINE int64_t load_chunk(const T* x, int64_t n, float inv_tau, float* buf) {
  for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(x[i]) * inv_tau;
  const int64_t padded = (n + W - 1) / W * W;
  for (int64_t i = n; i < padded; ++i) buf[i] = -INFINITY;
  return padded;
}

// Softmax statistics of z = x * inv_tau over one row, in one pass.
template <typename T>
DK_CPU_INLINE SoftmaxStats row_stats(const T* x, int64_t V, float inv_tau) {
  alignas(64) float buf[CHUNK];
  alignas(64) float s[W];
  alignas(64) float u[W];
  for (int l = 0; l < W; ++l) s[l] = u[l] = 0.0f;
  float m = -INFINITY;  // every lane's statistics are relative to this running maximum
  for (int64_t c0 = 0; c0 < V; c0 += CHUNK) {
    const int64_t nb = load_chunk(x + c0, std::min(CHUNK, V - c0), inv_tau, buf);
    alignas(64) float cm[W];
    for (int l = 0; l < W; ++l) cm[l] = -INFINITY;
    for (int64_t i = 0; i < nb; i += W)
      for (int l = 0; l < W; ++l) cm[l] = buf[i + l] > cm[l] ? buf[i + l] : cm[l];
    float chunk_max = cm[0];
    for (int l = 1; l < W; ++l) chunk_max = cm[l] > chunk_max ? cm[l] : chunk_max;
    if (chunk_max == -INFINITY) continue;  // nothing but -inf in this chunk
    if (chunk_max > m) {
      for (int l = 0; l < W; ++l) {
        const SoftmaxStats r = softmax_rescale({m, s[l], u[l]}, chunk_max);
        s[l] = r.s;
        u[l] = r.u;
      }
      m = chunk_max;
    }
    for (int64_t i = 0; i < nb; i += W) {
      for (int l = 0; l < W; ++l) {
        const float d = buf[i + l] - m;
        const float e = exp_lane(d);
        s[l] += e;
        u[l] += e > 0.0f ? e * d : 0.0f;
      }
    }
  }
  SoftmaxStats st{m, 0.0f, 0.0f};  // the lanes share m: their sums add in a fixed order
  for (int l = 0; l < W; ++l) {
    st.s += s[l];
    st.u += u[l];
  }
  return st;
}

struct ForwardArgs {
  const void* logits;
  const int64_t* targets;
  const bool* scored;
  const float* old_logprobs;
  const float* ref_logprobs;  // nullptr: no KL term
  const float* advantages;
  int64_t V;
  float inv_tau;
  bool need_entropy;
  RowParams params;
  float* logp;
  float* entropy;
  float* lse;
  float* loss;
  float* dlogp;
  float* kl;
  uint8_t* flags;
};

template <typename T>
DK_CPU_INLINE void forward_range(const ForwardArgs& a, int64_t begin, int64_t end) {
  const T* logits = static_cast<const T*>(a.logits);
  for (int64_t row = begin; row < end; ++row) {
    if (!a.scored[row]) continue;  // outputs are zero-filled; unscored rows do no V work
    const int64_t y = a.targets[row];
    TORCH_CHECK_INDEX(y >= 0 && y < a.V, "targets: row ", row, " has target ", y, ", outside [0, V=", a.V, ")");
    const T* x = logits + row * a.V;
    const SoftmaxStats st = row_stats(x, a.V, a.inv_tau);
    const float lse = softmax_lse(st);
    const float logp = static_cast<float>(x[y]) * a.inv_tau - lse;
    const float entropy = a.need_entropy ? softmax_entropy(st) : 0.0f;
    const float ref = a.ref_logprobs ? a.ref_logprobs[row] : 0.0f;
    const RowTerms t = row_terms(logp, entropy, a.old_logprobs[row], ref, a.advantages[row], a.params);
    a.logp[row] = logp;
    a.entropy[row] = entropy;
    a.lse[row] = lse;
    a.loss[row] = t.loss;
    a.dlogp[row] = t.dlogp;
    a.kl[row] = t.kl;
    a.flags[row] = t.flags;
  }
}

DK_CPU_CLONES void forward_range_f32(const ForwardArgs& a, int64_t b, int64_t e) { forward_range<float>(a, b, e); }
DK_CPU_CLONES void forward_range_f16(const ForwardArgs& a, int64_t b, int64_t e) {
  forward_range<c10::Half>(a, b, e);
}
DK_CPU_CLONES void forward_range_bf16(const ForwardArgs& a, int64_t b, int64_t e) {
  forward_range<c10::BFloat16>(a, b, e);
}

struct GradArgs {
  const void* logits;
  void* out;  // may equal logits
  const int64_t* targets;
  const float* lse;
  const float* entropy;
  const float* g;
  const float* h;
  int64_t V;
  float inv_tau;
};

template <typename T>
DK_CPU_INLINE void grad_range(const GradArgs& a, int64_t begin, int64_t end) {
  const int64_t V = a.V;
  alignas(64) float buf[CHUNK];
  for (int64_t row = begin; row < end; ++row) {
    const T* x = static_cast<const T*>(a.logits) + row * V;
    T* out = static_cast<T*>(a.out) + row * V;
    const float g = a.g[row], h = a.h[row];
    if (g == 0.0f && h == 0.0f) {  // exact zeros, the logits are not read
      for (int64_t i = 0; i < V; ++i) out[i] = T(0.0f);
      continue;
    }
    const int64_t y = a.targets[row];
    TORCH_CHECK_INDEX(y >= 0 && y < V, "targets: row ", row, " has target ", y, ", outside [0, V=", V, ")");
    const float lse = a.lse[row], H = a.entropy[row], inv_tau = a.inv_tau;
    const float zy = static_cast<float>(x[y]) * inv_tau;  // read before out (maybe x itself) is written
    for (int64_t c0 = 0; c0 < V; c0 += CHUNK) {
      const int64_t n = std::min(CHUNK, V - c0);
      for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(x[c0 + i]) * inv_tau;
      for (int64_t i = 0; i < n; ++i) {
        const float log_p = buf[i] - lse;
        buf[i] = logit_grad(log_p, exp_lane(log_p), false, H, g, h, inv_tau);
      }
      for (int64_t i = 0; i < n; ++i) out[c0 + i] = T(buf[i]);
    }
    const float log_py = zy - lse;
    out[y] = T(logit_grad(log_py, exp_lane(log_py), true, H, g, h, inv_tau));
  }
}

DK_CPU_CLONES void grad_range_f32(const GradArgs& a, int64_t b, int64_t e) { grad_range<float>(a, b, e); }
DK_CPU_CLONES void grad_range_f16(const GradArgs& a, int64_t b, int64_t e) { grad_range<c10::Half>(a, b, e); }
DK_CPU_CLONES void grad_range_bf16(const GradArgs& a, int64_t b, int64_t e) {
  grad_range<c10::BFloat16>(a, b, e);
}

// rows per parallel task: about 64k elements each, so small-V batches are not split too finely
int64_t grain(int64_t V) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(V, 1)); }

}  // namespace cpu

void forward_rows_cpu(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& scored,
                      const at::Tensor& old_logprobs, const at::Tensor& ref_logprobs,
                      const at::Tensor& advantages, const RowParams& params, float inv_tau,
                      bool need_entropy, ForwardOutputs& out) {
  const int64_t N = logits.size(0);
  cpu::ForwardArgs a{logits.const_data_ptr(),
                     targets.const_data_ptr<int64_t>(),
                     scored.const_data_ptr<bool>(),
                     old_logprobs.const_data_ptr<float>(),
                     ref_logprobs.defined() ? ref_logprobs.const_data_ptr<float>() : nullptr,
                     advantages.const_data_ptr<float>(),
                     logits.size(1),
                     inv_tau,
                     need_entropy,
                     params,
                     out.logp.mutable_data_ptr<float>(),
                     out.entropy.mutable_data_ptr<float>(),
                     out.lse.mutable_data_ptr<float>(),
                     out.loss.mutable_data_ptr<float>(),
                     out.dlogp.mutable_data_ptr<float>(),
                     out.kl.mutable_data_ptr<float>(),
                     out.flags.mutable_data_ptr<uint8_t>()};
  void (*fn)(const cpu::ForwardArgs&, int64_t, int64_t) = nullptr;
  switch (logits.scalar_type()) {
    case at::kFloat: fn = cpu::forward_range_f32; break;
    case at::kHalf: fn = cpu::forward_range_f16; break;
    case at::kBFloat16: fn = cpu::forward_range_bf16; break;
    default: TORCH_CHECK_TYPE(false, "logits: expected float32, float16 or bfloat16, got ", logits.scalar_type());
  }
  at::parallel_for(0, N, cpu::grain(a.V), [&](int64_t b, int64_t e) { fn(a, b, e); });
}

void grad_rows_cpu(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                   const at::Tensor& entropy, const at::Tensor& g, const at::Tensor& h, float inv_tau,
                   const at::Tensor& out) {
  const int64_t N = logits.size(0);
  cpu::GradArgs a{logits.const_data_ptr(),
                  out.data_ptr(),
                  targets.const_data_ptr<int64_t>(),
                  lse.const_data_ptr<float>(),
                  entropy.const_data_ptr<float>(),
                  g.const_data_ptr<float>(),
                  h.const_data_ptr<float>(),
                  logits.size(1),
                  inv_tau};
  void (*fn)(const cpu::GradArgs&, int64_t, int64_t) = nullptr;
  switch (logits.scalar_type()) {
    case at::kFloat: fn = cpu::grad_range_f32; break;
    case at::kHalf: fn = cpu::grad_range_f16; break;
    case at::kBFloat16: fn = cpu::grad_range_bf16; break;
    default: TORCH_CHECK_TYPE(false, "logits: expected float32, float16 or bfloat16, got ", logits.scalar_type());
  }
  at::parallel_for(0, N, cpu::grain(a.V), [&](int64_t b, int64_t e) { fn(a, b, e); });
}

}  // namespace deltal_kernels
