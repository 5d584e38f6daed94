"""A scaled loss ((loss * s).backward(): gradient accumulation, a trainer's loss scale, a GradScaler)
costs nothing extra, a repeated backward (retain_graph=True) stays right, and what autograd or a user
does with the handed-out gradient cannot corrupt the graph; second-order requests are an error."""
import pytest
import torch

import deltal_kernels as dk

from cases import BACKENDS, backend_device, make_batch, run
from test_backends import LENGTHS, LargeStorages

OPTIONS = dict(max_len=16, entropy_coef=0.01, kl_coef=0.1)


def batch_and_rest(backend, seed):
    batch = make_batch(LENGTHS, 1000, device=backend_device(backend), seed=seed)
    return batch, {k: v for k, v in batch.items() if k != "logits"}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_scale_is_applied_in_float32(backend, dtype):
    """bf16(1/3) = 0.33398 would bias every gradient element by +0.19%: the scale must stay float32
    until the gradient is rounded, leaving only unbiased rounding (far below 0.19% on average)."""
    batch, _ = batch_and_rest(backend, 41)
    batch["logits"] = batch["logits"].to(dtype)
    f64 = {k: (v.double() if v.is_floating_point() else v).cpu() for k, v in batch.items()}
    _, want = run(dk.reference.policy_loss, f64, loss_scale=1 / 3, **OPTIONS)
    _, scaled = run(dk.policy_loss, batch, loss_scale=1 / 3, backend=backend, **OPTIONS)
    bias = float((scaled.double().cpu() * want.sign()).sum() / want.abs().sum()) - 1.0
    assert abs(bias) < 2e-4, f"mean relative bias of the scaled gradient: {bias:.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_scaled_loss_allocates_no_second_gradient(backend):
    batch, rest = batch_and_rest(backend, 42)
    logits = batch["logits"].clone().requires_grad_(True) * 1.0  # an intermediate, as in a trainer
    with LargeStorages(logits.numel()) as seen:
        out = dk.policy_loss(logits, **rest, backend=backend, **OPTIONS)
        (grad,) = torch.autograd.grad(out.loss * 0.25, logits)
    assert seen.storages - {logits.untyped_storage().data_ptr()} == {grad.untyped_storage().data_ptr()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_retain_graph_second_backward(backend):
    batch, rest = batch_and_rest(backend, 43)
    _, want = run(dk.policy_loss, batch, backend=backend, **OPTIONS)
    logits = batch["logits"].clone().requires_grad_(True)
    loss = dk.policy_loss(logits, **rest, backend=backend, **OPTIONS).loss
    (first,) = torch.autograd.grad(loss * 0.5, logits, retain_graph=True)
    (second,) = torch.autograd.grad(loss * 0.25, logits, retain_graph=True)
    (third,) = torch.autograd.grad(loss, logits)
    assert torch.equal(first, want * 0.5) and torch.equal(second, want * 0.25) and torch.equal(third, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_hook_that_scales_the_gradient_in_place_does_not_touch_the_graph(backend):
    batch, rest = batch_and_rest(backend, 44)
    _, want = run(dk.policy_loss, batch, backend=backend, **OPTIONS)
    leaf = batch["logits"].clone().requires_grad_(True)
    logits = leaf * 1.0
    logits.register_hook(lambda g: g.mul_(4.0))
    loss = dk.policy_loss(logits, **rest, backend=backend, **OPTIONS).loss
    loss.backward(retain_graph=True)
    loss.backward()
    assert torch.equal(leaf.grad, want * 8.0)  # two backward passes, each scaled by the hook


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_backward_after_the_logits_were_freed_is_a_clear_error(backend):
    batch, rest = batch_and_rest(backend, 45)
    leaf = batch["logits"].clone().requires_grad_(True)
    logits = leaf * 1.0
    loss = dk.policy_loss(logits, **rest, backend=backend, **OPTIONS).loss
    del logits
    loss.backward(retain_graph=True)
    if backend in ("cpu", "cuda", "triton"):  # the fused path recomputes from the logits it holds weakly
        with pytest.raises(RuntimeError, match="retain_graph"):
            loss.backward()
    else:  # the two-pass path saved them
        loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inplace", [False, True], ids=["new-gradient", "inplace"])
def test_double_backward_is_an_error(backend, inplace):
    batch, rest = batch_and_rest(backend, 46)
    logits = batch["logits"].clone().requires_grad_(True) * 1.0
    loss = dk.policy_loss(logits, **rest, backend=backend, inplace_backward=inplace, **OPTIONS).loss
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, logits, create_graph=True)


INTERPRETER_BF16 = ("Triton's interpreter converts float32 -> bfloat16 by truncation (a GPU rounds to nearest); "
                    "bfloat16 is checked on a GPU")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason=INTERPRETER_BF16))], ids=str)
def test_device_scale_kernel(dtype):
    """The kernel the fused path runs on a GPU (here under Triton's interpreter): one float32
    multiply and one rounding per element; a scale of 1 leaves every bit as it was."""
    pytest.importorskip("triton", reason="the device scale kernel is Triton")
    from deltal_kernels import grad_scale

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and "triton" not in dk.available_backends("cpu"):
        pytest.skip("Triton's interpreter is off (TRITON_INTERPRET=1 not set before import)")
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(3 * grad_scale.BLOCK + 17, generator=gen) * 100).to(dtype).to(device)
    x[5] = float("nan")
    scale = torch.tensor(1 / 3, device=device)
    got = x.clone()
    grad_scale.scale_on_device_(got, scale)
    want = (x.float() * scale).to(dtype)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())
    same = x.clone()
    grad_scale.scale_on_device_(same, torch.tensor(1.0, device=device))
    assert torch.equal(same.view(torch.int8), x.view(torch.int8))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("objective", [{}, dict(objective="cispo")], ids=["ppo", "cispo"])
def test_second_backward_through_strided_logits(backend, objective):
    """Logits sliced to the real vocabulary of a padded head (logits[..., :V]) are strided: the op makes
    its own contiguous copy, and a repeated backward must still find what the caller holds."""
    batch, rest = batch_and_rest(backend, 47)
    _, want = run(dk.policy_loss, batch, backend=backend, **OPTIONS, **objective)
    padded = torch.nn.functional.pad(batch["logits"], (0, 24)).requires_grad_(True)  # a head padded to 1024
    logits = padded[:, :1000]
    assert not logits.is_contiguous()
    loss = dk.policy_loss(logits, **rest, backend=backend, **OPTIONS, **objective).loss
    loss.backward(retain_graph=True)
    first = padded.grad.clone()
    loss.backward()
    assert torch.equal(first[:, :1000], want) and not first[:, 1000:].any()
    assert torch.equal(padded.grad, first * 2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("objective", [{}, dict(objective="cispo")], ids=["ppo", "cispo"])
def test_second_backward_after_an_inplace_one_is_a_clear_error(backend, objective):
    batch, rest = batch_and_rest(backend, 48)
    logits = batch["logits"].clone().requires_grad_(True) * 1.0
    loss = dk.policy_loss(logits, **rest, backend=backend, inplace_backward=True, **OPTIONS, **objective).loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace_backward: the first backward .* wrote the gradient into the "
                                           "logits' storage.*pass inplace_backward=False"):
        loss.backward()
