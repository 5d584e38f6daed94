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
    """Every CUDA kernel (forward, gradient, fused; fp32/fp16/bf16; warp and block per row)."""
    reports = _report("cuda")
    kernels = {(r["kernel"], r["dtype"], r["variant"], r["loop"]) for r in reports}
    for dtype in ("fp32", "fp16", "bf16"):
        for variant in ("warp per row", "block per row"):
            assert ("forward_kernel", dtype, variant, "forward") in kernels
            assert ("grad_kernel", dtype, variant, "gradient") in kernels
            assert ("forward_grad_kernel", dtype, variant, "forward") in kernels
            assert ("forward_grad_kernel", dtype, variant, "gradient") in kernels
    for r in reports:
        assert r["spills"] == 0, r
        assert r["loads_in_flight"] == r["loads128"], r
        assert r["per_element"] <= r["budget"], r


@pytest.mark.slow
def test_triton_streaming_loops():
    """Triton (V = 151936, aligned rows): no spills and 128-bit loads everywhere; the gradient loops and
    the forward without entropy within the budget. The forward with entropy is over it (below)."""
    reports = _report("triton")
    assert {r["dtype"] for r in reports} == {"fp32", "fp16", "bf16"}
    for r in reports:
        assert r["spills"] == 0, r
        assert r["loads128"] >= 2, r
        if r["loop"] == "gradient" or (r["loop"] == "forward" and r["variant"] == "no entropy"):
            assert r["per_element"] <= r["budget"], r


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue 11 open: Triton's forward loop with the entropy sum is 8.9-9.2 SASS "
                                      "instructions per 16-bit element (budget 8), and ptxas leaves some of its "
                                      "loads unissued before the first use (fp32, fp16)")
def test_triton_forward_with_entropy_within_budget():
    reports = _report("triton")
    for r in reports:
        if r["loop"] == "forward":
            assert r["per_element"] <= r["budget"] and r["loads_in_flight"] == r["loads128"], r
