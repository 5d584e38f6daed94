"""verl integration: agg_loss, the registered policy loss and the fused actor loss against verl's own code.

The parity tests need verl, installed in its own venv from requirements/verl.txt (verl pins its own
transformers and pulls ray, so it stays out of the default venv); the Delta-L formula tests run everywhere.
"""
import importlib.util

import pytest
import torch

import deltal_kernels as dk
from cases import load_example
from deltal_kernels.integrations import verl as dkv

HAS_VERL = importlib.util.find_spec("verl") is not None
needs_verl = pytest.mark.skipif(not HAS_VERL,
                                reason="verl is not installed (it has its own venv: requirements/verl.txt)")

BS, T = 5, 9


def batch(seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([9, 3, 0, 6, 1])  # ragged responses, one fully masked
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(torch.float32)
    mask[3, 2] = 0  # a masked token inside a response
    return dict(
        loss_mat=torch.randn(BS, T, generator=gen, dtype=dtype),
        mask=mask,
        old=-2.0 + 0.5 * torch.randn(BS, T, generator=gen, dtype=dtype),
        # current log-probs far enough from the old ones for both clips and the dual clip to act
        logp=-2.0 + 1.3 * torch.randn(BS, T, generator=gen, dtype=dtype),
        adv=torch.randn(BS, 1, generator=gen, dtype=dtype).expand(BS, T).contiguous(),
    )


def delta_l_formula(loss_mat, mask, alpha, M):
    """sum_i L_i^-alpha / (M sum_j L_j^-alpha) * sum_t mask * loss, written out over sequences."""
    L = mask.sum(-1).tolist()
    norm = sum(l ** -alpha for l in L if l > 0)
    total = 0.0
    for i, l in enumerate(L):
        if l > 0:
            total += l ** -alpha / (M * norm) * float((loss_mat[i] * mask[i]).sum())
    return total


@pytest.mark.parametrize("alpha", [0.0, 0.75, 1.0])
@pytest.mark.parametrize("loss_scale_factor", [None, 16])
def test_delta_l_agg_loss_is_the_formula(alpha, loss_scale_factor):
    b = batch()
    got = dkv.agg_loss(b["loss_mat"], b["mask"], "delta-l", loss_scale_factor=loss_scale_factor, alpha=alpha)
    M = loss_scale_factor or T  # like verl's seq-mean-token-sum-norm: the response width by default
    assert got.item() == pytest.approx(delta_l_formula(b["loss_mat"], b["mask"], alpha, M), rel=1e-13)


def test_delta_l_agg_loss_uses_given_weights_and_needs_them_with_dp():
    b = batch()
    w = torch.tensor([0.5, 0.25, 0.0, 2.0, 1.0], dtype=torch.float64)
    got = dkv.agg_loss(b["loss_mat"], b["mask"], "delta-l", dp_size=2, delta_l_weights=w)
    expected = sum(float(w[i]) * float((b["loss_mat"][i] * b["mask"][i]).sum()) for i in range(BS))
    assert got.item() == pytest.approx(expected, rel=1e-13)
    with pytest.raises(ValueError, match="delta_l_weights"):
        dkv.agg_loss(b["loss_mat"], b["mask"], "delta-l", dp_size=2)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        dkv.agg_loss(b["loss_mat"], b["mask"], "delta_l_typo")


def test_delta_l_micro_batches_with_sliced_weights_sum_to_the_mini_batch():
    b = batch()
    M = 12
    w = dk.sequence_weights(b["mask"].sum(-1).to(torch.int64), "delta-l", alpha=0.5, max_len=M, dtype=torch.float64)
    parts = [slice(0, 2), slice(2, 5)]
    accumulated = sum(dkv.agg_loss(b["loss_mat"][s], b["mask"][s], "delta-l", delta_l_weights=w[s]) for s in parts)
    whole = dkv.agg_loss(b["loss_mat"], b["mask"], "delta-l", loss_scale_factor=M, alpha=0.5)
    assert accumulated.item() == pytest.approx(whole.item(), rel=1e-13)


GLOBAL_INFOS = [
    {},  # one rank, local statistics
    {"dp_size": 2, "batch_num_tokens": 37, "global_batch_size": 11, "loss_scale_factor": 16},
    {"dp_size": 1, "batch_num_tokens": None, "global_batch_size": None, "loss_scale_factor": None},
]


@needs_verl
@pytest.mark.parametrize("mode", dkv.VERL_AGG_MODES)
@pytest.mark.parametrize("info", GLOBAL_INFOS)
def test_agg_loss_matches_verl(mode, info):
    from verl.trainer.ppo.core_algos import agg_loss

    b = batch()
    expected = agg_loss(b["loss_mat"], b["mask"], mode, **info)
    got = dkv.agg_loss(b["loss_mat"], b["mask"], mode, **info)
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=0)


def actor_config(**kw):
    from verl.workers.config import ActorConfig

    opts = dict(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, use_torch_compile=False,
                clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)
    opts.update(kw)
    return ActorConfig(**opts)


def policy_loss_and_grad(fn, b, mode, config, **kw):
    logp = b["logp"].clone().requires_grad_(True)
    loss, metrics = fn(b["old"], logp, b["adv"], b["mask"], mode, config, **kw)
    loss.backward()
    return loss.detach(), logp.grad, metrics


@needs_verl
@pytest.mark.parametrize("mode", dkv.VERL_AGG_MODES)
@pytest.mark.parametrize("info", GLOBAL_INFOS[:2])
def test_compute_policy_loss_matches_verl_vanilla(mode, info):
    from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla

    b = batch(1)
    config = actor_config(global_batch_info=dict(info))
    expected = policy_loss_and_grad(compute_policy_loss_vanilla, b, mode, config)
    got = policy_loss_and_grad(dkv.compute_policy_loss, b, mode, config)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-13, atol=0)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-13, atol=1e-16)
    assert got[2] == pytest.approx(expected[2], rel=1e-12)
    # the batch really exercises clipping and the dual clip
    assert expected[2]["actor/pg_clipfrac"] > 0 and expected[2]["actor/pg_clipfrac_lower"] > 0


@needs_verl
@pytest.mark.parametrize("policy", ["vanilla", "gspo", "cispo"])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("info", GLOBAL_INFOS[:2])
@pytest.mark.parametrize("with_rollout_is", [False, True], ids=["", "rollout_is"])
def test_compute_policy_loss_matches_verl_gspo_and_cispo(policy, mode, info, with_rollout_is):
    """compute_policy_loss(policy=...) is verl's compute_policy_loss_<policy>, with verl's rollout-correction
    weights (rollout_is_weights) on the policy term."""
    from verl.trainer.ppo import core_algos

    b = batch(1)
    config = actor_config(global_batch_info=dict(info))
    kw = {}
    if with_rollout_is:
        gen = torch.Generator().manual_seed(9)
        kw["rollout_is_weights"] = (torch.rand(BS, T, generator=gen, dtype=torch.float64) * 2) * b["mask"]
    verl_fn = getattr(core_algos, f"compute_policy_loss_{policy}")
    expected = policy_loss_and_grad(verl_fn, b, mode, config, **kw)

    def ours(*args, **kwargs):
        return dkv.compute_policy_loss(*args, policy=policy, **kwargs)

    got = policy_loss_and_grad(ours, b, mode, config, **kw)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-13, atol=0)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-13, atol=1e-16)
    assert got[2] == pytest.approx(expected[2], rel=1e-12)
    assert expected[2]["actor/pg_clipfrac"] > 0  # the batch exercises the clip


@needs_verl
@pytest.mark.parametrize("policy,name", [("vanilla", "delta-l"), ("gspo", "delta-l-gspo"), ("cispo", "delta-l-cispo")])
def test_registered_delta_l_loss_is_verl_vanilla_with_rescaled_advantages(policy, name):
    """verl's own policy loss (vanilla, gspo, cispo), seq-mean-token-sum, with A_i scaled by G * w_i (each
    objective is positively homogeneous in A) is the Delta-L loss: an independent check through verl's code."""
    from verl.trainer.ppo import core_algos
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    compute_policy_loss_vanilla = getattr(core_algos, f"compute_policy_loss_{policy}")
    alpha = 0.75
    registered = dkv.register(alpha=alpha, policy=policy)
    assert get_policy_loss_fn(name) is registered

    b = batch(2)
    config = actor_config(global_batch_info={}, loss_scale_factor=None)
    got = policy_loss_and_grad(registered, b, "token-mean", config)  # the mode string is ignored: Delta-L

    L = b["mask"].sum(-1).to(torch.float64)
    live = L > 0
    w = torch.where(live, L.clamp(min=1) ** -alpha, torch.zeros_like(L))
    w = w / (T * w.sum())
    scaled = dict(b, adv=b["adv"] * (w * live.sum())[:, None].to(b["adv"].dtype))
    expected = policy_loss_and_grad(compute_policy_loss_vanilla, scaled, "seq-mean-token-sum", config)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-13, atol=0)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-13, atol=1e-16)


def micro_batch(seed, *, kl, dtype=torch.float64, V=11):
    """A verl micro-batch in no-padding mode, as left_right_2_no_padding leaves it."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu

    gen = torch.Generator().manual_seed(seed)
    P, R = [2, 3, 1, 4], [3, 1, 5, 2]

    def nested(xs):
        return torch.nested.as_nested_tensor(xs, layout=torch.jagged)

    prompts = [torch.randint(0, V, (p,), generator=gen) for p in P]
    responses = [torch.randint(0, V, (r,), generator=gen) for r in R]
    masks = [torch.ones(r, dtype=torch.int64) for r in R]
    masks[2][1] = 0  # a masked response token (e.g. a tool output)
    fields = {
        "input_ids": nested([torch.cat([p, r]) for p, r in zip(prompts, responses)]),
        "prompts": nested(prompts),
        "responses": nested(responses),
        "response_mask": nested(masks),
        "old_log_probs": nested([-2.4 + 0.6 * torch.randn(r, generator=gen, dtype=dtype) for r in R]),
        "advantages": nested([torch.randn(1, generator=gen, dtype=dtype).expand(r).contiguous() for r in R]),
    }
    ref = nested([-2.4 + 0.6 * torch.randn(r, generator=gen, dtype=dtype) for r in R])  # drawn always: same logits
    if kl:
        fields["ref_log_prob"] = ref
    data = TensorDict(fields, batch_size=[len(P)])
    tu.assign_non_tensor(data, temperature=0.7)
    logits = 2.0 * torch.randn(sum(P) + sum(R), V, generator=gen, dtype=dtype)
    return data, logits


def verl_actor_loss(config, logits, data, temperature):
    """verl's actor: log-probs (and entropy) from the rmpad logits, then verl's ppo_loss."""
    import verl.utils.torch_functional as verl_F
    from verl.workers.utils.losses import ppo_loss

    scaled = logits / temperature
    targets = torch.roll(data["input_ids"].values(), shifts=-1, dims=0)
    log_probs = verl_F.logprobs_from_logits(scaled, targets)
    cu = data["input_ids"].offsets()
    output = {"log_probs": torch.nested.nested_tensor_from_jagged(log_probs, cu)}
    if config.entropy_coeff != 0:
        output["entropy"] = torch.nested.nested_tensor_from_jagged(verl_F.entropy_from_logits(scaled), cu)
    return ppo_loss(config, output, data)


@needs_verl
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("kl,entropy", [(False, 0.0), (True, 0.01)])
@pytest.mark.parametrize("dp", [1, 2])
@pytest.mark.parametrize("loss_mode", ["vanilla", "gspo", "cispo"])
def test_fused_actor_loss_matches_verl_ppo_loss(mode, kl, entropy, dp, loss_mode):
    """verl's actor loss with policy_loss.loss_mode vanilla, gspo (dk's ratio_level="sequence") and cispo
    (dk's objective="cispo")."""
    from verl.utils import tensordict_utils as tu

    data, logits = micro_batch(3, kl=kl)
    info = dict(dp_size=1, batch_num_tokens=None, global_batch_size=None)
    if dp > 1:  # the mini-batch's statistics over all ranks, as verl's engine sets them
        info = dict(dp_size=dp, batch_num_tokens=29, global_batch_size=8)
    tu.assign_non_tensor(data, **info)
    config = actor_config(loss_agg_mode=mode, entropy_coeff=entropy, use_kl_loss=kl, kl_loss_coef=0.1,
                          kl_loss_type="low_var_kl", loss_scale_factor=12 if dp > 1 else None,
                          policy_loss={"loss_mode": loss_mode})

    x_verl = logits.clone().requires_grad_(True)
    expected, expected_metrics = verl_actor_loss(config, x_verl, data, 0.7)
    expected.backward()
    x_dk = logits.clone().requires_grad_(True)
    got, metrics = dkv.fused_ppo_loss(config, x_dk, data, backend="torch")
    got.backward()

    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(x_dk.grad, x_verl.grad, rtol=1e-12, atol=1e-15)
    # the batch exercises the clip and (vanilla) the dual clip
    assert expected_metrics["actor/pg_clipfrac"].aggregate() > 0
    assert (expected_metrics["actor/pg_clipfrac_lower"].aggregate() > 0) == (loss_mode == "vanilla")
    for name in ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"):
        # verl computes these token means from float32 flags; dk in the logits' dtype (float64 here)
        assert metrics[name].aggregate() == pytest.approx(expected_metrics[name].aggregate(), rel=1e-6)


@needs_verl
def test_fused_actor_loss_rejects_what_it_cannot_compute():
    from verl.utils import tensordict_utils as tu

    data, logits = micro_batch(4, kl=False)
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=None, global_batch_size=None)
    config = actor_config()
    with pytest.raises(ValueError, match="logits_rmpad"):
        dkv.fused_ppo_loss(config, logits[1:], data, backend="torch")
    data["rollout_is_weights"] = data["old_log_probs"]
    with pytest.raises(ValueError, match="rollout_is_weights"):
        dkv.fused_ppo_loss(config, logits, data, backend="torch")


@needs_verl
def test_readme_verl_snippet():
    """The README's verl lines: registered loss, mini-batch weights, fused actor loss. The fused Delta-L
    loss is checked against verl's own actor loss with seq-mean-token-sum and rescaled advantages."""
    from verl.trainer.ppo.core_algos import get_policy_loss_fn
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.losses import ppo_loss

    snippet = load_example("use_with_verl")
    assert get_policy_loss_fn("delta-l") is not None

    data, logits = micro_batch(5, kl=False, dtype=torch.float32)  # float32: the snippet runs dk's default backend
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=None, global_batch_size=None)
    response_mask = data.select("response_mask").to_padded_tensor()["response_mask"]
    M = 16
    data["delta_l_weights"] = snippet.mini_batch_weights(response_mask, M)
    config = actor_config()
    x = logits.clone().requires_grad_(True)
    loss, _ = snippet.actor_loss(config, x, data)
    loss.backward()

    L = response_mask.sum(-1).to(torch.float64)
    w = (L ** -1.0 / (M * (L ** -1.0).sum())).float()
    rescaled = data.clone()
    rescaled["advantages"] = torch.nested.as_nested_tensor(
        [a * w[i] * L.numel() for i, a in enumerate(data["advantages"].unbind())], layout=torch.jagged)
    x_verl = logits.clone().requires_grad_(True)
    expected, _ = verl_actor_loss(actor_config(loss_agg_mode="seq-mean-token-sum"), x_verl, rescaled, 0.7)
    expected.backward()
    # float32 both ways, reduced in different orders: a few ulps (2^-24 relative) apart
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(x.grad, x_verl.grad, rtol=1e-6, atol=1e-6 * x_verl.grad.abs().max().item())


@needs_verl
def test_importing_the_module_registers_delta_l_with_verl():
    import subprocess
    import sys

    code = ("import deltal_kernels.integrations.verl as m\n"
            "from verl.trainer.ppo.core_algos import get_policy_loss_fn\n"
            "assert get_policy_loss_fn('delta-l').__name__ == 'delta_l_policy_loss'\n"
            "assert get_policy_loss_fn('delta-l-gspo').__name__ == 'delta_l_gspo_policy_loss'\n"
            "assert get_policy_loss_fn('delta-l-cispo').__name__ == 'delta_l_cispo_policy_loss'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@needs_verl
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("kl,entropy", [(False, 0.0), (True, 0.01)])
def test_fused_linear_actor_loss_matches_verl_on_the_lm_head_logits(mode, kl, entropy):
    """fused_linear_ppo_loss(hidden, lm_head.weight) is verl's actor loss on hidden @ weight.T + bias, with the
    gradients of hidden, weight and bias; no [total_nnz, V] logits on dk's side."""
    from verl.utils import tensordict_utils as tu

    data, logits = micro_batch(6, kl=kl)
    N, V = logits.shape
    gen = torch.Generator().manual_seed(7)
    H = 8
    params = dict(hidden=torch.randn(N, H, generator=gen, dtype=torch.float64),
                  weight=torch.randn(V, H, generator=gen, dtype=torch.float64) * 0.7,
                  bias=torch.randn(V, generator=gen, dtype=torch.float64) * 0.3)
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=None, global_batch_size=None)
    config = actor_config(loss_agg_mode=mode, entropy_coeff=entropy, use_kl_loss=kl, kl_loss_coef=0.1,
                          kl_loss_type="low_var_kl", loss_scale_factor=None)

    ref = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    expected, expected_metrics = verl_actor_loss(
        config, torch.nn.functional.linear(ref["hidden"], ref["weight"], ref["bias"]), data, 0.7)
    expected.backward()
    ours = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    got, metrics = dkv.fused_linear_ppo_loss(config, ours["hidden"], ours["weight"], data, bias=ours["bias"],
                                             backend="torch", chunk_rows=3)
    got.backward()

    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    for name in params:  # float64 both ways; the weight's and bias's sums run over chunks in another order
        torch.testing.assert_close(ours[name].grad, ref[name].grad, rtol=1e-10,
                                   atol=1e-13 * ref[name].grad.abs().max().item(), msg=name)
    assert expected_metrics["actor/pg_clipfrac"].aggregate() > 0
    for name in ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"):
        assert metrics[name].aggregate() == pytest.approx(expected_metrics[name].aggregate(), rel=1e-6)
    with pytest.raises(ValueError, match="hidden_rmpad"):
        dkv.fused_linear_ppo_loss(config, ours["hidden"][1:], ours["weight"], data, backend="torch")


@needs_verl
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("threshold", [2.0, "0.5_2.0", 1.5, "0.25_4.0"], ids=["tis2", "icepop0.5-2", "tis1.5",
                                                                           "icepop0.25-4"])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_rollout_correction_matches_verl_rollout_is(level, threshold, mode):
    """dk.policy_loss's rollout_correction from the rollout log-probs equals verl's actor policy loss (vanilla)
    times verl's compute_rollout_correction_weights: rollout_is token/sequence with a single threshold (TIS)
    is *_truncate with (None, t); with "lower_upper" (IcePop) it is *_mask with (lower, upper)."""
    from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_weights

    b = batch(3)
    gen = torch.Generator().manual_seed(10)
    mask = b["mask"]
    rollout = b["old"] + 0.7 * torch.randn(BS, T, generator=gen, dtype=torch.float64)
    weights, _ = compute_rollout_correction_weights(b["old"] - rollout, mask, rollout_is=level,
                                                    rollout_is_threshold=threshold)
    V = 7
    logits = 1.5 * torch.randn(BS, T, V, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, V, (BS, T), generator=gen)

    x_verl = logits.clone().requires_grad_(True)
    logp = torch.log_softmax(x_verl, -1).gather(-1, targets[..., None]).squeeze(-1)
    config = actor_config(global_batch_info={})
    expected, _ = compute_policy_loss_vanilla(b["old"], logp, b["adv"], mask, mode, config,
                                              rollout_is_weights=weights)
    expected.backward()

    if isinstance(threshold, str):
        lower, upper = (float(x) for x in threshold.split("_"))
        correction, clip = f"{level}_mask", (lower, upper)
    else:
        correction, clip = f"{level}_truncate", (None, threshold)
    lengths = torch.full((BS,), T)  # every row packed (response_mask as loss_mask)
    cu = dk.packing.cu_seqlens_from_lengths(lengths)
    x_dk = logits.clone().requires_grad_(True)
    out = dk.policy_loss(x_dk.reshape(BS * T, V), targets.reshape(-1), b["old"].reshape(-1), b["adv"].reshape(-1), cu,
                         loss_mask=mask.reshape(-1).bool(), weights=dkv.agg_weights(mask, mode), clip_low=0.2,
                         clip_high=0.28, dual_clip=3.0, rollout_logprobs=rollout.reshape(-1),
                         rollout_correction=correction, rollout_clip=clip, backend="torch")
    out.loss.backward()
    torch.testing.assert_close(out.loss, expected.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(x_dk.grad, x_verl.grad, rtol=1e-10, atol=1e-15)
    # the thresholds act on this batch: some weights at the bound (TIS) or zeroed (IcePop), some not
    live = weights[mask.bool()]
    hit = (live == 0) if isinstance(threshold, str) else (live == threshold)
    assert 0 < int(hit.sum()) < live.numel()


@needs_verl
def test_delta_l_needs_its_max_len_in_remove_padding_mode():
    """The padded width of a remove-padding micro-batch is its longest response, not Delta-L's M: with
    neither max_len / loss_scale_factor nor delta_l_weights, the fused and registered losses raise."""
    from verl.utils import tensordict_utils as tu

    data, logits = micro_batch(8, kl=False)
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=None, global_batch_size=None)
    config = actor_config(loss_scale_factor=None)
    with pytest.raises(ValueError, match="max_len"):
        dkv.fused_ppo_loss(config, logits, data, loss_agg_mode="delta-l", backend="torch")
    with pytest.raises(ValueError, match="loss_scale_factor"):
        dkv.fused_ppo_loss(actor_config(loss_scale_factor=None, policy_loss={"loss_mode": "delta-l-gspo"}), logits,
                           data, backend="torch")
    # max_len, or verl's loss_scale_factor, is M: the formula with M = 16
    M = 16
    by_max_len, _ = dkv.fused_ppo_loss(config, logits, data, loss_agg_mode="delta-l", max_len=M, backend="torch")
    by_factor, _ = dkv.fused_ppo_loss(actor_config(loss_scale_factor=M), logits, data, loss_agg_mode="delta-l",
                                      backend="torch")
    response_mask = data.select("response_mask").to_padded_tensor()["response_mask"]
    assert response_mask.shape[1] < M  # the padded width would have been a different M
    w = dk.sequence_weights(response_mask.sum(-1), "delta-l", max_len=M, dtype=torch.float64)
    data["delta_l_weights"] = w
    by_weights, _ = dkv.fused_ppo_loss(config, logits, data, loss_agg_mode="delta-l", backend="torch")
    torch.testing.assert_close(by_max_len, by_weights, rtol=1e-13, atol=0)
    torch.testing.assert_close(by_factor, by_weights, rtol=1e-13, atol=0)
    # the registered loss under verl's engine (ppo_loss sets loss_scale_factor in global_batch_info)
    b = batch(4)
    engine_info = dict(dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None)
    for name in ("delta-l", "delta-l-gspo", "delta-l-cispo"):
        from verl.trainer.ppo.core_algos import get_policy_loss_fn

        with pytest.raises(ValueError, match="loss_scale_factor"):
            get_policy_loss_fn(name)(b["old"], b["logp"], b["adv"], b["mask"], "token-mean",
                                     actor_config(global_batch_info=dict(engine_info)))


# Tensor parallelism (verl's Megatron actor): each rank holds all rows of the logits but only its vocabulary
# shard's columns, or its rows of the column-parallel LM head. V = 12: Megatron's equal split, vocab_start =
# tp_rank * (V // tp); V = 11: unequal shards (5 + 6), which dk accepts as long as they tile [0, V).
TP_SHARDS = {12: [(0, 6), (6, 6)], 11: [(0, 5), (5, 6)]}
TP_LOSS_MODES = ["vanilla", "delta-l", "gspo"]


def tp_config(loss_mode):
    return actor_config(loss_agg_mode="token-mean", entropy_coeff=0.01, use_kl_loss=True, kl_loss_coef=0.1,
                        kl_loss_type="low_var_kl", loss_scale_factor=12, policy_loss={"loss_mode": loss_mode})


def assert_same_loss_and_metrics(got, want, label):
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=0, msg=lambda m: f"loss ({label}): {m}")
    assert got[1].keys() == want[1].keys(), label
    for name in want[1]:
        assert got[1][name].aggregate() == pytest.approx(want[1][name].aggregate(), rel=1e-12, abs=1e-15), \
            (label, name)


def check_tensor_parallel(rank, world, V):
    """Each rank: fused_ppo_loss / fused_linear_ppo_loss on its shard with the group equals the whole-vocabulary
    call in this process (float64, backend "torch"): loss, metrics, and this rank's slice of every gradient."""
    import torch.distributed as dist
    from verl.utils import tensordict_utils as tu

    start, size = TP_SHARDS[V][rank]
    if V % world == 0:
        assert start == rank * (V // world)  # what a Megatron actor passes
    group = dist.group.WORLD  # stands for mpu.get_tensor_model_parallel_group()
    for seed, loss_mode in enumerate(TP_LOSS_MODES):
        label = f"{loss_mode}, V={V}, rank {rank} of {world}"
        data, logits = micro_batch(20 + seed, kl=True, V=V)
        tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=None, global_batch_size=None)
        config = tp_config(loss_mode)

        whole = logits.clone().requires_grad_(True)
        want = dkv.fused_ppo_loss(config, whole, data, backend="torch")
        want[0].backward()
        shard = logits[:, start:start + size].clone().requires_grad_(True)
        got = dkv.fused_ppo_loss(config, shard, data, backend="torch", vocab_start=start, vocab_group=group)
        got[0].backward()
        assert_same_loss_and_metrics(got, want, label)
        torch.testing.assert_close(shard.grad, whole.grad[:, start:start + size], rtol=1e-12, atol=1e-15,
                                   msg=lambda m: f"logits gradient ({label}): {m}")
        assert want[1]["actor/pg_clipfrac"].aggregate() > 0, label  # the batch exercises the clip

        # the fused LM head: this rank's rows of weight and bias; hidden's gradient summed over the group by the op
        gen = torch.Generator().manual_seed(40 + seed)
        H = 8
        params = dict(hidden=torch.randn(logits.shape[0], H, generator=gen, dtype=torch.float64),
                      weight=torch.randn(V, H, generator=gen, dtype=torch.float64) * 0.7,
                      bias=torch.randn(V, generator=gen, dtype=torch.float64) * 0.3)
        ref = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        want = dkv.fused_linear_ppo_loss(config, ref["hidden"], ref["weight"], data, bias=ref["bias"],
                                         backend="torch", chunk_rows=3)
        want[0].backward()
        ours = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        got = dkv.fused_linear_ppo_loss(config, ours["hidden"], ours["weight"][start:start + size], data,
                                        bias=ours["bias"][start:start + size], backend="torch", chunk_rows=3,
                                        vocab_start=start, vocab_group=group)
        got[0].backward()
        assert_same_loss_and_metrics(got, want, "linear " + label)
        for name in params:
            mine, full = ours[name].grad, ref[name].grad
            if name != "hidden":  # this rank's rows of the head; the other rows get no gradient here
                assert not mine[:start].any() and not mine[start + size:].any(), (label, name)
                mine, full = mine[start:start + size], full[start:start + size]
            # float64; hidden's is the all-reduced sum of the ranks' parts, so summed in another order
            torch.testing.assert_close(mine, full, rtol=1e-12, atol=1e-14 * ref[name].grad.abs().max().item(),
                                       msg=lambda m: f"{name} gradient (linear {label}): {m}")


def tp_worker(rank, world, store, V):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        check_tensor_parallel(rank, world, V)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@needs_verl
@pytest.mark.parametrize("V", [12, 11], ids=["V12-megatron-split", "V11-unequal"])
def test_fused_actor_loss_on_vocab_shards_equals_the_whole_vocabulary(V, tmp_path):
    """verl's Megatron actor under tensor parallelism: 2 gloo ranks, each with its vocabulary shard of the logits
    (or its rows of the LM head) and the group, equal fused_ppo_loss / fused_linear_ppo_loss on the whole
    vocabulary in one process, for vanilla, delta-l and gspo with the KL loss and the entropy bonus."""
    import os

    import torch.multiprocessing as mp

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    mp.spawn(tp_worker, args=(2, str(tmp_path / "store"), V), nprocs=2, join=True)
