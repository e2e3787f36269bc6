"""The pure pieces of a TensorRT build: precision agreement with the bundle, DLA rules, builder
optimization level, batch profiles, the volume operations' profiles, which graphs to build, and
writing engines.json.

Nothing here imports TensorRT: the tests and `build-engine` use it before (or without) TensorRT.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

import onnx

from ldseg.choices import ENGINE_PRECISIONS
from ldseg.errors import ArtifactError
from ldseg.runtime.artifacts.bundle import Bundle, GraphInfo, TensorInfo, sha256_file
from ldseg.runtime.artifacts.engines import (
    ENGINES_JSON,
    REQUIRED_GRAPHS,
    RUNTIME_GRAPHS,
    BatchProfile,
    EngineSet,
    InputProfile,
)
from ldseg.runtime.sample_graphs import SAMPLE_GRAPHS
from ldseg.runtime.volume_graphs import GRAPHS, graph_io
from ldseg.runtime.volume_ops import FLOAT32

# The volume operations' engines take input grids of 1..this many voxels per axis by default: CT and
# MRI series up to 512 x 512 x 512; a larger volume is resampled on the CPU (ldseg.runs.volumes).
DEFAULT_MAX_INPUT_GRID = 512

BUILD_PRECISIONS = ENGINE_PRECISIONS
DLA_PRECISIONS = ("fp16", "int8")  # DLA runs FP16/INT8 only
MAX_OPTIMIZATION_LEVEL = 5

# How to make a bundle of each precision (precision lives in the ONNX graph since TensorRT 10.12/11).
_HOW_TO_MAKE = {
    "fp32": "ldseg-export onnx --precision fp32 -o BUNDLE",
    "fp16": "ldseg-export onnx --precision fp16 -o BUNDLE_FP16",
    "int8": "ldseg-export calibrate BUNDLE_FP32 --data DIR -o BUNDLE_INT8",
}


# --------------------------------------------------------------------------- precision


def resolve_precision(requested: str, bundle_precision: str, bundle_path: Path | str = "bundle") -> str:
    """The engine precision for `--precision requested` on a bundle of `bundle_precision`.

    TensorRT 10.12+/11 build strongly typed networks: the engine's precision is the ONNX graph's.
    `best` takes the bundle's; any other choice must match it, otherwise ArtifactError saying
    which bundle to make instead (there are no builder flags that could change it).
    """
    if requested not in BUILD_PRECISIONS:
        raise ValueError(f"precision {requested!r}: choose one of {', '.join(BUILD_PRECISIONS)}")
    if requested in ("best", bundle_precision):
        return bundle_precision
    if requested == "bf16":
        how = "ldseg exports no BF16 bundles; use fp16 (same speed on GPUs with BF16) or fp32"
    elif requested == "fp8":
        how = (
            "ldseg makes no FP8 Q/DQ bundles (that needs NVIDIA ModelOpt, quantize_mode='fp8', and an "
            f"FP8 GPU: Ada/Hopper or newer); use int8 ({_HOW_TO_MAKE['int8']}) or fp16"
        )
    else:
        how = f"make one with `{_HOW_TO_MAKE[requested]}`"
    raise ArtifactError(
        f"{bundle_path}: bundle precision is {bundle_precision}, so its engines are {bundle_precision}: TensorRT "
        f"builds precision from the graph, not from builder flags. For {requested} engines, {how}; "
        f"or build with --precision best"
    )


def check_dla(dla_core: int | None, precision: str) -> None:
    if dla_core is None:
        return
    if dla_core < 0:
        raise ValueError(f"DLA core must be >= 0, got {dla_core}")
    if precision not in DLA_PRECISIONS:
        raise ArtifactError(
            f"DLA runs FP16 or INT8 only and this bundle is {precision}: build from an fp16 bundle "
            f"(`{_HOW_TO_MAKE['fp16']}`) or an int8 one (`{_HOW_TO_MAKE['int8']}`)"
        )


def check_optimization_level(level: int | None) -> None:
    if level is not None and not 0 <= level <= MAX_OPTIMIZATION_LEVEL:
        raise ValueError(f"builder optimization level must be 0..{MAX_OPTIMIZATION_LEVEL} (default 3), got {level}")


def batch_profile(
    graph: GraphInfo, max_batch: int, opt_batch: int | None = None, *, fixed: bool = False
) -> BatchProfile:
    """min 1, opt `opt_batch` (default: max_batch), max `max_batch`; `fixed` pins all three to
    max_batch (DLA wants static shapes).

    Why opt = max_batch by default: the batch of a run is the number of samples per volume
    (`ldseg-run --samples K`), and whoever builds with --max-batch K means to run K. TensorRT picks
    its tactics at opt; a tactic chosen for K stays valid (and near-best for these conv nets) for
    smaller batches, while one chosen for batch 1 can leave the GPU idle at K. Build with
    --max-batch 1 (the default) for single-sample latency.
    """
    if max_batch < 1:
        raise ValueError(f"max batch must be >= 1, got {max_batch}")
    opt = max_batch if opt_batch is None else opt_batch
    if not 1 <= opt <= max_batch:
        raise ValueError(f"opt batch must be within 1..{max_batch}, got {opt}")
    low = max_batch if fixed else 1
    opt = max_batch if fixed else opt
    inputs = []
    for tensor in graph.inputs:
        if (
            not tensor.shape
            or not isinstance(tensor.shape[0], str)
            or any(isinstance(d, str) for d in tensor.shape[1:])
        ):
            raise ArtifactError(
                f"{graph.name}: input {tensor.name} shape {tensor.shape}: "
                "expected a dynamic batch axis first, static after"
            )
        inputs.append(InputProfile(tensor.name, tensor.concrete(low), tensor.concrete(opt), tensor.concrete(max_batch)))
    return BatchProfile(graph.name, low, opt, max_batch, tuple(inputs))


def volume_tensors(graph: str) -> tuple[tuple[TensorInfo, ...], tuple[TensorInfo, ...]]:
    """Inputs and outputs of a volume operation's float32 graph (ldseg/runtime/volume_graphs.py)."""
    return tensors_of(GRAPHS[graph](FLOAT32))


def tensors_of(model: onnx.ModelProto) -> tuple[tuple[TensorInfo, ...], tuple[TensorInfo, ...]]:
    """Inputs and outputs of one of ldseg's own small graphs, as engines.json records them."""
    inputs, outputs = graph_io(model)
    return tuple(TensorInfo(*t) for t in inputs), tuple(TensorInfo(*t) for t in outputs)


def volume_profiles(grid: tuple[int, ...], max_input_grid: int) -> dict[str, tuple[InputProfile, ...]]:
    """One profile per volume graph: the model grid (D, H, W) fixed, every input-grid axis
    1..max_input_grid (opt: the model grid's size on that axis, a typical scan's order of size)."""
    if len(grid) != 3:
        raise ValueError(f"volume engines are for 3D models, the model grid is {grid}")
    if max_input_grid < max(grid):
        raise ValueError(f"max input grid must be >= the model grid's largest axis ({max(grid)}), got {max_input_grid}")
    d, h, w = (int(v) for v in grid)
    fixed = lambda n: (n, n, n)  # noqa: E731
    ranged = lambda n: (1, n, max_input_grid)  # noqa: E731
    on_input = {"n0": ranged(d), "n1": ranged(h), "n2": ranged(w), "d": fixed(d), "h": fixed(h), "w": fixed(w)}
    # to_model_grid reads the volume in nibabel's (X, Y, Z) order and writes the model grid.
    to_model = {"x": ranged(w), "y": ranged(h), "z": ranged(d), "n0": fixed(d), "n1": fixed(h), "n2": fixed(w)}
    return {
        graph: _profile(volume_tensors(graph)[0], to_model if graph == "volume_to_model_grid" else on_input)
        for graph in GRAPHS
    }


def _profile(inputs: tuple[TensorInfo, ...], sizes: dict[str, tuple[int, int, int]]) -> tuple[InputProfile, ...]:
    """An input profile from named axes' (min, opt, max); static inputs (the class number) need none."""
    return tuple(
        InputProfile(t.name, *(tuple(sizes[n][k] if isinstance(n, str) else n for n in t.shape) for k in range(3)))
        for t in inputs
        if any(isinstance(n, str) for n in t.shape)
    )


def sample_tensors(graph: str, num_classes: int) -> tuple[tuple[TensorInfo, ...], tuple[TensorInfo, ...]]:
    """Inputs and outputs of a sample engine's graph (ldseg/runtime/sample_graphs.py)."""
    return tensors_of(SAMPLE_GRAPHS[graph](num_classes))


def sample_profiles(grid: tuple[int, ...], num_classes: int, max_samples: int) -> dict[str, tuple[InputProfile, ...]]:
    """One profile per sample engine: the classes and the model grid fixed (the sum is always
    whole: TensorRT zeroes it rather than broadcast), the K votes 1..max_samples (opt: the largest)."""
    if max_samples < 2:
        raise ValueError(f"sample engines are for K >= 2 samples, got at most {max_samples}")
    d, h, w = (int(v) for v in grid)
    fixed = lambda n: (n, n, n)  # noqa: E731
    sizes = {"c": fixed(num_classes), "tc": fixed(num_classes), "d": fixed(d), "h": fixed(h), "w": fixed(w)}
    sizes |= {"td": fixed(d), "th": fixed(h), "tw": fixed(w)}
    sizes |= {"k": (1, max_samples, max_samples), "k1": (2, max_samples + 1, max_samples + 1)}
    return {graph: _profile(sample_tensors(graph, num_classes)[0], sizes) for graph in SAMPLE_GRAPHS}


def graphs_to_build(bundle: Bundle, include_denoiser: bool = False) -> list[str]:
    missing = [g for g in REQUIRED_GRAPHS if g not in bundle.graphs]
    if missing:
        raise ArtifactError(
            f"{bundle.path}: bundle lacks {', '.join(missing)}, which a TensorRT run needs; re-export it"
        )
    wanted = RUNTIME_GRAPHS + (("denoiser",) if include_denoiser else ())
    return [g for g in wanted if g in bundle.graphs]


def write_engines_json(folder: Path, engine_set: EngineSet) -> Path:
    path = Path(folder) / ENGINES_JSON
    path.write_text(json.dumps(engine_set.to_dict(), indent=2, sort_keys=True) + "\n")
    return path


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def file_digest(path: Path) -> tuple[int, str]:
    return path.stat().st_size, sha256_file(path)
