"""dk.token_logprobs and dk.linear_token_logprobs: forward-only log-probs and entropy, batch-invariant."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import deltal_kernels as dk

from cases import BACKENDS, backend_device

V, H = 301, 24


def data(N, *, seed=0, dtype=torch.float32, device="cpu", v=V, h=H):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64) * (2.0 / h**0.5)
    bias = torch.randn(v, generator=gen, dtype=torch.float64) * 0.5
    targets = torch.randint(0, v, (N,), generator=gen)
    mask = torch.rand(N, generator=gen) >= 0.25
    out = dict(hidden=hidden.to(dtype), weight=weight.to(dtype), bias=bias.to(dtype), targets=targets, mask=mask)
    return {k: t.to(device) for k, t in out.items()}


def reference(logits, targets, temperature, mask):
    """float64 log_softmax and entropy of the given logits; 0 outside the mask."""
    logp_all = torch.log_softmax(logits.double().cpu() / temperature, -1)
    logp = logp_all.gather(1, targets.cpu()[:, None]).squeeze(1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    keep = mask.cpu() if mask is not None else torch.ones_like(logp, dtype=torch.bool)
    return torch.where(keep, logp, 0.0), torch.where(keep, entropy, 0.0)


def close(got, want, zmax):
    # float32 row arithmetic on the same logits: the float32 bound of tests/cases.py
    f32 = 1e-5 + 4 * 2.0**-24 * zmax
    torch.testing.assert_close(got.double().cpu(), want, rtol=f32, atol=f32 * max(1.0, float(want.abs().max())))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("masked", [False, True], ids=["all-rows", "masked"])
def test_token_logprobs_matches_float64(backend, dtype, temperature, masked):
    device = backend_device(backend)
    d = data(19, seed=1, dtype=dtype, device=device)
    logits = torch.nn.functional.linear(d["hidden"], d["weight"], d["bias"])
    mask = d["mask"] if masked else None
    want_lp, want_ent = reference(logits, d["targets"], temperature, mask)
    zmax = float(logits.abs().max()) / temperature
    lp, ent = dk.token_logprobs(logits, d["targets"], temperature=temperature, with_entropy=True, loss_mask=mask,
                                backend=backend)
    assert lp.dtype == torch.float32 and lp.shape == (19,) and not lp.requires_grad
    close(lp, want_lp, zmax)
    close(ent, want_ent, zmax)
    # the linear form on the same product (torch's matmul in the input dtype, as nn.Linear)
    llp, lent = dk.linear_token_logprobs(d["hidden"], d["weight"], d["targets"], bias=d["bias"],
                                         temperature=temperature, with_entropy=True, loss_mask=mask,
                                         backend=backend, chunk_rows=8)
    close(llp, want_lp, zmax)
    close(lent, want_ent, zmax)
    lp_only, none = dk.linear_token_logprobs(d["hidden"], d["weight"], d["targets"], bias=d["bias"],
                                             temperature=temperature, loss_mask=mask, backend=backend, chunk_rows=8)
    assert none is None and torch.equal(lp_only, llp)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_token_logprobs_under_autocast_are_the_autocast_heads(backend):
    """Inside an autocast block the head runs in bfloat16, as F.linear would there: the log-probs are
    those of the bfloat16 logits (masked rows included), not a crash or the float32 head's."""
    device = backend_device(backend)
    d = data(19, seed=3, device=device)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        logits = torch.nn.functional.linear(d["hidden"], d["weight"], d["bias"])
        lp, ent = dk.linear_token_logprobs(d["hidden"], d["weight"], d["targets"], bias=d["bias"], with_entropy=True,
                                           loss_mask=d["mask"], backend=backend, chunk_rows=8)
    assert logits.dtype == torch.bfloat16
    want_lp, want_ent = reference(logits, d["targets"], 1.0, d["mask"])
    zmax = float(logits.abs().max())
    close(lp, want_lp, zmax)
    close(ent, want_ent, zmax)


def test_float64_on_torch_backend_and_gradless():
    d = data(9, seed=2, dtype=torch.float64)
    hidden = d["hidden"].clone().requires_grad_(True)
    lp, ent = dk.linear_token_logprobs(hidden, d["weight"], d["targets"], bias=d["bias"], with_entropy=True,
                                       backend="torch")
    want_lp, want_ent = reference(torch.nn.functional.linear(d["hidden"], d["weight"], d["bias"]), d["targets"], 1.0,
                                  None)
    assert lp.dtype == torch.float64 and not lp.requires_grad
    torch.testing.assert_close(lp, want_lp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ent, want_ent, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_batch_invariance(backend, dtype):
    """The same row gives the same bits alone, in a batch, at another position, or with other rows masked."""
    device = backend_device(backend)
    d = data(23, seed=3, dtype=dtype, device=device)
    args = dict(with_entropy=True, backend=backend)
    lin = dict(bias=d["bias"], chunk_rows=8, **args)
    full_lp, full_ent = dk.linear_token_logprobs(d["hidden"], d["weight"], d["targets"], **lin)
    logits = torch.nn.functional.linear(d["hidden"], d["weight"], d["bias"])
    tok_lp, tok_ent = dk.token_logprobs(logits, d["targets"], **args)
    perm = torch.randperm(23, generator=torch.Generator().manual_seed(0)).to(device)
    for rows in ([5], [22], list(range(7, 19)), perm.tolist()):  # alone, a slice, shuffled
        idx = torch.tensor(rows, device=device)
        lp, ent = dk.linear_token_logprobs(d["hidden"][idx], d["weight"], d["targets"][idx], **lin)
        assert torch.equal(lp, full_lp[idx]) and torch.equal(ent, full_ent[idx]), rows
        lp, ent = dk.token_logprobs(logits[idx], d["targets"][idx], **args)
        assert torch.equal(lp, tok_lp[idx]) and torch.equal(ent, tok_ent[idx]), rows
    # micro-batches of the split batch give the bits of the whole
    halves = [dk.linear_token_logprobs(d["hidden"][s], d["weight"], d["targets"][s], **lin)[0]
              for s in (slice(0, 11), slice(11, 23))]
    assert torch.equal(torch.cat(halves), full_lp)
    # masking other rows does not change a kept row
    mask = d["mask"]
    lp, _ = dk.linear_token_logprobs(d["hidden"], d["weight"], d["targets"], loss_mask=mask, **lin)
    assert torch.equal(lp[mask], full_lp[mask]) and not lp[~mask].any()
    # the default fixed shape too (one padded chunk here)
    default_full, _ = dk.linear_token_logprobs(d["hidden"], d["weight"], d["targets"], bias=d["bias"], backend=backend)
    alone, _ = dk.linear_token_logprobs(d["hidden"][3:4], d["weight"], d["targets"][3:4], bias=d["bias"],
                                        backend=backend)
    assert torch.equal(alone, default_full[3:4])


class LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_linear_token_logprobs_allocates_no_nv_tensor():
    d = data(200, seed=4)
    with LargestTensor() as seen:
        dk.linear_token_logprobs(d["hidden"], d["weight"], d["targets"], bias=d["bias"], with_entropy=True,
                                 backend="torch", chunk_rows=16)
    assert seen.largest <= max(16 * V, V * H)  # one chunk of logits at most; 200 * V never


def test_bad_input_names_the_argument():
    d = data(9, seed=5)
    logits = d["hidden"] @ d["weight"].T
    with pytest.raises(ValueError, match="targets"):
        dk.token_logprobs(logits, d["targets"] + V)
    with pytest.raises(ValueError, match="targets"):
        dk.token_logprobs(logits, d["targets"][:-1])
    with pytest.raises(ValueError, match="logits"):
        dk.token_logprobs(logits[None], d["targets"])
    with pytest.raises(TypeError, match="logits"):
        dk.token_logprobs(logits.tolist(), d["targets"])
    with pytest.raises(ValueError, match="temperature"):
        dk.token_logprobs(logits, d["targets"], temperature=0.0)
    with pytest.raises(ValueError, match="loss_mask"):
        dk.token_logprobs(logits, d["targets"], loss_mask=d["mask"][:-1])
    with pytest.raises(ValueError, match="backend"):
        dk.token_logprobs(logits, d["targets"], backend="nope")
    with pytest.raises(ValueError, match="weight"):
        dk.linear_token_logprobs(d["hidden"], d["weight"][:, :-1], d["targets"])
    with pytest.raises(ValueError, match="chunk_rows"):
        dk.linear_token_logprobs(d["hidden"], d["weight"], d["targets"], chunk_rows=0)
    with pytest.raises(TypeError, match="with_entropy"):
        dk.linear_token_logprobs(d["hidden"], d["weight"], d["targets"], with_entropy=1)
