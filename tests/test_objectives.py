"""The objectives beyond per-token PPO (issue 14): GSPO's sequence ratio, CISPO, rollout correction,
separately aggregated KL/entropy terms, and the Delta-L authors' rollout-batch normaliser.

The formulas are checked by hand-derived values, by the identities that define them (GSPO-token has
GSPO's gradient; a separately weighted KL term is a sum of two ordinary losses), against TRL 1.16's
own ``GRPOTrainer._compute_loss``, and every backend against the float64 reference.
"""
import math
import types
from collections import defaultdict

import pytest
import torch

import deltal_kernels as dk
from deltal_kernels import reference
from deltal_kernels.validation import prepare

from cases import BACKENDS, as_float64, assert_matches_reference, backend_device, make_batch, run

LENGTHS = [0, 5, 1, 0, 9, 3, 0]
OPTIONS = {
    "gspo": dict(agg="grpo", ratio_level="sequence"),
    "gspo-delta-l": dict(max_len=16, ratio_level="sequence", clip_low=0.1, clip_high=0.2),
    "cispo": dict(agg="token-mean", objective="cispo", clip_low=0.2, clip_high=0.28),
    "cispo-trl": dict(agg="token-mean", objective="cispo", clip_low=1.0, clip_high=4.0),
    "token-truncate": dict(max_len=16, rollout_correction="token_truncate"),
    "token-mask": dict(max_len=16, rollout_correction="token_mask", rollout_clip=(0.5, 2.0)),
    "sequence-truncate": dict(agg="grpo", rollout_correction="sequence_truncate", rollout_clip=(0.25, 3.0)),
    "sequence-mask": dict(agg="dapo", rollout_correction="sequence_mask", rollout_clip=(0.2, 5.0)),
    "kl-entropy-token-mean": dict(max_len=16, kl_coef=0.1, entropy_coef=0.01, kl_entropy_agg="token-mean"),
    "everything": dict(max_len=16, ratio_level="sequence", objective="cispo", rollout_correction="token_mask",
                       rollout_clip=(0.5, 2.0), kl_coef=0.1, kl_type="k2", entropy_coef=0.01,
                       kl_entropy_agg="token-mean", temperature=0.8),
}


def with_rollout(batch, seed=0):
    """rollout_logprobs near old_logprobs (the sampler's numbers drift from the trainer's), one NaN."""
    gen = torch.Generator().manual_seed(seed)
    old = batch["old_logprobs"].cpu()
    rollout = old + torch.randn(old.shape, generator=gen) * 0.7
    rollout[0] = float("nan")  # a log-prob the sampler did not return
    return {**batch, "rollout_logprobs": rollout.to(batch["old_logprobs"].device)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(OPTIONS))
def test_backend_matches_reference(backend, case):
    batch = make_batch(LENGTHS, 1000, device=backend_device(backend), seed=51, ratio_spread=0.8)
    if "rollout_correction" in OPTIONS[case]:
        batch = with_rollout(batch)
    assert_matches_reference(batch, backend, **OPTIONS[case])


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_with_an_objective(backend):
    batch = make_batch(LENGTHS, 1000, device=backend_device(backend), seed=52)
    _, want = run(dk.policy_loss, batch, backend=backend, **OPTIONS["gspo"])
    _, got = run(dk.policy_loss, batch, backend=backend, inplace_backward=True, **OPTIONS["gspo"])
    assert torch.equal(got, want)


# ---- the definitions -------------------------------------------------------------------------


def test_gspo_token_form_has_gspo_gradient():
    """GSPO (arXiv 2507.18071): l_i = max(-A_i s_i, -A_i clip(s_i)), s_i = exp(mean_t(logp - old)) as one
    differentiable function of the sequence, averaged over sequences. GSPO-token with agg="grpo" must
    give the same loss and logits gradient."""
    batch = as_float64(make_batch([4, 7, 2, 5], 50, seed=53, mask_frac=0.2, ratio_spread=0.6))
    batch["advantages"] = torch.tensor([1.0, -0.5, 2.0, -1.5], dtype=torch.float64)  # per sequence
    out, grad = run(reference.policy_loss, batch, agg="grpo", ratio_level="sequence", clip_low=0.1, clip_high=0.15)

    logits = batch["logits"].clone().requires_grad_(True)
    logp = torch.log_softmax(logits, -1).gather(1, batch["targets"][:, None]).squeeze(1)
    mask, cu = batch["loss_mask"], batch["cu_seqlens"].tolist()
    per_seq = []
    for i in range(4):
        m = mask[cu[i]:cu[i + 1]]
        s = torch.exp(((logp - batch["old_logprobs"].double())[cu[i]:cu[i + 1]][m]).mean())
        A = batch["advantages"][i]
        per_seq.append(torch.maximum(-A * s, -A * torch.clamp(s, 0.9, 1.15)))
    loss = torch.stack(per_seq).mean()
    (want,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(out.loss, loss.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-14)


def test_cispo_by_hand():
    """l_t = -sg(clamp(r_t, 1 - clip_low, 1 + clip_high)) A_t logp_t; dL/dlogp_t = -w clamp(r_t) A_t."""
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(2.0), 0.0]], dtype=torch.float64)
    targets = torch.tensor([1, 1])
    logp = torch.tensor([math.log(0.75), math.log(1 / 3)], dtype=torch.float64)
    old = logp - torch.tensor([math.log(1.5), math.log(0.5)], dtype=torch.float64)  # r = 1.5 and 0.5
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    x = logits.clone().requires_grad_(True)
    out = reference.policy_loss(x, targets, old, adv, torch.tensor([0, 2]), agg="seq-mean-token-sum",
                                objective="cispo", clip_low=0.2, clip_high=0.28)
    clamped = torch.tensor([1.28, 0.8], dtype=torch.float64)
    assert math.isclose(float(out.loss.detach()), float(-(clamped * adv * logp).sum()), rel_tol=1e-14)
    assert float(out.metrics["clipfrac"]) == 1.0  # both ratios outside [0.8, 1.28]
    out.loss.backward()
    p = torch.softmax(logits, -1)
    dlogp = -clamped * adv
    want = dlogp[:, None] * (torch.nn.functional.one_hot(targets, 2) - p)
    torch.testing.assert_close(x.grad, want, rtol=1e-13, atol=0)


def test_rollout_weights_by_hand():
    """exp(old - rollout) per token or per sequence (sum of scored rows), a NaN rollout log-prob counts as
    0, clamped (truncate) or zeroed (mask) outside rollout_clip; 0 on unscored rows."""
    e = math.exp
    diffs = [0.5, -2.0, float("nan"), 3.0, 0.25]
    old = torch.zeros(5, dtype=torch.float64)
    rollout = -torch.tensor(diffs, dtype=torch.float64)
    mask = torch.tensor([True, True, True, True, False])
    cu = torch.tensor([0, 2, 5])  # sequences {0, 1} and {2, 3, (4 unscored)}

    def weights(mode, clip):
        b = prepare(torch.zeros(5, 3, dtype=torch.float64), torch.zeros(5, dtype=torch.int64), old, old, cu,
                    loss_mask=mask, ref_logprobs=None, weights=None, agg="grpo", alpha=1.0, max_len=None,
                    clip_low=0.2, clip_high=0.2, dual_clip=None, kl_coef=0.0, kl_type="k3", entropy_coef=0.0,
                    temperature=1.0, with_entropy=False, rollout_logprobs=rollout, rollout_correction=mode,
                    rollout_clip=clip)
        return reference.rollout_weights(b).tolist()

    def close(got, want):
        assert got == pytest.approx(want, rel=1e-12, abs=0)

    close(weights("token_truncate", (None, 3.0)), [e(0.5), e(-2.0), 1.0, 3.0, 0.0])
    close(weights("token_truncate", (0.5, 3.0)), [e(0.5), 0.5, 1.0, 3.0, 0.0])
    close(weights("token_mask", (0.5, 3.0)), [e(0.5), 0.0, 1.0, 0.0, 0.0])
    close(weights("sequence_truncate", (None, 3.0)), [e(-1.5), e(-1.5), 3.0, 3.0, 0.0])
    close(weights("sequence_mask", (0.1, 30.0)), [e(-1.5), e(-1.5), e(3.0), e(3.0), 0.0])
    close(weights("sequence_mask", (0.5, 30.0)), [0.0, 0.0, e(3.0), e(3.0), 0.0])


def test_rollout_correction_weights_the_policy_term_only():
    batch = as_float64(with_rollout(make_batch([4, 3], 40, seed=54)))
    opts = dict(max_len=8, kl_coef=0.1, entropy_coef=0.01)
    out = reference.policy_loss(**batch, **opts, rollout_correction="token_truncate", rollout_clip=(None, 2.0))
    b = prepare(**{k: v for k, v in batch.items()}, weights=None, agg="delta-l", alpha=1.0, dual_clip=None,
                clip_low=0.2, clip_high=0.2, kl_type="k3", temperature=1.0, with_entropy=False, max_len=8,
                kl_coef=0.1, entropy_coef=0.01, rollout_correction="token_truncate", rollout_clip=(None, 2.0))
    c = reference.rollout_weights(b)
    # the same loss with c folded into the advantages (pg is positively homogeneous in A_t) and no correction
    scaled = {**batch, "advantages": batch["advantages"] * c}
    scaled.pop("rollout_logprobs")
    want = reference.policy_loss(**scaled, **opts)
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-12, atol=1e-15)
    scored = batch["loss_mask"]
    assert float(out.metrics["rollout_weight_mean"]) == pytest.approx(float(c[scored].mean()), rel=1e-12)
    assert float(out.metrics["rollout_weight_max"]) == pytest.approx(float(c.max()), rel=1e-12)


def test_kl_entropy_agg_is_the_sum_of_two_losses():
    batch = as_float64(make_batch(LENGTHS, 60, seed=55))
    kl = dict(kl_coef=0.1, entropy_coef=0.02)
    out, grad = run(reference.policy_loss, batch, max_len=16, kl_entropy_agg="token-mean", **kl)
    pg, g_pg = run(reference.policy_loss, batch, max_len=16)
    both, g_both = run(reference.policy_loss, batch, agg="token-mean", **kl)
    pg_tm, g_pg_tm = run(reference.policy_loss, batch, agg="token-mean")
    torch.testing.assert_close(out.loss, pg.loss + both.loss - pg_tm.loss, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(grad, g_pg + g_both - g_pg_tm, rtol=1e-10, atol=1e-15)
    # kl_entropy_weights: the same from weights computed elsewhere (e.g. over the whole optimizer batch)
    lengths = dk.packing.scored_lengths(batch["cu_seqlens"], batch["loss_mask"])
    w = dk.sequence_weights(lengths, "token-mean", dtype=torch.float64)
    again, _ = run(reference.policy_loss, batch, max_len=16, kl_entropy_weights=w, **kl)
    torch.testing.assert_close(again.loss, out.loss, rtol=1e-14, atol=0)


@pytest.mark.parametrize("case", ["token-truncate", "kl-entropy-token-mean"])
def test_gradcheck_torch_backend(case):
    """float64 through the package's own path (statistics op + [N] objective + gradient kernel).
    (GSPO and CISPO stop gradients on purpose, which finite differences cannot see.)"""
    batch = as_float64(make_batch([3, 0, 2], 7, seed=56))
    if "rollout_correction" in OPTIONS[case]:
        batch = with_rollout(batch)
    logits = batch.pop("logits").clone().requires_grad_(True)

    def f(x):
        return dk.policy_loss(x, **batch, backend="torch", **OPTIONS[case]).loss

    assert torch.autograd.gradcheck(f, (logits,), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("bad,argument", [
    (dict(ratio_level="seq"), "ratio_level"),
    (dict(objective="grpo"), "objective"),
    (dict(objective="cispo", dual_clip=3.0), "dual_clip"),
    (dict(clip_low=1.0), "clip_low"),  # only CISPO allows no lower bound
    (dict(rollout_correction="token_truncate"), "rollout_correction"),  # no rollout_logprobs
    (dict(rollout_correction="tis", with_rollout=True), "rollout_correction"),
    (dict(with_rollout=True), "rollout_correction"),  # rollout_logprobs without a correction
    (dict(rollout_correction="token_mask", rollout_clip=(3.0, 1.0), with_rollout=True), "rollout_clip"),
    (dict(rollout_correction="token_mask", rollout_clip=(None, None), with_rollout=True), "rollout_clip"),
    (dict(rollout_correction="token_mask", rollout_clip=3.0, with_rollout=True), "rollout_clip"),
    (dict(kl_entropy_agg="mean"), "agg"),
    (dict(kl_entropy_agg="token-mean", kl_entropy_weights=torch.ones(3)), "kl_entropy_weights"),
    (dict(kl_entropy_weights=torch.ones(2)), "kl_entropy_weights"),
])
def test_bad_objective_options_name_the_argument(bad, argument):
    batch = make_batch([3, 0, 2], 11, seed=57)
    bad = dict(bad)
    if bad.pop("with_rollout", False):
        batch = with_rollout(batch)
    with pytest.raises((ValueError, TypeError), match=argument):
        dk.policy_loss(**batch, max_len=4, **bad)


def test_authors_rollout_scope_two_mini_batches():
    """Delta-L as its authors run it: the normaliser over the rollout batch R, each optimizer mini-batch
    k's loss divided by B_k M, i.e. w_i = (B_R / B_k) L_i^-alpha / (M sum_{j in R} L_j^-alpha)."""
    R = torch.tensor([3, 5, 2, 8, 4, 6])
    alpha, M = 0.75, 8
    denom = sum(L ** -alpha for L in R.tolist())
    for k in (R[:2], R[2:]):  # mini-batches of 2 and 4 sequences
        got = dk.sequence_weights(k, "delta-l", alpha=alpha, max_len=M, rollout_lengths=R, dtype=torch.float64)
        want = [(6 / len(k)) * L ** -alpha / (M * denom) for L in k.tolist()]
        assert got.tolist() == pytest.approx(want, rel=1e-14)
    # without rollout_lengths the scope is the mini-batch itself
    k = R[:2]
    got = dk.sequence_weights(k, "delta-l", alpha=alpha, max_len=M, dtype=torch.float64)
    assert got.tolist() == pytest.approx([L ** -alpha / (M * sum(x ** -alpha for x in k.tolist())) for L in k.tolist()])
    # token-mean over R, scaled to the mini-batch: 1 / sum_R L * B_R / B_k
    got = dk.sequence_weights(k, "token-mean", rollout_lengths=R, dtype=torch.float64)
    assert got.tolist() == pytest.approx([6 / 2 / 28] * 2, rel=1e-14)
    with pytest.raises(ValueError, match="rollout_lengths"):
        dk.sequence_weights(k, "grpo", rollout_lengths=torch.tensor([1.5]))


@pytest.mark.parametrize("rollout", [[], [0, 0, 0], [3, 5], [3, 3, 8, 4], [5, 2, 8, 4, 6]],
                         ids=["empty", "all-zero", "too-few", "a-length-missing", "not-a-superset"])
def test_rollout_lengths_must_hold_the_mini_batch(rollout):
    """A mini-batch not drawn from the rollout batch would be weighted by B_R / B_k of unrelated counts
    (an empty or all-zero R gave all-zero weights: a loss of 0, training silently stopped)."""
    k = torch.tensor([3, 0, 5, 3])
    with pytest.raises(ValueError, match="rollout_lengths: .*not drawn from the rollout batch"):
        dk.sequence_weights(k, "delta-l", max_len=8, rollout_lengths=torch.tensor(rollout, dtype=torch.int64))
    # a drawn mini-batch passes, whatever the order and the unscored sequences; so does an empty one
    R = torch.tensor([5, 0, 3, 8, 3, 2])
    assert dk.sequence_weights(k, "delta-l", max_len=8, rollout_lengths=R).count_nonzero() == 3
    assert dk.sequence_weights(torch.tensor([0, 0]), "delta-l", max_len=8, rollout_lengths=R).tolist() == [0, 0]


# ---- TRL 1.16's own _compute_loss ----------------------------------------------------------------


class _Accelerator:
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def trl_loss(logits_bt, targets_bt, mask_bt, old_bt, adv_b, *, loss_type, level, eps_low, eps_high,
             is_ratio=None, beta=0.0, ref_bt=None):
    """TRL's GRPOTrainer._compute_loss on padded [B, T] inputs, with the model's per-token log-probs
    computed from ``logits_bt`` (a stand-in trainer object holds the attributes that method reads)."""
    from trl import GRPOTrainer

    def per_token_logps(model, *args, **kwargs):
        logps = torch.log_softmax(logits_bt, -1).gather(-1, targets_bt[..., None]).squeeze(-1)
        return logps, torch.zeros_like(logps), None

    B, T = mask_bt.shape
    args = types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1)
    trainer = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=per_token_logps, top_entropy_quantile=1.0,
        off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta, args=args,
        loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=is_ratio is not None,
        vllm_importance_sampling_correction=is_ratio is not None, model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, accelerator=_Accelerator(), _metrics=defaultdict(lambda: defaultdict(list)),
        _entropy_bonus_enabled=False, aux_loss_enabled=False)
    inputs = dict(prompt_ids=torch.zeros(B, 0, dtype=torch.long), prompt_mask=torch.zeros(B, 0, dtype=torch.long),
                  completion_ids=targets_bt, completion_mask=mask_bt.long(), advantages=adv_b,
                  old_per_token_logps=old_bt, num_items_in_batch=mask_bt.sum().double())
    if is_ratio is not None:
        inputs["importance_sampling_ratio"] = is_ratio
    if ref_bt is not None:
        inputs["ref_per_token_logps"] = ref_bt
    return GRPOTrainer._compute_loss(trainer, None, inputs)


@pytest.mark.parametrize("trl_case", [
    dict(loss_type="grpo", level="sequence", ours=dict(agg="grpo", ratio_level="sequence")),
    dict(loss_type="grpo", level="token", ours=dict(agg="grpo"), beta=0.05),
    dict(loss_type="cispo", level="token", ours=dict(agg="token-mean", objective="cispo")),
    dict(loss_type="dapo", level="token", ours=dict(agg="token-mean"), correction="token_truncate"),
    dict(loss_type="grpo", level="token", ours=dict(agg="grpo"), correction="token_mask"),
    dict(loss_type="dapo", level="token", ours=dict(agg="token-mean"), correction="sequence_truncate"),
    dict(loss_type="grpo", level="sequence", ours=dict(agg="grpo", ratio_level="sequence"),
         correction="sequence_mask"),
], ids=lambda c: f"{c['loss_type']}-{c['level']}-{c.get('correction')}")
def test_trl_parity(trl_case):
    pytest.importorskip("trl", reason="trl is not installed (requirements/dev.txt)")
    B, T, V = 4, 6, 30
    gen = torch.Generator().manual_seed(58)
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64) * 2
    targets = torch.randint(0, V, (B, T), generator=gen)
    lengths = torch.tensor([6, 3, 5, 1])
    mask = torch.arange(T)[None] < lengths[:, None]
    true = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    old = true + (torch.rand(B, T, generator=gen, dtype=torch.float64) - 0.5) * 0.8
    ref = true + torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.3
    rollout = old + torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.4
    adv = torch.tensor([1.0, -0.7, 0.4, -1.2], dtype=torch.float64)
    eps_low, eps_high = 0.2, (4.0 if trl_case["loss_type"] == "cispo" else 0.28)
    beta = trl_case.get("beta", 0.0)
    correction, clip = trl_case.get("correction"), (0.5, 2.0)

    # TRL's vLLM importance-sampling ratio, by TRL's rule: exp of old - sampling (summed per sequence for
    # the sequence modes), clamped (truncate) or zeroed outside [min, max] (mask)
    is_ratio = None
    if correction is not None:
        diff = (old - rollout) * mask
        if correction.startswith("sequence"):
            diff = diff.sum(-1, keepdim=True)
        is_ratio = torch.exp(diff)
        if correction.endswith("truncate"):
            is_ratio = is_ratio.clamp(*clip)
        else:
            is_ratio = is_ratio.masked_fill((is_ratio < clip[0]) | (is_ratio > clip[1]), 0.0)

    trl_logits = logits.clone().requires_grad_(True)
    want = trl_loss(trl_logits, targets, mask, old, adv, loss_type=trl_case["loss_type"], level=trl_case["level"],
                    eps_low=eps_low, eps_high=eps_high, is_ratio=is_ratio, beta=beta, ref_bt=ref)
    want.backward()

    flat = mask.reshape(-1)  # packed: the completions' rows, back to back
    ours_logits = logits.reshape(B * T, V)[flat].clone().requires_grad_(True)
    cu = dk.packing.cu_seqlens_from_lengths(lengths)
    opts = dict(trl_case["ours"])
    if trl_case["loss_type"] == "cispo":  # TRL caps the ratio at epsilon_high only
        opts.update(clip_low=1.0, clip_high=eps_high - 1.0)
    else:
        opts.update(clip_low=eps_low, clip_high=eps_high)
    if correction is not None:
        opts.update(rollout_logprobs=rollout.reshape(-1)[flat], rollout_correction=correction, rollout_clip=clip)
    if beta:
        opts.update(ref_logprobs=ref.reshape(-1)[flat], kl_coef=beta, kl_type="k3")
    out = reference.policy_loss(ours_logits, targets.reshape(-1)[flat], old.reshape(-1)[flat], adv, cu, **opts)
    out.loss.backward()
    torch.testing.assert_close(out.loss, want.detach(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(ours_logits.grad, trl_logits.grad.reshape(B * T, V)[flat], rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    batch = with_rollout(make_batch(LENGTHS, 1000, device=backend_device(backend), seed=59))
    rest = {k: v for k, v in batch.items() if k != "logits"}

    def loss_fn(logits):
        return dk.policy_loss(logits, **rest, backend=backend, **OPTIONS["everything"]).loss

    eager = batch["logits"].clone().requires_grad_(True)
    loss_fn(eager).backward()
    compiled = batch["logits"].clone().requires_grad_(True)
    torch.compile(loss_fn, fullgraph=True)(compiled).backward()  # fullgraph: a graph break is an error
    torch.testing.assert_close(compiled.grad, eager.grad)
