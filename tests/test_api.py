"""The public API surface of SPEC section 2."""
import subprocess
import sys

import pytest
import torch

import deltal_kernels as dk

from cases import make_batch, run


def test_output_fields_and_metrics():
    batch = make_batch([3, 0, 4], 20, seed=41)
    batch["logits"].requires_grad_(True)
    out = dk.policy_loss(**batch, max_len=8, kl_coef=0.1)
    assert out.loss.shape == () and out.loss.requires_grad
    assert out.logprobs.shape == (7,) and not out.logprobs.requires_grad
    assert not out.logprobs[~batch["loss_mask"]].any()  # 0 where not scored
    assert out.entropy is None
    assert set(out.metrics) == {"clipfrac", "clipfrac_lower", "approx_kl", "kl"}
    with_h = dk.policy_loss(**batch, max_len=8, with_entropy=True)
    assert with_h.entropy.shape == (7,) and "entropy" in with_h.metrics
    assert "entropy" in dk.policy_loss(**batch, max_len=8, entropy_coef=0.01).metrics
    assert torch.equal(with_h.loss, dk.policy_loss(**batch, max_len=8).loss)  # entropy reporting changes no loss


def test_module_equals_function():
    batch = make_batch([3, 2], 20, seed=42)
    module = dk.PolicyLoss(agg="grpo", clip_high=0.28, kl_coef=0.05)
    tensors = {k: batch[k] for k in ("logits", "targets", "old_logprobs", "advantages", "cu_seqlens")}
    out = module(**tensors, loss_mask=batch["loss_mask"], ref_logprobs=batch["ref_logprobs"])
    ref = dk.policy_loss(**batch, agg="grpo", clip_high=0.28, kl_coef=0.05)
    assert torch.equal(out.loss, ref.loss)
    assert "agg='grpo'" in repr(module)
    with pytest.raises(TypeError, match="clip_hgh"):
        dk.PolicyLoss(clip_hgh=0.3)


def test_available_backends_auto_order():
    names = dk.available_backends("cpu")
    assert "torch" in names and "cuda" not in names
    batch = make_batch([2, 2], 10, seed=43)
    auto, g_auto = run(dk.policy_loss, batch, max_len=4)
    first, g_first = run(dk.policy_loss, batch, max_len=4, backend=names[0])
    assert torch.equal(auto.loss, first.loss) and torch.equal(g_auto, g_first)  # auto is the first listed


def test_cli_reports_backends_and_versions():
    out = subprocess.run([sys.executable, "-m", "deltal_kernels"], capture_output=True, text=True, check=True).stdout
    assert f"deltal_kernels {dk.__version__}" in out
    assert f"torch {torch.__version__}" in out
    assert "backends for cpu tensors (auto order): " + ", ".join(dk.available_backends("cpu")) in out


def test_gradient_flows_only_to_logits():
    batch = make_batch([3, 2], 10, seed=44)
    old = batch["old_logprobs"].clone().requires_grad_(True)
    adv = batch["advantages"].clone().requires_grad_(True)
    logits = batch["logits"].clone().requires_grad_(True)
    out = dk.policy_loss(logits, batch["targets"], old, adv, batch["cu_seqlens"], max_len=4)
    grads = torch.autograd.grad(out.loss, [logits, old, adv], allow_unused=True)
    assert grads[0] is not None and grads[1] is None and grads[2] is None


def test_import_does_not_load_the_compiler():
    """`import deltal_kernels` stays cheap: torch._dynamo (~2 s) loads only when something compiles."""
    code = "import sys, deltal_kernels; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_constant_result_sets_what_torch_compile_reads():
    from deltal_kernels.dispatch import constant_result

    def ours():
        return 0

    def theirs():
        return 0

    torch.compiler.assume_constant_result(theirs)
    assert constant_result(ours) is ours and vars(ours) == vars(theirs) == {"_dynamo_marked_constant": True}
