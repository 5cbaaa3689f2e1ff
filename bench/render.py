"""Turn a bench result dict into a rich table, bench.json, bench.md and a latency plot."""

from __future__ import annotations

import json
from pathlib import Path

from dmf.config import atomic_write_bytes, atomic_write_text

COLUMNS = [  # (key, header, format): narrow headers so the table fits an 80-column terminal
    ("engine", "engine", "{}"), ("fusion", "fusion", "{}"), ("batch_size", "B", "{}"),
    ("p50_ms_per_sample", "p50 ms", "{:.1f}"), ("p95_ms_per_sample", "p95", "{:.1f}"),
    ("p99_ms_per_sample", "p99", "{:.1f}"), ("throughput_per_s", "/s", "{:.1f}"),
    ("speedup_vs_torch", "xtorch", "{:.2f}"), ("speedup_vs_paper", "xpaper", "{:.2f}"),
    ("peak_fraction", "peak", "{:.0%}"),
]


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    return "-" if value is None else fmt.format(value)


def rich_table(result: dict):
    from rich import box
    from rich.table import Table

    table = Table(title="dmf bench (latency in ms per sample)", box=box.SIMPLE_HEAD,
                  caption="xtorch / xpaper: speedup vs torch eager (same run) / the paper's 91 or 63 ms; "
                          "peak: share of the measured GEMM peak",
                  padding=(0, 1))
    for _, header, _ in COLUMNS:
        table.add_column(header, justify="left" if header in ("engine", "fusion") else "right", no_wrap=True,
                         min_width=len(header))
    for row in result["rows"]:
        table.add_row(*[_cell(row, key, fmt) for key, _, fmt in COLUMNS])
    return table


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# dmf bench", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads, Python {m['python']}.", ""]
    if result.get("matmul_peak_gflops"):
        lines.append(f"Measured fp32 GEMM peak: {result['matmul_peak_gflops']:.1f} GFLOP/s.")
    for fusion, flops in (result.get("flops_per_sample") or {}).items():
        if flops:
            lines.append(f"Model FLOPs per sample ({fusion}): {flops / 1e9:.2f} GFLOP.")
    lines += ["", "Paper: 91 ms (memory) / 63 ms (naive) per sample on NVIDIA M40/T4 GPUs.", "",
              "| " + " | ".join(h for _, h, _ in COLUMNS) + " |",
              "|" + "---|" * len(COLUMNS)]
    for row in result["rows"]:
        lines.append("| " + " | ".join(_cell(row, k, f) for k, _, f in COLUMNS) + " |")
    if result.get("skipped"):
        lines += ["", "Skipped:", ""]
        lines += [f"- {s['engine']} ({s['fusion']}): {s['reason']}" for s in result["skipped"]]
    overhead = memory_overhead(result)
    if overhead:
        lines += ["", "Memory fusion over naive fusion (p50 per sample, same engine and batch):", ""]
        lines += [f"- {k}: {v:+.1f}%" for k, v in overhead.items()]
    return "\n".join(lines) + "\n"


def memory_overhead(result: dict) -> dict[str, float]:
    """{"onnx b1": +1.2, ...}: the cost of memory fusion over naive, in percent (paper: +44%)."""
    p50 = {(r["engine"], r["fusion"], r["batch_size"]): r["p50_ms_per_sample"] for r in result["rows"]}
    out = {}
    for (engine, fusion, batch), value in p50.items():
        naive = p50.get((engine, "naive", batch))
        if fusion == "memory" and naive:
            out[f"{engine} b{batch}"] = 100.0 * (value / naive - 1.0)
    return out


def plot(result: dict, path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for r in result["rows"]:
        series.setdefault((r["engine"], r["fusion"]), []).append((r["batch_size"], r["p50_ms_per_sample"]))
    for (engine, fusion), points in sorted(series.items()):
        points.sort()
        ax.plot([b for b, _ in points], [v for _, v in points], marker="o",
                linestyle="-" if fusion == "memory" else "--", label=f"{engine} / {fusion}")
    for fusion, ms in result.get("paper_ms_per_sample", {}).items():
        ax.axhline(ms, color="grey", linewidth=0.8, linestyle=":")
        ax.text(0.01, ms, f"paper {fusion}: {ms:.0f} ms", transform=ax.get_yaxis_transform(),
                fontsize=8, color="grey", va="bottom")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("p50 latency per sample (ms)")
    ax.set_title("dmf bench")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def write_outputs(result: dict, out_dir: Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    paths = {"json": out_dir / "bench.json", "md": out_dir / "bench.md", "png": out_dir / "bench.png"}
    atomic_write_text(paths["json"], json.dumps(result, indent=2, default=str))
    atomic_write_text(paths["md"], markdown(result))
    if result["rows"]:
        plot(result, paths["png"])
    return paths
