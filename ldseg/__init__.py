"""ldseg: LDSeg latent-diffusion segmentation from PyTorch to ONNX, TensorRT and a CUDA-graph runtime.

Python API (ldseg.api, imported on first use so that `import ldseg` stays light):
`ldseg.segment(paths, checkpoint=...)` and `ldseg.Segmenter`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ldseg.versions import LDSEG_VERSION as __version__

__all__ = ["Segmentation", "Segmenter", "__version__", "segment"]

if TYPE_CHECKING:
    from ldseg.api import Segmentation, Segmenter, segment


def __getattr__(name: str) -> Any:
    if name in ("segment", "Segmenter", "Segmentation"):
        from ldseg import api

        return getattr(api, name)
    raise AttributeError(f"module 'ldseg' has no attribute {name!r}")
