"""Ragged packed batches for the tests, and the comparison of a backend with the float64 reference.

Batches are built so every branch of SPEC section 1 is live: old log-probs sit near the true ones so
ratios fall on both sides of the clip range, advantages have mixed signs, some sequences are
empty, some rows are masked.
"""
from __future__ import annotations

import importlib.util
import os

import torch

import deltal_kernels as dk

# backend -> device type its kernels run on (triton runs on the CPU under TRITON_INTERPRET=1)
BACKENDS = ("torch", "triton", "cpu", "cuda")

# relative rounding of a value stored in the dtype (half an ulp), and its subnormal spacing
ROUNDING = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float64: 2.0**-53}
SMALLEST = {torch.float32: 2.0**-149, torch.bfloat16: 2.0**-133, torch.float16: 2.0**-24, torch.float64: 0.0}


def device_for(backend: str) -> str:
    if backend == "cuda":
        return "cuda"
    if backend == "triton":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cpu"


def backend_device(backend: str) -> str:
    """The device the backend's kernels run on here; skips the test, with dispatch's reason, when it cannot."""
    import pytest

    from deltal_kernels.dispatch import unavailable_reason

    device = device_for(backend)
    reason = unavailable_reason(backend, device)
    if reason is not None:
        pytest.skip(reason)
    return device


def make_batch(lengths, V, *, dtype=torch.float32, device="cpu", seed=0, mask_frac=0.25, per_seq_adv=False,
               logit_scale=3.0, ratio_spread=0.5):
    """A packed batch as a dict of policy_loss's tensor arguments."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    S, N = lengths.numel(), int(lengths.sum())
    cu_seqlens = dk.packing.cu_seqlens_from_lengths(lengths).to(torch.int32)
    logits = (torch.randn(N, V, generator=gen, dtype=torch.float64) * logit_scale).to(dtype)
    targets = torch.randint(0, V, (N,), generator=gen)
    # make about half the targets likely tokens, as a trained policy's samples are
    likely = torch.rand(N, generator=gen) < 0.5
    targets = torch.where(likely, logits.double().argmax(-1), targets)
    true_logp = torch.log_softmax(logits.double(), -1).gather(1, targets[:, None]).squeeze(1)
    old = true_logp + (torch.rand(N, generator=gen, dtype=torch.float64) * 2 - 1) * ratio_spread
    ref = true_logp + torch.randn(N, generator=gen, dtype=torch.float64) * 0.5
    adv = torch.randn(S if per_seq_adv else N, generator=gen, dtype=torch.float64)
    mask = torch.rand(N, generator=gen) >= mask_frac
    batch = dict(logits=logits, targets=targets, old_logprobs=old.float(), advantages=adv.float(),
                 cu_seqlens=cu_seqlens, loss_mask=mask, ref_logprobs=ref.float())
    return {k: v.to(device) for k, v in batch.items()}


def as_float64(batch):
    return {k: (v.double() if v.is_floating_point() else v).cpu() for k, v in batch.items()}


def run(fn, batch, loss_scale=None, **options):
    """Call a policy_loss with the batch; returns (output, gradient of loss * loss_scale w.r.t. logits)."""
    logits = batch["logits"].detach().clone().requires_grad_(True)
    args = {k: v for k, v in batch.items() if k != "logits"}
    out = fn(logits, args.pop("targets"), args.pop("old_logprobs"), args.pop("advantages"),
             args.pop("cu_seqlens"), **args, **options)
    loss = out.loss if loss_scale is None else out.loss * loss_scale
    (grad,) = torch.autograd.grad(loss, logits, allow_unused=True)
    return out, (torch.zeros_like(logits) if grad is None else grad)


def largest(x) -> float:
    """The largest magnitude among x's finite values (0 when there is none)."""
    x = x.detach()[x.detach().isfinite()]
    return float(x.abs().max()) if x.numel() else 0.0


def assert_outputs_close(out, ref_out, f32, label, equal_nan=False):
    """A PolicyLossOutput's loss, logprobs, entropy and metrics against the float64 reference's, each
    within the float32 bound f32 (relative, and absolute scaled by the quantity's size)."""
    def close(name, got, want, scale):
        torch.testing.assert_close(got.detach().double().cpu(), want.detach(), rtol=f32, atol=f32 * scale,
                                   equal_nan=equal_nan, msg=lambda m: f"{name} ({label}): {m}")

    lp_scale = max(1.0, largest(ref_out.logprobs))
    close("loss", out.loss.detach(), ref_out.loss, max(1.0, largest(ref_out.loss)))
    close("logprobs", out.logprobs, ref_out.logprobs, lp_scale)
    assert (out.entropy is None) == (ref_out.entropy is None)
    if out.entropy is not None:
        close("entropy", out.entropy, ref_out.entropy, lp_scale)
    assert out.metrics.keys() == ref_out.metrics.keys()
    for name, value in ref_out.metrics.items():
        close(f"metric {name}", out.metrics[name], value, lp_scale)


def assert_matches_reference(batch, backend, equal_nan=False, **options):
    """The backend's loss, logprobs, entropy, metrics and logits gradient against the float64 reference.

    Everything the kernels compute is float32, so scalars and per-row values are held to a float32
    bound; the gradient is stored in the logits' dtype, so it may differ by that dtype's rounding.
    A float32 lse of logits of magnitude |z| carries an absolute error of a few ulp(|z|), which is a
    relative error of the probabilities: that term of the bound follows the batch's logits.
    equal_nan: NaN must appear exactly where the reference has NaN (non-finite inputs), the rest is held
    to the same bound.
    """
    dtype = batch["logits"].dtype
    ref_options = {k: (v.double().cpu() if isinstance(v, torch.Tensor) else v) for k, v in options.items()}
    ref_out, ref_grad = run(dk.reference.policy_loss, as_float64(batch), **ref_options)
    out, grad = run(dk.policy_loss, batch, backend=backend, **options)
    assert grad.dtype == dtype and grad.shape == batch["logits"].shape
    assert out.logprobs.dtype == torch.float32 and out.loss.dtype == torch.float32

    finite = batch["logits"][batch["logits"].isfinite()]
    zmax = float(finite.abs().max()) / options.get("temperature", 1.0) if finite.numel() else 0.0
    f32 = 1e-5 + 4 * 2.0**-24 * zmax

    assert_outputs_close(out, ref_out, f32, f"{backend}, {dtype}", equal_nan=equal_nan)
    gmax = largest(ref_grad)
    torch.testing.assert_close(grad.double().cpu(), ref_grad, rtol=ROUNDING[dtype] + f32,
                               atol=SMALLEST[dtype] + f32 * gmax, equal_nan=equal_nan,
                               msg=lambda m: f"logits gradient ({backend}, {dtype}): {m}")
    # rows that are not scored get exact zeros
    unscored = ~batch["loss_mask"].cpu() if batch.get("loss_mask") is not None else None
    if unscored is not None and unscored.any():
        assert not grad.cpu()[unscored].any()
    return out, grad


def load_example(name: str):
    """examples/<name>.py imported as a module (the examples are scripts, not a package)."""
    path = os.path.join(os.path.dirname(__file__), os.pardir, "examples", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
