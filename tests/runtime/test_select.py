"""runtime/select.py: the auto-selection order, with the GPU and the backends faked."""

from __future__ import annotations

from pathlib import Path

import pytest

from ldseg.errors import BackendUnavailable
from ldseg.model.config import get_preset
from ldseg.runtime import select
from ldseg.runtime.select import Selection, Source, select_backend

class _Fake:
    def __init__(self, name: str, device: str):
        self.name, self.device, self.precision = name, device, "fp32"


class Calls(list[str]):
    """The (backend/device) candidates tried, in order; `allow` lists those that succeed."""

    allow: set[str]


@pytest.fixture
def tried(monkeypatch: pytest.MonkeyPatch) -> Calls:
    calls = Calls()
    calls.allow = allow = set()

    def factory(name: str):
        def make(source: Source, device: str) -> Selection:
            calls.append(f"{name}/{device}")
            if f"{name}/{device}" not in allow:
                raise BackendUnavailable(f"{name} refused on {device}")
            return Selection(_Fake(name, device), get_preset("demo"), "")  # type: ignore[arg-type]

        return make

    monkeypatch.setattr(select, "_FACTORIES", {n: factory(n) for n in ("torch", "onnxruntime", "tensorrt")})
    return calls


@pytest.mark.parametrize(
    ("source", "order"),
    [
        (Source(engines=Path("engines")), ["tensorrt/cuda"]),
        (Source(bundle=Path("bundle")), ["onnxruntime/cuda", "onnxruntime/cpu"]),
        (Source(checkpoint="demo"), ["torch/cuda", "torch/cpu"]),
    ],
)
def test_gpu_first_then_cpu_and_every_skip_is_announced(tried, monkeypatch, source, order):
    monkeypatch.setattr(select, "cuda_available", lambda: True)
    with pytest.raises(BackendUnavailable, match="no backend can run this source") as refused:
        select_backend(source)
    assert tried == order
    for candidate in order:
        name, device = candidate.split("/")
        assert f"{name} refused on {device}" in str(refused.value)


def test_first_available_wins_and_says_what_it_skipped(tried, monkeypatch):
    monkeypatch.setattr(select, "cuda_available", lambda: True)
    tried.allow.add("onnxruntime/cpu")
    chosen = select_backend(Source(bundle=Path("bundle")))
    assert tried == ["onnxruntime/cuda", "onnxruntime/cpu"]
    assert chosen.backend.device == "cpu" and "onnxruntime refused on cuda" in chosen.why


def test_without_a_gpu_only_cpu_candidates(tried, monkeypatch):
    monkeypatch.setattr(select, "cuda_available", lambda: False)
    tried.allow.add("torch/cpu")
    select_backend(Source(checkpoint="demo"))
    assert tried == ["torch/cpu"]


def test_device_cpu_skips_gpu_candidates_even_with_a_gpu(tried, monkeypatch):
    monkeypatch.setattr(select, "cuda_available", lambda: True)
    tried.allow.add("torch/cpu")
    select_backend(Source(checkpoint="demo"), device="cpu")
    assert tried == ["torch/cpu"]


def test_asking_for_one_backend_tries_only_it(tried, monkeypatch):
    monkeypatch.setattr(select, "cuda_available", lambda: False)
    with pytest.raises(BackendUnavailable, match="onnxruntime refused on cpu"):
        select_backend(Source(bundle=Path("bundle")), backend="onnxruntime", device="cpu")
    assert tried == ["onnxruntime/cpu"]


def test_more_than_one_source_is_refused(tried):
    with pytest.raises(BackendUnavailable, match="exactly one"):
        select_backend(Source(checkpoint="demo", bundle=Path("bundle")))
    assert tried == []


# --------------------------------------------------------------------------- a checkpoint with the cache


def _cached_source(tmp_path: Path, samples: int = 1):  # type: ignore[no-untyped-def]
    from ldseg.runtime.cache import ArtifactCache
    from tests.runtime.cache_fakes import GPU_A, FakeBundleBuilder, FakeEngineBuilder

    artifacts = ArtifactCache(tmp_path / "cache", build_bundle=FakeBundleBuilder(),
                              build_engines=FakeEngineBuilder(GPU_A))
    return Source(checkpoint="demo", artifacts=artifacts, samples=samples)


def test_a_checkpoint_with_the_cache_tries_every_backend_fastest_first(tried, monkeypatch, tmp_path):
    monkeypatch.setattr(select, "cuda_available", lambda: True)
    with pytest.raises(BackendUnavailable, match="no backend can run this source"):
        select_backend(_cached_source(tmp_path))
    assert tried == ["tensorrt/cuda", "onnxruntime/cuda", "torch/cuda", "onnxruntime/cpu", "torch/cpu"]
    assert [f"{n}/{d}" for n, d in select.AUTO_ORDER] == tried  # one plain list: a new backend is one line


def test_a_checkpoint_with_the_cache_on_cpu_prefers_onnxruntime(tried, monkeypatch, tmp_path):
    monkeypatch.setattr(select, "cuda_available", lambda: False)
    tried.allow.update({"onnxruntime/cpu", "torch/cpu"})
    chosen = select_backend(_cached_source(tmp_path))
    assert tried == ["onnxruntime/cpu"] and chosen.backend.name == "onnxruntime"


def test_gpu_candidates_check_the_machine_before_exporting(monkeypatch, tmp_path):
    """No TensorRT / no CUDA provider: refused at once, nothing exported into the cache."""
    source = _cached_source(tmp_path)
    if not _tensorrt_present():
        with pytest.raises(BackendUnavailable, match="TensorRT"):
            select._tensorrt(source, "cuda")
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(BackendUnavailable, match="onnxruntime-gpu"):
            select._onnxruntime(source, "cuda")
    assert source.artifacts is not None and source.artifacts.build_bundle.calls == []  # type: ignore[union-attr]


def _tensorrt_present() -> bool:
    try:
        from ldseg.runtime.engines import require_tensorrt

        require_tensorrt()
    except BackendUnavailable:
        return False
    return True


def test_tensorrt_from_a_checkpoint_exports_fp16_then_builds_engines(monkeypatch, tmp_path):
    """Faked GPU machine: TensorRT 'present' on GPU_A; the chosen engines come from the cache."""
    from ldseg.runtime import tensorrt_backend
    from tests.runtime.cache_fakes import GPU_A

    made: list[Path] = []

    class FakeTensorRTBackend:
        name, precision = "tensorrt", "fp16"

        def __init__(self, path: Path, device: str):
            made.append(path)
            self.device = device

    monkeypatch.setattr(select, "cuda_available", lambda: True)
    monkeypatch.setattr(select, "tensorrt_environment", lambda: GPU_A)
    monkeypatch.setattr(tensorrt_backend, "TensorRTBackend", FakeTensorRTBackend)
    source = _cached_source(tmp_path, samples=4)
    chosen = select_backend(source)
    assert chosen.backend.name == "tensorrt" and chosen.why.startswith("auto: first available")
    artifacts = source.artifacts
    assert artifacts is not None
    [key] = artifacts.build_bundle.calls  # type: ignore[union-attr]
    assert key.precision == select.TENSORRT_BUNDLE_PRECISION
    [(bundle_dir, max_batch, _timing)] = artifacts.build_engines.calls  # type: ignore[union-attr]
    assert max_batch == 4 and made == [artifacts.hits[-1].path]
    select_backend(source)  # second run: both entries reused
    assert len(artifacts.build_bundle.calls) == 1 and len(artifacts.build_engines.calls) == 1  # type: ignore[union-attr]


def test_a_failed_export_falls_back_to_the_next_candidate(tried, monkeypatch, tmp_path):
    from ldseg.errors import ArtifactError

    monkeypatch.setattr(select, "cuda_available", lambda: False)
    tried.allow.add("torch/cpu")
    factories = dict(select._FACTORIES)

    def failing_export(source: Source, device: str) -> Selection:
        tried.append(f"onnxruntime/{device}")
        raise ArtifactError("bundle: not written: the bundle failed validation")

    factories["onnxruntime"] = failing_export
    monkeypatch.setattr(select, "_FACTORIES", factories)
    chosen = select_backend(_cached_source(tmp_path))
    assert tried == ["onnxruntime/cpu", "torch/cpu"] and "failed validation" in chosen.why


def test_without_a_gpu_the_gpu_candidates_are_announced_as_skipped(tried, monkeypatch):
    monkeypatch.setattr(select, "cuda_available", lambda: False)
    with pytest.raises(BackendUnavailable, match="tensorrt/cuda: no CUDA GPU visible"):
        select_backend(Source(engines=Path("engines")))
    assert tried == []
    tried.allow.add("onnxruntime/cpu")
    chosen = select_backend(Source(bundle=Path("bundle")), device="cpu")
    assert chosen.why == "auto: onnxruntime/cuda: --device cpu"
