"""The small volume and sample graphs kept serialized in the artifact cache (ldseg/runtime/artifacts/
graph_cache.py): ONNX Runtime's volume ops and sample graphs read them there, so a second process
makes its sessions without importing onnx, and what it reads is exactly what the builders make."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ldseg.data.phantoms import blurred_probabilities, make_phantom
from ldseg.io.preprocess import image_to_model_grid, probabilities_to_input_grid
from ldseg.runtime import sample_graphs, volume_graphs
from ldseg.runtime.artifacts.cache import GRAPHS
from ldseg.runtime.artifacts.cache_listing import clear, list_entries
from ldseg.runtime.artifacts.code_digest import code_digest
from ldseg.runtime.artifacts.graph_cache import BUILDERS, builders_digest
from ldseg.runtime.backends.onnxruntime.samples import OrtSampleGraphs
from ldseg.runtime.backends.onnxruntime.volume import OrtVolumeOps
from ldseg.runtime.volume_ops import EXACT

CPU = [("CPUExecutionProvider", {})]
ROOT = Path(__file__).resolve().parents[3]
# Every small graph ONNX Runtime makes, as the builders make them (the volume graphs in EXACT).
EXPECTED = {
    "to_model_grid": lambda: volume_graphs.to_model_grid_graph(EXACT),
    "class_step": lambda: volume_graphs.class_step_graph(EXACT),
    "map": lambda: volume_graphs.map_graph(EXACT),
    "accumulate-3": lambda: sample_graphs.accumulate_graph(3),
    "mean": sample_graphs.mean_graph,
    "class_max": sample_graphs.class_max_graph,
    "entropy-3": lambda: sample_graphs.entropy_graph(3),
}

# One process: every small session made on the CPU provider with the cache at argv[1], a phantom's
# volume ops run; prints whether onnx was imported and the results' digest.
CHILD = """
import hashlib, json, sys
from pathlib import Path
import numpy as np
from ldseg.data.phantoms import blurred_probabilities, make_phantom
from ldseg.runtime.backends.onnxruntime.samples import OrtSampleGraphs
from ldseg.runtime.backends.onnxruntime.volume import OrtVolumeOps
cache = Path(sys.argv[1])
ops = OrtVolumeOps([("CPUExecutionProvider", {})], "cpu", cache)
raw = make_phantom(3, (20, 36, 40)).image.transpose(2, 1, 0).astype(np.int16)
probs = blurred_probabilities(make_phantom(4, (16, 32, 32)).label, 3, sigma=1.0)
out = [ops.to_model_grid(raw, (16, 32, 32)), ops.labels_on_input_grid(probs, raw.shape),
       ops.map_on_input_grid(probs[1], raw.shape)]
graphs = OrtSampleGraphs([("CPUExecutionProvider", {})], ("cpu", 0), cache)
graphs.accumulate(3), graphs.mean, graphs.class_max, graphs.entropy(3)
digest = hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes() for a in out)).hexdigest()
print(json.dumps({"onnx": "onnx" in sys.modules, "digest": digest}))
"""


def child(cache: Path) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(cache)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def make_every_session(cache: Path) -> None:
    ops = OrtVolumeOps(CPU, "cpu", cache)
    ops._pre, ops._class_step, ops._map  # noqa: B018 (made on first use)
    graphs = OrtSampleGraphs(CPU, ("cpu", 0), cache)
    graphs.accumulate(3), graphs.mean, graphs.class_max, graphs.entropy(3)


def test_a_second_process_reads_the_graphs_and_never_imports_onnx(tmp_path: Path) -> None:
    first, second = child(tmp_path), child(tmp_path)
    assert first["onnx"] is True  # built: the builders import onnx
    assert second["onnx"] is False, "the cached graphs were built again"
    assert second["digest"] == first["digest"]


def test_the_cached_graphs_are_exactly_what_the_builders_make(tmp_path: Path) -> None:
    make_every_session(tmp_path)
    digest = builders_digest()
    kept = {p.name: p.read_bytes() for p in (tmp_path / GRAPHS).iterdir()}
    assert kept == {f"{name}-{digest}.onnx": build().SerializeToString() for name, build in EXPECTED.items()}


def test_entries_are_named_by_the_builders_source_so_a_changed_builder_is_a_new_entry() -> None:
    assert BUILDERS == ("runtime/volume_graphs.py", "runtime/sample_graphs.py")
    assert builders_digest() == code_digest(*BUILDERS)  # which changes with them: test_code_digest.py


def test_a_damaged_entry_is_built_again_and_the_volume_comes_out_right(tmp_path: Path) -> None:
    make_every_session(tmp_path)
    entry = tmp_path / GRAPHS / f"to_model_grid-{builders_digest()}.onnx"
    entry.write_bytes(entry.read_bytes()[:100])  # truncated
    raw = make_phantom(3, (20, 36, 40)).image.transpose(2, 1, 0).astype(np.int16)
    got = OrtVolumeOps(CPU, "cpu", tmp_path).to_model_grid(raw, (16, 32, 32))
    assert float(np.abs(got - image_to_model_grid(raw, (16, 32, 32))).max()) <= 1e-6
    assert entry.read_bytes() == EXPECTED["to_model_grid"]().SerializeToString()


def test_a_cache_that_cannot_be_written_keeps_nothing_and_the_run_goes_on(tmp_path: Path) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    ops = OrtVolumeOps(CPU, "cpu", blocked / "cache")
    probs = blurred_probabilities(make_phantom(4, (16, 32, 32)).label, 3, sigma=1.0)
    labels = ops.labels_on_input_grid(probs, (20, 36, 40))
    np.testing.assert_array_equal(labels, probabilities_to_input_grid(probs, (20, 36, 40)))


def test_cache_list_shows_the_graphs_and_clear_removes_them(tmp_path: Path) -> None:
    make_every_session(tmp_path)
    entries = [e for e in list_entries(tmp_path) if e.kind == GRAPHS]
    assert len(entries) == len(EXPECTED) and all(e.bytes > 0 for e in entries)
    removed, busy = clear(tmp_path)
    assert len(removed) == len(EXPECTED) and busy == []
    assert not [p for p in (tmp_path / GRAPHS).iterdir() if p.suffix == ".onnx"]


@pytest.mark.parametrize("backend_cache", [True, False])
def test_the_onnxruntime_backend_keeps_them_in_its_artifact_cache(tmp_path: Path, shipped_demo_bundle, backend_cache):
    from ldseg.runtime.backends.onnxruntime.backend import OnnxRuntimeBackend

    root = tmp_path / "run-cache" if backend_cache else None
    where = root if root is not None else Path(os.environ["LDSEG_CACHE"])
    entry = where / GRAPHS / f"to_model_grid-{builders_digest()}.onnx"
    entry.unlink(missing_ok=True)  # the session's cache may hold it from other tests
    backend = OnnxRuntimeBackend(shipped_demo_bundle, "cpu", device_volume=True, graph_cache=root)
    ops = backend.volume_ops()
    assert ops is not None
    ops.to_model_grid(np.arange(8 * 9 * 10, dtype=np.int16).reshape(8, 9, 10), (16, 16, 16))
    assert entry.is_file()
