"""Fixtures for the engine-set tests: a fake bundle (real manifest, placeholder graph files) and a
fake engine set, so everything around TensorRT is tested without TensorRT or a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from ldseg.export.build_options import batch_profile, file_digest, write_engines_json
from ldseg.export.manifest import build_manifest, graph_entry, with_validation, write_manifest
from ldseg.export.specs import graph_specs
from ldseg.export.tensorrt_build import BuildOptions, describe_engine_set
from ldseg.model.config import get_preset
from ldseg.model.network import LDSeg
from ldseg.runtime.artifacts.bundle import load_bundle
from ldseg.runtime.artifacts.engines import ENGINE_SUFFIX, EngineFile, Environment

HERE = Environment(trt_version="10.13.0.35", gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0")


def make_fake_bundle(folder: Path, precision: str = "fp32") -> Path:
    """A bundle whose manifest is real and whose graph files are placeholders (hashes match)."""
    model = LDSeg(get_preset("demo")).eval()
    folder.mkdir(parents=True)
    entries = {}
    for name, spec in graph_specs(model.cfg).items():
        (folder / spec.file).write_bytes(f"placeholder {name}".encode())
        entries[name] = graph_entry(spec, exporter="dynamo", fallback_reason=None, precision=precision)
    manifest = build_manifest(model, entries, folder=folder, precision=precision, opset=18, batch=1)
    # Placeholders cannot be run: the fixture records a passed verdict so the loaders accept it.
    verdict = {"verdict": "passed", "by": "tests/tensorrt/conftest.py (placeholder graphs)", "summary": "not run"}
    write_manifest(folder, with_validation(manifest, verdict))
    return folder


def make_fake_engine_set(folder: Path, bundle_dir: Path, env: Environment = HERE, max_batch: int = 2) -> Path:
    bundle = load_bundle(bundle_dir)
    folder.mkdir(parents=True)
    engines, profiles = {}, {}
    for graph in ("encoder", "denoise_step", "decoder", "decoder_argmax"):
        path = folder / f"{graph}{ENGINE_SUFFIX}"
        path.write_bytes(f"serialized plan of {graph}".encode())
        size, digest = file_digest(path)
        info = bundle.graph(graph)
        engines[graph] = EngineFile(graph, path.name, size, digest, 1.5, info.inputs, info.outputs, None)
        profiles[graph] = batch_profile(info, max_batch)
    options = BuildOptions(precision=bundle.precision, workspace_bytes=None, optimization_level=None, dla_core=None)
    es = describe_engine_set(bundle, folder, env, profiles, engines, options, cache_path=None, seconds=6.0)
    write_engines_json(folder, es)
    return folder


@pytest.fixture()
def fake_bundle(tmp_path: Path) -> Path:
    return make_fake_bundle(tmp_path / "demo.bundle")


@pytest.fixture()
def fake_engines(tmp_path: Path, fake_bundle: Path) -> Path:
    return make_fake_engine_set(tmp_path / "demo.engines", fake_bundle)


@pytest.fixture()
def emulated_gpu(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201 - tests/tensorrt/emulator.Emulator
    """cuda-python's runtime and `tensorrt` replaced by the emulator for this test."""
    from tests.tensorrt.emulator import install

    return install(monkeypatch)
