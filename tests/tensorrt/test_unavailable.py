"""Without real TensorRT (this machine: only tensorrt-stubs, no GPU) every entry point says why."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from ldseg.errors import ArtifactError, BackendUnavailable, OutputError
from ldseg.export.tensorrt_build import build_engines
from ldseg.runtime.artifacts import engines
from ldseg.runtime.backends.tensorrt import backend as tensorrt_backend
from ldseg.runtime.backends.tensorrt import cuda
from ldseg.runtime.backends.tensorrt.backend import TensorRTBackend, check_usable, parse_device
from ldseg.runtime.backends.tensorrt.probe import detect_environment, require_tensorrt


def _has_real_tensorrt() -> bool:
    try:
        require_tensorrt()
    except BackendUnavailable:
        return False
    return True


no_real_trt = pytest.mark.skipif(_has_real_tensorrt(), reason="real TensorRT is installed here")


@pytest.fixture()
def stub_namespace(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """What `pip install tensorrt-stubs` leaves: `import tensorrt` gives an empty namespace package."""
    package = types.ModuleType("tensorrt")
    package.__path__ = [str(tmp_path / "site-packages" / "tensorrt")]  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", package)


def test_stub_namespace_package_is_not_tensorrt(stub_namespace: None) -> None:
    with pytest.raises(BackendUnavailable) as info:
        require_tensorrt()
    assert "empty package" in str(info.value) and "tensorrt-stubs" in str(info.value)
    assert info.value.exit_code == 6


def test_missing_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    with pytest.raises(BackendUnavailable, match=r"not importable .*pip install -e '\.\[tensorrt\]'"):
        require_tensorrt()


def test_real_looking_module_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("tensorrt")
    fake.Builder = object  # type: ignore[attr-defined]
    fake.__version__ = "10.13.0.35"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    assert require_tensorrt() is fake


def test_tensorrt_without_cuda_python_or_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("tensorrt")
    fake.Builder = object  # type: ignore[attr-defined]
    fake.__version__ = "10.13.0.35"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setitem(sys.modules, "cuda", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    cuda.runtime.cache_clear()
    try:
        with pytest.raises(BackendUnavailable, match="cuda-python is not installed"):
            detect_environment()
    finally:
        cuda.runtime.cache_clear()


def test_no_gpu_is_backend_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda, "device_count", lambda: 0)
    with pytest.raises(BackendUnavailable, match="no CUDA GPU is visible"):
        cuda.gpu_info(0)


@no_real_trt
def test_build_engine_check_needs_tensorrt(fake_engines: Path) -> None:
    """The real `ldseg-export build-engine --check`, without TensorRT: refused with the reason."""
    from typer.testing import CliRunner

    from ldseg.cli.export import export_typer

    result = CliRunner().invoke(export_typer, ["build-engine", "--check", str(fake_engines)])
    assert isinstance(result.exception, BackendUnavailable) and "TensorRT is not" in str(result.exception)


@no_real_trt
def test_backend_refuses_without_tensorrt(fake_engines: Path) -> None:
    with pytest.raises(BackendUnavailable, match="TensorRT is not"):
        TensorRTBackend(fake_engines)


@no_real_trt
def test_build_needs_tensorrt_and_leaves_nothing(fake_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "engines"
    with pytest.raises(BackendUnavailable, match="TensorRT is not"):
        build_engines(fake_bundle, out)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".engines")]


def test_build_checks_precision_and_output_before_tensorrt(fake_bundle: Path, tmp_path: Path) -> None:
    # These refusals come first, so they are the same with or without TensorRT.
    with pytest.raises(ArtifactError, match="ldseg-export onnx --precision fp16"):
        build_engines(fake_bundle, tmp_path / "e", precision="fp16")
    with pytest.raises(ArtifactError, match="DLA runs FP16 or INT8 only"):
        build_engines(fake_bundle, tmp_path / "e", dla_core=0)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "engines.json").write_text("{}")
    with pytest.raises(OutputError, match="--overwrite"):
        build_engines(fake_bundle, existing)
    with pytest.raises(ValueError, match="0..5"):
        build_engines(fake_bundle, tmp_path / "e", optimization_level=9)


def test_build_refuses_a_tampered_bundle(fake_bundle: Path, tmp_path: Path) -> None:
    (fake_bundle / "encoder.onnx").write_bytes(b"tampered")
    with pytest.raises(ArtifactError, match="SHA-256"):
        build_engines(fake_bundle, tmp_path / "e")


def test_refusal_kinds() -> None:
    check_usable(Path("e"), [], [])
    with pytest.raises(BackendUnavailable, match="another machine: built with TensorRT .* Rebuild them here"):
        check_usable(Path("e"), ["built with TensorRT 10.3"], [])
    with pytest.raises(ArtifactError, match="refused: x.engine altered"):
        check_usable(Path("e"), ["built with TensorRT 10.3"], ["x.engine altered"])


def test_device_names() -> None:
    assert parse_device("cuda") == 0 and parse_device("cuda:1") == 1
    for bad in ("cpu", "cuda:x", "dla"):
        with pytest.raises(BackendUnavailable, match="NVIDIA GPU"):
            parse_device(bad)


def test_problem_kinds_drive_the_backend_error(fake_engines: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The backend's own constructor, on a faked TensorRT module and GPU: it refuses before touching
    # either. A set built for another GPU is BackendUnavailable (rebuild here); a broken set is
    # ArtifactError, even when it was also built elsewhere.
    fake = types.ModuleType("tensorrt")
    fake.Builder = object  # type: ignore[attr-defined]
    fake.__version__ = "10.13.0.35"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    orin = engines.Environment("10.13.0.35", "Orin", "8.7")
    monkeypatch.setattr(tensorrt_backend, "detect_environment", lambda device=0: orin)
    with pytest.raises(BackendUnavailable, match=r"another machine: built for NVIDIA H100 .* this GPU is Orin"):
        TensorRTBackend(fake_engines)
    (fake_engines / f"encoder{engines.ENGINE_SUFFIX}").write_bytes(b"altered")
    with pytest.raises(ArtifactError, match=r"engine set refused: .*encoder.* SHA-256 does not match"):
        TensorRTBackend(fake_engines)
