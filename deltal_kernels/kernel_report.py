"""The streaming loops of the GPU kernels, read from their sm_90 machine code (no GPU needed).

    python -m deltal_kernels.kernel_report --arch sm_90 [--json] [--cuda-from source|extension]

For each kernel (CUDA extension and Triton) and logits dtype: registers, spills (local memory and
stack bytes), the 128-bit loads of its streaming loop, the loop's SASS instructions per element and
per thread, and how many of the loop's loads are issued before the first of them is consumed
("loads in flight"). With --json, one JSON object a line.

Where the code comes from:
- CUDA: csrc/cuda/rows_cuda.cu compiled with nvcc to an sm_90 cubin (``--cuda-from source``, the
  default when nvcc, the source and torch's headers are present), or the sm_90 code in the built
  extension (``--cuda-from extension``).
- Triton: ``triton.compile`` of the kernels for sm_90 with the launch's specialisation for the Qwen
  vocabulary (V = 151936, 16-byte-aligned rows), Triton's own ptxas.
Disassembly: ``cuobjdump -sass`` (CUDA toolkit or Triton's bundled copy).

How the loop is found: a streaming loop is a backward branch's body holding 128-bit global loads
(LDG.E.128); the forward loop has no stores, the gradient loop stores (STG.E.128). Of the loops of a
kind the ones with the most 128-bit loads are the main (unrolled) ones; a kernel's figure is the
worst of them. Elements per iteration = 128-bit loads x (16 bytes / itemsize).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parent.parent
CUDA_SOURCE = ROOT / "csrc" / "cuda" / "rows_cuda.cu"
CUDA_INCLUDE = ROOT / "csrc" / "include"

# SPEC section 4 / issue 11: SASS instructions per element per thread in the streaming loops
BUDGET = {"bf16": 8.0, "fp16": 8.0, "fp32": 12.0}
ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
# Triton specialisation reported: the Qwen vocabulary
REPORT_V = 151936


class ToolMissing(RuntimeError):
    """A tool the report needs (nvcc, cuobjdump, triton, torch headers) is not here."""


@dataclass
class Loop:
    kind: str  # "forward" or "gradient"
    start: int
    end: int
    instructions: int
    loads128: int
    stores128: int
    loads_in_flight: int


@dataclass
class KernelReport:
    backend: str
    kernel: str
    dtype: str
    loop: str
    registers: int
    spills: int  # local memory + stack bytes per thread
    loads128: int
    elements: int  # per thread per loop iteration
    instructions: int  # in the loop body
    per_element: float
    loads_in_flight: int
    budget: float
    ok: bool
    variant: str = ""
    extra: Dict[str, object] = field(default_factory=dict)

    def line(self) -> str:
        return (f"{self.backend:6} {self.kernel:28} {self.loop:8} {self.dtype:4} {self.variant:22} "
                f"regs {self.registers:3}  spills {self.spills:3}  128-bit loads {self.loads128:2}  "
                f"{self.per_element:5.2f} instr/elem ({self.instructions} / {self.elements})  "
                f"in flight {self.loads_in_flight}/{self.loads128}  "
                f"{'(not budgeted)' if self.loop == 'fallback' else 'ok' if self.ok else 'OVER BUDGET'}")


# ------------------------------------------------------------------------------------ tools

def cuobjdump() -> str:
    candidates = []
    found = shutil.which("cuobjdump")
    if found:
        candidates.append(Path(found))
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "bin" / "cuobjdump")
    candidates.append(Path("/usr/local/cuda/bin/cuobjdump"))
    try:
        import triton

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    except ImportError:
        pass
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    raise ToolMissing("cuobjdump not found (CUDA toolkit bin/ or Triton's bundled backends/nvidia/bin/)")


def nvcc() -> str:
    found = shutil.which("nvcc")
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if not found and os.environ.get(var) and (Path(os.environ[var]) / "bin" / "nvcc").is_file():
            found = str(Path(os.environ[var]) / "bin" / "nvcc")
    if not found and Path("/usr/local/cuda/bin/nvcc").is_file():
        found = "/usr/local/cuda/bin/nvcc"
    if not found:
        raise ToolMissing("nvcc not found (CUDA toolkit)")
    return found


def _run(cmd: List[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def sass_of(cubin_or_so: str, arch: str) -> str:
    tool = cuobjdump()
    args = [tool, "-sass", cubin_or_so]
    if cubin_or_so.endswith(".so"):
        args = [tool, "-sass", "-arch", arch, cubin_or_so]
    return _run(args)


def resources_of(cubin_or_so: str, arch: str) -> Dict[str, Dict[str, int]]:
    """function name -> {REG, STACK, LOCAL, SHARED} from cuobjdump -res-usage."""
    tool = cuobjdump()
    args = [tool, "-res-usage", cubin_or_so]
    if cubin_or_so.endswith(".so"):
        args = [tool, "-res-usage", "-arch", arch, cubin_or_so]
    out = _run(args)
    res, name = {}, None
    for line in out.splitlines():
        m = re.search(r"Function ([^\s:]+)\s*:", line)
        if m:
            name = m.group(1)
            continue
        if name and "REG:" in line:
            res[name] = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}
            name = None
    return res


# ------------------------------------------------------------------------------------ SASS

_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_REG = re.compile(r"(?<![A-Za-z_])R(\d+)(?:\.(64|128))?")


def split_functions(sass: str) -> Dict[str, List[Tuple[int, str]]]:
    """function name -> [(address, instruction text)]"""
    funcs: Dict[str, List[Tuple[int, str]]] = {}
    current = None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            current = m.group(1)
            funcs[current] = []
            continue
        if current is None:
            continue
        m = _INSN.search(line)
        if m:
            funcs[current].append((int(m.group(1), 16), m.group(2).strip()))
    return funcs


def _opcode(text: str) -> str:
    t = re.sub(r"^@!?U?P\w+\s+", "", text)
    return t.split()[0] if t.split() else ""


def _regs(operand_text: str) -> set:
    out = set()
    for m in _REG.finditer(operand_text):
        base = int(m.group(1))
        width = {None: 1, "64": 2, "128": 4}[m.group(2)]
        out.update(range(base, base + width))
    return out


def _is_load128(op: str) -> bool:
    return op.startswith("LDG") and ".128" in op


def _is_store128(op: str) -> bool:
    return op.startswith("STG") and ".128" in op


def _loads_in_flight(body: List[Tuple[int, str]]) -> int:
    """128-bit loads of the loop issued before the first instruction that reads one's result."""
    pending: set = set()
    issued = 0
    for _, text in body:
        op = _opcode(text)
        operands = text.split(None, 1)[1] if " " in text else ""
        operands = re.sub(r"^@!?U?P\w+\s+\S+\s*", "", text)
        operands = operands.split(None, 1)[1] if " " in operands else ""
        parts = [p.strip() for p in operands.split(",")]
        if op.startswith(("STG", "STS", "ST.", "RED", "ATOM")):
            sources = _regs(",".join(parts))
        else:
            sources = _regs(",".join(parts[1:]))
        if pending & sources:
            return issued
        if _is_load128(op):
            issued += 1
            pending |= _regs(parts[0])
    return issued


def streaming_loops(instrs: List[Tuple[int, str]], per_load: int = 8, fallback: bool = False) -> List[Loop]:
    """Every backward branch's body that holds 128-bit global loads, innermost first.

    With ``fallback`` (Triton), a loop without stores that multiplies every element with its own FMUL
    is the forward's exact-offset pass for rows of huge logits (|max x / tau| >= 2^24 / log2(e), never
    met in practice): kind "fallback", listed but not held to the budget. (The CUDA kernels' exact
    pass goes element by element: no 128-bit loads, not a streaming loop.)"""
    addr_index = {a: i for i, (a, _) in enumerate(instrs)}
    loops = []
    for i, (addr, text) in enumerate(instrs):
        op = _opcode(text)
        if not op.startswith("BRA"):
            continue
        m = re.search(r"0x([0-9a-f]+)\s*$", text)
        if not m:
            continue
        target = int(m.group(1), 16)
        if target > addr or target not in addr_index:
            continue
        body = instrs[addr_index[target]:i + 1]
        ops = [_opcode(t) for _, t in body]
        loads = sum(_is_load128(o) for o in ops)
        if loads == 0:
            continue
        stores = sum(_is_store128(o) for o in ops)
        real = sum(1 for o in ops if o != "NOP")
        kind = "gradient" if stores else "forward"
        if fallback and not stores and sum(o == "FMUL" for o in ops) >= loads * per_load:
            kind = "fallback"
        loops.append(Loop(kind, target, addr, real, loads, stores, _loads_in_flight(body)))
    # drop loops that contain another streaming loop (keep the innermost: a row loop holds them all)
    inner = []
    for lp in loops:
        if not any(o is not lp and lp.start <= o.start and o.end <= lp.end
                   and (o.start, o.end) != (lp.start, lp.end) for o in loops):
            inner.append(lp)
    return inner


def main_loops(instrs, per_load: int = 8, fallback: bool = False) -> Dict[str, List[Loop]]:
    """kind -> its main loops (those with the most 128-bit loads)."""
    out: Dict[str, List[Loop]] = {}
    for lp in streaming_loops(instrs, per_load, fallback):
        out.setdefault(lp.kind, []).append(lp)
    for kind, lps in out.items():
        most = max(lp.loads128 for lp in lps)
        out[kind] = [lp for lp in lps if lp.loads128 == most]
    return out


def report_function(backend, kernel, dtype, instrs, res, variant="", kinds=("forward", "gradient", "fallback")):
    reports = []
    per_load = 16 // ITEMSIZE[dtype]
    loops = main_loops(instrs, per_load, fallback=backend == "triton")
    for kind in kinds:
        if kind not in loops:
            continue
        worst = max(loops[kind], key=lambda lp: lp.instructions / lp.loads128)
        elements = worst.loads128 * per_load
        per_elem = worst.instructions / elements
        spills = res.get("LOCAL", 0) + res.get("STACK", 0)
        within = per_elem <= BUDGET[dtype] and worst.loads_in_flight == worst.loads128
        ok = spills == 0 and (kind == "fallback" or within)
        reports.append(KernelReport(backend, kernel, dtype, kind, res.get("REG", 0), spills, worst.loads128,
                                    elements, worst.instructions, round(per_elem, 3), worst.loads_in_flight,
                                    BUDGET[dtype], ok, variant))
    return reports


# ------------------------------------------------------------------------------------ CUDA

_CUDA_DTYPES = {"float": "fp32", "c10::Half": "fp16", "c10::BFloat16": "bf16"}


def _demangle(names: List[str]) -> Dict[str, str]:
    tool = shutil.which("c++filt")
    if not tool:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out))


def compile_cuda_source(arch: str, workdir: str) -> str:
    if not CUDA_SOURCE.is_file():
        raise ToolMissing(f"{CUDA_SOURCE} not found (the report compiles the CUDA source of a clone)")
    try:
        import torch.utils.cpp_extension as ext
    except ImportError as e:
        raise ToolMissing(f"torch's C++ headers are needed to compile the CUDA source: {e}")
    includes = [str(CUDA_INCLUDE)] + list(ext.include_paths())
    import sysconfig

    includes.append(sysconfig.get_paths()["include"])
    cubin = os.path.join(workdir, "rows_cuda.cubin")
    cmd = [nvcc(), "-cubin", f"-arch={arch}", "-O3", "-std=c++20", "--expt-relaxed-constexpr", "-DDK_WITH_CUDA",
           "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
           "-D__CUDA_NO_HALF2_OPERATORS__", "-DTORCH_EXTENSION_NAME=_C"]
    cmd += [f"-I{p}" for p in includes] + [str(CUDA_SOURCE), "-o", cubin]
    _run(cmd)
    return cubin


def extension_library() -> str:
    try:
        from deltal_kernels import extension
    except ImportError as e:
        raise ToolMissing(f"the compiled extension does not import: {e}")
    if extension._C is None or not extension.cuda_built():
        raise ToolMissing("the compiled extension has no CUDA part")
    return extension._C.__file__


def cuda_reports(arch: str = "sm_90", source: str = "auto") -> List[KernelReport]:
    with tempfile.TemporaryDirectory() as tmp:
        if source == "extension":
            binary = extension_library()
        elif source == "source":
            binary = compile_cuda_source(arch, tmp)
        else:
            try:
                binary = compile_cuda_source(arch, tmp)
            except ToolMissing:
                binary = extension_library()
        sass = sass_of(binary, arch)
        res = resources_of(binary, arch)
    funcs = split_functions(sass)
    names = _demangle(list(funcs))
    reports = []
    for mangled, instrs in funcs.items():
        pretty = names.get(mangled, mangled)
        # kernel<dtype, threads per row> (one block or warp per row) or cluster_...<dtype> (a row per cluster)
        m = re.search(r"cuda::(\w+)<([\w:]+)(?:, (\d+))?>", pretty)
        if not m or m.group(2) not in _CUDA_DTYPES:
            continue
        kernel, dtype = m.group(1), _CUDA_DTYPES[m.group(2)]
        if kernel.startswith("cluster_"):
            variant = "cluster per row"
        elif m.group(3) is not None:
            variant = "block per row" if int(m.group(3)) > 32 else "warp per row"
        else:
            continue
        reports += report_function("cuda", kernel, dtype, instrs, res.get(mangled, {}), variant)
    order = {"forward_kernel": 0, "grad_kernel": 1, "forward_grad_kernel": 2, "cluster_forward_kernel": 3,
             "cluster_forward_grad_kernel": 4}
    reports.sort(key=lambda r: (order.get(r.kernel, 9), r.variant, list(BUDGET).index(r.dtype), r.loop))
    return reports


# ------------------------------------------------------------------------------------ Triton

def _triton_compile(fn, types, constants, num_warps, arch_number):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(fn.arg_names)
    sig = {n: types.get(n, "constexpr") for n in names}
    # what the JIT adds at launch for 16-byte-aligned pointers and integers divisible by 16
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in types
             if types[n].startswith("*") or n.startswith("stride")}
    src = ASTSource(fn, sig, constants, attrs)
    # the launch's options (deltal_kernels.triton.launch_options: num_warps and the register ceiling)
    options = dict(num_warps=num_warps, maxnreg=min(255, 65536 // (32 * num_warps)))
    return triton.compile(src, target=GPUTarget("cuda", arch_number, 32), options=options)


def triton_variants(V: int = REPORT_V):
    """(kernel name, jit function, types, constexprs, num_warps, dtype, variant) of the report."""
    import deltal_kernels.triton as dtr
    from deltal_kernels.triton import logprob_loss as k

    out = []
    for dtype, dt, itemsize in (("fp32", "fp32", 4), ("bf16", "bf16", 2), ("fp16", "fp16", 2)):
        block, warps = dtr.block_config(V, itemsize)
        fwd_types = dict(logits_ptr="*" + dt, stride_row="i32", targets_ptr="*i64", scored_ptr="*u8",
                         weights_ptr="*fp32", grad_ptr="*" + dt, stride_grad="i32", N="i32", V="i32",
                         grad_scale="fp32", inv_tau="fp32", ratio_lo="fp32", ratio_hi="fp32", dual_clip="fp32",
                         kl_coef="fp32", entropy_coef="fp32", flags_ptr="*u8")
        for n in ("old", "ref", "adv", "logp", "entropy", "lse", "loss", "dlogp", "kl"):
            fwd_types[n + "_ptr"] = "*fp32"
        common = dict(BLOCK=block, BF16_BY_HAND=False, VEC=dtr.vec_elements(itemsize), ROW_ALIGNED=True,
                      FAST_EXP=True)
        base = dict(common, KL_TYPE=3, HAS_DUAL=True, NEED_ENTROPY=True, ENTROPY_IN_LOSS=True, WRITE_GRAD=False)
        out.append(("_forward_kernel", k._forward_kernel, fwd_types, base, warps, dtype, "entropy"))
        out.append(("_forward_kernel", k._forward_kernel, fwd_types,
                    dict(base, NEED_ENTROPY=False, ENTROPY_IN_LOSS=False), warps, dtype, "no entropy"))
        out.append(("_forward_kernel", k._forward_kernel, fwd_types, dict(base, WRITE_GRAD=True), warps, dtype,
                    "fused, entropy"))
        grad_types = dict(logits_ptr="*" + dt, stride_x="i32", out_ptr="*" + dt, stride_out="i32",
                          targets_ptr="*i64", lse_ptr="*fp32", entropy_ptr="*fp32", g_ptr="*fp32", h_ptr="*fp32",
                          N="i32", V="i32", inv_tau="fp32")
        out.append(("_grad_kernel", k._grad_kernel, grad_types, common, warps, dtype, "h = 0 and h != 0"))
    return out


def triton_reports(arch: str = "sm_90", V: int = REPORT_V) -> List[KernelReport]:
    env_interp = os.environ.get("TRITON_INTERPRET")
    if env_interp not in (None, "", "0"):
        raise ToolMissing("TRITON_INTERPRET is set: the Triton kernels are interpreted, not compiled "
                          "(run the report without it)")
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise ToolMissing(f"triton is not installed: {e}")
    arch_number = int(arch.replace("sm_", ""))
    reports = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn, types, cons, warps, dtype, variant in triton_variants(V):
            cc = _triton_compile(fn, types, cons, warps, arch_number)
            path = os.path.join(tmp, f"{name}.cubin")
            with open(path, "wb") as f:
                f.write(cc.asm["cubin"])
            sass = sass_of(path, arch)
            res = next(iter(resources_of(path, arch).values()), {})
            instrs = next(iter(split_functions(sass).values()), [])
            reports += report_function("triton", name, dtype, instrs, res, variant)
    return reports


# ------------------------------------------------------------------------------------ CLI

def all_reports(arch: str = "sm_90", cuda_from: str = "auto", backends=("cuda", "triton")):
    """(reports, {backend: reason it was skipped})"""
    reports, skipped = [], {}
    for backend in backends:
        try:
            reports += cuda_reports(arch, cuda_from) if backend == "cuda" else triton_reports(arch)
        except ToolMissing as e:
            skipped[backend] = str(e)
    return reports, skipped


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deltal_kernels.kernel_report", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--json", action="store_true", help="one JSON object a line")
    parser.add_argument("--cuda-from", choices=("auto", "source", "extension"), default="auto")
    parser.add_argument("--backend", choices=("cuda", "triton"), action="append")
    args = parser.parse_args(argv)
    reports, skipped = all_reports(args.arch, args.cuda_from, tuple(args.backend or ("cuda", "triton")))
    for r in reports:
        print(json.dumps(asdict(r)) if args.json else r.line())
    for backend, reason in skipped.items():
        print(json.dumps({"backend": backend, "skipped": reason}) if args.json else f"{backend}: skipped: {reason}")
    return 0 if reports and all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
