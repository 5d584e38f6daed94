"""The fused LM head, forward+backward timed by pytest-benchmark (``deltal-bench --linear`` side by side).

    pytest bench/test_bench_linear.py --benchmark-json=bench/results/pytest-linear-cpu.json
    pytest bench/test_bench_linear.py --bench-grid=full      # the target shape (CPU: N=4096 H=512 V=32000)

The implementations come from deltal_kernels.bench.linear: dk.linear_policy_loss, the materialised
path (hidden @ weight.T, then dk.policy_loss), the eager reference on the materialised logits,
Liger's chunked fused-linear GRPO loss (when liger-kernel is installed) and the three matmuls alone.
Each result's extra_info holds the peak memory beyond the inputs and the gradients of hidden and
weight, and the matmul FLOPs.
"""
import pytest
import torch

from deltal_kernels.bench import linear

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
IMPLS, SKIPPED = linear.implementations()


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        quick = metafunc.config.getoption("bench_grid") == "quick"
        grid = linear.GRIDS[DEVICE.type + ("-quick" if quick else "")]
        metafunc.parametrize("case", grid, ids=[c.label.replace(" ", "-") for c in grid], scope="module")


@pytest.fixture(scope="module")
def rollout(case):
    return linear.make_linear_batch(case, DEVICE)


@pytest.mark.parametrize("impl", IMPLS, ids=[i.name.replace(" ", "-") for i in IMPLS])
def test_linear_fwd_bwd(benchmark, case, rollout, impl):
    fn = impl.make()

    def setup():
        return linear._leaves(rollout), {}

    def call(hidden, weight):
        linear._grads(fn(hidden, weight, rollout.batch), hidden, weight)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(1 + int(impl.compiles)):  # torch.compile (liger) before anything is measured
        call(*setup()[0])
    extra, loss = linear.memory_call(fn, rollout)
    rows = case.N if impl.rows == "all" else rollout.batch.scored_rows
    benchmark.group = case.label
    benchmark.extra_info.update(extra_peak_MB=extra / 2**20, loss=loss, matmul_rows=rows,
                                matmul_GFLOP=6 * rows * case.H * case.V / 1e9,
                                logits_and_grad_MB=2 * case.N * case.V * rollout.hidden.element_size() / 2**20)
    benchmark.pedantic(call, setup=setup, rounds=3 if DEVICE.type == "cpu" else 10, iterations=1)


@pytest.mark.parametrize("name", sorted(SKIPPED))
def test_skipped(name):
    pytest.skip(f"{name}: {SKIPPED[name]}")
