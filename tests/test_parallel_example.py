"""examples/parallel_step.py: one tensor x sequence parallel step (torchrun, 4 gloo ranks on the CPU)
equals the same step run by one process, and the file also runs as a plain script (one process)."""
import math
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
EXAMPLE = os.path.join("examples", "parallel_step.py")
RTOL, ATOL = 1e-5, 1e-7  # the example's (float32 rounding of the sharded merge and the group sums)
NUMBER = r"(-?[0-9.]+(?:e[-+]?[0-9]+)?)"


def torchrun():
    beside = os.path.join(os.path.dirname(sys.executable), "torchrun")  # the venv's, if any
    return beside if os.access(beside, os.X_OK) else shutil.which("torchrun")


def run(command):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.abspath(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{command} exited {done.returncode}:\n{done.stdout}\n{done.stderr[-4000:]}"
    return done.stdout


def values(out, name, parallel):
    pattern = rf"^{re.escape(name)}\s+" + (rf"parallel {NUMBER}\s+" if parallel else "") + rf"one process {NUMBER}$"
    found = re.search(pattern, out, re.MULTILINE)
    assert found, f"no {name!r} line in:\n{out}"
    return found.groups()


def test_parallel_step_equals_one_process():
    if torchrun() is None:
        pytest.skip("torchrun not found (beside this Python or on PATH)")
    grid = run([torchrun(), "--nproc-per-node", "4", "--standalone", EXAMPLE])
    alone = run([sys.executable, EXAMPLE])
    assert "OK: equal within float32 rounding" in grid, grid
    for name in ("loss", "|grad head|", "|grad body|"):
        parallel, one = values(grid, name, parallel=True)
        assert math.isclose(float(parallel), float(one), rel_tol=RTOL, abs_tol=ATOL), (name, grid)
        # `python examples/parallel_step.py` runs the same one-process step: the same printed digits
        assert values(alone, name, parallel=False) == (one,), (name, grid, alone)
