"""The harness end to end on the trained demo model with tiny repeats: files and their structure,
never timings; accuracy only where it can disagree. The onnxruntime test exports a bundle (tens of
seconds on 2 cores) and is marked slow."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from ldseg.bench.accuracy import ONE_CLASS_NOTE, RANDOM_WEIGHTS_NOTE, REFERENCE_NOTE, row_accuracy, untrained_note
from ldseg.bench.harness import BenchOptions, run_benchmark
from ldseg.bench.pipeline import STAGES as PIPELINE_STAGES
from ldseg.bench.plots import PLOT_FILES
from ldseg.bench.report import performance_section
from ldseg.bench.targets import Target
from ldseg.cli.bench import bench_typer
from ldseg.data.phantoms import make_phantom, write_phantom_nifti
from ldseg.errors import InputError, OutputError
from ldseg.export.manifest import build_manifest, graph_entry, with_validation, write_manifest
from ldseg.export.specs import graph_specs
from ldseg.metrics import dice_per_class
from ldseg.model.config import get_preset
from ldseg.model.network import COMPONENTS
from ldseg.runs.inference import segment_prepared
from ldseg.runs.types import RunOptions
from ldseg.runs.volumes import prepare
from ldseg.runtime.artifacts.source import load_model
from ldseg.runtime.backend import STAGES
from ldseg.runtime.backends.torch.backend import TorchBackend
from ldseg.runtime.backends.torch.compile import Compiled
from tests.helpers import assert_several_classes

REPO = Path(__file__).resolve().parents[2]
TINY = {
    "checkpoint": "demo",
    "backends": ("torch",),
    "steps": (15,),
    "batch": (1,),
    "repeat": 2,
    "warmup": 1,
    "probe_size": 128,
    "probe_repeat": 2,
}
SUMMARY_KEYS = {"p50", "p95", "p99", "min", "mean", "n"}
TOP_KEYS = {
    "schema",
    "created",
    "machine",
    "versions",
    "git",
    "device",
    "timer",
    "model",
    "inputs",
    "options",
    "reference",
    "peaks",
    "skipped",
    "rows",
}
ROW_KEYS = {
    "label",
    "backend",
    "precision",
    "mode",
    "device",
    "describe",
    "source",
    "reference",
    "steps",
    "batch",
    "repeat",
    "warmup",
    "end_to_end",
    "stages",
    "backend_stage_ms_p50",
    "peak_dtype",
    "memory",
    "throughput_volumes_per_s",
    "speedup_vs_reference",
    "accuracy",
    "executed_flops",
    "pipeline",
}


@pytest.fixture(scope="module")
def labelled_data(tmp_path_factory) -> Path:
    """images/ + labels/ as in ../shared/data/knee: two off-grid phantoms and their truth."""
    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    for seed in (1, 2):
        name = f"p{seed}.nii.gz"
        write_phantom_nifti(
            make_phantom(seed, (30, 60, 70)), root / "images" / name, root / "labels" / name, overwrite=False
        )
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, labelled_data: Path) -> Path:
    out = tmp_path_factory.mktemp("bench") / "cpu-run"
    assert run_benchmark(BenchOptions(output=out, data=labelled_data, **TINY)) == out  # type: ignore[arg-type]
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
    assert res["schema"] == "ldseg-bench/2" and res["device"] == "cpu" and res["timer"] == "perf_counter"
    assert res["machine"]["cpu"] and res["machine"]["cores_logical"] >= 1
    assert res["versions"]["torch"] and res["git"]["commit"]
    assert res["peaks"]["fp32"]["gflops"] > 0 and res["peaks"]["fp32"]["size"] == 128
    assert res["model"]["preset"] == "demo" and res["model"]["checkpoint_sha256"]
    assert res["inputs"]["files"] == ["p1.nii.gz"] and res["inputs"]["labels"].endswith("labels")
    row, lean = res["rows"]  # the official form (the reference), then the lean form ldseg-run runs
    assert set(row) == set(lean) == ROW_KEYS
    assert row["reference"] and row["label"] == "torch/fp32/eager" and row["speedup_vs_reference"] == 1.0
    assert (row["steps"], row["batch"], row["repeat"]) == (15, 1, 2)
    _check_timed(row["end_to_end"], 2)
    assert list(row["stages"]) == list(STAGES)
    for block in row["stages"].values():
        _check_timed(block, 2)
    assert row["stages"]["loop"]["flops"] == 15 * row["stages"]["step"]["flops"]
    assert row["end_to_end"]["flops"] == sum(row["stages"][s]["flops"] for s in ("encoder", "loop", "decoder"))
    assert row["executed_flops"] == row["end_to_end"]["flops"]  # the reference runs the official form
    assert lean["label"] == "torch/fp32/eager-lean" and lean["describe"]["form"] == "lean"
    assert lean["stages"]["decoder"]["flops"] == row["stages"]["decoder"]["flops"]  # rates: the reference count
    assert lean["executed_flops"] < lean["end_to_end"]["flops"]  # phase-form upsampling
    assert lean["accuracy"]["note"] is None and lean["accuracy"]["agreement"] >= 0.999, lean["accuracy"]
    accuracy = row["accuracy"]
    assert accuracy["note"] == REFERENCE_NOTE and accuracy["agreement"] is None  # never compared with itself
    assert_several_classes(accuracy["reference_class_fractions"], "demo model on p1")
    assert row["memory"]["peak_rss_mb"] > 0 and row["memory"]["device_peak_mb"] is None
    assert row["throughput_volumes_per_s"] == pytest.approx(1e3 / row["end_to_end"]["ms"]["p50"])


def test_the_whole_volume_around_the_model(run_dir, labelled_data):
    """--data with 3D volumes: each row times the first volume's read, preprocess, model, postprocess
    and write (ldseg.bench.pipeline), here with the torch backend's own volume ops on the CPU."""
    row = _results(run_dir)["rows"][0]
    whole = row["pipeline"]
    assert whole["file"] == "p1.nii.gz"
    assert sorted(whole["input_shape"]) == sorted(nib.load(labelled_data / "images" / "p1.nii.gz").shape)
    assert whole["volume_ops"] == "TorchVolumeOps on cpu"
    assert list(whole["ms"]) == list(PIPELINE_STAGES)
    assert all(stage["n"] == 2 and stage["p50"] > 0 for stage in whole["ms"].values())
    around = sum(whole["ms"][name]["p50"] for name in PIPELINE_STAGES if name != "read")
    assert whole["over_model"] == pytest.approx(around / whole["ms"]["model"]["p50"]) and whole["over_model"] > 1
    assert "## Whole volume" in (run_dir / "results.md").read_text()


def test_dice_against_the_labels_of_data(run_dir, labelled_data):
    row = _results(run_dir)["rows"][0]
    truth = row["accuracy"]["vs_truth"]
    assert [case["file"] for case in truth["cases"]] == ["p1.nii.gz"] and set(truth["dice"]) == {"1", "2"}
    assert_several_classes(np.asarray(nib.load(labelled_data / "labels" / "p1.nii.gz").dataobj), "truth of p1")
    # The trained demo model segments phantoms (README: mean Dice 0.919 at 15 steps on seeds 0-9).
    assert min(truth["dice"].values()) >= 0.85, truth


def test_dice_vs_truth_scores_what_ldseg_run_writes(run_dir, labelled_data):
    model = load_model("demo")
    prepared = prepare(labelled_data / "images" / "p1.nii.gz", model.cfg)
    truth = np.asarray(nib.load(labelled_data / "labels" / "p1.nii.gz").dataobj)
    for row, lean in zip(_results(run_dir)["rows"], (False, True)):
        backend = TorchBackend(model, lean=lean)
        outputs, _ = segment_prepared(prepared, backend, model.cfg, RunOptions(steps=15, seed=0))
        expected = {str(c): d for c, d in dice_per_class(outputs["_seg"][0], truth, 3).items()}
        assert row["accuracy"]["vs_truth"]["dice"] == pytest.approx(expected, abs=1e-12)


def test_a_missing_label_is_one_clear_error(labelled_data, tmp_path):
    data = tmp_path / "data"
    (data / "labels").mkdir(parents=True)
    (data / "images").symlink_to(labelled_data / "images")
    with pytest.raises(InputError, match=r"labels: no label for p1\.nii\.gz"):
        run_benchmark(BenchOptions(output=tmp_path / "out", data=data, **TINY))  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()


def test_a_bundle_without_decoder_is_refused_before_timing(labelled_data, tmp_path):
    model = load_model("demo")
    bundle = tmp_path / "no-decoder"
    bundle.mkdir()
    entries = {}
    for name, spec in graph_specs(model.cfg).items():
        if name != "decoder":  # placeholders: the refusal comes before any graph is loaded
            (bundle / spec.file).write_bytes(f"placeholder {name}".encode())
            entries[name] = graph_entry(spec, exporter="dynamo", fallback_reason=None, precision="fp32")
    manifest = build_manifest(model, entries, folder=bundle, precision="fp32", opset=18, batch=1)
    verdict = {"verdict": "passed", "by": "this test (placeholder graphs)", "summary": "not run"}
    write_manifest(bundle, with_validation(manifest, verdict))  # the loaders accept it; the decoder check refuses
    options = {**TINY, "backends": ("onnxruntime",)}
    with pytest.raises(InputError, match="needs the bundle's decoder graph"):
        run_benchmark(BenchOptions(output=tmp_path / "out", data=labelled_data, bundle=bundle, **options))  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()


def test_accuracy_only_where_it_can_disagree():
    cfg = get_preset("demo")
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 3, (1, *cfg.image_size)).astype(np.uint8)
    other = ref.copy()
    other[0, 0] = (other[0, 0] + 1) % 3  # one slice of 32 differs
    acc = row_accuracy(other, ref, cfg, is_reference=False, weights_note=None, vs_truth=None)
    assert acc["note"] is None and acc["agreement"] == pytest.approx(31 / 32, abs=1e-6)
    assert set(acc["dice"]) == {"1", "2"} and max(acc["dice"].values()) < 1.0
    untrained = untrained_note(dict.fromkeys(COMPONENTS, False))
    assert untrained == RANDOM_WEIGHTS_NOTE
    assert "untrained denoiser" in str(untrained_note({"image_encoder": True, "denoiser": False}))
    assert untrained_note({"image_encoder": True, "denoiser": True}) is None
    random = row_accuracy(other, ref, cfg, is_reference=False, weights_note=untrained, vs_truth=None)
    assert random["note"] == RANDOM_WEIGHTS_NOTE and random["agreement"] is None and random["dice"] is None
    one_class = np.zeros_like(ref)
    one_class[0, 0, 0, :5] = 1  # 5 voxels of class 1: far below 1 %
    flat = row_accuracy(one_class, one_class, cfg, is_reference=False, weights_note=None, vs_truth=None)
    assert flat["note"] == ONE_CLASS_NOTE and flat["agreement"] is None


def test_random_weight_rows_render_a_note_not_a_number():
    # The committed 2026-11-25 demo run (schema 1) recorded agreement 1.0000 on random weights.
    committed = REPO / "benchmarks" / "results" / "amd-epyc-2c-2026-11-25" / "demo" / "results.json"
    text = performance_section([committed])
    rows = [line for line in text.splitlines() if line.startswith("| demo |")]
    assert len(rows) == 32
    for line in rows:
        assert "1.0000" not in line
        assert RANDOM_WEIGHTS_NOTE in line or f"| {REFERENCE_NOTE} |" in line, line
    assert sum(RANDOM_WEIGHTS_NOTE in line for line in rows) == 16


def test_markdown_and_plots_written(run_dir):
    md = (run_dir / "results.md").read_text()
    assert "| backend | steps | batch | p50 ms |" in md and "torch/fp32/eager (ref)" in md
    assert "Dice vs truth per class" in md and "| reference | – |" in md
    for name in PLOT_FILES:
        assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_performance_section_puts_machine_and_date_on_every_row(run_dir):
    res = _results(run_dir)
    text = performance_section([run_dir, run_dir / "results.json"])
    rows = [line for line in text.splitlines() if line.startswith("| demo |")]
    assert len(rows) == 4  # the reference and the lean row, of each of the two given paths
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
    ref, _, ort = res["rows"]  # the reference, torch's lean form, ONNX Runtime
    assert ref["reference"] and not ort["reference"] and ort["backend"] == "onnxruntime"
    assert (
        list(ort["stages"]) == list(STAGES) and ort["stages"]["encoder"]["flops"] == ref["stages"]["encoder"]["flops"]
    )
    assert ort["speedup_vs_reference"] > 0
    accuracy = ort["accuracy"]
    assert_several_classes(accuracy["reference_class_fractions"], "torch reference on phantom 0")
    assert accuracy["note"] is None and ref["accuracy"]["agreement"] is None
    assert accuracy["agreement"] >= 0.99, f"onnxruntime fp32 vs torch fp32 agreement {accuracy['agreement']}"
    assert accuracy["vs_truth"] is None  # phantoms from seeds: no --data labels
    assert ref["pipeline"] is None and ort["pipeline"] is None  # no volume file to time around the model


@pytest.mark.slow
def test_random_weight_preset_rows_say_agreement_is_not_meaningful(tmp_path):
    options = {**TINY, "checkpoint": None, "preset": "demo", "backends": ("torch", "onnxruntime")}
    res = _results(run_benchmark(BenchOptions(output=tmp_path / "random", **options)))  # type: ignore[arg-type]
    ref, _, ort = res["rows"]
    assert ref["accuracy"]["note"] == REFERENCE_NOTE
    assert ort["accuracy"]["note"] == RANDOM_WEIGHTS_NOTE and ort["accuracy"]["agreement"] is None
    md = (tmp_path / "random" / "results.md").read_text()
    assert f"| {RANDOM_WEIGHTS_NOTE} | – |" in md


def test_torch_bf16_row_beside_the_fp32_reference_with_its_agreement(tmp_path):
    """torch at a reduced precision is a row of its own (precision column, label) scored against the
    FP32 reference; fp16 on the CPU is a skip with its reason, not an error."""
    options = {**TINY, "precisions": ("fp32", "bf16", "fp16"), "repeat": 1, "warmup": 0}
    res = _results(run_benchmark(BenchOptions(output=tmp_path / "bf16", **options)))  # type: ignore[arg-type]
    ref, _, bf16 = res["rows"]  # the reference, the lean fp32 row, bf16 (lean too)
    assert ref["reference"] and ref["precision"] == "fp32"
    assert bf16["precision"] == "bf16" and bf16["label"] == "torch/bf16/eager-lean" and bf16["peak_dtype"] == "bf16"
    assert bf16["describe"]["precision"] == "bf16"
    accuracy = bf16["accuracy"]
    assert_several_classes(accuracy["reference_class_fractions"], "torch fp32 reference on phantom 0")
    assert accuracy["note"] is None and accuracy["agreement"] >= 0.995, accuracy
    assert res["skipped"] == [
        {"backend": "torch", "precision": "fp16", "reason": "the torch backend runs fp32, bf16 on the CPU"}
    ]
    md = (tmp_path / "bf16" / "results.md").read_text()
    assert "torch/bf16/eager-lean" in md


def test_a_compiled_torch_row_says_so_in_its_label():
    model = load_model("demo")
    asked_on_cpu = TorchBackend(model, lean=True, compile=True)  # off here: CUDA only
    assert Target(asked_on_cpu, "demo").label == "torch/fp32/eager-lean"
    compiling = TorchBackend(model, lean=True)
    compiling._decode = Compiled("decoder", compiling.model.label_decoder, enabled=True)  # as on CUDA; never called
    assert Target(compiling, "demo").label == "torch/fp32/eager-lean-compiled"
    with pytest.warns(UserWarning, match="running it eagerly"):
        compiling._decode._fall_back(RuntimeError("no compiler"))  # what a failed compile leaves
    assert Target(compiling, "demo").label == "torch/fp32/eager-lean"
