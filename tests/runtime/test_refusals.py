"""A request a backend cannot honour (precision, K, device) is refused before anything is exported,
built or loaded: torch, ONNX Runtime and OpenVINO here (TensorRT on the emulated GPU:
tests/tensorrt/test_refusals.py). The cache's builders are fakes that count their calls."""

from __future__ import annotations

from pathlib import Path

import pytest

from ldseg.errors import BackendUnavailable
from ldseg.runtime.artifacts.cache import ArtifactCache
from ldseg.runtime.backends.declaration import Request
from ldseg.runtime.select import DECLARATIONS, Source, Wants, select_backend
from tests.runtime.artifacts.cache_fakes import GPU_A, FakeBundleBuilder, FakeEngineBuilder


def cached_source(tmp_path: Path) -> Source:
    artifacts = ArtifactCache(
        tmp_path / "cache", build_bundle=FakeBundleBuilder(), build_engines=FakeEngineBuilder(GPU_A)
    )
    return Source(checkpoint="demo", artifacts=artifacts)


def nothing_built(source: Source) -> bool:
    artifacts = source.artifacts
    assert artifacts is not None
    return artifacts.build_bundle.calls == [] and artifacts.build_engines.calls == []  # type: ignore[attr-defined]


def test_torch_refuses_a_precision_before_loading_the_model() -> None:
    source = Source(checkpoint="demo")
    with pytest.raises(
        BackendUnavailable, match="torch backend runs fp32, bf16 here, not fp16: use --precision auto or fp32"
    ):
        select_backend(source, backend="torch", device="cpu", wants=Wants("fp16"))
    assert "model" not in source._memo  # the checkpoint was never loaded


@pytest.mark.parametrize(
    ("backend", "precision"), [("onnxruntime", "int8"), ("onnxruntime", "fp16"), ("openvino", "int8")]
)
def test_bundle_backends_refuse_a_precision_before_exporting(tmp_path: Path, backend: str, precision: str) -> None:
    source = cached_source(tmp_path)
    with pytest.raises(BackendUnavailable) as refused:
        select_backend(source, backend=backend, device="cpu", wants=Wants(precision))
    if "not installed" not in str(refused.value):  # openvino without a wheel: refused for that, also before export
        assert f"not {precision}: use --precision auto or fp32" in str(refused.value)
    assert nothing_built(source)


def test_openvino_refuses_bf16_on_a_cpu_without_it_before_exporting(tmp_path: Path, monkeypatch) -> None:
    from ldseg.runtime.backends.openvino import backend as openvino_backend

    monkeypatch.setattr(openvino_backend, "cpu_capabilities", lambda core: {"FP32", "INT8"})  # AVX2 only
    monkeypatch.setattr(openvino_backend, "import_openvino", lambda: type("ov", (), {"Core": object}))
    source = cached_source(tmp_path)
    with pytest.raises(BackendUnavailable, match="bf16 needs a CPU with native BF16"):
        select_backend(source, backend="openvino", device="cpu", wants=Wants("bf16"))
    assert nothing_built(source)


def test_a_given_bundle_is_refused_from_its_manifest(tmp_path: Path) -> None:
    from tests.tensorrt.conftest import make_fake_bundle

    bundle = make_fake_bundle(tmp_path / "demo.bundle", precision="fp16")
    with pytest.raises(BackendUnavailable, match="onnxruntime backend runs fp16 here, not int8"):
        select_backend(Source(bundle=bundle), backend="onnxruntime", device="cpu", wants=Wants("int8"))


def test_every_backend_declares_itself() -> None:
    from ldseg.choices import BACKENDS, PRECISIONS

    assert tuple(DECLARATIONS) == BACKENDS
    for declaration in DECLARATIONS.values():
        assert declaration.sources and set(declaration.devices) <= {"cpu", "cuda"}
    request_precisions = DECLARATIONS["torch"].precisions  # every listed precision is one of the one list
    for device in ("cpu", "cuda:0"):
        assert set(request_precisions(Request(Source(checkpoint="demo"), device))) <= set(PRECISIONS)


def test_k_below_one_is_refused() -> None:
    with pytest.raises(BackendUnavailable, match="K must be at least 1"):
        select_backend(Source(checkpoint="demo"), backend="torch", device="cpu", wants=Wants(max_samples=0))


@pytest.mark.parametrize(
    ("backend", "device", "words"),
    [("openvino", "cuda", "runs on the CPU"), ("tensorrt", "cpu", "needs --device cuda")],
)
def test_a_device_a_backend_does_not_run_on_is_refused_before_exporting(tmp_path, backend, device, words) -> None:  # noqa: ANN001
    source = cached_source(tmp_path)
    with pytest.raises(BackendUnavailable, match=words):
        select_backend(source, backend=backend, device=device)
    assert nothing_built(source)
