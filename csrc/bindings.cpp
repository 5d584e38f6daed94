// The ops of the compiled extension: argument checks, output allocation and registration only.
//
//   torch.ops.deltal_kernels_ext.forward_rows(...)  -> (logp, entropy, lse, loss, dlogp, kl, flags)
//   torch.ops.deltal_kernels_ext.grad_rows(..., out) -> ()   (writes out; out may be logits)
//   torch.ops.deltal_kernels_ext.forward_grad_rows(..., row_weights, grad_scale, out)
//                                                   -> forward_rows' outputs, and writes out (may be logits)
//   torch.ops.deltal_kernels_ext.shard_stats(logits, targets, scored, vocab_start, temperature, need_entropy)
//                                                   -> (m, s, u, zt)  (one vocabulary shard of each row)
//   torch.ops.deltal_kernels_ext.shard_grad_rows(logits, targets, vocab_start, m, log_s, entropy, g, h,
//                                                temperature, out) -> ()  (writes out; out may be logits)
//   torch.ops.deltal_kernels_ext.build_info()       -> str  ("key=value" lines)
//
// Kernels for the CPU and CUDA dispatch keys, and Meta kernels (shapes only) for tracing.
// The semantics are the row contract of deltal_kernels/dispatch.py.
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <Python.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>

#include "deltal_kernels/kernels.h"

#ifndef DK_VERSION
#define DK_VERSION "unknown"
#endif

namespace deltal_kernels {
namespace {

using at::Tensor;
using Outputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

bool is_logits_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

void check_logits(const Tensor& logits) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "logits: expected a 2-D tensor [N, V], got ", logits.dim(), " dims");
  TORCH_CHECK_TYPE(is_logits_dtype(logits.scalar_type()),
                   "logits: expected float32, float16 or bfloat16, got ", logits.scalar_type());
  TORCH_CHECK_VALUE(logits.size(1) > 0, "logits: the vocabulary dimension V is 0");
  TORCH_CHECK_VALUE(logits.is_contiguous(), "logits: expected a contiguous tensor");
}

// A per-row input: [N], the given dtype, on the logits' device. Returns it contiguous.
Tensor row_input(const char* name, const Tensor& x, const Tensor& logits, at::ScalarType dtype) {
  const int64_t N = logits.size(0);
  TORCH_CHECK_VALUE(x.dim() == 1 && x.size(0) == N, name, ": expected shape [N] = [", N, "], got ", x.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.device() == logits.device(), name, ": expected a tensor on ", logits.device(),
                    " (the logits' device), got one on ", x.device());
  return x.contiguous();
}

RowParams make_params(double clip_low, double clip_high, double dual_clip, double kl_coef, int64_t kl_type,
                      double entropy_coef) {
  TORCH_CHECK_VALUE(kl_type >= 0 && kl_type <= 3, "kl_type: expected 0 (none), 1, 2 or 3, got ", kl_type);
  TORCH_CHECK_VALUE(std::isfinite(clip_low) && std::isfinite(clip_high), "clip_low/clip_high: must be finite");
  return RowParams{static_cast<float>(1.0 - clip_low), static_cast<float>(1.0 + clip_high),
                   static_cast<float>(dual_clip),     static_cast<float>(kl_coef),
                   static_cast<float>(entropy_coef),  static_cast<int>(kl_type)};
}

float inverse_temperature(double temperature) {
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0.0,
                    "temperature: expected a finite number > 0, got ", temperature);
  return static_cast<float>(1.0 / temperature);
}

struct ForwardInputs {
  Tensor targets, scored, old_logprobs, ref_logprobs, advantages;
};

ForwardInputs check_forward(const Tensor& logits, const Tensor& targets, const Tensor& scored,
                            const Tensor& old_logprobs, const std::optional<Tensor>& ref_logprobs,
                            const Tensor& advantages, int64_t kl_type) {
  check_logits(logits);
  ForwardInputs in;
  in.targets = row_input("targets", targets, logits, at::kLong);
  in.scored = row_input("scored", scored, logits, at::kBool);
  in.old_logprobs = row_input("old_logprobs", old_logprobs, logits, at::kFloat);
  in.advantages = row_input("advantages", advantages, logits, at::kFloat);
  if (ref_logprobs.has_value() && ref_logprobs->defined())
    in.ref_logprobs = row_input("ref_logprobs", *ref_logprobs, logits, at::kFloat);
  TORCH_CHECK_VALUE(kl_type == 0 || in.ref_logprobs.defined(), "ref_logprobs: kl_type ", kl_type,
                    " needs ref_logprobs");
  return in;
}

ForwardOutputs allocate_outputs(const Tensor& logits) {
  const auto f32 = logits.options().dtype(at::kFloat);
  const auto u8 = logits.options().dtype(at::kByte);
  const int64_t N = logits.size(0);
  auto make = [&](const at::TensorOptions& o) { return at::empty({N}, o); };
  return ForwardOutputs{make(f32), make(f32), make(f32), make(f32), make(f32), make(f32), make(u8)};
}

Outputs as_tuple(const ForwardOutputs& o) { return {o.logp, o.entropy, o.lse, o.loss, o.dlogp, o.kl, o.flags}; }

Outputs forward_rows(const Tensor& logits, const Tensor& targets, const Tensor& scored, const Tensor& old_logprobs,
                     const std::optional<Tensor>& ref_logprobs, const Tensor& advantages, double clip_low,
                     double clip_high, double dual_clip, double kl_coef, int64_t kl_type, double entropy_coef,
                     double temperature, bool need_entropy) {
  const ForwardInputs in = check_forward(logits, targets, scored, old_logprobs, ref_logprobs, advantages, kl_type);
  const RowParams params = make_params(clip_low, clip_high, dual_clip, kl_coef, kl_type, entropy_coef);
  const float inv_tau = inverse_temperature(temperature);
  ForwardOutputs out = allocate_outputs(logits);  // the kernels write every row
  if (logits.size(0) == 0) return as_tuple(out);
  if (logits.is_cuda()) {
#ifdef DK_WITH_CUDA
    forward_rows_cuda(logits, in.targets, in.scored, in.old_logprobs, in.ref_logprobs, in.advantages, params, inv_tau,
                      need_entropy, out);
#else
    TORCH_CHECK(false, "deltal_kernels: the extension was built without CUDA");
#endif
  } else {
    forward_rows_cpu(logits, in.targets, in.scored, in.old_logprobs, in.ref_logprobs, in.advantages, params, inv_tau,
                     need_entropy, out);
  }
  return as_tuple(out);
}

Outputs forward_rows_meta(const Tensor& logits, const Tensor& targets, const Tensor& scored,
                          const Tensor& old_logprobs, const std::optional<Tensor>& ref_logprobs,
                          const Tensor& advantages, double clip_low, double clip_high, double dual_clip,
                          double kl_coef, int64_t kl_type, double entropy_coef, double temperature,
                          bool need_entropy) {
  (void)clip_low, (void)clip_high, (void)dual_clip, (void)kl_coef, (void)entropy_coef, (void)temperature,
      (void)need_entropy;
  check_forward(logits, targets, scored, old_logprobs, ref_logprobs, advantages, kl_type);
  return as_tuple(allocate_outputs(logits));
}

// The gradient buffer: the logits' shape, dtype and device, contiguous.
void check_out(const Tensor& out, const Tensor& logits) {
  TORCH_CHECK_VALUE(out.sizes() == logits.sizes(), "out: expected shape ", logits.sizes(), " (the logits' shape), got ",
                    out.sizes());
  TORCH_CHECK_TYPE(out.scalar_type() == logits.scalar_type(), "out: expected dtype ", logits.scalar_type(),
                   " (the logits' dtype), got ", out.scalar_type());
  TORCH_CHECK_VALUE(out.device() == logits.device(), "out: expected a tensor on ", logits.device(), ", got one on ",
                    out.device());
  TORCH_CHECK_VALUE(out.is_contiguous(), "out: expected a contiguous tensor");
}

// out is either the logits' own storage (in place: each element is read before it is written)
// or memory that does not overlap them
void check_out_overlap(const Tensor& out, const Tensor& logits) {
  const auto overlap = at::get_overlap_status(out, logits);
  TORCH_CHECK_VALUE(overlap == at::MemOverlapStatus::No || out.data_ptr() == logits.data_ptr(),
                    "out: must be the logits themselves or not overlap them");
}

struct GradInputs {
  Tensor targets, lse, entropy, g, h;
};

GradInputs check_grad(const Tensor& logits, const Tensor& targets, const Tensor& lse, const Tensor& entropy,
                      const Tensor& g, const Tensor& h, const Tensor& out) {
  check_logits(logits);
  GradInputs in{row_input("targets", targets, logits, at::kLong), row_input("lse", lse, logits, at::kFloat),
                row_input("entropy", entropy, logits, at::kFloat), row_input("g", g, logits, at::kFloat),
                row_input("h", h, logits, at::kFloat)};
  check_out(out, logits);
  return in;
}

void grad_rows(const Tensor& logits, const Tensor& targets, const Tensor& lse, const Tensor& entropy, const Tensor& g,
               const Tensor& h, double temperature, const Tensor& out) {
  const GradInputs in = check_grad(logits, targets, lse, entropy, g, h, out);
  const float inv_tau = inverse_temperature(temperature);
  check_out_overlap(out, logits);
  if (logits.numel() == 0) return;
  if (logits.is_cuda()) {
#ifdef DK_WITH_CUDA
    grad_rows_cuda(logits, in.targets, in.lse, in.entropy, in.g, in.h, inv_tau, out);
#else
    TORCH_CHECK(false, "deltal_kernels: the extension was built without CUDA");
#endif
  } else {
    grad_rows_cpu(logits, in.targets, in.lse, in.entropy, in.g, in.h, inv_tau, out);
  }
}

void grad_rows_meta(const Tensor& logits, const Tensor& targets, const Tensor& lse, const Tensor& entropy,
                    const Tensor& g, const Tensor& h, double temperature, const Tensor& out) {
  (void)temperature;
  check_grad(logits, targets, lse, entropy, g, h, out);
}

// forward_rows plus the gradient of grad_scale * sum_t row_weights[t] * loss[t] written into out,
// in the same pass over each row (the optional fused function of the row contract).
Outputs forward_grad_rows(const Tensor& logits, const Tensor& targets, const Tensor& scored,
                          const Tensor& old_logprobs, const std::optional<Tensor>& ref_logprobs,
                          const Tensor& advantages, double clip_low, double clip_high, double dual_clip,
                          double kl_coef, int64_t kl_type, double entropy_coef, double temperature, bool need_entropy,
                          const Tensor& row_weights, double grad_scale, const Tensor& out) {
  const ForwardInputs in = check_forward(logits, targets, scored, old_logprobs, ref_logprobs, advantages, kl_type);
  const Tensor weights = row_input("row_weights", row_weights, logits, at::kFloat);
  check_out(out, logits);
  check_out_overlap(out, logits);
  const RowParams params = make_params(clip_low, clip_high, dual_clip, kl_coef, kl_type, entropy_coef);
  const float inv_tau = inverse_temperature(temperature);
  ForwardOutputs fwd = allocate_outputs(logits);  // the kernels write every row, and every row of out
  if (logits.size(0) == 0) return as_tuple(fwd);
  if (logits.is_cuda()) {
#ifdef DK_WITH_CUDA
    forward_grad_rows_cuda(logits, in.targets, in.scored, in.old_logprobs, in.ref_logprobs, in.advantages, params,
                           inv_tau, need_entropy, weights, static_cast<float>(grad_scale), fwd, out);
#else
    TORCH_CHECK(false, "deltal_kernels: the extension was built without CUDA");
#endif
  } else {
    forward_grad_rows_cpu(logits, in.targets, in.scored, in.old_logprobs, in.ref_logprobs, in.advantages, params,
                          inv_tau, need_entropy, weights, static_cast<float>(grad_scale), fwd, out);
  }
  return as_tuple(fwd);
}

Outputs forward_grad_rows_meta(const Tensor& logits, const Tensor& targets, const Tensor& scored,
                               const Tensor& old_logprobs, const std::optional<Tensor>& ref_logprobs,
                               const Tensor& advantages, double clip_low, double clip_high, double dual_clip,
                               double kl_coef, int64_t kl_type, double entropy_coef, double temperature,
                               bool need_entropy, const Tensor& row_weights, double grad_scale, const Tensor& out) {
  (void)clip_low, (void)clip_high, (void)dual_clip, (void)kl_coef, (void)entropy_coef, (void)temperature,
      (void)need_entropy, (void)grad_scale;
  check_forward(logits, targets, scored, old_logprobs, ref_logprobs, advantages, kl_type);
  row_input("row_weights", row_weights, logits, at::kFloat);
  check_out(out, logits);
  return as_tuple(allocate_outputs(logits));
}

// ---- Vocabulary shards: one shard [N, V_r] of each row, targets as global ids (any value) ----

using ShardOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor>;

void check_vocab_start(int64_t vocab_start) {
  TORCH_CHECK_VALUE(vocab_start >= 0, "vocab_start: expected an integer >= 0, got ", vocab_start);
}

struct ShardInputs {
  Tensor targets, scored;
};

ShardInputs check_shard_stats(const Tensor& logits, const Tensor& targets, const Tensor& scored, int64_t vocab_start) {
  check_logits(logits);
  ShardInputs in{row_input("targets", targets, logits, at::kLong), row_input("scored", scored, logits, at::kBool)};
  check_vocab_start(vocab_start);
  return in;
}

ShardStatsOutputs allocate_shard_outputs(const Tensor& logits) {
  const auto f32 = logits.options().dtype(at::kFloat);
  const int64_t N = logits.size(0);
  return ShardStatsOutputs{at::empty({N}, f32), at::empty({N}, f32), at::empty({N}, f32), at::empty({N}, f32)};
}

ShardOutputs shard_stats(const Tensor& logits, const Tensor& targets, const Tensor& scored, int64_t vocab_start,
                         double temperature, bool need_entropy) {
  const ShardInputs in = check_shard_stats(logits, targets, scored, vocab_start);
  const float inv_tau = inverse_temperature(temperature);
  ShardStatsOutputs out = allocate_shard_outputs(logits);  // the kernels write every row
  if (logits.size(0) > 0) {
    if (logits.is_cuda()) {
#ifdef DK_WITH_CUDA
      shard_stats_cuda(logits, in.targets, in.scored, vocab_start, inv_tau, need_entropy, out);
#else
      TORCH_CHECK(false, "deltal_kernels: the extension was built without CUDA");
#endif
    } else {
      shard_stats_cpu(logits, in.targets, in.scored, vocab_start, inv_tau, need_entropy, out);
    }
  }
  return {out.m, out.s, out.u, out.zt};
}

ShardOutputs shard_stats_meta(const Tensor& logits, const Tensor& targets, const Tensor& scored, int64_t vocab_start,
                              double temperature, bool need_entropy) {
  (void)temperature, (void)need_entropy;
  check_shard_stats(logits, targets, scored, vocab_start);
  const ShardStatsOutputs out = allocate_shard_outputs(logits);
  return {out.m, out.s, out.u, out.zt};
}

struct ShardGradInputs {
  Tensor targets, m, log_s, entropy, g, h;
};

ShardGradInputs check_shard_grad(const Tensor& logits, const Tensor& targets, int64_t vocab_start, const Tensor& m,
                                 const Tensor& log_s, const Tensor& entropy, const Tensor& g, const Tensor& h,
                                 const Tensor& out) {
  check_logits(logits);
  ShardGradInputs in{row_input("targets", targets, logits, at::kLong), row_input("m", m, logits, at::kFloat),
                     row_input("log_s", log_s, logits, at::kFloat), row_input("entropy", entropy, logits, at::kFloat),
                     row_input("g", g, logits, at::kFloat),           row_input("h", h, logits, at::kFloat)};
  check_vocab_start(vocab_start);
  check_out(out, logits);
  return in;
}

void shard_grad_rows(const Tensor& logits, const Tensor& targets, int64_t vocab_start, const Tensor& m,
                     const Tensor& log_s, const Tensor& entropy, const Tensor& g, const Tensor& h, double temperature,
                     const Tensor& out) {
  const ShardGradInputs in = check_shard_grad(logits, targets, vocab_start, m, log_s, entropy, g, h, out);
  const float inv_tau = inverse_temperature(temperature);
  check_out_overlap(out, logits);
  if (logits.numel() == 0) return;
  if (logits.is_cuda()) {
#ifdef DK_WITH_CUDA
    shard_grad_rows_cuda(logits, in.targets, vocab_start, in.m, in.log_s, in.entropy, in.g, in.h, inv_tau, out);
#else
    TORCH_CHECK(false, "deltal_kernels: the extension was built without CUDA");
#endif
  } else {
    shard_grad_rows_cpu(logits, in.targets, vocab_start, in.m, in.log_s, in.entropy, in.g, in.h, inv_tau, out);
  }
}

void shard_grad_rows_meta(const Tensor& logits, const Tensor& targets, int64_t vocab_start, const Tensor& m,
                          const Tensor& log_s, const Tensor& entropy, const Tensor& g, const Tensor& h,
                          double temperature, const Tensor& out) {
  (void)temperature;
  check_shard_grad(logits, targets, vocab_start, m, log_s, entropy, g, h, out);
}

std::string build_info() {
  std::ostringstream s;
  s << "version=" << DK_VERSION << "\n";
#ifdef DK_WITH_CUDA
  s << "cuda_built=1\n" << cuda_build_info();
#else
  s << "cuda_built=0\n";
#endif
#if defined(__clang__)
  s << "cxx=clang " << __clang_major__ << "." << __clang_minor__ << "\n";
#elif defined(__GNUC__)
  s << "cxx=gcc " << __GNUC__ << "." << __GNUC_MINOR__ << "\n";
#endif
  return s.str();
}

}  // namespace
}  // namespace deltal_kernels

TORCH_LIBRARY(deltal_kernels_ext, m) {
  m.def(
      "forward_rows(Tensor logits, Tensor targets, Tensor scored, Tensor old_logprobs, Tensor? ref_logprobs, "
      "Tensor advantages, float clip_low, float clip_high, float dual_clip, float kl_coef, int kl_type, "
      "float entropy_coef, float temperature, bool need_entropy) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "grad_rows(Tensor logits, Tensor targets, Tensor lse, Tensor entropy, Tensor g, Tensor h, float temperature, "
      "Tensor(a!) out) -> ()");
  m.def(
      "forward_grad_rows(Tensor logits, Tensor targets, Tensor scored, Tensor old_logprobs, Tensor? ref_logprobs, "
      "Tensor advantages, float clip_low, float clip_high, float dual_clip, float kl_coef, int kl_type, "
      "float entropy_coef, float temperature, bool need_entropy, Tensor row_weights, float grad_scale, "
      "Tensor(a!) out) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "shard_stats(Tensor logits, Tensor targets, Tensor scored, int vocab_start, float temperature, "
      "bool need_entropy) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "shard_grad_rows(Tensor logits, Tensor targets, int vocab_start, Tensor m, Tensor log_s, Tensor entropy, "
      "Tensor g, Tensor h, float temperature, Tensor(a!) out) -> ()");
  m.def("build_info() -> str", &deltal_kernels::build_info);
}

TORCH_LIBRARY_IMPL(deltal_kernels_ext, CPU, m) {
  m.impl("forward_rows", &deltal_kernels::forward_rows);
  m.impl("grad_rows", &deltal_kernels::grad_rows);
  m.impl("forward_grad_rows", &deltal_kernels::forward_grad_rows);
  m.impl("shard_stats", &deltal_kernels::shard_stats);
  m.impl("shard_grad_rows", &deltal_kernels::shard_grad_rows);
}

#ifdef DK_WITH_CUDA
TORCH_LIBRARY_IMPL(deltal_kernels_ext, CUDA, m) {
  m.impl("forward_rows", &deltal_kernels::forward_rows);
  m.impl("grad_rows", &deltal_kernels::grad_rows);
  m.impl("forward_grad_rows", &deltal_kernels::forward_grad_rows);
  m.impl("shard_stats", &deltal_kernels::shard_stats);
  m.impl("shard_grad_rows", &deltal_kernels::shard_grad_rows);
}
#endif

TORCH_LIBRARY_IMPL(deltal_kernels_ext, Meta, m) {
  m.impl("forward_rows", &deltal_kernels::forward_rows_meta);
  m.impl("grad_rows", &deltal_kernels::grad_rows_meta);
  m.impl("forward_grad_rows", &deltal_kernels::forward_grad_rows_meta);
  m.impl("shard_stats", &deltal_kernels::shard_stats_meta);
  m.impl("shard_grad_rows", &deltal_kernels::shard_grad_rows_meta);
}

// A Python module with no functions: importing deltal_kernels._C loads this library, whose static
// initialisers above register the ops with the dispatcher (torch.ops.deltal_kernels_ext.*).
static PyModuleDef dk_module = {PyModuleDef_HEAD_INIT, "_C", "deltal_kernels compiled ops (torch.ops.deltal_kernels_ext)",
                                -1, nullptr, nullptr, nullptr, nullptr, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&dk_module); }
