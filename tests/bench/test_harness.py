"""The harness end to end on the demo preset with tiny repeats: files and their structure, never
timings. The onnxruntime test exports a bundle (tens of seconds on 2 cores) and is marked slow."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from ldseg.cli.bench import bench_typer
from ldseg.bench.harness import BenchOptions, run_benchmark
from ldseg.bench.plots import PLOT_FILES
from ldseg.bench.report import performance_section
from ldseg.runtime.backend import STAGES
from ldseg.errors import InputError, OutputError

TINY = {"preset": "demo", "backends": ("torch",), "steps": (2,), "batch": (1,), "repeat": 2, "warmup": 1, "probe_size": 128, "probe_repeat": 2}
SUMMARY_KEYS = {"p50", "p95", "p99", "min", "mean", "n"}
TOP_KEYS = {"schema", "created", "machine", "versions", "git", "device", "timer", "model", "inputs", "options",
            "reference", "peaks", "skipped", "rows"}
ROW_KEYS = {"label", "backend", "precision", "mode", "device", "describe", "source", "reference", "steps", "batch",
            "repeat", "warmup", "end_to_end", "stages", "backend_stage_ms_p50", "peak_dtype", "memory",
            "throughput_volumes_per_s", "speedup_vs_reference", "accuracy", "executed_flops"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "cpu-run"
    assert run_benchmark(BenchOptions(output=out, **TINY)) == out  # type: ignore[arg-type]
    return out


def _results(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "results.json").read_text())


def _check_timed(block: dict[str, Any], repeat: int) -> None:
    assert set(block) == {"ms", "flops", "gflops_per_s", "roofline"}
    assert set(block["ms"]) == SUMMARY_KEYS and block["ms"]["n"] == repeat
    assert block["ms"]["min"] <= block["ms"]["p50"] <= block["ms"]["p95"] <= block["ms"]["p99"]
    if block["flops"]:
        assert block["gflops_per_s"] > 0 and block["roofline"] > 0
    else:
        assert block["gflops_per_s"] is None and block["roofline"] is None


def test_results_json_structure(run_dir):
    res = _results(run_dir)
    assert set(res) == TOP_KEYS
    assert res["schema"] == "ldseg-bench/1" and res["device"] == "cpu" and res["timer"] == "perf_counter"
    assert res["machine"]["cpu"] and res["machine"]["cores_logical"] >= 1
    assert res["versions"]["torch"] and res["git"]["commit"]
    assert res["peaks"]["fp32"]["gflops"] > 0 and res["peaks"]["fp32"]["size"] == 128
    assert res["model"]["preset"] == "demo" and res["inputs"]["source"] == "phantoms"
    (row,) = res["rows"]  # CPU torch is torch eager: the reference, measured once
    assert set(row) == ROW_KEYS
    assert row["reference"] and row["label"] == "torch/fp32/eager" and row["speedup_vs_reference"] == 1.0
    assert (row["steps"], row["batch"], row["repeat"]) == (2, 1, 2)
    _check_timed(row["end_to_end"], 2)
    assert list(row["stages"]) == list(STAGES)
    for block in row["stages"].values():
        _check_timed(block, 2)
    assert row["stages"]["loop"]["flops"] == 2 * row["stages"]["step"]["flops"]
    assert row["end_to_end"]["flops"] == sum(row["stages"][s]["flops"] for s in ("encoder", "loop", "decoder"))
    assert row["executed_flops"] == row["end_to_end"]["flops"]  # torch runs the reference form
    assert row["accuracy"]["agreement"] == 1.0 and set(row["accuracy"]["dice"]) == {"1", "2"}
    assert row["memory"]["peak_rss_mb"] > 0 and row["memory"]["device_peak_mb"] is None
    assert row["throughput_volumes_per_s"] == pytest.approx(1e3 / row["end_to_end"]["ms"]["p50"])


def test_markdown_and_plots_written(run_dir):
    md = (run_dir / "results.md").read_text()
    assert "| backend | steps | batch | p50 ms |" in md and "torch/fp32/eager (ref)" in md
    for name in PLOT_FILES:
        assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_performance_section_puts_machine_and_date_on_every_row(run_dir):
    res = _results(run_dir)
    text = performance_section([run_dir, run_dir / "results.json"])
    rows = [line for line in text.splitlines() if line.startswith("| demo |")]
    assert len(rows) == 2
    for line in rows:
        assert res["machine"]["cpu"] in line and res["created"][:10] in line


def test_refuses_to_overwrite_and_bad_options(run_dir, tmp_path):
    with pytest.raises(OutputError, match="exists"):
        run_benchmark(BenchOptions(output=run_dir, **TINY))  # type: ignore[arg-type]
    with pytest.raises(InputError, match="unknown backend"):
        run_benchmark(BenchOptions(output=tmp_path, backends=("tensorflow",)))
    with pytest.raises(InputError, match="--preset"):
        run_benchmark(BenchOptions(output=tmp_path, preset="demo", checkpoint="demo"))
    result = CliRunner().invoke(bench_typer, ["--steps", "1,x", "-o", str(tmp_path)])
    assert result.exit_code == 2 and "whole numbers" in result.output
    result = CliRunner().invoke(bench_typer, ["--backends", "torch,foo", "-o", str(tmp_path)])
    assert result.exit_code == 2 and "onnxruntime" in result.output


@pytest.mark.slow
def test_onnxruntime_rows_beside_the_reference(tmp_path):
    out = run_benchmark(BenchOptions(output=tmp_path / "ort", **{**TINY, "backends": ("torch", "onnxruntime")}))  # type: ignore[arg-type]
    res = _results(out)
    ref, ort = res["rows"]
    assert ref["reference"] and not ort["reference"] and ort["backend"] == "onnxruntime"
    assert list(ort["stages"]) == list(STAGES) and ort["stages"]["encoder"]["flops"] == ref["stages"]["encoder"]["flops"]
    assert ort["speedup_vs_reference"] > 0
    assert ort["accuracy"]["agreement"] >= 0.99, f"onnxruntime fp32 vs torch fp32 agreement {ort['accuracy']['agreement']}"
