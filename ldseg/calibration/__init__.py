"""INT8 calibration: FP32 bundle + volumes -> Q/DQ INT8 bundle, with a report of its accuracy cost."""

from ldseg.calibration.calibrate import calibrate
from ldseg.calibration.report import CalibrationReport

__all__ = ["CalibrationReport", "calibrate"]
