"""Backend choice, the torch.library ops every backend plugs into, and their autograd.

The row contract. A backend is a module with three functions:

``unavailable_reason(device) -> str | None``
    None when the backend can run tensors on ``device``, else why not (shown in errors).

``forward_rows(logits, targets, scored, old_logprobs, ref_logprobs, advantages, params, need_entropy)``
    logits [N, V] contiguous (its own dtype); targets [N] int64; scored [N] bool; old_logprobs,
    ref_logprobs (or None), advantages: [N] in the compute dtype (float32, or float64 for float64
    logits), zero on unscored rows; params: ``validation.LossParams``. Returns, all [N]:
    logp, entropy (0 unless need_entropy), lse (of x/tau), loss (l_t, unweighted), dlogp
    (dl_t/dlogp_t), kl (0 without a KL term) in the compute dtype, and flags (uint8, bit 0:
    clipped, bit 1: dual clip active); every one of them 0 on unscored rows, which do no V work.

``grad_rows(logits, targets, lse, entropy, g, h, temperature, out)``
    Writes dL/dx = (g * (onehot(y) - p) - h * p * (log p + H)) / tau into ``out`` [N, V] (the
    logits' dtype; ``out`` may be ``logits`` itself), with g = dL/dlogp_t and h = dL/dH_t per row;
    rows where both are 0 get exact zeros without reading the logits.

Optionally, ``forward_grad_rows(logits, targets, scored, old_logprobs, ref_logprobs, advantages,
params, need_entropy, row_weights, grad_scale, out)``
    ``forward_rows`` plus, in the same launch, the gradient of grad_scale * sum_t row_weights[t] *
    loss[t] written into ``out``: each row is reduced, then re-read while it is still in cache, which
    saves the backward pass's full read of the logits. Used when the logits require grad and the
    backward is not in place (``rows_forward_fused``).

Optionally, for vocabulary-parallel (tensor-parallel) logits, where a rank holds the columns
[vocab_start, vocab_start + V_r) of every row (``parallel``: the per-row statistics of the shards are
all-gathered and merged in rank order with row_math.h's softmax_merge, then each rank takes the
gradient of its shard), both of:

``shard_stats(logits, targets, scored, vocab_start, temperature, need_entropy) -> (m, s, u, zt)``
    logits [N, V_r] contiguous, one vocabulary shard of each row; targets [N] int64 global ids, any
    value (a target outside the shard is simply not in it: never an error, never read); scored [N]
    bool. Returns, all [N] in the compute dtype: m = max z, s = sum exp(z - m), u = sum exp(z - m)
    (z - m) (0 unless need_entropy) over the shard, and zt = z of the target where the shard holds it,
    else 0; z = x / tau as ``forward_rows`` computes it (rows of huge logits included), so that the
    merge of a row's shards is the unsharded row's statistics up to float32 rounding: lse = m + log s,
    logp = (zt - m) - log s (zt of the shard holding the target), H = log s - u / s. Unscored rows:
    m = -inf, s = u = zt = 0 and no V work. A NaN or +inf logit makes s NaN (the merged row NaN); a
    shard of -inf only is the empty part {-inf, 0, 0}.

``shard_grad_rows(logits, targets, vocab_start, m, log_s, entropy, g, h, temperature, out)``
    Writes ``grad_rows``' dL/dx of the shard's columns into ``out`` [N, V_r] (the logits' dtype; may be
    ``logits`` itself) from the merged row statistics m, log_s = log s and entropy [N] (compute dtype),
    with log p = (z - m) - log s and the one-hot term only where targets[i] == vocab_start + j. Rows
    where g == h == 0 get exact zeros without reading the logits, unless m or log_s is NaN (then NaN,
    as ``grad_rows`` gives for a NaN lse); an unscored row's merged {m, log s} = {-inf, -inf} is not.

The weighted sum to the scalar loss (``weighted_sum``) and the metrics are [N]-sized torch ops on
those outputs, so every backend shares one deterministic reduction.
"""
from __future__ import annotations

import importlib
import weakref
from typing import Optional, Tuple

import torch
from torch import Tensor

from .validation import LossParams

# backend name -> module implementing the row contract
BACKEND_MODULES = {
    "cuda": "deltal_kernels.extension",
    "cpu": "deltal_kernels.extension",
    "triton": "deltal_kernels.triton",
    "torch": "deltal_kernels.torch_backend",
}
# the order "auto" tries them, per device type
AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch", "triton")}
# a compiled backend only serves its own device type
BACKEND_DEVICE = {"cuda": "cuda", "cpu": "cpu"}


def constant_result(fn):
    """torch.compiler.assume_constant_result without its import of torch._dynamo (~2 s at import time):
    the mark it sets, which torch.compile reads when it meets ``fn`` (checked by test_api)."""
    fn._dynamo_marked_constant = True
    return fn


def _load(name: str):
    return importlib.import_module(BACKEND_MODULES[name])


@constant_result
def has_fused_gradient(name: str) -> bool:
    """Whether backend ``name`` can write the gradient in its forward launch."""
    return hasattr(_load(name), "forward_grad_rows")


def weighted_sum(row_weights: Tensor, loss_rows: Tensor) -> Tensor:
    """loss = sum_t w_t l_t: the one fixed-order reduction every path uses (no atomics)."""
    return (row_weights * loss_rows).sum()


def unavailable_reason(name: str, device) -> Optional[str]:
    """None when ``name`` can run tensors on ``device``, else the reason it cannot."""
    device = torch.device(device)
    if name not in BACKEND_MODULES:
        raise ValueError(f"backend: unknown backend {name!r}; expected 'auto' or one of {sorted(BACKEND_MODULES)}")
    want = BACKEND_DEVICE.get(name)
    if want is not None and device.type != want:
        return f"backend {name!r} runs {want} tensors only, these are on {device}"
    try:
        module = _load(name)
    except ImportError as e:
        return f"backend {name!r} is not available: {e}"
    return module.unavailable_reason(device)


def available_backends(device="cpu") -> list:
    """The backends usable for tensors on ``device``, in the order backend="auto" tries them."""
    device = torch.device(device)
    order = AUTO_ORDER.get(device.type, ("torch",))
    return [name for name in order if unavailable_reason(name, device) is None]


@constant_result  # torch.compile runs it once while tracing, not in the graph
def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend to run; asking for one that cannot run here is an error, never a fallback."""
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a string, got {backend!r}")
    if backend == "auto":
        names = available_backends(device)
        if not names:
            raise RuntimeError(f"backend: no backend can run tensors on {device}")
        return names[0]
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise ValueError(f"backend: {reason}")
    return backend


# ---- torch.library ops: opaque to torch.compile, with fake implementations for tracing ----

@torch.library.custom_op("deltal_kernels::rows_forward", mutates_args=())
def rows_forward(backend: str, logits: Tensor, targets: Tensor, scored: Tensor, old_logprobs: Tensor,
                 ref_logprobs: Optional[Tensor], advantages: Tensor, clip_low: float, clip_high: float,
                 dual_clip: float, kl_coef: float, kl_type: int, entropy_coef: float, temperature: float,
                 need_entropy: bool, inplace_backward: bool
                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    params = LossParams(clip_low, clip_high, dual_clip, kl_coef, kl_type, entropy_coef, temperature)
    return tuple(_load(backend).forward_rows(logits, targets, scored, old_logprobs, ref_logprobs, advantages,
                                             params, need_entropy))


@rows_forward.register_fake
def _(backend, logits, targets, scored, old_logprobs, ref_logprobs, advantages, clip_low, clip_high, dual_clip,
      kl_coef, kl_type, entropy_coef, temperature, need_entropy, inplace_backward):
    row = lambda: torch.empty_like(old_logprobs)  # noqa: E731
    return row(), row(), row(), row(), row(), row(), torch.empty_like(scored, dtype=torch.uint8)


@torch.library.custom_op("deltal_kernels::rows_grad", mutates_args=())
def rows_grad(backend: str, logits: Tensor, targets: Tensor, lse: Tensor, entropy: Tensor, g: Tensor,
              h: Tensor, temperature: float) -> Tensor:
    out = torch.empty_like(logits)
    _load(backend).grad_rows(logits, targets, lse, entropy, g, h, temperature, out)
    return out


@rows_grad.register_fake
def _(backend, logits, targets, lse, entropy, g, h, temperature):
    return torch.empty_like(logits)


@torch.library.custom_op("deltal_kernels::rows_grad_", mutates_args=("logits",))
def rows_grad_(backend: str, logits: Tensor, targets: Tensor, lse: Tensor, entropy: Tensor, g: Tensor,
               h: Tensor, temperature: float) -> None:
    _load(backend).grad_rows(logits, targets, lse, entropy, g, h, temperature, logits)


@rows_grad_.register_fake
def _(backend, logits, targets, lse, entropy, g, h, temperature):
    return None


def _setup_context(ctx, inputs, output):
    backend, logits, targets = inputs[0], inputs[1], inputs[2]
    logp, entropy, lse, loss, dlogp, kl, flags = output
    ctx.mark_non_differentiable(logp, entropy, lse, dlogp, kl, flags)
    ctx.set_materialize_grads(False)  # only the loss terms' gradient is used
    ctx.save_for_backward(logits, targets, lse, entropy, dlogp)
    ctx.backend = backend
    ctx.entropy_coef = inputs[12]
    ctx.temperature = inputs[13]
    ctx.inplace = inputs[15]


def _backward(ctx, d_logp, d_entropy, d_lse, d_loss, d_dlogp, d_kl, d_flags):
    if d_loss is None:
        return (None,) * 16
    check_first_order()
    check_logits_kept(ctx)
    logits, targets, lse, entropy, dlogp = ctx.saved_tensors
    grad = _logits_grad(ctx, logits, targets, lse, entropy, d_loss * dlogp, d_loss * -ctx.entropy_coef)
    return (None, grad) + (None,) * 14


def _logits_grad(ctx, logits, targets, lse, entropy, g, h):
    """dL/dlogits from the per-row factors, into the logits' own storage when the op was asked to
    (no [N, V] allocation: their values are gone), else into a new tensor."""
    if ctx.inplace:
        rows_grad_(ctx.backend, logits, targets, lse, entropy, g, h, ctx.temperature)
        ctx.logits_overwritten = True
        return logits
    return rows_grad(ctx.backend, logits, targets, lse, entropy, g, h, ctx.temperature)


torch.library.register_autograd("deltal_kernels::rows_forward", _backward, setup_context=_setup_context)



# ---- per-row statistics only: the objectives computed by an [N]-sized torch step in between ----
#
# logp_t and H_t as differentiable [N] tensors: any objective built from them with torch ops (GSPO's
# sequence ratio, CISPO, rollout correction, separately weighted KL/entropy) gets dL/dlogp_t and
# dL/dH_t from autograd, and the backward turns them into dL/dlogits with the gradient kernel.

@torch.library.custom_op("deltal_kernels::rows_stats", mutates_args=())
def rows_stats(backend: str, logits: Tensor, targets: Tensor, scored: Tensor, temperature: float,
               need_entropy: bool, inplace_backward: bool) -> Tuple[Tensor, Tensor, Tensor]:
    zeros = torch.zeros(scored.shape, dtype=torch.promote_types(logits.dtype, torch.float32), device=logits.device)
    params = LossParams(0.0, 0.0, 0.0, 0.0, 0, 0.0, temperature)  # the loss columns are not used
    logp, entropy, lse, *_ = _load(backend).forward_rows(logits, targets, scored, zeros, None, zeros, params,
                                                         need_entropy)
    return logp, entropy, lse


@rows_stats.register_fake
def _(backend, logits, targets, scored, temperature, need_entropy, inplace_backward):
    row = lambda: torch.empty(scored.shape, dtype=torch.promote_types(logits.dtype, torch.float32),  # noqa: E731
                              device=logits.device)
    return row(), row(), row()


def _stats_setup_context(ctx, inputs, output):
    backend, logits, targets, _, temperature, _, inplace = inputs
    logp, entropy, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(logits, targets, lse, entropy)
    ctx.backend, ctx.temperature, ctx.inplace = backend, temperature, inplace


def _stats_backward(ctx, d_logp, d_entropy, d_lse):
    check_first_order()
    check_logits_kept(ctx)
    logits, targets, lse, entropy = ctx.saved_tensors
    g = d_logp if d_logp is not None else torch.zeros_like(lse)
    h = d_entropy if d_entropy is not None else torch.zeros_like(lse)
    return None, _logits_grad(ctx, logits, targets, lse, entropy, g, h), None, None, None, None, None


torch.library.register_autograd("deltal_kernels::rows_stats", _stats_backward, setup_context=_stats_setup_context)


# ---- the fused path: gradient written by the forward launch, handed to the first backward ----
#
# The forward writes dL/dlogits for a loss scale of 1 into a buffer the op owns. The first backward
# takes that buffer (the op keeps no reference, so what autograd or a user hook does with it later
# cannot affect this graph) and applies the incoming scale d_loss in place, in float32, with no host
# sync: on CUDA the kernel reads d_loss on the device and does nothing when it is 1; on the CPU the
# value is read directly. A later backward through the same graph (retain_graph=True) recomputes the
# gradient from the logits, which the op holds only weakly (keeping them alive would cost the
# [N, V] the fused schedule frees); if they are gone or were modified in place, that is an error.

@torch.library.custom_op("deltal_kernels::rows_forward_fused", mutates_args=())
def rows_forward_fused(backend: str, logits: Tensor, targets: Tensor, scored: Tensor, old_logprobs: Tensor,
                       ref_logprobs: Optional[Tensor], advantages: Tensor, row_weights: Tensor, clip_low: float,
                       clip_high: float, dual_clip: float, kl_coef: float, kl_type: int, entropy_coef: float,
                       temperature: float, need_entropy: bool
                       ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    params = LossParams(clip_low, clip_high, dual_clip, kl_coef, kl_type, entropy_coef, temperature)
    logits = logits.contiguous()  # a strided caller's tensor: this copy lives for the launch only
    grad = torch.empty_like(logits)
    logp, entropy, lse, loss_rows, dlogp, kl, flags = _load(backend).forward_grad_rows(
        logits, targets, scored, old_logprobs, ref_logprobs, advantages, params, need_entropy, row_weights, 1.0, grad)
    return weighted_sum(row_weights, loss_rows), logp, entropy, kl, flags, lse, dlogp, grad


@rows_forward_fused.register_fake
def _(backend, logits, targets, scored, old_logprobs, ref_logprobs, advantages, row_weights, clip_low, clip_high,
      dual_clip, kl_coef, kl_type, entropy_coef, temperature, need_entropy):
    row = lambda: torch.empty_like(old_logprobs)  # noqa: E731
    return (old_logprobs.new_empty(()), row(), row(), row(), torch.empty_like(scored, dtype=torch.uint8), row(),
            row(), torch.empty_like(logits, memory_format=torch.contiguous_format))


def _fused_setup_context(ctx, inputs, output):
    loss, logp, entropy, kl, flags, lse, dlogp, grad = output
    ctx.mark_non_differentiable(logp, entropy, kl, flags, lse, dlogp, grad)
    ctx.set_materialize_grads(False)  # else autograd fills a zero [N, V] "gradient" for the grad output
    backend, logits, targets, row_weights = inputs[0], inputs[1], inputs[2], inputs[7]
    ctx.save_for_backward(targets, lse, entropy, dlogp, row_weights)  # [N]: for a repeated backward only
    ctx.buffer = [grad]  # not saved: the first backward hands it out and forgets it
    ctx.logits = weakref.ref(logits)
    ctx.logits_version = logits._version
    ctx.backend = backend
    ctx.entropy_coef = inputs[13]
    ctx.temperature = inputs[14]


def _fused_backward(ctx, d_loss, *_):
    if d_loss is None:
        return (None,) * 16
    check_first_order()
    if ctx.buffer:
        grad = ctx.buffer.pop()
        scale_(grad, d_loss)
        return (None, grad) + (None,) * 14
    logits = ctx.logits()
    if logits is None or logits._version != ctx.logits_version:
        raise RuntimeError(
            "deltal_kernels: a second backward through this policy loss (retain_graph=True) needs the logits as "
            "they were in the forward (the fused path recomputes the gradient from them): they were "
            + ("freed" if logits is None else "modified in place") + ". Keep a reference to the logits, or call "
            "backward once.")
    targets, lse, entropy, dlogp, row_weights = ctx.saved_tensors
    g = (d_loss * row_weights) * dlogp
    h = (d_loss * row_weights) * -ctx.entropy_coef
    grad = rows_grad(ctx.backend, logits.detach().contiguous(), targets, lse, entropy, g, h, ctx.temperature)
    return (None, grad) + (None,) * 14


torch.library.register_autograd("deltal_kernels::rows_forward_fused", _fused_backward,
                                setup_context=_fused_setup_context)


def scale_(grad: Tensor, scale: Tensor) -> None:
    """grad *= scale in place, in float32 (one rounding to grad's dtype), without a host sync;
    nothing is read or written when scale is 1 (the usual loss.backward())."""
    if grad.numel() == 0:
        return
    if scale.device.type == "cpu":
        if float(scale) != 1.0:  # a CPU tensor: reading it costs nothing
            grad.mul_(scale.to(torch.float32))
        return
    from . import grad_scale  # Triton, imported on first use
    grad_scale.scale_on_device_(grad, scale)


def check_logits_kept(ctx) -> None:
    """A backward after an in-place one finds the gradient where the logits were: say so, not autograd's
    generic "modified by an inplace operation"."""
    if getattr(ctx, "logits_overwritten", False):
        raise RuntimeError(
            "inplace_backward: the first backward through this policy loss wrote the gradient into the logits' "
            "storage, so a second backward (retain_graph=True) has no logits to read. Call backward once, or "
            "pass inplace_backward=False.")


def check_first_order() -> None:
    """The ops' backward is not differentiable: a create_graph=True backward through them is an error."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(
            "deltal_kernels: double backward is not supported: the policy loss's gradient is computed by a "
            "kernel, not by differentiable operations, so backward(create_graph=True) / a Hessian-vector "
            "product through it would be silently wrong. Use deltal_kernels.reference.policy_loss for "
            "second-order derivatives.")
