"""Every backend against the float64 reference (loss, logprobs, entropy, metrics, logits gradient).

The same matrix runs for each backend on the device its kernels use; a backend that cannot run here
skips with the reason dispatch gives (e.g. no CUDA device, extension not built).
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import deltal_kernels as dk

from cases import BACKENDS, assert_matches_reference, backend_device, make_batch, run

# ragged: empty sequences at the start, middle and end, a long one, single-row ones
LENGTHS = [0, 5, 1, 0, 9, 3, 0]
OPTIONS = {
    "default": dict(max_len=16),
    "asymmetric-clip": dict(max_len=16, clip_low=0.1, clip_high=0.28),
    "dual-clip": dict(max_len=16, dual_clip=1.5, ratio_spread=1.5),
    "k1": dict(max_len=16, kl_coef=0.05, kl_type="k1"),
    "k2": dict(max_len=16, kl_coef=0.05, kl_type="k2"),
    "k3": dict(max_len=16, kl_coef=0.05, kl_type="k3"),
    "entropy-bonus": dict(max_len=16, entropy_coef=0.01),
    "with-entropy": dict(max_len=16, with_entropy=True),
    "temperature": dict(max_len=16, temperature=0.7, entropy_coef=0.02, kl_coef=0.1),
    "per-seq-adv": dict(max_len=16, per_seq_adv=True),
    "alpha-0.75": dict(max_len=16, alpha=0.75),
    "token-mean": dict(agg="token-mean"),
    "grpo": dict(agg="grpo"),
    "seq-mean-token-sum": dict(agg="seq-mean-token-sum"),
    "dr-grpo": dict(agg="dr-grpo", max_len=16),
    "no-mask": dict(max_len=16, mask_frac=0.0),
}
BATCH_KEYS = ("per_seq_adv", "ratio_spread", "mask_frac")


def split(options):
    batch_opts = {k: options[k] for k in BATCH_KEYS if k in options}
    return batch_opts, {k: v for k, v in options.items() if k not in BATCH_KEYS}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(OPTIONS))
def test_options_fp32(backend, case):
    device = backend_device(backend)
    batch_opts, loss_opts = split(OPTIONS[case])
    batch = make_batch(LENGTHS, 1000, device=device, seed=1, **batch_opts)
    assert_matches_reference(batch, backend, **loss_opts)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("V", [1000, 32003])
def test_dtypes_and_odd_vocab(backend, dtype, V):
    device = backend_device(backend)
    batch = make_batch([3, 0, 6, 2], V, dtype=dtype, device=device, seed=2)
    assert_matches_reference(batch, backend, max_len=8, kl_coef=0.1, entropy_coef=0.01)


@pytest.mark.parametrize("backend", BACKENDS)
def test_qwen_vocab_bf16(backend):
    device = backend_device(backend)
    batch = make_batch([2, 0, 3], 151936, dtype=torch.bfloat16, device=device, seed=3)
    assert_matches_reference(batch, backend, max_len=8, with_entropy=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_override(backend):
    device = backend_device(backend)
    batch = make_batch(LENGTHS, 1000, device=device, seed=4)
    weights = torch.linspace(0.1, 1.0, len(LENGTHS), device=device)
    assert_matches_reference(batch, backend, weights=weights)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_negative_and_extreme_logits(backend):
    device = backend_device(backend)
    batch = make_batch([4, 3], 1000, device=device, seed=5)
    batch["logits"] = batch["logits"] - 1000.0  # every logit far below 0: lse must not underflow
    assert_matches_reference(batch, backend, max_len=8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_vocabulary_minus_inf_logits(backend):
    device = backend_device(backend)
    batch = make_batch([4, 0, 3], 1000, device=device, seed=10)
    targets = batch["targets"].cpu()
    banned = torch.rand(batch["logits"].shape, generator=torch.Generator().manual_seed(0)) < 0.3
    banned[torch.arange(targets.numel()), targets] = False  # sampled tokens are never banned
    batch["logits"] = batch["logits"].masked_fill(banned.to(device), float("-inf"))
    out, grad = assert_matches_reference(batch, backend, max_len=8, entropy_coef=0.01, kl_coef=0.1)
    assert torch.isfinite(out.entropy).all() and not grad[banned.to(device)].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_scaled_loss_scales_the_gradient(backend):
    device = backend_device(backend)
    batch = make_batch(LENGTHS, 1000, device=device, seed=12)
    _, grad = run(dk.policy_loss, batch, backend=backend, max_len=16, entropy_coef=0.01)
    # e.g. dividing by the number of accumulation steps
    _, scaled = run(dk.policy_loss, batch, loss_scale=0.25, backend=backend, max_len=16, entropy_coef=0.01)
    assert torch.equal(scaled, grad * 0.25)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["all-masked", "all-empty", "no-rows"])
def test_nothing_scored_gives_zero(backend, kind):
    device = backend_device(backend)
    lengths = {"all-masked": [3, 2], "all-empty": [0, 0, 0], "no-rows": []}[kind]
    batch = make_batch(lengths, 1000, device=device, seed=6, mask_frac=1.0 if kind == "all-masked" else 0.0)
    out, grad = run(dk.policy_loss, batch, backend=backend, max_len=8, entropy_coef=0.01, kl_coef=0.1)
    assert out.loss.item() == 0.0
    assert not grad.any()
    assert all(v.item() == 0.0 for v in out.metrics.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_matches(backend):
    device = backend_device(backend)
    batch = make_batch(LENGTHS, 1000, device=device, seed=7)
    _, expected = run(dk.policy_loss, batch, backend=backend, max_len=16, entropy_coef=0.01)
    leaf = batch["logits"].clone().requires_grad_(True)
    logits = leaf * 1.0  # logits as a trainer has them: the output of an op, not a leaf
    storage = logits.data_ptr()
    seen = {}
    logits.register_hook(lambda g: seen.update(ptr=g.data_ptr(), grad=g.clone()))
    rest = {k: v for k, v in batch.items() if k != "logits"}
    out = dk.policy_loss(logits, **rest, backend=backend, max_len=16, entropy_coef=0.01, inplace_backward=True)
    out.loss.backward()
    assert seen["ptr"] == storage  # the gradient was written into the logits' own storage
    assert torch.equal(seen["grad"], expected)
    assert torch.equal(leaf.grad, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    device = backend_device(backend)
    batch = make_batch(LENGTHS, 1000, device=device, seed=8)
    first, g1 = run(dk.policy_loss, batch, backend=backend, max_len=16, entropy_coef=0.01, kl_coef=0.1)
    second, g2 = run(dk.policy_loss, batch, backend=backend, max_len=16, entropy_coef=0.01, kl_coef=0.1)
    assert torch.equal(first.loss, second.loss) and torch.equal(g1, g2)
    assert all(torch.equal(first.metrics[k], second.metrics[k]) for k in first.metrics)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    device = backend_device(backend)
    batch = make_batch(LENGTHS, 1000, device=device, seed=9)
    rest = {k: v for k, v in batch.items() if k != "logits"}

    def loss_fn(logits):
        return dk.policy_loss(logits, **rest, backend=backend, max_len=16, entropy_coef=0.01).loss

    eager = batch["logits"].clone().requires_grad_(True)
    loss_fn(eager).backward()
    compiled = batch["logits"].clone().requires_grad_(True)
    loss = torch.compile(loss_fn, fullgraph=True)(compiled)  # fullgraph: a graph break is an error
    loss.backward()
    # the compiled graph may sum the [N] loss terms in another order: equal to float32 rounding
    torch.testing.assert_close(loss, loss_fn(batch["logits"]))
    torch.testing.assert_close(compiled.grad, eager.grad)


class LargeStorages(TorchDispatchMode):
    """Records the storages of every tensor of at least ``numel`` elements an op returns."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.storages = numel, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() >= self.numel:
                self.storages.add(t.untyped_storage().data_ptr())
        return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inplace", [False, True], ids=["new-gradient", "inplace"])
def test_no_nv_tensor_besides_the_gradient(backend, inplace):
    """SPEC section 4: forward + backward allocate no [N, V] tensor but the gradient (none in place)."""
    device = backend_device(backend)
    batch = make_batch(LENGTHS, 1000, device=device, seed=13)
    logits = batch["logits"].clone().requires_grad_(True) * 1.0  # an intermediate, as in a trainer
    rest = {k: v for k, v in batch.items() if k != "logits"}
    with LargeStorages(logits.numel()) as seen:
        out = dk.policy_loss(logits, **rest, backend=backend, max_len=16, entropy_coef=0.01, kl_coef=0.1,
                             with_entropy=True, inplace_backward=inplace)
        (grad,) = torch.autograd.grad(out.loss, logits)
    new = seen.storages - {logits.untyped_storage().data_ptr()}
    assert new == (set() if inplace else {grad.untyped_storage().data_ptr()})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("objective", [{}, dict(objective="cispo", entropy_coef=0.01)], ids=["ppo", "cispo"])
def test_autocast_leaves_the_given_logits_as_they_are(backend, objective):
    """The loss inside an autocast block (PyTorch's AMP recipe): the logits were made before, in
    whatever dtype; the loss, log-probs and gradient are those of the logits as given, bit for bit."""
    device = backend_device(backend)
    batch = make_batch(LENGTHS, 300, device=device, seed=9)
    _, want_grad = run(dk.policy_loss, batch, backend=backend, max_len=16, **objective)
    want = dk.policy_loss(**batch, backend=backend, max_len=16, **objective)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        out, grad = run(dk.policy_loss, batch, backend=backend, max_len=16, **objective)
        logp, _ = dk.token_logprobs(batch["logits"], batch["targets"], backend=backend)
    assert out.loss.dtype == torch.float32 and torch.equal(out.loss, want.loss)
    assert torch.equal(out.logprobs, want.logprobs) and torch.equal(grad, want_grad)
    assert torch.equal(logp, dk.token_logprobs(batch["logits"], batch["targets"], backend=backend)[0])
