"""The one-screen summary of scripts/gpu_check.sh: every step's status and the headline numbers.

Reads the step table (steps.tsv: name, status, exit code, seconds, needs GPU, note) and the step logs
of the run's work folder, and the results in the output folder (cuda-quick.json of the benchmark,
ncu.csv); writes <out>/summary.txt and prints it. Standard library only: it must run whatever state
the package's build is in.

    python scripts/gpu_check_summary.py --work /tmp/dk-gpu-check.XXXX --out bench/results/gpu-...
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path

WIDTH = 100


def read_steps(work: Path):
    rows = []
    path = work / "steps.tsv"
    if path.exists():
        for line in path.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 6:
                rows.append(dict(name=parts[0], status=parts[1], rc=parts[2], secs=parts[3], gpu=parts[4],
                                 note=parts[5]))
    return rows


def text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


# ---- headline numbers of each step ---------------------------------------------------------------

def pytest_counts(log: str):
    """The counts of pytest's closing line ('== 3 failed, 250 passed, 7 skipped in 81.2s =='), or None."""
    lines = [ln for ln in log.splitlines() if re.search(r"\b(passed|failed|error|errors|no tests ran)\b", ln)
             and re.search(r" in [0-9.]+s", ln)]
    if not lines:
        return None
    last = lines[-1]
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)", last)}
    if "error" in counts:
        counts["errors"] = counts.pop("error") + counts.get("errors", 0)
    secs = re.search(r" in ([0-9.]+)s", last)
    counts["seconds"] = float(secs.group(1)) if secs else None
    counts["line"] = last
    return counts


def pytest_failures(log: str, limit=8):
    names = re.findall(r"^(?:FAILED|ERROR) (\S+)", log, flags=re.M)
    return names[:limit], len(names)


def sanitizer_counts(log: str):
    """{tool: (errors, detail)} from compute-sanitizer's closing lines in the sanitize step's log."""
    out = {}
    for section in re.split(r"^## compute-sanitizer --tool ", log, flags=re.M)[1:]:
        tool = section.split()[0]
        m = re.search(r"ERROR SUMMARY: (\d+) errors?", section)
        race = re.search(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)", section)
        ran = re.search(r"sanitize_kernels: (\d+) variants ran, (\d+) failed", section)
        if m is None:
            detail = "no ERROR SUMMARY line (did it run to the end?)"
            errors = None
        else:
            errors = int(m.group(1))  # racecheck's hazards counted in it
            detail = f"{errors} errors"
            if race:
                detail += f" (racecheck: {race.group(2)} errors, {race.group(3)} warnings)"
        if ran:
            detail += f"; {ran.group(1)} kernel variants ran, {ran.group(2)} failed"
            if int(ran.group(2)) and errors is not None:
                errors += int(ran.group(2))
        elif errors is not None:
            detail += "; the kernel driver did not finish"
            errors += 1
        reports = "\n".join(ln for ln in section.splitlines() if ln.startswith("========="))
        kernels = list(dict.fromkeys(re.findall(r"([A-Za-z_][\w:]*kernel\w*(?:<[^<>()]*>)?)\(", reports)))[:2]
        out[tool] = (errors, detail, kernels if errors else [])
    return out


def bench_lines(out: Path):
    """Per case and implementation: forward+backward time, GB/s, fraction of the copy bandwidth, x floor."""
    path = out / "cuda-quick.json"
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return [f"  {path.name}: unreadable ({e})"]
    lines = []
    meta = data.get("meta", {})
    if meta.get("copy_GBps") or meta.get("copy_bandwidth_GBps"):
        lines.append(f"  copy bandwidth {meta.get('copy_GBps') or meta.get('copy_bandwidth_GBps'):.0f} GB/s")
    cases = {}
    for row in data.get("results", []):
        cases.setdefault(row.get("case", "?"), []).append(row)
    for case, rows in cases.items():
        lines.append(f"  {case}")
        for r in rows:
            name = r.get("impl", "?") + (" (in place)" if r.get("inplace") and "inplace" not in r.get("impl", "") else "")
            if r.get("error"):
                lines.append(f"    {name:<22} {r['error'][:70]}")
                continue
            def num(key, fmt):
                v = r.get(key)
                return format(v, fmt) if isinstance(v, (int, float)) else "-"
            frac = r.get("fwdbwd_frac_copy")
            lines.append(f"    {name:<22} fwd+bwd {num('fwdbwd_ms', '8.3f')} ms  {num('fwdbwd_GBps', '7.0f')} GB/s  "
                         f"{(format(frac * 100, '5.1f') + '% copy') if isinstance(frac, (int, float)) else '   - copy'}  "
                         f"{num('fwdbwd_x_floor', '5.2f')}x floor  peak +{num('extra_peak_MB', '.0f')} MB")
    for t in data.get("targets", []):
        lines.append(f"  target {t.get('backend', '')}: {t.get('what', '')} {t.get('need', '')}: {t.get('status', '')}")
    return lines


def ncu_lines(out: Path):
    """Per profiled kernel: time, DRAM throughput, issue slots, L2 hit rate (ncu --page raw --csv)."""
    path = out / "ncu.csv"
    if not path.exists() or path.stat().st_size == 0:
        return []
    rows = list(csv.DictReader(line for line in text(path).splitlines() if line.startswith('"')))
    want = [("gpu__time_duration.sum", "time", ""), ("dram__throughput.avg.pct_of_peak_sustained_elapsed", "DRAM", "%"),
            ("sm__inst_issued.avg.pct_of_peak_sustained_active", "issue slots", "%"),
            ("lts__t_sector_hit_rate.pct", "L2 hit", "%")]
    units = rows[0] if rows and not (rows[0].get("ID") or "").strip() else {}
    lines = []
    for r in rows:
        if not (r.get("ID") or "").strip():
            continue  # the units row
        name = re.sub(r"\(.*", "", r.get("Kernel Name", "?"))
        for noise in ("void ", "deltal_kernels::cuda::", "c10::"):
            name = name.replace(noise, "")
        parts = []
        for key, label, suffix in want:
            value = (r.get(key) or "").replace(",", "")
            unit = suffix or {"usecond": "us", "nsecond": "ns", "msecond": "ms"}.get(units.get(key), units.get(key) or "")
            parts.append(f"{label} {value}{unit}" if value else f"{label} -")
        lines.append(f"  {name[:36]:<36} " + ", ".join(parts))
    return lines or ["  ncu.csv has no kernel rows"]


# ---- the summary ---------------------------------------------------------------------------------

def summary(work: Path, out: Path, gpu: str, commit: str, elapsed: int, budget: int, dry_run: bool) -> str:
    steps = read_steps(work)
    bad = [s["name"] for s in steps if s["status"] in ("FAILED", "TIMEOUT")]
    head = (f"gpu_check {'DRY RUN ' if dry_run else ''}summary: GPU {gpu}, commit {commit}, "
            f"{elapsed} s of {budget} s")
    verdict = ("FAILED: " + ", ".join(bad)) if bad else ("all steps that ran passed" if steps else "no step ran")
    lines = [head, verdict, "-" * min(WIDTH, len(head) + 10)]
    for s in steps:
        gpu_mark = " [GPU]" if s["gpu"] == "yes" else ""
        note = f"  {s['note']}" if s["note"] else ""
        lines.append(f"{s['name'] + gpu_mark:<20} {s['status']:<8} {s['secs']:>4} s{note}"[:WIDTH])
        log = text(work / f"{s['name']}.log")
        if s["name"] == "info":
            for key in ("CUDA archs compiled", "backends for cuda tensors", "NOT AVAILABLE"):
                for ln in log.splitlines():
                    if ln.startswith(key):
                        lines.append(f"  {ln}"[:WIDTH])
        elif s["name"] == "tests" and s["status"] not in ("skipped", "dry-run"):
            counts = pytest_counts(log)
            if counts is None:
                seen = re.findall(r"\b(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b", "\n".join(
                    ln for ln in log.splitlines() if ln.startswith(("[gw", "tests/"))))
                so_far = ", ".join(f"{seen.count(w)} {w.lower()}" for w in dict.fromkeys(seen))
                lines.append(f"  no pytest closing line (cut short?); per-test lines: {so_far or 'none'}")
            elif set(counts) == {"seconds", "line"}:  # no counts: 'no tests ran'
                lines.append("  " + counts["line"].strip("= ")[:WIDTH - 2])
            else:
                lines.append("  " + ", ".join(f"{v} {k}" for k, v in counts.items() if k not in ("seconds", "line"))
                             + (f" in {counts['seconds']:.0f} s" if counts.get("seconds") else ""))
                names, total = pytest_failures(log)
                for n in names:
                    lines.append(f"    {n}"[:WIDTH])
                if total > len(names):
                    lines.append(f"    ... and {total - len(names)} more (gpu-check.log)")
        elif s["name"] == "sanitize" and s["status"] not in ("skipped", "dry-run"):
            counts = sanitizer_counts(log)
            if not counts:
                lines.append("  no compute-sanitizer output")
            for tool, (errors, detail, kernels) in counts.items():
                mark = "ok" if errors == 0 else "ERRORS"
                lines.append(f"  {tool:<10} {mark:<7} {detail}"[:WIDTH])
                if kernels:
                    lines.append(f"    in {'; '.join(kernels)}"[:WIDTH])
        elif s["name"] == "bench" and s["status"] not in ("skipped", "dry-run"):
            lines.extend(ln[:WIDTH] for ln in bench_lines(out))
        elif s["name"] == "ncu" and s["status"] not in ("skipped", "dry-run"):
            lines.extend(ln[:WIDTH] for ln in ncu_lines(out))
        elif s["name"] == "kernel-report" and s["status"] in ("ok", "FAILED"):
            rows = [ln for ln in text(out / "kernel-report.txt").splitlines() if ln.startswith(("cuda ", "triton "))]
            bad = [ln for ln in rows if not ln.rstrip().endswith(("ok", "(not budgeted)"))]
            lines.append(f"  {len(rows)} kernel variants, {len(bad)} not ok")
            lines.extend(f"  ! {re.sub(r' {2,}', ' ', ln)}"[:WIDTH] for ln in bad[:3])
            continue  # the log's tail says no more
        elif s["name"] == "build" and s["status"] != "dry-run":
            m = re.findall(r"^\[(\d+)/(\d+)\]", log, flags=re.M)
            if m:
                lines.append(f"  ninja: {m[-1][0]}/{m[-1][1]} compile steps")
        if s["status"] in ("FAILED", "TIMEOUT") and s["name"] not in ("tests", "sanitize", "info"):
            tail = [ln for ln in log.splitlines() if ln.strip()][-2:]
            lines.extend(f"  | {ln}"[:WIDTH] for ln in tail)
    files = sorted(p.name for p in out.iterdir() if p.is_file()) if out.is_dir() else []
    if "summary.txt" not in files:
        files.append("summary.txt")
    lines.append(f"files ({len(files)}{', OVER THE 8 THAT COME BACK' if len(files) > 8 else ''}): {' '.join(sorted(files))}"
                 [:WIDTH * 2])
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="the run's work folder (steps.tsv, <step>.log)")
    p.add_argument("--out", type=Path, required=True, help="the results folder (summary.txt is written there)")
    p.add_argument("--gpu", default="unknown")
    p.add_argument("--commit", default="unknown", help="the commit checked, as gpu_check.sh found it")
    p.add_argument("--elapsed", type=int, default=0)
    p.add_argument("--budget", type=int, default=0)
    p.add_argument("--dry-run", action="store_true")
    a = p.parse_args(argv)
    s = summary(a.work, a.out, a.gpu, a.commit, a.elapsed, a.budget, a.dry_run)
    (a.out / "summary.txt").write_text(s)
    sys.stdout.write(s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
