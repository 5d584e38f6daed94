"""Every malformed call of SPEC section 3 raises a ValueError/TypeError naming the argument, before any kernel."""
import pytest
import torch

import deltal_kernels as dk

from cases import make_batch


def call(fn=dk.policy_loss, **changes):
    batch = make_batch([3, 0, 2], 11, seed=31)
    options = dict(max_len=4)
    for k, v in changes.items():
        (batch if k in batch else options)[k] = v
    return fn(**batch, **options)


def bad(argument, **changes):
    return pytest.param(argument, changes, id=f"{argument}:{'/'.join(changes)}")


B = make_batch([3, 0, 2], 11, seed=31)
CASES = [
    bad("logits", logits=B["logits"][None]),
    bad("logits", logits=B["logits"].to(torch.int64)),
    bad("logits", logits=B["logits"][:, :0]),
    bad("targets", targets=B["targets"][:-1]),
    bad("targets", targets=B["targets"].float()),
    bad("targets", targets=B["targets"] + 11),
    bad("targets", targets=B["targets"] - 11),
    bad("old_logprobs", old_logprobs=B["old_logprobs"][:, None]),
    bad("old_logprobs", old_logprobs=B["old_logprobs"].long()),
    bad("ref_logprobs", ref_logprobs=B["ref_logprobs"][:2]),
    bad("advantages", advantages=B["advantages"][:4]),
    bad("advantages", advantages=torch.full_like(B["advantages"], float("nan"))),
    bad("advantages", advantages=B["advantages"].long()),
    bad("advantages", advantages=torch.full_like(B["advantages"], float("inf"))),
    bad("advantages", advantages=torch.full_like(B["advantages"], float("-inf"))),
    bad("cu_seqlens", cu_seqlens=torch.tensor([1, 3, 3, 5])),
    bad("cu_seqlens", cu_seqlens=torch.tensor([0, 3, 2, 5])),
    bad("cu_seqlens", cu_seqlens=torch.tensor([0, 3, 3, 4])),
    bad("cu_seqlens", cu_seqlens=torch.tensor([0.0, 3.0, 3.0, 5.0])),
    bad("cu_seqlens", cu_seqlens=torch.tensor([[0, 5]])),
    bad("loss_mask", loss_mask=B["loss_mask"][:3]),
    bad("loss_mask", loss_mask=B["loss_mask"].float() * 0.5),
    bad("loss_mask", loss_mask=B["loss_mask"].to(torch.int64) * 2),
    bad("loss_mask", loss_mask=B["loss_mask"].to(torch.complex64)),
    bad("weights", weights=torch.ones(2)),
    bad("weights", weights=torch.tensor([1.0, float("nan"), 1.0])),
    bad("alpha", alpha=1.5),
    bad("alpha", alpha=-0.1),
    bad("max_len", max_len=None),
    bad("max_len", max_len=0),
    bad("agg", agg="mean"),
    bad("backend", backend="tpu"),
    bad("clip_low", clip_low=1.0),
    bad("clip_high", clip_high=-0.1),
    bad("clip_high", clip_high=float("inf")),
    bad("dual_clip", dual_clip=1.0),
    bad("dual_clip", dual_clip=float("inf")),
    bad("kl_coef", kl_coef=float("inf")),
    bad("kl_coef", kl_coef=float("nan")),
    bad("entropy_coef", entropy_coef=float("-inf")),
    bad("kl_type", kl_type="k4", kl_coef=0.1),
    bad("ref_logprobs", ref_logprobs=None, kl_coef=0.1),
    bad("temperature", temperature=0.0),
    bad("temperature", temperature=1e-40),  # its reciprocal overflows float32
    bad("temperature", temperature=1e39),
    bad("temperature", temperature=float("inf")),
    bad("with_entropy", with_entropy="yes"),
    bad("inplace_backward", inplace_backward=1),
]


@pytest.mark.parametrize("argument,changes", CASES)
def test_bad_input_names_the_argument(argument, changes):
    with pytest.raises((ValueError, TypeError), match=argument):
        call(dk.policy_loss, **changes)


# the reference ignores backend and inplace_backward (accepted for signature parity only)
@pytest.mark.parametrize("argument,changes", [c for c in CASES if c.values[0] not in ("backend", "inplace_backward")])
def test_reference_bad_input_names_the_argument(argument, changes):
    with pytest.raises((ValueError, TypeError), match=argument):
        call(dk.reference.policy_loss, **changes)


def test_tensors_on_another_device_are_rejected():
    meta = torch.empty(5, device="meta")
    with pytest.raises(ValueError, match="old_logprobs"):
        call(old_logprobs=meta)


def test_asking_for_an_unavailable_backend_is_an_error_not_a_fallback():
    unavailable = [b for b in ("cuda", "triton", "cpu") if b not in dk.available_backends("cpu")]
    assert "cuda" in unavailable  # CPU tensors never run on the cuda backend
    for name in unavailable:
        with pytest.raises(ValueError, match="backend"):
            call(backend=name)


def test_float64_logits_only_on_the_torch_backend():
    for name in dk.available_backends("cpu"):
        batch = make_batch([2], 5, dtype=torch.float64)
        if name == "torch":
            assert torch.isfinite(dk.policy_loss(**batch, max_len=4, backend=name).loss)
        else:
            with pytest.raises(TypeError, match="logits"):
                dk.policy_loss(**batch, max_len=4, backend=name)


@pytest.mark.parametrize("lengths,kw,argument", [
    (torch.tensor([1.0]), {"agg": "grpo"}, "lengths"),
    (torch.tensor([[1]]), {"agg": "grpo"}, "lengths"),
    (torch.tensor([-1, 2]), {"agg": "grpo"}, "lengths"),
    (torch.tensor([1, 2]), {"agg": "nope"}, "agg"),
    (torch.tensor([1, 2]), {"agg": "delta-l"}, "max_len"),
    (torch.tensor([1, 2]), {"agg": "grpo", "alpha": 2.0}, "alpha"),
    (torch.tensor([1, 2]), {"agg": "grpo", "grad_reduction": "avg"}, "grad_reduction"),
])
def test_sequence_weights_bad_input(lengths, kw, argument):
    with pytest.raises((ValueError, TypeError), match=argument):
        dk.sequence_weights(lengths, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int32, torch.uint8], ids=str)
def test_0_1_masks_of_any_dtype_equal_the_bool_mask(dtype):
    batch = make_batch([3, 0, 2], 11, seed=32)
    want = dk.policy_loss(**batch, max_len=4, backend="torch")
    got = dk.policy_loss(**{**batch, "loss_mask": batch["loss_mask"].to(dtype)}, max_len=4, backend="torch")
    assert torch.equal(got.loss, want.loss) and torch.equal(got.logprobs, want.logprobs)


def test_validate_runs_the_value_checks_a_compiled_call_skips():
    batch = make_batch([3, 0, 2], 11, seed=33)
    dk.validate(**batch, max_len=4)  # a valid batch: no error
    bad_offsets = {**batch, "cu_seqlens": torch.tensor([0, 3, 9, 2])}
    with pytest.raises(ValueError, match="cu_seqlens"):
        dk.validate(**bad_offsets, max_len=4)
    with pytest.raises(ValueError, match="targets"):
        dk.validate(**{**batch, "targets": batch["targets"] + 11}, max_len=4)
    with pytest.raises(TypeError, match="validate"):
        dk.validate(**batch, max_len=4, not_an_option=1)

    @torch.compile(fullgraph=True)
    def compiled(cu_seqlens):
        return dk.policy_loss(**{**batch, "cu_seqlens": cu_seqlens}, max_len=4, backend="torch").loss

    # compiled, the value checks are skipped: the offsets are forced into range, never read out of bounds
    assert torch.isfinite(compiled(bad_offsets["cu_seqlens"]))
