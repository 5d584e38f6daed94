"""Gradient accumulation: weights computed once for the optimizer batch and sliced per micro-batch
give the gradient of one call on the whole batch; per-micro-batch normalisation does not."""
import pytest
import torch

import deltal_kernels as dk
from cases import load_example
from deltal_kernels.integrations import accumulation_weights

AGGS = ("delta-l", "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
V, H, MAX_LEN = 13, 5, 12
MICRO_ROWS = [[7, 2, 9], [1, 12], [4, 0, 6, 3]]  # three micro-batches of different raggedness


def micro_batches():
    gen = torch.Generator().manual_seed(3)
    out = []
    for rows in MICRO_ROWS:
        N = sum(rows)
        out.append(dict(
            features=torch.randn(N, H, generator=gen, dtype=torch.float64),
            targets=torch.randint(0, V, (N,), generator=gen),
            old_logprobs=-2.5 + 0.5 * torch.randn(N, generator=gen, dtype=torch.float64),
            ref_logprobs=-2.5 + 0.5 * torch.randn(N, generator=gen, dtype=torch.float64),
            advantages=torch.randn(len(rows), generator=gen, dtype=torch.float64),
            cu_seqlens=dk.packing.cu_seqlens_from_lengths(torch.tensor(rows)),
            loss_mask=torch.rand(N, generator=gen) > 0.25,
        ))
    return out


def concat(batches):
    """The micro-batches as one packed batch (sequences in the same order)."""
    whole = {k: torch.cat([b[k] for b in batches]) for k in
             ("features", "targets", "old_logprobs", "ref_logprobs", "advantages", "loss_mask")}
    rows = torch.cat([dk.packing.lengths_from_cu_seqlens(b["cu_seqlens"]) for b in batches])
    whole["cu_seqlens"] = dk.packing.cu_seqlens_from_lengths(rows)
    return whole


def grad_of(batches, loss_fn):
    torch.manual_seed(0)
    model = torch.nn.Linear(H, V, bias=False).double()
    for k, b in enumerate(batches):
        loss_fn(k, b, model(b["features"])).backward()  # gradients accumulate in model.weight.grad
    return model.weight.grad


def call(policy_loss, b, logits, **kw):
    return policy_loss(logits, b["targets"], b["old_logprobs"], b["advantages"], b["cu_seqlens"],
                       loss_mask=b["loss_mask"], ref_logprobs=b["ref_logprobs"], kl_coef=0.1, **kw).loss


@pytest.mark.parametrize("agg", AGGS)
def test_accumulated_gradient_equals_whole_batch(agg):
    batches = micro_batches()
    opts = dict(alpha=0.5, max_len=MAX_LEN)
    # truth: the float64 reference, once on the whole batch
    expected = grad_of([concat(batches)], lambda k, b, x: call(dk.reference.policy_loss, b, x, agg=agg, **opts))

    lengths = [dk.packing.scored_lengths(b["cu_seqlens"], b["loss_mask"]) for b in batches]
    weights = accumulation_weights(lengths, agg, dtype=torch.float64, **opts)
    assert [w.shape[0] for w in weights] == [len(r) for r in MICRO_ROWS]
    got = grad_of(batches, lambda k, b, x: call(dk.policy_loss, b, x, weights=weights[k], backend="torch"))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-14 * expected.abs().max().item())

    # the usual mistake, normalising each micro-batch on its own and dividing by their count, is wrong
    # whenever micro-batches differ in sequence count or lengths (as here)
    K = len(batches)
    naive = grad_of(batches, lambda k, b, x: call(dk.policy_loss, b, x, agg=agg, backend="torch", **opts) / K)
    assert (naive - expected).abs().max() > 1e-3 * expected.abs().max()


def test_rejects_a_single_tensor_or_an_empty_list():
    with pytest.raises(ValueError, match="micro_batch_lengths"):
        accumulation_weights(torch.tensor([3, 4]), "token-mean")
    with pytest.raises(ValueError, match="micro_batch_lengths"):
        accumulation_weights([], "token-mean")
    with pytest.raises(ValueError, match="micro_batch_lengths"):
        accumulation_weights([torch.tensor([[3]])], "token-mean")


def test_readme_snippet():
    snippet = load_example("use_with_accumulation")

    batches = [{**b, "inputs": b["features"].float(), "old_logprobs": b["old_logprobs"].float(),
                "advantages": b["advantages"].float()} for b in micro_batches()]  # dk's default backend: float32
    torch.manual_seed(0)
    model = torch.nn.Linear(H, V, bias=False)
    snippet.accumulate(model, batches, MAX_LEN)

    whole = concat(micro_batches())
    expected = grad_of([whole], lambda k, b, x: dk.reference.policy_loss(
        x, b["targets"], b["old_logprobs"], b["advantages"], b["cu_seqlens"], loss_mask=b["loss_mask"],
        agg="delta-l", alpha=1.0, max_len=MAX_LEN).loss)
    # float32 inputs, model and loss against the float64 truth: a few float32 roundings (2^-24 relative)
    torch.testing.assert_close(model.weight.grad.double(), expected, rtol=1e-6,
                               atol=1e-6 * expected.abs().max().item())
