// CPU row kernels: parallel over rows (at::parallel_for), vectorised within a row.
//
// One row is handled by one thread, so results do not depend on the thread count (deterministic).
// Within a row the loops run on float32 vectors of the native width of the instruction set picked at
// load time: 16 lanes (one zmm register) for AVX-512, 8 (one ymm) for AVX2+FMA, 4 (SSE2, or NEON and
// the like off x86) for the portable fallback. The vector code is written once with GCC/Clang vector
// extensions, templated on the lane count, and instantiated in functions compiled for each
// instruction set (__attribute__((target))), so every operation maps to one native instruction
// (vfmadd, vmaxps, vpslld, ...: the hot loops hold no scalar floating-point instruction); the set
// follows PyTorch's own CPU capability (at::get_cpu_capability(), which honours
// ATEN_CPU_CAPABILITY=default|avx2|avx512), limited to what the CPU supports.
//
// A row is read straight from the logits, 2W elements at a time (float32; bfloat16/float16 widened in
// registers by a shift or a mask): per chunk of CHUNK elements a max pass (four independent max
// accumulators), then an exp pass over the same L1-resident chunk accumulating the online softmax
// statistics (s, u) relative to the running maximum (two accumulators), rescaled when a later chunk
// raises it; nothing [N, V]-sized is allocated. The exponential is exp_vec below (Cody-Waite
// reduction, a degree-6 polynomial with FMA, 2^n in the exponent bits; < 0.9 ulp on the FMA paths).
// The per-row functions (row_stats_*, grad_row_*) are out-of-line functions of each instruction set,
// so the fused forward + gradient and the separate forward and gradient run the very same machine
// code: the same bits. The fused path runs them back to back on one thread, so the gradient pass
// re-reads a row still in that core's cache. Needs GCC or Clang (vector extensions); builds as C++17
// and C++20.
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "deltal_kernels/kernels.h"
#include "deltal_kernels/row_math.h"
#include "deltal_kernels/row_pointers.h"

#if defined(__GNUC__) && defined(__x86_64__) && !defined(DK_NO_TARGET_CLONES) && \
    (!defined(__clang__) || __clang_major__ >= 14)
#define DK_CPU_X86_ISAS 1
#define DK_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define DK_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")))
#else
#define DK_CPU_X86_ISAS 0
#endif
#if defined(__GNUC__)
#define DK_CPU_INLINE inline __attribute__((always_inline))
#define DK_CPU_NOINLINE __attribute__((noinline))
#else
#define DK_CPU_INLINE inline
#define DK_CPU_NOINLINE
#endif

// The 32- and 64-byte vector types below are only ever passed between always_inline functions
// inside functions compiled for AVX2/AVX-512, so no vector crosses a call boundary and GCC's note
// that such a call's ABI differs without AVX does not apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace deltal_kernels {
namespace cpu {

constexpr int64_t CHUNK = 2048;  // elements per max pass + exp pass (8 KiB of float32: stays in L1)

// W float32 lanes and the matching integer vectors (GCC/Clang vector extensions): arithmetic,
// comparisons (lane masks of all ones / zeros), `mask ? a : b` and casts between same-size vector
// types (bit reinterpretation) lower to single SIMD instructions of the enclosing function's target.
template <int W>
struct Vec {
  typedef float F __attribute__((vector_size(W * sizeof(float))));
  typedef int32_t I __attribute__((vector_size(W * sizeof(int32_t))));
  typedef uint32_t U __attribute__((vector_size(W * sizeof(uint32_t))));
  typedef uint16_t H __attribute__((vector_size(W * sizeof(uint16_t))));
};

template <typename F>
DK_CPU_INLINE F splat(float v) {
  return F{} + v;
}

template <typename F>
DK_CPU_INLINE F load(const float* p) {
  F v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename F>
DK_CPU_INLINE void store(float* p, const F& v) {
  std::memcpy(p, &v, sizeof(v));
}

// ---------------------------------------------------------------------------------------------
// exp
// ---------------------------------------------------------------------------------------------
// exp(x), lane-wise. x is clamped to [kExpLo, kExpHi] (xc, also returned: the caller's e * xc is a
// finite 0 where e is 0, -inf inputs included), n = round(xc / ln 2) by the 1.5 * 2^23 shift, the
// Cody-Waite reduction r = xc - n ln 2 (two constants, |r| <= ln2/2), exp(r) by a degree-6
// polynomial (Horner, coefficients fitted for minimax relative error on [-ln2/2, ln2/2]: 3e-9), and
// 2^n built in the exponent bits of the shifted value (the integer n sits in its low mantissa bits).
// Error against exp of the float32 input, exhaustively over every float32 in [-87.33, 88] (results
// >= 2^-126): < 0.9 ulp with FMA (the AVX2 and AVX-512 paths, which compute the same bits per lane),
// < 1.2 ulp without (the portable path). Below: n = -127 gives a zero scale, so exp is exactly 0 for
// x <= -87.68 and for -inf; in (-87.68, -87.33) it is subnormal, within 2^-149 of the rounded exp
// (absolute error < 2^-126 everywhere below -87.33: nothing next to a softmax sum >= 1). x > 88
// gives exp(88). NaN gives NaN (the clamps keep a NaN operand). tests/test_cpu_kernels.py checks
// these bounds against float64 for each instruction set.
constexpr float kExpLo = -88.0f;
constexpr float kExpHi = 88.0f;

template <typename F>
struct ExpClamp {
  F lo, hi;
};

// The clamp bounds, made opaque to the compiler: with a visible constant GCC emits a compare and a
// blend for `lo > x ? lo : x` instead of the single vmaxps (whose NaN rule is that expression's).
template <typename F>
DK_CPU_INLINE ExpClamp<F> exp_clamp() {
  ExpClamp<F> c{splat<F>(kExpLo), splat<F>(kExpHi)};
#if defined(__GNUC__) && defined(__x86_64__)
  __asm__("" : "+x"(c.lo), "+x"(c.hi));
#endif
  return c;
}

template <typename F>
DK_CPU_INLINE F exp_vec(const F& x, F& xc, const ExpClamp<F>& clamp) {
  typedef uint32_t U __attribute__((vector_size(sizeof(F))));
  const F shift = splat<F>(12582912.0f);  // 1.5 * 2^23
  xc = clamp.lo > x ? clamp.lo : x;       // vmaxps, vminps: a NaN x compares false and stays
  xc = clamp.hi < xc ? clamp.hi : xc;
  const F t = xc * 1.44269504088896341f + shift;  // 1.5 * 2^23 + n, n = round(xc / ln 2)
  const F n = t - shift;
  F r = xc - n * 0.693359375f;  // ln 2 = 0.693359375 - 2.12194440e-4 (+ 6e-12): n * 0.693359375 is exact
  r = r - n * -2.12194440e-4f;
  F p = r * 1.381457201e-03f + 8.368730545e-03f;
  p = p * r + 4.166838899e-02f;
  p = p * r + 1.666652113e-01f;
  p = p * r + 4.999999404e-01f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // bits of t = 0x4B400000 + n; shifted left by 23 only n << 23 remains (mod 2^32); + 127 << 23 is
  // the biased exponent of 2^n (n = -127: 0, a zero scale)
  const U scale = ((U)t << 23) + (127u << 23);
  return p * (F)scale;
}

// ---------------------------------------------------------------------------------------------
// Blocks of 2W logits as two float32 vectors (a, b). Loads are exact; gradient stores round to
// nearest even like the c10 conversions (NaN stays NaN). 16-bit types are read 2W at a time as W
// 32-bit words, each holding an even element (low half) and an odd one (high half): a holds the
// even elements, b the odd ones, which costs one shift or mask each way instead of a widening
// shuffle. The row statistics do not depend on the order, and the gradient is stored back in the
// same interleaving.
// ---------------------------------------------------------------------------------------------
template <int W>
DK_CPU_INLINE void load_block(const float* p, typename Vec<W>::F& a, typename Vec<W>::F& b) {
  a = load<typename Vec<W>::F>(p);
  b = load<typename Vec<W>::F>(p + W);
}

template <int W>
DK_CPU_INLINE typename Vec<W>::U load_words(const void* p) {
  typename Vec<W>::U w;
  std::memcpy(&w, p, sizeof(w));
  return w;
}

// bfloat16 is the top half of a float32
template <int W>
DK_CPU_INLINE void load_block(const c10::BFloat16* p, typename Vec<W>::F& a, typename Vec<W>::F& b) {
  const typename Vec<W>::U w = load_words<W>(p);
  a = (typename Vec<W>::F)(w << 16);
  b = (typename Vec<W>::F)(w & 0xFFFF0000u);
}

// fp16_ieee_to_fp32_value (c10::Half's float conversion) of w = h << 16
template <int W>
DK_CPU_INLINE typename Vec<W>::F half_to_float(const typename Vec<W>::U& w) {
  typedef typename Vec<W>::F F;
  typedef typename Vec<W>::U U;
  typedef typename Vec<W>::I I;
  const U sign = w & 0x80000000u;
  const U two_w = w + w;
  const F normalized = (F)((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const F denormalized = (F)((two_w >> 17) | (126u << 23)) - 0.5f;
  const I is_denormal = (I)(two_w < (1u << 27));
  return (F)(sign | (U)(is_denormal ? (I)denormalized : (I)normalized));
}

template <int W>
DK_CPU_INLINE void load_block(const c10::Half* p, typename Vec<W>::F& a, typename Vec<W>::F& b) {
  const typename Vec<W>::U w = load_words<W>(p);
  a = half_to_float<W>(w << 16);
  b = half_to_float<W>(w & 0xFFFF0000u);
}

template <int W>
DK_CPU_INLINE void store_block(float* p, const typename Vec<W>::F& a, const typename Vec<W>::F& b) {
  store(p, a);
  store(p + W, b);
}

// c10::BFloat16(float) in the high half of each word: round to nearest even, NaN -> 0x7FC0
template <int W>
DK_CPU_INLINE typename Vec<W>::U bf16_high(const typename Vec<W>::F& v) {
  typedef typename Vec<W>::U U;
  typedef typename Vec<W>::I I;
  const U bits = (U)v;
  const U rounded = bits + (((bits >> 16) & 1u) + 0x7FFFu);
  return (U)((I)(v != v) ? (I)(U{} + 0x7FC00000u) : (I)rounded) & 0xFFFF0000u;
}

template <int W>
DK_CPU_INLINE void store_block(c10::BFloat16* p, const typename Vec<W>::F& a, const typename Vec<W>::F& b) {
  const typename Vec<W>::U w = (bf16_high<W>(a) >> 16) | bf16_high<W>(b);
  std::memcpy(p, &w, sizeof(w));
}

// c10::Half(float) (fp16_ieee_from_fp32_value: round to nearest even, overflow to inf, NaN -> 0x7E00)
// in the low half of each word
template <int W>
DK_CPU_INLINE typename Vec<W>::U half_low(const typename Vec<W>::F& v) {
  typedef typename Vec<W>::F F;
  typedef typename Vec<W>::U U;
  typedef typename Vec<W>::I I;
  const U w = (U)v;
  F base = ((F)(w & 0x7FFFFFFFu) * 0x1.0p+112f) * 0x1.0p-110f;
  const U shl1_w = w + w;
  const U sign = w & 0x80000000u;
  U bias = shl1_w & 0xFF000000u;
  bias = (U)((I)(bias < 0x71000000u) ? (I)(U{} + 0x71000000u) : (I)bias);
  base = (F)((bias >> 1) + 0x07800000u) + base;
  const U bits = (U)base;
  const U nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return (sign >> 16) | (U)((I)(shl1_w > 0xFF000000u) ? (I)(U{} + 0x7E00u) : (I)nonsign);
}

template <int W>
DK_CPU_INLINE void store_block(c10::Half* p, const typename Vec<W>::F& a, const typename Vec<W>::F& b) {
  const typename Vec<W>::U w = half_low<W>(a) | (half_low<W>(b) << 16);
  std::memcpy(p, &w, sizeof(w));
}

// the last n < 2W elements of a row or chunk, in order: a = [0, W), b = [W, 2W), lanes past n = fill
template <int W, typename T>
DK_CPU_INLINE void load_tail(const T* p, int64_t n, float fill, typename Vec<W>::F& a, typename Vec<W>::F& b) {
  alignas(64) float tmp[2 * W];
  for (int64_t l = 0; l < 2 * W; ++l) tmp[l] = l < n ? static_cast<float>(p[l]) : fill;
  a = load<typename Vec<W>::F>(tmp);
  b = load<typename Vec<W>::F>(tmp + W);
}

template <int W, typename T>
DK_CPU_INLINE void store_tail(T* p, int64_t n, const typename Vec<W>::F& a, const typename Vec<W>::F& b) {
  alignas(64) float tmp[2 * W];
  store(tmp, a);
  store(tmp + W, b);
  for (int64_t l = 0; l < n; ++l) p[l] = T(tmp[l]);
}

// ---------------------------------------------------------------------------------------------
// Softmax statistics of one row
// ---------------------------------------------------------------------------------------------
template <typename F>
DK_CPU_INLINE F vmax(const F& acc, const F& z) {  // vmaxps: a NaN z leaves acc (NaN is handled apart)
  return z > acc ? z : acc;
}

// max of x[0, n) (NaN skipped; -inf if there is nothing else)
template <int W, typename T>
DK_CPU_INLINE float chunk_max(const T* x, int64_t n) {
  typedef typename Vec<W>::F F;
  const F ninf = splat<F>(-INFINITY);
  F m0 = ninf, m1 = ninf, m2 = ninf, m3 = ninf;  // independent accumulators: no max latency chain
  F a, b;
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    load_block<W>(x + i, a, b);
    m0 = vmax(m0, a);
    m1 = vmax(m1, b);
    load_block<W>(x + i + 2 * W, a, b);
    m2 = vmax(m2, a);
    m3 = vmax(m3, b);
  }
  if (i + 2 * W <= n) {
    load_block<W>(x + i, a, b);
    m0 = vmax(m0, a);
    m1 = vmax(m1, b);
    i += 2 * W;
  }
  if (i < n) {
    load_tail<W>(x + i, n - i, -INFINITY, a, b);
    m2 = vmax(m2, a);
    m3 = vmax(m3, b);
  }
  const F m = vmax(vmax(m0, m1), vmax(m2, m3));
  float r = m[0];
  for (int l = 1; l < W; ++l) r = m[l] > r ? m[l] : r;  // once per chunk
  return r;
}

template <typename T>
DK_CPU_INLINE bool any_nan(const T* x, int64_t n) {  // only for chunks with no finite value or +inf
  for (int64_t i = 0; i < n; ++i) {
    const float v = static_cast<float>(x[i]);
    if (v != v) return true;
  }
  return false;
}

// Softmax statistics of z = x * inv_tau (inv_tau > 0) over one row, in one pass over the logits:
// per chunk its max (of x: the rounding of x * inv_tau is monotonic), then per lane the online
// (s, u) relative to the running maximum m, rescaled when a chunk raises it (softmax_rescale of
// row_math.h, all lanes at once: they share m); two accumulators, summed with the lanes in a fixed
// order at the end. d = z - m is one fused x * inv_tau - m. u (for the entropy) only with kEntropy.
// Non-finite logits give the reference's NaN: a NaN makes s NaN (through exp, or the nan flag for a
// chunk of nothing but NaN and -inf), a +inf gives m = inf and inf - inf = NaN; a row of -inf only
// gives m = -inf, s = 0, whose log-probability (-inf) - (-inf) is NaN.
template <int W, typename T, bool kEntropy>
DK_CPU_INLINE SoftmaxStats row_stats(const T* x, int64_t V, float inv_tau) {
  typedef typename Vec<W>::F F;
  const ExpClamp<F> clamp = exp_clamp<F>();
  const F tau = splat<F>(inv_tau);
  F s0 = splat<F>(0.0f), s1 = s0, u0 = s0, u1 = s0;
  float m = -INFINITY;
  bool nan = false;
  for (int64_t c0 = 0; c0 < V; c0 += CHUNK) {
    const T* xc = x + c0;
    const int64_t n = std::min(CHUNK, V - c0);
    const float xm = chunk_max<W>(xc, n);
    if (!(xm > -INFINITY)) {  // nothing but -inf and NaN: adds nothing, unless NaN
      nan = nan || any_nan(xc, n);
      continue;
    }
    const float cm = xm * inv_tau;
    if (cm > m) {
      if (m != -INFINITY) {  // softmax_rescale: s * c, c * (u + d * s), with d = m - cm, c = exp(d)
        const float d = m - cm;
        const F c = splat<F>(dk_exp(d)), dv = splat<F>(d);
        u0 = c * (u0 + dv * s0);
        u1 = c * (u1 + dv * s1);
        s0 = s0 * c;
        s1 = s1 * c;
      }
      m = cm;
    }
    const F neg_m = splat<F>(-m);
    for (int64_t i = 0; i < n; i += 2 * W) {
      F a, b, dca, dcb;
      if (i + 2 * W <= n) {
        load_block<W>(xc + i, a, b);
      } else {
        load_tail<W>(xc + i, n - i, -INFINITY, a, b);  // -inf lanes: e = 0, e * dc = 0
      }
      const F ea = exp_vec(a * tau + neg_m, dca, clamp);
      const F eb = exp_vec(b * tau + neg_m, dcb, clamp);
      s0 += ea;
      s1 += eb;
      if (kEntropy) {
        u0 += ea * dca;  // e * d, 0 where e is 0 (dc is d clamped to >= -88: finite)
        u1 += eb * dcb;
      }
    }
  }
  const F s = s0 + s1, u = u0 + u1;
  SoftmaxStats st{m, 0.0f, 0.0f};
  for (int l = 0; l < W; ++l) {
    st.s += s[l];
    st.u += u[l];
  }
  if (nan) st.s = NAN;
  return st;
}

// ---------------------------------------------------------------------------------------------
// Gradient of one row
// ---------------------------------------------------------------------------------------------
// dL/dx_j = (g * (onehot_j - p_j) - h * p_j * (log p_j + H)) / tau, p_j = exp(log p_j),
// log p_j = x_j * inv_tau - lse (one fused operation), into out (may be x itself: each block is
// read before it is written). The target element is then rewritten by row_math.h's logit_grad.
template <int W, typename T, bool kEntropy>
DK_CPU_INLINE void grad_row_blocks(const T* x, T* out, int64_t V, float lse, float H, float g, float h,
                                   float inv_tau) {
  typedef typename Vec<W>::F F;
  const ExpClamp<F> clamp = exp_clamp<F>();
  const F tau = splat<F>(inv_tau), neg_lse = splat<F>(-lse);
  const F c = splat<F>(-g * inv_tau);  // no entropy term: dL/dx_j = p_j * (-g / tau)
  const F neg_g = splat<F>(-g), hv = splat<F>(h), Hv = splat<F>(H);
  for (int64_t i = 0; i < V; i += 2 * W) {
    const bool full = i + 2 * W <= V;
    F a, b, lpa, lpb;
    if (full) {
      load_block<W>(x + i, a, b);
    } else {
      load_tail<W>(x + i, V - i, 0.0f, a, b);
    }
    const F pa = exp_vec(a * tau + neg_lse, lpa, clamp);
    const F pb = exp_vec(b * tau + neg_lse, lpb, clamp);
    F ga, gb;
    if (kEntropy) {  // logit_grad's formula; lp is log p clamped to >= -88: p * (lp + H) is 0 where p is 0
      ga = (neg_g * pa - hv * (pa * (lpa + Hv))) * tau;
      gb = (neg_g * pb - hv * (pb * (lpb + Hv))) * tau;
    } else {
      ga = pa * c;
      gb = pb * c;
    }
    if (full) {
      store_block<W>(out + i, ga, gb);
    } else {
      store_tail<W>(out + i, V - i, ga, gb);
    }
  }
}

// y < 0: the row's target is in another vocabulary shard (shard_grad_rows), no one-hot term here.
template <int W, typename T>
DK_CPU_INLINE void grad_row(const T* x, T* out, int64_t V, int64_t y, float lse, float H, float g, float h,
                            float inv_tau) {
  typedef typename Vec<W>::F F;
  const float zy = y >= 0 ? static_cast<float>(x[y]) * inv_tau : 0.0f;  // read before out (maybe x) is written
  if (h == 0.0f) {
    grad_row_blocks<W, T, false>(x, out, V, lse, H, g, h, inv_tau);
  } else {
    grad_row_blocks<W, T, true>(x, out, V, lse, H, g, h, inv_tau);
  }
  if (y < 0) return;
  F unused;
  const float log_py = zy - lse;
  const float py = exp_vec(splat<F>(log_py), unused, exp_clamp<F>())[0];
  out[y] = T(logit_grad(log_py, py, true, H, g, h, inv_tau));
}

// ---------------------------------------------------------------------------------------------
// The per-row functions of each instruction set: out of line, so that every caller (forward,
// gradient, fused) runs the same machine code.
// ---------------------------------------------------------------------------------------------
template <typename T>
struct RowFunctions {
  SoftmaxStats (*stats)(const T* x, int64_t V, float inv_tau, bool entropy);
  void (*grad)(const T* x, T* out, int64_t V, int64_t y, float lse, float H, float g, float h, float inv_tau);
};

#define DK_ROW_FUNCTIONS(NAME, TARGET, WIDTH, T)                                                               \
  TARGET DK_CPU_NOINLINE SoftmaxStats row_stats_##NAME(const T* x, int64_t V, float inv_tau, bool entropy) {   \
    return entropy ? row_stats<WIDTH, T, true>(x, V, inv_tau) : row_stats<WIDTH, T, false>(x, V, inv_tau);    \
  }                                                                                                           \
  TARGET DK_CPU_NOINLINE void grad_row_##NAME(const T* x, T* out, int64_t V, int64_t y, float lse, float H,    \
                                              float g, float h, float inv_tau) {                              \
    grad_row<WIDTH, T>(x, out, V, y, lse, H, g, h, inv_tau);                                                   \
  }

#define DK_NO_TARGET
DK_ROW_FUNCTIONS(f32_portable, DK_NO_TARGET, 4, float)
DK_ROW_FUNCTIONS(f16_portable, DK_NO_TARGET, 4, c10::Half)
DK_ROW_FUNCTIONS(bf16_portable, DK_NO_TARGET, 4, c10::BFloat16)
#if DK_CPU_X86_ISAS
DK_ROW_FUNCTIONS(f32_avx2, DK_TARGET_AVX2, 8, float)
DK_ROW_FUNCTIONS(f16_avx2, DK_TARGET_AVX2, 8, c10::Half)
DK_ROW_FUNCTIONS(bf16_avx2, DK_TARGET_AVX2, 8, c10::BFloat16)
DK_ROW_FUNCTIONS(f32_avx512, DK_TARGET_AVX512, 16, float)
DK_ROW_FUNCTIONS(f16_avx512, DK_TARGET_AVX512, 16, c10::Half)
DK_ROW_FUNCTIONS(bf16_avx512, DK_TARGET_AVX512, 16, c10::BFloat16)
#endif

enum class Isa { kPortable, kAvx2, kAvx512 };

// PyTorch's CPU capability (what its own vectorised kernels use; ATEN_CPU_CAPABILITY overrides it),
// limited to what this CPU runs
Isa pick_isa() {
#if DK_CPU_X86_ISAS
  const std::string capability = at::get_cpu_capability();
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  if (capability == "AVX512" && avx512) return Isa::kAvx512;
  if ((capability == "AVX512" || capability == "AVX2") && avx2) return Isa::kAvx2;
#endif
  return Isa::kPortable;
}

Isa isa() {
  static const Isa picked = pick_isa();
  return picked;
}

template <typename T>
RowFunctions<T> row_functions();

#if DK_CPU_X86_ISAS
#define DK_PICK(T, NAME)                                                                   \
  template <>                                                                              \
  RowFunctions<T> row_functions<T>() {                                                     \
    switch (isa()) {                                                                       \
      case Isa::kAvx512:                                                                   \
        return {row_stats_##NAME##_avx512, grad_row_##NAME##_avx512};                      \
      case Isa::kAvx2:                                                                     \
        return {row_stats_##NAME##_avx2, grad_row_##NAME##_avx2};                          \
      default:                                                                             \
        return {row_stats_##NAME##_portable, grad_row_##NAME##_portable};                  \
    }                                                                                      \
  }
#else
#define DK_PICK(T, NAME)                                                                   \
  template <>                                                                              \
  RowFunctions<T> row_functions<T>() {                                                     \
    return {row_stats_##NAME##_portable, grad_row_##NAME##_portable};                      \
  }
#endif
DK_PICK(float, f32)
DK_PICK(c10::Half, f16)
DK_PICK(c10::BFloat16, bf16)

// ---------------------------------------------------------------------------------------------
// Rows: forward, gradient, fused (plain code; the vector work is in the per-row functions)
// ---------------------------------------------------------------------------------------------

// A row whose |m| (of x / tau) reaches row_math.h's kHugeZ (the GPU kernels' threshold, 2^24 in log2
// units) is reduced again from rounded products, element by element. Logits of a trained model are
// never near it.
template <typename T>
DK_CPU_NOINLINE SoftmaxStats row_stats_rounded(const T* x, int64_t V, float inv_tau) {
  SoftmaxStats st = softmax_empty();
  for (int64_t j = 0; j < V; ++j) softmax_push(st, rounded_mul(static_cast<float>(x[j]), inv_tau));
  return st;
}

// The statistics of a row (or of a vocabulary shard of one) as the forward computes them: rows of huge
// logits reduced again from rounded products.
template <typename T>
SoftmaxStats forward_stats(const RowFunctions<T>& k, const T* x, int64_t V, float inv_tau, bool need_entropy) {
  const SoftmaxStats st = k.stats(x, V, inv_tau, need_entropy);
  return huge_z(st.m) ? row_stats_rounded(x, V, inv_tau) : st;  // (non-finite rows keep their NaN)
}

// One scored row x = logits[row]: its statistics, the epilogue, the [N] outputs written.
// (An out-of-range target throws here, before the row is read; the CUDA kernels, which cannot throw,
// give NaN instead.)
template <typename T>
RowResult forward_row(const ForwardPointers& a, const RowFunctions<T>& k, int64_t row, const T* x) {
  const int64_t y = a.targets[row];
  TORCH_CHECK_INDEX(y >= 0 && y < a.V, "targets: row ", row, " has target ", y, ", outside [0, V=", a.V, ")");
  const SoftmaxStats st = forward_stats(k, x, a.V, a.inv_tau, a.need_entropy);
  // (the rounded maximum of the second pass is the first pass's: both round x_max * inv_tau)
  const float zy = huge_z(st.m) ? rounded_mul(static_cast<float>(x[y]), a.inv_tau)
                                : static_cast<float>(x[y]) * a.inv_tau;
  const RowResult r = forward_row_result(a, row, st, zy);
  store_row(a, row, r);
  return r;
}

// The gradient of a row of huge logits (row_math.h's huge_z) from the row's m and log s, element
// by element (x may be out: each element is read first; y < 0: the target is in another shard).
template <typename T>
DK_CPU_NOINLINE void grad_row_split(const T* x, T* out, int64_t V, int64_t y, float m, float log_s, float H,
                                    float g, float h, float inv_tau) {
  for (int64_t j = 0; j < V; ++j) {
    out[j] = T(huge_logit_grad(static_cast<float>(x[j]), j == y, m, log_s, H, g, h, inv_tau));
  }
}

// grad_rows' row of huge logits: its statistics again first, from rounded products as in forward_row
template <typename T>
DK_CPU_NOINLINE void grad_row_huge(const T* x, T* out, int64_t V, int64_t y, float H, float g, float h,
                                   float inv_tau) {
  const SoftmaxStats st = row_stats_rounded(x, V, inv_tau);
  grad_row_split(x, out, V, y, st.m, dk_log(st.s), H, g, h, inv_tau);
}

template <typename T>
void zero_row(T* out, int64_t V) {
  std::memset(static_cast<void*>(out), 0, sizeof(T) * V);  // +0.0 in every dtype
}

// One row of the gradient. g = h = 0 with finite statistics: exact zeros, the logits are not read
// (unscored rows, rows whose loss does not depend on logp). A non-finite lse (NaN, +inf or only -inf
// logits: the forward gave NaN) makes the whole row NaN, as the reference's log_softmax backward does.
// The fused path calls this with the lse it has just computed: the same bits as the separate one.
template <typename T>
void grad_row_checked(const RowFunctions<T>& k, const T* x, T* out, int64_t V, int64_t row, int64_t y, float lse,
                      float H, float g, float h, float inv_tau) {
  if (g == 0.0f && h == 0.0f && std::isfinite(lse)) {
    zero_row(out, V);
    return;
  }
  TORCH_CHECK_INDEX(y >= 0 && y < V, "targets: row ", row, " has target ", y, ", outside [0, V=", V, ")");
  if (huge_z(lse)) {
    grad_row_huge(x, out, V, y, H, g, h, inv_tau);
  } else {
    k.grad(x, out, V, y, lse, H, g, h, inv_tau);
  }
}

template <typename T>
void forward_range(const ForwardPointers& a, int64_t begin, int64_t end) {
  const RowFunctions<T> k = row_functions<T>();
  const T* logits = static_cast<const T*>(a.logits);
  for (int64_t row = begin; row < end; ++row) {
    if (a.scored[row]) {
      forward_row(a, k, row, logits + row * a.V);
    } else {
      store_unscored_row(a, row);
    }
  }
}

template <typename T>
void grad_range(const GradPointers& a, int64_t begin, int64_t end) {
  const RowFunctions<T> k = row_functions<T>();
  for (int64_t row = begin; row < end; ++row) {
    grad_row_checked(k, static_cast<const T*>(a.logits) + row * a.V, static_cast<T*>(a.out) + row * a.V, a.V, row,
                     a.targets[row], a.lse[row], a.entropy[row], a.g[row], a.h[row], a.inv_tau);
  }
}

// ---- Vocabulary shards (row_math.h): no cluster or fused path, rows split across threads as above ----

// A shard row is reduced as forward_row reduces a row (the same per-row functions), so the merge of a
// row's shards is the unsharded forward's statistics up to the float32 rounding of the merge. (A shard
// takes the huge-row path by its own maximum: one just below kHugeZ in a row above it keeps the fused
// offsets, within an ulp of z of the rounded ones.)
template <typename T>
void shard_stats_range(const ShardStatsPointers& a, int64_t begin, int64_t end) {
  const RowFunctions<T> k = row_functions<T>();
  for (int64_t row = begin; row < end; ++row) {
    if (!a.scored[row]) {
      store_shard_stats(a, row, softmax_empty(), 0.0f);
      continue;
    }
    const T* x = static_cast<const T*>(a.logits) + row * a.V;
    const int64_t y = shard_column(a.targets[row], a.vocab_start, a.V);
    const float zt = y >= 0 ? rounded_mul(static_cast<float>(x[y]), a.inv_tau) : 0.0f;
    store_shard_stats(a, row, forward_stats(k, x, a.V, a.inv_tau, a.need_entropy), zt);
  }
}

// grad_rows' arithmetic with lse = m + log s, which float32 holds to the precision of z except where
// |lse| is huge (log s rounded away): there log p = (z - m) - log s from the merged m and log s, as
// grad_rows' huge path computes it from the row's own (which a shard cannot reduce again).
template <typename T>
void shard_grad_range(const ShardGradPointers& a, int64_t begin, int64_t end) {
  const RowFunctions<T> k = row_functions<T>();
  for (int64_t row = begin; row < end; ++row) {
    const T* x = static_cast<const T*>(a.logits) + row * a.V;
    T* out = static_cast<T*>(a.out) + row * a.V;
    const float m = a.m[row], log_s = a.log_s[row], g = a.g[row], h = a.h[row];
    if (shard_grad_zero(m, log_s, g, h)) {
      zero_row(out, a.V);
      continue;
    }
    const int64_t y = shard_column(a.targets[row], a.vocab_start, a.V);
    const float lse = m + log_s;
    if (huge_z(lse)) {
      grad_row_split(x, out, a.V, y, m, log_s, a.entropy[row], g, h, a.inv_tau);
    } else {
      k.grad(x, out, a.V, y, lse, a.entropy[row], g, h, a.inv_tau);
    }
  }
}

// forward_range and grad_range in one pass over the rows: each row is reduced, then re-read for its
// gradient while it is still in this core's cache (<= 1 MiB for V <= 256k float32), instead of from
// DRAM in a later backward pass. Same functions, same arguments: the same bits as the two passes.
template <typename T>
void forward_grad_range(const FusedPointers& a, int64_t begin, int64_t end) {
  const RowFunctions<T> k = row_functions<T>();
  const ForwardPointers& f = a.fwd;
  const int64_t V = f.V;
  for (int64_t row = begin; row < end; ++row) {
    const T* x = static_cast<const T*>(f.logits) + row * V;
    T* out = static_cast<T*>(a.out) + row * V;
    if (!f.scored[row]) {
      store_unscored_row(f, row);
      grad_row_checked(k, x, out, V, row, 0, 0.0f, 0.0f, 0.0f, 0.0f, f.inv_tau);  // zeros
      continue;
    }
    const RowResult r = forward_row(f, k, row, x);
    const GradFactors gh = fused_grad_factors(a, row, r);
    grad_row_checked(k, x, out, V, row, f.targets[row], r.lse, r.entropy, gh.g, gh.h, f.inv_tau);
  }
}

// rows per parallel task: about 64k elements each, so small-V batches are not split too finely
int64_t grain(int64_t V) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(V, 1)); }

// A gradient written into a fresh buffer (not the logits' own storage) is memory the process has
// not touched yet: every 4 KiB page of it faults on the first store, which at N=2048, V=32000 fp32
// (262 MB) cost more time than the kernel itself. Asking for transparent huge pages on the whole
// pages inside the buffer (Linux, THP in "madvise" or "always" mode) makes that 2 MiB faults, 512x
// fewer; the contents are unchanged (the kernel writes every element) and nothing else is touched.
// A hint only: ignored where THP is off or the range holds no aligned 2 MiB extent.
void advise_huge_pages(const at::Tensor& out, const at::Tensor& logits) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kMin = uintptr_t{16} << 20;  // below that the faults are a small cost
  if (out.is_same(logits) || out.data_ptr() == logits.data_ptr()) return;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t bytes = static_cast<uintptr_t>(out.numel()) * out.element_size();
  if (bytes < kMin) return;
  const uintptr_t page = 4096;
  const uintptr_t first = (begin + page - 1) / page * page, last = (begin + bytes) / page * page;
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // errors ignored
#else
  (void)out;
  (void)logits;
#endif
}

}  // namespace cpu

void shard_stats_cpu(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& scored,
                     int64_t vocab_start, float inv_tau, bool need_entropy, ShardStatsOutputs& out) {
  const ShardStatsPointers a = shard_stats_pointers(logits, targets, scored, vocab_start, inv_tau, need_entropy, out);
  const auto fn = by_logits_dtype(logits, cpu::shard_stats_range<float>, cpu::shard_stats_range<c10::Half>,
                                  cpu::shard_stats_range<c10::BFloat16>);
  at::parallel_for(0, a.N, cpu::grain(a.V), [&](int64_t b, int64_t e) { fn(a, b, e); });
}

void shard_grad_rows_cpu(const at::Tensor& logits, const at::Tensor& targets, int64_t vocab_start,
                         const at::Tensor& m, const at::Tensor& log_s, const at::Tensor& entropy, const at::Tensor& g,
                         const at::Tensor& h, float inv_tau, const at::Tensor& out) {
  const ShardGradPointers a = shard_grad_pointers(logits, targets, vocab_start, m, log_s, entropy, g, h, inv_tau, out);
  const auto fn = by_logits_dtype(logits, cpu::shard_grad_range<float>, cpu::shard_grad_range<c10::Half>,
                                  cpu::shard_grad_range<c10::BFloat16>);
  cpu::advise_huge_pages(out, logits);
  at::parallel_for(0, a.N, cpu::grain(a.V), [&](int64_t b, int64_t e) { fn(a, b, e); });
}

void forward_rows_cpu(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& scored,
                      const at::Tensor& old_logprobs, const at::Tensor& ref_logprobs,
                      const at::Tensor& advantages, const RowParams& params, float inv_tau,
                      bool need_entropy, ForwardOutputs& out) {
  const ForwardPointers a =
      forward_pointers(logits, targets, scored, old_logprobs, ref_logprobs, advantages, params, inv_tau, need_entropy, out);
  const auto fn = by_logits_dtype(logits, cpu::forward_range<float>, cpu::forward_range<c10::Half>,
                                  cpu::forward_range<c10::BFloat16>);
  at::parallel_for(0, a.N, cpu::grain(a.V), [&](int64_t b, int64_t e) { fn(a, b, e); });
}

void forward_grad_rows_cpu(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& scored,
                           const at::Tensor& old_logprobs, const at::Tensor& ref_logprobs,
                           const at::Tensor& advantages, const RowParams& params, float inv_tau,
                           bool need_entropy, const at::Tensor& row_weights, float grad_scale,
                           ForwardOutputs& out, const at::Tensor& grad) {
  const FusedPointers a = fused_pointers(logits, targets, scored, old_logprobs, ref_logprobs, advantages, params,
                                         inv_tau, need_entropy, row_weights, grad_scale, out, grad);
  const auto fn = by_logits_dtype(logits, cpu::forward_grad_range<float>, cpu::forward_grad_range<c10::Half>,
                                  cpu::forward_grad_range<c10::BFloat16>);
  cpu::advise_huge_pages(grad, logits);
  at::parallel_for(0, a.fwd.N, cpu::grain(a.fwd.V), [&](int64_t b, int64_t e) { fn(a, b, e); });
}

void grad_rows_cpu(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                   const at::Tensor& entropy, const at::Tensor& g, const at::Tensor& h, float inv_tau,
                   const at::Tensor& out) {
  const GradPointers a = grad_pointers(logits, targets, lse, entropy, g, h, inv_tau, out);
  const auto fn =
      by_logits_dtype(logits, cpu::grad_range<float>, cpu::grad_range<c10::Half>, cpu::grad_range<c10::BFloat16>);
  cpu::advise_huge_pages(out, logits);
  at::parallel_for(0, a.N, cpu::grain(a.V), [&](int64_t b, int64_t e) { fn(a, b, e); });
}

}  // namespace deltal_kernels
