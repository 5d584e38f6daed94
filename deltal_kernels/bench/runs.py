"""Run folders: where a benchmark or an example writes its results unless told otherwise (--out).

Committed results (bench/results/, examples/results/) change only when a run is pointed at them.
"""
from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

RUNS_ENV = "DELTAL_BENCH_RUNS"


def runs_root() -> Path:
    """Where run folders go: $DELTAL_BENCH_RUNS; else bench/runs/ (listed in .gitignore) of the source
    tree the package is imported from, a clone or a copy without .git (as a GPU machine gets), when
    bench/ there is writable; else ./deltal-bench-runs/ (an installed package, a read-only tree)."""
    if os.environ.get(RUNS_ENV):
        return Path(os.environ[RUNS_ENV])
    tree = Path(__file__).resolve().parents[2]
    bench = tree / "bench"
    if (tree / "pyproject.toml").is_file() and bench.is_dir() and os.access(bench, os.W_OK):
        return bench / "runs"
    return Path("deltal-bench-runs")


def run_folder(tag: str, root: Optional[Path] = None) -> Path:
    """A fresh folder <root>/<UTC time>-<tag>/ (not created here); -2, -3... when the name is taken."""
    root = runs_root() if root is None else Path(root)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path, i = root / f"{stamp}-{tag}", 1
    while path.exists():
        i += 1
        path = root / f"{stamp}-{tag}-{i}"
    return path
