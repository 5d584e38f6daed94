"""What is specific to the compiled extension (backend="cpu" / backend="cuda").

The loss itself is checked against the float64 reference by test_backends.py for every backend;
here: the build (what got compiled, for which GPU architectures), the ops' own argument checks,
alignment and -inf corner cases of the kernels against the PyTorch template (torch_backend), the
64-bit offset and unbounded-N cases (CUDA only), and which backend "auto" picks.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import deltal_kernels as dk
from deltal_kernels import extension, torch_backend
from deltal_kernels.dispatch import available_backends, resolve_backend
from deltal_kernels.validation import LossParams

pytestmark = pytest.mark.skipif(extension._C is None,
                                reason=f"compiled extension not built: {extension.unavailable_reason('cpu')}")

CUDA_REASON = extension.unavailable_reason("cuda") if torch.cuda.is_available() else "needs a CUDA device"
needs_cuda = pytest.mark.skipif(CUDA_REASON is not None, reason=f"CUDA backend: {CUDA_REASON}")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PARAMS = LossParams(clip_low=0.2, clip_high=0.28, dual_clip=3.0, kl_coef=0.1, kl_type=3, entropy_coef=0.01,
                    temperature=0.8)


def ops():
    return torch.ops.deltal_kernels_ext


def row_inputs(N, V, device, seed=0, dtype=torch.float32, logits=None):
    gen = torch.Generator().manual_seed(seed)
    if logits is None:
        logits = (torch.randn(N, V, generator=gen) * 3).to(dtype).to(device)
    z = logits.float().cpu() / PARAMS.temperature
    targets = torch.randint(0, V, (N,), generator=gen)
    logp = torch.log_softmax(z, -1).gather(1, targets[:, None]).squeeze(1)
    scored = torch.rand(N, generator=gen) < 0.8
    zero = torch.zeros(())
    old = torch.where(scored, logp + torch.rand(N, generator=gen) - 0.5, zero)
    ref = torch.where(scored, logp + torch.randn(N, generator=gen) * 0.5, zero)
    adv = torch.where(scored, torch.randn(N, generator=gen), zero)
    rows = dict(targets=targets, scored=scored, old_logprobs=old, ref_logprobs=ref, advantages=adv)
    return logits, {k: v.to(device) for k, v in rows.items()}


def ext_forward(logits, r, p=PARAMS, need_entropy=True):
    return extension.forward_rows(logits, r["targets"], r["scored"], r["old_logprobs"], r["ref_logprobs"],
                                  r["advantages"], p, need_entropy)


def template_forward(logits, r, p=PARAMS, need_entropy=True):
    rows = {k: None if v is None else v.cpu() for k, v in r.items()}
    return torch_backend.forward_rows(logits.cpu(), rows["targets"], rows["scored"], rows["old_logprobs"],
                                      rows["ref_logprobs"], rows["advantages"], p, need_entropy)


def assert_rows_close(got, want, zmax):
    names = ("logp", "entropy", "lse", "loss", "dlogp", "kl")
    tol = 2e-5 + 8 * 2.0**-24 * zmax
    for name, a, b in zip(names, got[:6], want[:6]):
        torch.testing.assert_close(a.cpu(), b, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")
    assert torch.equal(got[6].cpu(), want[6]), "flags"


# ---- the build ------------------------------------------------------------------------------

def test_import_from_clone():
    import deltal_kernels._C as C

    assert Path(C.__file__).exists()
    assert hasattr(torch.ops.deltal_kernels_ext, "forward_rows")
    assert hasattr(torch.ops.deltal_kernels_ext, "grad_rows")


def built_archs() -> set:
    """The compute capabilities the build was asked for: TORCH_CUDA_ARCH_LIST (the GPU check builds
    for its GPU only), else setup.py's default, sm_80 and sm_90."""
    spec = os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;9.0+PTX"
    return {int(round(float(a.replace("+PTX", "")) * 10)) for a in spec.replace(" ", ";").split(";") if a}


def test_build_info(monkeypatch):
    monkeypatch.setenv(extension.CLUSTER_SETTING, "8")
    info = extension.build_info()
    assert info["compiled backends"] in ("cpu", "cpu, cuda")
    assert info["torch CUDA version"] == (torch.version.cuda or "none")
    if extension.cuda_built():
        assert info["CUDA part built"] == "yes"
        assert built_archs() <= set(extension.compiled_archs()), info
        assert all(f"sm_{a}" in info["CUDA archs compiled"] for a in built_archs()), info
        nvcc_major = info["nvcc version (build)"].split(".")[0]
        assert nvcc_major == torch.version.cuda.split(".")[0], "nvcc and torch CUDA major versions must agree"
        assert info["DELTAL_KERNELS_CUDA_CLUSTER"] == "8"  # the setting the kernels will read, for bug reports
    else:
        assert info["CUDA part built"] == "no"
        assert "CUDA archs compiled" not in info
    from deltal_kernels.__main__ import report

    assert "compiled backends" in report()


def _cuobjdump():
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "bin" / "cuobjdump")
    candidates += [Path("/usr/local/cuda/bin/cuobjdump")]
    try:
        import triton

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    except ImportError:
        pass
    found = shutil.which("cuobjdump")
    if found:
        candidates.insert(0, Path(found))
    return next((str(c) for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)


def test_so_contains_the_requested_archs():
    if not extension.cuda_built():
        pytest.skip("the CUDA part of the extension was not built (no usable nvcc matching torch's CUDA version)")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (CUDA toolkit bin/ or triton's bundled copy)")
    out = subprocess.run([tool, "--list-elf", extension._C.__file__], capture_output=True, text=True, check=True)
    listed = out.stdout + out.stderr
    assert all(f".sm_{a}." in listed for a in built_archs()), listed


# ---- backend choice -------------------------------------------------------------------------

def test_auto_picks_cpu_for_cpu_tensors():
    assert available_backends("cpu")[0] == "cpu"
    assert resolve_backend("auto", torch.device("cpu")) == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_picks_cuda_for_cuda_tensors():
    if extension.cuda_built():
        assert resolve_backend("auto", torch.device("cuda")) == "cuda"
    else:
        assert resolve_backend("auto", torch.device("cuda")) != "cuda"
        assert "without its CUDA part" in extension.unavailable_reason("cuda")


def test_cuda_reason_without_device_or_cuda_part():
    reason = extension.unavailable_reason("cuda")
    if not extension.cuda_built():
        assert "CUDA" in reason
    elif not torch.cuda.is_available():
        assert reason == "no CUDA device is available"
    assert "not meta" in extension.unavailable_reason("meta")


# ---- the kernels against the PyTorch template -------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", [1, 7, 1000, 4097, 32003])
def test_forward_matches_template(device, dtype, V):
    logits, r = row_inputs(11, V, device, seed=V, dtype=dtype)
    got = ext_forward(logits, r)
    want = template_forward(logits, r)
    assert_rows_close(got, want, float(logits.float().abs().max()) / PARAMS.temperature)
    unscored = ~r["scored"]
    assert all(not t[unscored].any() for t in got)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offset", [0, 1, 3])
@pytest.mark.parametrize("out_offset", [0, 1])
def test_misaligned_rows_and_gradient(device, offset, out_offset):
    """Rows starting anywhere (storage offsets, odd V) and a gradient buffer aligned differently."""
    N, V = 9, 1037
    base = (torch.randn(N * V + 8) * 3).to(torch.bfloat16).to(device)
    logits = base[offset:offset + N * V].view(N, V)
    _, r = row_inputs(N, V, device, seed=offset, logits=logits)
    got = ext_forward(logits, r)
    want = template_forward(logits, r)
    assert_rows_close(got, want, float(logits.float().abs().max()) / PARAMS.temperature)
    g = torch.randn(N, device=device) * r["scored"]
    h = torch.full((N,), 0.03, device=device) * r["scored"]
    out_base = torch.empty(N * V + 8, dtype=torch.bfloat16, device=device)
    out = out_base[out_offset:out_offset + N * V].view(N, V)
    extension.grad_rows(logits, r["targets"], got[2], got[1], g, h, PARAMS.temperature, out)
    expected = torch.empty(N, V, dtype=torch.bfloat16)
    torch_backend.grad_rows(logits.cpu(), r["targets"].cpu(), got[2].cpu(), got[1].cpu(), g.cpu(), h.cpu(),
                            PARAMS.temperature, expected)
    torch.testing.assert_close(out.cpu().float(), expected.float(), rtol=2**-7, atol=1e-6)
    assert not out.cpu()[~r["scored"].cpu()].any()


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_gradient_equals_out_of_place(device):
    logits, r = row_inputs(13, 3001, device, seed=3, dtype=torch.float16)
    lp, ent, lse = ext_forward(logits, r)[:3]
    g = torch.randn(13, device=device) * r["scored"]
    h = torch.full((13,), -0.01, device=device) * r["scored"]
    out = torch.empty_like(logits)
    extension.grad_rows(logits, r["targets"], lse, ent, g, h, PARAMS.temperature, out)
    inplace = logits.clone()
    extension.grad_rows(inplace, r["targets"], lse, ent, g, h, PARAMS.temperature, inplace)
    assert torch.equal(inplace, out)


@pytest.mark.parametrize("device", DEVICES)
def test_minus_inf_logits(device):
    """Masked-out vocabulary entries (-inf logits) add nothing and get a zero gradient, no NaN."""
    logits, r = row_inputs(6, 500, device, seed=4)
    logits[:, ::3] = float("-inf")
    r["targets"] = r["targets"] // 3 * 3 + 1  # targets on finite logits
    got = ext_forward(logits, r)
    finite = logits.masked_fill(torch.isinf(logits), -1e30)  # the template's entropy is NaN at -inf
    want = template_forward(finite, r)
    assert_rows_close(got, want, 3 * 5 / PARAMS.temperature)
    g = torch.ones(6, device=device) * r["scored"]
    h = torch.full((6,), 0.5, device=device) * r["scored"]
    out = torch.empty_like(logits)
    extension.grad_rows(logits, r["targets"], got[2], got[1], g, h, PARAMS.temperature, out)
    assert torch.isfinite(out).all()
    assert not out[:, ::3].any()


def test_cpu_result_independent_of_thread_count():
    logits, r = row_inputs(64, 2000, "cpu", seed=5, dtype=torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ext_forward(logits, r)
        torch.set_num_threads(max(2, threads))
        many = ext_forward(logits, r)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, many))


@pytest.mark.parametrize("device", DEVICES)
def test_kl_and_clip_variants_match_template(device):
    logits, r = row_inputs(40, 300, device, seed=6)
    r["advantages"] = r["advantages"] * 3
    for kl_type in (0, 1, 2, 3):
        for dual in (0.0, 1.5):
            p = PARAMS._replace(kl_type=kl_type, dual_clip=dual, kl_coef=0.05 if kl_type else 0.0)
            rr = dict(r, ref_logprobs=r["ref_logprobs"] if kl_type else None)
            assert_rows_close(ext_forward(logits, rr, p), template_forward(logits, rr, p),
                              float(logits.abs().max()) / p.temperature)


# ---- the fused forward + gradient (forward_grad_rows) -----------------------------------------

def ext_forward_grad(logits, r, weights, grad_scale, out, p=PARAMS, need_entropy=True):
    return extension.forward_grad_rows(logits, r["targets"], r["scored"], r["old_logprobs"], r["ref_logprobs"],
                                       r["advantages"], p, need_entropy, weights, grad_scale, out)


def forward_then_grad(logits, r, weights, grad_scale, p=PARAMS, need_entropy=True):
    """forward_rows, then grad_rows with the g and h dispatch's backward forms: the fused path's definition."""
    rows = ext_forward(logits, r, p, need_entropy)
    d = grad_scale * weights
    out = torch.empty_like(logits)
    extension.grad_rows(logits, r["targets"], rows[2], rows[1], d * rows[4], d * -p.entropy_coef, p.temperature, out)
    return rows, out


def fused_case(N, V, device, dtype, seed):
    """Masked rows, -inf logits (never the target), weights with zeros on some scored rows."""
    logits, r = row_inputs(N, V, device, seed=seed, dtype=dtype)
    if V >= 7:
        logits[:, 2::5] = float("-inf")
        t = r["targets"]
        r["targets"] = torch.where(t % 5 == 2, t - 1, t)
    gen = torch.Generator().manual_seed(seed + 1)
    weights = (torch.rand(N, generator=gen) + 0.1).to(device) * r["scored"]
    if N > 1:
        weights[1] = 0.0  # whether row 1 is scored or not: an all-zero gradient row
    return logits, r, weights


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", [1, 7, 1000, 4097, 32003])
def test_forward_grad_rows_equals_forward_then_grad(device, dtype, V):
    """The fused op: the forward's outputs and grad_rows' gradient, bit for bit, also in place."""
    N = 11
    logits, r, weights = fused_case(N, V, device, dtype, seed=V)
    for grad_scale, p in ((1.0, PARAMS), (0.37, PARAMS), (2.5, PARAMS._replace(entropy_coef=-0.05, kl_type=1))):
        want_rows, want_grad = forward_then_grad(logits, r, weights, grad_scale, p)
        out = torch.full_like(logits, float("nan"))  # every element must be written
        got_rows = ext_forward_grad(logits, r, weights, grad_scale, out, p)
        assert all(torch.equal(a, b) for a, b in zip(got_rows, want_rows)), (grad_scale, p)
        assert torch.equal(out, want_grad), (grad_scale, p)
        inplace = logits.clone()
        got_rows = ext_forward_grad(inplace, r, weights, grad_scale, inplace, p)  # out == logits
        assert all(torch.equal(a, b) for a, b in zip(got_rows, want_rows))
        assert torch.equal(inplace, want_grad)
    zero_rows = (~r["scored"]) | (weights == 0)
    assert not out[zero_rows].any() and torch.isfinite(out).all()
    if V >= 7:
        assert not out[:, 2::5].any()  # -inf logits: zero gradient, no NaN


@pytest.mark.parametrize("device", DEVICES)
def test_forward_grad_rows_without_entropy_or_kl(device):
    logits, r, weights = fused_case(9, 777, device, torch.bfloat16, seed=21)
    p = PARAMS._replace(entropy_coef=0.0, kl_type=0, kl_coef=0.0, dual_clip=0.0)
    rr = dict(r, ref_logprobs=None)
    want_rows, want_grad = forward_then_grad(logits, rr, weights, 1.0, p, need_entropy=False)
    out = torch.empty_like(logits)
    got_rows = ext_forward_grad(logits, rr, weights, 1.0, out, p, need_entropy=False)
    assert all(torch.equal(a, b) for a, b in zip(got_rows, want_rows))
    assert torch.equal(out, want_grad)
    assert not got_rows[1].any()  # no entropy asked for


@pytest.mark.parametrize("device", DEVICES)
def test_forward_grad_rows_nothing_scored_and_empty(device):
    logits, r, weights = fused_case(5, 300, device, torch.float32, seed=22)
    r["scored"] = torch.zeros_like(r["scored"])
    out = torch.full_like(logits, 7.0)
    rows = ext_forward_grad(logits, r, weights, 1.0, out)
    assert not out.any() and all(not t.any() for t in rows)
    logits, r, weights = fused_case(0, 300, device, torch.float32, seed=23)
    rows = ext_forward_grad(logits, r, weights, 1.0, torch.empty_like(logits))
    assert all(t.numel() == 0 for t in rows)


def test_forward_grad_rows_independent_of_thread_count():
    logits, r, weights = fused_case(64, 2000, "cpu", torch.bfloat16, seed=24)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            out = torch.empty_like(logits)
            outs.append((ext_forward_grad(logits, r, weights, 1.0, out), out))
    finally:
        torch.set_num_threads(threads)
    (rows1, g1), (rows2, g2) = outs
    assert torch.equal(g1, g2) and all(torch.equal(a, b) for a, b in zip(rows1, rows2))


def _fused_args(N=4, V=10):
    return _forward_args(N, V) + [torch.ones(N), 1.0, torch.empty(N, V)]


@pytest.mark.parametrize("index, bad, error, match", [
    (14, lambda a: torch.ones(4, dtype=torch.float64), TypeError, "row_weights: expected dtype Float"),
    (14, lambda a: torch.ones(5), ValueError, r"row_weights: expected shape \[N\]"),
    (16, lambda a: torch.empty(4, 11), ValueError, "out: expected shape"),
    (16, lambda a: torch.empty(4, 10, dtype=torch.float16), TypeError, "out: expected dtype"),
    (16, lambda a: torch.empty(10, 4).t(), ValueError, "out: expected a contiguous"),
    (15, lambda a: "x", (TypeError, RuntimeError), "grad_scale"),
])
def test_forward_grad_op_rejects_bad_arguments(index, bad, error, match):
    args = _fused_args()
    args[index] = bad(args)
    with pytest.raises(error, match=match):
        ops().forward_grad_rows(*args)


def test_forward_grad_op_meta_and_opcheck():
    args = _fused_args()
    meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    out = ops().forward_grad_rows(*meta)
    assert [t.shape for t in out] == [(4,)] * 7
    assert [t.dtype for t in out] == [torch.float32] * 6 + [torch.uint8]
    torch.library.opcheck(ops().forward_grad_rows.default, tuple(args),
                          test_utils=("test_schema", "test_faketensor"))


@needs_cuda
@pytest.mark.parametrize("N, V, dtype", [(300_000, 64, torch.float32), (700, 151936, torch.bfloat16)])
def test_cuda_forward_grad_rows_grid(N, V, dtype):
    """More rows than the (L2-bounded) fused grid has groups, warp-per-row and block-per-row."""
    logits, r, weights = fused_case(N, V, "cuda", dtype, seed=25)
    want_rows, want_grad = forward_then_grad(logits, r, weights, 0.5)
    out = torch.empty_like(logits)
    got_rows = ext_forward_grad(logits, r, weights, 0.5, out)
    assert all(torch.equal(a, b) for a, b in zip(got_rows, want_rows))
    assert torch.equal(out, want_grad)


# ---- the ops' own argument checks (they run before any kernel) --------------------------------

def _forward_args(N=4, V=10, device="cpu"):
    logits, r = row_inputs(N, V, device)
    return [logits, r["targets"], r["scored"], r["old_logprobs"], r["ref_logprobs"], r["advantages"],
            0.2, 0.2, 0.0, 0.1, 3, 0.0, 1.0, False]


@pytest.mark.parametrize("index, bad, error, match", [
    (0, lambda a: a[0][0], ValueError, "logits: expected a 2-D"),
    (0, lambda a: a[0].double(), TypeError, "logits: expected float32"),
    (0, lambda a: a[0].t().contiguous().t(), ValueError, "logits: expected a contiguous"),
    (0, lambda a: a[0][:, :0], ValueError, "vocabulary dimension V is 0"),
    (1, lambda a: a[1][:3], ValueError, r"targets: expected shape \[N\]"),
    (1, lambda a: a[1].int(), TypeError, "targets: expected dtype Long"),
    (2, lambda a: a[2].float(), TypeError, "scored: expected dtype Bool"),
    (3, lambda a: a[3].double(), TypeError, "old_logprobs: expected dtype Float"),
    (4, lambda a: None, ValueError, "ref_logprobs: kl_type 3 needs ref_logprobs"),
    (5, lambda a: a[5][None], ValueError, "advantages: expected shape"),
    (10, lambda a: 7, ValueError, "kl_type"),
    (12, lambda a: 0.0, ValueError, "temperature"),
])
def test_forward_op_rejects_bad_arguments(index, bad, error, match):
    args = _forward_args()
    args[index] = bad(args)
    with pytest.raises(error, match=match):
        ops().forward_rows(*args)


def test_forward_op_rejects_other_device():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (a second device type) for the cross-device check")
    args = _forward_args()
    args[3] = args[3].cuda()
    with pytest.raises((ValueError, RuntimeError)):
        ops().forward_rows(*args)


def test_target_out_of_range_is_an_error_not_an_oob_read():
    args = _forward_args()
    args[1] = args[1].clone()
    args[2] = torch.ones_like(args[2])
    args[1][2] = 10  # == V
    with pytest.raises(IndexError, match="targets: row 2 has target 10"):
        ops().forward_rows(*args)
    args[1][2] = -1
    with pytest.raises(IndexError, match="outside"):
        ops().forward_rows(*args)


def _grad_args(N=4, V=10):
    logits, r = row_inputs(N, V, "cpu")
    f = torch.zeros(N)
    return [logits, r["targets"], f, f, torch.ones(N), f, 1.0, torch.empty_like(logits)]


@pytest.mark.parametrize("index, bad, error, match", [
    (7, lambda a: torch.empty(4, 11), ValueError, "out: expected shape"),
    (7, lambda a: torch.empty(4, 10, dtype=torch.bfloat16), TypeError, "out: expected dtype"),
    (7, lambda a: torch.empty(10, 4).t(), ValueError, "out: expected a contiguous"),
    (2, lambda a: torch.zeros(5), ValueError, r"lse: expected shape \[N\]"),
    (4, lambda a: torch.ones(4, dtype=torch.float16), TypeError, "g: expected dtype Float"),
    (6, lambda a: -1.0, ValueError, "temperature"),
])
def test_grad_op_rejects_bad_arguments(index, bad, error, match):
    args = _grad_args()
    args[index] = bad(args)
    with pytest.raises(error, match=match):
        ops().grad_rows(*args)


@pytest.mark.parametrize("op,make_args,out_index", [("grad_rows", "_grad_args", 7),
                                                   ("forward_grad_rows", "_fused_args", 16)])
def test_out_partially_overlapping_logits_is_rejected(op, make_args, out_index):
    args = globals()[make_args]()
    base = torch.randn(50)
    args[0], args[out_index] = base[:40].view(4, 10), base[5:45].view(4, 10)
    with pytest.raises(ValueError, match="out: must be the logits themselves or not overlap them"):
        getattr(ops(), op)(*args)


def test_grad_target_out_of_range_is_an_error():
    args = _grad_args()
    args[1] = torch.full((4,), 10)
    with pytest.raises(IndexError, match="outside"):
        ops().grad_rows(*args)


def test_meta_kernels_and_opcheck():
    args = _forward_args()
    meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    out = ops().forward_rows(*meta)
    assert [t.shape for t in out] == [(4,)] * 7
    assert [t.dtype for t in out] == [torch.float32] * 6 + [torch.uint8]
    torch.library.opcheck(ops().forward_rows.default, tuple(args),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(ops().grad_rows.default, tuple(_grad_args()),
                          test_utils=("test_schema", "test_faketensor"))


def test_ops_under_torch_compile_fullgraph():
    """The ops trace through their Meta kernels: a compiled graph calls them like eager code."""
    logits, r = row_inputs(6, 300, "cpu", seed=10)
    args = (r["targets"], r["scored"], r["old_logprobs"], r["ref_logprobs"], r["advantages"],
            0.2, 0.28, 3.0, 0.1, 3, 0.01, 0.8, True)

    def fn(x):
        logp, ent, lse, loss, dlogp, kl, flags = ops().forward_rows(x, *args)
        out = torch.empty_like(x)
        ops().grad_rows(x, r["targets"], lse, ent, dlogp, torch.full_like(dlogp, 0.01), 0.8, out)
        return loss.sum(), out

    eager = fn(logits)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)(logits)
    assert torch.equal(eager[1], compiled[1])
    torch.testing.assert_close(eager[0], compiled[0])


def test_empty_batch():
    args = _forward_args(N=0)
    assert all(t.numel() == 0 for t in ops().forward_rows(*args))
    g = _grad_args(N=0)
    ops().grad_rows(*g)


# ---- CUDA only: 64-bit offsets and unbounded N ----------------------------------------------

@needs_cuda
def test_cuda_many_rows_grid_stride():
    """Far more rows than the grid has blocks: every row is computed."""
    N, V = 300_000, 64
    logits, r = row_inputs(N, V, "cuda", seed=7)
    got = ext_forward(logits, r)
    want = template_forward(logits, r)
    assert_rows_close(got, want, float(logits.abs().max()) / PARAMS.temperature)


@needs_cuda
@pytest.mark.bigmem
def test_cuda_64bit_offsets():
    """N * V above 2^31 elements (bf16, ~4.3 GiB, gradient in place): rows past 2^31 are right."""
    V = 32771  # odd: rows start at every alignment
    N = (2**31) // V + 64
    free, _ = torch.cuda.mem_get_info()
    if free < N * V * 2 + (1 << 30):
        pytest.skip(f"needs {N * V * 2 / 2**30:.1f} GiB free CUDA memory, {free / 2**30:.1f} GiB free")
    logits = torch.empty(N, V, dtype=torch.bfloat16, device="cuda")
    for start in range(0, N, 8192):  # fill in slices: no float32 [N, V] temporary
        logits[start:start + 8192].normal_(std=3.0)
    rows = torch.tensor([0, 1, N // 2, N - 65, N - 64, N - 2, N - 1], device="cuda")
    scored = torch.zeros(N, dtype=torch.bool, device="cuda")
    scored[rows] = True
    sub = logits[rows]
    _, rs = row_inputs(len(rows), V, "cuda", seed=9, logits=sub)
    full = {k: torch.zeros(N, dtype=v.dtype, device="cuda").index_copy_(0, rows, v) for k, v in rs.items()}
    full["scored"] = scored
    got = ext_forward(logits, full)
    want = template_forward(sub, dict(rs, scored=torch.ones(len(rows), dtype=torch.bool)))
    assert_rows_close([t[rows] for t in got], want, float(sub.float().abs().max()) / PARAMS.temperature)
    g = torch.zeros(N, device="cuda").index_fill_(0, rows, 1.0)
    h = torch.zeros(N, device="cuda").index_fill_(0, rows, 0.02)
    extension.grad_rows(logits, full["targets"], got[2], got[1], g, h, PARAMS.temperature, logits)  # in place
    expected = torch.empty_like(sub).cpu()
    torch_backend.grad_rows(sub.cpu(), rs["targets"].cpu(), got[2][rows].cpu(), got[1][rows].cpu(),
                            g[rows].cpu(), h[rows].cpu(), PARAMS.temperature, expected)
    torch.testing.assert_close(logits[rows].cpu().float(), expected.float(), rtol=2**-7, atol=1e-6)
    assert not logits[N - 3].any() and not logits[2].any()  # unscored rows: zeros


ROUND = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
SUBNORMAL = {torch.float16: 2.0**-24, torch.bfloat16: 2.0**-133}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gradient_rounding_over_the_whole_range(device, dtype):
    """Half-precision gradient stores (vectorised on the CPU): normals, subnormals, large values."""
    N, V = 4, 4099  # 4099: the vector body and a scalar tail
    gen = torch.Generator().manual_seed(11)
    x = (torch.randn(N, V, generator=gen) * 8).to(dtype)
    targets = torch.randint(0, V, (N,), generator=gen)
    lse = torch.logsumexp(x.float(), -1)
    g = torch.tensor([1.0, 1e-3, 3e4, 1e-6])
    out = torch.empty_like(x, device=device)
    extension.grad_rows(x.to(device), targets.to(device), lse.to(device), torch.zeros(N, device=device),
                        g.to(device), torch.zeros(N, device=device), 1.0, out)
    want = -g[:, None] * torch.exp(x.float() - lse[:, None])
    want[torch.arange(N), targets] += g
    # one unit of rounding either way (the float32 exp may differ by an ulp), subnormal spacing included
    torch.testing.assert_close(out.cpu().float(), want.to(dtype).float(), rtol=2.0 * ROUND[dtype],
                               atol=SUBNORMAL[dtype])
