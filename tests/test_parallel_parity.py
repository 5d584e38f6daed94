"""Parity of the vocabulary-parallel ops with the peers' own vocabulary-parallel code (issue 20).

On 2 and 3 gloo ranks (CPU), each rank holding a shard of every row's logits:

- Megatron-core's ``tensor_parallel.vocab_parallel_cross_entropy(logits [S, B, V/tp], target)``
  (after ``parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)``): its per-token
  loss is -logp of ``dk.token_logprobs(..., vocab_start=, vocab_group=)``, and the gradient of
  sum_t c_t * loss_t w.r.t. each rank's shard is that of ``dk.policy_loss``'s loss -sum_t c_t logp_t.
- verl 0.9.1's ``verl.utils.megatron.tensor_parallel.vocab_parallel_log_probs_from_logits`` (verl's
  actor log-probs: Megatron's loss negated) and ``vocab_parallel_entropy``, forward and backward, and
  verl's actor objective built from both.

dk.policy_loss with a loss whose dL/dlogp_t and dL/dH_t are known constants: each row its own
sequence (cu_seqlens = 0..N), ``weights`` = w_t, ``objective="cispo"`` with ``clip_low=0``,
``clip_high=0`` (the stop-gradient ratio is clamped into [1, 1]: exactly 1 whatever old_logprobs),
so loss = sum_t w_t * (-A_t * logp_t - entropy_coef * H_t): dL/dlogp_t = -w_t A_t and
dL/dH_t = -w_t entropy_coef exactly (reference.objective_terms). The peer side backpropagates the same
per-token constants through its own functions.

Megatron needs equal shards (its vocab range is rank * V/tp): V = 300 there, divisible by 2 and 3.
verl's entropy takes unequal shards (only per-row all-reduces): also run on V = 301 with the shards
of tests/test_vocab_parallel.py (one of width 1, not in rank order). Everything dk computes is float64
(backend "torch"); the logits are float32 values held in float64.

Tolerances (u32 = 2^-24, u64 = 2^-53; p, R_t = max z - min z, |z|max of the gathered row in float64):
- Megatron (and so verl's log-probs) calls ``.float()`` on its input: it computes in float32 whatever
  the input dtype, so the comparison is bounded by its float32 arithmetic: the worst case of
  exp(z - m) summed naively over V, then log, is |d logp_t| <= u32 * (V + 4 (R_t + log V + 1)); its
  gradient c_t (p - onehot) in float32, three roundings of u32 relative (p - onehot; c_t, which
  reaches it as the float32 gradient of its float32 loss; the product) besides p's own error:
  |d g_tv| <= |c_t| u32 (p_tv (R_t + V + 4) + 3). That one is nearly sharp: the target column's
  gradient (about -c_t) differs by up to 1.93 u32 |c_t| in these cases.
- verl's entropy keeps float64: the same bounds with u64 (both sides float64, so twice), entropy
  |d H_t| <= 2 u64 (V + 8 (|z|max_t + log V + 1)), its gradient -c p_v (z_v - sum p z):
  |d g_tv| <= 2 |c_t| u64 p_tv (R_t + V + 4) (|z_tv - mu_t| + 2 |z|max_t + 1).
`test_a_perturbed_answer_fails` checks that the comparison raises when one of our log-probs, entropies
or gradient elements is moved by 1e-3 (and, for the float64 entropy, by 1e-10).

These tests need megatron-core and verl; they run in the verl venv (`make test-verl`).
"""
import importlib.util
import math
import os

import pytest
import torch

import deltal_kernels as dk


def _missing():
    def installed(name):
        try:
            return importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # the parent package is missing
            return False

    missing = [pkg for pkg, mod in (("megatron-core", "megatron.core"), ("verl", "verl")) if not installed(mod)]
    return missing


MISSING = _missing()
pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"{' and '.join(MISSING)} not installed (the peers' vocabulary-parallel code; these "
                          "tests run in the verl venv: `make test-verl`)")

U32, U64 = 2.0**-24, 2.0**-53
S_ROWS, B = 7, 3  # Megatron's [S, B, V/tp] layout; our rows are its N = S * B tokens
N = S_ROWS * B
V_EQUAL = 300
V_UNEQUAL = 301
SHARDS_UNEQUAL = {2: [(0, 150), (150, 151)], 3: [(101, 200), (0, 100), (100, 1)]}
ENTROPY_COEF = 0.3


def equal_shards(world):
    size = V_EQUAL // world
    return [(r * size, size) for r in range(world)]


def make_case(V, shards, seed):
    """Float32-valued float64 logits [N, V], targets on every shard's edges, per-token A_t and w_t."""
    gen = torch.Generator().manual_seed(seed)
    z = 3.0 * torch.randn(N, V, generator=gen, dtype=torch.float64)
    z[1] += 40.0  # a shifted row
    y = torch.randint(0, V, (N,), generator=gen)
    z[2, y[2]] += 25.0  # a row whose target holds almost all the mass
    edges = sorted({0, V - 1} | {s for s, _ in shards} | {s + n - 1 for s, n in shards})
    y[3:3 + len(edges)] = torch.tensor(edges)
    A = torch.randn(N, generator=gen, dtype=torch.float64)
    w = torch.rand(N, generator=gen, dtype=torch.float64) + 0.25
    w[0] = -w[0]  # weights may be negative: the loss is linear in them
    return dict(z=z.float().double(), y=y, A=A, w=w)


# ---- the peers and ours, in the ranks ---------------------------------------------------------------

def dk_grad(local, case, start, group, advantages, entropy_coef):
    """dk.policy_loss's loss sum_t w_t (-A_t logp_t - entropy_coef H_t) and its gradient on this shard."""
    x = local.clone().requires_grad_(True)
    out = dk.policy_loss(x, case["y"], torch.zeros(N, dtype=torch.float64), advantages,
                         torch.arange(N + 1), weights=case["w"], objective="cispo", clip_low=0.0, clip_high=0.0,
                         entropy_coef=entropy_coef, with_entropy=True, backend="torch", vocab_start=start,
                         vocab_group=group)
    (grad,) = torch.autograd.grad(out.loss, x)
    return out.loss.detach(), grad


def megatron_side(local, case, size):
    from megatron.core import tensor_parallel

    x = local.clone().requires_grad_(True)  # Megatron's in-place ops never touch the caller's tensor
    ce = tensor_parallel.vocab_parallel_cross_entropy(x.view(S_ROWS, B, size), case["y"].view(S_ROWS, B))
    c = (case["w"] * case["A"]).view(S_ROWS, B)
    (grad,) = torch.autograd.grad((c * ce).sum(), x)  # = d(-sum_t w_t A_t logp_t)
    return ce.detach().reshape(N), grad


def verl_sides(local, case):
    """verl's log-probs and entropy of this shard [N, V_r] (its remove-padding layout), their gradients
    for the per-token constants, and verl's actor objective sum_t w_t (-A_t logp_t - coef H_t)."""
    from verl.utils.megatron.tensor_parallel import vocab_parallel_entropy, vocab_parallel_log_probs_from_logits

    res = {}
    x = local.clone().requires_grad_(True)
    logp = vocab_parallel_log_probs_from_logits(x, case["y"])
    (res["logp_grad"],) = torch.autograd.grad(-(case["w"] * case["A"] * logp).sum(), x)
    res["logp"] = logp.detach()
    # verl's entropy backward subtracts and adds back sum p z in place on its saved input: a clone each time
    x = local.clone().requires_grad_(True)
    entropy = vocab_parallel_entropy(x)
    (res["entropy_grad"],) = torch.autograd.grad(-(ENTROPY_COEF * case["w"] * entropy).sum(), x)
    res["entropy"] = entropy.detach()
    x = local.clone().requires_grad_(True)
    loss = (case["w"] * (-case["A"] * vocab_parallel_log_probs_from_logits(x, case["y"])
                         - ENTROPY_COEF * vocab_parallel_entropy(x.clone()))).sum()
    (res["actor_grad"],) = torch.autograd.grad(loss, x)
    res["actor_loss"] = loss.detach()
    return res


def ours(local, case, start, group):
    res = {}
    res["logp"], res["entropy"] = dk.token_logprobs(local, case["y"], with_entropy=True, backend="torch",
                                                    vocab_start=start, vocab_group=group)
    res["policy_loss"], res["logp_grad"] = dk_grad(local, case, start, group, case["A"], 0.0)
    _, res["entropy_grad"] = dk_grad(local, case, start, group, torch.zeros(N, dtype=torch.float64), ENTROPY_COEF)
    res["actor_loss"], res["actor_grad"] = dk_grad(local, case, start, group, case["A"], ENTROPY_COEF)
    return res


def worker(rank, world, store, outdir):
    import torch.distributed as dist
    from megatron.core import parallel_state

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
        group = parallel_state.get_tensor_model_parallel_group()
        assert dist.get_world_size(group) == world and dist.get_rank(group) == rank
        results = {}
        # equal shards: Megatron, verl's log-probs, entropy and actor objective
        case = make_case(V_EQUAL, equal_shards(world), seed=world)
        start, size = equal_shards(world)[rank]
        local = case["z"][:, start:start + size].contiguous()
        results["equal"] = dict(ours=ours(local, case, start, group), verl=verl_sides(local, case))
        results["equal"]["megatron"] = dict(zip(("loss", "logp_grad"), megatron_side(local, case, size)))
        # unequal shards: verl's entropy only (Megatron's cross entropy assumes V/tp columns per rank)
        case = make_case(V_UNEQUAL, SHARDS_UNEQUAL[world], seed=10 + world)
        start, size = SHARDS_UNEQUAL[world][rank]
        local = case["z"][:, start:start + size].contiguous()
        mine = ours(local, case, start, group)
        from verl.utils.megatron.tensor_parallel import vocab_parallel_entropy

        x = local.clone().requires_grad_(True)
        entropy = vocab_parallel_entropy(x)
        (grad,) = torch.autograd.grad(-(ENTROPY_COEF * case["w"] * entropy).sum(), x)
        results["unequal"] = dict(ours=mine, verl=dict(entropy=entropy.detach(), entropy_grad=grad))
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"tp{w}")
def ranks(request, tmp_path_factory):
    """Every rank's results for one tensor-parallel size, from one gloo run (the peers' imports are slow)."""
    import torch.multiprocessing as mp

    world = request.param
    outdir = tmp_path_factory.mktemp(f"tp{world}")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    mp.spawn(worker, args=(world, str(outdir / "store"), str(outdir)), nprocs=world, join=True)
    return world, [torch.load(outdir / f"rank{r}.pt") for r in range(world)]


# ---- the comparison and its bounds ------------------------------------------------------------------

MEASURED = {}  # what: (max |diff|, max |diff| / tolerance), printed at the end of the module


def compare(got, want, tol, what):
    """|got - want| <= tol elementwise, else AssertionError naming the worst element."""
    got, want = got.double(), want.double()
    tol = torch.as_tensor(tol, dtype=torch.float64).expand_as(want)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    diff = (got - want).abs()
    if not bool((diff <= tol).all()):  # NaN fails too
        worst = int((diff / tol).nan_to_num(float("inf")).argmax())
        raise AssertionError(f"{what}: |diff| {diff.flatten()[worst]:.3e} > tolerance {tol.flatten()[worst]:.3e} "
                             f"at flat index {worst} (got {got.flatten()[worst]!r}, want {want.flatten()[worst]!r})")
    ratio = float((diff / tol).max()) if diff.numel() else 0.0
    prev = MEASURED.get(what, (0.0, 0.0))
    MEASURED[what] = (max(prev[0], float(diff.max())), max(prev[1], ratio))


class Bounds:
    """The per-row and per-element tolerances above, from the gathered float64 logits."""

    def __init__(self, case):
        z = case["z"]
        V = z.shape[1]
        self.p = torch.softmax(z, dim=-1)
        self.R = (z.max(-1).values - z.min(-1).values)[:, None]
        self.zmax = z.abs().max(-1).values[:, None]
        mu = (self.p * z).sum(-1, keepdim=True)
        self.logV, self.V = math.log(V), V
        self.logp = (U32 + U64) * (V + 4 * (self.R[:, 0] + self.logV + 1))
        self.logp_grad_unit = (U32 + U64) * (self.p * (self.R + V + 4) + 3)  # times |c_t|
        self.entropy = 2 * U64 * (V + 8 * (self.zmax[:, 0] + self.logV + 1))
        self.entropy_grad_unit = 2 * U64 * self.p * (self.R + V + 4) * ((z - mu).abs() + 2 * self.zmax + 1)

    def logp_grad(self, c):
        return c.abs()[:, None] * self.logp_grad_unit

    def entropy_grad(self, c):
        return c.abs()[:, None] * self.entropy_grad_unit


def shard(t, shards, rank):
    start, size = shards[rank]
    return t[:, start:start + size]


def check_equal_shards(world, res, rank, ours_=None):
    """Every comparison on one rank's equal-shard results (ours_ replaces our results: the perturbed runs)."""
    case = make_case(V_EQUAL, equal_shards(world), seed=world)
    bounds = Bounds(case)
    mine = ours_ or res["ours"]
    mega, verl = res["megatron"], res["verl"]
    c_logp = case["w"] * case["A"]
    c_entropy = ENTROPY_COEF * case["w"]
    cut = lambda t: shard(t, equal_shards(world), rank)  # noqa: E731
    # forward: Megatron's loss = -logp, verl's log-probs = logp, verl's entropy
    compare(mine["logp"], -mega["loss"], bounds.logp, "megatron -loss vs dk.token_logprobs")
    compare(mine["logp"], verl["logp"], bounds.logp, "verl log_probs vs dk.token_logprobs")
    compare(mine["entropy"], verl["entropy"], bounds.entropy, "verl entropy vs dk.token_logprobs (equal shards)")
    # backward, this rank's shard
    compare(mine["logp_grad"], mega["logp_grad"], cut(bounds.logp_grad(c_logp)),
            "megatron grad vs dk.policy_loss grad")
    compare(mine["logp_grad"], verl["logp_grad"], cut(bounds.logp_grad(c_logp)), "verl log_probs grad vs dk grad")
    compare(mine["entropy_grad"], verl["entropy_grad"], cut(bounds.entropy_grad(c_entropy)),
            "verl entropy grad vs dk grad (equal shards)")
    # verl's actor objective from both, and dk's loss of it
    compare(mine["actor_grad"], verl["actor_grad"],
            cut(bounds.logp_grad(c_logp) + bounds.entropy_grad(c_entropy)), "verl actor grad vs dk grad")
    loss_tol = float((c_logp.abs() * bounds.logp).sum() + (c_entropy.abs() * bounds.entropy).sum())
    compare(mine["actor_loss"], verl["actor_loss"], loss_tol, "verl actor loss vs dk.policy_loss")
    compare(mine["policy_loss"], -(c_logp * -mega["loss"]).sum(), float((c_logp.abs() * bounds.logp).sum()),
            "megatron sum c*loss vs dk.policy_loss")


def check_unequal_shards(world, res, rank, ours_=None):
    case = make_case(V_UNEQUAL, SHARDS_UNEQUAL[world], seed=10 + world)
    bounds = Bounds(case)
    mine = ours_ or res["ours"]
    compare(mine["entropy"], res["verl"]["entropy"], bounds.entropy, "verl entropy vs dk (unequal shards)")
    compare(mine["entropy_grad"], res["verl"]["entropy_grad"],
            shard(bounds.entropy_grad(ENTROPY_COEF * case["w"]), SHARDS_UNEQUAL[world], rank),
            "verl entropy grad vs dk grad (unequal shards)")


# ---- the tests ----------------------------------------------------------------------------------------

def test_every_rank_got_the_same_forward(ranks):
    world, results = ranks
    for part in ("equal", "unequal"):
        for key in ("logp", "entropy", "actor_loss"):
            assert all(torch.equal(r[part]["ours"][key], results[0][part]["ours"][key]) for r in results), (part, key)


def test_megatron_and_verl_equal_ours_on_equal_shards(ranks):
    world, results = ranks
    for rank, res in enumerate(results):
        check_equal_shards(world, res["equal"], rank)


def test_verl_entropy_equals_ours_on_unequal_shards(ranks):
    world, results = ranks
    for rank, res in enumerate(results):
        check_unequal_shards(world, res["unequal"], rank)


def perturbed(mine, key, delta, index):
    out = dict(mine)
    t = mine[key].clone()
    t.view(-1)[index] += delta
    out[key] = t
    return out


@pytest.mark.parametrize("key,delta", [("logp", 1e-3), ("entropy", 1e-3), ("entropy", 1e-10), ("logp_grad", 1e-3),
                                       ("entropy_grad", 1e-3), ("actor_grad", 1e-3), ("actor_loss", 1e-3)])
def test_a_perturbed_answer_fails(ranks, key, delta):
    """The harness has teeth: one of our numbers moved by delta, at a few positions, fails the comparison."""
    world, results = ranks
    res = results[world - 1]["equal"]
    n = res["ours"][key].numel()
    for index in {i % n for i in (0, 2, n // 2, n - 1)}:
        with pytest.raises(AssertionError, match=r"\|diff\|"):
            check_equal_shards(world, res, world - 1, perturbed(res["ours"], key, delta, index))
    if key in ("entropy", "entropy_grad"):
        res = results[0]["unequal"]
        with pytest.raises(AssertionError, match=r"\|diff\|"):
            check_unequal_shards(world, res, 0, perturbed(res["ours"], key, delta, 1))


def test_report_measured_differences(ranks):
    """Not a check: prints the largest differences seen so far (run with -s to see them)."""
    world, _ = ranks
    print(f"\nafter tp={world}: max |diff| and max |diff| / tolerance")
    for what, (diff, ratio) in sorted(MEASURED.items()):
        print(f"  {what:50s} {diff:.3e}  {ratio:.3f}")
