"""PNG plots of one results.json. Uses matplotlib's Agg canvas directly: no pyplot, no global backend."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ldseg.io.atomic import atomic_write

PLOT_FILES = ("latency_by_backend.png", "latency_vs_steps.png", "throughput_vs_batch.png", "stage_breakdown.png")
BREAKDOWN = ("input_copy", "encoder", "loop", "decoder", "output_copy")  # "step" is inside "loop"

Row = dict[str, Any]


def headline(results: dict[str, Any]) -> tuple[int, int]:
    """The (steps, batch) a single-configuration view shows: the model's default step count (else
    the closest measured) at the smallest batch."""
    rows = results["rows"]
    default = results["model"]["default_steps"]
    steps = min({r["steps"] for r in rows}, key=lambda s: (abs(s - default), s))
    return steps, min(r["batch"] for r in rows if r["steps"] == steps)


def labels(rows: list[Row]) -> list[str]:
    return list(dict.fromkeys(r["label"] for r in rows))


def _title(results: dict[str, Any], what: str) -> str:
    host = results["machine"]["gpu"] or results["machine"]["cpu"]
    return f"{results['model']['preset']}: {what}\n{host}, {results['device']}, {results['created'][:10]}"


def _figure(draw: Callable[[Any], None], results: dict[str, Any], what: str) -> Figure:
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    draw(ax)
    ax.set_title(_title(results, what), fontsize=10)
    ax.grid(alpha=0.3)
    return fig


def _latency_by_backend(results: dict[str, Any]) -> Figure:
    steps, batch = headline(results)
    rows = [r for r in results["rows"] if r["steps"] == steps and r["batch"] == batch]

    def draw(ax: Any) -> None:
        p50 = [r["end_to_end"]["ms"]["p50"] for r in rows]
        p95 = [r["end_to_end"]["ms"]["p95"] for r in rows]
        ax.bar(
            [r["label"] for r in rows],
            p50,
            yerr=[[0] * len(rows), [b - a for a, b in zip(p50, p95)]],
            capsize=4,
            color="tab:blue",
        )
        ax.set_ylabel("end-to-end latency, ms (p50, bar to p95)")
        ax.tick_params(axis="x", labelrotation=20)

    return _figure(draw, results, f"latency by backend/precision, {steps} steps, batch {batch}")


def _lines(
    results: dict[str, Any], x_key: str, fixed_key: str, fixed: int, y: Callable[[Row], float], y_label: str
) -> Callable[[Any], None]:
    rows = [r for r in results["rows"] if r[fixed_key] == fixed]

    def draw(ax: Any) -> None:
        for label in labels(rows):
            mine = sorted((r for r in rows if r["label"] == label), key=lambda r: r[x_key])
            ax.plot([r[x_key] for r in mine], [y(r) for r in mine], marker="o", label=label)
        ax.set_xticks(sorted({r[x_key] for r in rows}))
        ax.set_ylim(bottom=0)
        ax.set_xlabel(x_key)
        ax.set_ylabel(y_label)
        ax.legend(fontsize=8)

    return draw


def _latency_vs_steps(results: dict[str, Any]) -> Figure:
    batch = min(r["batch"] for r in results["rows"])
    latency = _lines(
        results, "steps", "batch", batch, lambda r: r["end_to_end"]["ms"]["p50"], "end-to-end latency, ms (p50)"
    )
    return _figure(latency, results, f"latency vs sampling steps, batch {batch}")


def _throughput_vs_batch(results: dict[str, Any]) -> Figure:
    steps, _ = headline(results)
    throughput = _lines(
        results,
        "batch",
        "steps",
        steps,
        lambda r: r["throughput_volumes_per_s"],
        "throughput, volumes/s (at p50 latency)",
    )
    return _figure(throughput, results, f"throughput vs batch, {steps} steps")


def _stage_breakdown(results: dict[str, Any]) -> Figure:
    steps, batch = headline(results)
    rows = [r for r in results["rows"] if r["steps"] == steps and r["batch"] == batch]

    def draw(ax: Any) -> None:
        left = [0.0] * len(rows)
        names = [r["label"] for r in rows]
        for stage in BREAKDOWN:
            widths = [r["stages"][stage]["ms"]["p50"] for r in rows]
            ax.barh(names, widths, left=left, label=stage)
            left = [a + b for a, b in zip(left, widths)]
        ax.set_xlabel("ms (p50 of each stage timed alone)")
        ax.legend(fontsize=8)

    return _figure(draw, results, f"stage breakdown, {steps} steps, batch {batch}")


def write_plots(results: dict[str, Any], out_dir: Path, overwrite: bool) -> list[Path]:
    makers = (_latency_by_backend, _latency_vs_steps, _throughput_vs_batch, _stage_breakdown)
    written = []
    for name, make in zip(PLOT_FILES, makers):
        fig = make(results)

        def save(tmp: Path, fig: Figure = fig) -> None:
            fig.savefig(tmp, dpi=110, format="png")

        atomic_write(out_dir / name, save, overwrite)
        written.append(out_dir / name)
    return written
