"""Timing, peak memory, the device's bandwidth and the bytes each schedule must move.

Timing: forward, backward and forward+backward come from the same calls (three time stamps per
call); the caller takes medians over repeats. On a GPU the stamps are CUDA events, read after a
synchronize; on the CPU they are ``time.perf_counter``. The backward is
``torch.autograd.grad(loss, logits)``: the gradient is handed on as it would be to the lm_head's
backward, never accumulated into a ``.grad`` (which would copy a gradient that aliases the
logits, as ``inplace_backward``'s does).

Peak memory beyond inputs and gradient: how far the peak of one forward+backward rises above the
memory it cannot avoid, the inputs (allocated before the call) plus the gradient (N*V elements of
the logits' dtype; none with ``inplace_backward``). On a GPU the peak is
``torch.cuda.max_memory_allocated`` over the call, minus what was allocated before it. On the CPU
there is no such counter, so every allocation and free of PyTorch's CPU allocator during one
forward+backward is recorded with ``torch.profiler`` (``profile_memory=True``) and replayed in
order; its running maximum is the peak. Memory that code allocates behind PyTorch's allocator (a
compiled kernel's own malloc) is not seen by that count.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

# known peak memory bandwidth (bytes/s) by device name; the first matching substring wins
PEAK_BANDWIDTH = (
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),  # SXM, "NVIDIA H100 80GB HBM3"
    ("GH200 144G", 4.9e12),  # before "H200", which both GH200 names contain
    ("GH200", 4.0e12),
    ("H200", 4.8e12),
    ("B200", 8.0e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),  # 40 GB, SXM4 and PCIe
    ("L40S", 0.864e12),
)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "CPU")
    # the vector ISA PyTorch's CPU kernels run (and the cpu backend's, which follows it;
    # ATEN_CPU_CAPABILITY=default|avx2|avx512 picks one): the baselines' speed depends on it too
    return f"{model} ({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()})"


def peak_bandwidth(device: torch.device) -> Optional[float]:
    """The datasheet memory bandwidth of a known GPU (bytes/s); None on the CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in PEAK_BANDWIDTH if key in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, reps: int = 5) -> float:
    """Bytes/s of a large device-to-device copy (read + write), measured now, median of ``reps``."""
    nbytes = 2 << 30 if device.type == "cuda" else 256 << 20
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch of the pages
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times)


# ---- bytes each schedule must move (R scored rows read, all N gradient rows written) ----

def bytes_moved(N: int, R: int, V: int, elem: int, fused: bool) -> dict:
    """The logits traffic of a schedule; the [N]-sized row inputs (about 30 bytes a row) are left out.

    Two passes (autograd's schedule): the forward reads the scored rows, R*V*e; the backward reads
    them again and writes the whole gradient, R*V*e + N*V*e; together 2*R*V*e + N*V*e. Fused (the
    gradient written by the forward launch): the forward moves R*V*e + N*V*e, the backward nothing
    [N, V]-sized. The floor of any schedule is that one read and one write, R*V*e + N*V*e.
    """
    read, write = R * V * elem, N * V * elem
    if fused:
        return {"fwd": read + write, "bwd": 0, "fwdbwd": read + write, "floor": read + write}
    return {"fwd": read, "bwd": read + write, "fwdbwd": 2 * read + write, "floor": read + write}


# ---- timing and memory of one implementation on one case ----

@dataclass
class Timing:
    fwd_ms: float
    bwd_ms: float
    fwdbwd_ms: float

    @staticmethod
    def median(samples: List["Timing"]) -> "Timing":
        return Timing(*(statistics.median(getattr(t, f) for t in samples) for f in ("fwd_ms", "bwd_ms", "fwdbwd_ms")))


def leaf(logits: torch.Tensor, inplace: bool) -> torch.Tensor:
    # inplace_backward overwrites the logits, so each call gets its own copy (made before timing)
    return (logits.clone() if inplace else logits.detach()).requires_grad_(True)


def _stamp(device: torch.device):
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def _ms(device: torch.device, a, b) -> float:
    return a.elapsed_time(b) if device.type == "cuda" else (b - a) * 1e3


def fwd_bwd(fn, logits, batch, inplace: bool) -> None:
    """One untimed forward+backward (a warm-up)."""
    x = leaf(logits, inplace)
    torch.autograd.grad(fn(x, batch), x)


def time_fwd_bwd(fn, logits, batch, inplace: bool) -> Timing:
    """Forward, backward and forward+backward milliseconds of one call of ``fn`` and its gradient."""
    device = logits.device
    x = leaf(logits, inplace)
    sync(device)
    t0 = _stamp(device)
    loss = fn(x, batch)
    t1 = _stamp(device)
    torch.autograd.grad(loss, x)
    t2 = _stamp(device)
    sync(device)
    return Timing(_ms(device, t0, t1), _ms(device, t1, t2), _ms(device, t0, t2))


def _cpu_peak_bytes(run) -> int:
    """Peak of live bytes of PyTorch's CPU allocator during ``run()``, above the level at its start."""
    # before the profiler's first use: its start/stop chatter on stderr would break the progress display
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def memory_run(fn, logits, batch, *, inplace: bool) -> Tuple[int, float]:
    """One forward+backward: (its peak memory beyond the inputs and the gradient in bytes, the loss)."""
    device = logits.device
    x = leaf(logits, inplace)
    grad_bytes = 0 if inplace else x.numel() * x.element_size()
    losses = []

    def run():
        loss = fn(x, batch)
        torch.autograd.grad(loss, x)
        losses.append(loss.detach())

    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = _cpu_peak_bytes(run)
    return peak - grad_bytes, float(losses[0])
