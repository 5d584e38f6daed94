"""What is specific to backend="triton" (the shared conformance matrix is tests/test_backends.py).

Without a GPU these run on Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
so shapes stay small; on a CUDA machine the same tests run the compiled kernels.
"""
import os
import subprocess
import sys

import pytest
import torch

import deltal_kernels as dk
from deltal_kernels import dispatch, torch_backend
from deltal_kernels.validation import LossParams

from cases import device_for, make_batch, run

DEVICE = device_for("triton")
_reason = dispatch.unavailable_reason("triton", DEVICE)
pytestmark = pytest.mark.skipif(_reason is not None, reason=str(_reason))

if _reason is None:
    import triton
    import triton.language as tl

    import deltal_kernels.triton as dtr
    from deltal_kernels.triton import logprob_loss as kernels

PARAMS = LossParams(clip_low=0.2, clip_high=0.28, dual_clip=3.0, kl_coef=0.1, kl_type=3, entropy_coef=0.01,
                    temperature=0.8)
ROW_NAMES = ("logp", "entropy", "lse", "loss", "dlogp", "kl", "flags")


def row_inputs(batch):
    """The row contract's inputs, as dispatch builds them (zeros on unscored rows)."""
    scored = batch["loss_mask"]
    zero = torch.zeros((), device=scored.device)
    rows = lambda x: torch.where(scored, x.float(), zero)  # noqa: E731
    return (batch["targets"], scored, rows(batch["old_logprobs"]), rows(batch["ref_logprobs"]),
            rows(batch["advantages"]))


def assert_rows_close(got, want, rtol=2e-5, atol=2e-5):
    for name, a, b in zip(ROW_NAMES, got, want):
        if name == "flags":
            assert torch.equal(a.cpu(), b.cpu()), name
        else:
            torch.testing.assert_close(a.cpu(), b.cpu(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------- block sizes (no kernel runs)

@pytest.mark.parametrize("itemsize", [4, 2], ids=["fp32", "16bit"])
@pytest.mark.parametrize("V", [1000, 1024, 4096, 8192, 32000, 32003, 50257, 65536, 128256, 129920, 151936,
                               200064, 256000, 262144])
def test_block_config_vocab_1k_to_256k(V, itemsize):
    block, num_warps = dtr.block_config(V, itemsize)
    assert block & (block - 1) == 0, "tl.arange needs a power of two"
    assert block * itemsize <= dtr.CHUNK_BYTES  # 16 KiB of logits per iteration: bounded registers
    assert block >= min(triton.next_power_of_2(V), dtr.CHUNK_BYTES // itemsize)  # a row that fits is one pass
    iterations = -(-V // block)
    assert iterations <= 64  # 256k fp32: 64 iterations of 4096
    assert num_warps & (num_warps - 1) == 0 and 1 <= num_warps <= 16
    per_thread = block // (32 * num_warps)
    assert per_thread * itemsize >= 16, "each thread loads at least one 128-bit vector"
    assert per_thread <= 16  # registers: 16 fp32 values per thread per live [BLOCK] tensor


@pytest.mark.parametrize("V", [1, 2, 3, 17, 100])
def test_block_config_tiny_vocab(V):
    block, num_warps = dtr.block_config(V, 2)
    assert block >= V and block & (block - 1) == 0 and num_warps == 1


def test_block_config_is_a_pure_function():
    # determinism: the reduction order follows from (V, dtype) alone, no autotuning
    assert all(dtr.block_config(151936, 2) == dtr.block_config(151936, 2) for _ in range(3))
    with pytest.raises(ValueError, match="V"):
        dtr.block_config(0, 4)


# ---------------------------------------------------------------- row kernels vs the torch template

@pytest.mark.parametrize("V", [1, 3, 17, 4097, 8193])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_rows_match_torch_template_any_vocab(V, dtype):
    """V below, at and just over a block (masked tail of 1 element), in every dtype."""
    batch = make_batch([3, 2], V, dtype=dtype, device=DEVICE, seed=11, mask_frac=0.3)
    logits = batch["logits"]
    inputs = row_inputs(batch)
    got = dtr.forward_rows(logits, *inputs, PARAMS, True)
    want = torch_backend.forward_rows(logits, *inputs, PARAMS, True)
    assert_rows_close(got, want)
    g = torch.linspace(-1.0, 1.0, logits.shape[0], device=DEVICE) * inputs[1]
    h = torch.full_like(g, 0.3) * inputs[1]
    out = torch.empty_like(logits)
    dtr.grad_rows(logits, inputs[0], got[2], got[1], g, h, PARAMS.temperature, out)
    expected = torch.empty_like(logits)
    torch_backend.grad_rows(logits, inputs[0], want[2], want[1], g, h, PARAMS.temperature, expected)
    ulp = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
    torch.testing.assert_close(out.float().cpu(), expected.float().cpu(), rtol=ulp + 1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_gradient_is_the_rounded_float32_gradient(dtype):
    """The 16-bit gradient is the float32 gradient rounded to nearest even (on the GPU the hardware
    conversion; under the interpreter, whose bfloat16 cast truncates, the kernel's own rounding)."""
    batch = make_batch([4, 3], 3000, dtype=dtype, device=DEVICE, seed=12, mask_frac=0.0)
    logits = batch["logits"]
    inputs = row_inputs(batch)
    rows = dtr.forward_rows(logits, *inputs, PARAMS, True)
    g = torch.linspace(-2.0, 2.0, logits.shape[0], device=DEVICE)
    h = torch.full_like(g, -0.5)
    half = torch.empty_like(logits)
    dtr.grad_rows(logits, inputs[0], rows[2], rows[1], g, h, PARAMS.temperature, half)
    full = torch.empty(logits.shape, dtype=torch.float32, device=DEVICE)
    dtr.grad_rows(logits.float(), inputs[0], rows[2], rows[1], g, h, PARAMS.temperature, full)
    assert torch.equal(half.cpu(), full.to(dtype).cpu())


if _reason is None:
    @triton.jit
    def _round_kernel(x_ptr, y_ptr, n, BF16_BY_HAND: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n)
        tl.store(y_ptr + offs, kernels._round_to(x, y_ptr.dtype.element_ty, BF16_BY_HAND), mask=offs < n)


@pytest.mark.parametrize("by_hand", [True, False], ids=["by-hand", "hardware"])
def test_bfloat16_rounding_edge_cases(by_hand):
    if not by_hand and dtr.INTERPRETED:
        pytest.skip("the interpreter's own float32 -> bfloat16 cast truncates; the kernels round by hand there")
    one = 1.0
    values = [0.0, -0.0, one, -one, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-8 + 2**-20,  # ties to even, above tie
              2.0 - 2**-9, 4.0 - 2**-8,  # carry into the exponent (odd and even exponent)
              3.3895313892515355e38, float("inf"), float("-inf"), 1e-40, -1e-42, 123.456, -7.77e-3]
    x = torch.tensor(values, dtype=torch.float32, device=DEVICE)
    y = torch.empty(len(values), dtype=torch.bfloat16, device=DEVICE)
    _round_kernel[(1,)](x, y, len(values), BF16_BY_HAND=by_hand, BLOCK=32)
    assert torch.equal(y.cpu(), x.cpu().to(torch.bfloat16))


# ---------------------------------------------------------------- fused forward + gradient (proposed)

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_fused_gradient_equals_separate_launches(dtype, inplace):
    """forward_grad_rows: the forward outputs of forward_rows and, in the same launch, the gradient
    grad_rows writes for g = (s * w) * dlogp, h = (s * w) * -entropy_coef; bit for bit."""
    batch = make_batch([0, 4, 1, 0, 3], 2500, dtype=dtype, device=DEVICE, seed=17, mask_frac=0.3)
    logits = batch["logits"]
    inputs = row_inputs(batch)
    w = torch.linspace(0.0, 0.4, logits.shape[0], device=DEVICE) * inputs[1]  # includes a scored w == 0 row
    scale = 0.25
    rows = dtr.forward_rows(logits, *inputs, PARAMS, True)
    d_loss = scale * w
    expected = torch.empty_like(logits)
    dtr.grad_rows(logits, inputs[0], rows[2], rows[1], d_loss * rows[4], d_loss * -PARAMS.entropy_coef,
                  PARAMS.temperature, expected)
    target = logits.clone()
    out = target if inplace else torch.full_like(logits, float("nan"))
    fused = dtr.forward_grad_rows(target, *inputs, PARAMS, True, w, scale, out)
    for name, a, b in zip(ROW_NAMES, fused, rows):
        assert torch.equal(a, b), name
    assert torch.equal(out, expected)
    assert not out[~inputs[1]].any()


# ---------------------------------------------------------------- rows, grid and offsets

def test_unscored_rows_are_never_read():
    """Unscored rows do no V work: NaN logits there change nothing and get exact zeros."""
    batch = make_batch([3, 4], 700, device=DEVICE, seed=13, mask_frac=0.4)
    mask = batch["loss_mask"]
    assert mask.any() and not mask.all()
    clean, clean_grad = run(dk.policy_loss, batch, backend="triton", max_len=8, entropy_coef=0.01)
    batch["logits"][~mask] = float("nan")
    out, grad = run(dk.policy_loss, batch, backend="triton", max_len=8, entropy_coef=0.01)
    assert torch.equal(out.loss, clean.loss) and torch.equal(grad, clean_grad)
    assert not grad[~mask].any() and torch.isfinite(grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_minus_inf_logits(dtype):
    """-inf logits (a masked or padded vocabulary) are probability 0: finite logp, entropy and
    gradient, and exact zeros in the gradient there. The float64 reference, which computes
    p * log p as 0 * -inf = NaN, is run with -1e4 in their place (exp underflows to exactly 0)."""
    batch = make_batch([3, 0, 4], 1000, dtype=dtype, device=DEVICE, seed=18, mask_frac=0.2)
    logits = batch["logits"]
    gen = torch.Generator().manual_seed(0)
    holes = torch.rand(logits.shape, generator=gen) < 0.3
    holes[:, -24:] = True  # a padded vocabulary tail
    holes[torch.arange(logits.shape[0]), batch["targets"].cpu()] = False
    holes[:, 0] = False
    holes = holes.to(DEVICE)
    batch["logits"] = logits.masked_fill(holes, float("-inf"))
    opts = dict(max_len=8, entropy_coef=0.05, kl_coef=0.1, temperature=0.9)
    out, grad = run(dk.policy_loss, batch, backend="triton", **opts)
    finite = dict(batch, logits=batch["logits"].double().masked_fill(holes, -1e4))
    ref, ref_grad = run(dk.reference.policy_loss, {k: v.cpu() for k, v in finite.items()}, **opts)
    torch.testing.assert_close(out.loss.double().cpu(), ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logprobs.double().cpu(), ref.logprobs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.entropy.double().cpu(), ref.entropy, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(grad).all() and not grad[holes].any()
    rounding = 2.0**-8 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(grad.double().cpu(), ref_grad, rtol=rounding, atol=1e-7)


def test_out_of_range_target_reads_nothing():
    """prepare() rejects such targets, except under torch.compile (no value checks there): the
    kernels must still stay in bounds. logp becomes NaN, the gradient writes no one-hot entry."""
    batch = make_batch([3], 64, device=DEVICE, seed=19, mask_frac=0.0)
    targets, scored, old, ref, adv = row_inputs(batch)
    targets = targets.clone()
    targets[0], targets[2] = 64, -1
    rows = dtr.forward_rows(batch["logits"], targets, scored, old, ref, adv, PARAMS, True)
    assert rows[0][[0, 2]].isnan().all() and rows[0][1].isfinite()
    out = torch.empty_like(batch["logits"])
    g, h = torch.ones(3, device=DEVICE), torch.zeros(3, device=DEVICE)
    dtr.grad_rows(batch["logits"], targets, rows[2], rows[1], g, h, 1.0, out)
    assert (out[[0, 2]] <= 0).all()  # -p only: the one-hot landed nowhere


def test_grid_stride_loop_over_rows(monkeypatch):
    """Fewer programs than rows (what N > MAX_PROGRAMS does): bitwise the same results."""
    batch = make_batch([0, 5, 1, 0, 4], 500, dtype=torch.bfloat16, device=DEVICE, seed=14)
    one_per_row = run(dk.policy_loss, batch, backend="triton", max_len=8, entropy_coef=0.02, kl_coef=0.1)
    monkeypatch.setattr(dtr, "MAX_PROGRAMS", 3)
    strided = run(dk.policy_loss, batch, backend="triton", max_len=8, entropy_coef=0.02, kl_coef=0.1)
    assert torch.equal(one_per_row[0].loss, strided[0].loss) and torch.equal(one_per_row[1], strided[1])
    assert torch.equal(one_per_row[0].logprobs, strided[0].logprobs)


def _strided_rows(V, row_stride, rows, dtype, device):
    """A [rows, V] view whose rows lie row_stride elements apart in one buffer: the last row's offset
    exceeds 2^31 elements while only rows * V elements are ever touched (the rest of the buffer is
    virtual memory the OS never backs)."""
    buf = torch.empty((rows - 1) * row_stride + V, dtype=dtype, device=device)
    return buf.as_strided((rows, V), (row_stride, 1))


def test_int64_row_offsets_through_the_row_stride():
    """row * stride above 2^31 with an int32-sized stride: the offset arithmetic must be 64-bit.

    Under the interpreter the buffer is ~4.3 GB of untouched host virtual memory; on a GPU it is a
    real allocation, so there the test needs that much free device memory.
    """
    V, stride, rows, dtype = 300, 2**30 + 3, 3, torch.float16
    if DEVICE == "cuda" and torch.cuda.mem_get_info()[0] < 2 * ((rows - 1) * stride + V) + (1 << 30):
        pytest.skip("needs about 5 GB of free CUDA memory")
    try:
        logits = _strided_rows(V, stride, rows, dtype, DEVICE)
    except RuntimeError as e:  # no overcommit on this host
        pytest.skip(f"cannot reserve a {2 * ((rows - 1) * stride + V) / 2**30:.1f} GiB buffer: {e}")
    assert logits.storage_offset() == 0 and (rows - 1) * logits.stride(0) > 2**31
    batch = make_batch([rows], V, dtype=dtype, device=DEVICE, seed=15, mask_frac=0.0)
    logits.copy_(batch["logits"])
    inputs = row_inputs(batch)
    got = dtr.forward_rows(logits, *inputs, PARAMS, True)
    want = torch_backend.forward_rows(batch["logits"], *inputs, PARAMS, True)
    assert_rows_close(got, want)
    g = torch.tensor([0.5, -1.0, 2.0], device=DEVICE)
    h = torch.tensor([0.1, 0.0, -0.2], device=DEVICE)
    expected = torch.empty_like(batch["logits"])
    dtr.grad_rows(batch["logits"], inputs[0], got[2], got[1], g, h, PARAMS.temperature, expected)
    dtr.grad_rows(logits, inputs[0], got[2], got[1], g, h, PARAMS.temperature, logits)  # in place, strided
    assert torch.equal(logits.cpu(), expected.cpu())


@pytest.mark.bigmem
@pytest.mark.cuda
def test_64bit_offsets_n_times_v_above_2_31():
    """A real [N, V] bf16 batch with N * V > 2^31 (the Qwen vocabulary, ~14.1k rows, 4.3 GB); the
    scored rows sit past element 2^31 and are checked against the torch backend on their slice.
    The gradient is written in place, so the test needs about 4.5 GB of free CUDA memory."""
    if not torch.cuda.is_available():
        pytest.skip("bigmem: needs a CUDA device with about 4.5 GB free (64-bit offset case)")
    V = 151936
    N = 2**31 // V + 3
    need = N * V * 2 + (512 << 20)
    free = torch.cuda.mem_get_info()[0]
    if free < need:
        pytest.skip(f"bigmem: needs {need / 2**30:.1f} GiB of free CUDA memory, {free / 2**30:.1f} GiB free")
    gen = torch.Generator(device="cuda").manual_seed(16)
    logits = torch.empty(N, V, dtype=torch.bfloat16, device="cuda")
    for start in range(0, N, 1024):  # fill in chunks (no float32 [N, V] temporary)
        end = min(N, start + 1024)
        logits[start:end] = torch.randn(end - start, V, generator=gen, device="cuda").mul_(3.0)
    tail = 4
    assert (N - tail) * V > 2**31
    targets = torch.randint(0, V, (N,), device="cuda", generator=gen)
    scored = torch.zeros(N, dtype=torch.bool, device="cuda")
    scored[0] = True
    scored[-tail:] = True
    old = torch.where(scored, -torch.rand(N, device="cuda", generator=gen) * 10, 0.0)
    ref = torch.where(scored, old + 0.1, 0.0)
    adv = torch.where(scored, torch.randn(N, device="cuda", generator=gen), 0.0)
    got = dtr.forward_rows(logits, targets, scored, old, ref, adv, PARAMS, True)
    sl = torch.cat([torch.arange(1, device="cuda"), torch.arange(N - tail, N, device="cuda")])
    small = logits[sl].clone()
    want = torch_backend.forward_rows(small, targets[sl], scored[sl], old[sl], ref[sl], adv[sl], PARAMS, True)
    assert_rows_close([x[sl] for x in got], want)
    assert not got[0][1:N - tail].any()
    g = torch.where(scored, 0.7, 0.0)
    h = torch.where(scored, -0.01, 0.0)
    expected = torch.empty_like(small)
    torch_backend.grad_rows(small, targets[sl], got[2][sl], got[1][sl], g[sl], h[sl], PARAMS.temperature, expected)
    dtr.grad_rows(logits, targets, got[2], got[1], g, h, PARAMS.temperature, logits)  # in place
    torch.testing.assert_close(logits[sl].float(), expected.float(), rtol=2.0**-7, atol=1e-6)
    assert not logits[1:2].any() and not logits[N - tail - 1].any()


# ---------------------------------------------------------------- the GPU compiler, without a GPU

# Runs in a subprocess without TRITON_INTERPRET (here the kernels are interpreted): Triton's own
# front end, LLVM and the bundled ptxas compile every specialisation for sm_90 / sm_80 on the CPU.
# That catches what the interpreter cannot: non-constexpr globals, type mismatches across
# if/for, register spills, and whether 16-byte-aligned rows get 128-bit vector loads.
_AOT_SCRIPT = r"""
import json, os, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import deltal_kernels.triton as dtr
from deltal_kernels.triton import logprob_loss as k
from deltal_kernels.triton import shard

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
DT = {4: "fp32", 2: "bf16"}

def compile_(fn, types, cons, num_warps, arch, aligned, v16=True):
    sig = {n: types.get(n, "constexpr") for n in fn.arg_names}
    names = list(fn.arg_names)
    attrs = {}
    if aligned:  # what the JIT adds at launch for 16-byte-aligned pointers (and strides/V % 16 == 0)
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in types
                 if types[n].startswith("*") or (v16 and (n.startswith("stride") or n == "V"))}
    cons = dict(cons, ROW_ALIGNED=aligned)
    cc = triton.compile(ASTSource(fn, sig, cons, attrs), target=GPUTarget("cuda", arch, 32),
                        options=dict(num_warps=num_warps, maxnreg=min(255, 65536 // (32 * num_warps))))  # as launched
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cc.asm["cubin"]); f.flush()
        usage = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True).stdout
    line = [l for l in usage.splitlines() if "REG:" in l][0]
    res = dict(kv.split(":") for kv in line.split() if ":" in kv)
    ptx = cc.asm["ptx"]
    return dict(regs=int(res["REG"]), local=int(res["LOCAL"]), stack=int(res["STACK"]),
                v4_loads=ptx.count("ld.global.v4"), v4_stores=ptx.count("st.global.v4"))

def fwd_types(dt, idx):
    t = dict(logits_ptr="*" + dt, stride_row=idx, targets_ptr="*i64", scored_ptr="*u8", weights_ptr="*fp32",
             grad_ptr="*" + dt, stride_grad=idx, N="i32", V="i32", grad_scale="fp32", inv_tau="fp32",
             ratio_lo="fp32", ratio_hi="fp32", dual_clip="fp32", kl_coef="fp32", entropy_coef="fp32")
    for n in ("old", "ref", "adv", "logp", "entropy", "lse", "loss", "dlogp", "kl"):
        t[n + "_ptr"] = "*fp32"
    t["flags_ptr"] = "*u8"
    if idx == "i64":
        t["N"] = t["V"] = "i64"
    return t

def grad_types(dt, idx):
    return dict(logits_ptr="*" + dt, stride_x=idx, out_ptr="*" + dt, stride_out=idx, targets_ptr="*i64",
                lse_ptr="*fp32", entropy_ptr="*fp32", g_ptr="*fp32", h_ptr="*fp32", N=idx, V=idx,
                inv_tau="fp32")

def shard_stats_types(dt, idx):
    return dict(logits_ptr="*" + dt, stride_row=idx, targets_ptr="*i64", scored_ptr="*u8", m_ptr="*fp32",
                s_ptr="*fp32", u_ptr="*fp32", zt_ptr="*fp32", N=idx, V=idx, vocab_start=idx, inv_tau="fp32")

def shard_grad_types(dt, idx):
    return dict(logits_ptr="*" + dt, stride_x=idx, out_ptr="*" + dt, stride_out=idx, targets_ptr="*i64",
                m_ptr="*fp32", log_s_ptr="*fp32", entropy_ptr="*fp32", g_ptr="*fp32", h_ptr="*fp32", N=idx,
                V=idx, vocab_start=idx, inv_tau="fp32")

results = []
base = dict(KL_TYPE=3, HAS_DUAL=True, NEED_ENTROPY=True, ENTROPY_IN_LOSS=True, WRITE_GRAD=False,
            BF16_BY_HAND=False)
variants = []
ITEM = {"fp32": 4, "bf16": 2, "fp16": 2}
for itemsize, dt in ((4, "fp32"), (2, "bf16"), (2, "fp16")):
    for V in (1000, 32000, 151936, 262144):
        block, warps = dtr.block_config(V, itemsize)
        variants.append((dt, block, warps, {}, "i32", 90))
block, warps = dtr.block_config(151936, 2)
for extra in (dict(KL_TYPE=0, HAS_DUAL=False, NEED_ENTROPY=False, ENTROPY_IN_LOSS=False), dict(KL_TYPE=1),
              dict(KL_TYPE=2), dict(WRITE_GRAD=True), dict(WRITE_GRAD=True, BF16_BY_HAND=True)):
    variants.append(("bf16", block, warps, extra, "i32", 90))
variants.append(("bf16", block, warps, {}, "i64", 90))  # strides, N and V >= 2^31 arrive as i64
variants.append(("bf16", block, warps, dict(WRITE_GRAD=True), "i32", 80))
for dt, block, warps, extra, idx, arch in variants:
    vec = dtr.vec_elements(ITEM[dt])
    for name, fn, types, cons in (
            ("forward", k._forward_kernel, fwd_types(dt, idx),
             dict(base, BLOCK=block, VEC=vec, FAST_EXP=True, **extra)),
            ("grad", k._grad_kernel, grad_types(dt, idx),
             dict(BLOCK=block, BF16_BY_HAND=extra.get("BF16_BY_HAND", False), VEC=vec, FAST_EXP=True))):
        # aligned rows whose V (and row stride) is not a multiple of 16: ROW_ALIGNED alone must give 128-bit loads
        for aligned, v16 in ((True, True), (True, False), (False, False)):
            r = compile_(fn, types, cons, warps, arch, aligned, v16)
            r.update(kernel=name, dtype=dt, block=block, warps=warps, extra=extra, idx=idx, arch=arch, aligned=aligned,
                     v16=v16)
            results.append(r)
# the vocabulary-parallel kernels: a shard of the Qwen vocabulary, 32-bit and 64-bit offsets
for dt in ("fp32", "bf16", "fp16"):
    block, warps = dtr.block_config(151936, ITEM[dt])
    vec = dtr.vec_elements(ITEM[dt])
    for idx in ("i32", "i64"):
        for name, fn, types, cons in (
                ("shard_stats", shard._shard_stats_kernel, shard_stats_types(dt, idx),
                 dict(NEED_ENTROPY=True, BLOCK=block, VEC=vec, FAST_EXP=True)),
                ("shard_grad", shard._shard_grad_kernel, shard_grad_types(dt, idx),
                 dict(BLOCK=block, BF16_BY_HAND=False, VEC=vec, FAST_EXP=True))):
            for aligned, v16 in ((True, True), (True, False), (False, False)):
                r = compile_(fn, types, cons, warps, 90, aligned, v16)
                r.update(kernel=name, dtype=dt, block=block, warps=warps, extra={}, idx=idx, arch=90, aligned=aligned,
                         v16=v16)
                results.append(r)
print(json.dumps(results))
"""


@pytest.mark.slow
def test_kernels_compile_for_the_gpu_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and ("ptxas" in proc.stderr or "backend" in proc.stderr.lower()) \
            and "CompilationError" not in proc.stderr:
        pytest.skip(f"Triton's NVIDIA backend cannot compile here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    import json
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) >= 40
    for r in results:
        assert r["local"] == 0 and r["stack"] == 0, f"register spills: {r}"
        if r["aligned"]:  # 16-byte-aligned rows, whatever V: 128-bit loads (and stores for the gradient)
            assert r["v4_loads"] > 0, f"no vector loads: {r}"
            if r["kernel"] in ("grad", "shard_grad") or r["extra"].get("WRITE_GRAD"):
                assert r["v4_stores"] > 0, f"no vector stores: {r}"


# ---------------------------------------------------------------- availability and dispatch

@pytest.mark.cuda
def test_auto_picks_triton_for_cuda_without_compiled_backend():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if dispatch.unavailable_reason("cuda", "cuda") is None:
        pytest.skip("the compiled CUDA backend is present here; auto prefers it")
    assert dispatch.resolve_backend("auto", torch.device("cuda")) == "triton"
    assert dk.available_backends("cuda")[0] == "triton"


def test_auto_order_puts_triton_right_after_the_compiled_cuda_backend():
    assert dispatch.AUTO_ORDER["cuda"][:2] == ("cuda", "triton")


def test_cpu_without_interpreter_is_a_clear_reason():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    code = "import deltal_kernels.triton as t; print(t.unavailable_reason('cpu'))"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "TRITON_INTERPRET=1" in result.stdout and "CUDA" in result.stdout


def test_rejects_float64_and_strided_columns():
    x = torch.zeros(2, 8, dtype=torch.float64, device=DEVICE)
    args = (torch.zeros(2, dtype=torch.int64, device=DEVICE), torch.ones(2, dtype=torch.bool, device=DEVICE),
            torch.zeros(2, device=DEVICE), None, torch.zeros(2, device=DEVICE), PARAMS, False)
    with pytest.raises(TypeError, match="float64"):
        dtr.forward_rows(x, *args)
    with pytest.raises(ValueError, match="unit stride"):
        dtr.forward_rows(torch.zeros(8, 2, device=DEVICE).t(), *args)


# ---------------------------------------------------------------- the fused schedule's grid (no kernel runs)

H100 = dict(sms=132, l2_bytes=50 << 20)


@pytest.mark.parametrize("V", [8000, 32000, 151936, 262144])
@pytest.mark.parametrize("itemsize", [2, 4], ids=["16bit", "fp32"])
def test_fused_grid_is_resident_and_keeps_rows_in_a_quarter_of_l2(V, itemsize):
    block, warps = dtr.block_config(V, itemsize)
    for registers in (0, 64, 108, 128):
        grid = dtr.fused_grid(1 << 20, V, itemsize, num_warps=warps, registers=registers, **H100)
        threads = 32 * warps
        per_sm = min(dtr.SM_THREADS // threads, dtr.SM_REGISTERS // (threads * (registers or dtr.ASSUMED_REGISTERS)))
        assert grid <= H100["sms"] * max(1, per_sm)  # one wave: every program resident at once
        assert grid >= H100["sms"]  # every SM busy
        if grid > H100["sms"]:  # above one program per SM only while the rows fit a quarter of the L2
            assert grid * V * itemsize <= H100["l2_bytes"] // 4


def test_fused_grid_at_32k_bf16_is_one_wave():
    """The old rule (half the L2) launched 409 programs at V = 32000 bf16 on an H100 where 396 fit."""
    block, warps = dtr.block_config(32000, 2)
    assert dtr.fused_grid(16384, 32000, 2, num_warps=warps, registers=108, **H100) == 132
    assert dtr.fused_grid(50, 32000, 2, num_warps=warps, **H100) == 50  # no more programs than rows


@pytest.mark.cuda
def test_launches_on_the_tensors_device():
    """Tensors on cuda:1 while cuda:0 is current (device_map="auto"): the kernels run on cuda:1."""
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    batch = make_batch([3, 2], 1000, dtype=torch.bfloat16, device="cuda:1", seed=30, mask_frac=0.2)
    with torch.cuda.device(0):
        got, grad = run(dk.policy_loss, batch, backend="triton", max_len=8, entropy_coef=0.01)
    want, want_grad = run(dk.policy_loss, batch, backend="torch", max_len=8, entropy_coef=0.01)
    assert grad.device == torch.device("cuda:1")
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.float(), want_grad.float(), rtol=2.0**-7, atol=1e-6)
