"""Property tests over random ragged batches (hypothesis)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import deltal_kernels as dk

from cases import make_batch, run

lengths_st = st.lists(st.integers(0, 6), min_size=0, max_size=6)
agg_st = st.sampled_from(sorted(dk.AGGREGATIONS))
SETTINGS = settings(max_examples=40, deadline=None)


@SETTINGS
@given(lengths=lengths_st, agg=agg_st, alpha=st.floats(0, 1), V=st.integers(1, 40), seed=st.integers(0, 2**16),
       mask_frac=st.sampled_from([0.0, 0.3, 1.0]), dual=st.sampled_from([None, 2.0]),
       kl_type=st.sampled_from(["k1", "k2", "k3"]), entropy_coef=st.sampled_from([0.0, 0.05]))
def test_torch_backend_matches_reference_float64(lengths, agg, alpha, V, seed, mask_frac, dual, kl_type,
                                                 entropy_coef):
    batch = make_batch(lengths, V, dtype=torch.float64, seed=seed, mask_frac=mask_frac)
    batch = {k: (v.double() if v.is_floating_point() else v) for k, v in batch.items()}
    options = dict(agg=agg, alpha=alpha, max_len=7, dual_clip=dual, kl_type=kl_type, kl_coef=0.1,
                   entropy_coef=entropy_coef)
    ref, g_ref = run(dk.reference.policy_loss, batch, **options)
    out, g = run(dk.policy_loss, batch, backend="torch", **options)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.logprobs, ref.logprobs, rtol=1e-12, atol=1e-12)
    for name in ref.metrics:
        torch.testing.assert_close(out.metrics[name], ref.metrics[name], rtol=1e-12, atol=1e-12)
    assert torch.isfinite(out.loss)


@SETTINGS
@given(lengths=lengths_st, alpha=st.floats(0, 1), max_len=st.integers(1, 16))
def test_weight_identities(lengths, alpha, max_len):
    L = torch.tensor(lengths, dtype=torch.long)
    live = L > 0
    w = {agg: dk.sequence_weights(L, agg, alpha=alpha, max_len=max_len, dtype=torch.float64) for agg in dk.AGGREGATIONS}
    assert all(not v[~live].any() for v in w.values())  # empty sequences weigh nothing
    if not live.any():
        return
    G = int(live.sum())
    # each normalisation's defining identity
    assert float((w["token-mean"] * L).sum()) == pytest.approx(1.0)
    assert float((w["seq-mean-token-mean"] * L).sum()) == pytest.approx(1.0)
    assert float(w["seq-mean-token-sum"].sum()) == pytest.approx(1.0)
    assert float(w["seq-mean-token-sum-norm"].sum()) == pytest.approx(1.0 / max_len)
    assert float(w["delta-l"].sum()) == pytest.approx(1.0 / max_len)
    # Delta-L interpolates: alpha weights are proportional to L^-alpha among live sequences
    ratio = w["delta-l"][live] * L[live].double() ** alpha
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-12)
    assert G == len([x for x in lengths if x > 0])


@SETTINGS
@given(rows=st.lists(st.lists(st.integers(1, 9), max_size=5), max_size=5), left=st.booleans())
def test_pack_unpack_roundtrip(rows, left):
    T = max([len(r) for r in rows] + [1])
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(T - len(r), T) if left else slice(0, len(r))
        ids[i, span] = torch.tensor(r, dtype=torch.long)
        mask[i, span] = 1
    packed = dk.packing.pack(ids, mask)
    assert packed.values.tolist() == [x for r in rows for x in r]
    assert dk.packing.lengths_from_cu_seqlens(packed.cu_seqlens).tolist() == [len(r) for r in rows]
    assert torch.equal(dk.packing.unpack(packed.values, mask), ids)
    targets, valid = dk.packing.next_token_targets(packed.values, packed.cu_seqlens)
    assert targets[valid].tolist() == [x for r in rows for x in r[1:]]
