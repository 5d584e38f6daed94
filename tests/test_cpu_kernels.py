"""The CPU kernels (csrc/cpu/rows_cpu.cpp) on their own: the vectorised exp against float64 over its
whole input range, non-finite and huge logits across the kernels' chunks against the float64
reference, and each instruction-set path.

The kernels run the instruction set PyTorch reports (torch.backends.cpu.get_cpu_capability(), set
with ATEN_CPU_CAPABILITY=default|avx2|avx512) as far as the CPU supports it. The tests below run in
this process on that path, and test_every_instruction_set reruns this file in a subprocess for each
of the other paths this CPU can run.
"""
import math
import os
import subprocess
import sys

import pytest
import torch

import deltal_kernels as dk
from deltal_kernels import extension

from cases import assert_matches_reference, make_batch, run

pytestmark = pytest.mark.skipif(extension._C is None,
                                reason=f"compiled extension not built: {extension.unavailable_reason('cpu')}")

CHUNK = 2048  # rows_cpu.cpp: elements per max pass + exp pass
V = 2 * CHUNK + 907  # three chunks, the last partial, and a tail shorter than a vector
LENGTHS = [3, 0, 4]
OPTIONS = {
    "plain": dict(max_len=8),
    "kl-entropy": dict(max_len=8, kl_coef=0.1, entropy_coef=0.01),  # the gradient's entropy branch (h != 0)
    "temperature": dict(max_len=8, with_entropy=True, temperature=0.7),
}


def capability():
    return torch.backends.cpu.get_cpu_capability()


def fma_path():
    """The AVX2 and AVX-512 paths use FMA; the portable one (capability "DEFAULT"/"NO AVX", or off
    x86) does not."""
    return capability() in ("AVX2", "AVX512")


# ---- exp ---------------------------------------------------------------------------------------

MIN_NORMAL = 2.0**-126
# Largest error of the kernels' exp against exp of the float32 input, where exp(x) >= 2^-126, in
# units of the float32 spacing at exp(x) (measured over every float32 in [-87.34, 88] on each path;
# rows_cpu.cpp's exp_vec comment). Below, the absolute error is < 2^-126.
EXP_ULP_BOUND = {True: 0.9, False: 1.2}  # FMA paths, portable path
EXP_LO, EXP_HI = -88.0, 88.0  # the clamp
FLUSH = -87.69  # at and below: exactly 0 (n = round(x / ln 2) = -127, a zero scale)


def kernel_exp(x: torch.Tensor) -> torch.Tensor:
    """exp as the CPU kernels compute it, read through grad_rows: with lse = 0, g = 1, h = 0 and
    temperature 1 the gradient of element j is p_j * (-g / tau) = -exp(x_j), exactly (x_j * 1 - 0 is
    x_j, a product by -1 is exact). Column 0 is every row's target (its gradient adds g): padding."""
    width = 4096
    n = x.numel()
    rows = max(1, -(-n // (width - 1)))
    body = torch.zeros(rows * (width - 1))
    body[:n] = x.reshape(-1)
    logits = torch.zeros(rows, width)
    logits[:, 1:] = body.view(rows, width - 1)
    zero = torch.zeros(rows)
    out = torch.empty_like(logits)
    extension.grad_rows(logits, torch.zeros(rows, dtype=torch.int64), zero, zero, torch.ones(rows), zero, 1.0, out)
    return -out[:, 1:].reshape(-1)[:n]


def floats_between(lo: float, hi: float, step: int = 1) -> torch.Tensor:
    """Every step-th float32 in [lo, hi], 0 <= lo <= hi (by bit pattern, so every binade alike)."""
    bits = torch.tensor([lo, hi], dtype=torch.float32).view(torch.int32).tolist()
    return torch.arange(bits[0], bits[1] + 1, step, dtype=torch.int32).view(torch.float32)


def around(x: float, k: int = 4096) -> torch.Tensor:
    """The 2k + 1 float32 values nearest x (x != 0)."""
    b = int(torch.tensor([abs(x)], dtype=torch.float32).view(torch.int32))
    v = torch.arange(b - k, b + k + 1, dtype=torch.int32).view(torch.float32)
    return v if x > 0 else -v


def exp_inputs() -> torch.Tensor:
    """The inputs the kernels give exp: z - m <= 0 and z - lse (<= 0 but for rounding), from 0 down
    to the clamp and beyond, -inf; sampled across every binade, dense near the edges."""
    negative = -floats_between(0.0, 88.72, step=509)  # every binade of (-88.72, 0]
    positive = floats_between(0.0, 88.0, step=2039)  # rounding makes z - lse a little positive
    edges = [around(v) for v in (-math.log(2.0**126), -126.5 * math.log(2.0), EXP_LO, -88.72, -0.5 * math.log(2.0),
                                 0.5 * math.log(2.0), -1.0, 1.0, EXP_HI)]
    tiny = floats_between(0.0, 2.0**-20, step=4099)
    return torch.cat([negative, positive, tiny, -tiny, *edges])


def ulps(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """|got - want| in units of the float32 spacing at want (want a normal float32 magnitude)."""
    spacing = torch.exp2(torch.floor(torch.log2(want)) - 23)
    return (got - want).abs() / spacing


def test_exp_error_bound_against_float64():
    x = exp_inputs()
    x = x[x <= EXP_HI]
    got = kernel_exp(x).double()
    want = torch.exp(x.double())
    normal = want >= MIN_NORMAL
    err = ulps(got[normal], want[normal])
    worst = int(err.argmax())
    bound = EXP_ULP_BOUND[fma_path()]
    assert float(err[worst]) <= bound, (f"exp({float(x[normal][worst])!r}) is {float(err[worst]):.3f} ulp off "
                                        f"(bound {bound}, {capability()})")
    # below 2^-126 (x < -87.34): subnormal or 0, never negative, absolute error below 2^-126
    sub = ~normal
    assert sub.sum() > 10000
    assert (got[sub] >= 0).all()
    assert float((got[sub] - want[sub]).abs().max()) < MIN_NORMAL
    assert not got[x.double() <= FLUSH].any(), "exp is exactly 0 at and below the flush point"


def test_exp_special_values():
    x = torch.tensor([float("-inf"), -3.4e38, -1e30, -88.0, -0.0, 0.0, float("nan"), 88.0, 88.5, 1e30,
                      float("inf")])
    got = kernel_exp(x)
    assert got[:3].eq(0).all() and got[3] == 0  # -inf, huge negative: exactly 0
    assert got[4] == 1 and got[5] == 1
    assert torch.isnan(got[6])
    assert torch.isfinite(got[7]) and abs(float(got[7]) / math.exp(88.0) - 1) < 2e-7
    assert got[8:].eq(got[7]).all(), "x > 88 is clamped to 88 (never used: the kernels' arguments are <= 0)"


# ---- non-finite and huge logits across chunks, against the float64 reference --------------------

def nan_in_second_chunk(b):
    b["logits"][0, CHUNK + 52] = float("nan")


def nan_chunk(b):  # a whole chunk of NaN: its max (NaN skipped) is -inf, so it is looked at apart
    b["logits"][1, CHUNK:2 * CHUNK] = float("nan")


def nan_and_minus_inf_chunk(b):
    b["logits"][2, :CHUNK] = float("-inf")
    b["logits"][2, 100] = float("nan")


def nan_in_tail(b):
    b["logits"][3, V - 3] = float("nan")


def plus_inf_in_last_chunk(b):  # after the running max was set by earlier chunks
    b["logits"][4, V - 100] = float("inf")


def plus_inf_target(b):
    b["logits"][5, b["targets"][5]] = float("inf")


def minus_inf_row(b):
    b["logits"][6] = float("-inf")


def minus_inf_first_chunk(b):  # finite: the rows' statistics start at the second chunk
    b["logits"][0, :CHUNK] = float("-inf")
    b["logits"][1, ::7] = float("-inf")
    b["targets"][0] = CHUNK + 5
    b["targets"][1] = b["targets"][1] // 7 * 7 + 1


def max_in_last_chunk(b):  # the running maximum rises at the last chunk: the (s, u) rescale
    b["logits"][:, V - 10] = 40.0


CORRUPTIONS = [nan_in_second_chunk, nan_chunk, nan_and_minus_inf_chunk, nan_in_tail, plus_inf_in_last_chunk,
               plus_inf_target, minus_inf_row, minus_inf_first_chunk, max_in_last_chunk]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__)
def test_non_finite_logits_across_chunks(corrupt, options, dtype):
    batch = make_batch(LENGTHS, V, dtype=dtype, seed=31, mask_frac=0.0)
    corrupt(batch)
    assert_matches_reference(batch, "cpu", equal_nan=True, **OPTIONS[options])


@pytest.mark.parametrize("corrupt", [nan_in_second_chunk, nan_chunk, plus_inf_in_last_chunk, minus_inf_row],
                         ids=lambda f: f.__name__)
def test_non_finite_row_has_nan_gradient_even_where_g_is_zero(corrupt):
    """dL/dlogp is 0 on a NaN row (the clamps pass no gradient), yet the reference's log_softmax
    backward makes the whole row NaN: fused and separate gradients alike."""
    batch = make_batch(LENGTHS, V, seed=32, mask_frac=0.0)
    corrupt(batch)
    row = int(torch.nonzero(~batch["logits"].isfinite().all(1))[0])
    for inplace in (False, True):  # fused gradient; separate gradient written into the logits
        out, grad = run(dk.policy_loss, batch, backend="cpu", max_len=8, inplace_backward=inplace)
        assert torch.isnan(out.loss) and torch.isnan(out.logprobs[row])
        assert torch.isnan(grad[row]).all()
        others = torch.ones(grad.shape[0], dtype=torch.bool)
        others[row] = False
        assert torch.isfinite(grad[others]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("value", [1e30, -1e30, 3e38])
def test_uniform_huge_logits_keep_log_v(dtype, value):
    """lse = m + log V rounds to m when |m| is huge; logp = (z_y - m) - log s keeps -log V."""
    batch = make_batch([2, 1], V, dtype=dtype, seed=33, mask_frac=0.0)
    batch["logits"] = torch.full_like(batch["logits"], value)
    out, _ = run(dk.policy_loss, batch, backend="cpu", max_len=4, with_entropy=True)
    torch.testing.assert_close(out.logprobs, torch.full((3,), -math.log(V)), rtol=1e-6, atol=0)
    torch.testing.assert_close(out.entropy, torch.full((3,), math.log(V)), rtol=1e-6, atol=0)
    ref, _ = run(dk.reference.policy_loss, {k: (v.double() if v.is_floating_point() else v)
                                            for k, v in batch.items()}, max_len=4, with_entropy=True)
    torch.testing.assert_close(out.loss.double(), ref.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shift", [1e3, 1e5])
def test_shifted_logits_across_chunks(shift):
    batch = make_batch(LENGTHS, V, seed=34, mask_frac=0.0)
    batch["logits"] = batch["logits"] + shift
    assert_matches_reference(batch, "cpu", max_len=8, with_entropy=True, entropy_coef=0.01)


# ---- determinism ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_fused_equals_separate_and_thread_count_independent(dtype):
    """Bitwise: the fused forward + gradient against the forward and the separate gradient, and
    every result with 1 thread against 2 (one row per thread, so no reduction order depends on it)."""
    batch = make_batch([40, 0, 25], V, dtype=dtype, seed=35)
    batch["logits"][3, 7] = float("nan")
    options = dict(max_len=64, kl_coef=0.1, entropy_coef=0.01)
    threads = torch.get_num_threads()
    results = {}
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for inplace in (False, True):
                out, grad = run(dk.policy_loss, batch, backend="cpu", inplace_backward=inplace, **options)
                results[n, inplace] = (out.loss, out.logprobs, out.entropy, grad)
    finally:
        torch.set_num_threads(threads)
    first = results[1, False]
    for key, other in results.items():
        for a, b in zip(first, other):
            assert torch.equal(a.view(-1)[~a.view(-1).isnan()], b.view(-1)[~b.view(-1).isnan()]), key
            assert torch.equal(a.isnan(), b.isnan()), key


# ---- every instruction set -----------------------------------------------------------------------

def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def runnable_capabilities():
    """ATEN_CPU_CAPABILITY values whose kernels this CPU runs (x86 Linux; elsewhere only the default)."""
    flags = cpu_flags()
    caps = ["default"]
    if {"avx2", "fma"} <= flags:
        caps.append("avx2")
        if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
            caps.append("avx512")
    return caps


NAMES = {"default": ("DEFAULT", "NO AVX"), "avx2": ("AVX2",), "avx512": ("AVX512",)}


@pytest.mark.skipif(os.environ.get("DK_TEST_CPU_CAPABILITY") is not None, reason="already a per-path run")
@pytest.mark.parametrize("cap", ["default", "avx2", "avx512"])
def test_every_instruction_set(cap):
    """This file's tests, in a subprocess that runs the kernels' path for cap."""
    if cap not in runnable_capabilities():
        pytest.skip(f"this CPU does not run the {cap} path")
    if capability() in NAMES[cap]:
        pytest.skip(f"{cap} is this process's path: the tests above ran on it")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=cap, DK_TEST_CPU_CAPABILITY=cap)
    proc = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-x", "-p", "no:cacheprovider"],
                          env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


@pytest.mark.skipif(os.environ.get("DK_TEST_CPU_CAPABILITY") is None, reason="only in a per-path run")
def test_per_path_run_is_on_its_path():
    assert capability() in NAMES[os.environ["DK_TEST_CPU_CAPABILITY"]]
