"""The CUDA backend's cluster schedule (sm_90 and newer): a row split over a thread-block cluster.

Rows above 4096 values that one block per row cannot keep within a quarter of the L2 are reduced by a
cluster of C blocks (README, "Performance model"); DELTAL_KERNELS_CUDA_CLUSTER forces C (1: one block
per row), so these tests run the cluster kernels at small V as well:

- against the float64 reference (loss, logprobs, entropy, metrics, gradient) for each C, odd V (rows
  off 16-byte boundaries), masked rows, empty sequences, -inf logits, huge logits (the accurate path),
  and targets on every slice boundary;
- fused and separate (forward, then the gradient kernel) results bitwise equal for every C, in place
  too, with more rows than clusters;
- the same bits whatever the batch (a row's slicing depends on V, the dtype and the GPU only);
- the setting's errors.

Everything here needs a CUDA GPU of compute capability 9.0 or newer with the extension's CUDA part.
"""
import pytest
import torch

from cases import assert_matches_reference, make_batch
from deltal_kernels import extension
from test_extension import ext_forward, ext_forward_grad, forward_then_grad, fused_case

SETTING = "DELTAL_KERNELS_CUDA_CLUSTER"


def _reason():
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    reason = extension.unavailable_reason("cuda")
    if reason is not None:
        return f"CUDA backend: {reason}"
    major, minor = torch.cuda.get_device_capability()
    if major < 9:
        return f"thread-block clusters need compute capability 9.0 or newer (this GPU: {major}.{minor})"
    return None


pytestmark = pytest.mark.skipif(_reason() is not None, reason=str(_reason()))

CLUSTERS = ["2", "4", "8", "16"]


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
    and last element (packets split evenly, the row's head to rank 0, its tail to the last rank)."""
    V = 8195  # odd: every second row starts off a 16-byte boundary
    per = (V // 4) // cluster * 4  # fp32 packets per slice (about: the split rounds down)
    edges = sorted({max(0, min(V - 1, r * per + d)) for r in range(cluster + 1) for d in (-2, -1, 0, 1, 2)})
    batch = make_batch([len(edges)], V, device="cuda", seed=cluster, mask_frac=0.0)
    batch["targets"] = torch.tensor(edges, device="cuda")
    assert_matches_reference(batch, "cuda", max_len=len(edges), with_entropy=True)


@pytest.mark.parametrize("cluster", CLUSTERS, indirect=True)
def test_non_finite_and_huge_rows(cluster):
    """-inf logits (a masked vocabulary), rows of +inf/NaN (NaN rows), and logits of 1e30 that take the
    accurate path in every block of the cluster."""
    V = 6000
    batch = make_batch([4, 4], V, device="cuda", seed=3, mask_frac=0.0)
    logits = batch["logits"]
    logits[:, 7::3] = float("-inf")
    batch["targets"] = torch.where(batch["targets"] % 3 == 1, batch["targets"] + 1, batch["targets"]) % V
    logits[1, V // 2] = float("nan")
    logits[2, V - 1] = float("inf")
    logits[5] *= 1e29  # |x log2(e)| well above 2^24
    assert_matches_reference(batch, "cuda", equal_nan=True, max_len=4, with_entropy=True)


@pytest.mark.parametrize("cluster", CLUSTERS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_fused_equals_forward_then_grad(cluster, dtype):
    """More rows than resident clusters; masked rows, zero-weight rows, -inf logits; in place too."""
    N, V = 700, 20011
    logits, r, weights = fused_case(N, V, "cuda", dtype, seed=cluster)
    want_rows, want_grad = forward_then_grad(logits, r, weights, 0.5)
    out = torch.empty_like(logits)
    got_rows = ext_forward_grad(logits, r, weights, 0.5, out)
    assert all(torch.equal(a, b) for a, b in zip(got_rows, want_rows))
    assert torch.equal(out, want_grad)
    in_place = logits.clone()
    got_rows = ext_forward_grad(in_place, r, weights, 0.5, in_place)
    assert all(torch.equal(a, b) for a, b in zip(got_rows, want_rows))
    assert torch.equal(in_place, want_grad)


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
