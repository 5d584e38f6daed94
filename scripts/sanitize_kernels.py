"""Every CUDA and Triton kernel variant once, on small shapes: the program that
scripts/gpu_check.sh runs under ``compute-sanitizer`` (memcheck, racecheck, synccheck).

Per backend (cuda: the compiled extension; triton), dtype (float32, bfloat16, float16) and V
(warp path V <= 4096 and block path above it, even and odd V so rows start off 16-byte
boundaries), it launches:

- forward: the forward kernel alone (no gradient wanted),
- fused: the forward kernel that writes the gradient in the same launch (logits require grad),
- fused in place: the same kernel writing the gradient over the logits (as dk.linear_policy_loss),
- inplace: the forward kernel, then the gradient kernel writing into the logits (inplace_backward),
- grad: the gradient kernel into a separate output (rows with g = h = 0 included: the zero path),
- unaligned: logits starting one element past a 16-byte boundary (a view into a larger buffer):
  the fused kernel, and the gradient kernel with the logits and the output at different alignments.

The CUDA kernels for V > 4096 run once per --clusters setting (DELTAL_KERNELS_CUDA_CLUSTER): 1, one
block per row, and 16, a cluster of 16 blocks per row (sm_90 and newer; elsewhere only 1).

Batches have unscored rows, an empty sequence, KL (k3), entropy, dual clip and a temperature, so
every branch of the row epilogue runs. Each result is checked to be finite; the sanitizer reports
the memory and synchronisation errors. Exit status: 0 when every variant ran, 1 otherwise.

``--device cpu`` runs the same variants through the CPU kernels (and Triton's interpreter with
``--backends triton``): the plumbing check of this script on a machine without a GPU.

    compute-sanitizer --tool memcheck python scripts/sanitize_kernels.py
    python scripts/sanitize_kernels.py --device cpu --backends cpu   # no GPU: the script itself
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--backends", nargs="+", help="default: cuda triton (device cuda), cpu (device cpu)")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"])
    p.add_argument("--V", type=int, nargs="+", default=[1001, 4096, 8193, 32000],
                   help="vocabulary sizes (<= 4096: a warp per row in the CUDA kernels, above: a block)")
    p.add_argument("--rows", type=int, default=40, help="rows per batch (default 40)")
    p.add_argument("--clusters", nargs="+", default=["1", "16"],
                   help="DELTAL_KERNELS_CUDA_CLUSTER settings for the CUDA kernels at V > 4096 (default: 1 16, "
                        "one block per row and the largest cluster; sizes above 1 need compute capability 9.0)")
    p.add_argument("--quick", action="store_true", help="one dtype (bfloat16) and two V (1001, 8193)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before deltal_kernels.triton is imported
    # no caching allocator: every tensor is its own cudaMalloc, so memcheck sees an access past the
    # end of one (with the cache, it usually lands in the same pool block and goes unnoticed)
    os.environ.setdefault("PYTORCH_NO_CUDA_MEMORY_CACHING", "1")
    import torch

    import deltal_kernels as dk
    from deltal_kernels import extension
    from deltal_kernels.dispatch import _load, unavailable_reason
    from deltal_kernels.validation import LossParams

    if args.quick:
        args.dtypes, args.V = ["bfloat16"], [1001, 8193]
    device = torch.device(args.device)
    backends = args.backends or (["cuda", "triton"] if device.type == "cuda" else ["cpu"])
    failures, ran = [], 0

    def batch(V, dtype, seed, offset=0):
        gen = torch.Generator().manual_seed(seed)
        lengths = torch.tensor([0, 7, args.rows - 7 - 11, 11])  # an empty sequence included
        N = int(lengths.sum())
        cu = dk.packing.cu_seqlens_from_lengths(lengths).to(torch.int32)
        base = torch.randn(N * V + offset, generator=gen) * 3
        # offset > 0: the logits start `offset` elements into their storage (off a 16-byte boundary)
        logits = base.to(dtype).to(device)[offset:].view(N, V)
        targets = torch.randint(0, V, (N,), generator=gen)
        logp = torch.log_softmax(logits.double().cpu(), -1).gather(1, targets[:, None]).squeeze(1)
        old = (logp + (torch.rand(N, generator=gen, dtype=torch.float64) - 0.5)).float()
        ref = (logp + torch.randn(N, generator=gen, dtype=torch.float64) * 0.5).float()
        adv = torch.randn(N, generator=gen)
        mask = torch.rand(N, generator=gen) >= 0.25
        rest = dict(targets=targets, old_logprobs=old, advantages=adv, cu_seqlens=cu, loss_mask=mask,
                    ref_logprobs=ref)
        return logits, {k: v.to(device) for k, v in rest.items()}

    options = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, kl_coef=0.01, kl_type="k3", entropy_coef=0.01,
                   temperature=0.7, with_entropy=True, max_len=64)

    def call(logits, rest, backend, **extra):
        return dk.policy_loss(logits, rest["targets"], rest["old_logprobs"], rest["advantages"], rest["cu_seqlens"],
                              loss_mask=rest["loss_mask"], ref_logprobs=rest["ref_logprobs"], backend=backend,
                              **options, **extra)

    def check(name, *tensors):
        for t in tensors:
            if not torch.isfinite(t.float()).all():
                raise AssertionError(f"{name}: non-finite values")

    def variants(backend, V, dtype):
        mod = _load(backend)

        def forward():
            logits, rest = batch(V, dtype, 1)
            with torch.no_grad():
                out = call(logits, rest, backend)
            check("loss", out.loss)

        def fused():
            logits, rest = batch(V, dtype, 2)
            logits.requires_grad_(True)
            out = call(logits, rest, backend)
            (grad,) = torch.autograd.grad(out.loss, logits)
            check("loss, gradient", out.loss, grad)

        def inplace():
            logits, rest = batch(V, dtype, 3)
            logits.requires_grad_(True)
            out = call(logits, rest, backend, inplace_backward=True)
            (grad,) = torch.autograd.grad(out.loss, logits)
            check("loss, gradient", out.loss, grad)

        def grad_direct(offset):
            logits, rest = batch(V, dtype, 4, offset)
            N = logits.shape[0]
            tau = options["temperature"]
            lse = torch.logsumexp(logits.float() / tau, -1)
            entropy = torch.rand(N, device=device)
            g = torch.randn(N, device=device)
            h = torch.randn(N, device=device) * 0.01
            g[::5] = 0.0  # rows with g = h = 0: exact zeros without reading the logits
            h[::5] = 0.0
            out = torch.empty(N, V, dtype=dtype, device=device)  # a fresh allocation: 16-byte aligned
            mod.grad_rows(logits, rest["targets"], lse, entropy, g, h, tau, out)
            check("gradient", out)

        def unaligned_fused():
            logits, rest = batch(V, dtype, 5, offset=1)
            leaf = logits.detach().requires_grad_(True)
            out = call(leaf, rest, backend)
            (grad,) = torch.autograd.grad(out.loss, leaf)
            check("loss, gradient", out.loss, grad)

        def fused_in_place():  # the fused kernel writing the gradient over the logits (dk.linear_policy_loss)
            if not hasattr(mod, "forward_grad_rows"):
                return
            logits, rest = batch(V, dtype, 6)
            scored = rest["loss_mask"].clone()
            zero = torch.zeros((), device=device)
            old = torch.where(scored, rest["old_logprobs"], zero)
            ref = torch.where(scored, rest["ref_logprobs"], zero)
            adv = torch.where(scored, rest["advantages"], zero)
            weights = torch.where(scored, torch.rand(logits.shape[0], device=device), zero)
            p = LossParams(clip_low=0.2, clip_high=0.28, dual_clip=3.0, kl_coef=0.01, kl_type=3, entropy_coef=0.01,
                           temperature=options["temperature"])
            outs = mod.forward_grad_rows(logits, rest["targets"], scored, old, ref, adv, p, True, weights, 0.5, logits)
            check("rows, gradient", outs[0], logits)

        return [("forward", forward), ("fused", fused), ("inplace", inplace), ("grad", lambda: grad_direct(0)),
                ("fused in place", fused_in_place), ("unaligned fused", unaligned_fused),
                ("unaligned grad", lambda: grad_direct(1))]

    def cluster_settings(backend, V):
        """The settings to run (None: leave the variable as it is: the path does not read it)."""
        if backend != "cuda" or V <= 4096:
            return [None]
        if extension.clusters_unavailable_reason(device) is not None:
            return [c for c in args.clusters if c == "1"]
        return args.clusters

    start = time.time()
    for backend in backends:
        reason = unavailable_reason(backend, device)
        if reason is not None:
            print(f"sanitize_kernels: backend {backend} on {device}: NOT AVAILABLE: {reason}", flush=True)
            failures.append(f"{backend}: not available")
            continue
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            for V, cluster in ((V, c) for V in args.V for c in cluster_settings(backend, V)):
                if cluster is not None:
                    os.environ[extension.CLUSTER_SETTING] = cluster
                path = "warp" if V <= 4096 else ("block" if cluster in (None, "1") else f"cluster of {cluster}")
                for name, fn in variants(backend, V, dtype):
                    label = f"{backend} {dtype_name} V={V} {path} {name}"
                    try:
                        fn()
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        ran += 1
                        print(f"ok    {label}", flush=True)
                    except Exception as e:  # report and go on: one failure must not hide the others
                        failures.append(label)
                        print(f"FAIL  {label}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                              flush=True)
    print(f"sanitize_kernels: {ran} variants ran, {len(failures)} failed, {time.time() - start:.1f} s "
          f"(backends {' '.join(backends)}, device {device})", flush=True)
    return 1 if failures or ran == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
