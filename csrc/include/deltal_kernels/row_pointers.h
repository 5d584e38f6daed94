// The raw pointers and sizes the row kernels run on, built once from the tensors for both the CPU
// (csrc/cpu/) and the CUDA (csrc/cuda/) entry points, and the per-row stores both write with.
//
// The structs hold only pointers, sizes, floats, a bool and the RowParams POD: trivially copyable,
// so the CUDA kernels take them by value as kernel arguments and the CPU tasks by reference.
// The builders only read the tensors' data pointers and sizes: the op layer (csrc/bindings.cpp) has
// checked dtypes, shapes, devices and contiguity before (see kernels.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <stdint.h>

#include <type_traits>

#include "deltal_kernels/kernels.h"
#include "deltal_kernels/row_math.h"

namespace deltal_kernels {

// forward_rows: logits [N, V] in, the [N] outputs of ForwardOutputs out
struct ForwardPointers {
  const void* logits;
  const int64_t* targets;
  const bool* scored;
  const float* old_logprobs;
  const float* ref_logprobs;  // nullptr: no KL term
  const float* advantages;
  int64_t N;
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

// grad_rows: the logits gradient [N, V] from the per-row lse, H, g and h
struct GradPointers {
  const void* logits;
  void* out;  // may be logits itself: every element is read before it is written
  const int64_t* targets;
  const float* lse;
  const float* entropy;
  const float* g;
  const float* h;
  int64_t N;
  int64_t V;
  float inv_tau;
};

// forward_grad_rows: forward_rows plus the gradient of grad_scale * sum_t w_t * l_t into out
struct FusedPointers {
  ForwardPointers fwd;
  void* out;                 // the gradient [N, V]; may be fwd.logits itself
  const float* row_weights;  // w_t
  float grad_scale;
};

// shard_stats: one vocabulary shard of each row [N, V] (the columns [vocab_start, vocab_start + V)) in,
// its softmax statistics and target logit out
struct ShardStatsPointers {
  const void* logits;
  const int64_t* targets;  // global ids
  const bool* scored;
  int64_t N;
  int64_t V;
  int64_t vocab_start;
  float inv_tau;
  bool need_entropy;
  float* m;
  float* s;
  float* u;
  float* zt;
};

// shard_grad_rows: the shard's gradient [N, V] from the merged row statistics m, log s, H and g, h
struct ShardGradPointers {
  const void* logits;
  void* out;  // may be logits itself
  const int64_t* targets;  // global ids
  const float* m;
  const float* log_s;
  const float* entropy;
  const float* g;
  const float* h;
  int64_t N;
  int64_t V;
  int64_t vocab_start;
  float inv_tau;
};

static_assert(std::is_trivially_copyable_v<ForwardPointers> && std::is_trivially_copyable_v<GradPointers> &&
                  std::is_trivially_copyable_v<FusedPointers> && std::is_trivially_copyable_v<ShardStatsPointers> &&
                  std::is_trivially_copyable_v<ShardGradPointers>,
              "the pointer structs are CUDA kernel arguments");

// ---------------------------------------------------------------------------------------------
// Per-row pieces of the forward that the CPU and CUDA kernels share (one thread per row calls them).
// ---------------------------------------------------------------------------------------------

// The epilogue of one scored row from its softmax statistics and its target logit zy = x[y] / tau
// (how zy is read, and what an out-of-range target does, is the caller's).
DK_HD RowResult forward_row_result(const ForwardPointers& a, int64_t row, SoftmaxStats st, float zy) {
  const float ref = a.ref_logprobs != nullptr ? a.ref_logprobs[row] : 0.0f;
  return row_epilogue(st, zy, a.need_entropy, a.old_logprobs[row], ref, a.advantages[row], a.params);
}

DK_HD void store_row(const ForwardPointers& a, int64_t row, const RowResult& r) {
  a.logp[row] = r.logp;
  a.entropy[row] = r.entropy;
  a.lse[row] = r.lse;
  a.loss[row] = r.terms.loss;
  a.dlogp[row] = r.terms.dlogp;
  a.kl[row] = r.terms.kl;
  a.flags[row] = r.terms.flags;
}

// unscored rows do no V work: zeros in every [N] output
DK_HD void store_unscored_row(const ForwardPointers& a, int64_t row) {
  a.logp[row] = a.entropy[row] = a.lse[row] = a.loss[row] = a.dlogp[row] = a.kl[row] = 0.0f;
  a.flags[row] = 0;
}

// g and h of a scored row's gradient in the fused kernels, from the row's forward result
DK_HD GradFactors fused_grad_factors(const FusedPointers& f, int64_t row, const RowResult& r) {
  return weighted_grad_factors(f.row_weights[row], f.grad_scale, r.terms.dlogp, f.fwd.params.entropy_coef);
}

// The statistics of one shard row (u = 0 unless need_entropy) and its target logit (0 when another
// shard holds the target); an unscored row stores the empty part {-inf, 0, 0} and zt = 0.
DK_HD void store_shard_stats(const ShardStatsPointers& a, int64_t row, SoftmaxStats st, float zt) {
  a.m[row] = st.m;
  a.s[row] = st.s;
  a.u[row] = a.need_entropy ? st.u : 0.0f;
  a.zt[row] = zt;
}

// ---------------------------------------------------------------------------------------------
// Host: the structs from the entry points' tensors (kernels.h), and the dtype dispatch.
// ---------------------------------------------------------------------------------------------

inline ForwardPointers forward_pointers(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& scored,
                                        const at::Tensor& old_logprobs, const at::Tensor& ref_logprobs,
                                        const at::Tensor& advantages, const RowParams& params, float inv_tau,
                                        bool need_entropy, ForwardOutputs& out) {
  return ForwardPointers{logits.const_data_ptr(),
                         targets.const_data_ptr<int64_t>(),
                         scored.const_data_ptr<bool>(),
                         old_logprobs.const_data_ptr<float>(),
                         ref_logprobs.defined() ? ref_logprobs.const_data_ptr<float>() : nullptr,
                         advantages.const_data_ptr<float>(),
                         logits.size(0),
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
}

inline GradPointers grad_pointers(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                                  const at::Tensor& entropy, const at::Tensor& g, const at::Tensor& h, float inv_tau,
                                  const at::Tensor& out) {
  return GradPointers{logits.const_data_ptr(),
                      out.data_ptr(),
                      targets.const_data_ptr<int64_t>(),
                      lse.const_data_ptr<float>(),
                      entropy.const_data_ptr<float>(),
                      g.const_data_ptr<float>(),
                      h.const_data_ptr<float>(),
                      logits.size(0),
                      logits.size(1),
                      inv_tau};
}

inline FusedPointers fused_pointers(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& scored,
                                    const at::Tensor& old_logprobs, const at::Tensor& ref_logprobs,
                                    const at::Tensor& advantages, const RowParams& params, float inv_tau,
                                    bool need_entropy, const at::Tensor& row_weights, float grad_scale,
                                    ForwardOutputs& out, const at::Tensor& grad) {
  return FusedPointers{forward_pointers(logits, targets, scored, old_logprobs, ref_logprobs, advantages, params,
                                        inv_tau, need_entropy, out),
                       grad.data_ptr(), row_weights.const_data_ptr<float>(), grad_scale};
}

inline ShardStatsPointers shard_stats_pointers(const at::Tensor& logits, const at::Tensor& targets,
                                               const at::Tensor& scored, int64_t vocab_start, float inv_tau,
                                               bool need_entropy, ShardStatsOutputs& out) {
  return ShardStatsPointers{logits.const_data_ptr(),
                            targets.const_data_ptr<int64_t>(),
                            scored.const_data_ptr<bool>(),
                            logits.size(0),
                            logits.size(1),
                            vocab_start,
                            inv_tau,
                            need_entropy,
                            out.m.mutable_data_ptr<float>(),
                            out.s.mutable_data_ptr<float>(),
                            out.u.mutable_data_ptr<float>(),
                            out.zt.mutable_data_ptr<float>()};
}

inline ShardGradPointers shard_grad_pointers(const at::Tensor& logits, const at::Tensor& targets, int64_t vocab_start,
                                             const at::Tensor& m, const at::Tensor& log_s, const at::Tensor& entropy,
                                             const at::Tensor& g, const at::Tensor& h, float inv_tau,
                                             const at::Tensor& out) {
  return ShardGradPointers{logits.const_data_ptr(),
                           out.data_ptr(),
                           targets.const_data_ptr<int64_t>(),
                           m.const_data_ptr<float>(),
                           log_s.const_data_ptr<float>(),
                           entropy.const_data_ptr<float>(),
                           g.const_data_ptr<float>(),
                           h.const_data_ptr<float>(),
                           logits.size(0),
                           logits.size(1),
                           vocab_start,
                           inv_tau};
}

// One of three instances of a kernel (or launcher) by the logits' dtype: float32, float16, bfloat16.
template <typename Fn>
Fn by_logits_dtype(const at::Tensor& logits, Fn f32, Fn f16, Fn bf16) {
  const at::ScalarType t = logits.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kHalf || t == at::kBFloat16,
                   "logits: expected float32, float16 or bfloat16, got ", t);
  return t == at::kFloat ? f32 : (t == at::kHalf ? f16 : bf16);
}

}  // namespace deltal_kernels
