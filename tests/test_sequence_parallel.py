"""Sequence/context-parallel rows (issue 20): a sequence's rows spread over the ranks of a group.

Real gloo process groups of 2 and 3 ranks (and a 2 x 2 tensor x sequence grid) on the CPU. Each
rank passes its own rows of one global batch, the global cu_seqlens and row_index, in a contiguous
split and in Megatron CP's load-balanced two-chunk layout. Every rank must return the whole batch's
loss and metrics (the same bits on every rank, run to run), its own rows' log-probs, and the whole
loss's gradient for its own rows, all equal to the float64 reference of the unsharded batch within
the float32 bounds of tests/cases.py.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import deltal_kernels as dk

from cases import ROUNDING, SMALLEST, as_float64, assert_outputs_close, largest, make_batch, run

LENGTHS = [0, 5, 1, 0, 9, 3, 0, 7]
V = 301
CASES = {
    "ppo": dict(max_len=16),
    "dual-clip-kl-entropy": dict(max_len=16, dual_clip=1.5, kl_coef=0.05, entropy_coef=0.01, with_entropy=True),
    "grpo-cispo": dict(agg="grpo", objective="cispo", clip_high=0.28),
    "gspo": dict(max_len=16, ratio_level="sequence", kl_coef=0.05),
    "rollout-sequence-mask": dict(max_len=16, rollout_correction="sequence_mask", rollout_clip=(0.5, 2.0)),
    "kl-entropy-token-mean": dict(agg="dr-grpo", max_len=16, kl_entropy_agg="token-mean", kl_coef=0.05,
                                  entropy_coef=0.01, temperature=0.7),
}


def layout(world, rank, kind):
    """row_index of this rank: a contiguous split of the packed batch, or Megatron CP's layout (each
    sequence in 2 * world chunks, rank r holding chunks r and 2 * world - 1 - r)."""
    N = sum(LENGTHS)
    if kind == "contiguous":
        bounds = [round(N * r / world) for r in range(world + 1)]
        return torch.arange(bounds[rank], bounds[rank + 1])
    rows, start = [], 0
    for L in LENGTHS:
        edges = [start + round(L * c / (2 * world)) for c in range(2 * world + 1)]
        for c in (rank, 2 * world - 1 - rank):
            rows.extend(range(edges[c], edges[c + 1]))
        start += L
    return torch.tensor(sorted(rows), dtype=torch.int64)


def global_batch(seed):
    batch = make_batch(LENGTHS, V, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    batch["rollout_logprobs"] = batch["old_logprobs"] + torch.randn(len(batch["targets"]), generator=gen) * 0.3
    return batch


def local(batch, idx):
    return {k: (v if k == "cu_seqlens" else v[idx]) for k, v in batch.items()}


def same_on_every_rank(x, group=None):
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return all(torch.equal(p, parts[0]) for p in parts)


def compare(out, grad, ref, ref_grad, idx, opts, batch, label, cols=slice(None)):
    finite = batch["logits"][batch["logits"].isfinite()]
    f32 = 1e-5 + 4 * 2.0**-24 * float(finite.abs().max()) / opts.get("temperature", 1.0)
    whole = type(ref)(loss=ref.loss, logprobs=ref.logprobs[idx],
                      entropy=None if ref.entropy is None else ref.entropy[idx], metrics=ref.metrics)
    assert_outputs_close(out, whole, f32, label)
    torch.testing.assert_close(grad.double(), ref_grad[idx][:, cols], rtol=ROUNDING[torch.float32] + f32,
                               atol=SMALLEST[torch.float32] + f32 * largest(ref_grad),
                               msg=lambda m: f"logits gradient ({label}): {m}")


def call(batch, idx, cols, backend, opts, **groups):
    mine = local(batch, idx)
    logits = mine.pop("logits")[:, cols].contiguous().requires_grad_(True)
    out = dk.policy_loss(logits, mine.pop("targets"), mine.pop("old_logprobs"), mine.pop("advantages"),
                         mine.pop("cu_seqlens"), **mine, row_index=idx, backend=backend, **groups, **opts)
    (grad,) = torch.autograd.grad(out.loss, logits)
    return out, grad


def check_cases(rank, world, backend, kind):
    idx = layout(world, rank, kind)
    for seed, (name, options) in enumerate(CASES.items()):
        batch = global_batch(seed)
        opts = dict(options)
        if "rollout_correction" not in opts:
            batch.pop("rollout_logprobs")
        ref, ref_grad = run(dk.reference.policy_loss, as_float64(batch), **opts)
        label = f"{name}, {backend}, {kind}, rank {rank} of {world}"
        out, grad = call(batch, idx, slice(None), backend, opts, sequence_group=dist.group.WORLD)
        compare(out, grad, ref, ref_grad, idx, opts, batch, label)
        assert same_on_every_rank(out.loss.detach().reshape(1)), label
        again, grad_again = call(batch, idx, slice(None), backend, opts, sequence_group=dist.group.WORLD)
        assert torch.equal(again.loss, out.loss) and torch.equal(grad_again, grad), label
        assert all(torch.equal(again.metrics[k], v) for k, v in out.metrics.items()), label

    # the fused LM head with this rank's hidden rows
    from test_linear import make_linear, reference as linear_reference

    for seed, name in enumerate(("ppo", "gspo")):
        opts = dict(CASES[name], chunk_rows=4)
        batch, params = make_linear(LENGTHS, seed=seed, v=V)
        ref, ref_grads, bounds, zmax = linear_reference(batch, params, **opts)
        hidden = params["hidden"][idx].clone().requires_grad_(True)
        mine = local(batch, idx)
        out = dk.linear_policy_loss(hidden, params["weight"], bias=params["bias"], **mine, row_index=idx,
                                    sequence_group=dist.group.WORLD, backend=backend, **opts)
        (grad,) = torch.autograd.grad(out.loss, hidden)
        f32 = 1e-5 + 4 * 2.0**-24 * zmax
        label = f"linear {name}, {backend}, {kind}, rank {rank} of {world}"
        whole = type(ref)(loss=ref.loss, logprobs=ref.logprobs[idx],
                          entropy=None if ref.entropy is None else ref.entropy[idx], metrics=ref.metrics)
        assert_outputs_close(out, whole, f32, label)
        tol = (3 * ROUNDING[torch.float32] + f32 + V * 2.0**-24) * bounds["hidden"][idx] + SMALLEST[torch.float32]
        assert bool(((grad.double() - ref_grads["hidden"][idx]).abs() <= tol + 1e-9).all()), label


def check_grid(rank, world, backend, kind):
    """2 x 2: tensor-parallel pairs {0, 1}, {2, 3} split the vocabulary; sequence-parallel pairs
    {0, 2}, {1, 3} split the rows."""
    tp_rank, sp_rank = rank % 2, rank // 2
    tp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    sp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    tp, sp = tp_groups[sp_rank], sp_groups[tp_rank]
    idx = layout(2, sp_rank, kind)
    start, size = [(0, 150), (150, 151)][tp_rank]
    for seed, name in enumerate(("dual-clip-kl-entropy", "gspo", "rollout-sequence-mask")):
        batch = global_batch(seed)
        opts = dict(CASES[name])
        if "rollout_correction" not in opts:
            batch.pop("rollout_logprobs")
        ref, ref_grad = run(dk.reference.policy_loss, as_float64(batch), **opts)
        label = f"grid {name}, {backend}, {kind}, tp {tp_rank} sp {sp_rank}"
        out, grad = call(batch, idx, slice(start, start + size), backend, opts, sequence_group=sp,
                         vocab_group=tp, vocab_start=start)
        compare(out, grad, ref, ref_grad, idx, opts, batch, label, cols=slice(start, start + size))
        assert same_on_every_rank(out.loss.detach().reshape(1)), label


def check_errors(rank, world, backend, kind):
    batch = global_batch(0)
    batch.pop("rollout_logprobs")
    idx = layout(world, rank, "contiguous")

    def expect(match, idx, **change):
        b = dict(batch, **change)
        with pytest.raises(ValueError, match=match):
            call(b, idx, slice(None), backend, dict(max_len=16), sequence_group=dist.group.WORLD)

    # every call is a collective: every rank takes part in each
    expect(r"row_index: on rank\(s\) \[0\] it is not strictly increasing",
           idx.flip(0) if rank == 0 and idx.numel() > 1 else idx)
    expect("row_index: the ranks hold .* rows in all, the batch has", idx[:-1] if rank == world - 1 else idx)
    other = dk.packing.cu_seqlens_from_lengths(torch.tensor(LENGTHS[:-1] + [LENGTHS[-1] - 1, 1]))
    expect("cu_seqlens: the ranks pass different cu_seqlens", idx, **({"cu_seqlens": other} if rank == 0 else {}))


def worker(rank, world, store, backend, kind, check):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        check(rank, world, backend, kind)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(tmp_path, world, backend, kind, check):
    from deltal_kernels.dispatch import unavailable_reason

    reason = unavailable_reason(backend, "cpu")
    if reason is not None:
        pytest.skip(reason)
    mp.spawn(worker, args=(world, str(tmp_path / "store"), backend, kind, check), nprocs=world, join=True)


@pytest.mark.parametrize("kind", ["contiguous", "cp-two-chunk"])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("world", [2, 3])
def test_sequence_parallel_rows_equal_the_unsharded_reference(world, backend, kind, tmp_path):
    spawn(tmp_path, world, backend, kind, check_cases)


@pytest.mark.parametrize("kind", ["contiguous", "cp-two-chunk"])
def test_tensor_by_sequence_grid(kind, tmp_path):
    spawn(tmp_path, 4, "cpu", kind, check_grid)


def test_bad_rows_raise_on_every_rank(tmp_path):
    spawn(tmp_path, 3, "torch", "contiguous", check_errors)


def test_row_index_without_a_group_is_an_error():
    batch = make_batch(LENGTHS, V, seed=0)
    with pytest.raises(ValueError, match="row_index: given without sequence_group"):
        dk.policy_loss(**batch, max_len=16, row_index=torch.arange(sum(LENGTHS)))
