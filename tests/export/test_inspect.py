"""ldseg/export/inspect.py: a readable summary of a bundle, damaged ones included."""

from __future__ import annotations

import shutil
from pathlib import Path

from rich.console import Console

from ldseg.export import inspect_bundle
from ldseg.export.inspect import graph_stats


def _render(path: Path) -> str:
    console = Console(record=True, width=240)
    console.print(inspect_bundle(path))
    return console.export_text()


def test_summary_lists_manifest_graphs_ops_and_parameters(demo_bundle: Path) -> None:
    text = _render(demo_bundle)
    for expected in (
        "ldseg-bundle/1",
        "demo (3D, 3 classes)",
        "fp32",
        "ddim, 15 steps",
        "denoise_step",
        "coeffs float32[batch, 4]",
        "labels uint8",
        "Conv",
        "dynamo",
        "ok",
    ):
        assert expected in text, expected
    assert "MISMATCH" not in text


def test_graph_stats_count_ops_and_parameters(demo_bundle: Path) -> None:
    ops, params, nbytes = graph_stats(demo_bundle / "decoder.onnx")
    assert ops["Conv"] > 0 and ops["Softmax"] == 1
    assert params > 10_000 and nbytes["float32"] >= 4 * (params - 100)


def test_tampered_file_is_shown_not_raised(demo_bundle: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(demo_bundle, tmp_path / "copy"))
    with open(copy / "encoder.onnx", "ab") as handle:
        handle.write(b"\0")
    assert "MISMATCH" in _render(copy)
