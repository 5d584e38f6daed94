"""The CUDA cluster schedule once, before the rest of scripts/gpu_check.sh relies on it.

On sm_90 and newer the CUDA backend reduces rows of large V with a thread-block cluster per row
(README, "Performance model"). This runs its two kernels at V = 151936 bf16 for each cluster size
(DELTAL_KERNELS_CUDA_CLUSTER = 2, 4, 8, 16, then auto), and checks per size that:

- the forward's logprobs are within float32 rounding of torch's log_softmax (float64), and finite;
- the fused kernel's gradient equals the forward kernel followed by the gradient kernel, bit for bit.

gpu_check.sh runs it under a short time cap: a hang or a failure here turns the cluster schedule off
(DELTAL_KERNELS_CUDA_CLUSTER=1) for the later steps, so that one bad kernel does not take the whole
check with it. Exit status: 0 all sizes passed, 1 a check failed, 3 not applicable (no sm_90 GPU or
no CUDA extension). ``--dry-run``: the same on the CPU backend at a small V (the plumbing check).
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--N", type=int, default=48)
    p.add_argument("--V", type=int, default=151936)
    p.add_argument("--dry-run", action="store_true", help="CPU backend, small V")
    args = p.parse_args(argv)

    import torch

    import deltal_kernels as dk
    from deltal_kernels import extension
    from deltal_kernels.dispatch import unavailable_reason

    backend, device = ("cpu", "cpu") if args.dry_run else ("cuda", "cuda")
    V = 5000 if args.dry_run else args.V
    reason = unavailable_reason(backend, device) if args.dry_run else extension.clusters_unavailable_reason()
    if reason is not None:
        print(f"cluster_smoke: not applicable: {reason}", flush=True)
        return 3

    N = args.N
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(N, V, generator=gen) * 3).to(torch.bfloat16)
    targets = torch.randint(0, V, (N,), generator=gen)
    want = torch.log_softmax(logits.double(), -1).gather(1, targets[:, None]).squeeze(1)
    old = (want + torch.rand(N, generator=gen, dtype=torch.float64) - 0.5).float()
    adv = torch.randn(N, generator=gen)
    cu = torch.tensor([0, N // 3, N], dtype=torch.int32)
    mask = torch.rand(N, generator=gen) >= 0.2
    logits, targets, old, adv, cu, mask = (t.to(device) for t in (logits, targets, old, adv, cu, mask))

    def loss(x, inplace):
        return dk.policy_loss(x, targets, old, adv, cu, loss_mask=mask, max_len=N, entropy_coef=0.01,
                              backend=backend, inplace_backward=inplace)

    failures = []
    settings = ("2", "4", "8", "16", "auto")
    for setting in settings:
        os.environ[extension.CLUSTER_SETTING] = setting
        t0 = time.time()
        try:
            x = logits.clone().requires_grad_(True)
            out = loss(x, inplace=False)  # the fused kernel
            (fused,) = torch.autograd.grad(out.loss, x)
            y = logits.clone().requires_grad_(True)
            out2 = loss(y, inplace=True)  # the forward kernel, then the gradient kernel in place
            (separate,) = torch.autograd.grad(out2.loss, y)
            if device == "cuda":
                torch.cuda.synchronize()
            got = out.logprobs.double().cpu()
            scored = mask.cpu()
            err = float((got - want)[scored].abs().max())
            bound = 1e-5 * (1 + float(want.abs().max()))
            problems = []
            if not torch.isfinite(out.loss) or not torch.isfinite(fused).all():
                problems.append("non-finite loss or gradient")
            if err > bound:
                problems.append(f"logprobs off by {err:.3g} (bound {bound:.3g})")
            if not torch.equal(fused, separate) or not torch.equal(out.logprobs, out2.logprobs):
                problems.append("fused and separate results differ")
            status = "FAIL" if problems else "ok"
            print(f"{status:5} DELTAL_KERNELS_CUDA_CLUSTER={setting}: N={N} V={V} bf16, logprobs max error {err:.2e}, "
                  f"{time.time() - t0:.2f} s{': ' + '; '.join(problems) if problems else ''}", flush=True)
            if problems:
                failures.append(setting)
        except Exception as e:  # report and go on with the other sizes
            failures.append(setting)
            print(f"FAIL  DELTAL_KERNELS_CUDA_CLUSTER={setting}: {type(e).__name__}: {e}", flush=True)
    print(f"cluster_smoke: {len(settings) - len(failures)} of {len(settings)} settings passed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
