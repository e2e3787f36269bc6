"""TensorRT on the emulated GPU: a precision the engines do not hold, or a K beyond their largest
batch, is refused before anything is exported or built (and before an engine set is loaded)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ldseg.errors import BackendUnavailable
from ldseg.runtime import select
from ldseg.runtime.select import Source, Wants, select_backend
from tests.runtime.artifacts.cache_fakes import GPU_A
from tests.runtime.test_refusals import cached_source, nothing_built


def test_fp32_from_a_checkpoint_is_refused_before_the_fp16_export_and_build(emulated_gpu, monkeypatch, tmp_path):
    monkeypatch.setattr(select.TENSORRT, "environment", lambda index=0: GPU_A)
    source = cached_source(tmp_path)
    with pytest.raises(BackendUnavailable, match="tensorrt backend runs fp16 here, not fp32"):
        select_backend(source, backend="tensorrt", device="cuda", wants=Wants("fp32"))
    assert nothing_built(source)


def test_k_beyond_the_engines_batch_is_refused_with_the_limit(emulated_gpu, fake_engines: Path, monkeypatch):
    from ldseg.runtime.backends.tensorrt import backend as tensorrt_backend

    def never(*args, **kwargs):  # noqa: ANN002, ANN003
        raise AssertionError("the engine set was loaded before the refusal")

    monkeypatch.setattr(tensorrt_backend, "TensorRTBackend", never)
    with pytest.raises(BackendUnavailable, match="takes at most 2 samples per run, not 4: rebuild .* --max-batch 4"):
        select_backend(Source(engines=fake_engines), backend="tensorrt", device="cuda", wants=Wants(max_samples=4))


def test_engines_are_built_for_the_k_asked(emulated_gpu, monkeypatch, tmp_path):
    from ldseg.runtime.backends.tensorrt import backend as tensorrt_backend

    class Made:
        name, precision = "tensorrt", "fp16"

        def __init__(self, path: Path, device: str) -> None:
            self.device = device

        def prepare(self, batch: int) -> None:
            pass

    monkeypatch.setattr(select.TENSORRT, "environment", lambda index=0: GPU_A)
    monkeypatch.setattr(tensorrt_backend, "TensorRTBackend", Made)
    source = cached_source(tmp_path)
    select_backend(source, backend="tensorrt", device="cuda", wants=Wants(max_samples=8))
    assert source.artifacts is not None
    [(_bundle, max_batch, _timing)] = source.artifacts.build_engines.calls  # type: ignore[attr-defined]
    assert max_batch == 8


# --------------------------------------------------------------------------- the service's K


def test_a_service_of_an_engine_set_takes_the_engines_k_and_refuses_more(emulated_gpu, fake_engines: Path):
    from ldseg.runs.specs import ModelSpec
    from ldseg.serve.config import ServeConfig
    from ldseg.serve.errors import HttpProblem
    from ldseg.serve.query import parse_query

    config = ServeConfig(model=ModelSpec(engines=fake_engines))
    assert config.max_samples == 2 and config.model.max_samples == 2  # the fake engine set's largest batch
    assert parse_query({"samples": "2"}, config.max_samples).samples == 2
    with pytest.raises(HttpProblem, match="samples=3: this service takes at most 2 samples") as refused:
        parse_query({"samples": "3"}, config.max_samples)
    assert refused.value.status == 400


def test_a_service_asked_for_more_k_than_its_engines_hold_is_refused_at_start(emulated_gpu, fake_engines, monkeypatch):
    from ldseg.api import Segmenter
    from ldseg.runs.specs import ModelSpec
    from ldseg.serve.config import ServeConfig

    config = ServeConfig(model=ModelSpec(engines=fake_engines, backend="tensorrt", device="cuda"), max_samples=4)
    with pytest.raises(BackendUnavailable, match="at most 2 samples per run, not 4"):
        Segmenter.of(config.model)  # what each replica does first


def test_a_service_of_a_checkpoint_builds_its_engines_for_its_k(emulated_gpu, monkeypatch, tmp_path):
    from ldseg import api
    from ldseg.runs.specs import ModelSpec
    from ldseg.runtime.backends.tensorrt import backend as tensorrt_backend
    from ldseg.serve.config import DEFAULT_MAX_SAMPLES, ServeConfig

    class Made:
        name, precision = "tensorrt", "fp16"

        def __init__(self, path: Path, device: str) -> None:
            self.device = device

        def prepare(self, batch: int) -> None:
            pass

        def close(self) -> None:
            pass

    source = cached_source(tmp_path)
    monkeypatch.setattr(api, "artifact_cache", lambda root=None, reporter=None: source.artifacts)
    monkeypatch.setattr(select.TENSORRT, "environment", lambda index=0: GPU_A)
    monkeypatch.setattr(tensorrt_backend, "TensorRTBackend", Made)
    config = ServeConfig(model=ModelSpec(backend="tensorrt", device="cuda"))
    assert config.max_samples == DEFAULT_MAX_SAMPLES
    api.Segmenter.of(config.model).close()
    assert source.artifacts is not None
    [(_bundle, max_batch, _timing)] = source.artifacts.build_engines.calls  # type: ignore[attr-defined]
    assert max_batch == DEFAULT_MAX_SAMPLES
