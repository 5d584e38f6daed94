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

// "key=value" lines: what nvcc compiled (archs, nvcc version), from compile-time macros.
std::string cuda_build_info();
#endif

}  // namespace deltal_kernels
