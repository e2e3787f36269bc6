"""runtime/select.py: the auto-selection order, with the GPU and the backends faked."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldseg.errors import BackendUnavailable
from ldseg.model.config import get_preset
from ldseg.runtime import select
from ldseg.runtime.backends.declaration import Request
from ldseg.runtime.select import Selection, Source, Wants, select_backend


class _Fake:
    def __init__(self, name: str, device: str):
        self.name, self.device, self.precision = name, device, "fp32"

    def prepare(self, batch: int) -> None:  # Backend.prepare: selection starts a run's preparation
        pass


class Calls(list[str]):
    """The (backend/device) candidates tried, in order; `allow` lists those that succeed."""

    allow: set[str]
    wants: list[Wants]


@pytest.fixture
def tried(monkeypatch: pytest.MonkeyPatch) -> Calls:
    calls = Calls()
    calls.allow = allow = set()
    calls.wants = []

    def make(name: str, request: Request) -> Selection:
        device = request.device
        calls.append(f"{name}/{device}")
        calls.wants.append(Wants(request.precision, request.threads, request.max_samples))
        if f"{name}/{device}" not in allow:
            raise BackendUnavailable(f"{name} refused on {device}")
        return Selection(_Fake(name, device), get_preset("demo"), "")  # type: ignore[arg-type]

    monkeypatch.setattr(select, "_make", make)
    return calls


@pytest.mark.parametrize(
    ("source", "order"),
    [
        (Source(engines=Path("engines")), ["tensorrt/cuda:0"]),
        (Source(bundle=Path("bundle")), ["onnxruntime/cuda:0", "openvino/cpu", "onnxruntime/cpu"]),
        (Source(checkpoint="demo"), ["torch/cuda:0", "torch/cpu"]),
    ],
)
def test_gpu_first_then_cpu_and_every_skip_is_announced(tried, source, order):
    with pytest.raises(BackendUnavailable, match="no backend can run this source") as refused:
        select_backend(source)
    assert tried == order
    for candidate in order:
        name, device = candidate.split("/")
        assert f"{name} refused on {device}" in str(refused.value)


def test_first_available_wins_and_says_what_it_skipped(tried):
    tried.allow.add("onnxruntime/cpu")
    chosen = select_backend(Source(bundle=Path("bundle")))
    assert tried == ["onnxruntime/cuda:0", "openvino/cpu", "onnxruntime/cpu"]
    assert chosen.backend.device == "cpu" and "onnxruntime refused on cuda:0" in chosen.why
    assert "openvino refused on cpu" in chosen.why


def test_a_cpu_only_torch_does_not_hide_the_gpu_from_other_backends(tried, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)  # the project's CPU constraint
    tried.allow.add("onnxruntime/cuda:0")
    chosen = select_backend(Source(bundle=Path("bundle")))
    assert tried == ["onnxruntime/cuda:0"] and chosen.backend.device == "cuda:0"
    assert chosen.why == "auto: first available for this source on a GPU"


def test_device_cpu_skips_gpu_candidates(tried):
    tried.allow.add("torch/cpu")
    select_backend(Source(checkpoint="demo"), device="cpu")
    assert tried == ["torch/cpu"]


def test_gpu_index_reaches_every_candidate(tried):
    with pytest.raises(BackendUnavailable):
        select_backend(Source(bundle=Path("bundle")), gpu=2)
    with pytest.raises(BackendUnavailable):
        select_backend(Source(engines=Path("e")), device="cuda:1")
    assert tried == ["onnxruntime/cuda:2", "openvino/cpu", "onnxruntime/cpu", "tensorrt/cuda:1"]


def test_asking_for_one_backend_tries_only_it(tried):
    with pytest.raises(BackendUnavailable, match="onnxruntime refused on cpu"):
        select_backend(Source(bundle=Path("bundle")), backend="onnxruntime", device="cpu")
    assert tried == ["onnxruntime/cpu"]


def test_one_backend_on_auto_device_tries_its_gpu_then_cpu(tried):
    tried.allow.add("torch/cpu")
    chosen = select_backend(Source(checkpoint="demo"), backend="torch")
    assert tried == ["torch/cuda:0", "torch/cpu"] and chosen.why.startswith("asked for; skipped torch/cuda:0")
    with pytest.raises(BackendUnavailable, match="tensorrt refused on cuda:0"):
        select_backend(Source(engines=Path("e")), backend="tensorrt")  # never on the CPU


def test_torch_on_cuda_with_a_cpu_only_build_says_so(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(BackendUnavailable, match="CPU-only build"):
        select_backend(Source(checkpoint="demo"), backend="torch", device="cuda")


def test_more_than_one_source_is_refused(tried):
    with pytest.raises(BackendUnavailable, match="exactly one"):
        select_backend(Source(checkpoint="demo", bundle=Path("bundle")))
    assert tried == []


def test_one_backend_refused_for_one_reason_says_it_once(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(BackendUnavailable) as refused:
        select_backend(Source(checkpoint="demo"), backend="onnxruntime")
    assert str(refused.value) == "the onnxruntime backend runs an exported bundle (--bundle)"


def test_device_cuda_tries_only_gpu_candidates(tried):
    with pytest.raises(BackendUnavailable, match="no backend can run this source"):
        select_backend(Source(bundle=Path("bundle")), device="cuda:1")
    assert tried == ["onnxruntime/cuda:1"]


def test_on_cpu_a_bundle_tries_openvino_then_onnxruntime(tried, monkeypatch):
    tried.allow |= {"openvino/cpu", "onnxruntime/cpu"}
    chosen = select_backend(Source(bundle=Path("bundle")), device="cpu")
    assert tried == ["openvino/cpu"] and chosen.backend.name == "openvino"
    assert chosen.why == "auto: onnxruntime/cuda: --device cpu"  # nothing on CPU was skipped


def test_precision_and_threads_reach_every_candidate(tried, monkeypatch):
    tried.allow.add("onnxruntime/cpu")
    select_backend(Source(bundle=Path("bundle")), device="cpu", wants=Wants("int8", 3))
    assert tried.wants == [Wants("int8", 3)] * 2
    assert select_backend(Source(bundle=Path("bundle")), device="cpu") and tried.wants[-1] == Wants("auto", None)
    with pytest.raises(BackendUnavailable, match="--precision fp64"):
        select_backend(Source(bundle=Path("bundle")), wants=Wants("fp64"))


def test_auto_skips_openvino_when_it_is_not_installed_and_says_why(monkeypatch, tmp_path):
    """The real openvino factory, with the import failing as on a platform without a wheel."""
    from ldseg.runtime.backends.openvino import backend as openvino_backend

    def missing() -> None:
        raise BackendUnavailable("openvino is not installed (no wheel for this platform)")

    monkeypatch.setattr(openvino_backend, "import_openvino", missing)
    taken = []
    real = select._make

    def make(name: str, request: Request) -> Selection:
        if name != "onnxruntime":
            return real(name, request)
        taken.append(request.device)
        return Selection(_Fake("onnxruntime", request.device), get_preset("demo"), "")  # type: ignore[arg-type]

    monkeypatch.setattr(select, "_make", make)
    chosen = select_backend(Source(bundle=tmp_path / "bundle"), device="cpu")
    assert taken == ["cpu"] and chosen.backend.name == "onnxruntime"
    assert "openvino/cpu: openvino is not installed" in chosen.why


def test_a_backend_refuses_a_precision_it_does_not_run():
    refusal = "the torch backend runs fp32, bf16 here, not int8: use --precision auto"
    with pytest.raises(BackendUnavailable, match=refusal):
        select_backend(Source(checkpoint="demo"), backend="torch", device="cpu", wants=Wants("int8"))


# --------------------------------------------------------------------------- a checkpoint with the cache


def _cached_source(tmp_path: Path):  # type: ignore[no-untyped-def]
    from ldseg.runtime.artifacts.cache import ArtifactCache
    from tests.runtime.artifacts.cache_fakes import GPU_A, FakeBundleBuilder, FakeEngineBuilder

    artifacts = ArtifactCache(
        tmp_path / "cache", build_bundle=FakeBundleBuilder(), build_engines=FakeEngineBuilder(GPU_A)
    )
    return Source(checkpoint="demo", artifacts=artifacts)


def test_a_checkpoint_with_the_cache_tries_every_backend_fastest_first(tried, tmp_path):
    with pytest.raises(BackendUnavailable, match="no backend can run this source"):
        select_backend(_cached_source(tmp_path))
    assert tried == [
        "tensorrt/cuda:0",
        "onnxruntime/cuda:0",
        "torch/cuda:0",
        "openvino/cpu",
        "onnxruntime/cpu",
        "torch/cpu",
    ]
    assert [f"{n}/{d}" for n, d in select.AUTO_ORDER] == [t.replace(":0", "") for t in tried]  # one plain list


def test_a_checkpoint_with_the_cache_on_cpu_tries_openvino_then_onnxruntime(tried, tmp_path):
    tried.allow.update({"onnxruntime/cpu", "torch/cpu"})
    chosen = select_backend(_cached_source(tmp_path))
    assert tried[-1] == "onnxruntime/cpu" and chosen.backend.name == "onnxruntime"
    tried.clear()
    select_backend(_cached_source(tmp_path), device="cpu")
    assert tried == ["openvino/cpu", "onnxruntime/cpu"]


def test_gpu_candidates_check_the_machine_before_exporting(monkeypatch, tmp_path):
    """No TensorRT / no CUDA provider: refused at once, nothing exported into the cache."""
    source = _cached_source(tmp_path)
    if not _tensorrt_present():
        with pytest.raises(BackendUnavailable, match="TensorRT"):
            select.DECLARATIONS["tensorrt"].select(Request(source, "cuda:0"))
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(BackendUnavailable, match="onnxruntime-gpu"):
            select.DECLARATIONS["onnxruntime"].select(Request(source, "cuda:0"))
    assert source.artifacts is not None and source.artifacts.build_bundle.calls == []  # type: ignore[union-attr]


def _tensorrt_present() -> bool:
    try:
        from ldseg.runtime.backends.tensorrt.probe import require_tensorrt

        require_tensorrt()
    except BackendUnavailable:
        return False
    return True


def test_tensorrt_from_a_checkpoint_exports_fp16_then_builds_engines(monkeypatch, tmp_path):
    """Faked GPU machine: TensorRT 'present' on GPU_A; the chosen engines come from the cache."""
    from ldseg.runtime.backends.tensorrt import backend as tensorrt_backend
    from tests.runtime.artifacts.cache_fakes import GPU_A

    made: list[Path] = []

    class FakeTensorRTBackend:
        name, precision = "tensorrt", "fp16"

        def __init__(self, path: Path, device: str):
            made.append(path)
            self.device = device

        def prepare(self, batch: int) -> None:
            pass

    monkeypatch.setattr(select.TENSORRT, "environment", lambda index=0: GPU_A)
    monkeypatch.setattr(tensorrt_backend, "TensorRTBackend", FakeTensorRTBackend)
    source = _cached_source(tmp_path)
    chosen = select_backend(source, wants=Wants(max_samples=4))
    assert chosen.backend.name == "tensorrt" and chosen.why.startswith("auto: first available")
    artifacts = source.artifacts
    assert artifacts is not None
    [key] = artifacts.build_bundle.calls  # type: ignore[union-attr]
    assert key.precision == select.TENSORRT_BUNDLE_PRECISION
    [(bundle_dir, max_batch, _timing)] = artifacts.build_engines.calls  # type: ignore[union-attr]
    assert max_batch == 4 and made == [artifacts.hits[-1].path]
    select_backend(source, wants=Wants(max_samples=4))  # second run: both entries reused
    assert len(artifacts.build_bundle.calls) == 1 and len(artifacts.build_engines.calls) == 1  # type: ignore[union-attr]


def test_a_failed_export_falls_back_to_the_next_candidate(tried, monkeypatch, tmp_path):
    from ldseg.errors import ArtifactError

    tried.allow.add("torch/cpu")
    fake = select._make

    def failing_export(name: str, request: Request) -> Selection:
        if name != "onnxruntime":
            return fake(name, request)
        tried.append(f"onnxruntime/{request.device}")
        raise ArtifactError("bundle: not written: the bundle failed validation")

    monkeypatch.setattr(select, "_make", failing_export)
    chosen = select_backend(_cached_source(tmp_path), device="cpu")
    assert tried == ["openvino/cpu", "onnxruntime/cpu", "torch/cpu"] and "failed validation" in chosen.why


def test_device_cpu_announces_the_gpu_candidates_it_skipped(tried):
    with pytest.raises(BackendUnavailable, match="tensorrt/cuda: --device cpu"):
        select_backend(Source(engines=Path("engines")), device="cpu")
    assert tried == []
    tried.allow.add("onnxruntime/cpu")
    chosen = select_backend(Source(bundle=Path("bundle")), device="cpu")
    assert chosen.why == "auto: onnxruntime/cuda: --device cpu; openvino/cpu: openvino refused on cpu"


def test_the_first_screen_names_gpu_reasons_only_where_they_matter() -> None:
    from ldseg.runtime.select import Selection

    skipped = ["tensorrt/cuda:0: TensorRT is not importable", "onnxruntime/cuda:0: no CUDA provider: pip install x"]
    chosen = Selection(backend=None, config=None, why="auto: " + "; ".join(skipped), skipped=skipped)  # type: ignore[arg-type]
    assert chosen.brief(gpu_present=False) == "auto; no GPU route here: -v for why"
    assert "pip install x" in chosen.brief(gpu_present=True)  # a GPU is here but could not be used: say why
    chosen.gpu_asked = True
    assert "TensorRT is not importable" in chosen.brief(gpu_present=False)  # --device cuda / tensorrt asked for
    clean = Selection(backend=None, config=None, why="auto: first available", skipped=[])  # type: ignore[arg-type]
    assert clean.brief(gpu_present=False) == "auto"


def test_ldseg_run_prints_one_backend_line_and_reasons_with_v(tmp_path: Path) -> None:
    import subprocess
    import sys

    from ldseg.data.phantoms import make_phantom, write_phantom_nifti

    write_phantom_nifti(make_phantom(1), tmp_path / "p.nii.gz", tmp_path / "l.nii.gz", overwrite=False)
    run = [str(Path(sys.executable).parent / "ldseg-run"), str(tmp_path / "p.nii.gz"), "--device", "cpu"]
    run += ["--steps", "2", "--threads", "1"]
    quiet = subprocess.run([*run, "-o", str(tmp_path / "a")], capture_output=True, text=True, timeout=900)
    loud = subprocess.run([*run, "-o", str(tmp_path / "b"), "-v"], capture_output=True, text=True, timeout=900)
    assert quiet.returncode == loud.returncode == 0, quiet.stderr + loud.stderr
    [line] = [x for x in quiet.stderr.splitlines() if x.startswith("backend:")]
    assert line.endswith("(auto; no GPU route here: -v for why)") and len(line) <= 80, quiet.stderr
    assert "pip install" not in quiet.stderr
    [loud_line] = [x for x in loud.stderr.splitlines() if x.startswith("backend:")]  # one line, not wrapped
    assert "tensorrt/cuda" in loud_line and "--device cpu" in loud_line, loud.stderr
    [summary] = [x for x in quiet.stderr.splitlines() if "volume(s) in" in x]
    assert "volumes/s)" in summary, quiet.stderr  # the summary is one line, not wrapped at the table's width
