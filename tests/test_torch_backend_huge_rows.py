"""backend="torch": the logits gradient of rows of huge logits against the float64 reference (issue 19).

grad_rows gets the saved lse = m + log s. In float32 a row whose maximum m of x / tau is huge has
lost log s to rounding (lse == m for uniform logits of 1e30), so exp(z - lse) gave p = 1 instead of
1/V. The rows here are uniform: every p is 1/V and logp = -log V whatever the rounding of x / tau, so
the float32 bound of tests/cases.py applies with the logits' magnitude taken from the ordinary rows.
"""
import math

import pytest
import torch

import deltal_kernels as dk
from deltal_kernels import torch_backend

from cases import ROUNDING, SMALLEST, as_float64, largest, make_batch, run

V = 1001  # odd
LENGTHS = [3, 4, 2]  # N = 9
HUGE = {1: 1e30, 2: -1e30, 4: 1e10, 6: 5e6, 7: 1e30}  # row -> the value of all its logits; 7 is masked
MASKED = [5, 7]


def make_case(dtype, seed=60):
    batch = make_batch(LENGTHS, V, seed=seed, mask_frac=0.0)
    for row, value in HUGE.items():
        batch["logits"][row] = value
    batch["logits"] = batch["logits"].to(dtype)
    batch["loss_mask"][MASKED] = False
    return batch


def assert_gradient_matches(grad, want, batch, temperature):
    dtype = batch["logits"].dtype
    ordinary = torch.ones(batch["logits"].shape[0], dtype=torch.bool)
    ordinary[list(HUGE)] = False
    f32 = 1e-5 + 4 * 2.0**-24 * largest(batch["logits"][ordinary].float()) / temperature
    torch.testing.assert_close(grad.double(), want, rtol=ROUNDING[dtype] + f32, atol=SMALLEST[dtype] + f32 * largest(want))
    assert not grad[MASKED].any()
    assert want[[1, 2, 4, 6]].abs().amin() > 0  # the huge rows' gradient is compared, not just zeros


OPTIONS = {
    "ppo-entropy": dict(max_len=8, entropy_coef=0.01, with_entropy=True),
    "cispo": dict(max_len=8, objective="cispo", clip_high=0.28),  # the two-pass schedule
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
@pytest.mark.parametrize("objective", list(OPTIONS))
def test_inplace_backward(dtype, temperature, objective):
    batch = make_case(dtype)
    options = dict(temperature=temperature, **OPTIONS[objective])
    ref_out, want = run(dk.reference.policy_loss, as_float64(batch), **options)
    out, grad = run(dk.policy_loss, batch, backend="torch", inplace_backward=True, **options)
    torch.testing.assert_close(out.logprobs[[1, 2, 4, 6]], torch.full((4,), -math.log(V)), rtol=1e-6, atol=0)
    assert_gradient_matches(grad, want, batch, temperature)


@pytest.mark.parametrize("temperature", [0.7, 1.3])
@pytest.mark.parametrize("objective", list(OPTIONS))
def test_repeated_backward(temperature, objective):
    """A second backward (retain_graph=True) runs grad_rows again from the saved statistics."""
    batch = make_case(torch.float32)
    options = dict(temperature=temperature, **OPTIONS[objective])
    _, want = run(dk.reference.policy_loss, as_float64(batch), **options)
    logits = batch["logits"].clone().requires_grad_(True)
    rest = {k: v for k, v in batch.items() if k != "logits"}
    out = dk.policy_loss(logits, **rest, backend="torch", **options)
    (first,) = torch.autograd.grad(out.loss, logits, retain_graph=True)
    (second,) = torch.autograd.grad(out.loss, logits)
    assert_gradient_matches(first, want, batch, temperature)
    assert torch.equal(first, second)


def test_row_contract_uniform_rows():
    """The plainest statement of the bug, on grad_rows itself: p = 1/V, not 1."""
    x = torch.full((2, V), 1e30)
    x[1] = -1e30
    lse = torch.tensor([1e30, -1e30])  # m + log V, rounded to m
    out = torch.empty_like(x)
    torch_backend.grad_rows(x, torch.tensor([0, 5]), lse, torch.full((2,), math.log(V)), torch.ones(2),
                            torch.zeros(2), 1.0, out)
    want = torch.full((2, V), -1.0 / V, dtype=torch.float64)
    want[0, 0] += 1.0
    want[1, 5] += 1.0
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=0)
