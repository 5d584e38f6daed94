"""``deltal-bench --parallel``: per-rank peak memory and bytes communicated under tensor parallelism.

TP gloo ranks on the CPU (``torch.multiprocessing``), TP in ``--tp`` (default 1, 2, 4), each holding
its vocabulary shard [start, start + V_r) (V_r = ceil(V / TP), the last rank the rest), run one
forward+backward of:

- ``linear`` (a): ``dk.linear_policy_loss(hidden, weight_r, ..., vocab_start, vocab_group)``, the LM
  head's rows [V_r, H] of this rank, hidden [N, H] the same on every rank; gradients of hidden and
  weight_r (hidden's all-reduced over the group, as the op does by default);
- ``shard`` (b): ``dk.policy_loss(logits_r, ..., vocab_start, vocab_group)`` on the logits shard
  [N, V_r]; gradient of the shard;
- ``gathered`` (c): what a trainer without this package does: all-gather the shards into [N, V] on
  every rank (padded to V_r columns each: torch's all_gather takes equal sizes), then
  ``dk.reference.policy_loss`` (float32 log_softmax + gather, the benchmark's ``eager``), its
  gradient's columns of this rank handed back (a slice, no communication).

Every implementation computes the same loss options as the other modes (``cases.LOSS_OPTIONS``).
The logits and the head's rows are drawn in fixed blocks of columns (rows of the head) seeded by
the block, so every TP sees the same global batch. The old and reference log-probs are the sharded
``dk.token_logprobs`` (``linear_token_logprobs`` for (a)) plus the same seeded noise everywhere, and
the loss depends on the log-probs only through their differences from those: every row reports the
same loss up to rounding, which for (c) checks torch's log-probs of the gathered logits against
the package's sharded ones.

Measured on each rank, over one call (forward + backward):

- peak memory beyond the inputs: ``measure._cpu_peak_bytes`` (PyTorch's CPU allocator events
  replayed), gradients included (they are what the rank must hold); also given less the gradients;
- bytes communicated: torch.distributed's collectives are wrapped while the call runs and each call
  counted per rank as a ring (or direct) exchange moves it: ``all_gather`` of B bytes per rank sends
  (W-1)·B and receives the other ranks' parts, (W-1)·B for equal parts; ``all_reduce`` of B bytes
  sends and receives 2·(W-1)/W·B each (ring). Any other collective is recorded by name and counted
  as unknown. Printed beside each count: the formula it should equal.
- time of that same call (one call, under the memory profiler: not a timing benchmark).

For (c) the ranks take turns for the loss after the gather (a barrier between turns), so TP copies
of the float32 [N, V] work do not have to fit in the machine's memory at once; each rank's own
peak is what it would be alone, and the rank whose turn it is uses every core.
"""
from __future__ import annotations

import csv
import functools
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import deltal_kernels as dk

from . import measure
from .cases import DTYPES, LOSS_OPTIONS, Batch, max_len_for, rollout_lengths

IMPLS = ("linear", "shard", "gathered")
DESCRIPTION = {
    "linear": "(a) dk.linear_policy_loss, head rows [V_r, H] per rank",
    "shard": "(b) dk.policy_loss on the logits shard [N, V_r]",
    "gathered": "(c) all-gather to [N, V], then torch log_softmax + gather",
}
DEFAULT = dict(N=4096, V=151936, H=1024, dtype="bf16", tp=(1, 2, 4))
BLOCK = 2048  # columns of the logits (rows of the head) drawn from one seeded generator
STATS_ROW_BYTES = 4 * 4  # merged_rows' all-gather: [4, rows] float32 per rank
CHECK_BYTES = 6 * 8  # vocab_shard's all-gather: 6 int64 per rank


@dataclass(frozen=True)
class ParallelCase:
    N: int
    V: int
    H: int
    dtype: str

    @property
    def label(self) -> str:
        return f"N={self.N} V={self.V} H={self.H} {self.dtype}"


def shard_of(V: int, world: int, rank: int):
    """(start, size) of rank's columns: ceil(V / world) each, the last rank the rest (as Megatron, unpadded)."""
    width = -(-V // world)
    start = min(V, rank * width)
    return start, min(V, start + width) - start


# ---- counting the bytes of torch.distributed's collectives ----

def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class CommCounter:
    """While active, every torch.distributed collective of this process is counted: (op, sent, received)."""

    WRAPPED = ("all_gather", "all_reduce", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
               "broadcast", "reduce", "gather", "scatter", "all_to_all", "all_to_all_single", "all_gather_object")

    def __init__(self):
        self.calls: List[dict] = []
        self._saved = {}

    def __enter__(self):
        for name in self.WRAPPED:
            real = getattr(dist, name, None)
            if real is not None:
                self._saved[name] = real
                setattr(dist, name, self._wrap(name, real))
        return self

    def __exit__(self, *exc):
        for name, real in self._saved.items():
            setattr(dist, name, real)
        self._saved.clear()
        return False

    def _wrap(self, name, real):
        @functools.wraps(real)
        def counted(*args, **kwargs):
            group = kwargs.get("group")
            world, me = dist.get_world_size(group), dist.get_rank(group)
            if name == "all_gather":
                parts = args[0] if args else kwargs["tensor_list"]
                mine = args[1] if len(args) > 1 else kwargs["tensor"]
                sent = (world - 1) * _nbytes(mine)
                received = sum(_nbytes(p) for i, p in enumerate(parts) if i != me)
            elif name == "all_reduce":
                tensor = args[0] if args else kwargs["tensor"]
                sent = received = 2 * (world - 1) * _nbytes(tensor) // world
            else:  # not used by the code measured; recorded so a new one cannot go uncounted silently
                sent = received = None
            self.calls.append(dict(op=name, world=world, sent=sent, received=received))
            return real(*args, **kwargs)

        return counted

    def totals(self) -> dict:
        def total(key, op=None):
            values = [c[key] for c in self.calls if op is None or c["op"] == op]
            return None if any(v is None for v in values) else sum(values)

        ops = sorted({c["op"] for c in self.calls})
        return dict(calls={op: sum(c["op"] == op for c in self.calls) for op in ops},
                    sent=total("sent"), received=total("received"),
                    received_all_gather=total("received", "all_gather"),
                    received_all_reduce=total("received", "all_reduce"))


def expected_received(impl: str, N: int, R: int, V: int, H: int, elem: int, world: int) -> dict:
    """Bytes each rank should receive in one call of ``impl`` (the same it sends): value and formula."""
    W = world
    if impl == "linear":
        loss = (W - 1) * (CHECK_BYTES + STATS_ROW_BYTES * R)
        head = 2 * (W - 1) * N * H * elem // W
        return dict(bytes=loss + head, loss_bytes=loss, head_bytes=head,
                    formula="(TP-1)·(48 + 16·R) + 2·(TP-1)/TP·N·H·e",
                    note="6 int64 checks, then [4, C] float32 per chunk of the R scored rows; the all-reduce of "
                         "dL/dhidden [N, H] (the column-parallel head's own, reduce_hidden_grad=True)")
    if impl == "shard":
        loss = (W - 1) * (CHECK_BYTES + STATS_ROW_BYTES * N)
        return dict(bytes=loss, loss_bytes=loss, head_bytes=0, formula="(TP-1)·(48 + 16·N)",
                    note="6 int64 checks, [4, N] float32 statistics")
    width = -(-V // W)
    loss = (W - 1) * N * width * elem
    return dict(bytes=loss, loss_bytes=loss, head_bytes=0, formula="(TP-1)·N·ceil(V/TP)·e",
                note="the logits shards, padded to ceil(V/TP) columns")


# ---- one rank's inputs ----

def _blocks(start: int, size: int, draw):
    """Rows [start, start + size) of a matrix drawn BLOCK rows at a time, block b by ``draw(b)``."""
    out = []
    for b in range(start // BLOCK, -(-(start + size) // BLOCK)):
        block = draw(b)
        lo, hi = max(start, b * BLOCK) - b * BLOCK, min(start + size, (b + 1) * BLOCK) - b * BLOCK
        out.append(block[lo:hi])
    return torch.cat(out)


def _gen(seed: int, block: int = 0):
    return torch.Generator().manual_seed(seed * 1_000_003 + block)


def make_inputs(case: ParallelCase, start: int, size: int, seed: int = 0):
    """(batch rows without old/ref log-probs, logits shard [N, size], hidden [N, H], head rows [size, H])."""
    dtype = DTYPES[case.dtype]
    N, H = case.N, case.H
    gen = _gen(seed)
    max_len = max_len_for(N)
    prompts, responses = rollout_lengths(N, max_len, gen)
    lengths = torch.tensor([p + r for p, r in zip(prompts, responses)])
    mask = torch.cat([torch.cat([torch.zeros(p, dtype=torch.bool), torch.ones(r, dtype=torch.bool)])
                      for p, r in zip(prompts, responses)])
    targets = torch.randint(0, case.V, (N,), generator=gen)
    advantages = torch.randn(lengths.numel(), generator=gen)
    hidden = torch.randn(N, H, generator=gen).to(dtype)
    # the logits' columns as rows of their transpose, so a shard is a block of rows either way
    logits = _blocks(start, size, lambda b: (torch.randn(BLOCK, N, generator=_gen(seed + 1, b)) * 2.0).to(dtype)).T
    weight = _blocks(start, size, lambda b: (torch.randn(BLOCK, H, generator=_gen(seed + 2, b))
                                             * (2.0 / H**0.5)).to(dtype))
    rows = dict(targets=targets, advantages=advantages, mask=mask, max_len=max_len,
                cu_seqlens=dk.packing.cu_seqlens_from_lengths(lengths).to(torch.int32))
    return rows, logits.contiguous(), hidden, weight


def _batch(rows, true_logp, seed: int) -> Batch:
    """Old and reference log-probs near the true ones (some ratios clipped, as a few steps into training)."""
    gen = _gen(seed + 3)
    noise = lambda: torch.randn(true_logp.shape, generator=gen) * 0.1  # noqa: E731
    return Batch(targets=rows["targets"], old_logprobs=true_logp + noise(), ref_logprobs=true_logp + noise(),
                 advantages=rows["advantages"], cu_seqlens=rows["cu_seqlens"], loss_mask=rows["mask"],
                 max_len=rows["max_len"])


# ---- one call of each implementation, measured ----

def fwd_bwd(loss_fn, leaves) -> dict:
    """loss_fn() and its gradients w.r.t. ``leaves``, timed."""
    t0 = time.perf_counter()
    loss = loss_fn()
    t1 = time.perf_counter()
    grads = torch.autograd.grad(loss, leaves)
    t2 = time.perf_counter()
    return dict(loss=loss, grads=grads, fwd_ms=(t1 - t0) * 1e3, bwd_ms=(t2 - t1) * 1e3)


def gathered_call(x, batch: Batch, V: int, group) -> dict:
    """(c): the shards all-gathered into [N, V] on every rank, then the float32 log_softmax loss and its
    gradient, the ranks taking turns for the loss (see the module docstring)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    loss_fn = lambda full: dk.reference.policy_loss(full, **batch.kwargs()).loss  # noqa: E731
    if world == 1:
        return fwd_bwd(lambda: loss_fn(x), (x,))
    t0 = time.perf_counter()
    width = -(-V // world)
    padded = torch.nn.functional.pad(x.detach(), (0, width - x.shape[1]))
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    # this rank's part is the leaf itself, so autograd hands back its columns of the gradient
    sizes = [shard_of(V, world, r)[1] for r in range(world)]
    full = torch.cat([x if r == rank else parts[r][:, :sizes[r]] for r in range(world)], dim=1)
    del parts, padded
    gather_ms = (time.perf_counter() - t0) * 1e3
    out, threads = None, torch.get_num_threads()
    for turn in range(world):
        if turn == rank:
            torch.set_num_threads(os.cpu_count() or threads)  # the other ranks wait in the barrier
            out = fwd_bwd(lambda: loss_fn(full), (x,))
            torch.set_num_threads(threads)
        dist.barrier(group=group)
    out["fwd_ms"] += gather_ms
    return out


def measure_call(call) -> dict:
    """One ``call()`` (a ``fwd_bwd`` result): peak bytes beyond the inputs (its gradients included: the
    rank holds them), the gradients' bytes, the collectives' bytes, forward/backward ms, the loss."""
    out = {}

    def run():
        res = call()
        run.keep = res.pop("grads")  # alive to the end of the measured call
        out.update(res, loss=float(res["loss"].detach()), grad_bytes=sum(_nbytes(g) for g in run.keep))

    with CommCounter() as counter:
        peak = measure._cpu_peak_bytes(run)
    run.keep = None
    out.update(peak_bytes=peak, comm=counter.totals())
    return out


def rank_results(rank: int, world: int, case: ParallelCase, impls, seed: int = 0) -> List[dict]:
    """This rank's rows: every implementation measured once."""
    group = dist.group.WORLD
    start, size = shard_of(case.V, world, rank)
    rows, logits, hidden, weight = make_inputs(case, start, size, seed)
    mask = rows["mask"]
    R = int(mask.sum())
    elem = logits.element_size()
    shard = dict(vocab_start=start, vocab_group=group)
    results = []
    for impl in impls:
        if impl == "linear":
            true_logp, _ = dk.linear_token_logprobs(hidden, weight, rows["targets"], loss_mask=mask, **shard)
            batch = _batch(rows, true_logp, seed)
            h, w = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)
            inputs = _nbytes(hidden) + _nbytes(weight)
            res = measure_call(lambda: fwd_bwd(lambda: dk.linear_policy_loss(h, w, **batch.kwargs(), **shard).loss,
                                               (h, w)))
        else:
            true_logp, _ = dk.token_logprobs(logits, rows["targets"], loss_mask=mask, **shard)
            batch = _batch(rows, true_logp, seed)
            x = logits.detach().requires_grad_(True)
            inputs = _nbytes(logits)
            if impl == "shard":
                res = measure_call(lambda: fwd_bwd(lambda: dk.policy_loss(x, **batch.kwargs(), **shard).loss, (x,)))
            else:
                res = measure_call(lambda: gathered_call(x, batch, case.V, group))
        want = expected_received(impl, case.N, R, case.V, case.H, elem, world)
        comm = res["comm"]
        results.append(dict(
            case=case.label, N=case.N, V=case.V, H=case.H, dtype=case.dtype, scored_rows=R, impl=impl, tp=world,
            rank=rank, vocab_start=start, vocab_size=size, inputs_MB=inputs / 2**20,
            peak_MB=res["peak_bytes"] / 2**20, grad_MB=res["grad_bytes"] / 2**20,
            extra_MB=(res["peak_bytes"] - res["grad_bytes"]) / 2**20, fwd_ms=res["fwd_ms"], bwd_ms=res["bwd_ms"],
            loss=res["loss"], calls=comm["calls"], sent_bytes=comm["sent"], received_bytes=comm["received"],
            received_all_gather=comm["received_all_gather"], received_all_reduce=comm["received_all_reduce"],
            expected_bytes=want["bytes"], expected_loss_bytes=want["loss_bytes"],
            expected_head_bytes=want["head_bytes"], formula=want["formula"], formula_note=want["note"],
            bytes_match=comm["received"] == want["bytes"] and comm["sent"] == want["bytes"]))
    return results


# ---- the ranks ----

def _worker(rank: int, world: int, store: str, out_dir: str, case: ParallelCase, impls) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # the ranks share the cores
    try:
        rows = rank_results(rank, world, case, impls)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(rows))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_tp(case: ParallelCase, world: int, impls=IMPLS) -> List[dict]:
    """Spawn ``world`` gloo ranks on the CPU, each measuring ``impls``; every rank's rows, by rank."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    with tempfile.TemporaryDirectory(prefix="deltal-bench-parallel-") as tmp:
        mp.spawn(_worker, args=(world, str(Path(tmp, "store")), tmp, case, tuple(impls)), nprocs=world, join=True)
        return [row for rank in range(world) for row in json.loads(Path(tmp, f"rank{rank}.json").read_text())]


def summarise(results: List[dict]) -> List[dict]:
    """One row per (case, implementation, TP): the largest rank's figures, and peak vs TP=1's."""
    out = []
    keys = dict.fromkeys((r["case"], r["impl"], r["tp"]) for r in results)
    for case, impl, tp in keys:
        ranks = [r for r in results if (r["case"], r["impl"], r["tp"]) == (case, impl, tp)]
        top = max(ranks, key=lambda r: r["peak_MB"])
        row = {k: top[k] for k in ("case", "N", "V", "H", "dtype", "scored_rows", "impl", "tp", "formula",
                                   "expected_bytes", "expected_loss_bytes", "expected_head_bytes")}
        row.update(ranks=len(ranks), peak_MB=top["peak_MB"], grad_MB=top["grad_MB"], extra_MB=top["extra_MB"],
                   inputs_MB=top["inputs_MB"], received_bytes=max(r["received_bytes"] for r in ranks),
                   sent_bytes=max(r["sent_bytes"] for r in ranks),
                   received_all_reduce=max(r["received_all_reduce"] for r in ranks),
                   bytes_match=all(r["bytes_match"] for r in ranks),
                   fwdbwd_ms=max(r["fwd_ms"] + r["bwd_ms"] for r in ranks),
                   loss=ranks[0]["loss"], same_loss=len({r["loss"] for r in ranks}) == 1)
        out.append(row)
    for row in out:
        base = next((r for r in out if (r["case"], r["impl"], r["tp"]) == (row["case"], row["impl"], 1)), None)
        row["peak_vs_tp1"] = row["peak_MB"] / base["peak_MB"] if base else None
    return out


# ---- output ----

def _mb(x: float) -> str:
    return f"{x:,.1f}"


def _bytes(x) -> str:
    if x is None:
        return "-"
    for scale, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if x >= scale:
            return f"{x:,} ({x / scale:.2f} {unit})"
    return f"{x:,}"


def markdown(meta: dict, summary: List[dict]) -> str:
    lines = [f"# deltal-bench --parallel on {meta['device_name']}", "",
             f"{meta['date']}; {meta['cpu']}; PyTorch's CPU kernels run {meta['isa']}; torch {meta['torch']}, gloo on the CPU, "
             f"{meta['cpu_count']} cores; load average at start {meta['load_average'][0]:.2f}. One forward+backward "
             "per rank and setting. peak MB: the rank's peak beyond its inputs, its gradients included (PyTorch's "
             "CPU allocator events replayed); less grads: the same without the gradients; bytes: what each rank "
             "received (= sent) in the call, counted by wrapping torch.distributed's collectives (all_gather: the "
             "other ranks' parts; all_reduce: 2(TP-1)/TP of the tensor, ring), beside the formula it should equal "
             "(e bytes per element of the dtype, R scored rows). The largest rank of each setting is shown.", ""]
    for case in dict.fromkeys(r["case"] for r in summary):
        rows = [r for r in summary if r["case"] == case]
        lines += [f"**{case}** ({rows[0]['scored_rows']} of {rows[0]['N']} rows scored)", "",
                  "| impl | TP | inputs MB | peak MB | vs TP=1 | grads MB | less grads MB | bytes received / rank | "
                  "formula | = formula | of which all-reduce | fwd+bwd ms | loss |",
                  "|---|--:|--:|--:|--:|--:|--:|--:|---|---|--:|--:|--:|"]
        for r in rows:
            vs = "-" if r["peak_vs_tp1"] is None else f"{r['peak_vs_tp1']:.2f}"
            lines.append(f"| {r['impl']} | {r['tp']} | {_mb(r['inputs_MB'])} | {_mb(r['peak_MB'])} | {vs} | "
                         f"{_mb(r['grad_MB'])} | {_mb(r['extra_MB'])} | {_bytes(r['received_bytes'])} | "
                         f"{r['formula']} = {r['expected_bytes']:,} | {'yes' if r['bytes_match'] else 'NO'} | "
                         f"{_bytes(r['received_all_reduce'])} | {r['fwdbwd_ms']:,.0f} | {r['loss']:.6g} |")
        lines.append("")
    lines += ["Implementations: " + "; ".join(f"`{k}` = {v}" for k, v in DESCRIPTION.items()) + ".", ""]
    return "\n".join(lines)


CSV_FIELDS = ["case", "N", "V", "H", "dtype", "scored_rows", "impl", "tp", "rank", "vocab_start", "vocab_size",
              "inputs_MB", "peak_MB", "grad_MB", "extra_MB", "sent_bytes", "received_bytes", "received_all_gather",
              "received_all_reduce", "expected_bytes", "formula", "bytes_match", "fwd_ms", "bwd_ms", "loss"]


def write_files(out: Path, tag: str, meta: dict, results: List[dict], summary: List[dict]) -> List[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{tag}.json", out / f"{tag}.csv", out / f"{tag}.md"]
    paths[0].write_text(json.dumps(dict(meta=meta, summary=summary, results=results), indent=1))
    with paths[1].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)
    paths[2].write_text(markdown(meta, summary))
    return paths


def _cpu_model() -> str:
    """lscpu's model name, family and model, and whether the CPU has AVX-512 (a VM often says only "AMD EPYC")."""
    info = {}
    with open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    isa = "AVX-512" if "avx512f" in info.get("flags", "").split() else "no AVX-512"
    return (f"{info.get('model name', 'CPU')} (CPU family {info.get('cpu family', '?')}, model "
            f"{info.get('model', '?')}, {isa})")


def run_tag(args) -> str:
    """parallel-cpu, or parallel-cpu-custom for anything but the default shape, TP sizes and implementations."""
    return "parallel-cpu" + ("-custom" if args.N or args.V or args.H or args.dtype or args.tp or args.only else "")


def main(args, console) -> int:
    """``deltal-bench --parallel``: the TP settings one after another; writes <out>/<tag>.{json,csv,md}."""
    if args.device not in (None, "cpu"):
        raise SystemExit("--parallel: runs gloo ranks on the CPU only (--device cpu)")
    if args.dtype and len(args.dtype) > 1 or any(len(v or ()) > 1 for v in (args.N, args.V, args.H)):
        raise SystemExit("--parallel: one shape at a time (one --N, --V, --H and --dtype)")
    case = ParallelCase(N=(args.N or [DEFAULT["N"]])[0], V=(args.V or [DEFAULT["V"]])[0],
                        H=(args.H or [DEFAULT["H"]])[0], dtype=(args.dtype or [DEFAULT["dtype"]])[0])
    tps = args.tp or list(DEFAULT["tp"])
    impls = args.only or list(IMPLS)
    unknown = set(impls) - set(IMPLS)
    if unknown:
        raise SystemExit(f"--only: {sorted(unknown)} not parallel implementations; they are {list(IMPLS)}")
    isa = torch.backends.cpu.get_cpu_capability()
    meta = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), device="cpu",
                device_name=measure.device_name(torch.device("cpu")), cpu=_cpu_model(), isa=isa,
                platform=platform.platform(), cpu_count=os.cpu_count(), load_average=os.getloadavg(),
                torch=torch.__version__, deltal_kernels=dk.__version__, backend=dk.available_backends("cpu")[0],
                case=asdict(case), tp=tps, impls=impls, loss_options=LOSS_OPTIONS,
                memory_method="peak of PyTorch's CPU allocator events replayed (measure._cpu_peak_bytes), beyond "
                              "the inputs, gradients included",
                bytes_method="torch.distributed collectives wrapped in each rank: all_gather sends (W-1)·B and "
                             "receives the other ranks' parts; all_reduce sends and receives 2(W-1)/W·B (ring)")
    console.print(f"deltal-bench --parallel on {meta['device_name']}: {case.label}, "
                  f"TP {tps}, backend {meta['backend']}; results will go to {args.out}/", highlight=False)
    tag = run_tag(args)
    results: List[dict] = []
    for tp in tps:
        t0 = time.perf_counter()
        results += run_tp(case, tp, impls)
        console.print(f"  TP={tp}: {time.perf_counter() - t0:.1f} s", highlight=False)
        write_files(args.out, tag, meta, results, summarise(results))  # a run cut short keeps what it finished
    meta["load_average_end"] = os.getloadavg()
    summary = summarise(results)
    paths = write_files(args.out, tag, meta, results, summary)
    console.print(markdown(meta, summary), markup=False, highlight=False)
    console.print(f"wrote {', '.join(p.name for p in paths)} in {args.out}/", highlight=False)
    return 0 if all(r["bytes_match"] for r in summary) else 1
