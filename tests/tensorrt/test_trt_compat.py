"""TensorRT 10 and 11, faked: feature detection (runtime/backends/tensorrt/compat.py), the cross-major refusal,
the TensorRT logger routed to `logging`, and a refused optimization profile reported, not raised."""

from __future__ import annotations

import json
import logging
import sys
import types
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

from ldseg.errors import BackendUnavailable
from ldseg.runtime.artifacts.engines import Environment, engine_set_problems, read_engine_set
from ldseg.runtime.backends.tensorrt import compat as trt_compat
from ldseg.runtime.backends.tensorrt import probe as environment
from ldseg.runtime.backends.tensorrt.backend import _Context
from tests.tensorrt.conftest import make_fake_engine_set


class _Severity(int):
    pass


class _ILogger:
    Severity = SimpleNamespace(
        **{n: _Severity(i) for i, n in enumerate(("INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE"))}
    )

    def __init__(self) -> None:
        pass


def fake_tensorrt(version: str) -> types.ModuleType:
    """The attributes ldseg touches, shaped as TensorRT 10.x or 11.x has them."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version  # type: ignore[attr-defined]
    trt.Builder = object  # type: ignore[attr-defined]
    trt.ILogger = _ILogger  # type: ignore[attr-defined]
    trt.TensorIOMode = SimpleNamespace(INPUT=0, OUTPUT=1)  # type: ignore[attr-defined]
    trt.ExecutionContextAllocationStrategy = SimpleNamespace(USER_MANAGED=2)  # type: ignore[attr-defined]
    if version.startswith("10."):
        trt.NetworkDefinitionCreationFlag = SimpleNamespace(EXPLICIT_BATCH=0, STRONGLY_TYPED=1)  # type: ignore[attr-defined]
        trt.BuilderFlag = SimpleNamespace(FP16=0, INT8=1, TF32=2, OBEY_PRECISION_CONSTRAINTS=3)  # type: ignore[attr-defined]
    else:  # 11: strong typing always on (flag 0), weak-typing flags and EXPLICIT_BATCH gone
        trt.NetworkDefinitionCreationFlag = SimpleNamespace(STRONGLY_TYPED=0)  # type: ignore[attr-defined]
        trt.BuilderFlag = SimpleNamespace(TF32=2, GPU_FALLBACK=5)  # type: ignore[attr-defined]
    return trt


class _Engine10:
    device_memory_size = 1000  # deprecated in 10, removed in 11
    device_memory_size_v2 = 1024


class _Engine11:
    device_memory_size_v2 = 2048


@pytest.mark.parametrize(
    ("version", "major", "flags", "weak"), [("10.3.0.30", 10, 2, True), ("11.4.1.2", 11, 1, False)]
)
def test_feature_detection(version, major, flags, weak):
    api = trt_compat.api(fake_tensorrt(version))
    assert (api.major, api.network_flags, api.weak_typing) == (major, flags, weak)
    assert api.describe()["tensorrt_major"] == major


def test_too_old_or_unreadable_versions_are_refused():
    with pytest.raises(BackendUnavailable, match="10.2.0 is too old: ldseg needs 10.3"):
        trt_compat.api(fake_tensorrt("10.2.0"))
    with pytest.raises(BackendUnavailable, match="cannot read"):
        trt_compat.check_version("dev")


def test_activation_memory_of_both_majors():
    assert trt_compat.device_memory_size(_Engine10()) == 1024  # v2, never the deprecated one
    assert trt_compat.device_memory_size(_Engine11()) == 2048
    calls = []
    context = SimpleNamespace(set_device_memory=lambda ptr, n: calls.append((ptr, n)))
    trt_compat.set_device_memory(context, 4096, 1024)
    legacy = SimpleNamespace()  # 10.0: only the property
    trt_compat.set_device_memory(legacy, 8192, 1024)
    assert calls == [(4096, 1024)] and legacy.device_memory == 8192


@pytest.mark.parametrize("io_key", ["Bindings", "I/O Tensors"])
def test_inspector_json_of_both_majors(io_key):
    info = {
        "Layers": [{"Name": "conv", "Outputs": [{"Format/Datatype": "Int8 NC/32HW32"}]}, {"Name": "softmax"}],
        io_key: ["image", "z_image"],
    }
    assert trt_compat.layer_summary(json.dumps(info)) == {"layers": 2, "io_tensors": 2, "int8_layers": 1}


def test_engines_json_records_the_major_and_a_cross_major_set_is_refused(fake_bundle: Path, tmp_path: Path):
    env10 = Environment("10.3.0.30", "Orin", "8.7")
    folder = make_fake_engine_set(tmp_path / "jetson.engines", fake_bundle, env10)
    data = json.loads((folder / "engines.json").read_text())
    assert data["tensorrt_major"] == 10 and read_engine_set(folder).tensorrt_major == 10
    problems = engine_set_problems(folder, Environment("11.4.1.2", "Orin", "8.7"))
    assert [p.kind for p in problems] == ["environment"]
    assert "major 10" in problems[0].message and "major 11" in problems[0].message
    assert "cannot load another's engines" in problems[0].message
    same_major = engine_set_problems(folder, Environment("10.7.0.23", "Orin", "8.7"))
    assert "not portable across TensorRT versions" in same_major[0].message


def test_a_major_contradicting_the_version_is_malformed(fake_bundle: Path, tmp_path: Path):
    folder = make_fake_engine_set(tmp_path / "e", fake_bundle)
    data = json.loads((folder / "engines.json").read_text())
    data["tensorrt_major"] = 11
    (folder / "engines.json").write_text(json.dumps(data))
    with pytest.raises(Exception, match="contradicts tensorrt_version"):
        read_engine_set(folder)


@pytest.mark.parametrize("version", ["10.3.0.30", "11.4.1.2"])
def test_tensorrt_warnings_go_to_logging_not_python_warnings(monkeypatch, caplog, version):
    trt = fake_tensorrt(version)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    logger = environment.trt_logger()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a Python warning would fail the test
        with caplog.at_level(logging.INFO, logger="ldseg.tensorrt"):
            logger.log(trt.ILogger.Severity.WARNING, "Using default stream in enqueueV3()")
            logger.log(trt.ILogger.Severity.ERROR, "no implementation for layer conv")
            logger.log(trt.ILogger.Severity.VERBOSE, "tactic 0x1")
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "TensorRT: Using default stream in enqueueV3()"),
        ("ERROR", "TensorRT: no implementation for layer conv"),
    ]
    assert logger.errors == ["no implementation for layer conv"]  # kept for the error line
    assert environment.logged_errors(logger) == "no implementation for layer conv"


@pytest.mark.parametrize("version", ["10.3.0.30", "11.4.1.2"])
def test_a_refused_optimization_profile_is_reported_not_a_traceback(monkeypatch, version):
    trt = fake_tensorrt(version)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    memory = []

    class Context:
        def set_device_memory(self, ptr, nbytes):
            memory.append((ptr, nbytes))

        def set_optimization_profile_async(self, index, stream):
            raise RuntimeError("profile 0 is in use by another execution context")

    engine = SimpleNamespace(create_execution_context=lambda strategy: Context())
    logger = SimpleNamespace(errors=["IExecutionContext::setOptimizationProfileAsync: Error Code 3"])
    activation, stream = SimpleNamespace(ptr=4096, nbytes=1024), SimpleNamespace(ptr=7)
    with pytest.raises(BackendUnavailable, match="decoder: TensorRT refused optimization profile 0: profile 0 is in"):
        _Context("decoder", engine, activation, stream, {}, logger)  # type: ignore[arg-type]
    assert memory == [(4096, 1024)]
