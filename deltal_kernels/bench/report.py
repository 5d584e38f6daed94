"""The benchmark's output: rich tables on the terminal; JSON, CSV, a PNG plot and markdown tables on disk."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import List, Optional

from rich import box
from rich.console import Console
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


def _columns(gpu: bool):
    """(header, cell of a results row, part): part 0 goes with the times, part 1 with bandwidth and memory."""
    return [
        ("schedule", lambda r: r["schedule"], 0),
        ("fwd ms", lambda r: f"{r['fwd_ms']:.2f}", 0),
        ("bwd ms", lambda r: f"{r['bwd_ms']:.2f}", 0),
        ("fwd+bwd ms", lambda r: f"{r['fwdbwd_ms']:.2f}", 0),
        ("tokens/s", lambda r: _si(r["tokens_per_s"]), 0),
        ("vs eager", lambda r: _num(r["speedup_vs_eager"], ".2f") + ("x" if r["speedup_vs_eager"] else ""), 0),
        ("GB/s", lambda r: f"{r['fwdbwd_GBps']:.1f}", 1),
        ("% copy", lambda r: f"{100 * r['fwdbwd_frac_copy']:.0f}", 1),
    ] + ([("% peak", lambda r: f"{100 * r['fwdbwd_frac_peak']:.0f}", 1)] if gpu else []) + [
        ("x floor", lambda r: f"{r['fwdbwd_x_floor']:.2f}", 1),
        ("extra MB", lambda r: f"{r['extra_peak_MB']:.1f}", 1),
        ("loss", lambda r: f"{r['loss']:.6g}", 1),
    ]


def _table(title, caption, columns, rows) -> Table:
    # compact (no outer edges, one space between columns' padding) to fit 80 columns; fold, never "…":
    # a cell too wide for its column wraps onto a second line; impl names never break
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left",
                  box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("impl", justify="left", no_wrap=True)
    for header, _, _ in columns:
        table.add_column(header, justify="right", overflow="fold")
    for r in rows:
        if r["error"]:  # the error itself is in the caption
            cells = [r["schedule"], "[red]failed[/red]"] if columns[0][0] == "schedule" else ["[red]failed[/red]"]
            table.add_row(r["impl"], *cells, *[""] * (len(columns) - len(cells)))
            continue
        table.add_row(r["impl"], *(cell(r) for _, cell, _ in columns), style="bold" if r["kind"] == "backend" else None)
    return table


def _width(table: Table) -> int:
    """The columns a table needs to show every cell on one line."""
    return Console(width=100_000, file=io.StringIO()).measure(table).maximum


def case_tables(case, rows: List[dict], meta: dict, width: Optional[int] = None) -> List[Table]:
    """One case, every implementation side by side: one table, or two (times; bandwidth and memory)
    when one would be wider than ``width`` columns (an 80-column terminal)."""
    gpu = meta["peak_GBps"] is not None
    two_pass = next((r["bytes"] for r in rows if r["schedule"] == "2-pass"), rows[0]["bytes"])
    title = (f"{case.label}  ({rows[0]['S']} sequences, {rows[0]['scored_rows']} scored rows; fwd+bwd moves "
             f"{two_pass['fwdbwd'] / 1e9:.3f} GB in 2 passes, {two_pass['floor'] / 1e9:.3f} GB fused = the floor)")
    bold = "bold: this package's backends. vs eager: eager's fwd+bwd time / this one's."
    errors = "".join(f"\n[red]{r['impl']} failed: {r['error']}[/red]" for r in rows if r["error"])
    legend = (f"GB/s: fwd+bwd bytes / time; % copy{', % peak' if gpu else ''}: that GB/s as % of the copy "
              f"bandwidth measured now{' and of the datasheet peak' if gpu else ''}; x floor: fwd+bwd time / the "
              "floor's; extra MB: peak memory beyond inputs and gradient; loss: the value each computed, the "
              "same for all")
    if any(r["impl"] == "liger" for r in rows):
        legend += " but liger (it takes the batch's mean advantage)"
    columns = _columns(gpu)
    table = _table(title, f"{bold} {legend}.{errors}", columns, rows)
    if width is None or _width(table) <= width:
        return [table]
    times = [c for c in columns if c[2] == 0]
    rest = [c for c in columns if c[2] == 1]
    return [_table(title + ": times", bold + errors, times, rows),
            _table(f"{case.label}: bandwidth and memory", legend + ".", rest, rows)]


def case_table(case, rows: List[dict], meta: dict) -> Table:
    """One case, every implementation side by side, in one table."""
    return case_tables(case, rows, meta)[0]


def targets_table(targets: List[Target]) -> Table:
    cases = list(dict.fromkeys(t.case for t in targets))
    one_case = len(cases) == 1
    table = Table(title="Targets (issue 5)" + (f" at {cases[0]}" if one_case else ""), title_justify="left")
    for name in ("backend",) + (() if one_case else ("case",)) + ("target", "need", "got", "status"):
        table.add_column(name, overflow="fold", no_wrap=name in ("backend", "need", "got"))
    for t in targets:
        style = "green" if t.status == "met" else "red" if t.status.startswith("MISSED") else "yellow"
        table.add_row(t.backend, *(() if one_case else (t.case,)), t.what, t.need, _num(t.got, ".3g"),
                      f"[{style}]{t.status}[/{style}]")
    return table


# ---- files ----

CSV_FIELDS = ["case", "N", "V", "dtype", "S", "scored_rows", "impl", "kind", "inplace", "schedule", "fwd_ms", "bwd_ms",
              "fwdbwd_ms", "tokens_per_s", "fwd_GBps", "bwd_GBps", "fwdbwd_GBps", "fwdbwd_frac_copy",
              "fwdbwd_frac_peak", "fwdbwd_x_floor", "extra_peak_MB", "speedup_vs_eager", "loss", "error"]
CSV_META = ["date", "device", "device_name", "torch", "deltal_kernels", "copy_GBps", "peak_GBps"]


def markdown(meta: dict, results: List[dict], targets: List[Target]) -> str:
    """The run as markdown tables, ready for the README: the machine, one table per case, the targets."""
    load = ", ".join(f"{x:.1f}" for x in meta["load_average"])
    end = meta.get("load_average_end")
    load += "" if end is None else ", at end " + ", ".join(f"{x:.1f}" for x in end)
    cores = meta.get("cpu_count") or 1
    busy = max(meta["load_average"][0], (end or [0])[0]) > cores
    lines = [f"{meta['device_name']}, torch {meta['torch']}, deltal-kernels {meta['deltal_kernels']}, "
             f"{meta['date']}; copy bandwidth {meta['copy_GBps']:.1f} GB/s"
             + (f", datasheet {meta['peak_GBps']:.0f} GB/s" if meta["peak_GBps"] else "")
             + f"; load average at start {load} ({cores} cores); medians of {meta['reps']} calls."
             + (" The load was above 1 per core: times swing with it, the ratios within the run are steadier."
                if busy else ""), ""]
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


def _is_sweep(rows, axis: str) -> bool:
    """Some implementation has two or more values of ``axis`` at one dtype: a line to draw."""
    return any(len({r[axis] for r in rows if (r["impl"], r["dtype"]) == key}) > 1
               for key in {(r["impl"], r["dtype"]) for r in rows})


def figure(meta: dict, results: List[dict]):
    """The run's plot as a matplotlib Figure (``plot`` saves it).

    When the cases vary N or V (the full grid): one column per swept axis, rows forward+backward time,
    speed-up vs eager, extra peak memory, one line per implementation and dtype (solid: this
    package's backends, dashed: the baselines). Otherwise (one shape, ``--quick``): grouped bars per
    implementation, one bar per case, for forward+backward time (forward solid, backward hatched),
    GB/s and extra peak memory.
    """
    from matplotlib.figure import Figure  # not pyplot: no display, no global figure to close

    sweeps = [axis for axis in ("V", "N") if _is_sweep(_sweep(results, axis)[2], axis)]
    title = f"deltal-kernels {meta['deltal_kernels']} on {meta['device_name']}, {meta['date']}"
    if not sweeps:
        return _bars(Figure(figsize=(15, 5.5)), title, results)
    fig = Figure(figsize=(6.5 * len(sweeps), 12))
    axes = fig.subplots(3, len(sweeps), squeeze=False)
    panels = (("fwdbwd_ms", "forward+backward (ms)"), ("speedup_vs_eager", "speed-up vs eager (x)"),
              ("extra_peak_MB", "extra peak memory (MB)"))
    markers = dict(zip(sorted({r["dtype"] for r in results}), "osD^v"))
    colors = {impl: f"C{i}" for i, impl in enumerate(dict.fromkeys(r["impl"] for r in results))}
    for col, axis in enumerate(sweeps):
        other, fixed, rows = _sweep(results, axis)
        series = sorted({(r["impl"], r["dtype"]) for r in rows})
        baseline = {r["impl"] for r in rows if r["kind"] == "baseline"}
        dtypes = ", ".join(sorted({r["dtype"] for r in rows}))
        several_dtypes = len(markers) > 1
        for row_i, (metric, label) in enumerate(panels):
            ax = axes[row_i][col]
            for impl, dtype in sorted(series, key=lambda s: (list(colors).index(s[0]), s[1])):
                if metric == "speedup_vs_eager" and impl == "eager":
                    continue  # 1 by definition: the dotted line
                pts = sorted((r[axis], r[metric]) for r in rows if (r["impl"], r["dtype"]) == (impl, dtype)
                             and r[metric] is not None and r[metric] > 0)  # log axes: positive values only
                if pts:
                    ax.plot(*zip(*pts), marker=markers[dtype], linestyle="--" if impl in baseline else "-",
                            color=colors[impl],
                            label=f"{impl} {dtype}" if several_dtypes else impl)
            if metric == "speedup_vs_eager":
                ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
                if not any(r[metric] for r in rows):
                    ax.text(0.5, 0.5, "eager not run", transform=ax.transAxes, ha="center")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(axis)
            ax.set_ylabel(label)
            ax.set_title(f"{label} vs {axis} ({other}={fixed}, {dtypes})", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    from matplotlib.lines import Line2D

    fig.legend(handles=[Line2D([], [], color="k", linestyle="-", label="solid: this package's backends"),
                        Line2D([], [], color="k", linestyle="--", label="dashed: baselines")]
               + ([Line2D([], [], color="k", marker=m, linestyle="", label=d) for d, m in markers.items()]
                  if len(markers) > 1 else []),
               loc="upper right", fontsize=8, ncol=2)
    fig.suptitle(title + "\nforward+backward of one call, medians", x=0.02, ha="left", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


def _bars(fig, title: str, results: List[dict]):
    """Grouped bars: x = implementation, one bar per case (its dtype in the legend)."""
    ok = [r for r in results if not r["error"]]
    impls = list(dict.fromkeys(r["impl"] for r in results))
    cases = list(dict.fromkeys(r["case"] for r in results))
    axes = fig.subplots(1, 3)
    width = 0.8 / max(1, len(cases))
    by = {(r["impl"], r["case"]): r for r in ok}
    panels = (("fwdbwd_ms", "forward+backward (ms)"), ("fwdbwd_GBps", "effective GB/s (fwd+bwd bytes)"),
              ("extra_peak_MB", "extra peak memory (MB)"))

    def fmt(x):
        return f"{x:.0f}" if x >= 100 else f"{x:.3g}"

    colors = [f"C{i}" for i in range(len(cases))]
    for ax, (metric, label) in zip(axes, panels):
        for j, case in enumerate(cases):
            xs = [i + (j - (len(cases) - 1) / 2) * width for i, impl in enumerate(impls) if (impl, case) in by]
            rows = [by[impl, case] for impl in impls if (impl, case) in by]
            if metric == "fwdbwd_ms":  # forward solid, backward hatched on top
                ax.bar(xs, [r["fwd_ms"] for r in rows], width, color=colors[j], label=case)
                bars = ax.bar(xs, [r["bwd_ms"] for r in rows], width, bottom=[r["fwd_ms"] for r in rows],
                              color=colors[j], alpha=0.5, hatch="//")
                labels = [fmt(r["fwdbwd_ms"]) + ("" if r["speedup_vs_eager"] is None
                                                       else f"\n{r['speedup_vs_eager']:.2f}x") for r in rows]
            else:
                bars = ax.bar(xs, [r[metric] or 0 for r in rows], width, color=colors[j], label=case)
                labels = [fmt(r[metric] or 0) for r in rows]
            ax.bar_label(bars, labels=labels, fontsize=7 if len(cases) == 1 else 6)
        failed = [impl for impl in impls if not any((impl, c) in by for c in cases)]
        ax.set_xticks(range(len(impls)), [i + (" (failed)" if i in failed else "") for i in impls],
                      rotation=30, ha="right")
        ax.set_ylabel(label)
        ax.set_title(label, fontsize=10)
        ax.margins(y=0.15)
        ax.grid(True, axis="y", alpha=0.3)
    from matplotlib.patches import Patch

    fig.legend(handles=[Patch(facecolor="grey", label="forward"),
                        Patch(facecolor="grey", alpha=0.5, hatch="//", label="backward (bar labels: fwd+bwd ms, "
                                                                               "speed-up vs eager)")]
               + ([Patch(facecolor=c, label=case) for c, case in zip(colors, cases)] if len(cases) > 1 else []),
               loc="upper right", fontsize=8)
    fig.suptitle(f"{title}\n{'; '.join(cases)}: medians of one forward+backward", x=0.02, ha="left", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return fig


def plot(path: Path, meta: dict, results: List[dict]) -> None:
    """The run's plot (``figure``) as a PNG."""
    figure(meta, results).savefig(path, dpi=110)
