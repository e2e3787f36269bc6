"""The openvino backend: runs a bundle (or a checkpoint's FP32 bundle from the artifact cache) on the
CPU: an FP32 bundle at fp32 or (CPUs with native BF16) bf16, an INT8 bundle at int8."""

from __future__ import annotations

from ldseg.errors import BackendUnavailable
from ldseg.runtime.artifacts.source import SEGMENT_NEEDS, bundle_path, bundle_precision, refuse_untrained
from ldseg.runtime.backends.declaration import BUNDLE, CHECKPOINT, Declaration, Made, Request

# A bundle's precision -> what this backend runs it at.
RUNS = {"fp32": ("fp32", "bf16"), "int8": ("int8",)}


def probe(request: Request) -> str | None:
    """openvino imports and, where bf16 is asked for, this CPU computes in BF16 natively."""
    from ldseg.runtime.backends.openvino.backend import cpu_capabilities, import_openvino

    try:
        ov = import_openvino()
    except BackendUnavailable as exc:
        return str(exc)
    if request.precision == "bf16":
        capabilities = cpu_capabilities(ov.Core())
        if "BF16" not in capabilities:
            return (
                "bf16 needs a CPU with native BF16 (AVX512_BF16 or AMX); OpenVINO reports only "
                f"{', '.join(sorted(capabilities))} here: use --precision fp32 (or an int8 bundle)"
            )
    return None


def precisions(request: Request) -> tuple[str, ...]:
    return RUNS.get(bundle_precision(request.source), ())


def make(request: Request) -> Made:
    from ldseg.runtime.artifacts.bundle import load_bundle
    from ldseg.runtime.artifacts.cache import cache_root
    from ldseg.runtime.backends.openvino.backend import OpenVinoBackend

    source = request.source
    path = bundle_path(source)
    bundle = load_bundle(path, trust_unvalidated=source.trust_unvalidated)
    refuse_untrained(path, dict(bundle.trained), SEGMENT_NEEDS)
    # Compiled models live beside the run's artifacts (a --no-cache run's temporary folder included).
    cache = (source.artifacts.root if source.artifacts is not None else cache_root()) / "openvino"
    backend = OpenVinoBackend(bundle, request.precision, threads=request.threads, cache=cache)
    return Made(backend, bundle.config, bundle.checkpoint_hash)


DECLARATION = Declaration("openvino", (BUNDLE, CHECKPOINT), ("cpu",), probe=probe, precisions=precisions, make=make)
