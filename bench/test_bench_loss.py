"""Forward+backward of every backend and baseline, timed by pytest-benchmark.

    pytest bench --benchmark-json=bench/results/pytest-cpu.json        # deltal-bench's quick grid
    pytest bench --bench-grid=full

The implementations come from deltal_kernels.bench.baselines, the ones tests/test_baselines.py
checks against the reference. Each result's extra_info holds the bytes the schedule moves and the
peak memory beyond inputs and gradient; ``deltal-bench`` prints the same side by side.
"""
import pytest
import torch

from deltal_kernels.bench import baselines, measure
from deltal_kernels.bench.cases import GRIDS, make_batch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
IMPLS, SKIPPED = baselines.implementations(DEVICE)


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        quick = metafunc.config.getoption("bench_grid") == "quick"
        grid = GRIDS[DEVICE.type + ("-quick" if quick else "")]
        metafunc.parametrize("case", grid, ids=[c.label.replace(" ", "-") for c in grid], scope="module")


@pytest.fixture(scope="module")
def rollout(case):
    """(logits, batch) of the case, drawn once for every implementation."""
    return make_batch(case, DEVICE)


@pytest.mark.parametrize("impl", IMPLS, ids=[i.name.replace(" ", "-") for i in IMPLS])
def test_fwd_bwd(benchmark, case, rollout, impl):
    logits, batch = rollout
    fn = impl.make()
    nbytes = measure.bytes_moved(case.N, batch.scored_rows, case.V, logits.element_size(), impl.fused)

    def setup():  # the leaf (a copy of the logits in place) is made outside the timed call
        return (measure.leaf(logits, impl.inplace),), {}

    def call(x):
        torch.autograd.grad(fn(x, batch), x)
        measure.sync(DEVICE)

    call(*setup()[0])  # compiles (torch.compile, Triton) before anything is measured
    benchmark.group = case.label
    extra, loss = measure.memory_run(fn, logits, batch, inplace=impl.inplace)
    benchmark.extra_info.update(bytes_fwdbwd=nbytes["fwdbwd"], bytes_floor=nbytes["floor"],
                                extra_peak_MB=extra / 2**20, loss=loss)
    benchmark.pedantic(call, setup=setup, rounds=3 if DEVICE.type == "cpu" else 10, iterations=1)


@pytest.mark.parametrize("name", sorted(SKIPPED))
def test_skipped(name):
    pytest.skip(f"{name}: {SKIPPED[name]}")
