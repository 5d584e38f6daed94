"""The reference against numbers derived by hand, and gradchecks of the reference and the torch backend."""
import math

import pytest
import torch

import deltal_kernels as dk

from cases import make_batch

LN = math.log


def two_token_batch():
    """Three rows of one sequence over V=2, target 0 everywhere, chosen so each PPO branch is hit.

    row 0: p(0) = 1/4, ratio 1.5, A = +1   -> clipped above: pg = -1 * 1.2
    row 1: p(0) = 3/4, ratio 0.5, A = -2   -> clipped below: pg = 2 * 0.8
    row 2: p(0) = 1/2, ratio 1,   A = 0.5  -> inside the range: pg = -0.5
    """
    logits = torch.tensor([[0.0, LN(3)], [LN(3), 0.0], [0.0, 0.0]], dtype=torch.float64)
    logp = [LN(1 / 4), LN(3 / 4), LN(1 / 2)]
    old = torch.tensor([logp[0] - LN(1.5), logp[1] - LN(0.5), logp[2]], dtype=torch.float64)
    adv = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    return logits, torch.zeros(3, dtype=torch.long), old, adv, torch.tensor([0, 3]), logp


def test_hand_derived_ppo_loss_logprobs_and_gradient():
    logits, targets, old, adv, cu, logp = two_token_batch()
    x = logits.clone().requires_grad_(True)
    out = dk.reference.policy_loss(x, targets, old, adv, cu, agg="token-mean")
    pg = [-1.2, 1.6, -0.5]
    assert out.loss.item() == pytest.approx(sum(pg) / 3, abs=1e-12)
    assert out.logprobs.tolist() == pytest.approx(logp, abs=1e-12)
    assert out.metrics["clipfrac"].item() == pytest.approx(2 / 3)
    assert out.metrics["approx_kl"].item() == pytest.approx(-(LN(1.5) + LN(0.5) + 0.0) / 3)  # old - logp
    out.loss.backward()
    # clipped rows pass no gradient; row 2: d(-A r)/dx = -A r (onehot - p) / tau, times w = 1/3
    expected = torch.tensor([[0.0, 0.0], [0.0, 0.0], [-0.5 * 0.5 / 3, 0.5 * 0.5 / 3]], dtype=torch.float64)
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=1e-12)


def test_hand_derived_dual_clip():
    logits, targets, old, adv, cu, logp = two_token_batch()
    old = old.clone()
    old[1] = logp[1] - LN(4.0)  # ratio 4 with A = -2: pg = max(8, 2.4) = 8, dual clip at c=3 caps it at 6
    out = dk.reference.policy_loss(logits, targets, old, adv, cu, agg="token-mean", dual_clip=3.0)
    assert out.loss.item() == pytest.approx((-1.2 + 6.0 - 0.5) / 3, abs=1e-12)
    assert out.metrics["clipfrac_lower"].item() == pytest.approx(1 / 3)


@pytest.mark.parametrize("kl_type", ["k1", "k2", "k3"])
def test_hand_derived_kl_and_entropy(kl_type):
    logits, targets, old, adv, cu, logp = two_token_batch()
    ref = torch.tensor([logp[0] - 0.5, logp[1] + 0.25, logp[2]], dtype=torch.float64)
    out = dk.reference.policy_loss(logits, targets, old, adv, cu, agg="token-mean", ref_logprobs=ref,
                                   kl_coef=0.1, kl_type=kl_type, entropy_coef=0.01)
    diffs = [0.5, -0.25, 0.0]  # logp - ref
    kl = {"k1": lambda e: e, "k2": lambda e: 0.5 * e * e, "k3": lambda e: math.exp(-e) + e - 1}[kl_type]
    H = [-(0.25 * LN(0.25) + 0.75 * LN(0.75))] * 2 + [LN(2)]
    expected = sum(pg + 0.1 * kl(e) - 0.01 * h for pg, e, h in zip([-1.2, 1.6, -0.5], diffs, H)) / 3
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)
    assert out.metrics["kl"].item() == pytest.approx(sum(map(kl, diffs)) / 3, abs=1e-12)
    assert out.entropy.tolist() == pytest.approx(H, abs=1e-12)


def test_k3_clamps():
    # ref far above logp: d = ref - logp = 30 is clamped to 20 and exp(20) - 21 is clamped to 10
    logits, targets, old, adv, cu, logp = two_token_batch()
    ref = torch.tensor(logp, dtype=torch.float64) + 30.0
    out = dk.reference.policy_loss(logits, targets, old, adv, cu, agg="token-mean", ref_logprobs=ref,
                                   kl_type="k3", kl_coef=1.0)
    assert out.metrics["kl"].item() == pytest.approx(10.0)


def test_temperature_divides_logits():
    logits, targets, old, adv, cu, _ = two_token_batch()
    a = dk.reference.policy_loss(logits, targets, old, adv, cu, agg="token-mean", temperature=2.0)
    b = dk.reference.policy_loss(logits / 2.0, targets, old, adv, cu, agg="token-mean")
    assert a.loss.item() == b.loss.item()
    assert math.exp(a.logprobs[0].item()) == pytest.approx(1 / (1 + math.sqrt(3)))


GRADCHECK_CASES = {
    "both-clip-sides": dict(),
    "asymmetric": dict(clip_low=0.1, clip_high=0.3),
    "dual-clip": dict(dual_clip=1.3),
    "k1": dict(kl_coef=0.3, kl_type="k1"),
    "k2": dict(kl_coef=0.3, kl_type="k2"),
    "k3": dict(kl_coef=0.3, kl_type="k3"),
    "entropy": dict(entropy_coef=0.05),
    "temperature": dict(temperature=0.6, entropy_coef=0.05, kl_coef=0.2),
}


@pytest.mark.parametrize("fn", [dk.reference.policy_loss, dk.policy_loss], ids=["reference", "torch-backend"])
@pytest.mark.parametrize("case", list(GRADCHECK_CASES))
def test_gradcheck_float64(fn, case):
    batch = make_batch([3, 0, 4, 2], 7, dtype=torch.float64, seed=11, ratio_spread=0.6, logit_scale=1.0)
    rest = {k: (v.double() if v.is_floating_point() else v) for k, v in batch.items() if k != "logits"}
    options = dict(max_len=6, **GRADCHECK_CASES[case])
    if fn is dk.policy_loss:
        options["backend"] = "torch"

    def loss(x):
        return fn(x, **rest, **options).loss

    x = batch["logits"].double().requires_grad_(True)
    assert torch.autograd.gradcheck(loss, (x,), eps=1e-6, atol=1e-7)


def test_ratio_clamp_blocks_gradient():
    # logp - old = 25 > 20: the ratio is exp(20), constant, so the unclipped branch (A < 0) passes no gradient
    logits = torch.tensor([[0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    out = dk.reference.policy_loss(logits, torch.tensor([0]), torch.tensor([LN(0.5) - 25.0], dtype=torch.float64),
                                   torch.tensor([-1.0], dtype=torch.float64), torch.tensor([0, 1]),
                                   agg="token-mean")
    assert out.loss.item() == pytest.approx(math.exp(20.0))
    out.loss.backward()
    assert not logits.grad.any()
