"""The benchmark's output: rich tables on the terminal; JSON, CSV, a PNG plot and markdown tables on disk."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import List

from rich.table import Table

from .targets import Target


def _num(x, fmt):
    return "-" if x is None else format(x, fmt)


def _si(x):
    """2590 -> '2.59k', 3.3e6 -> '3.30M'."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= scale:
            return f"{x / scale:.2f}{suffix}"
    return f"{x:.0f}"


def case_table(case, rows: List[dict], meta: dict) -> Table:
    """One case, every implementation side by side."""
    gpu = meta["peak_GBps"] is not None
    two_pass = next((r["bytes"] for r in rows if r["schedule"] == "2-pass"), rows[0]["bytes"])
    title = (f"{case.label}  ({rows[0]['S']} sequences, {rows[0]['scored_rows']} scored rows; fwd+bwd moves "
             f"{two_pass['fwdbwd'] / 1e9:.3f} GB in 2 passes, {two_pass['floor'] / 1e9:.3f} GB fused = the floor)")
    caption = "bold: this package's backends. loss: the value each computed, the same for all"
    if any(r["impl"] == "liger" for r in rows):
        caption += " but liger (it takes the batch's mean advantage)"
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    columns = ["impl", "schedule", "fwd ms", "bwd ms", "fwd+bwd ms", "tokens/s", "GB/s", "% copy BW"]
    columns += ["% peak BW"] if gpu else []
    columns += ["x floor", "extra peak MB", "vs eager", "loss"]
    for i, name in enumerate(columns):
        table.add_column(name, justify="left" if i == 0 else "right")
    for r in rows:
        if r["error"]:
            table.add_row(r["impl"], r["schedule"], f"[red]{r['error']}[/red]", *[""] * (len(columns) - 3))
            continue
        cells = [r["impl"], r["schedule"], f"{r['fwd_ms']:.2f}", f"{r['bwd_ms']:.2f}", f"{r['fwdbwd_ms']:.2f}",
                 _si(r["tokens_per_s"]), f"{r['fwdbwd_GBps']:.1f}", f"{100 * r['fwdbwd_frac_copy']:.0f}"]
        cells += [f"{100 * r['fwdbwd_frac_peak']:.0f}"] if gpu else []
        speedup = r["speedup_vs_eager"]
        cells += [f"{r['fwdbwd_x_floor']:.2f}", f"{r['extra_peak_MB']:.1f}",
                  "-" if speedup is None else f"{speedup:.2f}x", f"{r['loss']:.6g}"]
        table.add_row(*cells, style="bold" if r["kind"] == "backend" else None)
    return table


def targets_table(targets: List[Target]) -> Table:
    table = Table(title="Targets (issue 5)", title_justify="left")
    for name in ("backend", "case", "target", "need", "got", "status"):
        table.add_column(name)
    for t in targets:
        style = "green" if t.status == "met" else "red" if t.status.startswith("MISSED") else "yellow"
        table.add_row(t.backend, t.case, t.what, t.need, _num(t.got, ".3g"), f"[{style}]{t.status}[/{style}]")
    return table


# ---- files ----

CSV_FIELDS = ["case", "N", "V", "dtype", "S", "scored_rows", "impl", "kind", "inplace", "schedule", "fwd_ms", "bwd_ms",
              "fwdbwd_ms", "tokens_per_s", "fwd_GBps", "bwd_GBps", "fwdbwd_GBps", "fwdbwd_frac_copy",
              "fwdbwd_frac_peak", "fwdbwd_x_floor", "extra_peak_MB", "speedup_vs_eager", "loss", "error"]
CSV_META = ["date", "device", "device_name", "torch", "deltal_kernels", "copy_GBps", "peak_GBps"]


def markdown(meta: dict, results: List[dict], targets: List[Target]) -> str:
    """The run as markdown tables, ready for the README: the machine, one table per case, the targets."""
    load = ", ".join(f"{x:.1f}" for x in meta["load_average"])
    lines = [f"{meta['device_name']}, torch {meta['torch']}, deltal-kernels {meta['deltal_kernels']}, "
             f"{meta['date']}; copy bandwidth {meta['copy_GBps']:.1f} GB/s"
             + (f", datasheet {meta['peak_GBps']:.0f} GB/s" if meta["peak_GBps"] else "")
             + f"; load average at start {load}; medians of {meta['reps']} calls.", ""]
    for case in dict.fromkeys(r["case"] for r in results):
        rows = [r for r in results if r["case"] == case]
        lines += [f"**{case}** ({rows[0]['scored_rows']} of {rows[0]['N']} rows scored)", "",
                  "| impl | schedule | fwd ms | bwd ms | fwd+bwd ms | tokens/s | GB/s | % copy BW | extra peak MB "
                  "| vs eager |", "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for r in rows:
            if r["error"]:
                lines.append(f"| {r['impl']} | {r['schedule']} | {r['error']} |" + " |" * 7)
                continue
            speedup = "-" if r["speedup_vs_eager"] is None else f"{r['speedup_vs_eager']:.2f}x"
            lines.append(f"| {r['impl']} | {r['schedule']} | {r['fwd_ms']:.2f} | {r['bwd_ms']:.2f} | "
                         f"{r['fwdbwd_ms']:.2f} | {_si(r['tokens_per_s'])} | {r['fwdbwd_GBps']:.2f} | {100 * r['fwdbwd_frac_copy']:.0f} | "
                         f"{r['extra_peak_MB']:.1f} | {speedup} |")
        lines.append("")
    lines += ["| backend | target | need | got | status |", "|---|---|--:|--:|---|"]
    lines += [f"| {t.backend} | {t.what} ({t.case}) | {t.need} | {_num(t.got, '.3g')} | {t.status} |" for t in targets]
    return "\n".join(lines) + "\n"


def write_files(out_dir: Path, tag: str, meta: dict, results: List[dict], targets: List[Target]) -> List[Path]:
    """<tag>.json (everything), <tag>.csv (one row per case and implementation), <tag>.png, and <tag>.md
    (the tables in markdown, for the README)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{tag}.{ext}" for ext in ("json", "csv", "png", "md")]
    doc = {"meta": meta, "results": results, "targets": [vars(t) for t in targets]}
    paths[0].write_text(json.dumps(doc, indent=1) + "\n")
    with paths[1].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_META + CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in results:
            writer.writerow({**{k: meta[k] for k in CSV_META}, **r})
    plot(paths[2], meta, results)
    paths[3].write_text(markdown(meta, results, targets))
    return paths


def _sweep(results, axis: str):
    """Rows of the sweep along ``axis`` ("V" or "N"): the other dimension fixed at its best-covered value."""
    other = "N" if axis == "V" else "V"
    ok = [r for r in results if not r["error"]]
    if not ok:
        return other, None, []
    values = {r[other] for r in ok}
    fixed = max(values, key=lambda v: (len({r[axis] for r in ok if r[other] == v}), v))
    return other, fixed, [r for r in ok if r[other] == fixed]


def plot(path: Path, meta: dict, results: List[dict]) -> None:
    """Forward+backward time and extra peak memory against V and against N, one line per implementation
    (dashed: baselines)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    several_dtypes = len({r["dtype"] for r in results}) > 1
    for col, axis in enumerate(("V", "N")):
        other, fixed, rows = _sweep(results, axis)
        series = sorted({(r["impl"], r["dtype"]) for r in rows})
        baseline = {r["impl"] for r in rows if r["kind"] == "baseline"}
        for row_i, (metric, label) in enumerate((("fwdbwd_ms", "forward+backward (ms)"),
                                                  ("extra_peak_MB", "extra peak memory (MB)"))):
            ax = axes[row_i][col]
            for impl, dtype in series:
                pts = sorted((r[axis], r[metric]) for r in rows if (r["impl"], r["dtype"]) == (impl, dtype)
                             and r[metric] is not None and r[metric] > 0)  # log axes: positive values only
                if pts:
                    ax.plot(*zip(*pts), marker="o", linestyle="--" if impl in baseline else "-",
                            label=f"{impl} {dtype}" if several_dtypes else impl)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(axis)
            ax.set_ylabel(label)
            ax.set_title(f"{label} vs {axis} ({other}={fixed})")
            ax.grid(True, which="both", alpha=0.3)
            if series:
                ax.legend(fontsize=8)
    fig.suptitle(f"deltal-kernels {meta['deltal_kernels']} on {meta['device_name']}, {meta['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
