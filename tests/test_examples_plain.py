"""examples/plain_loop.py: the dk call is a faithful replacement of the hand-written GRPO loss, and
the loop built on it (Delta-L) trains the toy policy on CPU in seconds."""
import pytest
import torch

from cases import load_example


@pytest.fixture(scope="module")
def plain_loop():
    return load_example("plain_loop")


def test_dk_loss_with_grpo_aggregation_is_the_handwritten_loss(plain_loop):
    gen = torch.Generator().manual_seed(0)
    B, T, V = 6, plain_loop.MAX_LEN, plain_loop.V
    logits = (2 * torch.randn(B, T, V, generator=gen)).requires_grad_(True)
    targets = torch.randint(0, V, (B, T), generator=gen)
    lengths = torch.tensor([8, 1, 5, 3, 8, 2])  # ragged, every completion scored at least once
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    with torch.no_grad():
        logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    old_logp = logp + 0.5 * torch.randn(B, T, generator=gen)  # both clip sides act
    advantages = torch.randn(B, generator=gen)

    expected = plain_loop.handwritten_grpo_loss(logits, targets, old_logp, advantages, mask)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    out = plain_loop.dk_loss(logits, targets, old_logp, advantages, mask, agg="grpo")
    (grad,) = torch.autograd.grad(out.loss, logits)
    # float32 both ways, summed in different orders: a few ulps (2^-24 relative) apart
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-6 * expected_grad.abs().max().item())
    assert 0 < out.metrics["clipfrac"].item() < 1

    # Delta-L is a different weighting of the same per-token terms: not the GRPO loss on this batch
    delta_l = plain_loop.dk_loss(logits, targets, old_logp, advantages, mask, agg="delta-l").loss
    assert abs(delta_l.item() - expected.item()) > 1e-3 * abs(expected.item())


def test_the_loop_trains_the_policy(plain_loop):
    history = plain_loop.main(steps=30, seed=0, verbose=False)
    assert len(history) == 30
    first, last = sum(history[:5]) / 5, sum(history[-5:]) / 5
    assert last - first > 0.3, (first, last)  # chance is 1/9 at the start
