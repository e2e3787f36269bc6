"""A small FP32 demo bundle (random, BN-calibrated weights; 4 sampler steps so the trajectory is
short) and its INT8 calibration, each made once per session: export is the slow part."""

from __future__ import annotations

from pathlib import Path

import pytest

from ldseg.calibration import CalibrationReport, calibrate
from ldseg.export import export_bundle
from ldseg.model.network import LDSeg
from ldseg.runtime.artifacts import bundle as bundle_module
from tests.helpers import informative_model

STEPS = 4
GRAPHS = ("encoder", "denoise_step", "decoder", "decoder_argmax")


def small_model(seed: int = 0) -> LDSeg:
    """Demo preset (sampling steps shortened), random weights with calibrated BatchNorm statistics."""
    model = informative_model("demo", seed)
    model.cfg = model.cfg.with_diffusion(steps=STEPS)
    return model


@pytest.fixture(scope="session")
def fp32_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_bundle(small_model(), tmp_path_factory.mktemp("cal-fp32") / "demo.bundle", graphs=GRAPHS)


@pytest.fixture(scope="session")
def calibrated(fp32_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CalibrationReport]:
    if "int8" not in bundle_module.PRECISIONS:
        pytest.fail(
            "ldseg/runtime/artifacts/bundle.py PRECISIONS lacks 'int8': INT8 bundles cannot load with the bundle loader"
        )
    out = tmp_path_factory.mktemp("cal-int8") / "demo-int8.bundle"
    report = calibrate(fp32_bundle, "phantoms", out, max_volumes=2, holdout=1, threads=2)
    return out, report
