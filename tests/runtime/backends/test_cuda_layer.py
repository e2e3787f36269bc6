"""ldseg/runtime/backends/tensorrt/cuda.py's capture logic against a faked cuda-python runtime (its calling convention:
every call returns (error, *values)). The real thing runs in scripts/gpu_check.sh (check cuda_layer)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ldseg.runtime.backends.tensorrt import cuda

OK, UNSUPPORTED, INVALIDATED, INSTANTIATE_FAILED = 0, 900, 901, 1
NAMES = {
    OK: "cudaSuccess",
    UNSUPPORTED: "cudaErrorStreamCaptureUnsupported",
    INVALIDATED: "cudaErrorStreamCaptureInvalidated",
    INSTANTIATE_FAILED: "cudaErrorInvalidValue",
}


class FakeCudart:
    cudaError_t = SimpleNamespace(cudaSuccess=OK)  # noqa: N815 - the binding's names
    cudaStreamCaptureMode = SimpleNamespace(cudaStreamCaptureModeThreadLocal=2)  # noqa: N815
    cudaStreamCaptureStatus = SimpleNamespace(cudaStreamCaptureStatusActive=1, cudaStreamCaptureStatusInvalidated=2)  # noqa: N815

    def __init__(self, instantiate_error: int = OK):
        self.capturing = 0  # 0 none, 1 active, 2 invalidated
        self.last_error = OK
        self.instantiate_error = instantiate_error
        self.destroyed: list[str] = []
        self.modes: list[int] = []

    def cudaGetErrorName(self, err):  # noqa: N802
        return (OK, NAMES[err].encode())

    def cudaStreamBeginCapture(self, stream, mode):  # noqa: N802
        self.capturing, self.modes = 1, [*self.modes, mode]
        return (OK,)

    def cudaStreamSynchronize(self, stream):  # noqa: N802 - not capturable: invalidates a capture
        if self.capturing:
            self.capturing, self.last_error = 2, UNSUPPORTED
            return (UNSUPPORTED,)
        return (OK,)

    def cudaStreamIsCapturing(self, stream):  # noqa: N802
        return (OK, self.capturing)

    def cudaStreamEndCapture(self, stream):  # noqa: N802
        state, self.capturing = self.capturing, 0
        return (OK, "graph") if state == 1 else (INVALIDATED, None)

    def cudaGraphInstantiate(self, graph, flags):  # noqa: N802
        return (self.instantiate_error, None if self.instantiate_error else "exec")

    def cudaGraphDestroy(self, graph):  # noqa: N802
        self.destroyed.append(graph)
        return (OK,)

    def cudaGetLastError(self):  # noqa: N802
        err, self.last_error = self.last_error, OK
        return (err,)


@pytest.fixture
def fake(monkeypatch):
    def install(**kwargs) -> FakeCudart:
        runtime = FakeCudart(**kwargs)
        monkeypatch.setattr(cuda, "runtime", lambda: runtime)
        return runtime

    return install


def _stream() -> cuda.Stream:
    stream = cuda.Stream.__new__(cuda.Stream)
    stream.handle = "stream"
    return stream


def test_a_clean_capture_gives_a_launchable_graph_in_thread_local_mode(fake):
    runtime = fake()
    capture = cuda.GraphCapture(_stream())
    graph = capture.end(True)
    assert graph is not None and graph.graph_exec == "exec" and capture.reason is None
    assert runtime.modes == [2]  # thread-local: another thread's CUDA call cannot break it


def test_a_capture_broken_by_a_sync_ends_with_the_reason_and_a_clean_stream(fake):
    runtime = fake()
    stream = _stream()
    capture = cuda.GraphCapture(stream)
    with pytest.raises(cuda.CudaError, match="cudaErrorStreamCaptureUnsupported") as failed:
        stream.synchronize()
    assert capture.end(False, str(failed.value)) is None
    assert capture.reason is not None and "cudaStreamSynchronize failed" in capture.reason
    assert "(CUDA error cudaErrorStreamCaptureUnsupported, cleared)" in capture.reason
    assert runtime.capturing == 0 and runtime.last_error == OK  # eager work can follow
    stream.synchronize()  # and does


def test_an_invalidated_capture_without_an_exception_is_still_caught(fake):
    runtime = fake()
    capture = cuda.GraphCapture(_stream())
    runtime.capturing = 2  # e.g. a library call inside the sequence invalidated it silently
    assert capture.end(True) is None
    assert capture.reason is not None and "invalidated" in capture.reason


def test_a_failed_instantiation_destroys_the_graph_and_says_why(fake):
    runtime = fake(instantiate_error=INSTANTIATE_FAILED)
    capture = cuda.GraphCapture(_stream())
    assert capture.end(True) is None
    assert capture.reason is not None and "cudaGraphInstantiate failed: cudaErrorInvalidValue" in capture.reason
    assert runtime.destroyed == ["graph"]
