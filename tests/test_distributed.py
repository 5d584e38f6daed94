"""Data-parallel Delta-L: sequence_weights(group=...) over real gloo process groups (2 and 3 ranks).

Each rank holds a different ragged slice of one global batch. The weights must be those of the
SPEC formula over every rank's sequences (times the world size for grad_reduction="mean"), and the
gradient averaged by DDP (or summed by hand for grad_reduction="sum") must equal the gradient of
one process on the whole batch, for every aggregation.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import deltal_kernels as dk

AGGS = ("delta-l", "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
ALPHA, MAX_LEN, V, H = 0.75, 8, 11, 6
# rows per sequence of the global batch; one sequence is empty and one has no scored row
GLOBAL_ROWS = [5, 3, 0, 7, 2, 4, 6, 1]
# sequences of each rank: uneven counts so every rank's batch has its own raggedness
SPLITS = {2: [3, 5], 3: [2, 4, 2]}


def formula_weights(lengths, agg):
    """SPEC section 1's table, written out per sequence over the given (global) lengths."""
    live = [L for L in lengths if L > 0]
    G, total, inv = len(live), sum(live), sum(L ** -ALPHA for L in live)
    out = []
    for L in lengths:
        if L == 0:
            out.append(0.0)
        elif agg == "delta-l":
            out.append(L ** -ALPHA / (MAX_LEN * inv))
        elif agg == "token-mean":
            out.append(1.0 / total)
        elif agg == "seq-mean-token-mean":
            out.append(1.0 / (G * L))
        elif agg == "seq-mean-token-sum":
            out.append(1.0 / G)
        else:
            out.append(1.0 / (G * MAX_LEN))
    return torch.tensor(out, dtype=torch.float64)


def global_batch():
    gen = torch.Generator().manual_seed(1)
    rows = torch.tensor(GLOBAL_ROWS)
    N = int(rows.sum())
    scored = torch.rand(N, generator=gen) > 0.3
    scored[int(rows[:7].sum())] = False  # the last sequence (1 row) has no scored row
    return dict(
        cu_seqlens=dk.packing.cu_seqlens_from_lengths(rows),
        features=torch.randn(N, H, generator=gen, dtype=torch.float64),
        targets=torch.randint(0, V, (N,), generator=gen),
        old_logprobs=-2.4 + 0.4 * torch.randn(N, generator=gen, dtype=torch.float64),
        advantages=torch.randn(len(GLOBAL_ROWS), generator=gen, dtype=torch.float64),
        loss_mask=scored,
    )


def rank_slice(batch, first, count):
    """The sequences first .. first+count-1 of the packed batch, as their own packed batch."""
    cu = batch["cu_seqlens"]
    lo, hi = int(cu[first]), int(cu[first + count])
    sliced = {k: batch[k][lo:hi] for k in ("features", "targets", "old_logprobs", "loss_mask")}
    sliced["cu_seqlens"] = cu[first:first + count + 1] - lo
    sliced["advantages"] = batch["advantages"][first:first + count]
    return sliced


def loss_of(model, b, **kw):
    return dk.policy_loss(model(b["features"]), b["targets"], b["old_logprobs"], b["advantages"], b["cu_seqlens"],
                          loss_mask=b["loss_mask"], backend="torch", **kw).loss


def make_model():
    torch.manual_seed(0)
    return torch.nn.Linear(H, V, bias=False).double()


def worker(rank, world, init_file):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        batch = global_batch()
        counts = SPLITS[world]
        mine = rank_slice(batch, sum(counts[:rank]), counts[rank])
        global_lengths = dk.packing.scored_lengths(batch["cu_seqlens"], batch["loss_mask"]).tolist()
        my_lengths = dk.packing.scored_lengths(mine["cu_seqlens"], mine["loss_mask"])
        first = sum(counts[:rank])
        for agg in AGGS:
            expected_all = formula_weights(global_lengths, agg)[first:first + counts[rank]]
            for reduction, scale in (("mean", world), ("sum", 1)):
                # (a) the weights are the formula over all ranks' sequences
                w = dk.sequence_weights(my_lengths, agg, alpha=ALPHA, max_len=MAX_LEN, group=dist.group.WORLD,
                                        grad_reduction=reduction, dtype=torch.float64)
                torch.testing.assert_close(w, expected_all * scale, rtol=1e-14, atol=0)

            # (b) one DDP step on the split batch == one process on the whole batch
            whole = make_model()
            loss_of(whole, batch, agg=agg, alpha=ALPHA, max_len=MAX_LEN).backward()
            expected_grad = whole.weight.grad

            ddp = torch.nn.parallel.DistributedDataParallel(make_model())
            w = dk.sequence_weights(my_lengths, agg, alpha=ALPHA, max_len=MAX_LEN, group=dist.group.WORLD,
                                    dtype=torch.float64)
            loss_of(ddp, mine, weights=w).backward()  # DDP averages the gradients over ranks
            tol = 1e-13 * expected_grad.abs().max().item()  # float64 sums in another order
            torch.testing.assert_close(ddp.module.weight.grad, expected_grad, rtol=0, atol=tol)

            # grad_reduction="sum": the ranks' gradients are summed, not averaged
            plain = make_model()
            w = dk.sequence_weights(my_lengths, agg, alpha=ALPHA, max_len=MAX_LEN, group=dist.group.WORLD,
                                    grad_reduction="sum", dtype=torch.float64)
            loss_of(plain, mine, weights=w).backward()
            dist.all_reduce(plain.weight.grad)
            torch.testing.assert_close(plain.weight.grad, expected_grad, rtol=0, atol=tol)
        # (c) a mini-batch not drawn from its rollout batch on rank 0 only: every rank raises, none hangs
        assert int(my_lengths.count_nonzero()) > 0
        rollout = my_lengths[:0] if rank == 0 else my_lengths
        with pytest.raises(ValueError, match=r"rollout_lengths: on 1 rank\(s\)"):
            dk.sequence_weights(my_lengths, "delta-l", max_len=MAX_LEN, group=dist.group.WORLD,
                                rollout_lengths=rollout)
        # no rank tears the group down while another still talks through it (gloo then aborted a
        # process now and then: "terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_weights_and_gradients_match_the_whole_batch(world, tmp_path):
    # the split must really be ragged: ranks hold different numbers of sequences of different lengths
    assert sum(SPLITS[world]) == len(GLOBAL_ROWS) and len(set(SPLITS[world])) > 1
    mp.spawn(worker, args=(world, str(tmp_path / "store")), nprocs=world, join=True)


def test_weights_without_group_are_the_local_formula():
    lengths = [4, 0, 2, 9]
    for agg in AGGS:
        w = dk.sequence_weights(torch.tensor(lengths), agg, alpha=ALPHA, max_len=MAX_LEN, dtype=torch.float64)
        torch.testing.assert_close(w, formula_weights(lengths, agg), rtol=1e-14, atol=0)
