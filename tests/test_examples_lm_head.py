"""examples/plain_loop_lm_head.py: the loss from hidden states + LM head equals the loss through the logits,
and the loop built on it trains the toy policy on CPU in seconds."""
import pytest
import torch

from cases import load_example


@pytest.fixture(scope="module")
def example():
    return load_example("plain_loop_lm_head")


def test_lm_head_loss_equals_the_materialised_loss(example):
    torch.manual_seed(0)
    policy = example.Policy()
    gen = torch.Generator().manual_seed(1)
    inputs, targets, old_logp, advantages, mask, _ = example.rollout(policy, gen)
    old_logp = old_logp + 0.3 * torch.randn(old_logp.shape, generator=gen)  # off-policy: both clip sides
    grads = []
    for fn in (example.lm_head_loss, example.materialised_loss):
        policy.zero_grad()
        out = fn(policy, inputs, targets, old_logp, advantages, mask)
        out.loss.backward()
        grads.append((out.loss.detach(), {n: p.grad.clone() for n, p in policy.named_parameters()}))
    (fused, g1), (mat, g2) = grads
    # float32 both ways, the same logits, sums in another order: a few ulps apart
    torch.testing.assert_close(fused, mat, rtol=1e-6, atol=1e-7)
    assert g1.keys() == g2.keys() and "lm_head.weight" in g1
    for name, g in g2.items():
        torch.testing.assert_close(g1[name], g, rtol=1e-5, atol=1e-6 * g.abs().max().item(), msg=name)
        assert g.abs().max() > 0, name


def test_the_old_logprobs_are_the_policy_logprobs(example):
    torch.manual_seed(0)
    policy = example.Policy()
    inputs, targets, old_logp, _, mask, _ = example.rollout(policy, torch.Generator().manual_seed(2))
    with torch.no_grad():
        logp = torch.log_softmax(policy(inputs).double(), -1).gather(-1, targets[..., None]).squeeze(-1)
    torch.testing.assert_close(old_logp.double(), torch.where(mask > 0, logp, 0.0), rtol=1e-5, atol=1e-6)


def test_the_loop_trains_the_policy(example):
    history = example.main(steps=30, seed=0, verbose=False)
    assert len(history) == 30
    first, last = sum(history[:5]) / 5, sum(history[-5:]) / 5
    assert last - first > 0.3, (first, last)  # chance is 1/9 at the start
