"""ldseg/bench/gpu_check/backend_checks.py on the emulated GPU (tests/tensorrt/emulator.py): the
graphs-vs-eager and K-sample checks pass on the real TensorRTBackend code, fail on a capture that
corrupts the run (issue 26's first-run defect, put back by hand here), and close their backends.

Tolerance: the checks' own, GRAPH_TOLERANCE (1e-6 on probabilities) and identical labels."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ldseg.bench.gpu_check import backend_checks, compare
from ldseg.bench.gpu_check.torch_checks import Checks
from ldseg.runtime.artifacts.source import load_model
from ldseg.runtime.backend import Backend
from ldseg.runtime.backends.tensorrt.backend import TensorRTBackend
from tests.helpers import phantom_images
from tests.tensorrt.emulator import emulated_engine_set, install

pytestmark = pytest.mark.gpu_emulated


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, shipped_demo_bundle: Path) -> Path:
    """A gpu_check folder as --prepare leaves it (phantoms, the fp32 bundle) plus emulator engines."""
    model = load_model("demo")
    folder = tmp_path_factory.mktemp("gpu-check")
    images = phantom_images(model.cfg, range(4))
    truth = np.zeros((4, *model.cfg.image_size), np.uint8)
    np.savez_compressed(folder / "phantoms.npz", seeds=np.arange(4), images=images, truth=truth)
    (folder / "prepared.json").write_text("{}\n")
    bundle = Path(shutil.copytree(shipped_demo_bundle, folder / "demo-fp32"))
    emulated_engine_set(folder / "engines-fp32", bundle, max_batch=4)
    return folder


@pytest.fixture()
def checks(prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Checks:
    monkeypatch.setattr(compare, "GRAPH_TOLERANCE", 1e-6)  # the comparisons live in compare.py
    checks = Checks(prepared, tmp_path / "out", budget_s=600, watchdog=False)
    checks.engines["fp32"] = prepared / "engines-fp32"
    return checks


def test_tensorrt_graphs_equal_eager_on_first_and_repeated_requests(
    checks: Checks, monkeypatch: pytest.MonkeyPatch
) -> None:
    gpu = install(monkeypatch)
    result = backend_checks.tensorrt_graphs(checks, "fp32", "graphs")
    assert result["status"] == "pass", result
    assert result["graphs_on"] and len(result["max_abs_delta_p"]) == len(result["requests"]) == 7
    assert max(result["max_abs_delta_p"]) <= 1e-6 and min(result["labels_equal"]) == 1.0
    assert not gpu.memory, "backend.close() did not run: buffers left"


def test_the_graph_check_catches_a_capture_that_corrupts_the_first_run(
    checks: Checks, monkeypatch: pytest.MonkeyPatch
) -> None:
    install(monkeypatch)
    graph = Backend._graph

    def without_the_copy_in(self, *args):  # type: ignore[no-untyped-def] - the code before issue 26
        captured, _ = graph(self, *args)
        return captured, False

    monkeypatch.setattr(Backend, "_graph", without_the_copy_in)
    result = backend_checks.tensorrt_graphs(checks, "fp32", "graphs")
    assert result["status"] == "fail"
    eager, capturing, replay = result["max_abs_delta_p"][:3]
    assert eager <= 1e-6  # a shape's first request runs eagerly
    assert capturing > 1e-3, f"the capturing (second) request should be off, was {capturing:.3g}"
    assert replay <= 1e-6  # later replays start from their own copy-in


def test_tensorrt_k_samples_within_the_memory_budget(checks: Checks, monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = install(monkeypatch)
    result = backend_checks.tensorrt_graphs(checks, "fp32", "k_samples")
    assert result["status"] == "pass", result
    assert result["samples"] == backend_checks.K_SAMPLES and result["chunk"] == 4  # the profile's max batch
    assert result["memory"] == "measured" and 0 < result["device_bytes_added"] <= result["device_budget_bytes"]
    assert max(result["max_abs_delta_mean_p"]) <= 1e-6 and all(result["votes_equal"])
    kept = result["resident_equal_to_host"]
    assert kept["kept"] == "TrtDeviceArray"  # the sample engines keep them on the GPU
    assert kept["mean"] and kept["votes"] and kept["confidence"] and kept["entropy_max_abs"] <= 1.2e-7
    assert not gpu.memory


def test_backends_are_closed_when_a_check_raises(checks: Checks, monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = install(monkeypatch)

    def broken(*args: object) -> dict[str, object]:
        raise RuntimeError("the check itself failed")

    monkeypatch.setattr(backend_checks, "graphs_match_eager", broken)
    checks.run("tensorrt_fp32_graphs", lambda: backend_checks.tensorrt_graphs(checks, "fp32", "graphs"))
    assert checks.results["tensorrt_fp32_graphs"]["status"] == "fail"
    assert not gpu.memory and not gpu.streams, "a check that raised left its backends open"
    report = json.loads((checks.out_dir / "gpu_check.json").read_text())
    assert "RuntimeError: the check itself failed" in report["checks"]["tensorrt_fp32_graphs"]["error"]


def test_an_engine_build_is_skipped_with_the_reason_when_the_budget_is_short(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install(monkeypatch)  # TensorRT "importable", so only the budget can stop the build
    short = Checks(prepared, tmp_path, budget_s=backend_checks.ENGINE_BUILD_S - 10, watchdog=False)
    result = backend_checks.tensorrt(short, "fp16")
    assert result["status"].startswith("not run: ") and "an engine build needs" in result["status"]
    assert "fp16" not in short.engines
    later = backend_checks.tensorrt_graphs(short, "fp16", "graphs")
    assert later["status"] == "not run: tensorrt_fp16 built no engines"


def test_tensorrt_backend_is_what_the_check_runs(checks: Checks, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check builds the real backend class (no fake layer in between)."""
    install(monkeypatch)
    made: list[type] = []
    init = TensorRTBackend.__init__

    def spy(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        made.append(type(self))
        init(self, *args, **kwargs)

    monkeypatch.setattr(TensorRTBackend, "__init__", spy)
    assert backend_checks.tensorrt_graphs(checks, "fp32", "k_samples")["status"] == "pass"
    assert made == [TensorRTBackend, TensorRTBackend]


def test_tensorrt_volume_ops_row_checks_the_engines_on_their_grid(
    checks: Checks, monkeypatch: pytest.MonkeyPatch
) -> None:
    install(monkeypatch)
    result = backend_checks.tensorrt_volume_ops(checks)
    assert result["status"] == "pass" and result["device"] == "cuda:0"
    assert [c["grid"] for c in result["cases"]] == [[32, 64, 64], [32, 64, 64]]  # the demo engines' grid
    assert all(c["labels_differing"] == 0 and c["image_max_abs"] <= 1e-6 for c in result["cases"])
    checks.engines.pop("fp32")
    assert backend_checks.tensorrt_volume_ops(checks)["status"] == "not run: tensorrt_fp32 built no engines"
