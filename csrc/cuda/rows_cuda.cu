// CUDA row kernels, templated over the logits' dtype (float32, float16, bfloat16) and the number of
// threads that share a row (GROUP): a warp per row (8 rows per 256-thread block) for small V, a
// whole block per row otherwise.
//
// - 16-byte vectorised loads and stores (4 float32 / 8 half values) over the aligned body of each
//   row; the elements before the first 16-byte boundary (rows of odd V start anywhere) and after
//   the last whole packet are handled one by one.
// - float32 accumulation; softmax statistics kept online per thread in log2 units (max of x*log2(e)/tau,
//   sum of e = 2^d and of e*d, d = x*log2(e)/tau - max: one FFMA and one ex2.approx.ftz per element,
//   one rescale per 4 packets), then converted to row_math.h's SoftmaxStats and merged with warp
//   shuffles (xor butterfly), then across the warps of a block through shared memory in a fixed
//   order: deterministic, no atomics.
// - The streaming loops issue their four 16-byte loads together, with no per-element branch or
//   64-bit compare: the gradient's one-hot term is added to the target's element after the row.
// - 64-bit row offsets (row * V never overflows) and a grid-stride loop over rows, so N is unbounded
//   and the grid is sized to the device, not to N.
// - The per-row math (online softmax merge, clipping, KL, entropy, gradient element) is the shared
//   row_math.h, the same code the CPU kernels run.
// - forward_grad_kernel (the fused forward + gradient) is forward_kernel's row pass and epilogue
//   followed by grad_kernel's row pass (the same device functions): its first pass loads with an L2
//   evict_last policy, the second (last use) with evict_first, and the gradient is stored streaming
//   (st.global.cs), on a grid of at most the resident blocks (README: the schedule).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <cstdint>
#include <cstdlib>
#include <sstream>
#include <string>
#include <type_traits>

#include "deltal_kernels/kernels.h"
#include "deltal_kernels/row_math.h"
#include "deltal_kernels/row_pointers.h"

namespace deltal_kernels {
namespace cuda {

constexpr int kBlock = 256;        // threads per block
constexpr int kWarp = 32;
constexpr int64_t kSmallV = 4096;  // up to this V a warp handles a row; above, a block
constexpr int kUnroll = 4;         // 16-byte packets in flight per thread

// 16 bytes of logits: one vectorised load or store
template <typename T>
union Packet {
  static constexpr int N = 16 / sizeof(T);
  uint4 raw;
  T v[N];
};

// Elements of a row before its first 16-byte boundary (all of them if the row is not even
// element-aligned, which contiguous tensors never are).
template <typename T>
__device__ __forceinline__ int64_t head_count(const void* row, int64_t V) {
  const uintptr_t addr = reinterpret_cast<uintptr_t>(row);
  if (addr % sizeof(T) != 0) return V;
  const int64_t head = static_cast<int64_t>(((16 - (addr & 15)) & 15) / sizeof(T));
  return head < V ? head : V;
}

// ---- CUDA-only arithmetic (row_math.h stays the shared, accurate version) ----

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegBig = -3.4028234663852886e38f;  // -FLT_MAX: finite floor of the running max
// log2-unit offsets below this give 2^d == 0 (ex2.approx.ftz flushes below -126); the entropy terms
// e * d use d floored here, so a -inf logit adds 0, not 0 * -inf
constexpr float kDFloor = -1024.0f;

// 2^x with MUFU.EX2 (ex2.approx.ftz.f32): relative error <= 2^-22 (README: numerics of the fast exp);
// 2^-inf = 0, 2^NaN = NaN, results below 2^-126 flush to 0.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// max that keeps NaN (fmaxf drops it)
__device__ __forceinline__ float max_nan(float a, float b) {
  float y;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(y) : "f"(a), "f"(b));
  return y;
}

// 16-bit logits to float32 two at a time from one 32-bit word of a packet (lo: the element at the
// lower address): bf16 is the high half of a float32 (one shift or one and); fp16 one conversion each.
template <typename T>
__device__ __forceinline__ void unpack2(uint32_t w, float& lo, float& hi) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    lo = __uint_as_float(w << 16);
    hi = __uint_as_float(w & 0xffff0000u);
  } else {
    lo = __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
    hi = __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
  }
}

// The N float32 values of a packet
template <typename T>
__device__ __forceinline__ void unpack(const uint4& raw, float* v) {
  if constexpr (std::is_same_v<T, float>) {
    v[0] = __uint_as_float(raw.x);
    v[1] = __uint_as_float(raw.y);
    v[2] = __uint_as_float(raw.z);
    v[3] = __uint_as_float(raw.w);
  } else {
    unpack2<T>(raw.x, v[0], v[1]);
    unpack2<T>(raw.y, v[2], v[3]);
    unpack2<T>(raw.z, v[4], v[5]);
    unpack2<T>(raw.w, v[6], v[7]);
  }
}

// Two float32 values rounded (to nearest even) into one 32-bit word of a 16-bit packet
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  } else {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
}

template <typename T>
__device__ __forceinline__ uint4 pack(const float* v) {
  if constexpr (std::is_same_v<T, float>) {
    return make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]), __float_as_uint(v[3]));
  } else {
    return make_uint4(pack2<T>(v[0], v[1]), pack2<T>(v[2], v[3]), pack2<T>(v[4], v[5]), pack2<T>(v[6], v[7]));
  }
}

// Per-thread online softmax statistics in log2 units: mk = max x * k (k = log2(e) / tau; floored at
// -FLT_MAX so that mk - mk is never inf - inf), s = sum 2^(x k - mk), t = sum 2^(x k - mk) (x k - mk).
struct Log2Stats {
  float mk;
  float s;
  float t;
};

// Add the K * N values v (raw logits) of K packets: one rescale for all of them.
template <int M>
__device__ __forceinline__ void log2_add(Log2Stats& st, const float (&v)[M], float k) {
  float vmax = v[0];
#pragma unroll
  for (int i = 1; i < M; ++i) vmax = fmaxf(vmax, v[i]);  // NaN dropped here, kept by the sums below
  const float mk = fmaxf(st.mk, fmaxf(vmax * k, kNegBig));
  const float dm = st.mk - mk;  // <= 0
  const float c = fast_exp2(dm);
  float s = 0.0f, t = 0.0f;
#pragma unroll
  for (int i = 0; i < M; ++i) {
    const float d = max_nan(fmaf(v[i], k, -mk), kDFloor);
    const float e = fast_exp2(d);
    s += e;
    t = fmaf(e, d, t);
  }
  st.t = fmaf(c, fmaf(dm, st.s, st.t), t);  // c (t + dm s) + new terms
  st.s = fmaf(c, st.s, s);
  st.mk = mk;
}

// One value (head and tail elements)
__device__ __forceinline__ void log2_push(Log2Stats& st, float x, float k) {
  const float v[1] = {x};
  log2_add<1>(st, v, k);
}

// Merge two parts (log2 units). Symmetric: merge(a, b) and merge(b, a) give bitwise the same result,
// so a butterfly (xor-shuffle) reduction leaves every lane with the same value. Once per row and
// thread: the accurate exp2f.
__device__ __forceinline__ Log2Stats log2_merge(Log2Stats a, Log2Stats b) {
  if (a.mk < b.mk) {
    const Log2Stats t = a;
    a = b;
    b = t;
  }
  if (b.s == 0.0f) return a;  // nothing, or nothing but -inf
  const float d = b.mk - a.mk;  // <= 0
  const float c = exp2f(d);
  return {a.mk, a.s + c * b.s, a.t + c * (b.t + d * b.s)};
}

__device__ __forceinline__ Log2Stats shfl_xor(const Log2Stats& st, int offset) {
  return {__shfl_xor_sync(0xffffffffu, st.mk, offset), __shfl_xor_sync(0xffffffffu, st.s, offset),
          __shfl_xor_sync(0xffffffffu, st.t, offset)};
}

// Logits of a magnitude where x * log2(e) / tau has an ulp of 2 or more: there the FFMA offsets of the
// fast path (exact products minus a rounded maximum) lose the row, and the row is reduced again on
// the accurate path (row_math.h's, as on the CPU). Never for logits of a trained model (|x| < 1e6).
constexpr float kHugeLog2 = 16777216.0f;  // 2^24

__device__ __forceinline__ SoftmaxStats shfl_xor(const SoftmaxStats& st, int offset) {  // (accurate path)
  return {__shfl_xor_sync(0xffffffffu, st.m, offset), __shfl_xor_sync(0xffffffffu, st.s, offset),
          __shfl_xor_sync(0xffffffffu, st.u, offset)};
}

// The statistics of the whole group; every thread of the group gets the same value.
template <int GROUP, typename Stats, typename Merge>
__device__ __forceinline__ Stats group_reduce(Stats st, Stats* smem, Merge merge) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) st = merge(st, shfl_xor(st, offset));
  if constexpr (GROUP > kWarp) {
    if (threadIdx.x % kWarp == 0) smem[threadIdx.x / kWarp] = st;
    __syncthreads();
    st = smem[0];
#pragma unroll
    for (int w = 1; w < GROUP / kWarp; ++w) st = merge(st, smem[w]);  // fixed order
    __syncthreads();  // smem is reused for the next row
  }
  return st;
}

// Shared memory of a block's reductions: both kinds of statistics
struct ReduceSmem {
  Log2Stats fast[kBlock / kWarp];
  SoftmaxStats accurate[kBlock / kWarp];
};

// How a pass loads its packets: through the read-only path (a kernel that never writes the logits),
// or plain with an L2 eviction policy: evict_last for the fused kernel's first pass (the row is
// re-read right after), evict_first for a last read.
enum class Load { kReadOnly, kKeep, kLast };

__device__ __forceinline__ uint64_t l2_policy_evict_last() {
  uint64_t p;
  asm("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(p));
  return p;
}

__device__ __forceinline__ uint64_t l2_policy_evict_first() {
  uint64_t p;
  asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(p));
  return p;
}

template <Load L>
__device__ __forceinline__ uint4 load_packet(const uint4* p, uint64_t policy) {
  uint4 r;
  if constexpr (L == Load::kReadOnly) {
    r = __ldg(p);
  } else {
    asm volatile("ld.global.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p), "l"(policy));
  }
  return r;
}

template <Load L>
__device__ __forceinline__ uint64_t policy_for() {
  if constexpr (L == Load::kKeep) return l2_policy_evict_last();
  if constexpr (L == Load::kLast) return l2_policy_evict_first();
  return 0;
}

// The output operands %0-%15 of a four-packet load: r[0].x ... r[3].w
#define DK_FOUR_PACKETS(r)                                                                                    \
  "=r"(r[0].x), "=r"(r[0].y), "=r"(r[0].z), "=r"(r[0].w), "=r"(r[1].x), "=r"(r[1].y), "=r"(r[1].z), "=r"(r[1].w), \
      "=r"(r[2].x), "=r"(r[2].y), "=r"(r[2].z), "=r"(r[2].w), "=r"(r[3].x), "=r"(r[3].y), "=r"(r[3].z), "=r"(r[3].w)

// kUnroll (4) packets p, p + STRIDE, p + 2 STRIDE, p + 3 STRIDE in one asm statement, so all four
// loads are issued before the first is consumed (ptxas otherwise spreads them over the loop body).
template <Load L, int STRIDE>
__device__ __forceinline__ void load_packets4(const uint4* p, uint64_t policy, uint4 (&r)[4]) {
  static_assert(kUnroll == 4, "four loads per statement");
  constexpr int B = STRIDE * 16;  // bytes between the packets
  if constexpr (L == Load::kReadOnly) {
    asm volatile(
        "ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%16];\n\t"
        "ld.global.nc.v4.u32 {%4, %5, %6, %7}, [%16 + %17];\n\t"
        "ld.global.nc.v4.u32 {%8, %9, %10, %11}, [%16 + %18];\n\t"
        "ld.global.nc.v4.u32 {%12, %13, %14, %15}, [%16 + %19];"
        : DK_FOUR_PACKETS(r)
        : "l"(p), "n"(B), "n"(2 * B), "n"(3 * B));
  } else {
    asm volatile(
        "ld.global.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%16], %20;\n\t"
        "ld.global.L2::cache_hint.v4.u32 {%4, %5, %6, %7}, [%16 + %17], %20;\n\t"
        "ld.global.L2::cache_hint.v4.u32 {%8, %9, %10, %11}, [%16 + %18], %20;\n\t"
        "ld.global.L2::cache_hint.v4.u32 {%12, %13, %14, %15}, [%16 + %19], %20;"
        : DK_FOUR_PACKETS(r)
        : "l"(p), "n"(B), "n"(2 * B), "n"(3 * B), "l"(policy));
  }
}

// A streaming (evict-first) 16-byte store
__device__ __forceinline__ void store_packet(uint4* p, const uint4& v) {
  asm volatile("st.global.cs.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}

// The log2 statistics of one row x, reduced over the group; every thread of the group gets them.
template <typename T, int GROUP, Load L>
__device__ __forceinline__ Log2Stats row_stats(const T* x, int64_t V, float inv_tau, int tid, ReduceSmem& smem) {
  constexpr int VEC = Packet<T>::N;
  const float k = inv_tau * kLog2e;
  const uint64_t policy = policy_for<L>();
  const int64_t head = head_count<T>(x, V);
  const int64_t nvec = (V - head) / VEC;
  const uint4* body = reinterpret_cast<const uint4*>(x + head);

  Log2Stats st{kNegBig, 0.0f, 0.0f};
  for (int64_t j = tid; j < head; j += GROUP) log2_push(st, static_cast<float>(x[j]), k);
  // 32-bit packet indices within the row: a row has far fewer than 2^31 packets
  const int n = static_cast<int>(nvec);
  int i = tid;
  for (; i + (kUnroll - 1) * GROUP < n; i += kUnroll * GROUP) {
    uint4 raw[kUnroll];
    load_packets4<L, GROUP>(body + i, policy, raw);
    float v[kUnroll * VEC];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) unpack<T>(raw[u], v + u * VEC);
    log2_add<kUnroll * VEC>(st, v, k);
  }
  for (; i < n; i += GROUP) {
    float v[VEC];
    unpack<T>(load_packet<L>(body + i, policy), v);
    log2_add<VEC>(st, v, k);
  }
  for (int64_t j = head + nvec * VEC + tid; j < V; j += GROUP) log2_push(st, static_cast<float>(x[j]), k);
  return group_reduce<GROUP>(st, smem.fast, log2_merge);
}

// The accurate path (rows of huge logits): row_math.h's natural-unit statistics with expf, element by
// element, as the CPU kernels compute them.
template <typename T, int GROUP>
__device__ __noinline__ SoftmaxStats row_stats_accurate(const T* x, int64_t V, float inv_tau, int tid,
                                                        ReduceSmem& smem) {
  SoftmaxStats st = softmax_empty();
  for (int64_t j = tid; j < V; j += GROUP) softmax_push(st, rounded_mul(static_cast<float>(x[j]), inv_tau));
  return group_reduce<GROUP>(st, smem.accurate, softmax_merge);
}

// The forward result of a scored row from its log2 statistics (uniform over the group) and its target
// logit xy: logp and the entropy from offsets to the row's maximum (the exact FFMA offset of the
// target, no m - m cancellation), lse = (mk + log2 s) ln 2. Rows of huge logits go the accurate way.
template <typename T, int GROUP>
__device__ __forceinline__ RowResult row_result(const ForwardPointers& a, int64_t row, const T* x, const Log2Stats& st,
                                                float xy, int tid, ReduceSmem& smem) {
  if (fabsf(st.mk) >= kHugeLog2) {
    const SoftmaxStats acc = row_stats_accurate<T, GROUP>(x, a.V, a.inv_tau, tid, smem);
    return forward_row_result(a, row, acc, rounded_mul(xy, a.inv_tau));
  }
  const float k = a.inv_tau * kLog2e;
  const SoftmaxStats relative{0.0f, st.s, st.t * kLn2};  // m = 0: the offsets are relative already
  RowResult r = forward_row_result(a, row, relative, fmaf(xy, k, -st.mk) * kLn2);
  r.lse = (st.mk + log2f(st.s)) * kLn2;
  return r;
}

// The target's logit z_y = x[y] / tau of a scored row. Targets are validated before any kernel runs;
// one that is out of range anyway (e.g. under torch.compile, which skips the value checks) gives NaN,
// never an out-of-bounds read.
template <typename T>
__device__ __forceinline__ float target_logit(const T* x, int64_t y, int64_t V) {
  return (y >= 0 && y < V) ? static_cast<float>(x[y]) : NAN;
}

template <typename T, int GROUP>
__global__ void __launch_bounds__(kBlock, 1) forward_kernel(const ForwardPointers a) {
  static_assert(kBlock % GROUP == 0 && GROUP % kWarp == 0, "a group is whole warps of one block");
  constexpr int ROWS = kBlock / GROUP;
  __shared__ ReduceSmem smem;
  const int tid = threadIdx.x % GROUP;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * ROWS;
  // the loop condition, the skip of unscored rows and the huge-logit path are uniform over a group
  // (a block when GROUP is the block), so the barriers in group_reduce are reached by all of its threads
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * ROWS + threadIdx.x / GROUP; row < a.N; row += stride) {
    if (!a.scored[row]) {
      if (tid == 0) store_unscored_row(a, row);
      continue;
    }
    const T* x = static_cast<const T*>(a.logits) + row * a.V;
    const float xy = tid == 0 ? target_logit(x, a.targets[row], a.V) : 0.0f;
    const Log2Stats st = row_stats<T, GROUP, Load::kReadOnly>(x, a.V, a.inv_tau, tid, smem);
    const RowResult r = row_result<T, GROUP>(a, row, x, st, xy, tid, smem);
    if (tid == 0) store_row(a, row, r);
  }
}

// Per-row constants of the gradient dL/dx_j = p_j (b + a log2 p_j) (+ g / tau at the target), with
// log2 p_j = x_j k - lse2: the SPEC's (g (onehot - p) - h p (log p + H)) / tau regrouped.
struct GradRow {
  float k;     // log2(e) / tau
  float lse2;  // lse * log2(e)
  float a;     // -h ln 2 / tau
  float b;     // -(g + h H) / tau
  float onehot;  // g / tau
};

__device__ __forceinline__ GradRow grad_row_constants(float lse, float entropy, float g, float h, float inv_tau) {
  return {inv_tau * kLog2e, lse * kLog2e, -(h * kLn2) * inv_tau, -(g + h * entropy) * inv_tau, g * inv_tau};
}

// The gradient of one element without its one-hot term. With HAS_H the entropy term: p log p is 0
// where p is 0 (a -inf logit): d floored, NaN kept.
template <bool HAS_H>
__device__ __forceinline__ float grad_value(float x, const GradRow& c) {
  const float d = fmaf(x, c.k, -c.lse2);
  const float p = fast_exp2(d);
  if constexpr (HAS_H) {
    return p * fmaf(c.a, max_nan(d, kDFloor), c.b);
  } else {
    return p * c.b;
  }
}

template <typename T, bool HAS_H>
__device__ __forceinline__ uint4 grad_packet(const uint4& raw, const GradRow& c) {
  constexpr int VEC = Packet<T>::N;
  float v[VEC];
  unpack<T>(raw, v);
#pragma unroll
  for (int e = 0; e < VEC; ++e) v[e] = grad_value<HAS_H>(v[e], c);
  return pack<T>(v);
}

// The streaming part of a row's gradient (everything but the one-hot term)
template <typename T, int GROUP, bool HAS_H, Load L>
__device__ __forceinline__ void grad_body(const T* x, T* out, int64_t V, int64_t head, const GradRow& c, int tid) {
  constexpr int VEC = Packet<T>::N;
  const uint64_t policy = policy_for<L>();
  const int n = static_cast<int>((V - head) / VEC);
  const uint4* xb = reinterpret_cast<const uint4*>(x + head);
  uint4* ob = reinterpret_cast<uint4*>(out + head);
  for (int64_t j = tid; j < head; j += GROUP) out[j] = T(grad_value<HAS_H>(static_cast<float>(x[j]), c));
  int i = tid;
  for (; i + (kUnroll - 1) * GROUP < n; i += kUnroll * GROUP) {
    uint4 raw[kUnroll];
    load_packets4<L, GROUP>(xb + i, policy, raw);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) store_packet(ob + i + u * GROUP, grad_packet<T, HAS_H>(raw[u], c));
  }
  for (; i < n; i += GROUP) store_packet(ob + i, grad_packet<T, HAS_H>(load_packet<L>(xb + i, policy), c));
  for (int64_t j = head + static_cast<int64_t>(n) * VEC + tid; j < V; j += GROUP)
    out[j] = T(grad_value<HAS_H>(static_cast<float>(x[j]), c));
}

template <int GROUP>
__device__ __forceinline__ void group_sync() {
  if constexpr (GROUP > kWarp) {
    __syncthreads();
  } else {
    __syncwarp();
  }
}

// One row of the gradient by the threads of a group (tid: the thread's index in it) into out, which
// may be x itself: each element is read before it is written, by the same thread; xy = x[y] was read
// by thread 0 before the group's last barrier. Rows with g == h == 0 (and a finite lse) get exact zeros
// without reading x.
template <typename T, int GROUP, Load L>
__device__ __forceinline__ void grad_row(const T* x, T* out, int64_t V, int64_t y, float xy, float lse, float entropy,
                                         float g, float h, float inv_tau, int tid) {
  constexpr int VEC = Packet<T>::N;
  // exact zeros, without reading the logits; but a lse that is not finite (a NaN or +inf logit, a row
  // of -inf) gives a NaN row, as 0 * NaN does in autograd
  if (g == 0.0f && h == 0.0f && fabsf(lse) < INFINITY) {
    const int64_t head = head_count<T>(out, V);
    const int64_t nvec = (V - head) / VEC;
    uint4* body = reinterpret_cast<uint4*>(out + head);
    for (int64_t j = tid; j < head; j += GROUP) out[j] = T(0.0f);
    for (int64_t i = tid; i < nvec; i += GROUP) store_packet(body + i, make_uint4(0u, 0u, 0u, 0u));
    for (int64_t j = head + nvec * VEC + tid; j < V; j += GROUP) out[j] = T(0.0f);
    return;
  }
  // packets need the logits and the gradient at the same offset from a 16-byte boundary (always
  // true in place and for two allocations; otherwise the row goes element by element)
  const uintptr_t xa = reinterpret_cast<uintptr_t>(x), oa = reinterpret_cast<uintptr_t>(out);
  const int64_t head = ((xa ^ oa) & 15) == 0 ? head_count<T>(x, V) : V;
  const GradRow c = grad_row_constants(lse, entropy, g, h, inv_tau);
  if (h != 0.0f) {
    grad_body<T, GROUP, true, L>(x, out, V, head, c, tid);
  } else {
    grad_body<T, GROUP, false, L>(x, out, V, head, c, tid);
  }
  // the one-hot term: thread 0 rewrites the target's element once every thread has stored its part
  // (y out of range, never after validation: no one-hot, no out-of-bounds access)
  group_sync<GROUP>();
  if (tid == 0 && y >= 0 && y < V) out[y] = T(grad_value<true>(xy, c) + c.onehot);
}

// The gradient of (a slice of) a row of huge logits (row_math.h's huge_z) from the whole row's
// statistics st (row_stats_accurate), element by element as on the CPU. In place, each element is stored
// by the thread that read it here and in row_stats_accurate (the same j = tid + k GROUP), so a group needs
// no barrier before its stores; a cluster, whose blocks read the whole row, synchronises first.
template <typename T, int GROUP>
__device__ __forceinline__ void grad_row_split(const T* x, T* out, int64_t V, int64_t y, float m, float log_s,
                                               float entropy, float g, float h, float inv_tau, int tid) {
  for (int64_t j = tid; j < V; j += GROUP) {
    out[j] = T(huge_logit_grad(static_cast<float>(x[j]), j == y, m, log_s, entropy, g, h, inv_tau));
  }
}

template <typename T, int GROUP>
__device__ __noinline__ void grad_row_huge(const T* x, T* out, int64_t V, int64_t y, SoftmaxStats st, float entropy,
                                           float g, float h, float inv_tau, int tid) {
  grad_row_split<T, GROUP>(x, out, V, y, st.m, dk_log(st.s), entropy, g, h, inv_tau, tid);
}

template <typename T, int GROUP>
__device__ __noinline__ void grad_whole_row_huge(const T* x, T* out, int64_t V, int64_t y, float entropy, float g,
                                                 float h, float inv_tau, int tid, ReduceSmem& smem) {
  grad_row_huge<T, GROUP>(x, out, V, y, row_stats_accurate<T, GROUP>(x, V, inv_tau, tid, smem), entropy, g, h,
                          inv_tau, tid);
}

// grad_row for a whole row x (the grid-stride kernels): a row of huge logits is reduced again first. The
// condition is uniform over the group (per-row values), so its barriers are reached by every thread; the
// fused kernel passes the lse it has just computed, so it gives the separate kernel's bits.
template <typename T, int GROUP, Load L>
__device__ __forceinline__ void grad_whole_row(const T* x, T* out, int64_t V, int64_t y, float xy, float lse,
                                               float entropy, float g, float h, float inv_tau, int tid,
                                               ReduceSmem& smem) {
  if (huge_z(lse) && (g != 0.0f || h != 0.0f)) {
    grad_whole_row_huge<T, GROUP>(x, out, V, y, entropy, g, h, inv_tau, tid, smem);
  } else {
    grad_row<T, GROUP, L>(x, out, V, y, xy, lse, entropy, g, h, inv_tau, tid);
  }
}

// Resident blocks asked of ptxas for grad_kernel: 4 for fp32 rows of a block each, the occupancy it
// had before the call of the huge-row path raised its registers from 64 to 70 (64 spill nothing).
template <typename T, int GROUP>
constexpr int grad_min_blocks() {
  return sizeof(T) == 4 && GROUP == kBlock ? 4 : 1;
}

template <typename T, int GROUP>
__global__ void __launch_bounds__(kBlock, grad_min_blocks<T, GROUP>()) grad_kernel(const GradPointers a) {
  static_assert(kBlock % GROUP == 0 && GROUP % kWarp == 0, "a group is whole warps of one block");
  constexpr int ROWS = kBlock / GROUP;
  __shared__ ReduceSmem smem;
  const int tid = threadIdx.x % GROUP;
  const int64_t V = a.V;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * ROWS;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * ROWS + threadIdx.x / GROUP; row < a.N; row += stride) {
    const T* x = static_cast<const T*>(a.logits) + row * V;
    const int64_t y = a.targets[row];
    const float xy = tid == 0 && y >= 0 && y < V ? static_cast<float>(x[y]) : 0.0f;
    group_sync<GROUP>();  // x[y] is read before any thread of the group stores over it (in place)
    grad_whole_row<T, GROUP, Load::kLast>(x, static_cast<T*>(a.out) + row * V, V, y, xy, a.lse[row],
                                          a.entropy[row], a.g[row], a.h[row], a.inv_tau, tid, smem);
  }
}

// ---- Vocabulary shards (row_math.h): warp or block per shard row; no cluster path (a shard of a large
// vocabulary is a fraction of the row already, and the shards' merge happens across ranks) ----

// A shard row's fast-path statistics in natural units: m = mk ln 2 (within an ulp or two of the max z, as
// the forward's lse is; s and u keep their reference point 2^mk).
__device__ __forceinline__ SoftmaxStats natural_stats(const Log2Stats& st) {
  return {st.mk * kLn2, st.s, st.t * kLn2};
}

// forward_kernel's reduction of each scored row of the shard: row_stats, rows of huge logits (and rows of
// nothing but -inf or NaN, whose mk stays at -FLT_MAX) again on the accurate path, which gives the empty
// part {-inf, 0 or NaN, 0} for the latter.
template <typename T, int GROUP>
__global__ void __launch_bounds__(kBlock, 1) shard_stats_kernel(const ShardStatsPointers a) {
  static_assert(kBlock % GROUP == 0 && GROUP % kWarp == 0, "a group is whole warps of one block");
  constexpr int ROWS = kBlock / GROUP;
  __shared__ ReduceSmem smem;
  const int tid = threadIdx.x % GROUP;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * ROWS;
  // uniform over a group, as in forward_kernel: every barrier is reached by the whole group
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * ROWS + threadIdx.x / GROUP; row < a.N; row += stride) {
    if (!a.scored[row]) {
      if (tid == 0) store_shard_stats(a, row, softmax_empty(), 0.0f);
      continue;
    }
    const T* x = static_cast<const T*>(a.logits) + row * a.V;
    const int64_t y = shard_column(a.targets[row], a.vocab_start, a.V);
    const float zt = tid == 0 && y >= 0 ? rounded_mul(static_cast<float>(x[y]), a.inv_tau) : 0.0f;
    const Log2Stats st = row_stats<T, GROUP, Load::kReadOnly>(x, a.V, a.inv_tau, tid, smem);
    const SoftmaxStats nat =
        fabsf(st.mk) >= kHugeLog2 ? row_stats_accurate<T, GROUP>(x, a.V, a.inv_tau, tid, smem) : natural_stats(st);
    if (tid == 0) store_shard_stats(a, row, nat, zt);
  }
}

template <typename T, int GROUP>
__device__ __noinline__ void shard_grad_row_huge(const T* x, T* out, int64_t V, int64_t y, float m, float log_s,
                                                 float entropy, float g, float h, float inv_tau, int tid) {
  grad_row_split<T, GROUP>(x, out, V, y, m, log_s, entropy, g, h, inv_tau, tid);
}

// grad_kernel's rows with lse = m + log s; where that lse is huge (log s rounded away), log p = (z - m) -
// log s element by element from the merged m and log s (a shard cannot reduce its row again, as
// grad_kernel's huge path does). Each element is read and written by the same thread (out may be x).
template <typename T, int GROUP>
__global__ void __launch_bounds__(kBlock, grad_min_blocks<T, GROUP>()) shard_grad_kernel(const ShardGradPointers a) {
  static_assert(kBlock % GROUP == 0 && GROUP % kWarp == 0, "a group is whole warps of one block");
  constexpr int ROWS = kBlock / GROUP;
  const int tid = threadIdx.x % GROUP;
  const int64_t V = a.V;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * ROWS;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * ROWS + threadIdx.x / GROUP; row < a.N; row += stride) {
    const T* x = static_cast<const T*>(a.logits) + row * V;
    T* out = static_cast<T*>(a.out) + row * V;
    const int64_t y = shard_column(a.targets[row], a.vocab_start, V);
    const float xy = tid == 0 && y >= 0 ? static_cast<float>(x[y]) : 0.0f;
    group_sync<GROUP>();  // x[y] is read before any thread of the group stores over it (in place)
    const float m = a.m[row], log_s = a.log_s[row], g = a.g[row], h = a.h[row];
    const float lse = m + log_s;
    if (shard_grad_zero(m, log_s, g, h)) {
      grad_row<T, GROUP, Load::kLast>(x, out, V, -1, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, a.inv_tau, tid);  // zeros
    } else if (huge_z(lse)) {
      shard_grad_row_huge<T, GROUP>(x, out, V, y, m, log_s, a.entropy[row], g, h, a.inv_tau, tid);
    } else {
      grad_row<T, GROUP, Load::kLast>(x, out, V, y, xy, lse, a.entropy[row], g, h, a.inv_tau, tid);
    }
  }
}

// forward_kernel and grad_kernel in one launch: a group reduces its row (first pass: loads kept in
// L2), runs the epilogue (every thread of the group, redundantly, so each has g and h), then makes a
// second pass over the same row (last use) and writes its gradient with grad_row: the same bits as
// the two kernels.
template <typename T, int GROUP>
__global__ void __launch_bounds__(kBlock, 1) forward_grad_kernel(const FusedPointers f) {
  static_assert(kBlock % GROUP == 0 && GROUP % kWarp == 0, "a group is whole warps of one block");
  constexpr int ROWS = kBlock / GROUP;
  __shared__ ReduceSmem smem;
  const ForwardPointers& a = f.fwd;
  const int tid = threadIdx.x % GROUP;
  const int64_t V = a.V;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * ROWS;
  // uniform over a group, as in forward_kernel: every barrier is reached by the whole group
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * ROWS + threadIdx.x / GROUP; row < a.N; row += stride) {
    const T* x = static_cast<const T*>(a.logits) + row * V;
    T* out = static_cast<T*>(f.out) + row * V;
    if (!a.scored[row]) {
      if (tid == 0) store_unscored_row(a, row);
      grad_row<T, GROUP, Load::kLast>(x, out, V, 0, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, a.inv_tau, tid);  // zeros
      continue;
    }
    // x[y] first: out may be the logits, and the barriers of the row's reduction order this read
    // before any thread of the group stores the gradient
    const int64_t y = a.targets[row];
    const float xy = target_logit(x, y, V);
    const Log2Stats st = row_stats<T, GROUP, Load::kKeep>(x, V, a.inv_tau, tid, smem);
    const RowResult r = row_result<T, GROUP>(a, row, x, st, xy, tid, smem);
    if (tid == 0) store_row(a, row, r);
    const GradFactors gh = fused_grad_factors(f, row, r);
    group_sync<GROUP>();  // (a warp's reduction is shuffles only: no memory ordering without this)
    grad_whole_row<T, GROUP, Load::kLast>(x, out, V, y, xy, r.lse, r.entropy, gh.g, gh.h, a.inv_tau, tid, smem);
  }
}

// ---- Rows split over a thread-block cluster (sm_90): the one-read schedule for large V ----
//
// A cluster of C blocks (CTAs) takes one row at a time; block r of the cluster reduces slice r of it
// (RowSplit) and sends its statistics, with the target logit when its slice holds the target, into
// every block's shared memory (distributed shared memory: st.async, counted by the receiver's
// transaction barrier, so no block waits on a cluster-wide barrier or a GPU-scope fence per row).
// Each block then merges the C slices in rank order: the same bits in every block, no atomics. The
// fused kernel re-reads its own slice for the gradient: a slice is V / C values, so the rows in flight
// (one per cluster) stay within a quarter of the L2 where one block per row cannot (README:
// performance model). The forward kernel slices rows the same way, so fused and separate results stay
// bitwise equal. The host launches these kernels only on sm_90 and newer.
constexpr int kMaxCluster = 16;  // the largest (non-portable) cluster of an H100/H200

// log2 of a power of two (the cluster sizes)
__host__ __device__ inline int log2_exact(int pow2) {
  int n = 0;
  while ((1 << n) < pow2) ++n;
  return n;
}

// How a cluster of C = 2^log2c blocks splits a row of V values: block r takes [bound(r), bound(r + 1)),
// the r-th of C even runs of the row's whole 16-byte packets (the unaligned head goes to block 0, the
// tail to block C - 1). Shifts, no 64-bit division: the merge evaluates every block's bounds per row.
template <typename T>
struct RowSplit {
  int64_t V, head, nvec;
  int C, log2c;

  __device__ __forceinline__ RowSplit(const T* x, int64_t V_, int C_)
      : V(V_), head(head_count<T>(x, V_)), nvec((V_ - head) / Packet<T>::N), C(C_), log2c(log2_exact(C_)) {}

  __device__ __forceinline__ int64_t bound(int r) const {
    return r == 0 ? 0 : (r == C ? V : head + ((nvec * r) >> log2c) * Packet<T>::N);
  }
};

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Transaction barriers (mbarrier) in this block's shared memory: one arrival (this block's, which also
// announces the bytes to expect) plus the bytes the cluster's st.async stores deliver complete a phase.
__device__ __forceinline__ void tx_barrier_init(uint64_t* bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_address(bar)) : "memory");
}

__device__ __forceinline__ void tx_barrier_expect(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_address(bar)), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void tx_barrier_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n\t.reg .pred done;\n"
      "WAIT:\n\t"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n\t"
      "@!done bra WAIT;\n\t}" ::"r"(smem_address(bar)),
      "r"(parity)
      : "memory");
}

// 16 bytes into block `rank`'s copy of `*dst` (a shared variable), counted on its copy of `*bar`
__device__ __forceinline__ void send16(float4* dst, uint64_t* bar, int rank, const float4& v) {
  uint32_t d, b;
  asm("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(d) : "r"(smem_address(dst)), "r"(rank));
  asm("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(b) : "r"(smem_address(bar)), "r"(rank));
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.f32 [%0], {%1, %2, %3, %4}, [%5];" ::"r"(d),
               "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w), "r"(b)
               : "memory");
}

// Both cluster kernels: GRAD adds the fused kernel's gradient pass (as forward_grad_kernel does).
template <typename T, bool GRAD>
__device__ __forceinline__ void cluster_rows(const FusedPointers& f) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  __shared__ ReduceSmem smem;
  // What the cluster's blocks send for a row, by rank: the slice's statistics (mk, s, t) and its target
  // logit (0 when the target is elsewhere). Two buffers, each with its barrier, alternate by row: a
  // block that runs ahead sends row k + 1's while slower blocks still read row k's, and it cannot get
  // to row k + 2 (the other buffer again) before every block has sent row k + 1's, i.e. has read row k's.
  __shared__ float4 parts[2][kMaxCluster];
  __shared__ uint64_t arrived[2];
  const cg::cluster_group cluster = cg::this_cluster();
  const int C = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  const ForwardPointers& a = f.fwd;
  const int tid = threadIdx.x;
  const int64_t V = a.V;
  const int64_t clusters = gridDim.x / C;
  if (tid == 0) {
    tx_barrier_init(&arrived[0]);
    tx_barrier_init(&arrived[1]);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  cluster.sync();  // every block's barriers exist before any block sends
  uint32_t exchanges = 0;
  // every block of a cluster takes the same rows, and the skip of unscored rows and the huge-logit
  // path are uniform over it: the exchanges and cluster barriers match
  for (int64_t row = blockIdx.x / C; row < a.N; row += clusters) {
    const T* x = static_cast<const T*>(a.logits) + row * V;
    T* out = static_cast<T*>(f.out) + row * V;
    const RowSplit<T> split(x, V, C);
    const int64_t begin = split.bound(rank), len = split.bound(rank + 1) - begin;
    if (!a.scored[row]) {
      if (rank == 0 && tid == 0) store_unscored_row(a, row);
      if constexpr (GRAD) {
        grad_row<T, kBlock, Load::kLast>(x + begin, out + begin, len, 0, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, a.inv_tau,
                                         tid);
      }
      continue;
    }
    const int buf = exchanges & 1;
    const uint32_t parity = (exchanges >> 1) & 1;
    ++exchanges;
    if (tid == 0) tx_barrier_expect(&arrived[buf], C * sizeof(float4));
    // x[y] is read by the block whose slice holds it, before its row reduction's barriers, so before
    // any thread of that block stores the gradient over it (out may be the logits); the others get it
    // with the statistics
    const int64_t y = a.targets[row];
    const bool mine = y >= begin && y < begin + len;
    const float xy_mine = mine ? static_cast<float>(x[y]) : 0.0f;
    // (its block reduction ends with a barrier: every thread of this block has read the parts of the
    // previous exchange on this buffer before any of this block's parts leave for the next one)
    const Log2Stats part =
        row_stats<T, kBlock, GRAD ? Load::kKeep : Load::kReadOnly>(x + begin, len, a.inv_tau, tid, smem);
    if (tid < C) send16(&parts[buf][rank], &arrived[buf], tid, make_float4(part.mk, part.s, part.t, xy_mine));
    int owner = 0;  // the block whose slice holds y
    for (int r = 1; r < C; ++r) owner = y >= split.bound(r) ? r : owner;
    tx_barrier_wait(&arrived[buf], parity);
    float4 p = parts[buf][0];
    Log2Stats st{p.x, p.y, p.z};
    for (int r = 1; r < C; ++r) {  // rank order
      p = parts[buf][r];
      st = log2_merge(st, Log2Stats{p.x, p.y, p.z});
    }
    const float xy = y >= 0 && y < V ? parts[buf][owner].w : NAN;  // NaN: a target out of range
    // rows of huge logits: every block reduces the whole row on the accurate path (never for a trained
    // model's logits), and all finish reading it before any block stores over it
    const RowResult res = row_result<T, kBlock>(a, row, x, st, xy, tid, smem);
    if (rank == 0 && tid == 0) store_row(a, row, res);
    if constexpr (GRAD) {
      const GradFactors gh = fused_grad_factors(f, row, res);
      // a gradient of huge logits (grad_whole_row's condition, uniform over the cluster) needs the
      // statistics of the whole row: every block reduces it again, as grad_kernel does
      const bool huge = huge_z(res.lse) && (gh.g != 0.0f || gh.h != 0.0f);
      const SoftmaxStats whole = huge ? row_stats_accurate<T, kBlock>(x, V, a.inv_tau, tid, smem) : softmax_empty();
      if (fabsf(st.mk) >= kHugeLog2 || huge) cluster.sync();
      if (huge) {
        grad_row_huge<T, kBlock>(x + begin, out + begin, len, y - begin, whole, res.entropy, gh.g, gh.h, a.inv_tau,
                                 tid);
      } else {
        grad_row<T, kBlock, Load::kLast>(x + begin, out + begin, len, y - begin, xy, res.lse, res.entropy, gh.g,
                                         gh.h, a.inv_tau, tid);
      }
    }
  }
  cluster.sync();  // no block leaves while another may still send into its shared memory
#else
  __trap();  // code for an older GPU (the host never launches it there: cluster_code_built)
#endif
}

template <typename T>
__global__ void __launch_bounds__(kBlock, 2) cluster_forward_kernel(const FusedPointers f) {
  cluster_rows<T, false>(f);
}

template <typename T>
__global__ void __launch_bounds__(kBlock, 2) cluster_forward_grad_kernel(const FusedPointers f) {
  cluster_rows<T, true>(f);
}

// Enough blocks to fill the device (resident blocks per SM x SMs), no more than the rows need;
// the kernels loop over the remaining rows. The occupancy query runs once per kernel and device.
constexpr int kMaxDevices = 64;

// Tag: one type per kernel instance (ForwardTag<T, GROUP>, ...), so each kernel caches its own
// occupancy (the kernels of one signature share a function pointer type).
template <typename Tag, typename Kernel>
int64_t grid_size(Kernel kernel, int64_t N, int rows_per_block) {
  static std::atomic<int> resident[kMaxDevices];  // 0: not queried yet
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  int blocks = device < kMaxDevices ? resident[device].load(std::memory_order_relaxed) : 0;
  if (blocks == 0) {
    int per_sm = 0, sms = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kBlock, 0));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    blocks = std::max(per_sm, 1) * std::max(sms, 1);
    if (device < kMaxDevices) resident[device].store(blocks, std::memory_order_relaxed);
  }
  const int64_t needed = (N + rows_per_block - 1) / rows_per_block;
  return std::max<int64_t>(1, std::min<int64_t>(needed, blocks));
}

struct DeviceFacts {
  int sms;
  int64_t l2_bytes;
  int major;  // compute capability
};

DeviceFacts device_facts(int device) {
  int sms = 0, l2 = 0, major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return {std::max(sms, 1), l2 > 0 ? l2 : (int64_t{40} << 20), major};
}

// The current device's facts, queried once per device (a launch asks for them up to three times).
DeviceFacts current_device_facts() {
  static std::once_flag queried[kMaxDevices];
  static DeviceFacts facts[kMaxDevices];
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  if (device >= kMaxDevices) return device_facts(device);
  std::call_once(queried[device], [device] { facts[device] = device_facts(device); });
  return facts[device];
}

// Launch units (blocks, or clusters) of a fused kernel (README: the schedule): at most the resident
// ones (no second wave, whose rows would start after the first wave's lines were evicted), and the
// rows in flight within a quarter of the L2, but never fewer than one block per SM (min_units). Block
// per row, e.g.: V = 32000 bf16 on an H100 (50 MiB L2): 204 blocks, 12.5 MiB in flight; V = 151936
// bf16 would be 132 blocks and 38 MiB in flight, which is why rows that large take a cluster each.
int64_t l2_bounded_units(int64_t units, int64_t unit_row_bytes, int64_t min_units) {
  const int64_t fit = (current_device_facts().l2_bytes / 4) / std::max<int64_t>(1, unit_row_bytes);
  return std::max<int64_t>(1, std::min<int64_t>(units, std::max<int64_t>(min_units, fit)));
}

template <typename T, int GROUP>
struct ForwardTag {};
template <typename T, int GROUP>
struct GradTag {};
template <typename T, int GROUP>
struct FusedTag {};
template <typename T, int GROUP>
struct ShardStatsTag {};
template <typename T, int GROUP>
struct ShardGradTag {};

// A grid-stride launch of one row kernel over a.N rows, kBlock / GROUP rows per block, as many
// blocks as are resident (Tag keys the residency cache of grid_size).
template <typename Tag, int GROUP, typename Kernel, typename Args>
void launch_group(Kernel kernel, const Args& a) {
  const int64_t grid = grid_size<Tag>(kernel, a.N, kBlock / GROUP);
  kernel<<<static_cast<unsigned>(grid), kBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The same, with a warp per row for rows of V <= kSmallV and a block per row above.
template <template <typename, int> class Tag, typename T, typename WarpKernel, typename BlockKernel,
          typename Args>
void launch_rows(WarpKernel warp_kernel, BlockKernel block_kernel, const Args& a) {
  if (a.V <= kSmallV) {
    launch_group<Tag<T, kWarp>, kWarp>(warp_kernel, a);
  } else {
    launch_group<Tag<T, kBlock>, kBlock>(block_kernel, a);
  }
}

template <typename T, int GROUP>
void launch_forward_grad(const FusedPointers& f) {
  auto kernel = forward_grad_kernel<T, GROUP>;
  constexpr int rows = kBlock / GROUP;
  const int64_t grid = l2_bounded_units(grid_size<FusedTag<T, GROUP>>(kernel, f.fwd.N, rows),
                                        rows * f.fwd.V * static_cast<int64_t>(sizeof(T)), current_device_facts().sms);
  kernel<<<static_cast<unsigned>(grid), kBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(f);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}



// ---- The cluster schedule on the host ----

// DELTAL_KERNELS_CUDA_CLUSTER: "auto" (or unset), or the blocks per row to use on sm_90 and newer for
// rows above kSmallV, "1" (one block per row, the kernels above), "2", "4", "8" or "16".
int cluster_setting() {
  const char* env = std::getenv("DELTAL_KERNELS_CUDA_CLUSTER");
  if (env == nullptr || env[0] == '\0' || std::string(env) == "auto") return 0;
  const std::string v(env);
  for (int c = 1; c <= kMaxCluster; c *= 2) {
    if (v == std::to_string(c)) return c;
  }
  TORCH_CHECK_VALUE(false, "DELTAL_KERNELS_CUDA_CLUSTER: expected auto, 1, 2, 4, 8 or 16, got '", v, "'");
}

template <typename Kernel>
cudaLaunchConfig_t cluster_config(Kernel kernel, int64_t clusters, int C, cudaLaunchAttribute* attr) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(clusters * C));
  cfg.blockDim = dim3(kBlock);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = c10::cuda::getCurrentCUDAStream();
  attr->id = cudaLaunchAttributeClusterDimension;
  attr->val.clusterDim.x = static_cast<unsigned>(C);
  attr->val.clusterDim.y = 1;
  attr->val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cfg;
}

// Clusters of C blocks of one of the two cluster kernels resident at once on the current device
// (0: none fit). Queried once per kernel, device and C.
template <typename T, bool GRAD>
int resident_clusters(int C) {
  static std::atomic<int> cache[kMaxDevices][5];  // by log2 C; 0: not queried, -1: none fit
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const int log2c = log2_exact(C);
  int n = device < kMaxDevices ? cache[device][log2c].load(std::memory_order_relaxed) : 0;
  if (n == 0) {
    auto kernel = GRAD ? cluster_forward_grad_kernel<T> : cluster_forward_kernel<T>;
    // (the attribute stays with the function on this device: the launches need it too). A GPU whose
    // clusters are smaller than C rejects the attribute or the query: C does not fit there, and the
    // error is cleared so that no later launch check reports it.
    cudaError_t err = C > 8 ? cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1)
                            : cudaSuccess;
    cudaLaunchAttribute attr;
    const cudaLaunchConfig_t cfg = cluster_config(kernel, 1, C, &attr);
    int clusters = 0;
    if (err == cudaSuccess) err = cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg);
    if (err != cudaSuccess) {
      (void)cudaGetLastError();
      clusters = 0;
    }
    n = clusters > 0 ? clusters : -1;
    if (device < kMaxDevices) cache[device][log2c].store(n, std::memory_order_relaxed);
  }
  return std::max(n, 0);
}

// Whether both cluster kernels of T run code compiled for sm_90 or newer on the current device (not,
// e.g., when the build has only older architectures and the driver compiled their PTX for this GPU).
template <typename T>
bool cluster_code_built() {
  static std::atomic<int> built[kMaxDevices];  // 0: not queried, 1: yes, -1: no
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  int known = device < kMaxDevices ? built[device].load(std::memory_order_relaxed) : 0;
  if (known == 0) {
    cudaFuncAttributes fwd{}, fused{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&fwd, cluster_forward_kernel<T>));
    C10_CUDA_CHECK(cudaFuncGetAttributes(&fused, cluster_forward_grad_kernel<T>));
    const int version = std::min({fwd.ptxVersion, fused.ptxVersion, fwd.binaryVersion, fused.binaryVersion});
    known = version >= 90 ? 1 : -1;
    if (device < kMaxDevices) built[device].store(known, std::memory_order_relaxed);
  }
  return known == 1;
}

// The blocks per row (1, or the cluster size) for rows of V values of T on the current device, the
// same for the forward and the fused kernel, so that their results are bitwise equal. Auto: 1 while one
// block per SM keeps the rows in flight within a quarter of the L2; above, the smallest C for which
// two blocks per SM do (V = 151936 bf16 on an H100 or H200: 8; V = 262144 bf16: 16), lowered while
// either cluster kernel cannot be resident with it.
template <typename T>
int blocks_per_row(int64_t V) {
  const int setting = cluster_setting();  // (checked at every launch: a bad value is never ignored)
  if (V <= kSmallV || setting == 1) return 1;
  const DeviceFacts d = current_device_facts();
  if (d.major < 9) {
    TORCH_CHECK(setting == 0, "DELTAL_KERNELS_CUDA_CLUSTER=", setting,
                ": thread-block clusters need compute capability 9.0 or newer (this GPU: ", d.major, ".x)");
    return 1;
  }
  if (!cluster_code_built<T>()) {
    TORCH_CHECK(setting == 0, "DELTAL_KERNELS_CUDA_CLUSTER=", setting,
                ": the extension has no sm_90 (or newer) code for this GPU; rebuild with TORCH_CUDA_ARCH_LIST "
                "including 9.0");
    return 1;
  }
  int C = setting;
  if (C == 0) {
    const int64_t row_bytes = V * static_cast<int64_t>(sizeof(T));
    const int64_t budget = d.l2_bytes / 4;
    if (d.sms * row_bytes <= budget) return 1;
    C = 2;
    while (C < kMaxCluster && 2 * d.sms * row_bytes > budget * C) C *= 2;
  }
  while (C > 1 && (resident_clusters<T, false>(C) == 0 || resident_clusters<T, true>(C) == 0)) C /= 2;
  TORCH_CHECK(setting == 0 || C == setting, "DELTAL_KERNELS_CUDA_CLUSTER=", setting,
              ": clusters of that size cannot be resident on this GPU");
  return C;
}

// Cluster kernel launch: forward only (every resident cluster) or fused (the rows in flight, one per
// cluster, within a quarter of the L2, but at least one block per SM).
template <typename T, bool GRAD>
void launch_cluster(const FusedPointers& f, int C) {
  auto kernel = GRAD ? cluster_forward_grad_kernel<T> : cluster_forward_kernel<T>;
  int64_t clusters = std::min<int64_t>(f.fwd.N, resident_clusters<T, GRAD>(C));
  if constexpr (GRAD) {
    const int sms = current_device_facts().sms;
    clusters = l2_bounded_units(clusters, f.fwd.V * static_cast<int64_t>(sizeof(T)), (sms + C - 1) / C);
  }
  clusters = std::max<int64_t>(clusters, 1);
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t cfg = cluster_config(kernel, clusters, C, &attr);
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, f));
}

template <typename T>
void forward_dtype(const ForwardPointers& a) {
  if (const int C = blocks_per_row<T>(a.V); C > 1) {
    launch_cluster<T, false>(FusedPointers{a, nullptr, nullptr, 1.0f}, C);
  } else {
    launch_rows<ForwardTag, T>(forward_kernel<T, kWarp>, forward_kernel<T, kBlock>, a);
  }
}

template <typename T>
void grad_dtype(const GradPointers& a) {
  launch_rows<GradTag, T>(grad_kernel<T, kWarp>, grad_kernel<T, kBlock>, a);
}

template <typename T>
void shard_stats_dtype(const ShardStatsPointers& a) {
  launch_rows<ShardStatsTag, T>(shard_stats_kernel<T, kWarp>, shard_stats_kernel<T, kBlock>, a);
}

template <typename T>
void shard_grad_dtype(const ShardGradPointers& a) {
  launch_rows<ShardGradTag, T>(shard_grad_kernel<T, kWarp>, shard_grad_kernel<T, kBlock>, a);
}

template <typename T>
void forward_grad_dtype(const FusedPointers& f) {
  if (const int C = blocks_per_row<T>(f.fwd.V); C > 1) {
    launch_cluster<T, true>(f, C);
  } else if (f.fwd.V <= kSmallV) {
    launch_forward_grad<T, kWarp>(f);
  } else {
    launch_forward_grad<T, kBlock>(f);
  }
}

}  // namespace cuda

void forward_rows_cuda(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& scored,
                       const at::Tensor& old_logprobs, const at::Tensor& ref_logprobs,
                       const at::Tensor& advantages, const RowParams& params, float inv_tau,
                       bool need_entropy, ForwardOutputs& out) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const ForwardPointers a =
      forward_pointers(logits, targets, scored, old_logprobs, ref_logprobs, advantages, params, inv_tau, need_entropy, out);
  by_logits_dtype(logits, cuda::forward_dtype<float>, cuda::forward_dtype<c10::Half>,
                  cuda::forward_dtype<c10::BFloat16>)(a);
}

void forward_grad_rows_cuda(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& scored,
                            const at::Tensor& old_logprobs, const at::Tensor& ref_logprobs,
                            const at::Tensor& advantages, const RowParams& params, float inv_tau,
                            bool need_entropy, const at::Tensor& row_weights, float grad_scale,
                            ForwardOutputs& out, const at::Tensor& grad) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const FusedPointers f = fused_pointers(logits, targets, scored, old_logprobs, ref_logprobs, advantages, params,
                                         inv_tau, need_entropy, row_weights, grad_scale, out, grad);
  by_logits_dtype(logits, cuda::forward_grad_dtype<float>, cuda::forward_grad_dtype<c10::Half>,
                  cuda::forward_grad_dtype<c10::BFloat16>)(f);
}

void grad_rows_cuda(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                    const at::Tensor& entropy, const at::Tensor& g, const at::Tensor& h, float inv_tau,
                    const at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const GradPointers a = grad_pointers(logits, targets, lse, entropy, g, h, inv_tau, out);
  by_logits_dtype(logits, cuda::grad_dtype<float>, cuda::grad_dtype<c10::Half>, cuda::grad_dtype<c10::BFloat16>)(a);
}

void shard_stats_cuda(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& scored,
                      int64_t vocab_start, float inv_tau, bool need_entropy, ShardStatsOutputs& out) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const ShardStatsPointers a = shard_stats_pointers(logits, targets, scored, vocab_start, inv_tau, need_entropy, out);
  by_logits_dtype(logits, cuda::shard_stats_dtype<float>, cuda::shard_stats_dtype<c10::Half>,
                  cuda::shard_stats_dtype<c10::BFloat16>)(a);
}

void shard_grad_rows_cuda(const at::Tensor& logits, const at::Tensor& targets, int64_t vocab_start,
                          const at::Tensor& m, const at::Tensor& log_s, const at::Tensor& entropy,
                          const at::Tensor& g, const at::Tensor& h, float inv_tau, const at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const ShardGradPointers a = shard_grad_pointers(logits, targets, vocab_start, m, log_s, entropy, g, h, inv_tau, out);
  by_logits_dtype(logits, cuda::shard_grad_dtype<float>, cuda::shard_grad_dtype<c10::Half>,
                  cuda::shard_grad_dtype<c10::BFloat16>)(a);
}

#define DK_STRINGIFY2(...) #__VA_ARGS__
#define DK_STRINGIFY(...) DK_STRINGIFY2(__VA_ARGS__)

std::string cuda_build_info() {
  std::ostringstream s;
#ifdef __CUDA_ARCH_LIST__
  s << "cuda_arch_list=" << DK_STRINGIFY(__CUDA_ARCH_LIST__) << "\n";
#endif
#ifdef DK_CUDA_PTX
  s << "cuda_ptx=1\n";
#else
  s << "cuda_ptx=0\n";
#endif
  s << "nvcc_version=" << __CUDACC_VER_MAJOR__ << "." << __CUDACC_VER_MINOR__ << "." << __CUDACC_VER_BUILD__ << "\n";
  s << "cuda_runtime_version=" << CUDART_VERSION << "\n";
  return s.str();
}

}  // namespace deltal_kernels
