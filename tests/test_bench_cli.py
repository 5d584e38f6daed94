"""``deltal-bench`` end to end on a tiny shape: it runs, and writes what it says (no timing checked);
where its results go, its tables at 80 columns, its progress and load lines when piped, its plots."""
from __future__ import annotations

import csv
import importlib.util
import io
import json
import logging
import os
import re
import subprocess
from pathlib import Path

import pytest

import deltal_kernels as dk
from deltal_kernels.bench import cli, report, runs
from deltal_kernels.bench.cases import Case
from deltal_kernels.bench.cli import main
from deltal_kernels.bench.targets import evaluate

ROOT = Path(__file__).resolve().parents[1]


def test_bench_runs_and_writes_results(tmp_path, capsys):
    backend = dk.available_backends("cpu")[0]
    impls = [backend, f"{backend} inplace", "eager", "chunked"]
    assert main(["--device", "cpu", "--N", "64", "--V", "128", "256", "--dtype", "fp32", "--reps", "1",
                 "--only", *impls, "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "cpu-custom.json").read_text())
    assert doc["meta"]["device"] == "cpu" and doc["meta"]["torch"]
    assert {(r["case"], r["impl"]) for r in doc["results"]} == {
        (f"N=64 V={V} fp32", impl) for V in (128, 256) for impl in impls}
    for r in doc["results"]:
        assert r["error"] is None
        assert r["fwdbwd_ms"] > 0 and r["extra_peak_MB"] is not None
    with (tmp_path / "cpu-custom.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(doc["results"])
    assert (tmp_path / "cpu-custom.png").stat().st_size > 0
    md = (tmp_path / "cpu-custom.md").read_text()
    assert md.count("| eager |") == 2 and doc["meta"]["device_name"] in md
    # the target shape was not run: every target says so rather than passing or failing
    assert doc["targets"] and all(t["status"].startswith("not measured") for t in doc["targets"])
    assert "Targets" in capsys.readouterr().out


def test_a_run_cut_short_keeps_the_cases_it_finished(tmp_path, monkeypatch):
    """gpu_check.sh stops the benchmark at its time cap: the files hold every case finished before."""
    finished = []
    real_run_case = cli.run_case

    def run_case(case, *args, **kwargs):
        if finished:
            raise KeyboardInterrupt  # the cap, during the second case
        finished.append(case.label)
        return real_run_case(case, *args, **kwargs)

    monkeypatch.setattr(cli, "run_case", run_case)
    with pytest.raises(KeyboardInterrupt):
        main(["--device", "cpu", "--N", "64", "--V", "128", "256", "--dtype", "fp32", "--reps", "1",
              "--only", "eager", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "cpu-custom.json").read_text())
    assert finished == ["N=64 V=128 fp32"] and {r["case"] for r in doc["results"]} == set(finished)
    assert (tmp_path / "cpu-custom.md").read_text().count("| eager |") == 1


def row(impl, fwdbwd_ms, extra_peak_MB=100.0):
    return dict(case="N=2048 V=32000 fp32", impl=impl, error=None, fwdbwd_ms=fwdbwd_ms, extra_peak_MB=extra_peak_MB)


def test_targets_say_met_missed_and_absent():
    results = [row("cpu", 100.0, 1.0), row("eager", 250.0, 100.0), row("compile", 200.0)]
    status = {t.what: t.status for t in evaluate(results, "cpu", ["cpu", "torch"], {})}
    assert status == {"fwd+bwd speed-up vs eager": "MISSED by 1.20x",
                      "fwd+bwd speed-up vs compile": "met",
                      "extra peak memory / eager's": "met"}
    absent = evaluate(results, "cpu", ["torch"], {})
    assert {t.status for t in absent} == {"not measured: cpu not available"}
    gpu = evaluate([], "cuda", ["triton"], {"liger": "not installed"})
    assert {t.status for t in gpu if t.backend == "cuda"} == {"not measured: cuda not available"}
    assert {t.status for t in gpu if t.backend == "triton"} == {"not measured: triton not run at N=16384 V=151936 bf16"}


def test_missing_bench_extra_is_one_line(tmp_path):
    """Without rich (the bench extra) the console script says what to install, not a traceback."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['rich'] = None; import deltal_kernels.bench as b; "
            "raise SystemExit(b.main(['--help']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == 'deltal-bench: rich not installed; pip install "deltal-kernels[bench]"'


def test_default_output_is_a_run_folder_with_progress_and_load_lines(tmp_path, monkeypatch, capsys):
    """Without --out the files go to a fresh <runs>/<UTC time>-<tag>/ folder (here $DELTAL_BENCH_RUNS);
    piped output (capsys: not a terminal) has one plain line per finished step, and the load average
    at start and end, with the warning when it is above 1 per core."""
    monkeypatch.setenv(runs.RUNS_ENV, str(tmp_path / "runs"))
    cores = os.cpu_count() or 1
    monkeypatch.setattr(os, "getloadavg", lambda: (2.0 * cores + 0.5, 1.0, 0.5))
    backend = dk.available_backends("cpu")[0]
    impls = [backend, "eager"]
    assert main(["--device", "cpu", "--N", "64", "--V", "128", "--dtype", "fp32", "--reps", "2", "--only", *impls]) == 0
    folders = list((tmp_path / "runs").iterdir())
    assert len(folders) == 1 and re.fullmatch(r"\d{8}T\d{6}Z-cpu-custom", folders[0].name), folders
    assert sorted(p.name for p in folders[0].iterdir()) == [f"cpu-custom.{e}" for e in ("csv", "json", "md", "png")]
    out = capsys.readouterr().out
    assert str(folders[0]) in out
    # progress: the batch, each implementation's warm-up, one line per interleaved timing round
    steps = re.findall(r"^  \[(\d+)/(\d+) \d+:\d\d\] N=64 V=128 fp32: (.*): \d+\.\d s$", out, re.M)
    assert [s[2] for s in steps] == ["drawing the batch", f"{backend} (warm-up, memory)", "eager (warm-up, memory)",
                                     "timing, round 1 of 2", "timing, round 2 of 2"]
    assert steps[-1][:2] == ("6", "6")  # 2 implementations x (1 warm-up + 2 rounds)
    table_row = re.search(r"^eager +2-pass", out, re.M)  # the case's table after its last step's line
    assert table_row and out.index("timing, round 2 of 2") < table_row.start() < out.index("Targets")
    load = f"{2.0 * cores + 0.5:.2f} 1.00 0.50 (1, 5, 15 min) on {cores} cores"
    assert f"load average at start: {load}" in out and f"load average at end: {load}" in out
    assert out.count("warning: load") == 2 and "above 1 per core" in out
    doc = json.loads((folders[0] / "cpu-custom.json").read_text())
    assert doc["meta"]["load_average_end"][0] == 2.0 * cores + 0.5
    assert "above 1 per core" in (folders[0] / "cpu-custom.md").read_text()


def test_no_load_warning_on_an_idle_machine(monkeypatch):
    from rich.console import Console

    monkeypatch.setattr(os, "getloadavg", lambda: (0.25, 0.5, 0.75))
    console = Console(file=io.StringIO(), width=200)
    assert cli.report_load(console, "at start") == (0.25, 0.5, 0.75)
    text = console.file.getvalue()
    assert "load average at start: 0.25 0.50 0.75" in text and "warning" not in text


def _git_toplevel(path: Path):
    """The work tree of the git repository that holds path, or None (no repository, no git)."""
    try:
        r = subprocess.run(["git", "-C", str(path), "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    except FileNotFoundError:
        return None
    return Path(r.stdout.strip()).resolve() if r.returncode == 0 else None


def test_run_folders_are_git_ignored_and_never_reused(tmp_path, monkeypatch):
    monkeypatch.delenv(runs.RUNS_ENV, raising=False)
    root = runs.runs_root()
    assert root == ROOT / "bench" / "runs"
    # a copy without .git (the GPU machine's) cannot ask git; its .gitignore still lists the folder
    assert "bench/runs/" in (ROOT / ".gitignore").read_text().splitlines()
    if _git_toplevel(ROOT) == ROOT:
        ignored = subprocess.run(["git", "check-ignore", "-q", str(root / "20260101T000000Z-cpu")], cwd=ROOT)
        assert ignored.returncode == 0, "git does not ignore bench/runs/"
    first = runs.run_folder("cpu", root=tmp_path)
    first.mkdir()
    second = runs.run_folder("cpu", root=tmp_path)
    assert second != first and second.parent == tmp_path and not second.exists()


def test_run_folders_in_a_copy_without_git(tmp_path, monkeypatch):
    """runs.py in a bare copy of the tree (no .git, as a GPU machine gets it): bench/runs/ there while
    bench/ is writable; ./deltal-bench-runs/ when it is not, or outside a source tree."""
    monkeypatch.delenv(runs.RUNS_ENV, raising=False)
    copy = tmp_path / "copy"
    (copy / "deltal_kernels" / "bench").mkdir(parents=True)
    (copy / "bench").mkdir()
    (copy / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    source = copy / "deltal_kernels" / "bench" / "runs.py"
    source.write_text(Path(runs.__file__).read_text())
    spec = importlib.util.spec_from_file_location("runs_in_a_copy", source)
    copied = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copied)
    assert not (copy / ".git").exists()
    assert copied.runs_root() == copy / "bench" / "runs"
    with monkeypatch.context() as m:  # a read-only tree (os.access, as root could write anyway)
        m.setattr(os, "access", lambda path, mode: False)
        assert copied.runs_root() == Path("deltal-bench-runs")
    (copy / "pyproject.toml").unlink()  # site-packages: no source tree around the package
    assert copied.runs_root() == Path("deltal-bench-runs")


def _rows(gpu: bool):
    """A results row per implementation, with the longest names there are, and one failure."""
    names = (["cuda", "cuda inplace", "triton", "triton inplace"] if gpu else ["cpu", "cpu inplace", "torch"])
    names += ["eager", "compile", "chunked"] + (["liger"] if gpu else [])
    rows = []
    for i, name in enumerate(names):
        rows.append(dict(case="N=16384 V=151936 bf16", N=16384, V=151936, dtype="bf16", S=31, scored_rows=13000,
                         impl=name, kind="backend" if name.split()[0] in ("cuda", "triton", "cpu", "torch")
                         else "baseline", inplace=name.endswith("inplace"), schedule="2-pass",
                         bytes=dict(fwd=1, bwd=2, fwdbwd=3, floor=2), error=None, fwd_ms=1234.56 + i,
                         bwd_ms=4567.89, fwdbwd_ms=12345.67, tokens_per_s=33.7e3, fwdbwd_GBps=4321.1,
                         fwdbwd_frac_copy=0.95, fwdbwd_frac_peak=0.91 if gpu else None, fwdbwd_x_floor=12.34,
                         extra_peak_MB=123456.7, speedup_vs_eager=10.01, loss=-0.0157061234))
    rows[-1] = dict(rows[-1], error="OutOfMemoryError: CUDA out of memory. Tried to allocate 9.27 GiB of 139.8 GiB")
    return rows


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
def test_tables_fit_80_columns_without_cutting(gpu):
    from rich.console import Console

    rows = _rows(gpu)
    meta = dict(peak_GBps=4800.0 if gpu else None)
    case = Case(16384, 151936, "bf16")
    console = Console(width=80, record=True, file=io.StringIO())
    tables = report.case_tables(case, rows, meta, width=80)
    assert len(tables) == 2  # too wide for one: times, then bandwidth and memory
    for table in tables:
        console.print(table)
    text = console.export_text()
    lines = text.splitlines()
    for r in rows:  # every implementation, whole, at the start of a line in both tables
        assert sum(bool(re.match(re.escape(r["impl"]) + r"  +\S", line)) for line in lines) == 2, r["impl"]
    console.print(report.targets_table(evaluate(rows, "cuda" if gpu else "cpu", ["cpu"], {"liger": "not here"})))
    text += console.export_text()  # export_text() empties the record: the targets table alone
    assert "…" not in text and "..." not in text
    assert max(len(line.rstrip()) for line in text.splitlines()) <= 80
    assert rows[-1]["error"][:40] in text.replace("\n", " ")
    assert "12345.67" in text and "-0.0157061" in text and "123456.7" in text
    wide = report.case_tables(case, rows, meta, width=200)
    assert len(wide) == 1


def test_no_cuda_runtime_log_line_is_dropped_and_only_it():
    cli.quiet_no_cuda_warning()
    cli.quiet_no_cuda_warning()  # idempotent
    logger = logging.getLogger("torch.utils.cpp_extension")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    try:
        logger.warning("No CUDA runtime is found, using CUDA_HOME='/usr/local'")
        logger.warning("Error checking compiler version for c++")
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue() == "Error checking compiler version for c++\n"
    assert logger.filters.count(cli._is_no_cuda_runtime) == 1


def _grid_rows():
    rows = []
    for N, V in ((2048, 8192), (512, 32000), (2048, 32000)):
        for impl, kind, ms in (("cpu", "backend", 100.0), ("eager", "baseline", 400.0), ("compile", "baseline", 200.0)):
            rows.append(dict(case=f"N={N} V={V} fp32", N=N, V=V, dtype="fp32", impl=impl, kind=kind, error=None,
                             fwd_ms=ms / 2, bwd_ms=ms / 2, fwdbwd_ms=ms * N * V / 2**26, fwdbwd_GBps=1.0,
                             extra_peak_MB=0.1 if kind == "backend" else 300.0, speedup_vs_eager=400.0 / ms))
    return rows


def test_quick_plot_is_bars_per_implementation_and_the_grid_has_speedups(tmp_path):
    meta = dict(deltal_kernels=dk.__version__, device_name="test CPU", date="2026-01-01")
    one = [r for r in _grid_rows() if r["case"] == "N=2048 V=32000 fp32"]
    fig = report.figure(meta, one)
    assert len(fig.axes) == 3  # time, GB/s, extra memory
    for ax in fig.axes:
        assert [t.get_text() for t in ax.get_xticklabels()] == ["cpu", "eager", "compile"]
        assert len(ax.patches) >= 3 and not ax.lines  # bars, no lone dots
    grid = report.figure(meta, _grid_rows())
    assert len(grid.axes) == 6  # (time, speed-up vs eager, extra memory) x (vs V, vs N)
    titles = [ax.get_title() for ax in grid.axes]
    assert all("fp32" in t for t in titles) and sum("speed-up vs eager" in t for t in titles) == 2
    assert {t.get_text() for t in grid.legends[0].get_texts()} == {"solid: this package's backends",
                                                                   "dashed: baselines"}
    report.plot(tmp_path / "quick.png", meta, one)
    assert (tmp_path / "quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
