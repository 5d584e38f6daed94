"""``deltal-bench --parallel`` at a tiny shape, real gloo ranks on the CPU: the bytes each rank
communicates equal the formulas (stated here again, independently of the module's), the sharded
implementations' peak per rank falls with TP, and only the gathered baseline's bytes grow with V."""
from __future__ import annotations

import json

import pytest

from deltal_kernels.bench import parallel
from deltal_kernels.bench.cli import main

N, V, H = 64, 301, 16
E = 2  # bf16


def want_bytes(impl, tp, V, R):
    if impl == "linear":  # 6 int64 checks, [4, rows] float32 per chunk of scored rows, ring all-reduce of dL/dhidden
        return (tp - 1) * (6 * 8 + 4 * 4 * R) + 2 * (tp - 1) * N * H * E // tp
    if impl == "shard":  # 6 int64 checks, [4, N] float32 statistics
        return (tp - 1) * (6 * 8 + 4 * 4 * N)
    return (tp - 1) * N * -(-V // tp) * E  # the logits shards, padded to ceil(V / TP) columns


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel")
    assert main(["--parallel", "--N", str(N), "--V", str(V), "--H", str(H), "--dtype", "bf16", "--tp", "1", "2",
                 "--out", str(out)]) == 0
    return out, json.loads((out / "parallel-cpu-custom.json").read_text())


def test_bytes_equal_the_formulas(run):
    _, doc = run
    rows = doc["results"]
    assert {(r["impl"], r["tp"], r["rank"]) for r in rows} == {
        (impl, tp, rank) for impl in parallel.IMPLS for tp in (1, 2) for rank in range(tp)}
    for r in rows:
        want = want_bytes(r["impl"], r["tp"], V, r["scored_rows"])
        assert r["received_bytes"] == r["sent_bytes"] == want, r
        assert r["bytes_match"] and set(r["calls"]) <= {"all_gather", "all_reduce"}, r
        if r["tp"] == 1:
            assert r["received_bytes"] == 0
    # the loss depends on logp - old_logp only, drawn the same way everywhere: one value for all
    assert max(r["loss"] for r in rows) - min(r["loss"] for r in rows) < 1e-4


def test_sharded_peak_per_rank_falls_with_tp(run):
    _, doc = run
    peak = {(s["impl"], s["tp"]): s["peak_MB"] for s in doc["summary"]}
    for impl in ("linear", "shard"):
        assert peak[impl, 2] < peak[impl, 1], (impl, peak)
    # the baseline holds the gathered [N, V] on every rank: no saving
    assert peak["gathered", 2] >= peak["gathered", 1] * 0.9, peak


def test_only_the_gathered_baseline_grows_with_v(run):
    _, doc = run
    small = {(r["impl"], r["rank"]): r for r in doc["results"] if r["tp"] == 2}
    big_V = 4 * V + 2
    large = {(r["impl"], r["rank"]): r for r in parallel.run_tp(parallel.ParallelCase(N, big_V, H, "bf16"), 2)}
    for key, r in large.items():
        assert r["received_bytes"] == want_bytes(key[0], 2, big_V, r["scored_rows"]), r
        if key[0] == "gathered":
            assert r["received_bytes"] > 3 * small[key]["received_bytes"]
        else:
            assert r["received_bytes"] == small[key]["received_bytes"]


def test_writes_the_tables(run):
    out, doc = run
    md = (out / "parallel-cpu-custom.md").read_text()
    assert doc["meta"]["isa"] in md and md.count("| gathered |") == 2
    assert (out / "parallel-cpu-custom.csv").read_text().count("\n") == 1 + len(doc["results"])
