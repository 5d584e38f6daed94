"""The Delta-L paper's claims as reproduced by examples/variance_study.py and examples/train_rlvr.py.

Runs both scripts' --quick modes (as a user would, in a subprocess) and checks what must hold:
the paper's closed form, the package's weights inside it, and that the training loop learns.
Expected values are computed here from the paper's formulas, not taken from the scripts.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import deltal_kernels as dk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def run_quick(script, out):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, os.path.join(EXAMPLES, script), "--quick", "--out", str(out)],
                   check=True, env=env, cwd=ROOT, capture_output=True, timeout=600)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("variance")
    run_quick("variance_study.py", out)
    with open(out / "variance_study_quick.json") as f:
        res = json.load(f)
    for name in ("variance_study_quick.png", "variance_study_quick_synthetic.csv", "variance_study_quick_real.csv"):
        assert (out / name).stat().st_size > 0
    return res


def paper_x(lengths, alpha):
    """Delta-L's normalised weights from the paper: x_i = L_i^-alpha / sum_j L_j^-alpha."""
    p = [L ** -alpha for L in lengths]
    return [v / sum(p) for v in p]


def test_synthetic_alpha1_reaches_closed_form_optimum(study):
    syn = study["synthetic"]
    L = syn["lengths"]
    optimum = 1.0 / sum(1.0 / v for v in L)
    assert syn["closed_form_optimum"] == pytest.approx(optimum, rel=1e-12)
    rows = {r["weighting"]: r for r in syn["rows"]}
    for alpha in (0.0, 0.25, 0.5, 0.75, 1.0):
        expect = sum(x * x * l for x, l in zip(paper_x(L, alpha), L))
        assert rows[f"Delta-L a={alpha}"]["closed_form_var"] == pytest.approx(expect, rel=1e-9)
    assert rows["Delta-L a=1.0"]["closed_form_var"] == pytest.approx(optimum, rel=1e-9)
    # Dr. GRPO is Delta-L at alpha = 0: equal weights 1/G
    assert rows["Dr. GRPO"]["closed_form_var"] == pytest.approx(sum(L) / len(L) ** 2, rel=1e-9)
    # no other unbiased weighting does better
    assert min(syn["alpha_grid_var"]) >= optimum * (1 - 1e-12)
    assert syn["min_other_unbiased_var"] > optimum
    # the lengths are long-tailed, so the optimum is well below equal weighting
    assert rows["Dr. GRPO"]["closed_form_var"] > 1.5 * optimum


def test_synthetic_monte_carlo_matches_closed_form(study):
    syn, cfg = study["synthetic"], study["config"]["synthetic"]
    for r in syn["rows"]:
        # the per-dimension sample variance over `draws` normal draws has relative sd sqrt(2/(draws-1)),
        # averaged over `dims` independent dimensions
        se = r["closed_form_var"] * math.sqrt(2.0 / ((cfg["draws"] - 1) * cfg["dims"]))
        assert abs(r["mc_var"] - r["closed_form_var"]) < 4 * se, r
    rows = {r["weighting"]: r for r in syn["rows"]}
    assert rows["Delta-L a=1.0"]["mc_var"] < rows["Delta-L a=0.5"]["mc_var"] < rows["Dr. GRPO"]["mc_var"]


def test_real_policy_gradient_is_the_packages(study):
    real = study["real"]
    # sum_i w_i g_i with w from dk.sequence_weights equals a direct dk.policy_loss(agg=...) backward
    for label, err in real["decomposition_rel_err"].items():
        assert err < 1e-5, (label, err)
    rows = {r["aggregation"]: r for r in real["rows"]}
    M = real["max_len"]
    for label in ("Dr. GRPO", "Delta-L a=0", "Delta-L a=0.5", "Delta-L a=1"):
        assert rows[label]["constant"] == pytest.approx(1.0 / M, rel=1e-6)  # the known constant
    # alpha = 0 is Dr. GRPO: the same weights on the same batches
    for key in ("rel_bias", "total_var", "cv"):
        assert rows["Delta-L a=0"][key] == pytest.approx(rows["Dr. GRPO"][key], rel=1e-6)


def test_real_policy_bias_and_variance(study):
    real = study["real"]
    rows = {r["aggregation"]: r for r in real["rows"]}
    # constant weights are exactly unbiased: the measured bias is Monte Carlo noise (expected size 1 floor)
    assert rows["Dr. GRPO"]["rel_bias"] < 2.5 * rows["Dr. GRPO"]["rel_bias_noise_floor"]
    # the paper's claim on a real policy: Delta-L alpha=1 has less variance than Dr. GRPO (alpha = 0)
    assert rows["Delta-L a=1"]["rel_var"] < rows["Delta-L a=0.5"]["rel_var"] < rows["Dr. GRPO"]["rel_var"]
    # rollouts are long-tailed: the longest 1% at least 3x the median
    q = real["length_quantiles"]
    assert q["0.99"] >= 3 * q["0.5"]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 4096), min_size=2, max_size=64), st.integers(0, 2**31 - 1))
def test_alpha1_weights_minimise_closed_form_variance(lengths, seed):
    """Among weightings with sum_i x_i = 1, M * dk.sequence_weights(alpha=1) minimises sum_i x_i^2 L_i."""
    M = 4096
    L = torch.tensor(lengths, dtype=torch.float64)
    x = dk.sequence_weights(torch.tensor(lengths), "delta-l", alpha=1.0, max_len=M, dtype=torch.float64) * M
    assert float(x.sum()) == pytest.approx(1.0, rel=1e-12)
    best = float((x * x * L).sum())
    assert best == pytest.approx(1.0 / float((1.0 / L).sum()), rel=1e-9)
    gen = torch.Generator().manual_seed(seed)
    others = torch.rand(32, len(lengths), generator=gen, dtype=torch.float64)
    others = others / others.sum(1, keepdim=True)
    assert bool(((others * others * L).sum(1) >= best * (1 - 1e-12)).all())
    for alpha in (0.0, 0.5, 0.75):
        xa = dk.sequence_weights(torch.tensor(lengths), "delta-l", alpha=alpha, max_len=M, dtype=torch.float64) * M
        assert float((xa * xa * L).sum()) >= best * (1 - 1e-12)


def test_training_improves_reward(tmp_path):
    run_quick("train_rlvr.py", tmp_path)
    with open(tmp_path / "train_rlvr_quick.json") as f:
        res = json.load(f)
    (run,) = res["runs"]
    s, h = run["summary"], run["history"]
    assert len(h["reward"]) == res["config"]["steps"]
    assert all(math.isfinite(g) for g in h["grad_norm"])
    # eval reward: 128 prompts x 4 samples, standard error < 0.025; the policy must clearly learn
    assert s["final_acc"] >= s["initial_acc"] + 0.1, s


def test_scripts_are_deterministic():
    sys.path.insert(0, EXAMPLES)
    try:
        import tiny_lm
        import train_rlvr
        import variance_study
    finally:
        sys.path.remove(EXAMPLES)
    kw = dict(batch=16, max_len=3072, dims=4, draws=50, random_weightings=10, seed=3)
    assert variance_study.synthetic(**kw) == variance_study.synthetic(**kw)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # the later tests run with the session's thread count
        bases = [tiny_lm.pretrain_base(5, steps=5, max_len=16) for _ in range(2)]
        for p, q in zip(bases[0].parameters(), bases[1].parameters()):
            assert torch.equal(p, q)
        cfg = dict(steps=3, prompts_per_step=4, group=4, max_len=16, lr=3e-3, micro_batches=2, eval_prompts=8,
                   eval_samples=2, log_every=3)
        runs = [train_rlvr.train(bases[0], "delta-l", 0.75, 5, **cfg) for _ in range(2)]
    finally:
        torch.set_num_threads(threads)
    for key in ("reward", "grad_norm", "mean_len", "eval_acc"):
        assert runs[0][key] == runs[1][key]
