"""pytest-benchmark suite over deltal-bench's cases: ``pytest bench`` (see bench/test_bench_loss.py)."""


def pytest_addoption(parser):
    parser.addoption("--bench-grid", choices=("quick", "full"), default="quick",
                     help="deltal-bench's quick grid (default) or its full grid for this device")
