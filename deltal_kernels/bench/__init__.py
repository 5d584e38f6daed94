"""``deltal-bench``: time, effective bandwidth and peak memory of every backend and baseline, side by side.

Run ``python -m deltal_kernels.bench`` (or the ``deltal-bench`` console script); ``--help`` lists the
options. The baselines live in ``baselines`` so the tests check exactly what the benchmark times.
"""
import importlib.util
import sys

EXTRA = ("rich", "matplotlib")  # the "bench" extra of setup.py


def main(argv=None) -> int:
    """The console script: one line naming the extra to install when its packages are missing."""
    missing = [name for name in EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        print(f"deltal-bench: {', '.join(missing)} not installed; pip install \"deltal-kernels[bench]\"",
              file=sys.stderr)
        return 1
    from .cli import main as cli_main

    return cli_main(argv)
