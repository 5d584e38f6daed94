"""A small RLVR run on CPU, once per loss aggregation: GRPO-style group sampling, dk.policy_loss.

Task (verifiable reward, see tiny_lm.py): the prompt is ``^a+b=``; the policy writes free
"reasoning" and then ``=d`` + EOS, and the checker accepts (reward 1) when d = max(a, b). The
policy starts from a "base model" briefly fitted to noisy demonstrations (right 30% of the time,
log-normal reasoning lengths), so rollouts have long-tailed lengths (up to max_len; a truncated
response scores 0) and long responses carry many tokens whose gradient is noise: the situation
loss aggregation is about.

    python examples/train_rlvr.py                 # every aggregation x 3 seeds -> examples/runs/<time>-train_rlvr/
    python examples/train_rlvr.py --out examples/results   # to update the committed results
    python examples/train_rlvr.py --quick --out /tmp/q
    python examples/train_rlvr.py --agg delta-l --alpha 0.75 --seeds 0
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deltal_kernels as dk  # noqa: E402
from deltal_kernels.bench.runs import run_folder  # noqa: E402
from tiny_lm import make_batch, make_prompts, packed_loss_inputs, pretrain_base, reward  # noqa: E402

# results go to a git-ignored run folder unless --out says where (examples/results: the committed ones)
RUN_FOLDERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runs")

# (label, agg, alpha): the aggregations compared; Delta-L alpha=0 is Dr. GRPO exactly
RUNS = [("GRPO", "grpo", 1.0), ("DAPO", "dapo", 1.0), ("Dr. GRPO", "dr-grpo", 1.0),
        ("Delta-L a=0.5", "delta-l", 0.5), ("Delta-L a=0.75", "delta-l", 0.75), ("Delta-L a=1", "delta-l", 1.0)]


@torch.no_grad()
def eval_reward(model, prompts, answers, max_len, samples: int, seed: int) -> float:
    """The policy's success rate: mean reward of ``samples`` sampled responses per held-out prompt."""
    gen = torch.Generator().manual_seed(seed)
    responses, _ = model.sample([p for p in prompts for _ in range(samples)], max_len, gen)
    return sum(reward(r, a) for r, a in zip(responses, [a for a in answers for _ in range(samples)])) / len(responses)


def train(base, agg: str, alpha: float, seed: int, *, steps: int, prompts_per_step: int, group: int, max_len: int,
          lr: float, micro_batches: int, eval_prompts: int, eval_samples: int, log_every: int) -> dict:
    """RL from a copy of ``base``; everything random is seeded by ``seed`` alone, so the runs of
    different aggregations at one seed see the same prompts and differ only through the loss."""
    model = copy.deepcopy(base)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    data_gen = torch.Generator().manual_seed(seed)
    sample_gen = torch.Generator().manual_seed(seed + 1)
    eval_p, eval_a = make_prompts(eval_prompts, torch.Generator().manual_seed(10_000 + seed))
    hist = {"step": [], "reward": [], "grad_norm": [], "mean_len": [], "eval_step": [], "eval_acc": []}
    hist["eval_step"].append(0)
    evaluate = lambda: eval_reward(model, eval_p, eval_a, max_len, eval_samples, 20_000 + seed)  # noqa: E731
    hist["eval_acc"].append(evaluate())
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        prompts, answers = make_prompts(prompts_per_step, data_gen)
        prompts = [p for p in prompts for _ in range(group)]
        answers = [a for a in answers for _ in range(group)]
        responses, old_logps = model.sample(prompts, max_len, sample_gen)
        r = torch.tensor([reward(x, a) for x, a in zip(responses, answers)])
        adv = (r.view(-1, group) - r.view(-1, group).mean(1, keepdim=True)).view(-1)  # group baseline
        lengths = torch.tensor([len(x) for x in responses])
        # weights over the whole batch, then sliced per micro-batch (gradient accumulation)
        weights = dk.sequence_weights(lengths, agg, alpha=alpha, max_len=max_len)
        opt.zero_grad()
        for idx in torch.arange(len(prompts)).chunk(micro_batches):
            i = idx.tolist()
            tokens, targets, scored = make_batch([prompts[j] for j in i], [responses[j] for j in i])
            logits, tgt, cu = packed_loss_inputs(model(tokens), targets, scored)
            out = dk.policy_loss(logits, tgt, torch.cat([old_logps[j] for j in i]), adv[idx], cu,
                                 weights=weights[idx], max_len=max_len)
            out.loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
        opt.step()
        hist["step"].append(step)
        hist["reward"].append(float(r.mean()))
        hist["grad_norm"].append(float(gnorm))
        hist["mean_len"].append(float(lengths.float().mean()))
        if step % log_every == 0 or step == steps:
            hist["eval_step"].append(step)
            hist["eval_acc"].append(evaluate())
    hist["wall_s"] = time.perf_counter() - t0
    return hist


def summarize(hist: dict, tail: int) -> dict:
    g = torch.tensor(hist["grad_norm"])
    # a step whose groups all got one reward has zero advantage and no gradient: leave it out.
    # The gradient scale differs by aggregation (Dr. GRPO/Delta-L carry 1/M) and shrinks as the
    # reward saturates, so stability is measured scale-free and detrended: the spread of the
    # step-to-step change of log grad-norm, and the largest spike over the median.
    g = g[g > 0]
    return {"initial_acc": hist["eval_acc"][0], "final_acc": hist["eval_acc"][-1],
            "mean_train_reward": sum(hist["reward"]) / len(hist["reward"]),
            "final_reward": sum(hist["reward"][-tail:]) / len(hist["reward"][-tail:]),
            "grad_norm_log_jitter": float(g.log().diff().std()),
            "grad_norm_max_over_median": float(g.max() / g.median()),
            "final_mean_len": sum(hist["mean_len"][-tail:]) / len(hist["mean_len"][-tail:]),
            "wall_s": hist["wall_s"]}


def report(results: dict, out: str, tag: str):
    """Per aggregation, over seeds: a CSV table and a PNG of the reward, eval and grad-norm curves."""
    by_label = {}
    for run in results["runs"]:
        by_label.setdefault(run["label"], []).append(run)
    keys = ["initial_acc", "final_acc", "mean_train_reward", "final_reward", "grad_norm_log_jitter",
            "grad_norm_max_over_median", "final_mean_len", "wall_s"]
    with open(os.path.join(out, f"{tag}.csv"), "w") as f:
        f.write("aggregation,seeds," + ",".join(f"{k}_mean,{k}_std" for k in keys) + "\n")
        for label, runs in by_label.items():
            summaries = [summarize(r["history"], results["config"]["tail"]) for r in runs]
            vals = [torch.tensor([sm[k] for sm in summaries], dtype=torch.float64) for k in keys]
            f.write(f"{label},{len(runs)}," + ",".join(
                f"{float(v.mean()):.4f},{float(v.std()) if len(v) > 1 else 0.0:.4f}" for v in vals) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(13, 9))
    window = 10
    kernel = torch.ones(window) / window

    def smooth(x):  # trailing moving average
        x = torch.tensor(x, dtype=torch.float32)
        return torch.nn.functional.conv1d(x[None, None], kernel[None, None]).flatten()

    for label, runs in by_label.items():
        steps = runs[0]["history"]["step"][window - 1:]
        reward = torch.stack([smooth(r["history"]["reward"]) for r in runs])
        line, = ax[0, 0].plot(steps, reward.mean(0), label=label)
        if len(runs) > 1:
            ax[0, 0].fill_between(steps, reward.min(0).values, reward.max(0).values, color=line.get_color(), alpha=0.15)
        acc = torch.tensor([r["history"]["eval_acc"] for r in runs])
        ax[0, 1].plot(runs[0]["history"]["eval_step"], acc.mean(0), "o-", label=label, color=line.get_color())
        jitter = torch.tensor([summarize(r["history"], 1)["grad_norm_log_jitter"] for r in runs])
        k = len(ax[1, 0].patches)
        ax[1, 0].bar(k, float(jitter.mean()), yerr=float(jitter.std()) if len(runs) > 1 else 0.0,
                     color=line.get_color(), label=label)
        length = torch.stack([smooth(r["history"]["mean_len"]) for r in runs])
        ax[1, 1].plot(steps, length.mean(0), label=label, color=line.get_color())
    n = len(results["seeds"])
    ax[0, 0].set(xlabel="step", ylabel="train reward", title=f"Train reward ({window}-step mean; {n} seeds: mean, range)")
    ax[0, 1].set(xlabel="step", ylabel="eval reward", title=f"Held-out success rate (mean of {n} seeds)")
    ax[1, 0].set(xticks=[], ylabel="std of log(|g_t| / |g_t-1|)",
                 title=f"Gradient-norm jitter, step to step (mean, sd over {n} seeds; lower = steadier)")
    ax[1, 1].set(xlabel="step", ylabel="mean response length", title="Response length")
    ax[1, 0].set_ylim(0, 1.4 * max(bar.get_height() for bar in ax[1, 0].patches))  # room for the legend
    for a in ax.flat:
        a.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"{tag}.png"), dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a short run of one aggregation, for the tests")
    ap.add_argument("--agg", default=None, help="run one aggregation (default: all of RUNS)")
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--prompts-per-step", type=int, default=None,
                    help="prompts per batch (x 8 samples each); fewer gives noisier gradients")
    ap.add_argument("--out", default=None, help="output folder (default: a new run folder examples/runs/<UTC time>-"
                    "<tag>/, git-ignored; --out examples/results updates the committed results)")
    ap.add_argument("--from-json", default=None, help="only redraw the table and plot of a saved run")
    args = ap.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            results = json.load(f)
        tag = os.path.splitext(os.path.basename(args.from_json))[0]
        args.out = args.out if args.out is not None else str(run_folder(tag, root=RUN_FOLDERS))
        os.makedirs(args.out, exist_ok=True)
        report(results, args.out, tag)
        print(f"results in {args.out}")
        return results
    torch.set_num_threads(1)  # the runs are small; one thread is fastest and reproducible
    cfg = dict(steps=200, prompts_per_step=16, group=8, max_len=48, lr=3e-3, micro_batches=2,
               eval_prompts=128, eval_samples=4, log_every=20)
    base_steps = 300
    seeds = [0, 1, 2]
    runs = RUNS
    if args.quick:
        cfg.update(steps=30, log_every=30)
        base_steps = 150
        seeds = [0]
        runs = [("Delta-L a=1", "delta-l", 1.0)]
    if args.agg is not None:
        runs = [(f"{args.agg} a={args.alpha}", args.agg, args.alpha)]
    seeds = args.seeds if args.seeds is not None else seeds
    if args.steps is not None:
        cfg["steps"] = args.steps
    tag = "train_rlvr_quick" if args.quick else "train_rlvr"
    if args.prompts_per_step is not None:
        cfg["prompts_per_step"] = args.prompts_per_step
        tag += f"_p{args.prompts_per_step}"
    tail = max(1, cfg["steps"] // 10)
    args.out = args.out if args.out is not None else str(run_folder(tag, root=RUN_FOLDERS))
    os.makedirs(args.out, exist_ok=True)
    results = {"config": dict(cfg, base_steps=base_steps, tail=tail), "seeds": seeds, "runs": []}
    for seed in seeds:
        base = pretrain_base(seed, steps=base_steps, max_len=cfg["max_len"])
        for label, agg, alpha in runs:
            hist = train(base, agg, alpha, seed, **cfg)
            summary = summarize(hist, tail)
            results["runs"].append({"label": label, "agg": agg, "alpha": alpha, "seed": seed,
                                    "summary": summary, "history": hist})
            print(f"{label:16s} seed {seed}: eval reward {summary['initial_acc']:.3f} -> {summary['final_acc']:.3f} "
                  f"train reward(last {tail}) {summary['final_reward']:.3f} "
                  f"log-gnorm jitter {summary['grad_norm_log_jitter']:.3f} len {summary['final_mean_len']:.1f} "
                  f"{summary['wall_s']:.1f}s", flush=True)
    with open(os.path.join(args.out, f"{tag}.json"), "w") as f:
        json.dump(results, f)
    report(results, args.out, tag)
    print(f"results in {args.out}")
    return results


if __name__ == "__main__":
    main()
