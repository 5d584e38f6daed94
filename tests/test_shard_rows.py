"""shard_stats / shard_grad_rows (vocabulary-parallel logits) of every backend against a float64 oracle.

A row is split into 1, 2 or 3 unequal vocabulary shards. Each shard's statistics, merged in rank order by
the softmax_merge below (row_math.h's, as the parallel layer merges them), give the row's lse, logp and
entropy; each shard's gradient from the merged statistics, concatenated, is the row's gradient. The
oracle is float64 arithmetic on the whole row, written here (not the package's reference).
"""
import importlib
import math

import pytest
import torch

from cases import BACKENDS, ROUNDING, SMALLEST, backend_device
from deltal_kernels import extension
from deltal_kernels.dispatch import BACKEND_MODULES
from deltal_kernels.validation import LossParams

INF = math.inf
V = 37  # odd
# widths of the shards, in rank order: one shard, two, three with a shard of width 1 first or last
SPLITS = [(37,), (20, 17), (1, 23, 13), (13, 23, 1)]
HUGE_ROW = 12  # uniform logits of 1e30
ZERO_ROWS = (3, 5)  # g = h = 0, scored: exact zeros (their logits are made NaN for the gradient call)
K_HUGE_Z = 2.0**24 * math.log(2)  # row_math.h's kHugeZ


def backend_module(backend):
    """The backend's module and device; skips when it cannot run here or has no shard functions."""
    device = backend_device(backend)
    module = importlib.import_module(BACKEND_MODULES[backend])
    if not hasattr(module, "shard_stats"):
        pytest.skip(f"backend {backend} has no shard_stats yet")
    return module, device


def special_rows(dtype, seed=0):
    """logits [16, V], targets [16] (global ids), scored [16]: random rows and every corner case."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16, V, generator=gen, dtype=torch.float64) * 3
    targets = torch.randint(0, V, (16,), generator=gen)
    targets[:8] = torch.tensor([0, 1, 19, 20, 23, 24, 36, 12])  # on the shards' edges
    scored = torch.ones(16, dtype=torch.bool)
    scored[[2, 7]] = False
    x[8, 1:24] = -INF  # the middle shard of (1, 23, 13) is all -inf
    x[9, 20:] = -INF  # the second shard of (20, 17) is all -inf, with the target in it (logp = -inf)
    targets[9] = 30
    x[10, 17] = math.nan
    x[11, 4] = INF
    x[HUGE_ROW] = 1e30
    targets[13], targets[14], targets[15] = -1, V, 2**62  # in no shard: zt = 0 everywhere
    return x.to(dtype), targets, scored


def oracle(x, targets, tau, g=None, h=None):
    """float64 lse, logp, entropy (and the gradient given g, h) of whole rows; NaN for rows with a NaN or +inf
    logit; logp NaN for targets in no shard. Relative to the row maximum, as 1e30 needs in float64 too."""
    z = x.double() / tau
    m = z.amax(-1, keepdim=True)
    zc = z - m
    log_s = torch.log(torch.exp(zc).sum(-1, keepdim=True))
    logp_all = zc - log_s
    p = torch.exp(logp_all)
    entropy = -torch.where(p > 0, p * logp_all, 0.0).sum(-1)
    inside = (targets >= 0) & (targets < x.shape[1])
    logp = torch.where(inside, logp_all.gather(1, targets.clamp(0, x.shape[1] - 1)[:, None]).squeeze(1), math.nan)
    bad = x.isnan().any(-1) | x.isposinf().any(-1)
    nan = torch.tensor(math.nan, dtype=torch.float64)
    lse = torch.where(bad, nan, (m + log_s).squeeze(1))
    out = [lse, torch.where(bad, nan, logp), torch.where(bad, nan, entropy)]
    if g is not None:
        onehot = torch.zeros_like(z)
        onehot[inside, targets[inside]] = 1.0
        g, h = g.double()[:, None], h.double()[:, None]
        plogp = torch.where(p > 0, p * (logp_all + entropy[:, None]), 0.0)
        grad = (g * (onehot - p) - h * plogp) / tau
        out.append(torch.where(bad[:, None], nan, grad))
    return out


def softmax_merge(a, b):
    """row_math.h's softmax_merge, row-wise in the statistics' dtype: a and b are (m, s, u)."""
    swap = a[0] < b[0]
    hi = [torch.where(swap, bv, av) for av, bv in zip(a, b)]
    lo = [torch.where(swap, av, bv) for av, bv in zip(a, b)]
    d = lo[0] - hi[0]
    c = torch.exp(d)
    s = hi[1] + c * lo[1]
    u = hi[2] + c * (lo[2] + d * lo[1])
    empty = lo[0] == -INF  # nothing, or a NaN seen before any value
    s = torch.where(empty, torch.where(lo[1] == 0, hi[1], math.nan), s)
    u = torch.where(empty, hi[2], u)
    return hi[0], s, u


def shards_of(x, widths):
    starts = [sum(widths[:r]) for r in range(len(widths))]
    return [(start, x[:, start:start + w].contiguous()) for start, w in zip(starts, widths)]


def sharded_stats(module, x, targets, scored, widths, tau):
    """Every shard's shard_stats merged in rank order: m, s, u, logp (zt of the shard holding the target), and
    each shard's raw outputs."""
    parts = [module.shard_stats(xr, targets, scored, start, tau, True) for start, xr in shards_of(x, widths)]
    m, s, u = parts[0][:3]
    for part in parts[1:]:
        m, s, u = softmax_merge((m, s, u), part[:3])
    zt = torch.zeros_like(m)
    for (start, _), part, w in zip(shards_of(x, widths), parts, widths):
        zt = torch.where((targets >= start) & (targets < start + w), part[3], zt)
    return m, s, u, (zt - m) - torch.log(s), parts


def row_tolerance(x, tau):
    """cases.py's float32 bound 1e-5 + 4 ulp of the largest |z|, per row: a float32 z carries ulp(|z|)."""
    finite = torch.where(x.double().isfinite(), x.double().abs(), 0.0)
    tol = 1e-5 + 4 * 2.0**-24 * finite.amax(-1) / tau
    # the uniform row of 1e30: its z are one float32 value, so every z - m is exactly 0 (only log s and the
    # merge round)
    tol[HUGE_ROW] = 1e-5
    return tol


def bitwise_equal(a, b):
    """The same values, NaN in the same places."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def assert_rows_close(name, got, want, tol):
    """|got - want| <= tol (1 + |want|) per row; NaN exactly where want is NaN, infinities equal."""
    got = got.detach().double().cpu()
    want = want.double()
    tol = tol.reshape(tol.shape + (1,) * (want.dim() - 1))
    ok = ((got - want).abs() <= tol * (1 + want.abs())) | (got == want) | (got.isnan() & want.isnan())
    assert ok.all(), f"{name}: at {(~ok).nonzero().tolist()[:5]}: got {got[~ok][:5]}, want {want[~ok][:5]}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tau", [0.7, 1.3])
@pytest.mark.parametrize("widths", SPLITS, ids=str)
def test_merged_shards_equal_the_row(backend, dtype, tau, widths):
    module, device = backend_module(backend)
    x, targets, scored = special_rows(dtype, seed=1)
    gen = torch.Generator().manual_seed(2)
    g, h = torch.randn(16, generator=gen), torch.randn(16, generator=gen) * 0.1
    g[ZERO_ROWS[0]] = h[ZERO_ROWS[0]] = g[ZERO_ROWS[1]] = h[ZERO_ROWS[1]] = 0.0
    h[0] = 0.0  # the gradient without the entropy term
    g[~scored] = h[~scored] = 0.0
    lse_ref, logp_ref, ent_ref, grad_ref = oracle(x, targets, tau, g, h)
    tol = row_tolerance(x, tau)
    xd, td, sd = x.to(device), targets.to(device), scored.to(device)

    # (a) the merged statistics
    m, s, u, logp, parts = sharded_stats(module, xd, td, sd, widths, tau)
    for part in parts:
        assert all(t.dtype == torch.float32 and t.shape == (16,) for t in part)
        assert torch.equal(part[0].cpu()[~scored], torch.full((2,), -INF))  # unscored: {-inf, 0, 0}, zt = 0
        assert not torch.cat([t.cpu()[~scored] for t in part[1:]]).any()
        assert not part[3].cpu()[13:].any()  # targets in no shard
    log_s = torch.log(s)
    entropy = log_s - u / s
    sc = scored
    assert_rows_close("lse", (m + log_s).cpu()[sc], lse_ref[sc], tol[sc])
    assert_rows_close("logp", logp.cpu()[sc][:-3], logp_ref[sc][:-3], tol[sc][:-3])
    assert_rows_close("entropy", entropy.cpu()[sc], ent_ref[sc], tol[sc])
    assert logp[9].item() == -INF  # the target's logit is -inf
    assert math.isclose(logp[HUGE_ROW].item(), -math.log(V), rel_tol=1e-6)

    # (b) each shard's gradient from the merged statistics; the rows with g = h = 0 are not read
    poisoned = xd.clone()
    poisoned[list(ZERO_ROWS)] = math.nan
    grads = []
    for start, xr in shards_of(poisoned, widths):
        out = torch.full_like(xr, 7.0)
        module.shard_grad_rows(xr, td, start, m, log_s, entropy, g.to(device), h.to(device), tau, out)
        grads.append(out)
    grad = torch.cat(grads, 1).cpu()
    assert grad.dtype == dtype
    assert not grad[list(ZERO_ROWS)].any() and not grad[~scored].any()  # exact zeros
    assert grad[10:12].isnan().all()  # a NaN or +inf logit: the whole row NaN
    gmax = torch.where(grad_ref.isfinite(), grad_ref.abs(), 0.0).amax(-1)
    gtol = ROUNDING[dtype] + tol
    ok = ((grad.double() - grad_ref).abs() <= gtol[:, None] * grad_ref.abs() + SMALLEST[dtype]
          + tol[:, None] * gmax[:, None]) | (grad.isnan() & grad_ref.isnan())
    assert ok.all(), f"gradient at {(~ok).nonzero().tolist()[:5]}: got {grad[~ok][:5]}, want {grad_ref[~ok][:5]}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("widths", [(1, 4500, 4500), (4097, 4904)], ids=str)
def test_wide_shards(backend, dtype, widths):
    """Shards wider than a CPU chunk (2048) and than the CUDA warp-per-row limit (4096), rows of all
    sizes of logits (large ones on the huge-row paths)."""
    module, device = backend_module(backend)
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(6, 9001, generator=gen, dtype=torch.float64) * torch.tensor([3, 30, 1e3, 1e6, 1e8, 1e20],
                                                                              dtype=torch.float64)[:, None]).to(dtype)
    targets = torch.tensor([0, 4500, 4501, 4096, 4097, 9000])
    scored = torch.ones(6, dtype=torch.bool)
    g, h = torch.randn(6, generator=gen), torch.randn(6, generator=gen) * 0.1
    lse_ref, logp_ref, ent_ref, grad_ref = oracle(x, targets, 0.7, g, h)
    tol = 1e-5 + 4 * 2.0**-24 * x.double().abs().amax(-1) / 0.7
    xd, td = x.to(device), targets.to(device)
    m, s, u, logp, _ = sharded_stats(module, xd, td, scored.to(device), widths, 0.7)
    log_s = torch.log(s)
    entropy = log_s - u / s
    assert_rows_close("lse", m + log_s, lse_ref, tol)
    assert_rows_close("logp", logp, logp_ref, tol)
    assert_rows_close("entropy", entropy, ent_ref, tol)
    grad = torch.cat([_shard_grad(module, xr, td, start, m, log_s, entropy, g, h, 0.7)
                      for start, xr in shards_of(xd, widths)], 1).cpu().double()
    gmax = grad_ref.abs().amax(-1, keepdim=True)
    assert ((grad - grad_ref).abs() <= (ROUNDING[dtype] + tol[:, None]) * grad_ref.abs() + SMALLEST[dtype]
            + tol[:, None] * gmax).all()


def _shard_grad(module, xr, targets, start, m, log_s, entropy, g, h, tau):
    out = torch.empty_like(xr)
    device = xr.device
    module.shard_grad_rows(xr, targets, start, m, log_s, entropy, g.to(device), h.to(device), tau, out)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_need_entropy_false_and_in_place(backend):
    module, device = backend_module(backend)
    x, targets, scored = special_rows(torch.float32, seed=4)
    xd, td, sd = x.to(device), targets.to(device), scored.to(device)
    with_u = module.shard_stats(xd, td, sd, 20, 0.7, True)
    without = module.shard_stats(xd, td, sd, 20, 0.7, False)
    assert not without[2].any()
    for a, b in zip(with_u[:2] + with_u[3:], without[:2] + without[3:]):
        assert bitwise_equal(a, b)
    # out = logits: the same bits as a separate out
    m, s, u, _, _ = sharded_stats(module, xd, td, sd, (20, 17), 0.7)
    log_s, gen = torch.log(s), torch.Generator().manual_seed(5)
    entropy = log_s - u / s
    g, h = torch.randn(16, generator=gen).to(device), torch.randn(16, generator=gen).to(device)
    xr = xd[:, 20:].contiguous()
    separate = _shard_grad(module, xr, td, 20, m, log_s, entropy, g, h, 0.7)
    module.shard_grad_rows(xr, td, 20, m, log_s, entropy, g, h, 0.7, xr)
    assert bitwise_equal(xr, separate)


def test_torch_float64():
    """float64 logits on the torch backend: float64 statistics, held to float64 bounds."""
    module, _ = backend_module("torch")
    x, targets, scored = special_rows(torch.float64, seed=6)
    m, s, u, logp, parts = sharded_stats(module, x, targets, scored, (13, 23, 1), 1.3)
    assert all(t.dtype == torch.float64 for part in parts for t in part)
    lse_ref, logp_ref, ent_ref = oracle(x, targets, 1.3)
    tol = torch.full((16,), 1e-12)
    assert_rows_close("lse", (m + torch.log(s))[scored], lse_ref[scored], tol[scored])
    assert_rows_close("logp", logp[scored][:-3], logp_ref[scored][:-3], tol[scored][:-3])
    assert_rows_close("entropy", (torch.log(s) - u / s)[scored], ent_ref[scored], tol[scored])


# ---- (c) one shard (vocab_start 0, V_r = V) against forward_rows and grad_rows ----------------------
#
# What is bitwise equal and what is not:
# - torch: the merged lse = m + log s and logp = (zt - m) - log s are forward_rows' own operations on the
#   same tensors: bitwise. The entropy is not (forward_rows: log s - sum p (z - m); here log s - u / s).
#   The gradient is not (grad_rows: log p = z - lse; shard_grad_rows: (z - m) - log s).
# - cpu: m, s, u are forward_rows' statistics (the same per-row function), but its lse and logp take C's
#   logf of s and this test torch.log: within float32 rounding, not asserted bitwise. shard_grad_rows runs
#   grad_rows' kernel with lse = m + log s: bitwise equal on the rows (not of huge logits) where that lse
#   equals forward_rows' bitwise.
# - cuda: forward_rows reduces in log2 units (lse = (mk + log2 s) ln 2), shard_stats returns m = mk ln 2:
#   within float32 rounding; the gradient as on the cpu (grad_kernel's row code), bitwise where the lse agree.
# - every backend: the exact zeros of rows with g = h = 0 and NaN exactly on the rows of a NaN or +inf logit.

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_one_shard_equals_forward_rows_and_grad_rows(backend, dtype):
    module, device = backend_module(backend)
    x, targets, scored = special_rows(dtype, seed=7)
    targets = targets.clamp(0, V - 1)  # forward_rows' targets are in the row
    xd, td, sd = x.to(device), targets.to(device), scored.to(device)
    tau = 0.7
    zeros = torch.zeros(16, device=device)
    fwd = module.forward_rows(xd, td, sd, zeros, None, zeros, LossParams(0.2, 0.2, 0.0, 0.0, 0, 0.0, tau), True)
    logp_f, ent_f, lse_f = (t.cpu() for t in fwd[:3])
    m, s, u, zt = module.shard_stats(xd, td, sd, 0, tau, True)
    log_s = torch.log(s)
    lse, logp, entropy = (m + log_s).cpu(), ((zt - m) - log_s).cpu(), (log_s - u / s).cpu()
    tol = row_tolerance(x, tau)
    sc = scored
    if backend == "torch":
        assert bitwise_equal(lse[sc], lse_f[sc]) and bitwise_equal(logp[sc], logp_f[sc])
    assert_rows_close("lse", lse[sc], lse_f[sc], tol[sc])
    assert_rows_close("logp", logp[sc], logp_f[sc], tol[sc])
    assert_rows_close("entropy", entropy[sc], ent_f[sc], tol[sc])

    gen = torch.Generator().manual_seed(8)
    g, h = torch.randn(16, generator=gen), torch.randn(16, generator=gen) * 0.1
    g[list(ZERO_ROWS)] = h[list(ZERO_ROWS)] = 0.0
    g[~sc] = h[~sc] = 0.0
    ent_d = fwd[1]  # the same entropy for both: only log p differs
    shard = _shard_grad(module, xd, td, 0, m, log_s, ent_d, g, h, tau).cpu()
    whole = torch.empty_like(xd)
    module.grad_rows(xd, td, fwd[2], ent_d, g.to(device), h.to(device), tau, whole)
    whole = whole.cpu()
    zero_rows = list(ZERO_ROWS) + (~sc).nonzero().squeeze(1).tolist()
    assert not shard[zero_rows].any() and not whole[zero_rows].any()
    assert torch.equal(shard.isnan(), whole.isnan())
    assert shard[10:12].isnan().all()
    if backend in ("cpu", "cuda"):
        same = ((m + log_s).cpu() == lse_f) & (lse_f.abs() < K_HUGE_Z)
        assert torch.equal(shard[same], whole[same])
    finite = shard.isfinite() & whole.isfinite()
    gmax = torch.where(finite, whole.double().abs(), 0.0).amax(-1, keepdim=True)
    err = (shard.double() - whole.double()).abs()
    bound = (ROUNDING[dtype] + tol[:, None]) * whole.double().abs() + SMALLEST[dtype] + tol[:, None] * gmax
    assert (err[finite] <= bound[finite]).all()


# ---- (d) thread-count independence -----------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("N, Vr", [(1, 40000), (24, 3001)])
def test_thread_count_independent(backend, N, Vr):
    """One row per thread: the bits do not depend on the thread count (a lone long row included: torch
    would otherwise split its sum across threads)."""
    module, device = backend_module(backend)
    gen = torch.Generator().manual_seed(9)
    x = (torch.randn(N, Vr, generator=gen) * 4).to(torch.bfloat16)
    targets = torch.randint(0, Vr + 2000, (N,), generator=gen)  # some in no shard
    scored = torch.ones(N, dtype=torch.bool)
    g, h = torch.randn(N, generator=gen), torch.randn(N, generator=gen)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            m, s, u, zt = module.shard_stats(x, targets, scored, 1000, 0.7, True)
            log_s = torch.log(s)
            out = _shard_grad(module, x, targets, 1000, m, log_s, log_s - u / s, g, h, 0.7)
            results.append((m, s, u, zt, out))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))


# ---- (e) the compiled ops' argument checks ----------------------------------------------------------

needs_extension = pytest.mark.skipif(extension._C is None,
                                     reason=f"compiled extension not built: {extension.unavailable_reason('cpu')}")


def ops():
    return torch.ops.deltal_kernels_ext


def _stats_args(N=4, Vr=10):
    return [torch.randn(N, Vr), torch.arange(N) * 3, torch.ones(N, dtype=torch.bool), 5, 1.0, True]


def _grad_args(N=4, Vr=10):
    f = torch.zeros(N)
    return [torch.randn(N, Vr), torch.arange(N) * 3, 5, f, f, f, torch.ones(N), f, 1.0, torch.empty(N, Vr)]


@needs_extension
@pytest.mark.parametrize("index, bad, error, match", [
    (0, lambda a: a[0][0], ValueError, "logits: expected a 2-D"),
    (0, lambda a: a[0].double(), TypeError, "logits: expected float32"),
    (0, lambda a: a[0].t().contiguous().t(), ValueError, "logits: expected a contiguous"),
    (1, lambda a: a[1][:3], ValueError, r"targets: expected shape \[N\]"),
    (1, lambda a: a[1].int(), TypeError, "targets: expected dtype Long"),
    (2, lambda a: a[2].float(), TypeError, "scored: expected dtype Bool"),
    (3, lambda a: -1, ValueError, "vocab_start: expected an integer >= 0"),
    (4, lambda a: 0.0, ValueError, "temperature"),
])
def test_shard_stats_op_rejects_bad_arguments(index, bad, error, match):
    args = _stats_args()
    args[index] = bad(args)
    with pytest.raises(error, match=match):
        ops().shard_stats(*args)


@needs_extension
@pytest.mark.parametrize("index, bad, error, match", [
    (0, lambda a: a[0].half(), TypeError, "out: expected dtype"),
    (1, lambda a: a[1].float(), TypeError, "targets: expected dtype Long"),
    (2, lambda a: -3, ValueError, "vocab_start: expected an integer >= 0"),
    (3, lambda a: a[3].double(), TypeError, "m: expected dtype Float"),
    (4, lambda a: torch.zeros(5), ValueError, r"log_s: expected shape \[N\]"),
    (5, lambda a: torch.zeros(4, dtype=torch.bfloat16), TypeError, "entropy: expected dtype Float"),
    (6, lambda a: torch.ones(4, 1), ValueError, r"g: expected shape \[N\]"),
    (7, lambda a: torch.zeros(4, dtype=torch.int64), TypeError, "h: expected dtype Float"),
    (8, lambda a: -1.0, ValueError, "temperature"),
    (9, lambda a: torch.empty(4, 11), ValueError, "out: expected shape"),
    (9, lambda a: torch.empty(10, 4).t(), ValueError, "out: expected a contiguous"),
])
def test_shard_grad_op_rejects_bad_arguments(index, bad, error, match):
    args = _grad_args()
    args[index] = bad(args)
    with pytest.raises(error, match=match):
        ops().shard_grad_rows(*args)


@needs_extension
def test_shard_grad_out_partially_overlapping_logits_is_rejected():
    args = _grad_args()
    base = torch.randn(50)
    args[0], args[9] = base[:40].view(4, 10), base[5:45].view(4, 10)
    with pytest.raises(ValueError, match="out: must be the logits themselves or not overlap them"):
        ops().shard_grad_rows(*args)


@needs_extension
def test_shard_ops_reject_another_device():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (a second device type) for the cross-device check")
    args = _stats_args()
    args[1] = args[1].cuda()
    with pytest.raises(ValueError, match="targets: expected a tensor on cpu"):
        ops().shard_stats(*args)
    args = _grad_args()
    args[3] = args[3].cuda()
    with pytest.raises(ValueError, match="m: expected a tensor on cpu"):
        ops().shard_grad_rows(*args)


@needs_extension
def test_shard_ops_meta_opcheck_and_empty():
    meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in _stats_args()]
    out = ops().shard_stats(*meta)
    assert [(t.shape, t.dtype, t.device.type) for t in out] == [((4,), torch.float32, "meta")] * 4
    ops().shard_grad_rows(*[a.to("meta") if isinstance(a, torch.Tensor) else a for a in _grad_args()])
    torch.library.opcheck(ops().shard_stats.default, tuple(_stats_args()),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(ops().shard_grad_rows.default, tuple(_grad_args()),
                          test_utils=("test_schema", "test_faketensor"))
    empty = ops().shard_stats(*_stats_args(N=0))
    assert all(t.shape == (0,) for t in empty)
    ops().shard_grad_rows(*_grad_args(N=0))
