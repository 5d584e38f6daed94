"""Bias and variance of the aggregated policy gradient, per loss aggregation (Delta-L paper, sec. 3).

Two parts, both written to a new run folder examples/runs/<UTC time>-<tag>/ (git-ignored), or to --out
(--out examples/results updates the committed results):

1. The paper's model, synthetic. Sequence i's gradient is g_i = g + (sum of L_i independent
   per-token noise terms), so E[g_i] = g and Var(g_i) = sigma^2 L_i. An estimator sum_i x_i g_i is
   unbiased when sum_i x_i = 1 and its variance is sigma^2 sum_i x_i^2 L_i, least at x_i ∝ 1/L_i with
   the value sigma^2 / sum_j (1/L_j): Delta-L at alpha = 1 (whose weights are x_i / M).

2. A real policy: the tiny GRU "base model" of train_rlvr.py on its verifiable task, rollouts of
   groups of 8 with long-tailed lengths. Per-sequence parameter gradients g_i come from
   dk.policy_loss (unnormalised: weights 1) pulled back through the model with torch.func; any
   aggregation's batch gradient is then sum_i w_i g_i with w = dk.sequence_weights (checked
   against a direct dk.policy_loss(agg=...) backward). Over many batches resampled from the pool
   we measure the mean and covariance of that gradient, against g* = the pool's mean g_i.

    python examples/variance_study.py            # full run, a few minutes
    python examples/variance_study.py --quick --out /tmp/q
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
from torch.func import functional_call, grad, vmap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deltal_kernels as dk  # noqa: E402
from deltal_kernels.bench.runs import run_folder  # noqa: E402
from tiny_lm import make_batch, make_prompts, packed_loss_inputs, pretrain_base, reward  # noqa: E402

# results go to a git-ignored run folder unless --out says where (examples/results: the committed ones)
RUN_FOLDERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runs")

# (label, agg, alpha)
AGGS = [("GRPO", "grpo", 1.0), ("DAPO", "dapo", 1.0), ("Dr. GRPO", "dr-grpo", 1.0),
        ("Delta-L a=0", "delta-l", 0.0), ("Delta-L a=0.5", "delta-l", 0.5),
        ("Delta-L a=0.75", "delta-l", 0.75), ("Delta-L a=1", "delta-l", 1.0)]
DELTA_L_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


# ---------------------------------------------------------------- part 1: the paper's model

def unbiased_x(lengths: torch.Tensor, agg: str, alpha: float, max_len: int) -> torch.Tensor:
    """The package's weights rescaled to sum 1 (x_i = w_i / sum_j w_j), float64.

    For Delta-L and Dr. GRPO the sum is exactly 1/M; for GRPO and DAPO it depends on the batch's
    lengths, the "unknown constant" that makes them biased when lengths vary between batches."""
    w = dk.sequence_weights(lengths, agg, alpha=alpha, max_len=max_len, dtype=torch.float64)
    return w / w.sum()


def closed_form_var(x: torch.Tensor, lengths: torch.Tensor) -> float:
    """Var(sum_i x_i g_i) / sigma^2 per dimension, for independent g_i with Var(g_i) = sigma^2 L_i."""
    return float((x.pow(2) * lengths.to(torch.float64)).sum())


def synthetic(*, batch: int, max_len: int, dims: int, draws: int, random_weightings: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    # long-tailed lengths in the paper's units: log-normal, median 400 tokens, capped at M = 3072
    lengths = torch.empty(batch).log_normal_(math.log(400.0), 0.8, generator=gen).round().clamp(1, max_len).long()
    optimum = 1.0 / float((1.0 / lengths.double()).sum())
    g_true = torch.randn(dims, generator=gen, dtype=torch.float64)
    # sum of L_i independent N(0, 1) per-token terms per dimension: exactly sqrt(L_i) * N(0, 1)
    noise = torch.randn(draws, batch, dims, generator=gen, dtype=torch.float64) * lengths.double().sqrt()[:, None]
    g = g_true + noise  # [draws, batch, dims]

    rows = []
    weightings = [(f"Delta-L a={a}", "delta-l", a) for a in DELTA_L_ALPHAS]
    weightings += [("Dr. GRPO", "dr-grpo", 1.0), ("GRPO (rescaled)", "grpo", 1.0), ("DAPO (rescaled)", "dapo", 1.0)]
    for label, agg, alpha in weightings:
        x = unbiased_x(lengths, agg, alpha, max_len)
        est = torch.einsum("i,niD->nD", x, g)
        mc_var = float(est.var(0).mean())  # per dimension, over the draws
        rows.append({"weighting": label, "closed_form_var": closed_form_var(x, lengths), "mc_var": mc_var,
                     # the MC estimate's standard error: var of a chi^2 average over draws x dims
                     "mc_se": mc_var * math.sqrt(2.0 / ((draws - 1) * dims)),
                     "mc_bias": float((est.mean(0) - g_true).norm() / g_true.norm())})
    # other unbiased weightings: random points of the simplex, and small moves away from 1/L
    inv = 1.0 / lengths.double()
    x_opt = inv / inv.sum()
    others = torch.empty(random_weightings, batch, dtype=torch.float64).exponential_(generator=gen)
    others = others / others.sum(1, keepdim=True)  # uniform on the simplex (Dirichlet(1, ..., 1))
    moves = torch.randn(random_weightings, batch, generator=gen, dtype=torch.float64) * x_opt * 0.1
    others = torch.cat([others, x_opt + moves - moves.mean(1, keepdim=True)])  # still sum to 1
    other_vars = (others.pow(2) * lengths.double()).sum(1)
    alpha_grid = torch.linspace(0, 1, 41).tolist()
    return {"lengths": lengths.tolist(), "max_len": max_len, "closed_form_optimum": optimum, "rows": rows,
            "min_other_unbiased_var": float(other_vars.min()), "num_other_unbiased": int(others.shape[0]),
            "alpha_grid": alpha_grid,
            "alpha_grid_var": [closed_form_var(unbiased_x(lengths, "delta-l", a, max_len), lengths)
                               for a in alpha_grid]}


# ---------------------------------------------------------------- part 2: a real policy

def rollouts(model, groups: int, group: int, max_len: int, seed: int) -> dict:
    """``groups`` prompts x ``group`` sampled responses, rewards, group-centred advantages."""
    gen = torch.Generator().manual_seed(seed)
    prompts, answers = make_prompts(groups, gen)
    prompts = [p for p in prompts for _ in range(group)]
    answers = [a for a in answers for _ in range(group)]
    responses, old_logps = model.sample(prompts, max_len, gen)
    r = torch.tensor([reward(x, a) for x, a in zip(responses, answers)])
    adv = (r.view(-1, group) - r.view(-1, group).mean(1, keepdim=True)).view(-1)
    return {"prompts": prompts, "responses": responses, "old_logps": old_logps, "reward": r, "adv": adv,
            "lengths": torch.tensor([len(x) for x in responses])}


def per_sequence_grads(model, data: dict, idx: torch.Tensor, adv: torch.Tensor, max_len: int) -> torch.Tensor:
    """[len(idx), D] flattened parameter gradients of each sequence's unnormalised loss sum_t l_t."""
    i = idx.tolist()
    tokens, targets, scored = make_batch([data["prompts"][j] for j in i], [data["responses"][j] for j in i])
    logits = model(tokens).detach().requires_grad_()
    lp, tg, cu = packed_loss_inputs(logits, targets, scored)
    out = dk.policy_loss(lp, tg, torch.cat([data["old_logps"][j] for j in i]), adv[idx], cu,
                         weights=torch.ones(len(i)), max_len=max_len)
    (dlogits,) = torch.autograd.grad(out.loss, logits)  # row t of sequence b only feeds sequence b
    params = {k: v.detach() for k, v in model.named_parameters()}

    def pullback(p, tok, dl):  # <dlogits_b, logits_b(p)>: its gradient is sequence b's gradient
        return (functional_call(model, p, (tok[None],))[0] * dl).sum()

    grads = vmap(grad(pullback), in_dims=(None, 0, 0))(params, tokens, dlogits)
    return torch.cat([grads[k].reshape(len(i), -1) for k, _ in model.named_parameters()], 1)


def all_grads(model, data, adv, max_len, chunk=64) -> torch.Tensor:
    n = len(data["responses"])
    return torch.cat([per_sequence_grads(model, data, c, adv, max_len) for c in torch.arange(n).split(chunk)])


def direct_grad(model, data, idx, agg, alpha, max_len) -> torch.Tensor:
    """The batch gradient the way a trainer gets it: dk.policy_loss(agg=...) and backward."""
    i = idx.tolist()
    tokens, targets, scored = make_batch([data["prompts"][j] for j in i], [data["responses"][j] for j in i])
    lp, tg, cu = packed_loss_inputs(model(tokens), targets, scored)
    out = dk.policy_loss(lp, tg, torch.cat([data["old_logps"][j] for j in i]), data["adv"][idx], cu,
                         agg=agg, alpha=alpha, max_len=max_len)
    model.zero_grad()
    out.loss.backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def batch_stats(G: torch.Tensor, lengths: torch.Tensor, group: int, groups_per_batch: int, batches: int,
                max_len: int, seed: int) -> list:
    """Mean, bias and covariance trace of sum_i w_i g_i over batches of whole groups drawn from the pool."""
    gen = torch.Generator().manual_seed(seed)
    n_groups = G.shape[0] // group
    pick = torch.stack([torch.randperm(n_groups, generator=gen)[:groups_per_batch] for _ in range(batches)])
    idx = (pick[:, :, None] * group + torch.arange(group)).reshape(batches, -1)  # [B, n] sequences
    g_star = G.double().mean(0)  # the expected unnormalised per-sequence gradient
    rows = []
    for label, agg, alpha in AGGS:
        W = torch.stack([dk.sequence_weights(lengths[b], agg, alpha=alpha, max_len=max_len) for b in idx])
        c = float(W.double().sum(1).mean())  # E[sum_i w_i]: the estimator's constant if g_i ⟂ L_i
        target = c * g_star
        total = torch.zeros_like(g_star)
        sq = 0.0
        for b in range(batches):
            est = (W[b] @ G[idx[b]]).double()
            total += est
            sq += float((est - target).pow(2).sum())
        mean = total / batches
        # E||est - target||^2 = tr Cov + ||mean - target||^2, unbiased for tr Cov with B/(B-1)
        tr_cov = (sq / batches - float((mean - target).pow(2).sum())) * batches / (batches - 1)
        scale = float(target.norm())
        rows.append({"aggregation": label, "agg": agg, "alpha": alpha, "constant": c,
                     "known_constant": 1.0 / max_len if dk.aggregation.canonical_agg(agg) in
                     ("delta-l", "seq-mean-token-sum-norm") else None,
                     "rel_bias": float((mean - target).norm()) / scale,
                     "rel_bias_noise_floor": math.sqrt(tr_cov / batches) / scale,
                     # per-batch mean squared error in units of ||c g*||^2; the Monte Carlo part of
                     # the measured bias (its noise floor) taken out
                     "rel_mse": max(float((mean - target).pow(2).sum()) - tr_cov / batches, 0.0) / scale ** 2
                     + tr_cov / scale ** 2,
                     "cos_to_g_star": float(mean @ g_star / (mean.norm() * g_star.norm())),
                     "total_var": tr_cov, "rel_var": tr_cov / scale ** 2,
                     "cv": math.sqrt(tr_cov) / float(mean.norm()),
                     "scale_cv": float(W.double().sum(1).std() / W.double().sum(1).mean())})
    return rows


def length_scaling(G: torch.Tensor, lengths: torch.Tensor, bins: int) -> dict:
    """Per length bin: the variance of g_i (the paper assumes it grows like L: slope 1 on log-log)
    and the mean of g_i along g* (the paper's unbiasedness needs E[g_i | L_i] = g*: 1 in every bin)."""
    L = lengths.double()
    g_star = G.double().mean(0)
    edges = torch.quantile(L, torch.linspace(0, 1, bins + 1, dtype=torch.float64))
    out = {"L": [], "var": [], "mean_along_g_star": [], "count": []}
    for k in range(bins):
        sel = (L >= edges[k]) & ((L < edges[k + 1]) if k < bins - 1 else (L <= edges[k + 1]))
        if int(sel.sum()) < 8:
            continue
        g = G[sel].double()
        out["L"].append(float(L[sel].mean()))
        out["var"].append(float((g - g.mean(0)).pow(2).sum(1).mean()) * len(g) / (len(g) - 1))
        out["mean_along_g_star"].append(float(g.mean(0) @ g_star / (g_star @ g_star)))
        out["count"].append(int(sel.sum()))
    x, y = torch.tensor(out["L"]).log(), torch.tensor(out["var"]).log()
    out["slope"] = float(((x - x.mean()) * (y - y.mean())).sum() / (x - x.mean()).pow(2).sum())
    return out


def real_model(*, base_steps, pool_groups, group, groups_per_batch, batches, max_len, seed, bins) -> dict:
    model = pretrain_base(seed, steps=base_steps, max_len=max_len)
    data = rollouts(model, pool_groups, group, max_len, seed + 100)
    G = all_grads(model, data, data["adv"], max_len)
    # the score function sum_t grad log pi(y_t), advantage-free: do per-token terms add up independently?
    score = all_grads(model, data, -torch.ones(len(data["responses"])), max_len)
    L, r = data["lengths"], data["reward"]
    # the decomposition measures what a trainer gets: compare with a direct backward, one batch
    idx = torch.arange(groups_per_batch * group)
    check = {}
    for label, agg, alpha in AGGS:
        direct = direct_grad(model, data, idx, agg, alpha, max_len)
        w = dk.sequence_weights(L[idx], agg, alpha=alpha, max_len=max_len)
        check[label] = float((w @ G[idx] - direct).norm() / direct.norm())
    mean_len = L.double().mean()
    return {
        "params": G.shape[1], "pool_sequences": G.shape[0], "max_len": max_len,
        "lengths": L.tolist(), "reward_mean": float(r.mean()),
        "corr_length_reward": float(torch.corrcoef(torch.stack([L.double(), r.double()]))[0, 1]),
        "corr_length_abs_adv": float(torch.corrcoef(torch.stack([L.double(), data["adv"].abs().double()]))[0, 1]),
        "length_quantiles": {q: float(L.double().quantile(q)) for q in (0.1, 0.5, 0.9, 0.99)},
        "mean_len": float(mean_len),
        "decomposition_rel_err": check,
        "rows": batch_stats(G, L, group, groups_per_batch, batches, max_len, seed + 200),
        "grad_scaling": length_scaling(G, L, bins),
        "score_scaling": length_scaling(score, L, bins),
    }


# ---------------------------------------------------------------- outputs

def write_tables(res: dict, out: str, tag: str):
    syn, real = res["synthetic"], res["real"]
    with open(os.path.join(out, f"{tag}_synthetic.csv"), "w") as f:
        f.write("weighting,closed_form_var_over_sigma2,mc_var,mc_se,ratio_to_optimum\n")
        for r in syn["rows"]:
            f.write(f"{r['weighting']},{r['closed_form_var']:.6g},{r['mc_var']:.6g},{r['mc_se']:.3g},"
                    f"{r['closed_form_var'] / syn['closed_form_optimum']:.4f}\n")
    with open(os.path.join(out, f"{tag}_real.csv"), "w") as f:
        f.write("aggregation,constant,rel_bias,rel_bias_noise_floor,cos_to_g_star,total_var,rel_var,cv,rel_mse\n")
        for r in real["rows"]:
            f.write(f"{r['aggregation']},{r['constant']:.6g},{r['rel_bias']:.4f},{r['rel_bias_noise_floor']:.4f},"
                    f"{r['cos_to_g_star']:.4f},{r['total_var']:.6g},{r['rel_var']:.4f},{r['cv']:.4f},"
                    f"{r['rel_mse']:.4f}\n")


def plot(res: dict, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    syn, real = res["synthetic"], res["real"]
    fig, ax = plt.subplots(2, 3, figsize=(17, 9))
    a = ax[0, 0]
    opt = syn["closed_form_optimum"]
    a.plot(syn["alpha_grid"], [v / opt for v in syn["alpha_grid_var"]], label="Delta-L, closed form")
    mc = [r for r in syn["rows"] if r["weighting"].startswith("Delta-L")]
    a.errorbar([float(r["weighting"].split("=")[1]) for r in mc], [r["mc_var"] / opt for r in mc],
               yerr=[2 * r["mc_se"] / opt for r in mc], fmt="o", label="Delta-L, Monte Carlo (±2 se)")
    a.axhline(1.0, ls="--", c="k", label="1 / sum_j (1/L_j)")
    a.axhline(syn["min_other_unbiased_var"] / opt, ls=":", c="gray",
              label=f"best of {syn['num_other_unbiased']} other unbiased weightings")
    a.set(xlabel="alpha", ylabel="Var / optimum", yscale="log",
          title="Paper's model (Var(g_i) ∝ L_i): variance of unbiased weightings")
    a.legend(fontsize=8)

    a = ax[0, 1]
    rows = real["rows"]
    names = [r["aggregation"] for r in rows]
    pos = torch.arange(len(rows)).float()
    a.bar(pos - 0.2, [r["cv"] for r in rows], 0.4, label="coefficient of variation")
    a.bar(pos + 0.2, [r["rel_bias"] for r in rows], 0.4, label="relative bias (vs constant x g*)")
    a.set_xticks(pos.tolist(), names, rotation=30, ha="right", fontsize=8)
    a.set(title=f"Tiny GRU policy: batch gradient over {res['config']['batches']} batches",
          ylim=(0, 1.3 * max(r["cv"] for r in rows)))
    a.legend(fontsize=8, loc="upper left")

    a = ax[1, 0]
    for key, label in (("grad_scaling", "policy gradient g_i (within-bin var)"),
                       ("score_scaling", "score sum_t ∇log π (within-bin var)")):
        s = real[key]
        a.loglog(s["L"], s["var"], "o-", label=f"{label}: slope {s['slope']:.2f}")
    s = real["grad_scaling"]
    a.loglog(s["L"], [s["var"][0] * L / s["L"][0] for L in s["L"]], "k--", label="slope 1 (paper's assumption)")
    a.set(xlabel="response length L", ylabel="E||g - E[g | L]||^2", title="Does Var(g_i) grow like L_i?")
    a.legend(fontsize=8)

    a = ax[1, 1]
    s = real["grad_scaling"]
    a.semilogx(s["L"], s["mean_along_g_star"], "o-", label="measured")
    a.axhline(1.0, ls="--", c="k", label="paper's model: E[g_i | L_i] = g*")
    a.set(xlabel="response length L", ylabel="<E[g | L], g*> / ||g*||^2",
          title="Mean gradient of a length-L rollout, along g*")
    a.legend(fontsize=8)

    a = ax[0, 2]
    a.bar(pos, [r["rel_var"] for r in rows], 0.6, label="total variance / ||c g*||^2")
    a.plot(pos, [r["rel_mse"] for r in rows], "kD", label="MSE / ||c g*||^2 (variance + bias^2)")
    a.set_xticks(pos.tolist(), names, rotation=30, ha="right", fontsize=8)
    a.set(title="Tiny GRU policy: variance and MSE per batch, scale-free",
          ylim=(0, 1.3 * max(r["rel_mse"] for r in rows)))
    a.legend(fontsize=8, loc="upper left")

    a = ax[1, 2]
    a.hist(real["lengths"], bins=range(1, real["max_len"] + 2), color="tab:gray")
    a.set(xlabel="response length (tokens)", ylabel="count",
          title=f"Rollout lengths (M = {real['max_len']}), corr(L, reward) = {real['corr_length_reward']:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, for the tests")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="output folder (default: a new run folder examples/runs/<UTC time>-"
                    "<tag>/, git-ignored; --out examples/results updates the committed results)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # reproducible reductions, and the machine is shared
    syn_cfg = dict(batch=64, max_len=3072, dims=64, draws=4000, random_weightings=2000)
    real_cfg = dict(base_steps=300, pool_groups=384, group=8, groups_per_batch=16, batches=3000, max_len=48, bins=8)
    if args.quick:
        syn_cfg.update(draws=1000, random_weightings=500)
        real_cfg.update(base_steps=150, pool_groups=64, groups_per_batch=8, batches=300, bins=5)
    t0 = time.perf_counter()
    res = {"config": dict(real_cfg, synthetic=syn_cfg, seed=args.seed),
           "synthetic": synthetic(seed=args.seed, **syn_cfg)}
    res["real"] = real_model(seed=args.seed, **real_cfg)
    res["wall_s"] = time.perf_counter() - t0
    tag = ("variance_study_quick" if args.quick else "variance_study") + (f"_seed{args.seed}" if args.seed else "")
    args.out = args.out if args.out is not None else str(run_folder(tag, root=RUN_FOLDERS))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{tag}.json"), "w") as f:
        json.dump(res, f)
    write_tables(res, args.out, tag)
    plot(res, os.path.join(args.out, f"{tag}.png"))
    syn = res["synthetic"]
    print(f"synthetic: closed-form optimum 1/sum(1/L) = {syn['closed_form_optimum']:.4g} (x sigma^2)")
    for r in syn["rows"]:
        print(f"  {r['weighting']:16s} closed form {r['closed_form_var']:.4g}  MC {r['mc_var']:.4g} ± {r['mc_se']:.2g}"
              f"  ratio {r['closed_form_var'] / syn['closed_form_optimum']:.3f}")
    real = res["real"]
    print(f"real: {real['pool_sequences']} rollouts, {real['params']} params, lengths {real['length_quantiles']}, "
          f"corr(L, reward) {real['corr_length_reward']:.3f}, Var(g|L) slope {real['grad_scaling']['slope']:.2f}, "
          f"score slope {real['score_scaling']['slope']:.2f}")
    for r in real["rows"]:
        print(f"  {r['aggregation']:16s} bias {r['rel_bias']:.4f} (floor {r['rel_bias_noise_floor']:.4f})  "
              f"rel var {r['rel_var']:.3f}  CV {r['cv']:.3f}  cos {r['cos_to_g_star']:.3f}")
    print(f"decomposition vs direct backward, max rel err {max(real['decomposition_rel_err'].values()):.2e}; "
          f"{res['wall_s']:.1f}s")
    print(f"results in {args.out}")
    return res


if __name__ == "__main__":
    main()
