// Host-side entry points of the row kernels (CPU in csrc/cpu/, CUDA in csrc/cuda/).
//
// The op layer (csrc/bindings.cpp) checks every argument and allocates the outputs; these
// functions only run the kernels on tensors already known to be valid: logits [N, V] contiguous
// float32/float16/bfloat16; targets [N] int64; scored [N] bool; row inputs [N] float32
// contiguous; outputs contiguous, on the logits' device.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

#include "deltal_kernels/row_math.h"

namespace deltal_kernels {

struct ForwardOutputs {
  at::Tensor logp, entropy, lse, loss, dlogp, kl, flags;  // [N] float32 (flags: uint8); every row written
};

// The statistics of one vocabulary shard of each row (see shard_stats_cpu): [N] float32 each.
struct ShardStatsOutputs {
  at::Tensor m, s, u, zt;
};

// ref_logprobs may be an undefined tensor (no KL term).
void forward_rows_cpu(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& scored,
                      const at::Tensor& old_logprobs, const at::Tensor& ref_logprobs,
                      const at::Tensor& advantages, const RowParams& params, float inv_tau,
                      bool need_entropy, ForwardOutputs& out);

// out [N, V] in the logits' dtype; may be logits itself.
void grad_rows_cpu(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                   const at::Tensor& entropy, const at::Tensor& g, const at::Tensor& h, float inv_tau,
                   const at::Tensor& out);

// forward_rows plus, in the same pass over each row, the gradient of
// grad_scale * sum_t row_weights[t] * loss[t] w.r.t. the logits into grad [N, V] (the logits' dtype;
// may be logits itself): the same bits as grad_rows with g = (grad_scale * w) * dlogp and
// h = (grad_scale * w) * -entropy_coef. row_weights [N] float32 contiguous.
void forward_grad_rows_cpu(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& scored,
                           const at::Tensor& old_logprobs, const at::Tensor& ref_logprobs,
                           const at::Tensor& advantages, const RowParams& params, float inv_tau,
                           bool need_entropy, const at::Tensor& row_weights, float grad_scale,
                           ForwardOutputs& out, const at::Tensor& grad);

// logits [N, V]: the columns [vocab_start, vocab_start + V) of each row; targets are global ids (any
// value). Per row: m = max z, s = sum exp(z - m), u = sum exp(z - m) (z - m) (0 unless need_entropy),
// zt = z of the target where this shard holds it (else 0), z = x / tau as the forward computes it;
// unscored rows {-inf, 0, 0}, zt = 0. The shards' statistics merge (softmax_merge) into the row's.
void shard_stats_cpu(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& scored,
                     int64_t vocab_start, float inv_tau, bool need_entropy, ShardStatsOutputs& out);

// The shard's part of grad_rows' gradient from the merged row statistics m, log s (lse = m + log s)
// and entropy into out [N, V] (the logits' dtype; may be logits itself); rows with g = h = 0 and
// non-NaN m, log s get exact zeros.
void shard_grad_rows_cpu(const at::Tensor& logits, const at::Tensor& targets, int64_t vocab_start,
                         const at::Tensor& m, const at::Tensor& log_s, const at::Tensor& entropy, const at::Tensor& g,
                         const at::Tensor& h, float inv_tau, const at::Tensor& out);

#ifdef DK_WITH_CUDA
void forward_rows_cuda(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& scored,
                       const at::Tensor& old_logprobs, const at::Tensor& ref_logprobs,
                       const at::Tensor& advantages, const RowParams& params, float inv_tau,
                       bool need_entropy, ForwardOutputs& out);

void grad_rows_cuda(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                    const at::Tensor& entropy, const at::Tensor& g, const at::Tensor& h, float inv_tau,
                    const at::Tensor& out);

void forward_grad_rows_cuda(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& scored,
                            const at::Tensor& old_logprobs, const at::Tensor& ref_logprobs,
                            const at::Tensor& advantages, const RowParams& params, float inv_tau,
                            bool need_entropy, const at::Tensor& row_weights, float grad_scale,
                            ForwardOutputs& out, const at::Tensor& grad);

void shard_stats_cuda(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& scored,
                      int64_t vocab_start, float inv_tau, bool need_entropy, ShardStatsOutputs& out);

void shard_grad_rows_cuda(const at::Tensor& logits, const at::Tensor& targets, int64_t vocab_start,
                          const at::Tensor& m, const at::Tensor& log_s, const at::Tensor& entropy,
                          const at::Tensor& g, const at::Tensor& h, float inv_tau, const at::Tensor& out);

// "key=value" lines: what nvcc compiled (archs, nvcc version), from compile-time macros.
std::string cuda_build_info();
#endif

}  // namespace deltal_kernels
