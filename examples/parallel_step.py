"""One tensor- and sequence-parallel training step with the fused LM head (README, "Sequence and
context parallelism"), checked against the same step run by one process on the whole batch.

    torchrun --nproc-per-node 4 --standalone examples/parallel_step.py   # a 2 x 2 grid, gloo, CPU
    python examples/parallel_step.py                                      # one process, the whole batch

Grid: rank = 2 * sp_rank + tp_rank. Tensor-parallel pairs {0, 1}, {2, 3} split the LM head's rows
(the vocabulary, unequal shards: V = 301 = 150 + 151); sequence-parallel pairs {0, 2}, {1, 3} split
the packed rows in Megatron CP's layout (each sequence cut into 2 * CP chunks, sequence rank r
holding chunks r and 2 * CP - 1 - r). The body is replicated on every rank; it is a per-token MLP,
so it needs no communication (attention would exchange keys and values over the sequence group).
Run by tests/test_parallel_example.py.
"""
import math
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import deltal_kernels as dk

V, H, TP, CP = 301, 32, 2, 2
LENGTHS = [5, 0, 9, 3, 7, 1]  # ragged responses, an empty one included
MAX_LEN = 16
# float32 throughout: the sharded softmax merge and the sums over the groups add the same terms in
# another order, so they differ from one process by a few float32 roundings (2^-24 ~ 6e-8 relative
# each, ~1e-7 seen); 1e-5 relative (and 1e-7 absolute, for values near 0) leaves a wide margin
RTOL, ATOL = 1e-5, 1e-7
SIZES = [V // TP + (t >= TP - V % TP) for t in range(TP)]  # head rows per tensor rank: 150, 151


def make_model():
    torch.manual_seed(0)  # the same initial weights on every rank
    embed = nn.Embedding(V, H)
    body = nn.Sequential(nn.Linear(H, H), nn.Tanh(), nn.Linear(H, H), nn.Tanh())
    head = nn.Linear(H, V)
    return embed, body, head


def make_batch():
    """A packed batch of the whole responses (every rank builds the same one)."""
    gen = torch.Generator().manual_seed(1)
    lengths = torch.tensor(LENGTHS)
    N = int(lengths.sum())
    return dict(
        inputs=torch.randint(V, (N,), generator=gen),  # the token before each scored one
        targets=torch.randint(V, (N,), generator=gen),  # global vocabulary ids
        old_logprobs=-math.log(V) + 0.3 * torch.randn(N, generator=gen),  # the rollout policy's
        advantages=torch.randn(len(LENGTHS), generator=gen).repeat_interleave(lengths),
        loss_mask=torch.rand(N, generator=gen) > 0.2,
        cu_seqlens=dk.packing.cu_seqlens_from_lengths(lengths),  # always the WHOLE batch's
    )


def cp_rows(sp_rank):
    """row_index: this sequence rank's rows of the packed batch (chunks r and 2 CP - 1 - r of each)."""
    rows, start = [], 0
    for L in LENGTHS:
        edges = [start + L * c // (2 * CP) for c in range(2 * CP + 1)]
        for c in (sp_rank, 2 * CP - 1 - sp_rank):
            rows.extend(range(edges[c], edges[c + 1]))
        start += L
    return torch.tensor(sorted(rows), dtype=torch.int64)


def norm(*grads):
    return float(torch.cat([g.reshape(-1) for g in grads]).norm())


def one_process():
    """The same step on the whole batch with the whole head: no groups."""
    embed, body, head = make_model()
    b = make_batch()
    hidden = body(embed(b["inputs"]))
    out = dk.linear_policy_loss(hidden, head.weight, b["targets"], b["old_logprobs"], b["advantages"],
                                b["cu_seqlens"], bias=head.bias, loss_mask=b["loss_mask"], max_len=MAX_LEN)
    out.loss.backward()
    body_grads = [p.grad for p in [*embed.parameters(), *body.parameters()]]
    return out.loss.item(), norm(head.weight.grad, head.bias.grad), norm(*body_grads)


def parallel():
    rank = dist.get_rank()
    tp_rank, sp_rank = rank % TP, rank // TP
    # every rank creates every group, in the same order
    tp_groups = [dist.new_group([s * TP + t for t in range(TP)]) for s in range(CP)]
    sp_groups = [dist.new_group([s * TP + t for s in range(CP)]) for t in range(TP)]
    tp_group, sp_group = tp_groups[sp_rank], sp_groups[tp_rank]

    embed, body, full_head = make_model()
    start, size = sum(SIZES[:tp_rank]), SIZES[tp_rank]  # vocab_start: this rank's first vocabulary id
    w = full_head.weight.detach()[start:start + size].clone().requires_grad_(True)  # [V_r, H]
    bias = full_head.bias.detach()[start:start + size].clone().requires_grad_(True)  # [V_r]

    b = make_batch()
    rows = cp_rows(sp_rank)  # this rank's rows: the same on both ranks of a tensor-parallel pair
    hidden = body(embed(b["inputs"][rows]))  # [N_r, H]
    out = dk.linear_policy_loss(hidden, w, b["targets"][rows], b["old_logprobs"][rows], b["advantages"][rows],
                                b["cu_seqlens"], bias=bias, loss_mask=b["loss_mask"][rows], max_len=MAX_LEN,
                                vocab_start=start, vocab_group=tp_group,  # this rank's head rows
                                sequence_group=sp_group, row_index=rows)  # this rank's batch rows
    out.loss.backward()  # out.loss: the whole batch's loss, the same on every rank
    # Who reduces which gradient: hidden's is summed over tp_group by the op (reduce_hidden_grad=True;
    # pass False under Megatron's ColumnParallelLinear, which does it), so the body's gradient is the
    # same on both ranks of a tensor pair. The body's and the head shard's gradients cover this rank's
    # rows only: the user (or the framework's data-parallel all-reduce, over data x context ranks in
    # Megatron) sums them over sp_group. No scaling: each rank's loss gradient is the whole loss's.
    params = [*embed.parameters(), *body.parameters(), w, bias]
    for p in params:
        dist.all_reduce(p.grad, group=sp_group)

    # the checksums: the whole head's gradient norm from the shards' (sum of squares over tp_group)
    head_sq = torch.tensor(norm(w.grad, bias.grad) ** 2, dtype=torch.float64)
    dist.all_reduce(head_sq, group=tp_group)
    return out.loss.item(), math.sqrt(head_sq), norm(*(p.grad for p in params[:-2]))


NAMES = ("loss", "|grad head|", "|grad body|")  # the head's: weight and bias; the body's: embedding and MLP


def main():
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        for name, w in zip(NAMES, one_process()):
            print(f"{name:12} one process {w:.9g}")
        return 0
    if world != TP * CP:
        sys.exit(f"run with torchrun --nproc-per-node {TP * CP} (a {TP} x {CP} grid), or without torchrun")
    dist.init_process_group("gloo")
    try:
        got = parallel()
        if dist.get_rank() != 0:
            return 0
        want = one_process()
        print(f"grid {TP} x {CP} (tensor x sequence): head shards of {SIZES} rows, "
              f"{sum(LENGTHS)} rows in {len(LENGTHS)} sequences")
        for name, g, w in zip(NAMES, got, want):
            print(f"{name:12} parallel {g:.9g}  one process {w:.9g}")
        ok = all(math.isclose(g, w, rel_tol=RTOL, abs_tol=ATOL) for g, w in zip(got, want))
        print("OK: equal within float32 rounding" if ok else f"MISMATCH beyond rtol {RTOL}")
        return 0 if ok else 1
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
