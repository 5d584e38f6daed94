"""``deltal-bench --linear``: the fused LM head against the materialised path and the baselines.

Every implementation computes, from hidden [N, H] and the LM-head weight [V, H] of one rollout
batch, the policy loss and its gradients w.r.t. hidden and weight, side by side in one run:

- ``linear``: ``dk.linear_policy_loss`` (chunks of scored rows, no [N, V] logits), backend "auto";
- ``linear accumulate``: the same, the weight's gradient added straight into ``weight.grad``
  (no float32 [V, H] accumulator held by the op);
- ``materialised``: ``logits = hidden @ weight.T`` then ``dk.policy_loss`` (backend "auto"),
  autograd through the matmul;
- ``eager``: ``hidden @ weight.T`` then ``dk.reference.policy_loss`` (float32 log-softmax);
- ``liger``: Liger-Kernel's chunked fused-linear GRPO loss (``LigerFusedLinearGRPOLoss``,
  torch.compile'd loss math, as Liger ships it; it runs on CPU too), on the packed batch seen as one
  sequence with the batch's mean advantage and DAPO's token-mean (the work is the same; its loss
  value differs by the aggregation);
- ``matmuls``: the three matmuls alone on the scored rows (logits, grad hidden, grad weight), the
  floor the GPU target compares against.

Measured: medians of forward, backward and forward+backward time (the implementations' calls
interleaved), and the peak memory beyond the inputs and the gradients of hidden and weight
(N*H + V*H elements of their dtype), as ``measure.memory_run`` does for the logits path (the
CPU allocator's events replayed; ``max_memory_allocated`` on CUDA). FLOPs: a matmul of [R, H] by
[H, V] is 2 R H V; the materialised paths run three over all N rows, the fused op over the R scored
rows only, and the table shows what that saves.
"""
from __future__ import annotations

import gc
import json
import os
import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Dict, List, Optional, Tuple

import torch

import deltal_kernels as dk

from . import measure
from .cases import LOSS_OPTIONS, Batch, Case, rollout_lengths


@dataclass(frozen=True)
class LinearCase(Case):
    H: int  # hidden size: the logits are hidden [N, H] @ weight [V, H].T

    @property
    def label(self) -> str:
        return f"N={self.N} H={self.H} V={self.V} {self.dtype}"


TARGET_CPU = LinearCase(N=4096, H=512, V=32000, dtype="fp32")
TARGET_GPU = LinearCase(N=16384, H=4096, V=151936, dtype="bf16")
GRIDS = {"cpu": [TARGET_CPU], "cpu-quick": [LinearCase(N=1024, H=256, V=32000, dtype="fp32")],
         "cuda": [TARGET_GPU, LinearCase(N=16384, H=4096, V=151936, dtype="fp32")], "cuda-quick": [TARGET_GPU]}


@dataclass
class LinearBatch:
    hidden: torch.Tensor  # [N, H]
    weight: torch.Tensor  # [V, H]
    batch: Batch  # the rows' other inputs (bench.cases.Batch)


def make_linear_batch(case: LinearCase, device, seed: int = 0) -> LinearBatch:
    """A rollout-shaped batch (bench.cases' lengths and mask) with hidden states and an LM head."""
    gen = torch.Generator().manual_seed(seed)
    prompts, responses = rollout_lengths(case.N, case.max_len, gen)
    lengths = torch.tensor([p + r for p, r in zip(prompts, responses)])
    mask = torch.cat([torch.cat([torch.zeros(p, dtype=torch.bool), torch.ones(r, dtype=torch.bool)])
                      for p, r in zip(prompts, responses)])
    cu_seqlens = dk.packing.cu_seqlens_from_lengths(lengths).to(torch.int32)
    dtype = case.torch_dtype
    hidden = torch.randn(case.N, case.H, generator=gen).to(device=device, dtype=dtype)
    weight = (torch.randn(case.V, case.H, generator=gen) * (2.0 / case.H**0.5)).to(device=device, dtype=dtype)
    targets = torch.randint(0, case.V, (case.N,), generator=gen).to(device)
    true_logp, _ = dk.linear_token_logprobs(hidden, weight, targets)
    noise = lambda scale: (torch.randn(case.N, generator=gen) * scale).to(device)  # noqa: E731
    batch = Batch(targets=targets, old_logprobs=true_logp + noise(0.1), ref_logprobs=true_logp + noise(0.1),
                  advantages=torch.randn(lengths.numel(), generator=gen).to(device),
                  cu_seqlens=cu_seqlens.to(device), loss_mask=mask.to(device), max_len=case.max_len)
    return LinearBatch(hidden, weight, batch)


# an implementation: (hidden, weight, batch) -> scalar loss, differentiable w.r.t. hidden and weight
LinearFn = Callable[[torch.Tensor, torch.Tensor, Batch], torch.Tensor]


def linear_loss(hidden, weight, batch, **options):
    return dk.linear_policy_loss(hidden, weight, **batch.kwargs(), **options).loss


def materialised_loss(hidden, weight, batch):
    return dk.policy_loss(hidden @ weight.T, **batch.kwargs()).loss


def eager_loss(hidden, weight, batch):
    return dk.reference.policy_loss(hidden @ weight.T, **batch.kwargs()).loss


def liger_unavailable_reason() -> Optional[str]:
    try:
        import liger_kernel.chunked_loss  # noqa: F401
    except ImportError as e:
        return f"liger-kernel is not installed ({e}); pip install liger-kernel --no-deps"
    return None


def make_liger() -> LinearFn:
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    torch._dynamo.reset()
    opts = LOSS_OPTIONS
    module = LigerFusedLinearGRPOLoss(beta=opts["kl_coef"], compiled=True, use_ref_model=True, chunk_size=1,
                                      epsilon_low=opts["clip_low"], epsilon_high=opts["clip_high"], loss_type="dapo",
                                      temperature=opts["temperature"])

    def loss(hidden, weight, batch):
        out = module(hidden[None], weight, batch.targets[None], batch.loss_mask[None].to(torch.int64),
                     batch.advantages.float().mean()[None], ref_per_token_logps=batch.ref_logprobs[None],
                     old_per_token_logps=batch.old_logprobs[None])
        return out[0] if isinstance(out, tuple) else out

    return loss


def matmuls(hidden, weight, batch):
    """The three matmuls of the fused op on the scored rows, with no loss in between (a timing floor).

    Autograd of a scalar of hidden_R @ weight.T: the forward is the logits matmul, the backward the
    two gradient matmuls (its incoming gradient is a broadcast, costing no [R, V] pass of its own)."""
    h = hidden[batch.loss_mask]
    return (h @ weight.T).sum()


@dataclass(frozen=True)
class LinearImpl:
    name: str
    make: Callable[[], LinearFn]
    compiles: bool = False
    rows: str = "scored"  # which rows its matmuls cover: "scored" (R) or "all" (N)


def implementations() -> Tuple[List[LinearImpl], Dict[str, str]]:
    impls = [LinearImpl("linear", lambda: linear_loss),
             LinearImpl("linear accumulate", lambda: _accumulating),
             LinearImpl("materialised", lambda: materialised_loss, rows="all"),
             LinearImpl("eager", lambda: eager_loss, rows="all")]
    skipped = {}
    reason = liger_unavailable_reason()
    if reason is None:
        impls.append(LinearImpl("liger", make_liger, compiles=True, rows="all"))
    else:
        skipped["liger"] = reason
    impls.append(LinearImpl("matmuls", lambda: matmuls))
    return impls, skipped


def _accumulating(hidden, weight, batch):
    return linear_loss(hidden, weight, batch, accumulate_weight_grad=True)


# ---- one forward+backward: time and memory ----

def _leaves(lb: LinearBatch):
    return lb.hidden.detach().requires_grad_(True), lb.weight.detach().requires_grad_(True)


def _grads(loss, hidden, weight):
    """The gradients as a trainer gets them: hidden's handed on, weight's in .grad (then dropped)."""
    weight.grad = None
    loss.backward()
    weight.grad = None


def time_call(fn, lb: LinearBatch) -> measure.Timing:
    device = lb.hidden.device
    hidden, weight = _leaves(lb)
    measure.sync(device)
    t0 = measure._stamp(device)
    loss = fn(hidden, weight, lb.batch)
    t1 = measure._stamp(device)
    _grads(loss, hidden, weight)
    t2 = measure._stamp(device)
    measure.sync(device)
    return measure.Timing(measure._ms(device, t0, t1), measure._ms(device, t1, t2), measure._ms(device, t0, t2))


def memory_call(fn, lb: LinearBatch) -> Tuple[float, float]:
    """(peak bytes beyond the inputs and the gradients of hidden and weight, the loss)."""
    device = lb.hidden.device
    hidden, weight = _leaves(lb)
    grad_bytes = (hidden.numel() + weight.numel()) * hidden.element_size()
    losses = []

    def run():
        loss = fn(hidden, weight, lb.batch)
        losses.append(float(loss.detach()))
        weight.grad = None
        loss.backward()
        # the gradients stay alive until the end of the run: they are what is subtracted
        run.keep = (hidden.grad, weight.grad)

    if device.type == "cuda":
        measure.sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        measure.sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = measure._cpu_peak_bytes(run)
    run.keep = None
    weight.grad = None
    return peak - grad_bytes, losses[0]


def run_case(case: LinearCase, impls: List[LinearImpl], reps: int, device, step=lambda text: None) -> List[dict]:
    """Every implementation on one case, calls interleaved: one results row each (``error`` where one failed)."""
    device = torch.device(device)
    lb = make_linear_batch(case, device)
    N, H, V, R = case.N, case.H, case.V, lb.batch.scored_rows
    e = lb.hidden.element_size()
    rows, fns, samples = {}, {}, {}
    for impl in impls:
        step(f"{case.label}: {impl.name} (warm-up, memory)")
        M = R if impl.rows == "scored" else N
        rows[impl.name] = dict(case=case.label, N=N, H=H, V=V, dtype=case.dtype, scored_rows=R, impl=impl.name,
                               matmul_rows=M, matmul_GFLOP=3 * 2 * M * H * V / 1e9,
                               logits_and_grad_MB=2 * N * V * e / 2**20, error=None)
        try:
            fn = impl.make()
            for _ in range(1 + int(impl.compiles)):
                time_call(fn, lb)
            extra, loss = memory_call(fn, lb)
            rows[impl.name].update(extra_peak_MB=extra / 2**20, loss=loss)
            fns[impl.name], samples[impl.name] = fn, []
        except Exception as ex:  # one failing must not cost the others their run
            rows[impl.name]["error"] = f"{type(ex).__name__}: {str(ex).splitlines()[0] if str(ex) else ''}"[:160]
            gc.collect()
    for rep in range(reps):
        for impl in impls:
            if impl.name in fns:
                step(f"{case.label}: timing round {rep + 1} of {reps}: {impl.name}")
                samples[impl.name].append(time_call(fns[impl.name], lb))
    for name in fns:
        t = measure.Timing.median(samples[name])
        rows[name].update(fwd_ms=t.fwd_ms, bwd_ms=t.bwd_ms, fwdbwd_ms=t.fwdbwd_ms)
    base = rows.get("materialised", {})
    mm = rows.get("matmuls", {})
    for r in rows.values():
        if r["error"] or "fwdbwd_ms" not in r:
            continue
        r["vs_materialised_time"] = r["fwdbwd_ms"] / base["fwdbwd_ms"] if "fwdbwd_ms" in base else None
        r["vs_matmuls_time"] = r["fwdbwd_ms"] / mm["fwdbwd_ms"] if "fwdbwd_ms" in mm else None
        r["extra_peak_over_logits_and_grad"] = r["extra_peak_MB"] / r["logits_and_grad_MB"]
    return list(rows.values())


def evaluate(results: List[dict], device_type: str) -> List[dict]:
    """The issue's targets for the fused LM head, each met, MISSED by <factor>, or not measured."""
    target = TARGET_CPU if device_type == "cpu" else TARGET_GPU
    by = {r["impl"]: r for r in results if r["case"] == target.label and not r["error"] and "fwdbwd_ms" in r}
    out = []

    def add(what, need, got, lower_is_better=True):
        if got is None:
            status = f"not measured at {target.label}"
        elif (got <= need) if lower_is_better else (got >= need):
            status = "met"
        else:
            status = f"MISSED by {got / need if lower_is_better else need / got:.2f}x"
        out.append(dict(case=target.label, target=what, need=need, got=got, status=status))

    lin = by.get("linear")
    if device_type == "cpu":
        add("extra peak / (logits + their gradient)", 1 / 8, lin and lin["extra_peak_over_logits_and_grad"])
        add("fwd+bwd time / materialised", 1.2, lin and lin.get("vs_materialised_time"))
        liger = by.get("liger")
        add("fwd+bwd time / liger", 1.0, lin and liger and lin["fwdbwd_ms"] / liger["fwdbwd_ms"])
    else:
        add("fwd+bwd time / the three matmuls", 1.1, lin and lin.get("vs_matmuls_time"))
        add("extra peak / (logits + their gradient)", 1 / 8, lin and lin["extra_peak_over_logits_and_grad"])
    return out


def markdown(meta, results, targets) -> str:
    lines = [f"# deltal-bench --linear on {meta['device_name']}", "",
             f"{meta['date']}, torch {meta['torch']}, liger-kernel {meta['liger-kernel']}, load average at start "
             f"{meta['load_average'][0]:.2f}; medians of {meta['reps']} calls; extra peak = peak beyond the inputs "
             "and the gradients of hidden and weight.", ""]
    for case in dict.fromkeys(r["case"] for r in results):
        rows = [r for r in results if r["case"] == case]
        r0 = rows[0]
        lines += [f"**{case}** ({r0['scored_rows']} of {r0['N']} rows scored; logits + their gradient would be "
                  f"{r0['logits_and_grad_MB']:.0f} MB)", "",
                  "| impl | matmul rows | matmul GFLOP | fwd ms | bwd ms | fwd+bwd ms | vs materialised | "
                  "extra peak MB | / (logits + grad) | loss |",
                  "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for r in rows:
            if r["error"] or "fwdbwd_ms" not in r:
                lines.append(f"| {r['impl']} | {r['error'] or 'not timed'} | | | | | | | | |")
                continue
            vs = r.get("vs_materialised_time")
            lines.append(f"| {r['impl']} | {r['matmul_rows']} | {r['matmul_GFLOP']:.1f} | {r['fwd_ms']:.1f} | "
                         f"{r['bwd_ms']:.1f} | {r['fwdbwd_ms']:.1f} | {'-' if vs is None else f'{vs:.2f}x'} | "
                         f"{r['extra_peak_MB']:.1f} | {r['extra_peak_over_logits_and_grad']:.3f} | {r['loss']:.6g} |")
        full = next((r for r in rows if r["matmul_rows"] == r["N"]), None)
        fused = next((r for r in rows if r["impl"] == "linear"), None)
        if full and fused:
            saved = full["matmul_GFLOP"] - fused["matmul_GFLOP"]
            lines += ["", f"FLOPs saved by gathering the scored rows first: {saved:.1f} GFLOP of "
                          f"{full['matmul_GFLOP']:.1f} ({100 * saved / full['matmul_GFLOP']:.0f}%)."]
        lines.append("")
    lines += ["| target | need | got | status |", "|---|--:|--:|---|"]
    for t in targets:
        got = "-" if t["got"] is None else f"{t['got']:.3g}"
        lines.append(f"| {t['target']} ({t['case']}) | {t['need']:.3g} | {got} | {t['status']} |")
    return "\n".join(lines) + "\n"


def main(args, console) -> int:
    """Run the fused-LM-head cases (``deltal-bench --linear``); writes <out>/linear-<device>[-quick].{json,md}."""
    from importlib import metadata

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cases = GRIDS[device.type + ("-quick" if args.quick else "")]
    if args.N or args.V or args.H:
        base = cases[0]
        cases = [LinearCase(N=N, H=H, V=V, dtype=d) for d in (args.dtype or [base.dtype]) for V in (args.V or [base.V])
                 for H in (args.H or [base.H]) for N in (args.N or [base.N])]
    impls, skipped = implementations()
    if args.only:
        unknown = set(args.only) - {i.name for i in impls}
        if unknown:
            raise SystemExit(f"--only: {sorted(unknown)} not available here; available: {[i.name for i in impls]}")
        impls = [i for i in impls if i.name in args.only]
    reps = args.reps or (2 if args.quick else 3)
    versions = {"torch": torch.__version__, "deltal_kernels": dk.__version__}
    try:
        versions["liger-kernel"] = metadata.version("liger-kernel")
    except metadata.PackageNotFoundError:
        versions["liger-kernel"] = None
    meta = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), device=device.type,
                device_name=measure.device_name(device), platform=platform.platform(), cpu_count=os.cpu_count(),
                torch_threads=torch.get_num_threads(), load_average=os.getloadavg(), reps=reps,
                backend=dk.available_backends(device)[0], skipped=skipped, **versions)
    console.print(f"deltal-bench --linear on {meta['device_name']}; backend {meta['backend']}")
    for name, why in skipped.items():
        console.print(f"  not measured: {name}: {why}")
    results = []
    for case in cases:
        rows = run_case(case, impls, reps, device, step=lambda text: console.print(f"  {text}", highlight=False))
        results += rows
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    targets = evaluate(results, device.type)
    text = markdown(meta, results, targets)
    console.print(text)
    tag = "linear-" + device.type + ("-quick" if args.quick else "") + ("-custom" if args.N or args.V or args.H else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{tag}.json").write_text(json.dumps(dict(meta=meta, results=results, targets=targets), indent=1))
    (args.out / f"{tag}.md").write_text(text)
    console.print(f"wrote {args.out / (tag + '.json')} and {args.out / (tag + '.md')}")
    return 0
