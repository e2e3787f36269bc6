"""One list per choice a user makes (backends, precisions, devices, output types, ...), the single
place to add one: the CLI's choices, the Python API's checks, the service's query, the bench and
backend selection all read these. Cheap to import on purpose (no third-party imports at all)."""

from __future__ import annotations

# Runtimes, fastest-first order is ldseg.runtime.select.AUTO_ORDER; "auto" picks among them.
BACKENDS = ("torch", "onnxruntime", "openvino", "tensorrt")
BACKEND_CHOICES = ("auto", *BACKENDS)
# What a run computes in. "auto": what the source holds (FP32, or a calibrated/exported bundle's
# INT8/FP16); never a silent reduction. Which backend honours which: its declaration
# (ldseg/runtime/backends/*/declaration.py).
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
RUN_PRECISIONS = ("auto", *PRECISIONS)
DEVICES = ("auto", "cpu", "cuda")  # "cuda:N" is also accepted where a device is given as text
SAMPLERS = ("ddim", "ddpm")
VOLUME_OPS = ("auto", "cpu")  # where pre/post-processing runs: the backend's device where it offers it, or the CPU
# --output-type values; dicom-seg is written by ldseg.io.formats.dicom_seg, the others by their format.
OUTPUT_TYPES = ("nifti", "nrrd", "mha", "dicom-seg")
SEG_TYPES = ("binary", "fractional")  # DICOM SEG: labels, or the foreground classes' probabilities
# What a bundle is exported to (ldseg-export onnx) and a TensorRT engine set is built at (build-engine).
EXPORT_PRECISIONS = ("fp32", "fp16")
ENGINE_PRECISIONS = ("best", "fp32", "fp16", "bf16", "int8", "fp8")


def check_choice(what: str, given: str, choices: tuple[str, ...]) -> str:
    """`given` if it is one of `choices`, else ValueError in the words of the option (`what`)."""
    if given not in choices:
        raise ValueError(f"{what} {given}: choose one of {', '.join(choices)}")
    return given


def check_device(given: str) -> str:
    """auto, cpu, cuda or cuda:N; ValueError otherwise."""
    if given in DEVICES or (given.startswith("cuda:") and given[5:].isdigit()):
        return given
    raise ValueError(f"--device {given}: choose cpu, cuda, cuda:N or auto")
