"""Fake builders for the artifact-cache tests: real manifests and engines.json, placeholder graph and
engine files (their hashes match), written through the staged-folder writer as the real builders do."""

from __future__ import annotations

from pathlib import Path

from ldseg.export.build_options import batch_profile, file_digest, write_engines_json
from ldseg.export.manifest import build_manifest, graph_entry, with_validation, write_manifest
from ldseg.export.specs import graph_specs
from ldseg.export.tensorrt_build import BuildOptions, describe_engine_set
from ldseg.io.atomic import staged_folder
from ldseg.model.config import get_preset
from ldseg.model.network import COMPONENTS, LDSeg
from ldseg.runtime.artifacts.bundle import MANIFEST, load_bundle
from ldseg.runtime.artifacts.cache import BundleKey, Progress
from ldseg.runtime.artifacts.engines import ENGINE_SUFFIX, ENGINES_JSON, EngineFile, Environment

GPU_A = Environment(trt_version="10.13.0.35", gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0")
GPU_B = Environment(trt_version="10.13.0.35", gpu_name="NVIDIA L4", compute_capability="8.9")


def hashed_model(digest: str = "ab" * 32) -> LDSeg:
    """A demo-preset model as if loaded from a checkpoint with content hash `digest`."""
    model = LDSeg(get_preset("demo"), trained={name: True for name in COMPONENTS}).eval()
    model.checkpoint_hash = digest
    return model


class FakeBundleBuilder:
    """Writes a passed-validation bundle with placeholder graphs; counts its calls."""

    def __init__(self) -> None:
        self.calls: list[BundleKey] = []

    def __call__(self, model: LDSeg, target: Path, key: BundleKey, progress: Progress) -> None:
        self.calls.append(key)
        progress(f"exporting {len(graph_specs(model.cfg))} placeholder graphs")
        with staged_folder(target, overwrite=False, marker=MANIFEST) as tmp:
            entries = {}
            for name, spec in graph_specs(model.cfg).items():
                (tmp / spec.file).write_bytes(f"placeholder {name}".encode())
                entries[name] = graph_entry(spec, exporter="dynamo", fallback_reason=None, precision=key.precision)
            manifest = build_manifest(
                model, entries, folder=tmp, precision=key.precision, opset=key.opset, batch=key.batch
            )
            verdict = {"verdict": "passed", "by": "tests/runtime/artifacts/cache_fakes.py", "summary": "placeholders"}
            write_manifest(tmp, with_validation(manifest, verdict))


class FakeEngineBuilder:
    """Writes an engine set for `environment` (placeholder plans), as build_engines would on that GPU."""

    def __init__(self, environment: Environment) -> None:
        self.environment = environment
        self.calls: list[tuple[Path, int, Path]] = []

    def __call__(self, bundle_dir: Path, target: Path, max_batch: int, timing: Path, progress: Progress) -> None:
        self.calls.append((bundle_dir, max_batch, timing))
        bundle = load_bundle(bundle_dir)
        with staged_folder(target, overwrite=False, marker=ENGINES_JSON) as tmp:
            engines, profiles = {}, {}
            for graph in ("encoder", "denoise_step", "decoder", "decoder_argmax"):
                path = tmp / f"{graph}{ENGINE_SUFFIX}"
                path.write_bytes(f"serialized plan of {graph}".encode())
                size, digest = file_digest(path)
                info = bundle.graph(graph)
                engines[graph] = EngineFile(graph, path.name, size, digest, 1.0, info.inputs, info.outputs, None)
                profiles[graph] = batch_profile(info, max_batch)
            options = BuildOptions(bundle.precision, workspace_bytes=None, optimization_level=None, dla_core=None)
            engine_set = describe_engine_set(
                bundle, target, self.environment, profiles, engines, options, cache_path=timing, seconds=1.0
            )
            write_engines_json(tmp, engine_set)


class Notes:
    """A Reporter that keeps what it was told."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.warnings: list[str] = []
        self.builds: list[tuple[str, Path]] = []

    def note(self, line: str) -> None:
        self.lines.append(line)

    def warn(self, line: str) -> None:
        self.warnings.append(line)

    def building(self, action: str, path: Path):  # type: ignore[no-untyped-def]
        import contextlib

        self.builds.append((action, path))
        return contextlib.nullcontext(self.lines.append)
