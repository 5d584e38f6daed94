// CUDA row kernels, templated over the logits' dtype (float32, float16, bfloat16) and the number of
// threads that share a row (GROUP): a warp per row (8 rows per 256-thread block) for small V, a
// whole block per row otherwise.
//
// - 16-byte vectorised loads and stores (4 float32 / 8 half values) over the aligned body of each
//   row; the elements before the first 16-byte boundary (rows of odd V start anywhere) and after
//   the last whole packet are handled one by one.
// - float32 accumulation; softmax statistics (max, sum exp, sum exp * (z - max)) kept online per
//   thread and merged with warp shuffles (xor butterfly), then across the warps of a block through
//   shared memory in a fixed order: deterministic, no atomics.
// - 64-bit row offsets (row * V never overflows) and a grid-stride loop over rows, so N is unbounded
//   and the grid is sized to the device, not to N.
// - The per-row math (online softmax merge, clipping, KL, entropy, gradient element) is the shared
//   row_math.h, the same code the CPU kernels run.
// - forward_grad_kernel (the fused forward + gradient) is forward_kernel's row pass and epilogue
//   followed by grad_kernel's row pass (the same device functions), with the grid bounded so the
//   rows in flight stay in L2 for the second read.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <sstream>
#include <string>

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

template <typename T>
__device__ __forceinline__ void push_packet(SoftmaxStats& st, const Packet<T>& p, float inv_tau) {
  float z[Packet<T>::N];
  float vmax = -INFINITY;
#pragma unroll
  for (int k = 0; k < Packet<T>::N; ++k) {
    z[k] = static_cast<float>(p.v[k]) * inv_tau;
    vmax = fmaxf(vmax, z[k]);
  }
  if (vmax == -INFINITY) return;  // nothing but -inf: adds nothing
  if (vmax > st.m) st = softmax_rescale(st, vmax);
#pragma unroll
  for (int k = 0; k < Packet<T>::N; ++k) softmax_add(st, z[k]);
}

__device__ __forceinline__ SoftmaxStats shfl_xor(const SoftmaxStats& st, int offset) {
  return {__shfl_xor_sync(0xffffffffu, st.m, offset), __shfl_xor_sync(0xffffffffu, st.s, offset),
          __shfl_xor_sync(0xffffffffu, st.u, offset)};
}

// The statistics of the whole group; every thread of the group gets the same value.
template <int GROUP>
__device__ __forceinline__ SoftmaxStats group_reduce(SoftmaxStats st, SoftmaxStats* smem) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) st = softmax_merge(st, shfl_xor(st, offset));
  if constexpr (GROUP > kWarp) {
    if (threadIdx.x % kWarp == 0) smem[threadIdx.x / kWarp] = st;
    __syncthreads();
    st = smem[0];
#pragma unroll
    for (int w = 1; w < GROUP / kWarp; ++w) st = softmax_merge(st, smem[w]);  // fixed order
    __syncthreads();  // smem is reused for the next row
  }
  return st;
}

// A 16-byte packet of the logits: through the read-only (non-coherent) data path when the kernel
// never writes them (READ_ONLY), else a plain load (the fused kernel may write the gradient into the
// logits' own storage).
template <bool READ_ONLY>
__device__ __forceinline__ uint4 load_packet(const uint4* p) {
  if constexpr (READ_ONLY) {
    return __ldg(p);
  } else {
    return *p;
  }
}

// The softmax statistics of one row x, reduced over the group; every thread of the group gets them.
template <typename T, int GROUP, bool READ_ONLY>
__device__ __forceinline__ SoftmaxStats row_stats(const T* x, int64_t V, float inv_tau, int tid, SoftmaxStats* smem) {
  constexpr int VEC = Packet<T>::N;
  const int64_t head = head_count<T>(x, V);
  const int64_t nvec = (V - head) / VEC;
  const Packet<T>* body = reinterpret_cast<const Packet<T>*>(x + head);

  SoftmaxStats st = softmax_empty();
  for (int64_t j = tid; j < head; j += GROUP) softmax_push(st, static_cast<float>(x[j]) * inv_tau);
  int64_t i = tid;
  for (; i + (kUnroll - 1) * GROUP < nvec; i += kUnroll * GROUP) {
    Packet<T> p[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) p[k].raw = load_packet<READ_ONLY>(&body[i + k * GROUP].raw);
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) push_packet(st, p[k], inv_tau);
  }
  for (; i < nvec; i += GROUP) {
    Packet<T> p;
    p.raw = load_packet<READ_ONLY>(&body[i].raw);
    push_packet(st, p, inv_tau);
  }
  for (int64_t j = head + nvec * VEC + tid; j < V; j += GROUP) softmax_push(st, static_cast<float>(x[j]) * inv_tau);
  return group_reduce<GROUP>(st, smem);
}

// The epilogue of one scored row (row_math.h's row_epilogue on the reduced statistics).
template <typename T>
__device__ __forceinline__ RowResult forward_epilogue(const ForwardPointers& a, int64_t row, const T* x,
                                                      const SoftmaxStats& st) {
  const int64_t y = a.targets[row];
  // targets are validated before any kernel runs; one that is out of range anyway (e.g. under
  // torch.compile, which skips the value checks) gives NaN, never an out-of-bounds read
  const float zy = (y >= 0 && y < a.V) ? static_cast<float>(x[y]) * a.inv_tau : NAN;
  return forward_row_result(a, row, st, zy);
}

template <typename T, int GROUP>
__global__ void __launch_bounds__(kBlock) forward_kernel(const ForwardPointers a) {
  static_assert(kBlock % GROUP == 0 && GROUP % kWarp == 0, "a group is whole warps of one block");
  constexpr int ROWS = kBlock / GROUP;
  __shared__ SoftmaxStats smem[kBlock / kWarp];
  const int tid = threadIdx.x % GROUP;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * ROWS;
  // the loop condition and the skip of unscored rows are uniform over a group (a block when GROUP
  // is the block), so the barriers in group_reduce are reached by all of its threads
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * ROWS + threadIdx.x / GROUP; row < a.N; row += stride) {
    if (!a.scored[row]) {
      if (tid == 0) store_unscored_row(a, row);
      continue;
    }
    const T* x = static_cast<const T*>(a.logits) + row * a.V;
    const SoftmaxStats st = row_stats<T, GROUP, true>(x, a.V, a.inv_tau, tid, smem);
    if (tid == 0) store_row(a, row, forward_epilogue(a, row, x, st));
  }
}

template <typename T>
__device__ __forceinline__ T grad_element(T xv, bool is_target, float lse, float entropy, float g, float h,
                                          float inv_tau) {
  const float log_p = static_cast<float>(xv) * inv_tau - lse;
  return T(logit_grad(log_p, dk_exp(log_p), is_target, entropy, g, h, inv_tau));
}

// The gradient of one packet starting at element j0 (the target, if inside, gets the onehot term).
template <typename T>
__device__ __forceinline__ void grad_packet(Packet<T>& p, int64_t j0, int64_t y, float lse, float entropy, float g,
                                            float h, float inv_tau) {
  const int64_t ty = y - j0;
  const int target = (ty >= 0 && ty < Packet<T>::N) ? static_cast<int>(ty) : -1;  // one 64-bit test per packet
#pragma unroll
  for (int e = 0; e < Packet<T>::N; ++e) p.v[e] = grad_element(p.v[e], e == target, lse, entropy, g, h, inv_tau);
}

// One row of the gradient by the threads of a group (tid: the thread's index in it) into out, which
// may be x itself: each element is read before it is written, by the same thread. Rows with
// g == h == 0 get exact zeros without reading x.
template <typename T, int GROUP>
__device__ __forceinline__ void grad_row(const T* x, T* out, int64_t V, int64_t y, float lse, float entropy, float g,
                                         float h, float inv_tau, int tid) {
  constexpr int VEC = Packet<T>::N;
  if (g == 0.0f && h == 0.0f) {  // exact zeros, without reading the logits
    const int64_t head = head_count<T>(out, V);
    const int64_t nvec = (V - head) / VEC;
    Packet<T>* body = reinterpret_cast<Packet<T>*>(out + head);
    Packet<T> zero;
    zero.raw = make_uint4(0u, 0u, 0u, 0u);
    for (int64_t j = tid; j < head; j += GROUP) out[j] = T(0.0f);
    for (int64_t i = tid; i < nvec; i += GROUP) body[i].raw = zero.raw;
    for (int64_t j = head + nvec * VEC + tid; j < V; j += GROUP) out[j] = T(0.0f);
    return;
  }
  // y out of range (never after validation): no onehot, no OOB access
  // packets need the logits and the gradient at the same offset from a 16-byte boundary (always
  // true in place and for two allocations; otherwise the row goes element by element)
  const uintptr_t xa = reinterpret_cast<uintptr_t>(x), oa = reinterpret_cast<uintptr_t>(out);
  const int64_t head = ((xa ^ oa) & 15) == 0 ? head_count<T>(x, V) : V;
  const int64_t nvec = (V - head) / VEC;
  const Packet<T>* xb = reinterpret_cast<const Packet<T>*>(x + head);
  Packet<T>* ob = reinterpret_cast<Packet<T>*>(out + head);

  for (int64_t j = tid; j < head; j += GROUP) out[j] = grad_element(x[j], j == y, lse, entropy, g, h, inv_tau);
  int64_t i = tid;
  for (; i + (kUnroll - 1) * GROUP < nvec; i += kUnroll * GROUP) {
    Packet<T> p[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) p[k].raw = xb[i + k * GROUP].raw;
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      grad_packet(p[k], head + (i + k * GROUP) * VEC, y, lse, entropy, g, h, inv_tau);
      ob[i + k * GROUP].raw = p[k].raw;
    }
  }
  for (; i < nvec; i += GROUP) {
    Packet<T> p;
    p.raw = xb[i].raw;
    grad_packet(p, head + i * VEC, y, lse, entropy, g, h, inv_tau);
    ob[i].raw = p.raw;
  }
  for (int64_t j = head + nvec * VEC + tid; j < V; j += GROUP)
    out[j] = grad_element(x[j], j == y, lse, entropy, g, h, inv_tau);
}

template <typename T, int GROUP>
__global__ void __launch_bounds__(kBlock) grad_kernel(const GradPointers a) {
  static_assert(kBlock % GROUP == 0 && GROUP % kWarp == 0, "a group is whole warps of one block");
  constexpr int ROWS = kBlock / GROUP;
  const int tid = threadIdx.x % GROUP;
  const int64_t V = a.V;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * ROWS;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * ROWS + threadIdx.x / GROUP; row < a.N; row += stride) {
    grad_row<T, GROUP>(static_cast<const T*>(a.logits) + row * V, static_cast<T*>(a.out) + row * V, V,
                       a.targets[row], a.lse[row], a.entropy[row], a.g[row], a.h[row], a.inv_tau, tid);
  }
}

// forward_kernel and grad_kernel in one launch: a group reduces its row, runs the epilogue (every
// thread of the group, redundantly, so each has g and h), then makes a second pass over the same row
// -- from L2 for most rows, the grid being sized so the rows in flight fit in it -- and writes its
// gradient with grad_row: the same bits as the two kernels.
template <typename T, int GROUP>
__global__ void __launch_bounds__(kBlock) forward_grad_kernel(const FusedPointers f) {
  static_assert(kBlock % GROUP == 0 && GROUP % kWarp == 0, "a group is whole warps of one block");
  constexpr int ROWS = kBlock / GROUP;
  __shared__ SoftmaxStats smem[kBlock / kWarp];
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
      grad_row<T, GROUP>(x, out, V, 0, 0.0f, 0.0f, 0.0f, 0.0f, a.inv_tau, tid);  // zeros
      continue;
    }
    const SoftmaxStats st = row_stats<T, GROUP, false>(x, V, a.inv_tau, tid, smem);
    const RowResult r = forward_epilogue(a, row, x, st);  // reads x[y]
    if (tid == 0) store_row(a, row, r);
    // out may be the logits: every thread of the group has read the row (and x[y]) before any
    // thread of it writes the gradient
    if constexpr (GROUP > kWarp) {
      __syncthreads();
    } else {
      __syncwarp();
    }
    const GradFactors gh = fused_grad_factors(f, row, r);
    grad_row<T, GROUP>(x, out, V, a.targets[row], r.lse, r.entropy, gh.g, gh.h, a.inv_tau, tid);
  }
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

// Blocks of the fused kernel: its second pass over a row only saves a DRAM read while the row is
// still in L2, so the rows in flight are bounded by half the L2 (at least one block per SM, at most
// what is resident): e.g. V = 151936 bf16 on an H100 (50 MB L2): 86 blocks by L2, so 132 (one per SM).
// An untuned starting point, like the Triton backend's fused_programs.
int64_t l2_bounded_blocks(int64_t blocks, int rows_per_block, int64_t row_bytes) {
  int device = 0, l2 = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t l2_bytes = l2 > 0 ? l2 : (int64_t{40} << 20);
  const int64_t fit = (l2_bytes / 2) / std::max<int64_t>(1, row_bytes * rows_per_block);
  return std::max<int64_t>(1, std::min<int64_t>(blocks, std::max<int64_t>(sms, fit)));
}

template <typename T, int GROUP>
struct ForwardTag {};
template <typename T, int GROUP>
struct GradTag {};
template <typename T, int GROUP>
struct FusedTag {};

template <typename T, int GROUP>
void launch_forward(const ForwardPointers& a) {
  auto kernel = forward_kernel<T, GROUP>;
  const int64_t grid = grid_size<ForwardTag<T, GROUP>>(kernel, a.N, kBlock / GROUP);
  kernel<<<static_cast<unsigned>(grid), kBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int GROUP>
void launch_grad(const GradPointers& a) {
  auto kernel = grad_kernel<T, GROUP>;
  const int64_t grid = grid_size<GradTag<T, GROUP>>(kernel, a.N, kBlock / GROUP);
  kernel<<<static_cast<unsigned>(grid), kBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int GROUP>
void launch_forward_grad(const FusedPointers& f) {
  auto kernel = forward_grad_kernel<T, GROUP>;
  constexpr int rows = kBlock / GROUP;
  const int64_t grid = l2_bounded_blocks(grid_size<FusedTag<T, GROUP>>(kernel, f.fwd.N, rows), rows,
                                         f.fwd.V * static_cast<int64_t>(sizeof(T)));
  kernel<<<static_cast<unsigned>(grid), kBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(f);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void forward_dtype(const ForwardPointers& a) {
  if (a.V <= kSmallV) {
    launch_forward<T, kWarp>(a);
  } else {
    launch_forward<T, kBlock>(a);
  }
}

template <typename T>
void grad_dtype(const GradPointers& a) {
  if (a.V <= kSmallV) {
    launch_grad<T, kWarp>(a);
  } else {
    launch_grad<T, kBlock>(a);
  }
}

template <typename T>
void forward_grad_dtype(const FusedPointers& f) {
  if (f.fwd.V <= kSmallV) {
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
