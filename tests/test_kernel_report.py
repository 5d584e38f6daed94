"""deltal_kernels.kernel_report: the GPU kernels' streaming loops read from their sm_90 machine code.

The budgets (issue 11): <= 8 SASS instructions per bf16/fp16 element per thread (<= 12 for fp32), all
128-bit loads of an iteration issued before the first is consumed, no spills. The compile tests need
nvcc + torch's headers (CUDA) or Triton's NVIDIA backend, and cuobjdump; they skip, naming what is
missing, without them. No GPU is needed.
"""
import json
import os
import subprocess
import sys

import pytest

from deltal_kernels import kernel_report as kr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------- the SASS reader (no tools)

SASS = """
        Function : _Z6kernelv
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0020*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0030*/                   LDG.E.128 R8, desc[UR4][R2.64+0x1000] ;
        /*0040*/                   IMAD.U32 R12, R4, 0x10000, RZ ;
        /*0050*/                   LDG.E.128 R16, desc[UR4][R2.64+0x2000] ;
        /*0060*/                   FADD R13, R12, R9 ;
        /*0070*/                   STG.E.128 desc[UR4][R2.64], R4 ;
        /*0080*/                   NOP ;
        /*0090*/              @!P0 BRA 0x20 ;
        /*00a0*/                   LDG.E.128.CONSTANT R4, desc[UR4][R2.64] ;
        /*00b0*/                   FMNMX R5, R4, R6, !PT ;
        /*00c0*/               @P1 BRA 0xa0 ;
        /*00d0*/                   EXIT ;
"""


def test_sass_loops_instructions_and_loads_in_flight():
    funcs = kr.split_functions(SASS)
    assert list(funcs) == ["_Z6kernelv"]
    loops = sorted(kr.streaming_loops(funcs["_Z6kernelv"]), key=lambda lp: lp.start)
    assert len(loops) == 2
    grad, fwd = loops
    assert (grad.kind, grad.start, grad.end) == ("gradient", 0x20, 0x90)
    assert grad.instructions == 7  # the NOP is not counted
    assert (grad.loads128, grad.stores128) == (3, 1)
    assert grad.loads_in_flight == 2  # the IMAD reads R4 before the third load is issued
    assert (fwd.kind, fwd.loads128, fwd.loads_in_flight, fwd.instructions) == ("forward", 1, 1, 3)


def test_report_per_element_and_budget():
    instrs = kr.split_functions(SASS)["_Z6kernelv"]
    (grad,) = kr.report_function("cuda", "k", "bf16", instrs, {"REG": 40}, kinds=("gradient",))
    assert grad.elements == 3 * 8 and grad.per_element == round(7 / 24, 3)
    assert not grad.ok  # two of three loads in flight
    (fwd,) = kr.report_function("cuda", "k", "fp32", instrs, {"REG": 40, "LOCAL": 0}, kinds=("forward",))
    assert fwd.elements == 4 and fwd.ok
    (spilled,) = kr.report_function("cuda", "k", "fp32", instrs, {"REG": 255, "LOCAL": 8}, kinds=("forward",))
    assert spilled.spills == 8 and not spilled.ok


# ---------------------------------------------------------------- the compiled kernels


def _report(backend):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "deltal_kernels.kernel_report", "--arch", "sm_90", "--json",
                           "--backend", backend, "--cuda-from", "source"],
                          env=env, capture_output=True, text=True, timeout=900)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    skipped = [line["skipped"] for line in lines if "skipped" in line]
    if skipped:
        pytest.skip(f"kernel report, {backend}: {skipped[0]}")
    if proc.returncode not in (0, 1):
        if backend == "triton" and "ptxas" in proc.stderr:
            pytest.skip(f"Triton's NVIDIA backend cannot compile here: {proc.stderr.strip().splitlines()[-1]}")
        raise AssertionError(proc.stderr[-4000:])
    return lines


@pytest.mark.slow
def test_cuda_streaming_loops_within_budget():
    """Every CUDA kernel (forward, gradient, fused; fp32/fp16/bf16; warp, block and cluster per row)."""
    reports = _report("cuda")
    kernels = {(r["kernel"], r["dtype"], r["variant"], r["loop"]) for r in reports}
    for dtype in ("fp32", "fp16", "bf16"):
        for variant in ("warp per row", "block per row"):
            assert ("forward_kernel", dtype, variant, "forward") in kernels
            assert ("grad_kernel", dtype, variant, "gradient") in kernels
            assert ("forward_grad_kernel", dtype, variant, "forward") in kernels
            assert ("forward_grad_kernel", dtype, variant, "gradient") in kernels
        # sm_90's one-read schedule for large V: a row per thread-block cluster
        assert ("cluster_forward_kernel", dtype, "cluster per row", "forward") in kernels
        assert ("cluster_forward_grad_kernel", dtype, "cluster per row", "forward") in kernels
        assert ("cluster_forward_grad_kernel", dtype, "cluster per row", "gradient") in kernels
    for r in reports:
        assert r["spills"] == 0, r
        assert r["loads_in_flight"] == r["loads128"], r
        assert r["per_element"] <= r["budget"], r


@pytest.mark.slow
def test_triton_streaming_loops():
    """Triton (V = 151936, aligned rows, the launch's register ceiling): no spills, 128-bit loads,
    every streaming loop within its budget with all its loads issued before the first use."""
    reports = _report("triton")
    assert {r["dtype"] for r in reports} == {"fp32", "fp16", "bf16"}
    assert {r["loop"] for r in reports} >= {"forward", "gradient"}
    for r in reports:
        assert r["spills"] == 0, r
        assert r["loads128"] >= 2, r
        if r["loop"] != "fallback":  # (rows of huge logits only, redone exactly)
            assert r["per_element"] <= r["budget"], r
            assert r["loads_in_flight"] == r["loads128"], r


# ---------------------------------------------------------------- the fast exp's error bound (README)

def test_fast_exp_error_bound_sits_below_the_tolerances():
    """ex2.approx.ftz.f32 is within 2 ulp (relative error <= 2^-22). Every exponential of a row off by
    that much, with random signs or all in one direction, moves lse by <= 2^-22, the entropy by
    <= 2^-21 (E_p|z - m| + 1) and each probability (so each gradient element) by <= 2^-21 relative:
    a tenth of the float32 bounds the kernels are held to or less, and far below bf16 (2^-8) and fp16
    (2^-10) rounding. float64, so only the exp's error is measured."""
    import torch

    gen = torch.Generator().manual_seed(0)
    z = torch.randn(16, 4096, generator=gen, dtype=torch.float64) * 4
    z[:, :7] += 12  # a few dominant logits
    d = z - z.max(1, keepdim=True).values
    e = torch.exp(d)
    s = e.sum(1)
    lse, entropy, p = torch.log(s), torch.log(s) - (e * d).sum(1) / s, e / s[:, None]
    signs = torch.where(torch.rand(z.shape, generator=gen) < 0.5, 1.0, -1.0).double()
    eps = 2.0**-22
    for pert in (eps * signs, torch.full_like(z, eps), torch.full_like(z, -eps)):
        e2 = e * (1 + pert)
        s2 = e2.sum(1)
        lse2, entropy2, p2 = torch.log(s2), torch.log(s2) - (e2 * d).sum(1) / s2, e2 / s2[:, None]
        assert (lse2 - lse).abs().max() <= eps * 1.001
        mean_distance = (p * d.abs()).sum(1)
        assert ((entropy2 - entropy).abs() <= 2 * eps * (mean_distance + 1) * 1.001).all()
        assert ((p2 / p - 1).abs() <= 2 * eps * 1.001).all()
        f32_bound = 1e-5  # the float32 part of tests/cases.py's bound (relative, plus 4 ulp of |z|max)
        assert (lse2 - lse).abs().max() <= f32_bound / 10
        assert ((entropy2 - entropy).abs() <= f32_bound / 10 * entropy.abs().clamp(min=1)).all()
        assert (p2 / p - 1).abs().max() <= min(f32_bound, 2.0**-8, 2.0**-10) / 10
