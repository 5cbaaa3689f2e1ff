"""Turn a `dmf bench` result dict into rich tables, bench.json, bench.md and a latency plot.

Every table is built once as a `Section` (title, headers, rows of strings, caption) and then
written either as a rich table (terminal) or as markdown (bench.md, demo.md), so the two never
disagree.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from dmf.bench.bench import BASELINES, ENGINES, BenchRow, json_default
from dmf.bench.measure import WIDE_INTERVAL, interval_reading
from dmf.fileio import atomic_write_bytes, atomic_write_text

BASELINE_SHORT = {"torch": "torch", "torch-bf16": "bf16"}  # a baseline's name in headers and bar labels


@dataclass(frozen=True)
class Column:
    """One column of the row table: a narrow header (the table fits an 80-column terminal), the
    figure it shows and its format."""

    header: str
    value: Callable[[BenchRow], Any]
    fmt: str


COLUMNS = [
    Column("engine", lambda r: r.engine, "{}"), Column("fusion", lambda r: r.fusion, "{}"),
    Column("B", lambda r: r.batch_size, "{}"), Column("p50 ms", lambda r: r.latency.p50_ms_per_sample, "{:.1f}"),
    Column("p95", lambda r: r.latency.p95_ms_per_sample, "{:.1f}"),
    Column("p99", lambda r: r.latency.p99_ms_per_sample, "{:.1f}"),
    Column("/s", lambda r: r.latency.throughput_per_s, "{:.1f}"),
    *(Column(f"x{BASELINE_SHORT[b]}", lambda r, b=b: r.speedup.get(b), "{:.2f}") for b in BASELINES),
    Column("xpaper", lambda r: r.speedup_vs_paper, "{:.2f}"), Column("peak", lambda r: r.peak_fraction, "{:.0%}"),
]
PAPER_COLUMN = "xpaper"
HEAD_TARGET_MS = 1.0  # the fusion head's budget per sample (benchmark issue)
FUSION_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:purple")  # memory, naive, then any other fusion


@dataclass
class Section:
    """One table: rendered by `rich_tables` and `markdown` alike."""

    title: str
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    caption: str = ""
    text_columns: int = 1  # leading columns aligned left (names); the rest are figures, aligned right


# ------------------------------------------------------------------------------ figures as text
def _cell(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def format_ratio(ratio: dict | None) -> str:
    """'2.31x [2.20, 2.45]': median of per-round ratios and its 95 % interval, followed by
    'too wide' or 'no clear difference' when the interval does not support the median."""
    if not ratio:
        return "-"
    low, high = ratio["ci95"]
    return _with_reading(f"{ratio['median']:.2f}x [{low:.2f}, {high:.2f}]", ratio)


def format_excess(ratio: dict) -> str:
    """'+1.2 % [-0.4, +2.9]': a time ratio (memory / naive) as the extra time it costs (with the
    same words as format_ratio)."""
    low, high = ratio["ci95"]
    text = f"{100 * (ratio['median'] - 1):+.1f} % [{100 * (low - 1):+.1f}, {100 * (high - 1):+.1f}]"
    return _with_reading(text, ratio)


def _with_reading(text: str, ratio: dict) -> str:
    reading = interval_reading(ratio)
    return f"{text} {reading}" if reading else text


READING_NOTE = (f"too wide: the interval's ends differ by more than {WIDE_INTERVAL:g}x, the rounds disagreed "
                "too much to read the median; no clear difference: the interval holds 1 (0 %)")


def noise_lines(result: dict) -> list[str]:
    """One line when some ratio intervals are too wide to read: how many, and what to do."""
    ratios = result.get("ratios") or []
    wide = sum(interval_reading(r) == "too wide" for r in ratios)
    if not wide:
        return []
    return [f"{wide} of {len(ratios)} ratio intervals are too wide to read (ends more than {WIDE_INTERVAL:g}x "
            "apart): the machine was too noisy for those figures; rerun on a quiet machine or with more "
            "rounds (--min-runs)."]


def partial_lines(result: dict) -> list[str]:
    """While the run goes on (bench.json / bench.md rewritten after each batch size): say so."""
    if result.get("complete", True):
        return []
    done = sorted({r.batch_size for r in result["rows"]})
    return [f"Partial: the run is still going (or was stopped); batch sizes done: {', '.join(map(str, done))} "
            f"of {', '.join(map(str, result['options']['batch_sizes']))}."]


def columns(result: dict) -> list[Column]:
    """The row table's columns; xpaper only for paper-shaped models (a tiny model's "13x the
    paper" would read as a claim about the paper's model)."""
    return [c for c in COLUMNS if c.header != PAPER_COLUMN or result.get("paper_ms_per_sample")]


def machine_lines(result: dict) -> list[str]:
    """The CPU line (model, cores, ISA flags that matter) and the software the figures came from."""
    m = result["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items())
    threads = f"{m['threads']} threads per engine; " if m.get("threads") else ""
    return [f"CPU: {m.get('cpu_line') or m.get('cpu')}",
            f"{threads}Python {m.get('python', '?')}" + (f"; {versions}" if versions else "")]


def _engine_order(name: str) -> int:
    return ENGINES.index(name) if name in ENGINES else len(ENGINES)


# ------------------------------------------------------------------------------------ sections
def rows_section(result: dict) -> Section:
    cols = columns(result)
    caption = ("p50/p95/p99: ms per sample; /s: samples per second at p50; xtorch / xbf16: p50 speedup vs "
               "torch eager fp32 / torch bf16 autocast in the same run (paired ratios below)")
    if result.get("paper_ms_per_sample"):
        caption += "; xpaper: vs the paper's 91 (memory) / 63 (naive) ms on NVIDIA M40/T4 GPUs"
    caption += "; peak: share of the measured fp32 GEMM peak (fp32 engines)"
    return Section("Latency per sample", [c.header for c in cols],
                   [[_cell(c.value(r), c.fmt) for c in cols] for r in result["rows"]], caption, text_columns=2)


def _speedups(result: dict, best_only: bool) -> dict[tuple, dict[str, dict]]:
    """(engine, fusion, batch) -> {baseline: paired ratio}."""
    out: dict[tuple, dict[str, dict]] = {}
    for r in result.get("ratios") or []:
        if r["kind"] == "speedup" and (r["best"] or not best_only):
            out.setdefault((r["engine"], r["fusion"], r["batch_size"]), {})[r["baseline"]] = r
    return dict(sorted(out.items(), key=lambda kv: (kv[0][2], kv[0][1], _engine_order(kv[0][0]))))


def best_section(result: dict) -> Section:
    rows = [[fusion, str(batch), engine, *(format_ratio(by.get(b)) for b in BASELINES)]
            for (engine, fusion, batch), by in _speedups(result, best_only=True).items()]
    return Section("Best engine vs the baselines", ["fusion", "B", "best engine", *(f"vs {b}" for b in BASELINES)],
                   rows, "speedup = baseline time / engine time: median of per-round ratios [95 % bootstrap "
                   "interval]; best = lowest median latency among the non-baseline engines; " + READING_NOTE,
                   text_columns=3)


def speedup_section(result: dict) -> Section:
    rows = [[engine, fusion, str(batch), *(format_ratio(by.get(b)) for b in BASELINES)]
            for (engine, fusion, batch), by in _speedups(result, best_only=False).items()]
    return Section("Each engine vs each baseline", ["engine", "fusion", "B", *(f"vs {b}" for b in BASELINES)],
                   rows, "median of per-round paired ratios [95 % bootstrap interval]; " + READING_NOTE,
                   text_columns=2)


def memory_section(result: dict) -> Section:
    ratios = sorted((r for r in result.get("ratios") or [] if r["kind"] == "memory_vs_naive"),
                    key=lambda r: (r["batch_size"], _engine_order(r["engine"])))
    return Section("Memory fusion vs naive fusion, end to end", ["engine", "B", "memory vs naive"],
                   [[r["engine"], str(r["batch_size"]), format_excess(r)] for r in ratios],
                   "extra time of memory fusion per round (memory / naive - 1), median [95 % interval]; "
                   "the paper: +44 % (91 vs 63 ms); " + READING_NOTE)


def head_section(result: dict) -> Section:
    head = result.get("head") or {}
    rows = [[batch, *(_cell(h.get(k), "{:.3f}") for k in ("memory", "naive")), _cell(h.get("memory_minus_naive_ms"), "{:+.3f}")]
            for batch, h in sorted(head.items(), key=lambda kv: int(kv[0]))]
    threads = (result.get("options") or {}).get("head_threads", 1)
    return Section(f"Fusion head alone (after the encoders, onnx engine, {threads} thread{'s' * (threads > 1)})",
                   ["B", "memory ms", "naive ms", "difference ms"], rows,
                   f"ms per sample at p50; difference: median per-round memory - naive; "
                   f"target: memory head <= {HEAD_TARGET_MS:g} ms per sample")


def skipped_lines(result: dict) -> list[str]:
    return [f"{s['engine']} ({s['fusion']}): {s['reason']}" for s in result.get("skipped") or []]


def sections(result: dict) -> list[Section]:
    """Every non-empty table of a bench result, in reading order."""
    all_ = [rows_section(result), best_section(result), speedup_section(result), memory_section(result),
            head_section(result)]
    return [s for s in all_ if s.rows]


# ------------------------------------------------------------------------------ rich / markdown
def rich_tables(secs: list[Section]) -> list:
    """One rich table per section, without its caption (print_sections wraps that at the terminal's
    width: a table caption is never wrapped on dmf's soft-wrapping consoles and ran to 230+ columns)."""
    from rich import box
    from rich.table import Table

    tables = []
    for s in secs:
        # one space between columns and none at the edges: the row table fits 80 columns
        table = Table(title=s.title, box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True, pad_edge=False)
        for i, header in enumerate(s.headers):
            width = max([len(header), *(len(row[i]) for row in s.rows)])  # never cut a figure or a name
            table.add_column(header, justify="left" if i < s.text_columns else "right", no_wrap=True, min_width=width)
        for row in s.rows:
            table.add_row(*row)
        tables.append(table)
    return tables


def print_sections(console, secs: list[Section]) -> None:
    """Each table as it is (rows are never cut), then its caption wrapped at the console's width."""
    for section, table in zip(secs, rich_tables(secs)):
        console.print(table)
        if section.caption:
            console.print(section.caption, style="dim", markup=False, soft_wrap=False)
        console.print()


def print_result(console, result: dict) -> None:
    """The CPU line, every table, a word on intervals too wide to read, then what was skipped and why."""
    for line in machine_lines(result):
        console.print(line, markup=False)
    print_sections(console, sections(result))
    for line in noise_lines(result):  # wrapped at the terminal's width, unlike the one-line messages elsewhere
        console.print(line, style="yellow", markup=False, soft_wrap=False)
    for line in skipped_lines(result):
        console.print(f"skipped {line}", style="yellow", markup=False, soft_wrap=False)


def markdown_sections(secs: list[Section]) -> list[str]:
    lines = []
    for s in secs:
        lines += ["", f"## {s.title}", "", "| " + " | ".join(s.headers) + " |",
                  "|" + "".join("---|" if i < s.text_columns else "---:|" for i in range(len(s.headers)))]
        lines += ["| " + " | ".join(row) + " |" for row in s.rows]
        lines += ["", s.caption] if s.caption else []
    return lines


def markdown(result: dict) -> str:
    lines = ["# dmf bench", "", *(f"{line}  " for line in machine_lines(result)), "", *partial_lines(result)]
    if result.get("matmul_peak_gflops"):
        lines.append(f"Measured fp32 GEMM peak: {result['matmul_peak_gflops']:.1f} GFLOP/s.")
    for fusion, flops in (result.get("flops_per_sample") or {}).items():
        if flops:
            lines.append(f"Model FLOPs per sample ({fusion}): {flops / 1e9:.2f} GFLOP.")
    if result.get("paper_ms_per_sample"):
        lines += ["", "Paper: 91 ms (memory) / 63 ms (naive) per sample on NVIDIA M40/T4 GPUs."]
    else:
        lines += ["", "Not the paper's model shape: no comparison with the paper's 91 / 63 ms."]
    lines += markdown_sections(sections(result))
    lines += ["", *noise_lines(result)] if noise_lines(result) else []
    if result.get("skipped"):
        lines += ["", "## Skipped", ""] + [f"- {line}" for line in skipped_lines(result)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------- plot
def _baseline_for_labels(rows: list[BenchRow]) -> str | None:
    """The baseline written on the bars: torch-bf16 when it ran, else torch, else none."""
    engines = {r.engine for r in rows}
    return next((b for b in reversed(BASELINES) if b in engines), None)


def bar_label(result: dict, row: BenchRow, baseline: str | None) -> str:
    """'2.3x bf16': the paired ratio when there is one, else the ratio of the p50s."""
    if baseline is None:
        return ""
    if row.engine == baseline:
        return "baseline"
    paired = next((r["median"] for r in result.get("ratios") or [] if r["kind"] == "speedup"
                   and (r["engine"], r["baseline"], r["fusion"], r["batch_size"])
                   == (row.engine, baseline, row.fusion, row.batch_size)), None)
    value = paired if paired is not None else row.speedup.get(baseline)
    return "" if value is None else f"{value:.1f}x {BASELINE_SHORT.get(baseline, baseline)}"


def _bar_plot(fig, ax, result: dict) -> None:
    """One batch size: a horizontal bar per (engine, fusion), fusions side by side per engine."""
    rows: list[BenchRow] = result["rows"]
    engines = sorted({r.engine for r in rows}, key=_engine_order)
    fusions = sorted({r.fusion for r in rows}, key=lambda f: (f != "memory", f != "naive", f))
    baseline = _baseline_for_labels(rows)
    height = 0.8 / len(fusions)
    right = max(r.latency.p95_ms_per_sample for r in rows)
    for j, fusion in enumerate(fusions):
        mine = sorted((r for r in rows if r.fusion == fusion), key=lambda r: _engine_order(r.engine))
        ys = [engines.index(r.engine) + (j - (len(fusions) - 1) / 2) * height for r in mine]
        stats = [r.latency for r in mine]
        p50 = [s.p50_ms_per_sample for s in stats]
        err = [[s.p50_ms_per_sample - s.p5_ms_per_sample for s in stats],
               [s.p95_ms_per_sample - s.p50_ms_per_sample for s in stats]]
        ax.barh(ys, p50, height=height * 0.9, xerr=err, capsize=3, label=fusion,
                color=FUSION_COLOURS[j % len(FUSION_COLOURS)], error_kw={"elinewidth": 1, "ecolor": "black"})
        for y, r in zip(ys, mine):
            ax.text(r.latency.p95_ms_per_sample + right * 0.015, y, bar_label(result, r, baseline), va="center",
                    fontsize=8)
    for fusion, ms in (result.get("paper_ms_per_sample") or {}).items():
        colour = FUSION_COLOURS[fusions.index(fusion) % len(FUSION_COLOURS)] if fusion in fusions else "grey"
        ax.axvline(ms, color=colour, linestyle=":", linewidth=1.2, label=f"paper {fusion}: {ms:g} ms (GPU)")
        right = max(right, ms)
    ax.set_yticks(range(len(engines)), engines)
    ax.invert_yaxis()  # engines read top-down in the bench's order, torch first
    ax.set_xlim(0, right * 1.25)  # room for the labels after the whiskers
    ax.set_xlabel("ms per sample (bar: p50; whiskers: p5-p95)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.set_size_inches(8, 1.8 + 0.55 * len(engines) * max(1.0, len(fusions) / 1.5))


def _line_plot(fig, ax, result: dict) -> None:
    """Several batch sizes: p50 latency per sample vs batch, one line per (engine, fusion), the
    p5-p95 band shaded; batch sizes are the x ticks."""
    from matplotlib.ticker import NullLocator

    rows: list[BenchRow] = result["rows"]
    series: dict[tuple[str, str], list[BenchRow]] = {}
    for r in rows:
        series.setdefault((r.engine, r.fusion), []).append(r)
    for (engine, fusion), points in sorted(series.items(), key=lambda kv: (_engine_order(kv[0][0]), kv[0][1])):
        points.sort(key=lambda r: r.batch_size)
        xs = [r.batch_size for r in points]
        colour = f"C{_engine_order(engine) % 10}"
        ax.plot(xs, [r.latency.p50_ms_per_sample for r in points], marker="o", color=colour,
                linestyle="-" if fusion == "memory" else "--", label=f"{engine} / {fusion}")
        ax.fill_between(xs, [r.latency.p5_ms_per_sample for r in points],
                        [r.latency.p95_ms_per_sample for r in points], color=colour, alpha=0.08, linewidth=0)
    for fusion, ms in (result.get("paper_ms_per_sample") or {}).items():
        ax.axhline(ms, color="grey", linewidth=0.8, linestyle=":")
        ax.text(0.01, ms, f"paper {fusion}: {ms:g} ms (GPU)", transform=ax.get_yaxis_transform(), fontsize=8,
                color="grey", va="bottom")
    batches = sorted({r.batch_size for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.xaxis.set_minor_locator(NullLocator())
    values = [v for r in rows for v in (r.latency.p5_ms_per_sample, r.latency.p95_ms_per_sample)]
    _readable_y_axis(ax, values + list((result.get("paper_ms_per_sample") or {}).values()))
    ax.set_xlabel("batch size")
    ax.set_ylabel("ms per sample (line: p50; band: p5-p95)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: never over a line
    fig.set_size_inches(10, 5)


def _readable_y_axis(ax, values: list[float]) -> None:
    """Linear from 0 when the values are within 20x of each other; else a log axis ticked
    1 2 5 10 20 50 ... in plain numbers (not 10^1)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    if max(values) / max(min(values), 1e-9) > 20:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    else:
        ax.set_ylim(0, max(values) * 1.1)


def plot(result: dict, path: Path) -> None:
    """bench.png: bars for one batch size, latency-vs-batch lines for several; written atomically."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    batches = sorted({r.batch_size for r in result["rows"]})
    (_bar_plot if len(batches) == 1 else _line_plot)(fig, ax, result)
    where = f", batch {batches[0]}" if len(batches) == 1 else ""
    cpu = textwrap.fill(result["machine"].get("cpu_line") or "", 90)
    ax.set_title(f"dmf bench{where}: latency per sample\n{cpu}", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def write_outputs(result: dict, out_dir: Path, plot_too: bool = True) -> dict[str, Path]:
    """bench.json, bench.md and (when anything was timed and plot_too) bench.png under out_dir, each
    atomically: a run rewrites the first two after each batch size, so a reader never sees half a file."""
    out_dir = Path(out_dir)
    paths = {"json": out_dir / "bench.json", "md": out_dir / "bench.md"}
    atomic_write_text(paths["json"], json.dumps(result, indent=2, default=json_default))
    atomic_write_text(paths["md"], markdown(result))
    if result["rows"] and plot_too:
        paths["png"] = out_dir / "bench.png"
        plot(result, paths["png"])
    return paths


# ------------------------------------------------------------------------------------ batcher
def batcher_section(result: dict) -> Section:
    """`dmf bench ARTIFACT --batcher`: sequential batch-1 calls against the micro-batcher."""
    rows = [[f"sequential batch-1 {name}", f"{r['throughput_rps']:.1f}", f"{r['p50_ms']:.1f}", f"{r['p95_ms']:.1f}",
             f"{r['p99_ms']:.1f}", "1.0", "-"] for name, r in result["sequential"].items()]
    rows += [[f"batcher x{r['concurrency']} clients, workers={r['workers']}, threads={r['threads']}, "
              f"max_batch={r['max_batch']}", f"{r['throughput_rps']:.1f}", f"{r['p50_ms']:.1f}", f"{r['p95_ms']:.1f}",
              f"{r['p99_ms']:.1f}", f"{r['mean_batch_size']:.1f}", f"{r['speedup_vs_baseline']:.2f}x"]
             for r in result["batcher"]]
    engine = result.get("engine") or {}
    return Section(f"Micro-batcher: {result['artifact']} ({engine.get('name')}, {engine.get('providers')})",
                   ["mode", "req/s", "p50 ms", "p95", "p99", "batch", "speedup"], rows,
                   f"latency per request, submit to result; best speedup vs {result['baseline']}: "
                   f"{result['speedup']:.2f}x")


def print_batcher(console, result: dict) -> None:
    for line in machine_lines(result):
        console.print(line, markup=False)
    print_sections(console, [batcher_section(result)])


def write_batcher_outputs(result: dict, out_dir: Path) -> dict[str, Path]:
    """batcher.json and batcher.md under out_dir, each atomically."""
    out_dir = Path(out_dir)
    paths = {"json": out_dir / "batcher.json", "md": out_dir / "batcher.md"}
    atomic_write_text(paths["json"], json.dumps(result, indent=2, default=str))
    md = ["# dmf bench --batcher", "", *(f"{line}  " for line in machine_lines(result)),
          *markdown_sections([batcher_section(result)])]
    atomic_write_text(paths["md"], "\n".join(md) + "\n")
    return paths
