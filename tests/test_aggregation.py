"""Sequence weights of every aggregation, the Delta-L identities, the authors' implementation,
micro-batch slicing and per-row/per-sequence advantages."""
import pytest
import torch

import deltal_kernels as dk

from cases import make_batch, run

LENGTHS = torch.tensor([4, 0, 1, 7, 2])  # one empty sequence: it counts nowhere
LIVE = [4, 1, 7, 2]
M = 8


def weights(agg, **kw):
    return dk.sequence_weights(LENGTHS, agg, max_len=M, **kw).tolist()


def test_token_mean():
    expected = [1 / sum(LIVE) if L else 0.0 for L in LENGTHS.tolist()]
    assert weights("token-mean") == pytest.approx(expected) == weights("dapo")


def test_seq_mean_token_mean():
    expected = [1 / (len(LIVE) * L) if L else 0.0 for L in LENGTHS.tolist()]
    assert weights("seq-mean-token-mean") == pytest.approx(expected) == weights("grpo")


def test_seq_mean_token_sum():
    expected = [1 / len(LIVE) if L else 0.0 for L in LENGTHS.tolist()]
    assert weights("seq-mean-token-sum") == pytest.approx(expected)


def test_dr_grpo():
    expected = [1 / (len(LIVE) * M) if L else 0.0 for L in LENGTHS.tolist()]
    assert weights("seq-mean-token-sum-norm") == pytest.approx(expected) == weights("dr-grpo")


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.75, 1.0])
def test_delta_l_formula(alpha):
    norm = sum(L ** -alpha for L in LIVE)
    expected = [L ** -alpha / (M * norm) if L else 0.0 for L in LENGTHS.tolist()]
    assert weights("delta-l", alpha=alpha) == pytest.approx(expected)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_delta_l_live_weights_sum_to_one_over_max_len(alpha):
    assert sum(weights("delta-l", alpha=alpha)) == pytest.approx(1 / M)


def test_delta_l_alpha0_is_dr_grpo():
    assert weights("delta-l", alpha=0.0) == pytest.approx(weights("dr-grpo"))


def test_delta_l_alpha1_is_grpo_times_harmonic_mean_over_max_len():
    harmonic_mean = len(LIVE) / sum(1 / L for L in LIVE)
    grpo = weights("grpo")
    assert weights("delta-l", alpha=1.0) == pytest.approx([w * harmonic_mean / M for w in grpo])


def test_no_live_sequence_gives_zero_weights():
    for agg in dk.AGGREGATIONS:
        assert dk.sequence_weights(torch.tensor([0, 0]), agg, max_len=4).tolist() == [0.0, 0.0]
    assert dk.sequence_weights(torch.tensor([], dtype=torch.long), "grpo").numel() == 0


def test_weights_follow_the_default_dtype_and_grad_reduction_without_group_does_not_scale():
    w = dk.sequence_weights(LENGTHS, "grpo")
    assert w.dtype == torch.float32
    assert torch.equal(w, dk.sequence_weights(LENGTHS, "grpo", grad_reduction="sum"))
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        w64 = dk.sequence_weights(LENGTHS, "delta-l", alpha=0.5, max_len=9)
    finally:
        torch.set_default_dtype(default)
    want = [L ** -0.5 / (9 * sum(x ** -0.5 for x in LENGTHS.tolist() if x)) if L else 0.0 for L in LENGTHS.tolist()]
    assert w64.dtype == torch.float64 and w64.tolist() == pytest.approx(want, rel=1e-15)


def test_float64_logits_refuse_weights_rounded_to_float32():
    """The float64 loss of a float64 user would silently be 6e-8 off with float32 weights."""
    batch = make_batch([3, 4], 20, dtype=torch.float64, seed=3, mask_frac=0.0)
    lengths = torch.tensor([3, 4])
    for name in ("weights", "kl_entropy_weights"):
        with pytest.raises(TypeError, match=f"{name}: float64 logits .*dtype=torch.float64"):
            dk.policy_loss(**batch, **{name: dk.sequence_weights(lengths, "grpo")}, agg="grpo", backend="torch")
    w = dk.sequence_weights(lengths, "grpo", dtype=torch.float64)
    want = dk.reference.policy_loss(**batch, agg="grpo").loss
    assert dk.policy_loss(**batch, weights=w, backend="torch").loss.item() == pytest.approx(want.item(), rel=1e-15)


@pytest.mark.parametrize("alpha", [1.0, 0.75])
def test_delta_l_equals_the_authors_verl_implementation(alpha):
    """The authors' verl fork: advantages scaled by L_i^-alpha / mean_j L_j^-alpha, then the padded
    [B, M] token-level PPO loss summed and divided by B * M. Written here from that description."""
    lengths = [5, 1, 8, 3, 6]
    batch = make_batch(lengths, 50, dtype=torch.float64, seed=21, mask_frac=0.0, per_seq_adv=True)
    B = len(lengths)
    logp = torch.log_softmax(batch["logits"], -1).gather(1, batch["targets"][:, None]).squeeze(1)
    ratio = torch.exp(logp - batch["old_logprobs"].double())
    L = torch.tensor(lengths, dtype=torch.float64)
    scale = L ** -alpha / (L ** -alpha).mean()
    adv = (batch["advantages"].double() * scale).repeat_interleave(torch.tensor(lengths))
    token_loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
    padded = torch.nn.utils.rnn.pad_sequence(token_loss.split(lengths), batch_first=True)  # [B, max L <= M]
    authors = padded.sum() / (B * M)

    ours = dk.reference.policy_loss(**batch, agg="delta-l", alpha=alpha, max_len=M).loss
    assert ours.item() == pytest.approx(authors.item(), rel=1e-12)
    kernel = dk.policy_loss(**{k: (v.float() if v.is_floating_point() else v) for k, v in batch.items()},
                            agg="delta-l", alpha=alpha, max_len=M).loss
    assert kernel.item() == pytest.approx(authors.item(), rel=1e-5)


@pytest.mark.parametrize("agg", ["delta-l", "token-mean", "grpo", "seq-mean-token-sum", "dr-grpo"])
def test_micro_batches_with_sliced_weights_add_up_to_the_whole_batch(agg):
    lengths = [3, 0, 5, 2, 4, 1]
    whole = make_batch(lengths, 64, seed=22)
    loss_whole, grad_whole = run(dk.policy_loss, whole, agg=agg, max_len=M, alpha=0.75)
    w = dk.sequence_weights(dk.packing.scored_lengths(whole["cu_seqlens"], whole["loss_mask"]), agg,
                            max_len=M, alpha=0.75)
    total, grads = 0.0, []
    for seqs in ([0, 1, 2], [3], [4, 5]):  # three micro-batches of whole sequences
        rows = torch.cat([torch.arange(int(whole["cu_seqlens"][s]), int(whole["cu_seqlens"][s + 1])) for s in seqs])
        micro = {k: v[rows] for k, v in whole.items() if k != "cu_seqlens"}
        micro["cu_seqlens"] = dk.packing.cu_seqlens_from_lengths(torch.tensor([lengths[s] for s in seqs]))
        out, grad = run(dk.policy_loss, micro, weights=w[seqs])
        total += out.loss.item()
        grads.append(grad)
    assert total == pytest.approx(loss_whole.loss.item(), rel=1e-6)
    torch.testing.assert_close(torch.cat(grads), grad_whole, rtol=1e-6, atol=1e-9)


def test_per_row_and_per_sequence_advantages_agree():
    batch = make_batch([3, 0, 5, 2], 64, seed=23, per_seq_adv=True)
    per_seq, g_seq = run(dk.policy_loss, batch, max_len=M)
    lengths = dk.packing.lengths_from_cu_seqlens(batch["cu_seqlens"])
    per_row_batch = dict(batch, advantages=batch["advantages"].repeat_interleave(lengths))
    per_row, g_row = run(dk.policy_loss, per_row_batch, max_len=M)
    assert torch.equal(per_seq.loss, per_row.loss) and torch.equal(g_seq, g_row)
