"""One forward launch, one fused forward+gradient launch and one gradient launch per backend at
SPEC section 4's shape (N=16384, V=151936, bfloat16), for Nsight Compute (scripts/gpu_check.sh):

    ncu --profile-from-start off --clock-control none --metrics ... python scripts/ncu_kernels.py

Everything before the profiled launches (allocation, Triton's compilation, a warm-up call of each)
runs outside the profiler's range (torch.cuda.profiler.start/stop = cudaProfilerStart/Stop), so
only the launches named here are measured. ``--dry-run`` builds the batch on the CPU at a small
shape and runs nothing on a GPU (the plumbing check).

On sm_90 and newer the cuda launches run twice: with DELTAL_KERNELS_CUDA_CLUSTER=auto (at this V a
cluster of blocks per row: cluster_forward_kernel, cluster_forward_grad_kernel) and =1 (one block per
row: forward_kernel, forward_grad_kernel), so the report has both schedules side by side; only with
=1 when the caller has set it (gpu_check.sh does after a failed cluster smoke test).
"""
from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--N", type=int, default=16384)
    p.add_argument("--V", type=int, default=151936)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--backends", nargs="+", default=["cuda", "triton"])
    p.add_argument("--dry-run", action="store_true", help="CPU, small shape, no profiler range")
    args = p.parse_args(argv)

    import torch

    import deltal_kernels as dk
    from deltal_kernels import extension
    from deltal_kernels.dispatch import unavailable_reason

    device = torch.device("cpu" if args.dry_run else "cuda")
    N, V = (64, 1000) if args.dry_run else (args.N, args.V)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(N, V, generator=gen, device=device, dtype=torch.float32).mul_(3).to(dtype)
    targets = torch.randint(0, V, (N,), generator=gen, device=device)
    old = torch.randn(N, generator=gen, device=device) - 10
    adv = torch.randn(N, generator=gen, device=device)
    cu = torch.tensor([0, N // 4, N // 2, N], dtype=torch.int32, device=device)
    mask = torch.rand(N, generator=gen, device=device) >= 0.2

    def loss_call(x, backend, inplace=False):
        return dk.policy_loss(x, targets, old, adv, cu, loss_mask=mask, clip_low=0.2, clip_high=0.28,
                              backend=backend, max_len=N, inplace_backward=inplace).loss

    scratch = torch.empty_like(logits)  # the in-place call's logits (overwritten by their gradient)

    def launches(backend):
        with torch.no_grad():  # the forward kernel alone
            loss_call(logits, backend)
        x = logits.detach().requires_grad_(True)  # the fused forward + gradient kernel
        torch.autograd.grad(loss_call(x, backend), x)
        x = scratch.detach().requires_grad_(True)  # forward, then the gradient kernel in place
        torch.autograd.grad(loss_call(x, backend, inplace=True), x)

    backends = []
    for backend in (["cpu"] if args.dry_run else args.backends):
        reason = unavailable_reason(backend, device)
        if reason is None:
            backends.append(backend)
        else:
            print(f"ncu_kernels: backend {backend} skipped: {reason}", flush=True)
    if not backends:
        print("ncu_kernels: no backend to profile", flush=True)
        return 1
    inherited = os.environ.get(extension.CLUSTER_SETTING, "auto")
    both = device.type == "cuda" and extension.clusters_unavailable_reason(device) is None and inherited != "1"
    runs = [(b, s) for b in backends for s in (("auto", "1") if b == "cuda" and both else (inherited,))]
    for backend, setting in runs:  # warm-up: compilation, autotuning, occupancy queries
        os.environ[extension.CLUSTER_SETTING] = setting
        scratch.copy_(logits)
        launches(backend)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
    for backend, setting in runs:
        os.environ[extension.CLUSTER_SETTING] = setting
        print(f"ncu_kernels: profiled launches of {backend} (DELTAL_KERNELS_CUDA_CLUSTER={setting}): forward, "
              f"fused forward+gradient, forward + gradient in place (N={N}, V={V}, {args.dtype})", flush=True)
        scratch.copy_(logits)  # a copy kernel: not matched by the kernel-name filter of gpu_check.sh
        launches(backend)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
