"""``deltal-bench``: every backend of this package and every baseline, side by side, in one run."""
from __future__ import annotations

import argparse
import gc
import os
import platform
import re
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import deltal_kernels as dk
from deltal_kernels.dispatch import BACKEND_MODULES, unavailable_reason

from . import baselines, measure, report
from .cases import DTYPES, GRIDS, Case, make_batch
from .targets import evaluate

WARMUP_GPU = 2
REPS = {"cpu": 3, "cuda": 10}
QUICK_REPS = {"cpu": 2, "cuda": 5}
MEMORY_METHOD = {
    "cpu": "torch.profiler CPU allocator events (profile_memory=True), replayed in order; peak minus the "
           "level before the call minus the gradient",
    "cuda": "torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated before "
            "the call minus the gradient",
}


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="deltal-bench",
        description="Time, effective bandwidth and peak memory of every deltal-kernels backend and of the "
                    "baselines (eager reference, torch.compile of it, TRL/Unsloth chunked log-softmax, Liger on "
                    "CUDA), side by side, on the device present. Writes <out>/<device>.{json,csv,png,md}.")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when present, else cpu")
    p.add_argument("--quick", action="store_true", help="the target shape(s) only, fewer repeats")
    p.add_argument("--N", type=int, nargs="+", help="rows (tokens); with --V and --dtype replaces the grid")
    p.add_argument("--V", type=int, nargs="+", help="vocabulary sizes")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), help="logits dtypes")
    p.add_argument("--reps", type=int, help=f"timed calls per implementation (default: {REPS}; --quick: {QUICK_REPS})")
    p.add_argument("--only", nargs="+", metavar="IMPL", help="run only these implementations (names as listed)")
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for the CSV, JSON and PNG")
    p.add_argument("--linear", action="store_true", help="the fused LM head instead (deltal_kernels/bench/linear.py): "
                   "dk.linear_policy_loss vs the materialised logits, the eager reference and Liger's chunked loss")
    p.add_argument("--H", type=int, nargs="+", help="hidden sizes (with --linear)")
    return p.parse_args(argv)


def select_cases(args, device_type: str):
    grid = GRIDS[f"{device_type}-quick" if args.quick else device_type]
    if not (args.N or args.V or args.dtype):
        return grid, False
    Ns = args.N or sorted({c.N for c in grid})
    Vs = args.V or sorted({c.V for c in grid})
    dtypes = args.dtype or sorted({c.dtype for c in grid})
    return [Case(N, V, d) for d in dtypes for V in Vs for N in Ns], True


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "deltal_kernels": dk.__version__}
    for dist in ("triton", "liger-kernel"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _error(e: Exception) -> str:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return "out of memory"
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first}"[:120]


def run_case(case, impls, logits, batch, *, reps, copy_bw, peak_bw, step):
    """Every implementation on one case: one results row each (``error`` set where one could not run).

    The timed calls are interleaved, one of each implementation per round, so a slow spell of a
    shared machine falls on all of them alike. ``step(text)`` reports progress.
    """
    N, V, R = case.N, case.V, batch.scored_rows
    rows, fns, samples = {}, {}, {}
    for impl in impls:
        step(f"{case.label}: {impl.name} (warm-up, memory)")
        rows[impl.name] = dict(case=case.label, N=N, V=V, dtype=case.dtype, S=batch.cu_seqlens.numel() - 1,
                               scored_rows=R, impl=impl.name, kind=impl.kind, inplace=impl.inplace,
                               schedule="fused" if impl.fused else "2-pass",
                               bytes=measure.bytes_moved(N, R, V, logits.element_size(), impl.fused), error=None)
        try:
            fn = impl.make()
            # GPU: Triton JIT and autotuning on the first calls; CPU: only torch.compile needs one,
            # the memory run warms the allocator for the timed calls
            for _ in range(WARMUP_GPU if logits.is_cuda else int(impl.compiles)):
                measure.fwd_bwd(fn, logits, batch, impl.inplace)
            extra, loss = measure.memory_run(fn, logits, batch, inplace=impl.inplace)
            rows[impl.name].update(extra_peak_MB=extra / 2**20, loss=loss)
            fns[impl.name], samples[impl.name] = fn, []
        except Exception as e:  # one implementation failing must not cost the others their run
            rows[impl.name]["error"] = _error(e)
            _free(logits.device)
    for rep in range(reps):
        for impl in impls:
            step(f"{case.label}: timing, round {rep + 1} of {reps}")
            if impl.name not in fns:
                continue
            try:
                samples[impl.name].append(measure.time_fwd_bwd(fns[impl.name], logits, batch, impl.inplace))
            except Exception as e:
                rows[impl.name]["error"] = _error(e)
                del fns[impl.name]
                _free(logits.device)
    floor_bw = peak_bw or copy_bw
    for name in fns:
        t = measure.Timing.median(samples[name])
        nbytes = rows[name]["bytes"]
        rows[name].update(
            fwd_ms=t.fwd_ms, bwd_ms=t.bwd_ms, fwdbwd_ms=t.fwdbwd_ms,
            tokens_per_s=N / (t.fwdbwd_ms / 1e3),
            fwd_GBps=nbytes["fwd"] / t.fwd_ms / 1e6,
            bwd_GBps=nbytes["bwd"] / t.bwd_ms / 1e6 if nbytes["bwd"] else None,  # fused: no [N, V] traffic
            fwdbwd_GBps=nbytes["fwdbwd"] / t.fwdbwd_ms / 1e6,
            fwdbwd_frac_copy=nbytes["fwdbwd"] / (t.fwdbwd_ms / 1e3) / copy_bw,
            fwdbwd_frac_peak=None if peak_bw is None else nbytes["fwdbwd"] / (t.fwdbwd_ms / 1e3) / peak_bw,
            fwdbwd_x_floor=t.fwdbwd_ms / (nbytes["floor"] / floor_bw * 1e3),
        )
    for name in fns:
        rows[name]["speedup_vs_eager"] = (rows["eager"]["fwdbwd_ms"] / rows[name]["fwdbwd_ms"]
                                          if "eager" in fns else None)
    return list(rows.values())


def _free(device):
    # after a failure and between cases only: between calls the CUDA caching allocator stays warm, as in training
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.linear:
        from .linear import main as linear_main

        return linear_main(args, Console(width=None if sys.stdout.isatty() else 160))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cases, custom = select_cases(args, device.type)
    impls, skipped = baselines.implementations(device)
    if args.only:
        unknown = set(args.only) - {i.name for i in impls}
        if unknown:
            raise SystemExit(f"--only: {sorted(unknown)} not available here; available: {[i.name for i in impls]}")
        impls = [i for i in impls if i.name in args.only]
    reps = args.reps or (QUICK_REPS if args.quick else REPS)[device.type]

    # a pipe or a file gets the width of a wide terminal rather than rich's 80 columns
    console = Console(width=None if sys.stdout.isatty() else 160)
    name = measure.device_name(device)
    available = dk.available_backends(device)
    unavailable = {b: unavailable_reason(b, device) for b in BACKEND_MODULES if b not in available}
    console.print(f"[bold]deltal-bench[/bold] on {name}; backends: {', '.join(available)}")
    for impl, why in {**unavailable, **skipped}.items():
        console.print(f"  not measured: {impl}: {why}")
    copy_bw, peak_bw = measure.copy_bandwidth(device), measure.peak_bandwidth(device)
    console.print(f"copy bandwidth measured now: {copy_bw / 1e9:.1f} GB/s"
                  + (f"; datasheet peak {peak_bw / 1e9:.0f} GB/s" if peak_bw else ""))
    console.print(f"times: medians of {reps} calls each, the implementations' calls interleaved; "
                  f"extra peak memory: {MEMORY_METHOD[device.type]}")
    meta = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), device=device.type,
                device_name=name, platform=platform.platform(), cpu_count=os.cpu_count(),
                torch_threads=torch.get_num_threads(), load_average=os.getloadavg(), **versions(),
                backends=available, backends_unavailable=unavailable, skipped=skipped, copy_GBps=copy_bw / 1e9,
                peak_GBps=None if peak_bw is None else peak_bw / 1e9, reps=reps,
                memory_method=MEMORY_METHOD[device.type], cases=[c.label for c in cases])

    results = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("", total=len(cases) * len(impls) * (reps + 1))

        def step(text):
            progress.update(task, description=text, advance=1)

        for case in cases:
            progress.update(task, description=f"{case.label}: drawing the batch")
            try:
                logits, batch = make_batch(case, device)
            except torch.cuda.OutOfMemoryError:
                console.print(f"[red]{case.label}: the logits do not fit on {name}, case skipped[/red]")
                progress.advance(task, len(impls) * (reps + 1))
                _free(device)
                continue
            rows = run_case(case, impls, logits, batch, reps=reps, copy_bw=copy_bw, peak_bw=peak_bw, step=step)
            results += rows
            console.print(report.case_table(case, rows, meta))
            del logits, batch
            _free(device)

    targets = evaluate(results, device.type, available, skipped)
    console.print(report.targets_table(targets))
    tag = device.type if device.type == "cpu" else "cuda-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    tag += "-quick" if args.quick else ""
    tag += "-custom" if custom else ""
    for path in report.write_files(args.out, tag, meta, results, targets):
        console.print(f"wrote {path}")
    return 0
