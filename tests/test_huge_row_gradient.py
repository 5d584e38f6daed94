"""The separate gradient kernel (grad_rows) on rows of huge logits, against the float64 reference (issue 19).

grad_rows gets the saved float32 lse = m + log s, which has lost log s once |m| >= 2^24 ln 2: uniform
logits of 1e30 gave p = 1 instead of 1/V, and at a temperature other than 1 the fused x / tau - lse
kept the product's rounding residual (exp overflowed). Such rows are reduced again. Each test goes
through a path that runs grad_rows: the in-place backward, the two-pass objectives (CISPO, GSPO's
sequence ratio), a repeated backward, and the fused LM head's two-pass schedule.

The rows hold logits of one magnitude, or a few maxima far above the rest, so their probabilities
do not depend on the rounding of x / tau, and the float32 bound of tests/cases.py holds with the
logits' magnitude taken from the ordinary rows only (test_adversarial holds huge rows' logp to 1e-6).
"""
import importlib
import math

import pytest
import torch

import deltal_kernels as dk
from deltal_kernels import dispatch

from cases import ROUNDING, SMALLEST, as_float64, backend_device, largest, make_batch, run

BACKENDS = ("cpu", "triton", "cuda")
V = 201  # odd; small for the Triton interpreter
LENGTHS = [4, 0, 6, 3]  # N = 13
TEMPERATURES = [1.0, 0.7, 1.3]
HUGE_ROWS = [1, 2, 3, 4, 5, 6, 7, 8, 10]


def huge_rows(x, temperature, backend):
    """Rows of huge logits written into x [13, V] (float64); the others keep make_batch's logits."""
    x[1] = 1e30
    x[2] = -1e30
    x[3] = 1e10
    x[4, 17] = 1e30  # one huge maximum, the rest much smaller: p is one-hot
    x[5] = -1e29
    x[5, [0, 100, 200]] = 1e30  # three tied maxima: p = 1/3 each (lse = m + log 3 rounds to m)
    # the largest logits only where the backend's statistics are finite (the reference is float64):
    # x / tau in float32, and for Triton x * log2(e) / tau (its log2 units overflow above ~2.36e38 tau)
    x[6] = (2e38 if backend == "triton" else 3e38) if temperature >= 1.0 else -3e37
    x[7] = -1.2e7 * temperature  # z = x / tau just beyond the threshold |z| = 2^24 ln 2 = 1.16e7
    x[8] = 1e30  # masked below
    x[10] = -5e9


def make_case(backend, dtype, temperature, seed=40):
    device = backend_device(backend)
    batch = make_batch(LENGTHS, V, seed=seed, mask_frac=0.0)
    x = batch["logits"]
    huge_rows(x, temperature, backend)
    # targets on the maxima of rows 4 and 5: elsewhere logp is about -1e30, known to float32 rounding
    # only, and so is the PPO ratio exp(logp - old)
    batch["targets"][4], batch["targets"][5] = 17, 100
    x = x.to(dtype)
    batch["logits"] = x
    batch["loss_mask"][[8, 9]] = False
    # old log-probs near the true ones at this temperature, so the PPO ratios of the huge rows are not
    # clipped (a clipped row has g = 0 and would test nothing)
    gen = torch.Generator().manual_seed(seed + 1)
    true = torch.log_softmax(x.double() / temperature, -1).gather(1, batch["targets"][:, None]).squeeze(1)
    batch["old_logprobs"] = (true + (torch.rand(true.shape, generator=gen, dtype=torch.float64) - 0.5) * 0.1).float()
    return {k: v.to(device) for k, v in batch.items()}


def bound(batch, temperature):
    """cases.assert_matches_reference's float32 bound, with the logits' magnitude from the ordinary rows."""
    ordinary = torch.ones(batch["logits"].shape[0], dtype=torch.bool)
    ordinary[HUGE_ROWS] = False
    return 1e-5 + 4 * 2.0**-24 * largest(batch["logits"].cpu()[ordinary].float()) / temperature


def assert_gradient_matches(grad, want, batch, temperature, label):
    dtype = batch["logits"].dtype
    assert grad.dtype == dtype and grad.shape == want.shape
    f32 = bound(batch, temperature)
    torch.testing.assert_close(grad.double().cpu(), want, rtol=ROUNDING[dtype] + f32,
                               atol=SMALLEST[dtype] + f32 * largest(want),
                               msg=lambda m: f"logits gradient ({label}): {m}")
    assert not grad.cpu()[~batch["loss_mask"].cpu()].any()  # masked rows: exact zeros
    # the huge rows' gradient is not 0 (g != 0 there): the test compares something
    assert want[[1, 2, 3, 5]].abs().amax(dim=1).min() > 0


def reference(batch, **options):
    ref_out, ref_grad = run(dk.reference.policy_loss, as_float64(batch), **options)
    return ref_out, ref_grad


def check_logprobs(out, ref_out):
    """logp and H (which the gradient uses) as test_adversarial holds huge rows to them"""
    torch.testing.assert_close(out.logprobs.double().cpu(), ref_out.logprobs, rtol=1e-5, atol=1e-5)
    if out.entropy is not None:
        torch.testing.assert_close(out.entropy.double().cpu(), ref_out.entropy, rtol=1e-5, atol=1e-5)


DTYPES = [torch.float32, torch.bfloat16]
OBJECTIVES = {
    "cispo": dict(objective="cispo", clip_high=0.28),
    "gspo": dict(ratio_level="sequence", entropy_coef=0.01, kl_coef=0.05, with_entropy=True),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_inplace_backward(backend, dtype, temperature):
    batch = make_case(backend, dtype, temperature)
    options = dict(max_len=8, temperature=temperature, entropy_coef=0.01, with_entropy=True)
    ref_out, want = reference(batch, **options)
    out, grad = run(dk.policy_loss, batch, backend=backend, inplace_backward=True, **options)
    check_logprobs(out, ref_out)
    assert_gradient_matches(grad, want, batch, temperature, f"{backend}, in place")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("objective", ["cispo", "gspo"])
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_two_pass_objectives(backend, objective, temperature):
    batch = make_case(backend, torch.float32, temperature)
    options = dict(max_len=8, temperature=temperature, **OBJECTIVES[objective])
    ref_out, want = reference(batch, **options)
    out, grad = run(dk.policy_loss, batch, backend=backend, **options)
    check_logprobs(out, ref_out)
    assert_gradient_matches(grad, want, batch, temperature, f"{backend}, {objective}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_fused_then_repeated_backward(backend, dtype, temperature):
    """The default (fused) schedule's gradient, and a second backward (retain_graph=True), which runs
    grad_rows from the saved statistics."""
    batch = make_case(backend, dtype, temperature)
    options = dict(max_len=8, temperature=temperature, entropy_coef=0.01, kl_coef=0.05, with_entropy=True)
    ref_out, want = reference(batch, **options)
    logits = batch["logits"].clone().requires_grad_(True)
    rest = {k: v for k, v in batch.items() if k != "logits"}
    out = dk.policy_loss(logits, **rest, backend=backend, **options)
    check_logprobs(out, ref_out)
    (first,) = torch.autograd.grad(out.loss, logits, retain_graph=True)
    (second,) = torch.autograd.grad(out.loss, logits)
    assert_gradient_matches(first, want, batch, temperature, f"{backend}, fused")
    assert_gradient_matches(second, want, batch, temperature, f"{backend}, repeated backward")
    assert torch.equal(first, second)  # the fused and the separate gradient: the same bits


# ---- the fused LM head: logits = hidden @ weight.T, huge through the weight ----

H = 8


def make_linear_case(backend, scale, seed=50):
    """hidden and weight of small integers times a power of two: every logit is exact in float32 (any
    summation order), so the reference sees the kernels' logits. Weight rows are one vector, at full or
    half size: each row's logits take two values, the maximum tied over a third or two thirds of V."""
    device = backend_device(backend)
    batch = make_batch(LENGTHS, V, seed=seed, mask_frac=0.0)
    del batch["logits"]
    gen = torch.Generator().manual_seed(seed + 1)
    hidden = torch.randint(-3, 4, (sum(LENGTHS), H), generator=gen).double()
    w0 = torch.randint(-3, 4, (H,), generator=gen).double()
    factor = torch.where(torch.arange(V) % 3 == 0, 1.0, 0.5).double()
    weight = factor[:, None] * w0[None, :] * scale
    batch["loss_mask"][[3, 7]] = False
    # targets among each row's maxima (elsewhere logp is huge and known to float32 rounding only)
    positive = (hidden @ w0) > 0
    batch["targets"] = 3 * (batch["targets"] // 3) + torch.where(positive, 0, 1)
    logits = hidden @ weight.T
    true = torch.log_softmax(logits, -1).gather(1, batch["targets"][:, None]).squeeze(1)
    batch["old_logprobs"] = (true + (torch.rand(true.shape, generator=gen, dtype=torch.float64) - 0.5) * 0.1).float()
    return ({k: v.to(device) for k, v in batch.items()},
            hidden.float().to(device), weight.float().to(device), logits)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("objective", ["cispo", "gspo"])
@pytest.mark.parametrize("scale, temperature", [(2.0**96, 1.0), (2.0**30, 0.7)])
def test_linear_two_pass_with_huge_logits(backend, objective, scale, temperature):
    batch, hidden, weight, logits = make_linear_case(backend, scale)
    assert largest(logits) > 1e7
    options = dict(max_len=8, temperature=temperature, **OBJECTIVES[objective])
    x = logits.clone().requires_grad_(True)
    ref_out = dk.reference.policy_loss(x, **as_float64(batch), **options)
    (dlogits,) = torch.autograd.grad(ref_out.loss, x)
    want = {"hidden": dlogits @ weight.double().cpu(), "weight": dlogits.T @ hidden.double().cpu()}
    leaves = {"hidden": hidden.clone().requires_grad_(True), "weight": weight.clone().requires_grad_(True)}
    out = dk.linear_policy_loss(leaves["hidden"], leaves["weight"], **batch, backend=backend, chunk_rows=4,
                                **options)
    check_logprobs(out, ref_out)
    grads = dict(zip(leaves, torch.autograd.grad(out.loss, list(leaves.values()))))
    assert largest(want["hidden"]) > 0
    # tests/test_linear.py's bound with the float32 term of the ordinary logits: dL/dlogits to float32
    # rounding, then float32 sums over V (hidden) or N (weight) terms, against the sum of |terms|
    bounds = {"hidden": dlogits.abs() @ weight.double().cpu().abs(), "weight": dlogits.abs().T @ hidden.double().cpu().abs()}
    K = {"hidden": V, "weight": hidden.shape[0]}
    for name, w in want.items():
        err = (grads[name].double().cpu() - w).abs()
        tol = (3 * ROUNDING[torch.float32] + 1e-5 + K[name] * 2.0**-24) * bounds[name]
        assert bool((err <= tol).all()), f"grad {name} ({backend}, {objective}): |err| {float(err.max()):.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_contract_uniform_rows(backend):
    """The plainest statement of the bug, on the backend's grad_rows itself: p = 1/V, not 1."""
    device = backend_device(backend)
    module = importlib.import_module(dispatch.BACKEND_MODULES[backend])
    x = torch.full((2, V), 1e30, device=device)
    x[1] = -1e30
    lse = torch.tensor([1e30, -1e30], device=device)  # m + log V, rounded to m
    out = torch.empty_like(x)
    module.grad_rows(x, torch.tensor([0, 5], device=device), lse, torch.full((2,), math.log(V), device=device),
                     torch.ones(2, device=device), torch.zeros(2, device=device), 1.0, out)
    want = torch.full((2, V), -1.0 / V, dtype=torch.float64)
    want[0, 0] += 1.0
    want[1, 5] += 1.0
    torch.testing.assert_close(out.double().cpu(), want, rtol=1e-5, atol=0)
