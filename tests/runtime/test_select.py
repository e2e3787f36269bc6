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
