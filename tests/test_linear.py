"""dk.linear_policy_loss (the fused LM head) against the float64 reference on hidden @ weight.T + bias.

The reference is ``dk.reference.policy_loss`` in float64 on the logits that the materialised path
would hand it: ``hidden @ weight.T + bias`` computed by torch in the input dtype (the op's own
definition of a logits chunk), then promoted to float64. Its gradients w.r.t. hidden, weight and
bias are the float64 chain rule through that product.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import deltal_kernels as dk
from deltal_kernels.bench.measure import _cpu_peak_bytes
from deltal_kernels.dispatch import unavailable_reason

from cases import BACKENDS, ROUNDING, SMALLEST, assert_outputs_close, backend_device, make_batch

LENGTHS = [0, 5, 1, 0, 9, 3, 0]
V, H = 300, 24
OPTIONS = {
    "default": dict(max_len=16),
    "dual-clip": dict(max_len=16, dual_clip=1.5, clip_low=0.1, clip_high=0.28),
    "k1": dict(max_len=16, kl_coef=0.05, kl_type="k1"),
    "k2": dict(max_len=16, kl_coef=0.05, kl_type="k2"),
    "k3": dict(max_len=16, kl_coef=0.05, kl_type="k3"),
    "entropy-bonus": dict(max_len=16, entropy_coef=0.01, with_entropy=True),
    "temperature": dict(max_len=16, temperature=0.7, entropy_coef=0.02, kl_coef=0.1),
    "alpha-0.75": dict(max_len=16, alpha=0.75),
    "token-mean": dict(agg="token-mean"),
    "grpo": dict(agg="grpo"),
    "seq-mean-token-sum": dict(agg="seq-mean-token-sum"),
    "dr-grpo": dict(agg="dr-grpo", max_len=16),
    # the objectives beyond token-level PPO: the two-pass schedule (statistics, then recompute in backward)
    "gspo": dict(max_len=16, ratio_level="sequence", kl_coef=0.05, entropy_coef=0.01),
    "cispo": dict(max_len=16, objective="cispo", clip_high=0.28),
    "rollout-token-truncate": dict(max_len=16, rollout_correction="token_truncate", rollout_clip=(None, 1.2)),
    "rollout-sequence-mask": dict(max_len=16, rollout_correction="sequence_mask", rollout_clip=(0.5, 2.0)),
    "kl-entropy-token-mean": dict(max_len=16, kl_entropy_agg="token-mean", kl_coef=0.05, entropy_coef=0.01),
}


def make_linear(lengths, *, dtype=torch.float32, device="cpu", seed=0, mask_frac=0.25, bias=True, h=H, v=V):
    """A packed batch with hidden [N, H], weight [V, H], bias [V] whose logits look like make_batch's."""
    batch = make_batch(lengths, v, seed=seed, mask_frac=mask_frac)
    gen = torch.Generator().manual_seed(seed + 100)
    N = batch["targets"].numel()
    hidden = torch.randn(N, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64) * (2.0 / h**0.5)
    b = torch.randn(v, generator=gen, dtype=torch.float64) * 0.5 if bias else None
    # old/ref log-probs near the true ones (both sides of the clip range), as make_batch does
    logits = hidden @ weight.T + (0 if b is None else b)
    true = torch.log_softmax(logits, -1).gather(1, batch["targets"][:, None]).squeeze(1)
    spread = (torch.rand(N, generator=gen, dtype=torch.float64) * 2 - 1) * 0.5
    batch["old_logprobs"] = (true + spread).float()
    batch["ref_logprobs"] = (true + torch.randn(N, generator=gen, dtype=torch.float64) * 0.5).float()
    del batch["logits"]
    params = dict(hidden=hidden.to(dtype), weight=weight.to(dtype), bias=None if b is None else b.to(dtype))
    return {k: v.to(device) for k, v in batch.items()}, {k: None if v is None else v.to(device) for k, v in params.items()}


def run_linear(batch, params, loss_scale=None, autocast=None, **options):
    """The op's output and gradients; ``autocast``: the forward under torch.autocast in that dtype."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items() if v is not None}
    device_type = leaves["hidden"].device.type
    with torch.autocast(device_type, dtype=autocast, enabled=autocast is not None):
        out = dk.linear_policy_loss(leaves["hidden"], leaves["weight"], bias=leaves.get("bias"), **batch, **options)
    loss = out.loss if loss_scale is None else out.loss * loss_scale
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return out, dict(zip(leaves, grads))


def reference(batch, params, **options):
    """float64 reference on the logits torch's matmul gives in the input dtype; float64 chain rule."""
    p = {k: v for k, v in params.items() if v is not None}
    with torch.no_grad():
        logits = torch.nn.functional.linear(p["hidden"], p["weight"], p.get("bias"))  # nn.Linear
    x = logits.double().cpu().requires_grad_(True)
    b64 = {k: (v.double() if v.is_floating_point() else v).cpu() for k, v in batch.items()}
    opts = {k: v for k, v in options.items() if k not in ("backend", "chunk_rows")}
    if opts.get("weights") is not None:
        opts["weights"] = opts["weights"].double().cpu()
    out = dk.reference.policy_loss(x, **b64, **opts)
    (dlogits,) = torch.autograd.grad(out.loss, x)
    h64, w64 = p["hidden"].double().cpu(), p["weight"].double().cpu()
    grads = {"hidden": dlogits @ w64, "weight": dlogits.T @ h64}
    # what a product of rounded factors can be off by: sums of |terms|
    bounds = {"hidden": dlogits.abs() @ w64.abs(), "weight": dlogits.abs().T @ h64.abs()}
    if "bias" in p:
        grads["bias"], bounds["bias"] = dlogits.sum(0), dlogits.abs().sum(0)
    return out, grads, bounds, float(logits.abs().max()) if logits.numel() else 0.0


def assert_matches(batch, params, backend, autocast=None, **options):
    """Under ``autocast`` the reference is the head of F.linear under autocast: inputs cast to that dtype."""
    dtype = autocast or params["hidden"].dtype  # the matmuls'
    head = params if autocast is None else {k: None if v is None else v.to(autocast) for k, v in params.items()}
    ref, ref_grads, bounds, zmax = reference(batch, head, **options)
    out, grads = run_linear(batch, params, backend=backend, autocast=autocast, **options)
    assert out.loss.dtype == torch.float32 and out.logprobs.dtype == torch.float32
    # the row terms are float32 arithmetic on the same logits: the float32 bound of tests/cases.py
    f32 = 1e-5 + 4 * 2.0**-24 * zmax / options.get("temperature", 1.0)

    assert_outputs_close(out, ref, f32, f"{backend}, {dtype}")
    # gradients: at most three roundings to the input dtype on the way, each bounded by the dtype's unit
    # roundoff times the sum of |terms|: dL/dlogits stored in the chunk, a half-precision product of a
    # chunk (weight: V-blocks before the float32 accumulator), the result stored; plus float32
    # accumulation over K terms
    K = {"hidden": V, "weight": batch["targets"].numel(), "bias": batch["targets"].numel()}
    for name, want in ref_grads.items():
        got = grads[name]
        assert got.dtype == params[name].dtype and got.shape == params[name].shape, name
        gmax = float(want.abs().max()) if want.numel() else 0.0
        tol = (3 * ROUNDING[dtype] + f32 + K[name] * 2.0**-24) * bounds[name] + SMALLEST[dtype] + f32 * 1e-3 * gmax
        err = (got.double().cpu() - want).abs()
        worst = int((err - tol).argmax()) if err.numel() else 0
        assert bool((err <= tol).all()), (f"grad {name} ({backend}, {dtype}): |err| {float(err.flatten()[worst]):.3g} > "
                                          f"bound {float(tol.flatten()[worst]):.3g}")
    return out, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(OPTIONS))
def test_options_fp32(backend, case):
    device = backend_device(backend)
    batch, params = make_linear(LENGTHS, device=device, seed=1)
    if "rollout_correction" in OPTIONS[case]:  # the sampler's log-probs, near the old policy's
        gen = torch.Generator().manual_seed(3)
        noise = torch.randn(batch["old_logprobs"].shape, generator=gen) * 0.3
        batch["rollout_logprobs"] = batch["old_logprobs"] + noise.to(device)
    assert_matches(batch, params, backend, chunk_rows=4, **OPTIONS[case])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dtypes_ragged_masked(backend, dtype):
    device = backend_device(backend)
    batch, params = make_linear([3, 0, 6, 2, 7], dtype=dtype, device=device, seed=2)
    assert_matches(batch, params, backend, chunk_rows=5, max_len=8, kl_coef=0.1, entropy_coef=0.01,
                   temperature=0.9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["default", "gspo"])
def test_autocast_runs_the_head_in_the_autocast_dtype(backend, case):
    """PyTorch's AMP recipe computes the loss inside the autocast block: float32 hidden and weight, the
    head's matmuls in bfloat16 (as F.linear there), masked rows, each gradient in its input's dtype."""
    device = backend_device(backend)
    batch, params = make_linear(LENGTHS, device=device, seed=5)
    assert not batch["loss_mask"].all()
    assert_matches(batch, params, backend, autocast=torch.bfloat16, chunk_rows=4, **OPTIONS[case])


def test_autocast_casts_mixed_input_dtypes_and_only_there():
    batch, params = make_linear(LENGTHS, seed=6)
    mixed = dict(params, hidden=params["hidden"].bfloat16())  # bfloat16 activations, float32 head
    assert_matches(batch, mixed, "cpu", autocast=torch.bfloat16, max_len=16)
    with pytest.raises(TypeError, match="weight: expected the hidden states' dtype.*torch.autocast"):
        run_linear(batch, mixed, backend="cpu", max_len=16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_override_no_bias_no_mask(backend):
    device = backend_device(backend)
    batch, params = make_linear(LENGTHS, device=device, seed=4, bias=False, mask_frac=0.0)
    del batch["loss_mask"]
    weights = torch.linspace(0.1, 1.0, len(LENGTHS), device=device)
    assert_matches(batch, params, backend, weights=weights, chunk_rows=7)


@pytest.mark.parametrize("objective", [{}, dict(ratio_level="sequence"), dict(objective="cispo")],
                         ids=["ppo-one-pass", "gspo-two-pass", "cispo-two-pass"])
def test_gradcheck_float64(objective):
    batch, params = make_linear([2, 0, 3], dtype=torch.float64, seed=5, h=3, v=7)
    rest = dict(batch)
    opts = dict(backend="torch", max_len=4, kl_coef=0.1, entropy_coef=0.05, temperature=0.8, chunk_rows=2,
                **objective)

    def loss(hidden, weight, bias):
        return dk.linear_policy_loss(hidden, weight, bias=bias, **rest, **opts).loss

    inputs = tuple(params[k].clone().requires_grad_(True) for k in ("hidden", "weight", "bias"))
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_chunk_size_does_not_change_the_result(backend):
    device = backend_device(backend)
    batch, params = make_linear(LENGTHS, device=device, seed=6)
    R = int(batch["loss_mask"].sum())
    results = [run_linear(batch, params, backend=backend, max_len=16, entropy_coef=0.01, chunk_rows=c)
               for c in (1, 3, R + 5)]
    (out0, g0) = results[0]
    for out, grads in results[1:]:
        # per-row terms come from the same rows of logits; the loss is one fixed-order sum over [N]
        torch.testing.assert_close(out.logprobs, out0.logprobs, rtol=2.0**-22, atol=1e-6)
        torch.testing.assert_close(out.loss, out0.loss, rtol=2.0**-20, atol=1e-7)
        for name in g0:  # float32 sums in another order (over chunks for the weight and bias)
            torch.testing.assert_close(grads[name], g0[name], rtol=1e-5, atol=1e-6 * float(g0[name].abs().max()))


def test_scaled_loss_scales_every_gradient():
    batch, params = make_linear(LENGTHS, seed=7)
    _, grads = run_linear(batch, params, backend="torch", max_len=16, chunk_rows=4)
    _, scaled = run_linear(batch, params, loss_scale=0.25, backend="torch", max_len=16, chunk_rows=4)
    for name in grads:
        assert torch.equal(scaled[name], grads[name] * 0.25), name


def test_no_grad_forward_equals_the_training_forward():
    batch, params = make_linear(LENGTHS, seed=8)
    out, _ = run_linear(batch, params, backend="torch", max_len=16, chunk_rows=4, with_entropy=True)
    with torch.no_grad():
        plain = dk.linear_policy_loss(params["hidden"], params["weight"], bias=params["bias"], **batch,
                                      backend="torch", max_len=16, chunk_rows=4, with_entropy=True)
    assert torch.equal(plain.loss, out.loss.detach()) and torch.equal(plain.logprobs, out.logprobs)
    assert not plain.loss.requires_grad


def test_frozen_weight_gets_no_gradient_and_hidden_still_does():
    batch, params = make_linear(LENGTHS, seed=9, bias=False)
    hidden = params["hidden"].clone().requires_grad_(True)
    out = dk.linear_policy_loss(hidden, params["weight"], **batch, backend="torch", max_len=16)
    out.loss.backward()
    _, full = run_linear(batch, params, backend="torch", max_len=16)
    assert params["weight"].grad is None
    torch.testing.assert_close(hidden.grad, full["hidden"])


def test_accumulate_weight_grad_into_dot_grad():
    batch, params = make_linear(LENGTHS, seed=10)
    _, grads = run_linear(batch, params, backend="torch", max_len=16, chunk_rows=4)
    weight = params["weight"].clone().requires_grad_(True)
    weight.grad = torch.full_like(weight, 0.5)  # an earlier micro-batch's gradient
    hidden = params["hidden"].clone().requires_grad_(True)
    out = dk.linear_policy_loss(hidden, weight, bias=params["bias"], **batch, backend="torch", max_len=16,
                                chunk_rows=4, accumulate_weight_grad=True)
    out.loss.backward()
    torch.testing.assert_close(weight.grad, grads["weight"] + 0.5)
    torch.testing.assert_close(hidden.grad, grads["hidden"])
    scaled = dk.linear_policy_loss(hidden, weight, **batch, backend="torch", max_len=16,
                                   accumulate_weight_grad=True)
    with pytest.raises(RuntimeError, match="scaled"):
        (scaled.loss * 0.5).backward()


def test_accumulate_weight_grad_refuses_a_second_backward():
    """The weight's gradient is added in the forward: a second backward would add the other gradients
    again but not the weight's (hidden 2x, weight 1x)."""
    batch, params = make_linear(LENGTHS, seed=12)
    _, grads = run_linear(batch, params, backend="cpu", max_len=16)
    hidden, weight = (params[k].clone().requires_grad_(True) for k in ("hidden", "weight"))
    out = dk.linear_policy_loss(hidden, weight, bias=params["bias"], **batch, backend="cpu", max_len=16,
                                accumulate_weight_grad=True)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="accumulate_weight_grad: .*second backward.*accumulate_weight_grad=False"):
        out.loss.backward()
    torch.testing.assert_close(hidden.grad, grads["hidden"])
    torch.testing.assert_close(weight.grad, grads["weight"])


@pytest.mark.parametrize("accumulate", [False, True], ids=["accumulator", "accumulate_weight_grad"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_activation_checkpointing_gives_each_gradient_once(accumulate, reentrant):
    """A checkpointed loss runs its forward again in the backward. The weight's gradient must come out
    once: a second add into weight.grad (non-reentrant checkpointing runs the first forward with grad
    on) is refused before anything is added; the reentrant form's first forward runs without grad."""
    from torch.utils.checkpoint import checkpoint

    batch, params = make_linear(LENGTHS, seed=13)
    _, grads = run_linear(batch, params, backend="cpu", max_len=16)
    hidden, weight = (params[k].clone().requires_grad_(True) for k in ("hidden", "weight"))

    def loss_of(h):
        return dk.linear_policy_loss(h, weight, bias=params["bias"], **batch, backend="cpu", max_len=16,
                                     accumulate_weight_grad=accumulate).loss

    if accumulate and not reentrant:
        with pytest.raises(RuntimeError, match="accumulate_weight_grad: saved-tensor hooks.*checkpoint"):
            checkpoint(loss_of, hidden, use_reentrant=False)
        assert weight.grad is None
        return
    checkpoint(loss_of, hidden, use_reentrant=reentrant).backward()
    torch.testing.assert_close(hidden.grad, grads["hidden"])
    torch.testing.assert_close(weight.grad, grads["weight"])


@pytest.mark.parametrize("objective", [{}, dict(ratio_level="sequence")], ids=["one-pass", "two-pass"])
def test_double_backward_is_an_error(objective):
    batch, params = make_linear(LENGTHS, seed=11)
    hidden = params["hidden"].clone().requires_grad_(True)
    out = dk.linear_policy_loss(hidden, params["weight"], **batch, backend="torch", max_len=16, **objective)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.loss, hidden, create_graph=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["all-masked", "all-empty", "no-rows"])
def test_nothing_scored_gives_zero(backend, kind):
    device = backend_device(backend)
    lengths = {"all-masked": [3, 2], "all-empty": [0, 0, 0], "no-rows": []}[kind]
    batch, params = make_linear(lengths, device=device, seed=12, mask_frac=1.0 if kind == "all-masked" else 0.0)
    out, grads = run_linear(batch, params, backend=backend, max_len=8, entropy_coef=0.01, kl_coef=0.1)
    assert out.loss.item() == 0.0
    assert all(not g.any() for g in grads.values())
    assert all(v.item() == 0.0 for v in out.metrics.values())


class MatmulRows(TorchDispatchMode):
    """Rows of every matmul's first operand, and the largest tensor any op returns."""

    def __init__(self):
        super().__init__()
        self.mm_rows, self.largest = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm"):
            a = args[1] if name == "addmm" else args[0]
            self.mm_rows.append((name, tuple(a.shape)))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_unscored_rows_never_enter_a_matmul_and_no_nv_tensor(backend):
    backend_device(backend)
    batch, params = make_linear(LENGTHS, seed=13)
    N, R, C = batch["targets"].numel(), int(batch["loss_mask"].sum()), 4
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    with MatmulRows() as seen:
        out = dk.linear_policy_loss(leaves["hidden"], leaves["weight"], bias=leaves["bias"], **batch,
                                    backend=backend, max_len=16, chunk_rows=C, entropy_coef=0.01)
        torch.autograd.grad(out.loss, list(leaves.values()))
    # per chunk: logits (rows of hidden), grad hidden (rows of dlogits), grad weight (dlogits.T: V rows)
    chunk_rows = [shape[0] for _, shape in seen.mm_rows if shape[1] in (H, V)]
    logits_rows = [shape[0] for name, shape in seen.mm_rows if shape[1] == H and shape[0] != V]
    assert sum(logits_rows) == R < N and max(chunk_rows) <= max(C, V)
    assert seen.largest <= max(C * V, V * H, N * H)  # never an [N, V] tensor


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_profiled_peak_stays_below_the_chunk_bound(backend):
    """Every allocation of the CPU allocator during forward+backward, replayed: at most the gradients
    (twice: saved by the forward, scaled by the backward), a few [chunk_rows, V] temporaries and
    [N]/[V]-sized row tensors; far below the materialised logits and their gradient."""
    backend_device(backend)
    lengths = [200, 0, 170, 125, 260, 45]
    v, h, C = 2000, 32, 16
    batch, params = make_linear(lengths, seed=14, h=h, v=v, bias=False, mask_frac=0.1)
    N = batch["targets"].numel()
    hidden = params["hidden"].clone().requires_grad_(True)
    weight = params["weight"].clone().requires_grad_(True)

    def run():
        out = dk.linear_policy_loss(hidden, weight, **batch, backend=backend, max_len=300, chunk_rows=C,
                                    entropy_coef=0.01)
        torch.autograd.grad(out.loss, [hidden, weight])

    run()  # warm-up
    peak = _cpu_peak_bytes(run)
    grads = (N * h + v * h) * 4
    chunk = C * v * 4
    rows = 32 * N * 8 + 8 * v * 4  # [N] row tensors and [V] vectors, generously
    # the chunk buffer, and the torch backend's float32 temporaries of the chunk's rows
    bound = grads + 8 * chunk + rows
    extra = peak - grads
    assert extra <= bound, f"peak beyond the gradients {extra / 2**20:.2f} MB > bound {bound / 2**20:.2f} MB"
    assert bound < 2 * N * v * 4 / 4  # the bound itself: under 1/4 of the [N, V] logits and their gradient


def test_bad_input_names_the_argument():
    batch, params = make_linear(LENGTHS, seed=15)
    h, w, b = params["hidden"], params["weight"], params["bias"]
    cases = [
        (dict(hidden=h[None]), ValueError, "hidden"),
        (dict(hidden=h.long()), TypeError, "hidden"),
        (dict(weight=w[:, :-1]), ValueError, "weight"),
        (dict(weight=w.double()), TypeError, "weight"),
        (dict(bias=b[:-1]), ValueError, "bias"),
        (dict(bias=b.double()), TypeError, "bias"),
        (dict(chunk_rows=0), ValueError, "chunk_rows"),
        (dict(chunk_rows=2.5), ValueError, "chunk_rows"),
        (dict(accumulate_weight_grad="yes"), TypeError, "accumulate_weight_grad"),
        (dict(targets=batch["targets"][:-1]), ValueError, "targets"),
        (dict(targets=batch["targets"] + V), ValueError, "targets"),
        (dict(agg="nope"), ValueError, "agg"),
        (dict(backend="nope"), ValueError, "backend"),
        (dict(hidden=h.double(), weight=w.double(), bias=b.double(), backend="cpu"), TypeError, "float64"),
    ]
    for change, error, name in cases:
        if change.get("backend") == "cpu" and unavailable_reason("cpu", "cpu") is not None:
            continue
        args = dict(hidden=h, weight=w, bias=b, max_len=16, **batch)
        args.update(change)
        with pytest.raises(error, match=name):
            dk.linear_policy_loss(args.pop("hidden"), args.pop("weight"), **args)


def test_errors_speak_of_the_hidden_states_not_of_logits_never_passed():
    batch, params = make_linear(LENGTHS, seed=16)
    N = batch["targets"].numel()
    cases = [
        dict(cu_seqlens=torch.tensor([0, 2, N + 1])),
        dict(old_logprobs=batch["old_logprobs"].to("meta")),
    ]
    for change in cases:
        args = dict(batch, **change)
        with pytest.raises(ValueError) as error:
            dk.linear_policy_loss(params["hidden"], params["weight"], max_len=16, **args)
        assert "hidden states" in str(error.value) and "logits" not in str(error.value), str(error.value)


def test_bench_linear_cli_runs_and_writes_results(tmp_path):
    """deltal-bench --linear end to end on a tiny shape: every implementation computes the same loss
    (Liger aside: another aggregation), the fused op matmuls only the scored rows (no timing checked)."""
    import json

    from deltal_kernels.bench.cli import main

    impls = ["linear", "linear accumulate", "materialised", "eager", "matmuls"]
    assert main(["--linear", "--device", "cpu", "--N", "96", "--H", "16", "--V", "300", "--reps", "1",
                 "--only", *impls, "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "linear-cpu-custom.json").read_text())
    rows = {r["impl"]: r for r in doc["results"]}
    assert set(rows) == set(impls) and all(r["error"] is None and r["fwdbwd_ms"] > 0 for r in rows.values())
    R = rows["linear"]["scored_rows"]
    assert 0 < R < 96 and rows["linear"]["matmul_rows"] == R and rows["materialised"]["matmul_rows"] == 96
    for name in ("linear accumulate", "materialised", "eager"):
        assert rows[name]["loss"] == pytest.approx(rows["linear"]["loss"], rel=1e-5, abs=1e-7), name
    assert [t["status"] for t in doc["targets"]] == ["not measured at N=4096 H=512 V=32000 fp32"] * 3
    assert "FLOPs saved" in (tmp_path / "linear-cpu-custom.md").read_text()


def test_micro_batches_with_whole_batch_weights_sum_to_the_whole_batch():
    """Gradient accumulation: weights computed once for the whole batch, each micro-batch's backward as it
    is; the summed gradients of hidden, weight and bias equal one call on the whole batch."""
    lengths = [4, 0, 6, 3, 5, 2]
    batch, params = make_linear(lengths, seed=16)
    cu = batch["cu_seqlens"].long()
    L = dk.packing.scored_lengths(batch["cu_seqlens"], batch["loss_mask"])
    w = dk.sequence_weights(L, "delta-l", max_len=8)
    _, whole = run_linear(batch, params, backend="torch", max_len=8, chunk_rows=3)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    rows_split = int(cu[3])  # sequences 0-2 | 3-5
    for seqs, rows in ((slice(0, 3), slice(0, rows_split)), (slice(3, 6), slice(rows_split, None))):
        part = {k: v[rows] for k, v in batch.items() if k != "cu_seqlens"}
        part["cu_seqlens"] = (cu[seqs.start:seqs.stop + 1] - cu[seqs.start]).to(batch["cu_seqlens"].dtype)
        part["advantages"] = batch["advantages"][rows]
        out = dk.linear_policy_loss(leaves["hidden"][rows], leaves["weight"], bias=leaves["bias"], **part,
                                    weights=w[seqs], backend="torch", chunk_rows=3)
        out.loss.backward()
    for name, g in whole.items():
        torch.testing.assert_close(leaves[name].grad, g, rtol=1e-5, atol=1e-6 * float(g.abs().max()), msg=name)
