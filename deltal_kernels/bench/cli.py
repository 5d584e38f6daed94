"""``deltal-bench``: every backend of this package and every baseline, side by side, in one run."""
from __future__ import annotations

import argparse
import gc
import logging
import os
import platform
import re
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import deltal_kernels as dk
from deltal_kernels.dispatch import BACKEND_MODULES, unavailable_reason

from . import baselines, measure, report
from .runs import RUNS_ENV, run_folder
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


def _is_no_cuda_runtime(record: logging.LogRecord) -> bool:
    # torch.utils.cpp_extension, imported by torch.compile's CPU backend, logs this at WARNING on a
    # machine without the CUDA toolkit; it says only that no GPU toolkit is present
    return not record.getMessage().startswith("No CUDA runtime is found")


def quiet_no_cuda_warning() -> None:
    """Drop torch's "No CUDA runtime is found, using CUDA_HOME=..." log line (and only that one)."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    if _is_no_cuda_runtime not in logger.filters:
        logger.addFilter(_is_no_cuda_runtime)


def report_load(console, when: str) -> tuple:
    """Print the load average; warn when its 1-minute value is above 1 per core. Returns it."""
    load, cores = os.getloadavg(), os.cpu_count() or 1
    console.print(f"load average {when}: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1, 5, 15 min) on {cores} cores"
                  + (" (this run's own threads included)" if when == "at end" else ""), highlight=False)
    if load[0] > cores:
        console.print(f"[yellow]warning: load {load[0]:.2f} is above 1 per core ({cores} cores): other processes "
                      "compete for the cores, and times can swing 2x with the load. Compare implementations within "
                      "this run (their calls are interleaved), not times across runs.[/yellow]")
    return load


class Steps:
    """The run's progress: rich's bar on a terminal; elsewhere (a pipe, a file, CI), where rich shows
    nothing, one plain line per finished step: its count, the time since the start, what it was, its
    seconds. Consecutive steps with the same text (an interleaved timing round) make one line."""

    def __init__(self, console, total: int):
        self.console, self.total, self.done = console, total, 0
        self.plain = not console.is_terminal
        self.current = None
        self.t_start = self.t_step = time.perf_counter()
        self.progress = None

    def __enter__(self):
        if not self.plain:
            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
            self.progress = Progress(*columns, console=self.console, transient=True).__enter__()
            self.task = self.progress.add_task("", total=self.total)
        return self

    def __exit__(self, *exc):
        self.finish()
        if self.progress is not None:
            return self.progress.__exit__(*exc)
        return False

    def step(self, text: str, advance: int = 1) -> None:
        """Step ``text`` begins (``advance`` units of the total); the one before it has finished."""
        if self.progress is not None:
            self.progress.update(self.task, description=text, advance=advance)
            return
        if self.current is not None and self.current[0] != text:
            self.finish()
        if self.current is None:
            self.current, self.t_step = [text, 0], time.perf_counter()
        self.current[1] += advance

    def skip(self, units: int) -> None:
        if self.progress is not None:
            self.progress.advance(self.task, units)
        else:
            self.finish()
            self.done += units

    def finish(self) -> None:
        """The current step has finished (plain output: its line)."""
        if self.current is None:
            return
        text, units = self.current
        self.done += units
        now = time.perf_counter()
        elapsed = int(now - self.t_start)
        self.console.print(f"  [{self.done}/{self.total} {elapsed // 60}:{elapsed % 60:02d}] {text}: "
                           f"{now - self.t_step:.1f} s", highlight=False, markup=False)
        self.current = None


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
    p.add_argument("--out", type=Path, help="folder for the JSON, CSV, PNG and markdown (default: a new run folder "
                   f"<runs>/<UTC time>-<tag>/, <runs> = ${RUNS_ENV} or, in a source tree (a clone or a copy), "
                   "bench/runs/ (git-ignored), else ./deltal-bench-runs/); --out bench/results to update the "
                   "committed results")
    p.add_argument("--linear", action="store_true", help="the fused LM head instead (deltal_kernels/bench/linear.py): "
                   "dk.linear_policy_loss vs the materialised logits, the eager reference and Liger's chunked loss")
    p.add_argument("--H", type=int, nargs="+", help="hidden sizes (with --linear; --parallel: one)")
    p.add_argument("--parallel", action="store_true", help="tensor parallelism instead "
                   "(deltal_kernels/bench/parallel.py): per-rank peak memory and bytes communicated of the sharded "
                   "LM head, the loss on a logits shard and the all-gathered logits, TP gloo ranks on the CPU")
    p.add_argument("--tp", type=int, nargs="+", help="tensor-parallel sizes (with --parallel; default 1 2 4)")
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
    quiet_no_cuda_warning()
    # a pipe or a file gets the width of a wide terminal rather than rich's 80 columns
    console = Console(width=None if sys.stdout.isatty() else 160)
    if args.linear:
        from .linear import main as linear_main

        if args.out is None:
            device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
            args.out = run_folder(f"linear-{device_type}" + ("-quick" if args.quick else "")
                                  + ("-custom" if args.N or args.V or args.H else ""))
        report_load(console, "at start")
        rc = linear_main(args, console)
        report_load(console, "at end")
        return rc
    if args.parallel:
        from .parallel import main as parallel_main, run_tag

        if args.out is None:
            args.out = run_folder(run_tag(args))
        return parallel_main(args, console)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cases, custom = select_cases(args, device.type)
    impls, skipped = baselines.implementations(device)
    if args.only:
        unknown = set(args.only) - {i.name for i in impls}
        if unknown:
            raise SystemExit(f"--only: {sorted(unknown)} not available here; available: {[i.name for i in impls]}")
        impls = [i for i in impls if i.name in args.only]
    reps = args.reps or (QUICK_REPS if args.quick else REPS)[device.type]
    name = measure.device_name(device)
    tag = device.type if device.type == "cpu" else "cuda-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    tag += "-quick" if args.quick else ""
    tag += "-custom" if custom else ""
    out = args.out if args.out is not None else run_folder(tag)

    available = dk.available_backends(device)
    unavailable = {b: unavailable_reason(b, device) for b in BACKEND_MODULES if b not in available}
    console.print(f"[bold]deltal-bench[/bold] on {name}; backends: {', '.join(available)}")
    for impl, why in {**unavailable, **skipped}.items():
        console.print(f"  not measured: {impl}: {why}")
    load_start = report_load(console, "at start")
    copy_bw, peak_bw = measure.copy_bandwidth(device), measure.peak_bandwidth(device)
    console.print(f"copy bandwidth measured now: {copy_bw / 1e9:.1f} GB/s"
                  + (f"; datasheet peak {peak_bw / 1e9:.0f} GB/s" if peak_bw else ""))
    console.print(f"times: medians of {reps} calls each, the implementations' calls interleaved; "
                  f"extra peak memory: {MEMORY_METHOD[device.type]}")
    console.print(f"results will go to {out}/", highlight=False)
    meta = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), device=device.type,
                device_name=name, platform=platform.platform(), cpu_count=os.cpu_count(),
                torch_threads=torch.get_num_threads(), load_average=load_start, **versions(),
                backends=available, backends_unavailable=unavailable, skipped=skipped, copy_GBps=copy_bw / 1e9,
                peak_GBps=None if peak_bw is None else peak_bw / 1e9, reps=reps,
                memory_method=MEMORY_METHOD[device.type], cases=[c.label for c in cases])

    results = []
    width = console.width
    with Steps(console, len(cases) * len(impls) * (reps + 1)) as steps:
        for case in cases:
            steps.step(f"{case.label}: drawing the batch", advance=0)
            try:
                logits, batch = make_batch(case, device)
            except torch.cuda.OutOfMemoryError:
                console.print(f"[red]{case.label}: the logits do not fit on {name}, case skipped[/red]")
                steps.skip(len(impls) * (reps + 1))
                _free(device)
                continue
            rows = run_case(case, impls, logits, batch, reps=reps, copy_bw=copy_bw, peak_bw=peak_bw,
                            step=steps.step)
            steps.finish()  # the last timing round's line before the case's tables
            results += rows
            for table in report.case_tables(case, rows, meta, width=width):
                console.print(table)
            del logits, batch
            _free(device)
            if case is not cases[-1]:  # the results so far, in case the run is cut short (a time cap)
                report.write_files(out, tag, meta, results, evaluate(results, device.type, available, skipped))

    targets = evaluate(results, device.type, available, skipped)
    console.print(report.targets_table(targets))
    meta["load_average_end"] = report_load(console, "at end")
    paths = report.write_files(out, tag, meta, results, targets)
    console.print(f"wrote {', '.join(p.name for p in paths)} in {out}/", highlight=False)
    if args.out is None:
        console.print("(a run folder, not tracked by git; to update the committed results: --out bench/results)",
                      highlight=False)
    return 0
