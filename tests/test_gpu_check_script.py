"""scripts/gpu_check.sh without a GPU: its --dry-run plumbing (folder, steps, summary, exit status)
and the summary's reading of the results a GPU run leaves (issue 12)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
GPU_STEPS = {"info", "clusters", "tests", "sanitize", "bench", "ncu"}
ALL_STEPS = ["preflight", "build", "info", "clusters", "liger", "tests", "sanitize", "bench", "kernel-report", "ncu"]

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="a bash script")


def run_script(*args, env=None, timeout=600, script=SCRIPT):
    unset = ("OUT", "PYTEST_ARGS", "REHEARSE", "GPU_CHECK_COMMIT")
    full_env = {k: v for k, v in os.environ.items() if k not in unset}
    full_env.update({"PY": sys.executable, **(env or {})})
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=script.parent.parent)


def git_commit(root: Path):
    """The short commit id of the repository whose top is root; None without one (a copy, no git)."""
    try:
        r = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel", "--short", "HEAD"],
                           capture_output=True, text=True)
    except FileNotFoundError:
        return None
    lines = r.stdout.split()
    return lines[1] if r.returncode == 0 and Path(lines[0]).resolve() == root.resolve() else None


def test_list_says_which_steps_need_a_gpu():
    r = run_script("--list")
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line.split()[1] for line in r.stdout.splitlines()[1:]}
    assert list(rows) == ALL_STEPS
    assert {name for name, gpu in rows.items() if gpu == "yes"} == GPU_STEPS


def test_dry_run_writes_the_summary_and_log_into_out(tmp_path):
    out = tmp_path / "results"
    wheels = tmp_path / "no-wheels"
    wheels.mkdir()
    r = run_script("--dry-run", env={"OUT": str(out), "REHEARSE": "none", "WHEELS": str(wheels)})
    assert r.returncode == 0, r.stdout + r.stderr
    files = sorted(p.name for p in out.iterdir())
    assert files == ["gpu-check.log", "summary.txt"]
    summary = (out / "summary.txt").read_text()
    assert "DRY RUN" in summary and "all steps that ran passed" in summary
    status = {}
    for line in summary.splitlines():
        words = line.split()
        if words and words[0] in ALL_STEPS:
            status[words[0]] = (words[1] == "[GPU]", words[2] if words[1] == "[GPU]" else words[1])
    assert list(status) == ALL_STEPS
    assert {name for name, (gpu, _) in status.items() if gpu} == GPU_STEPS
    assert status["preflight"][1] == "ok" and status["liger"][1] == "skipped"
    assert all(status[name][1] == "dry-run" for name in GPU_STEPS | {"build", "kernel-report"})
    assert len(summary.splitlines()) <= 40  # one screen
    log = (out / "gpu-check.log").read_text()
    for name in ALL_STEPS:
        assert f"===== {name}: " in log
    # the commands it would run on the GPU machine: the suite with a per-test timeout, the sanitizers
    assert "-m pytest tests" in log and "compute-sanitizer --tool {memcheck racecheck synccheck}" in log
    assert "--quick --device cuda --out " + str(out) in log
    # the commit checked: git's, or in a copy without .git (the GPU machine's) unknown, said so
    commit = git_commit(ROOT) or "unknown (no .git, no GPU_CHECK_COMMIT)"
    assert log.splitlines()[1].startswith(f"repo {ROOT}, commit {commit}")
    assert f"commit {commit}" in summary.splitlines()[0]


def test_dry_run_in_a_copy_without_git_records_gpu_check_commit(tmp_path):
    """The device tool's copy of the tree has no .git: the commit comes from GPU_CHECK_COMMIT."""
    (tmp_path / "copy" / "scripts").mkdir(parents=True)
    for name in ("gpu_check.sh", "gpu_check_summary.py"):
        (tmp_path / "copy" / "scripts" / name).write_text((ROOT / "scripts" / name).read_text())
    out = tmp_path / "results"
    r = run_script("--dry-run", script=tmp_path / "copy" / "scripts" / "gpu_check.sh",
                   env={"OUT": str(out), "REHEARSE": "none", "WHEELS": str(tmp_path), "GPU_CHECK_COMMIT": "abc1234",
                        "GIT_CEILING_DIRECTORIES": str(tmp_path)})  # no repository above the copy either
    assert r.returncode == 0, r.stdout + r.stderr
    log = (out / "gpu-check.log").read_text()
    assert f"repo {tmp_path / 'copy'}, commit abc1234 (GPU_CHECK_COMMIT)\n" in log
    assert "commit abc1234 (GPU_CHECK_COMMIT)" in (out / "summary.txt").read_text()


def test_dry_run_fails_when_a_rehearsal_fails(tmp_path):
    """A pytest option the suite rejects is caught here, not on the GPU machine."""
    out = tmp_path / "results"
    r = run_script("--dry-run", env={"OUT": str(out), "REHEARSE": "tests", "WHEELS": str(tmp_path),
                                     "PYTEST_ARGS": "--no-such-pytest-option"})
    assert r.returncode == 1, r.stdout + r.stderr
    summary = (out / "summary.txt").read_text()
    assert "FAILED: tests" in summary
    assert "no-such-pytest-option" in (out / "gpu-check.log").read_text()


def test_a_python_without_torch_is_a_usage_error(tmp_path):
    r = run_script("--dry-run", env={"OUT": str(tmp_path), "PY": "/nonexistent/python3"})
    assert r.returncode == 2 and "no python" in r.stderr


# ---- the summary of a GPU run, from fabricated results --------------------------------------------

def test_summary_reads_tests_sanitizers_bench_and_ncu(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    steps = [("build", "ok", "0", "71", "no", ""), ("tests", "FAILED", "1", "160", "yes", ""),
             ("sanitize", "FAILED", "1", "95", "yes", ""), ("bench", "ok", "0", "88", "yes", ""),
             ("ncu", "ok", "0", "40", "yes", "")]
    (work / "steps.tsv").write_text("".join("\t".join(s) + "\n" for s in steps))
    (work / "build.log").write_text("[1/3] c++ a\n[3/3] nvcc b\n")
    (work / "tests.log").write_text(
        "FAILED tests/test_triton.py::test_fused[bf16] - AssertionError\n"
        "FAILED tests/test_extension.py::test_odd_v - RuntimeError\n"
        "==== 2 failed, 250 passed, 7 skipped in 81.20s (0:01:21) ====\n")
    (work / "sanitize.log").write_text(
        "## compute-sanitizer --tool memcheck\nsanitize_kernels: 144 variants ran, 0 failed, 30.0 s\n"
        "========= ERROR SUMMARY: 0 errors\n"
        "## compute-sanitizer --tool racecheck\n========= Error: Race reported between Write access at "
        "void deltal_kernels::cuda::forward_kernel<float, 256>(ForwardPointers)+0x1f0\n"
        "========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)\n"
        "sanitize_kernels: 144 variants ran, 0 failed, 50.0 s\n========= ERROR SUMMARY: 1 error\n"
        "## compute-sanitizer --tool synccheck\nsanitize_kernels: 144 variants ran, 0 failed, 20.0 s\n"
        "========= ERROR SUMMARY: 0 errors\n")
    row = dict(case="N=16384 V=151936 bf16", impl="cuda", inplace=False, error=None, fwdbwd_ms=3.4123,
               fwdbwd_GBps=1461.2, fwdbwd_frac_copy=0.34, fwdbwd_x_floor=1.15, extra_peak_MB=1.0)
    bench = dict(meta={}, results=[row, dict(row, impl="liger", error="out of memory")],
                 targets=[dict(backend="cuda", what="fwd+bwd vs floor", need="<= 1.25x", status="met")])
    (out / "cuda-quick.json").write_text(json.dumps(bench))
    metrics = ["gpu__time_duration.sum", "dram__throughput.avg.pct_of_peak_sustained_elapsed",
               "sm__inst_issued.avg.pct_of_peak_sustained_active", "lts__t_sector_hit_rate.pct"]
    head = ["ID", "Process ID", "Kernel Name", *metrics]
    (out / "ncu.csv").write_text("\n".join([
        ",".join(f'"{h}"' for h in head), ",".join(f'"{u}"' for u in ["", "", "", "usecond", "%", "%", "%"]),
        ",".join(f'"{v}"' for v in ["0", "11", "void deltal_kernels::cuda::forward_grad_kernel<c10::BFloat16, 256>"
                                    "(deltal_kernels::FusedPointers)", "3,123.5", "91.2", "23.4", "48.9"])]) + "\n")
    s = summarize(work, out)
    assert s.startswith("gpu_check summary: GPU NVIDIA H200, commit abc1234, 470 s of 540 s\n")
    assert "FAILED: tests, sanitize" in s
    assert "2 failed, 250 passed, 7 skipped in 81 s" in s
    assert "tests/test_triton.py::test_fused[bf16]" in s
    lines = {ln.split()[0]: ln for ln in s.splitlines() if ln.startswith("  ") and ln.split()}
    assert "ok" in lines["memcheck"] and "144 kernel variants ran" in lines["memcheck"]
    assert "ERRORS" in lines["racecheck"] and "in deltal_kernels::cuda::forward_kernel<float, 256>" in s
    assert "ok" in lines["synccheck"]
    assert "3.412 ms" in s and "1461 GB/s" in s and "34.0% copy" in s and "1.15x floor" in s
    assert "liger" in s and "out of memory" in s and "met" in s
    assert "forward_grad_kernel<BFloat16, 256>" in s
    assert "DRAM 91.2%" in s and "issue slots 23.4%" in s and "L2 hit 48.9%" in s and "time 3123.5us" in s
    assert "ninja: 3/3 compile steps" in s
    # a suite killed at its time cap: no closing line, the per-test lines counted
    (work / "tests.log").write_text("[gw0] [ 1%] PASSED tests/test_a.py::test_x\n"
                                    "[gw1] [ 2%] FAILED tests/test_a.py::test_y\n"
                                    "[gw0] [ 3%] PASSED tests/test_a.py::test_z\n")
    s = summarize(work, out)
    assert "no pytest closing line (cut short?); per-test lines: 2 passed, 1 failed" in s


def summarize(work, out):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check_summary.py"), "--work", str(work),
                        "--out", str(out), "--gpu", "NVIDIA H200", "--commit", "abc1234", "--elapsed", "470",
                        "--budget", "540"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    s = (out / "summary.txt").read_text()
    assert s == r.stdout
    return s


def test_cluster_smoke_dry_run():
    """scripts/cluster_smoke.py, the gpu_check step that decides whether the later steps keep the cluster
    schedule: its checks pass on the CPU backend (--dry-run), every setting reported."""
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "cluster_smoke.py"), "--dry-run"], capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("\nok ") + r.stdout.startswith("ok ") == 5 and "5 of 5 settings passed" in r.stdout
