"""``deltal-bench`` end to end on a tiny shape: it runs, and writes what it says (no timing checked)."""
from __future__ import annotations

import csv
import json

import deltal_kernels as dk
from deltal_kernels.bench.cli import main
from deltal_kernels.bench.targets import evaluate


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
