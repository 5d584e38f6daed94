"""Vocabulary-parallel logits (issue 20): each rank holds a shard of every row's logits.

Real gloo process groups of 2 and 3 ranks on the CPU. Each rank passes its own columns of one
global batch; the loss, log-probs, entropy and metrics of every rank, and each rank's shard of the
logits gradient, must equal the float64 reference of the unsharded batch within the float32 bounds
of tests/cases.py, be the same bits on every rank, and be bitwise repeatable.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import deltal_kernels as dk

from cases import ROUNDING, SMALLEST, as_float64, assert_outputs_close, largest, make_batch, run

LENGTHS = [0, 5, 1, 0, 9, 3, 0, 4]
V = 301
# (start, size) of each rank's columns: unequal, one of width 1, and not in rank order for 3 ranks
SHARDS = {2: [(0, 150), (150, 151)], 3: [(101, 200), (0, 100), (100, 1)]}
CASES = {
    "ppo": dict(max_len=16),
    "dual-clip-kl-entropy": dict(max_len=16, dual_clip=1.5, kl_coef=0.05, entropy_coef=0.01, with_entropy=True),
    "temperature": dict(max_len=16, temperature=0.7, entropy_coef=0.02, kl_coef=0.1, kl_type="k2"),
    "grpo-cispo": dict(agg="grpo", objective="cispo", clip_high=0.28),
    "gspo": dict(max_len=16, ratio_level="sequence", kl_coef=0.05),
    "rollout-mask": dict(max_len=16, rollout_correction="sequence_mask", rollout_clip=(0.5, 2.0)),
    "kl-entropy-token-mean": dict(max_len=16, kl_entropy_agg="token-mean", kl_coef=0.05, entropy_coef=0.01),
}


def global_batch(seed, world):
    batch = make_batch(LENGTHS, V, seed=seed)
    edges = sorted({0, V - 1} | {s for s, _ in SHARDS[world]} | {s + n - 1 for s, n in SHARDS[world]})
    batch["targets"][: len(edges)] = torch.tensor(edges)  # targets on every shard's first and last column
    # one row with a whole shard of -inf logits, a shard without its target
    row = 4
    s, n = next((s, n) for s, n in SHARDS[world] if not s <= int(batch["targets"][row]) < s + n)
    batch["logits"][row, s:s + n] = float("-inf")
    gen = torch.Generator().manual_seed(seed + 1)
    batch["rollout_logprobs"] = batch["old_logprobs"] + torch.randn(len(batch["targets"]), generator=gen) * 0.3
    return batch


def shard_call(fn, batch, start, size, **options):
    """fn on this rank's columns; returns the output and this rank's logits gradient."""
    logits = batch["logits"][:, start:start + size].clone().requires_grad_(True)
    args = {k: v for k, v in batch.items() if k != "logits"}
    out = fn(logits, args.pop("targets"), args.pop("old_logprobs"), args.pop("advantages"), args.pop("cu_seqlens"),
             **args, vocab_start=start, vocab_group=dist.group.WORLD, **options)
    (grad,) = torch.autograd.grad(out.loss, logits)
    return out, grad


def same_on_every_rank(x, world):
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return all(torch.equal(p, parts[0]) for p in parts)


def check_cases(rank, world, backend):
    start, size = SHARDS[world][rank]
    for seed, (name, options) in enumerate(CASES.items()):
        batch = global_batch(seed, world)
        opts = dict(options)
        if "rollout_correction" not in opts:
            batch.pop("rollout_logprobs")
        ref, ref_grad = run(dk.reference.policy_loss, as_float64(batch), **opts)
        out, grad = shard_call(dk.policy_loss, batch, start, size, backend=backend, **opts)
        label = f"{name}, {backend}, rank {rank} of {world}"
        finite = batch["logits"][batch["logits"].isfinite()]
        f32 = 1e-5 + 4 * 2.0**-24 * float(finite.abs().max()) / opts.get("temperature", 1.0)
        assert_outputs_close(out, ref, f32, label)
        want = ref_grad[:, start:start + size]
        torch.testing.assert_close(grad.double(), want, rtol=ROUNDING[torch.float32] + f32,
                                   atol=SMALLEST[torch.float32] + f32 * largest(ref_grad),
                                   msg=lambda m: f"logits gradient ({label}): {m}")
        assert not grad[~batch["loss_mask"]].any(), label
        # every rank the same bits; a second run the same bits
        assert same_on_every_rank(out.loss.detach().reshape(1), world), label
        assert same_on_every_rank(out.logprobs, world), label
        again, grad_again = shard_call(dk.policy_loss, batch, start, size, backend=backend, **opts)
        assert torch.equal(again.loss, out.loss) and torch.equal(grad_again, grad), label
        # forward-only log-probs of the same rows
        logp, entropy = dk.token_logprobs(batch["logits"][:, start:start + size].contiguous(), batch["targets"],
                                          temperature=opts.get("temperature", 1.0), with_entropy=True,
                                          loss_mask=batch["loss_mask"], backend=backend, vocab_start=start,
                                          vocab_group=dist.group.WORLD)
        assert torch.equal(logp, out.logprobs), label
        assert_outputs_close(out, ref, f32, label)
        if out.entropy is not None:
            assert torch.equal(entropy, out.entropy), label


def check_linear_cases(rank, world, backend):
    """The fused LM head with this rank's rows of the head: hidden's gradient summed over the group."""
    from test_linear import make_linear, reference as linear_reference

    start, size = SHARDS[world][rank]
    for seed, name in enumerate(("ppo", "dual-clip-kl-entropy", "grpo-cispo", "gspo")):
        opts = dict(CASES[name], chunk_rows=4)
        batch, params = make_linear(LENGTHS, seed=seed, v=V)
        ref, ref_grads, bounds, zmax = linear_reference(batch, params, **opts)
        leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        mine = dict(hidden=leaves["hidden"], weight=leaves["weight"][start:start + size],
                    bias=leaves["bias"][start:start + size])
        out = dk.linear_policy_loss(mine["hidden"], mine["weight"], bias=mine["bias"], **batch, backend=backend,
                                    vocab_start=start, vocab_group=dist.group.WORLD, **opts)
        grads = dict(zip(leaves, torch.autograd.grad(out.loss, list(leaves.values()))))
        label = f"linear {name}, {backend}, rank {rank} of {world}"
        f32 = 1e-5 + 4 * 2.0**-24 * zmax
        assert_outputs_close(out, ref, f32, label)
        K = {"hidden": V, "weight": len(batch["targets"]), "bias": len(batch["targets"])}
        for key, want in ref_grads.items():
            got, bound = grads[key].double(), bounds[key]
            if key != "hidden":  # this rank's rows of the head; the rest of the leaf gets no gradient
                assert not got[:start].any() and not got[start + size:].any(), (label, key)
                got, want, bound = (t[start:start + size] for t in (got, want, bound))
            tol = (3 * ROUNDING[torch.float32] + f32 + K[key] * 2.0**-24) * bound + SMALLEST[torch.float32] \
                + f32 * 1e-3 * float(want.abs().max())
            assert bool(((got - want).abs() <= tol).all()), (label, key, float((got - want).abs().max()))
        assert same_on_every_rank(out.loss.detach().reshape(1), world), label
        assert same_on_every_rank(grads["hidden"], world), label
        logp, entropy = dk.linear_token_logprobs(mine["hidden"], mine["weight"], batch["targets"], bias=mine["bias"],
                                                 temperature=opts.get("temperature", 1.0), with_entropy=True,
                                                 loss_mask=batch["loss_mask"], backend=backend, chunk_rows=4,
                                                 vocab_start=start, vocab_group=dist.group.WORLD)
        torch.testing.assert_close(logp.double(), ref.logprobs, rtol=f32, atol=f32 * max(1.0, largest(ref.logprobs)))
        # reduce_hidden_grad=False: this rank's part only; summed by hand it is the whole gradient
        part = dk.linear_policy_loss(mine["hidden"], mine["weight"], bias=mine["bias"], **batch, backend=backend,
                                     vocab_start=start, vocab_group=dist.group.WORLD, reduce_hidden_grad=False,
                                     **opts)
        (local,) = torch.autograd.grad(part.loss, leaves["hidden"])
        summed = local.clone()
        dist.all_reduce(summed)
        assert not torch.equal(local, grads["hidden"]), label
        torch.testing.assert_close(summed, grads["hidden"], rtol=1e-6, atol=1e-7)


def check_errors(rank, world, backend):
    batch = global_batch(0, world)
    batch.pop("rollout_logprobs")
    start, size = SHARDS[world][rank]

    def expect(match, **change):
        b = dict(batch, **{k: v for k, v in change.items() if k in batch})
        s, n = change.get("shard", (start, size))
        with pytest.raises(ValueError, match=match):
            shard_call(dk.policy_loss, b, s, n, backend=backend, max_len=16)

    # the shards must tile [0, V): a gap (the first shard starts a column late), an overlap (every
    # other shard starts a column early). Every rank takes part in every call (each is a collective).
    first = start == 0
    expect("vocab_start: the shards do not tile the vocabulary.*gap at id 0", shard=(start + first, size - first))
    expect("vocab_start: the shards do not tile the vocabulary.*overlap",
           shard=(start - (not first), size + (not first)))
    # ranks that disagree on the targets, or on N
    other = batch["targets"].clone()
    other[1] = (other[1] + rank) % V
    expect("targets: the ranks' targets or loss_mask differ", targets=other)
    mask = batch["loss_mask"].clone()
    mask[5] = bool(rank % 2) != bool(mask[5])
    expect("targets: the ranks' targets or loss_mask differ", loss_mask=mask)
    cut = {k: v[:-1] if k in ("logits", "targets", "old_logprobs", "advantages", "loss_mask", "ref_logprobs",
                              "rollout_logprobs") else v for k, v in batch.items()}
    cut["cu_seqlens"] = dk.packing.cu_seqlens_from_lengths(torch.tensor(LENGTHS[:-1] + [LENGTHS[-1] - 1]))
    if rank == 0:
        expect("logits: .*different numbers of rows", **cut)
    else:
        expect("logits: .*different numbers of rows")
    # a target outside the whole vocabulary (every rank sees it: V, not V_r, bounds the targets)
    outside = batch["targets"].clone()
    outside[3] = V
    expect(r"targets: every target must lie in \[0, V=301\)", targets=outside)


def worker(rank, world, store, backend, check):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        check(rank, world, backend)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(tmp_path, world, backend, check):
    from deltal_kernels.dispatch import unavailable_reason

    reason = unavailable_reason(backend, "cpu")
    if reason is not None:
        pytest.skip(reason)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    mp.spawn(worker, args=(world, str(tmp_path / "store"), backend, check), nprocs=world, join=True)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_rows_equal_the_unsharded_reference(world, backend, tmp_path):
    spawn(tmp_path, world, backend, check_cases)


def test_sharded_rows_on_triton(tmp_path):
    """The Triton kernels (under the interpreter here: one world size, its rows are slow)."""
    spawn(tmp_path, 2, "triton", check_cases)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_lm_head_equals_the_unsharded_reference(world, backend, tmp_path):
    spawn(tmp_path, world, backend, check_linear_cases)


@pytest.mark.parametrize("world", [2, 3])
def test_bad_shards_raise_on_every_rank(world, tmp_path):
    spawn(tmp_path, world, "torch", check_errors)


def test_vocab_start_without_a_group_is_an_error():
    batch = make_batch(LENGTHS, V, seed=0)
    with pytest.raises(ValueError, match="vocab_start: given without vocab_group"):
        dk.policy_loss(**batch, max_len=16, vocab_start=0)


@pytest.mark.parametrize("backend", ["torch", "triton", "cpu", "cuda"])
def test_group_of_one_on_the_backends_device(backend, tmp_path):
    """The sharded path in this process with a group of one (on a GPU: NCCL, the GPU check's TP run):
    the same loss, log-probs and gradient as the unsharded call, to float32 rounding."""
    from cases import backend_device

    device = backend_device(backend)
    batch = {k: v.to(device) for k, v in make_batch(LENGTHS, V, seed=5).items()}
    opts = dict(max_len=16, entropy_coef=0.01, kl_coef=0.05)
    want, want_grad = run(dk.policy_loss, batch, backend=backend, **opts)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"file://{tmp_path / 'store'}",
                            rank=0, world_size=1)
    try:
        out, grad = run(dk.policy_loss, batch, backend=backend, vocab_start=0, vocab_group=dist.group.WORLD, **opts)
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logprobs, want.logprobs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-7)
