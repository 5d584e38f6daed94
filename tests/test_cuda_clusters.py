"""The CUDA backend's cluster schedule (sm_90 and newer): a row split over a thread-block cluster.

Rows above 4096 values that one block per row cannot keep within a quarter of the L2 are reduced by a
cluster of C blocks (README, "Performance model"); DELTAL_KERNELS_CUDA_CLUSTER forces C (1: one block
per row), so these tests run the cluster kernels at small V as well:

- against the float64 reference (loss, logprobs, entropy, metrics, gradient) for each C, odd V (rows
  off 16-byte boundaries), masked rows, empty sequences, -inf, NaN and +inf logits, and targets on
  every slice boundary; rows of huge logits (the accurate path) keep log V;
- fused and separate (forward, then the gradient kernel) results bitwise equal for every C, in place
  too, with more rows than clusters;
- the same bits whatever the batch (a row's slicing depends on V, the dtype and the GPU only);
- the setting's errors.

Everything here needs a CUDA GPU of compute capability 9.0 or newer with the extension's CUDA part.
"""
import math

import pytest
import torch

import deltal_kernels as dk
from cases import assert_matches_reference, make_batch, run
from deltal_kernels import extension
from test_extension import ext_forward, ext_forward_grad, forward_then_grad, fused_case

SETTING = extension.CLUSTER_SETTING
pytestmark = pytest.mark.skipif(extension.clusters_unavailable_reason() is not None,
                                reason=str(extension.clusters_unavailable_reason()))

CLUSTERS = ["2", "4", "8", "16"]
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def same_bits(a, b):
    """Bitwise equal, NaN included (a row of huge logits may have a non-finite gradient: README, the
    float32 lse limit; fused and separate must still agree bit for bit)."""
    view = _INT_VIEW.get(a.dtype)
    return a.dtype == b.dtype and (torch.equal(a.view(view), b.view(view)) if view else torch.equal(a, b))


@pytest.fixture
def cluster(monkeypatch, request):
    monkeypatch.setenv(SETTING, request.param)
    return int(request.param)


@pytest.mark.parametrize("cluster", CLUSTERS, indirect=True)
@pytest.mark.parametrize("dtype, V", [(torch.float32, 4097), (torch.bfloat16, 32003), (torch.float16, 8192),
                                      (torch.bfloat16, 151936)], ids=str)
def test_matches_reference(cluster, dtype, V):
    batch = make_batch([3, 0, 5, 2], V, dtype=dtype, device="cuda", seed=V + cluster)
    assert_matches_reference(batch, "cuda", max_len=8, kl_coef=0.1, entropy_coef=0.01, temperature=0.8)


@pytest.mark.parametrize("cluster", CLUSTERS, indirect=True)
def test_targets_on_slice_boundaries(cluster):
    """The slice that holds the target sends its logit to the others: targets at every slice's first
    and last element. Packets split evenly, the row's unaligned head to rank 0, its tail to the last
    rank; at V = 8195 fp32 consecutive rows start 0, 12, 8, 4 bytes past a 16-byte boundary (heads of
    0, 1, 2, 3 values), so each target sits on 4 consecutive rows, and offsets -2..+4 around the
    aligned bounds reach every rank's first and last element for every head."""
    V = 8195
    per = (V // 4) // cluster * 4  # fp32 values per slice of an aligned row (the split rounds down)
    edges = sorted({max(0, min(V - 1, r * per + d)) for r in range(cluster + 1) for d in range(-2, 5)})
    targets = [t for t in edges for _ in range(4)]
    batch = make_batch([len(targets)], V, device="cuda", seed=cluster, mask_frac=0.0)
    batch["targets"] = torch.tensor(targets, device="cuda")
    assert_matches_reference(batch, "cuda", max_len=len(targets), with_entropy=True)


@pytest.mark.parametrize("cluster", CLUSTERS, indirect=True)
def test_non_finite_rows(cluster):
    """-inf logits (a masked vocabulary) have probability 0; a NaN or +inf logit gives a NaN row."""
    V = 6000
    batch = make_batch([4, 4], V, device="cuda", seed=3, mask_frac=0.0)
    logits = batch["logits"]
    logits[:, 7::3] = float("-inf")
    batch["targets"] = torch.where(batch["targets"] % 3 == 1, batch["targets"] + 1, batch["targets"]) % V
    logits[1, V // 2] = float("nan")
    logits[2, V - 1] = float("inf")
    assert_matches_reference(batch, "cuda", equal_nan=True, max_len=4, with_entropy=True)


@pytest.mark.parametrize("cluster", CLUSTERS, indirect=True)
def test_huge_rows_take_the_accurate_path(cluster):
    """Rows of uniform logits 1e30 (|x log2(e) / tau| above 2^24): every block of the cluster reduces
    the whole row again from rounded products, so logp = -log V and H = log V at a temperature other
    than 1 too; the other rows are unaffected."""
    V = 6000
    batch = make_batch([2, 2], V, device="cuda", seed=4, mask_frac=0.0)
    batch["logits"][1] = 1e30
    batch["logits"][2] = 1e30
    out, _ = run(dk.policy_loss, batch, backend="cuda", max_len=4, with_entropy=True, temperature=0.7)
    huge, normal = torch.tensor([1, 2]), torch.tensor([0, 3])
    torch.testing.assert_close(out.logprobs.cpu()[huge], torch.full((2,), -math.log(V)), rtol=1e-6, atol=0)
    torch.testing.assert_close(out.entropy.cpu()[huge], torch.full((2,), math.log(V)), rtol=1e-6, atol=0)
    z = batch["logits"].double().cpu()[normal] / 0.7
    want = torch.log_softmax(z, -1).gather(1, batch["targets"].cpu()[normal, None]).squeeze(1)
    torch.testing.assert_close(out.logprobs.double().cpu()[normal], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cluster", CLUSTERS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_fused_equals_forward_then_grad(cluster, dtype):
    """More rows than resident clusters; masked rows, zero-weight rows, -inf logits, a row of huge logits;
    in place too."""
    N, V = 700, 20011
    logits, r, weights = fused_case(N, V, "cuda", dtype, seed=cluster)
    if dtype != torch.float16:
        logits[3] = 1e30  # the accurate path: every block re-reads the whole row before any stores over it
    want_rows, want_grad = forward_then_grad(logits, r, weights, 0.5)
    out = torch.empty_like(logits)
    got_rows = ext_forward_grad(logits, r, weights, 0.5, out)
    assert all(same_bits(a, b) for a, b in zip(got_rows, want_rows))
    assert same_bits(out, want_grad)
    in_place = logits.clone()
    got_rows = ext_forward_grad(in_place, r, weights, 0.5, in_place)
    assert all(same_bits(a, b) for a, b in zip(got_rows, want_rows))
    assert same_bits(in_place, want_grad)


@pytest.mark.parametrize("cluster", ["4", "16"], indirect=True)
def test_batch_invariant(cluster):
    """A row gives the same bits alone and inside a larger batch."""
    logits, r, _ = fused_case(64, 30000, "cuda", torch.bfloat16, seed=11)
    whole = ext_forward(logits, r)
    for i in (0, 17, 63):
        one = ext_forward(logits[i:i + 1], {k: v[i:i + 1] for k, v in r.items()})
        assert all(torch.equal(a, b[i:i + 1]) for a, b in zip(one, whole))


def test_auto_takes_clusters_where_one_block_per_row_overflows_the_l2(monkeypatch):
    """auto on this GPU: the same bits as the cluster size its rule picks, for a V above the threshold;
    below it, the same bits as one block per row."""
    props = torch.cuda.get_device_properties(0)
    quarter = props.L2_cache_size // 4
    sms = props.multi_processor_count

    def rule(V, itemsize=2):
        row = V * itemsize
        if sms * row <= quarter:
            return 1
        c = 2
        while c < 16 and 2 * sms * row > quarter * c:
            c *= 2
        return c

    for V in (8192, 151936):
        logits, r, _ = fused_case(32, V, "cuda", torch.bfloat16, seed=V)
        monkeypatch.setenv(SETTING, "auto")
        auto = ext_forward(logits, r)
        monkeypatch.setenv(SETTING, str(rule(V)))
        forced = ext_forward(logits, r)
        assert all(torch.equal(a, b) for a, b in zip(auto, forced)), (V, rule(V))


@pytest.mark.parametrize("value", ["3", "32", "on", "0"])
def test_setting_rejects_other_values(monkeypatch, value):
    monkeypatch.setenv(SETTING, value)
    logits, r, _ = fused_case(4, 5000, "cuda", torch.float32, seed=1)
    with pytest.raises(ValueError, match=SETTING):
        ext_forward(logits, r)
