"""``deltal-bench``: time, effective bandwidth and peak memory of every backend and baseline, side by side.

Run ``python -m deltal_kernels.bench`` (or the ``deltal-bench`` console script); ``--help`` lists the
options. The baselines live in ``baselines`` so the tests check exactly what the benchmark times.
"""
