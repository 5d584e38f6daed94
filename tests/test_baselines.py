"""The benchmark's implementations (deltal_kernels.bench.baselines) against the float64 reference.

These are the very functions ``deltal-bench`` and bench/ time, so a speed-up it reports is a
speed-up of something that computes the right loss and gradient.
"""
from __future__ import annotations

import os

import pytest
import torch

import deltal_kernels as dk
from deltal_kernels import extension
from deltal_kernels.bench import baselines, measure
from deltal_kernels.bench.cases import LOSS_OPTIONS, Batch, Case, make_batch
from deltal_kernels.dispatch import has_fused_gradient

CASE = Case(512, 64, "fp32")


def loss_and_grad(fn, logits, batch):
    x = logits.detach().clone().requires_grad_(True)
    loss = fn(x, batch)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


def to(batch: Batch, device) -> Batch:
    return Batch(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(batch).items()})


def reference(logits, batch):
    """The float64 truth, on the CPU."""
    return loss_and_grad(lambda x, b: dk.reference.policy_loss(x, **b.kwargs()).loss, logits.cpu().double(),
                         to(batch, "cpu"))


def assert_close(got, want, tol):
    loss, grad = got
    ref_loss, ref_grad = want
    torch.testing.assert_close(loss.double().cpu(), ref_loss, rtol=tol, atol=tol * max(1.0, float(ref_loss.abs())))
    torch.testing.assert_close(grad.double().cpu(), ref_grad, rtol=tol, atol=tol * float(ref_grad.abs().max()))


@pytest.fixture(scope="module")
def rollout():
    logits, batch = make_batch(CASE, "cpu", seed=1)
    assert batch.cu_seqlens.numel() > 2 and not batch.loss_mask.all()  # several sequences, prompts unscored
    return logits, batch


def test_the_batch_is_live(rollout):
    """Some ratios fall outside the clip range and the KL term is on, so every branch is timed."""
    logits, batch = rollout
    out = dk.reference.policy_loss(logits.double(), **batch.kwargs())
    assert 0 < float(out.metrics["clipfrac"]) < 1
    assert float(out.metrics["kl"]) > 0
    assert LOSS_OPTIONS["kl_coef"] > 0


def test_eager_is_the_reference(rollout):
    logits, batch = rollout
    assert_close(loss_and_grad(baselines.eager_loss, logits.double(), batch), reference(logits, batch), 1e-12)


@pytest.mark.parametrize("chunk_rows", [7, baselines.CHUNK_ROWS])  # several chunks, and one
def test_chunked_float64(rollout, chunk_rows):
    logits, batch = rollout
    fn = lambda x, b: baselines.chunked_loss(x, b, chunk_rows)  # noqa: E731
    assert_close(loss_and_grad(fn, logits.double(), batch), reference(logits, batch), 1e-10)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2**-7)])
def test_chunked_low_precision(rollout, dtype, tol):
    logits, batch = rollout
    logits = logits.to(dtype)  # the reference sees the same rounded logits
    got = loss_and_grad(lambda x, b: baselines.chunked_loss(x, b, 7), logits, batch)
    assert got[1].dtype == dtype
    assert_close(got, reference(logits, batch), tol)


def test_chunked_logprobs_temperature():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 30, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 30, (10,), generator=gen)
    want = torch.log_softmax(logits / 0.7, -1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(baselines.chunked_logprobs(logits, targets, 0.7, chunk_rows=3), want)


@pytest.mark.slow  # compiles a forward and a backward graph
def test_compiled_reference(rollout):
    logits, batch = rollout
    assert_close(loss_and_grad(baselines.compiled_loss(), logits, batch), reference(logits, batch), 1e-5)


@pytest.mark.parametrize("backend", dk.available_backends("cpu"))
@pytest.mark.parametrize("inplace", [False, True])
def test_backend_wrapper(rollout, backend, inplace):
    """The wrapper hands the batch's options to policy_loss unchanged."""
    logits, batch = rollout
    got = loss_and_grad(baselines.backend_loss(backend, inplace), logits, batch)
    assert_close(got, reference(logits, batch), 1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(baselines.liger_unavailable_reason("cuda") is not None,
                    reason=str(baselines.liger_unavailable_reason("cuda")))
def test_liger_on_one_sequence():
    """Liger sees the packed batch as one sequence; with one sequence whose last row is unscored,
    its loss and gradient are the reference's."""
    logits, batch = make_batch(CASE, "cuda", seed=2)
    N = CASE.N
    mask = batch.loss_mask.clone()
    mask[-1] = False
    one = Batch(targets=batch.targets, old_logprobs=batch.old_logprobs, ref_logprobs=batch.ref_logprobs,
                advantages=batch.advantages[:1], cu_seqlens=torch.tensor([0, N], dtype=torch.int32, device="cuda"),
                loss_mask=mask, max_len=N)
    assert_close(loss_and_grad(baselines.liger_loss, logits, one), reference(logits, one), 1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(extension.clusters_unavailable_reason() is not None,
                    reason=str(extension.clusters_unavailable_reason()))
def test_block_per_row_wrapper(monkeypatch):
    """cuda without clusters: the reference's loss and gradient, and the caller's setting left as it was."""
    monkeypatch.setenv(extension.CLUSTER_SETTING, "16")
    logits, batch = make_batch(CASE, "cuda", seed=3)
    assert_close(loss_and_grad(baselines.block_per_row_loss, logits, batch), reference(logits, batch), 1e-5)
    assert os.environ[extension.CLUSTER_SETTING] == "16"
    assert "cuda block-per-row" in [i.name for i in baselines.implementations("cuda")[0]]


def test_implementations_cover_every_backend():
    impls, skipped = baselines.implementations("cpu")
    names = [i.name for i in impls]
    backends = dk.available_backends("cpu")
    assert names[:len(backends) + 1] == [backends[0], f"{backends[0]} inplace"] + backends[1:]
    assert {"eager", "compile", "chunked"} <= set(names)
    # a backend's schedule is the one policy_loss takes: fused when it can, never in place
    for impl in impls:
        assert impl.fused == (impl.kind == "backend" and not impl.inplace and has_fused_gradient(impl.name))
    assert "liger" in skipped and "liger" not in names  # CUDA only


def test_bytes_formula_matches_spec():
    """SPEC section 4: T=16384, V=151936 bf16 on an H100 at 3.35 TB/s: 2.97 ms for one read and one
    write, 4.46 ms for a forward read, a backward read and a gradient write."""
    two_pass = measure.bytes_moved(16384, 16384, 151936, 2, fused=False)
    fused = measure.bytes_moved(16384, 16384, 151936, 2, fused=True)
    assert two_pass["floor"] / 3.35e12 * 1e3 == pytest.approx(2.97, abs=0.005)
    assert two_pass["fwdbwd"] / 3.35e12 * 1e3 == pytest.approx(4.46, abs=0.005)
    assert fused["fwdbwd"] == fused["floor"] == two_pass["floor"]
    for b in (two_pass, fused):
        assert b["fwd"] + b["bwd"] == b["fwdbwd"]


def test_peak_memory_counts_temporaries():
    """The CPU count sees a [N, V] float32 temporary of a forward+backward, and not the gradient."""
    logits = torch.randn(256, 1000)

    def with_temporary(x, batch):
        return torch.log_softmax(x * 2.0, -1).sum()  # x * 2 and the log-softmax are [N, V] each

    def without(x, batch):
        return x.sum()

    size = logits.numel() * 4
    assert measure.memory_run(without, logits, None, inplace=False)[0] < size / 10
    extra, loss = measure.memory_run(with_temporary, logits, None, inplace=False)
    assert extra >= size
    assert loss == float(with_temporary(logits, None))
