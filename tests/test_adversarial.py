"""Adversarial values: every backend against the float64 reference on NaN, +/-inf, huge and shifted
logits and NaN/-inf log-probs (issue 15). The reference is the truth: NaN must appear exactly where
it has NaN (a divergence is never hidden in a finite loss or a zero gradient), and every finite value
is held to the bound of ``cases.assert_matches_reference``.
"""
import math

import pytest
import torch

import deltal_kernels as dk

from cases import BACKENDS, assert_matches_reference, backend_device, make_batch, run

V = 200  # > one 16-element packet, so a whole NaN packet can be tested; small for the Triton interpreter
LENGTHS = [3, 0, 4]
OPTIONS = {
    "plain": dict(max_len=8),
    "kl-entropy": dict(max_len=8, kl_coef=0.1, entropy_coef=0.01),
}


def nan_logit(b):
    b["logits"][0, 7] = float("nan")


def nan_packet(b):  # 32 aligned NaN logits: a packet-wise max that drops NaN would skip all of them
    b["logits"][1, 32:64] = float("nan")


def all_nan_row(b):
    b["logits"][2] = float("nan")


def plus_inf_logit(b):
    b["logits"][0, 11] = float("inf")


def minus_inf_row(b):
    b["logits"][3] = float("-inf")


def nan_in_unscored_row(b):  # row 4 is masked: nothing may leak from it
    b["loss_mask"][4] = False
    b["logits"][4] = float("nan")


def nan_old_logprob(b):
    b["old_logprobs"][5] = float("nan")


def nan_ref_logprob(b):
    b["ref_logprobs"][6] = float("nan")


def minus_inf_ref_logprob(b):
    b["ref_logprobs"][1] = float("-inf")


CORRUPTIONS = [nan_logit, nan_packet, all_nan_row, plus_inf_logit, minus_inf_row, nan_in_unscored_row,
               nan_old_logprob, nan_ref_logprob, minus_inf_ref_logprob]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__)
def test_non_finite_inputs_agree_with_reference(backend, options, corrupt):
    device = backend_device(backend)
    batch = make_batch(LENGTHS, V, device=device, seed=21, mask_frac=0.0)
    corrupt(batch)
    assert_matches_reference(batch, backend, equal_nan=True, **OPTIONS[options])


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_ref_logprobs_without_kl_term_give_a_finite_loss(backend):
    """kl_coef=0: the KL estimate is only a metric, so a NaN/-inf ref log-prob reaches no loss (0 * NaN)."""
    device = backend_device(backend)
    batch = make_batch(LENGTHS, V, device=device, seed=22, mask_frac=0.0)
    batch["ref_logprobs"][0] = float("nan")
    batch["ref_logprobs"][2] = float("-inf")
    out, grad = assert_matches_reference(batch, backend, equal_nan=True, max_len=8, kl_coef=0.0)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_logit_row_gradient_is_nan_without_entropy_or_kl(backend):
    """The case that hid a divergence: g = dL/dlogp is 0 on a NaN row, yet its gradient must be NaN."""
    device = backend_device(backend)
    batch = make_batch(LENGTHS, V, device=device, seed=23, mask_frac=0.0)
    batch["logits"][0, 3] = float("nan")
    out, grad = run(dk.policy_loss, batch, backend=backend, max_len=8)
    assert torch.isnan(out.loss)
    assert torch.isnan(grad[0]).all() and torch.isfinite(grad[1:]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("magnitude, temperature", [(1e30, 1.0), (1e30, 0.7), (1e10, 0.7), (3e7, 1.3)])
def test_uniform_huge_logits_keep_log_v(backend, dtype, magnitude, temperature):
    """lse = m + log V rounds to m when |m| is huge; logp must still be -log V. At a temperature
    other than 1 the product x / tau is rounded: an offset formed as one FMA (exact product minus
    the rounded maximum) is that rounding's residual, >= 1 here, so such rows are redone with
    rounded products (the CPU kernels gave -inf at 1e10 and tau 0.7)."""
    device = backend_device(backend)
    batch = make_batch([2, 1], V, dtype=dtype, device=device, seed=24, mask_frac=0.0)
    batch["logits"] = torch.full_like(batch["logits"], magnitude)
    out, _ = run(dk.policy_loss, batch, backend=backend, max_len=4, with_entropy=True, temperature=temperature)
    torch.testing.assert_close(out.logprobs.cpu(), torch.full((3,), -math.log(V)), rtol=1e-6, atol=0)
    torch.testing.assert_close(out.entropy.cpu(), torch.full((3,), math.log(V)), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_nan_first_in_a_row_of_huge_logits(backend, temperature):
    """A NaN before the row's first finite value still makes the row NaN on the huge-row path (the
    CPU's second pass dropped it when a later value raised the maximum from -inf)."""
    device = backend_device(backend)
    batch = make_batch([2, 1], V, device=device, seed=27, mask_frac=0.0)
    batch["logits"][1] = 1e30
    batch["logits"][1, 0] = float("nan")
    out, grad = run(dk.policy_loss, batch, backend=backend, max_len=4, with_entropy=True, temperature=temperature)
    assert torch.isnan(out.logprobs[1]) and torch.isnan(out.entropy[1]) and torch.isnan(grad[1]).all()
    assert torch.isfinite(out.logprobs[[0, 2]]).all() and torch.isfinite(grad[[0, 2]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shift", [1e2, 1e3, 1e4])
def test_shifted_logits(backend, shift):
    """Adding a constant to every logit changes nothing but the inputs' own rounding."""
    device = backend_device(backend)
    batch = make_batch(LENGTHS, V, device=device, seed=25, mask_frac=0.0)
    batch["logits"] = batch["logits"] + shift
    assert_matches_reference(batch, backend, max_len=8, with_entropy=True, entropy_coef=0.01)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_logits_near_the_largest_half(backend):
    device = backend_device(backend)
    batch = make_batch(LENGTHS, V, device=device, seed=26, mask_frac=0.0)
    batch["logits"] = (65504.0 - batch["logits"].abs() * 16).to(torch.float16)
    out, _ = assert_matches_reference(batch, backend, max_len=8, with_entropy=True)
    assert (out.entropy < math.log(V)).all()  # an entropy is at most log V


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_at_temperature_to_float32_rounding(backend):
    """At temperature 0.7 with ordinary logits the entropy is exact to float32 rounding (a few ulp),
    far inside the general bound, which grows with the logits' magnitude."""
    device = backend_device(backend)
    batch = make_batch(LENGTHS, 1000, device=device, seed=27, mask_frac=0.0)
    out, _ = run(dk.policy_loss, batch, backend=backend, max_len=8, with_entropy=True, temperature=0.7)
    ref, _ = run(dk.reference.policy_loss, {k: (v.double() if v.is_floating_point() else v).cpu()
                                            for k, v in batch.items()}, max_len=8, with_entropy=True, temperature=0.7)
    torch.testing.assert_close(out.entropy.double().cpu(), ref.entropy, rtol=2e-6, atol=0)
