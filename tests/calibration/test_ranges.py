"""ldseg/calibration/ranges.py: streaming min/max equals ORT's own MinMax calibrator, one sample at a time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationMethod, create_calibrator

from ldseg.calibration.data import FeedReader
from ldseg.calibration.quantize import QUANTIZED_OPS
from ldseg.calibration.ranges import RangeTracker, tensors_to_calibrate


def _two_convs(path: Path) -> None:
    """x -> Conv -> Sigmoid -> Conv -> y: the calibrated tensors are x, both conv outputs, the sigmoid."""
    rng = np.random.default_rng(1)
    w1 = numpy_helper.from_array(rng.standard_normal((3, 2, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((2, 3, 1, 1)).astype(np.float32), "w2")
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["c1"], ["s"], name="sig"),
        helper.make_node("Conv", ["s", "w2"], ["y"], name="conv2"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2, 8, 8])
    graph = helper.make_graph(nodes, "two", [x], [y], [w1, w2])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    onnx.save(model, str(path))


def test_streamed_ranges_equal_ort_minmax_calibrator(tmp_path: Path) -> None:
    _two_convs(tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    feeds = [{"x": (rng.standard_normal((1, 2, 8, 8)) * (i + 1)).astype(np.float32)} for i in range(4)]
    tracker = RangeTracker(tmp_path / "m.onnx", QUANTIZED_OPS, threads=1)
    outputs = [tracker.run(feed) for feed in feeds]
    assert tracker.samples == 4 and outputs[0][0].shape == (1, 2, 8, 8)  # the graph's own output comes back
    ours = tracker.tensors_data()

    calibrator = create_calibrator(
        tmp_path / "m.onnx",
        list(QUANTIZED_OPS),
        augmented_model_path=str(tmp_path / "a.onnx"),
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"symmetric": True},
    )
    calibrator.collect_data(FeedReader(feeds))
    theirs = calibrator.compute_data()
    assert set(ours.keys()) == set(theirs.keys()) == {"x", "c1", "s", "y"}
    for name in theirs.keys():
        mine = np.asarray(ours[name].range_value, dtype=np.float64).ravel()
        reference = np.asarray(theirs[name].range_value, dtype=np.float64).ravel()
        np.testing.assert_allclose(mine, reference, rtol=1e-6, err_msg=name)
    # The range is the largest |x| over all feeds, not the last one's: the last feed is the widest here,
    # so check the first-tensor bound against numpy directly as well.
    assert float(ours["x"].range_value[1]) == max(float(np.abs(f["x"]).max()) for f in feeds)


def test_ranges_do_not_depend_on_how_samples_are_grouped(tmp_path: Path) -> None:
    _two_convs(tmp_path / "m.onnx")
    rng = np.random.default_rng(2)
    batch = rng.standard_normal((3, 2, 8, 8)).astype(np.float32)
    one_by_one = RangeTracker(tmp_path / "m.onnx", QUANTIZED_OPS)
    for i in range(3):
        one_by_one.run({"x": batch[i : i + 1]})
    together = RangeTracker(tmp_path / "m.onnx", QUANTIZED_OPS)
    together.run({"x": batch})
    np.testing.assert_allclose(one_by_one.high, together.high, rtol=1e-6)
    np.testing.assert_allclose(one_by_one.low, together.low, rtol=1e-6)
    assert tensors_to_calibrate(onnx.load(str(tmp_path / "m.onnx")), ["Sigmoid"]) == ["c1", "s"]
