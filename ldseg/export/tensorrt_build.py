"""`build_engines`: bundle -> TensorRT engine set (one serialized engine per graph + engines.json).

TensorRT 10.12+ and 11 build *strongly typed* networks: every tensor's type comes from the ONNX
graph, so an FP16 bundle gives FP16 engines and a Q/DQ (INT8) bundle INT8 engines, and there are
no precision builder flags to set (they were removed in 11). `--precision` therefore only states
what the user expects, and must agree with the bundle (build_options.resolve_precision).

Per graph: parse the ONNX file, one optimization profile over the batch axis (build_options.batch_profile),
workspace limit, builder optimization level, the shared persistent timing cache, optional DLA with
GPU fallback, build, and write the plan plus the engine inspector's per-layer JSON (which layers
really run in INT8 or FP16: TensorRT may fall back, e.g. ConvTranspose3d with Q/DQ, #4668).
The whole set is written in a temp folder and renamed into place (io.atomic.staged_folder).

With `volume_ops` (the default, 3D models), the set also gets the volume operations' engines: the
float32 graphs of ldseg/runtime/volume_graphs.py (min-max and zoom to the model grid, the class step
and the map back to the input grid), with profiles over input grids of 1..max_input_grid voxels per
axis (build_options.volume_profiles); always on the GPU (never DLA), and with TensorRT 10.10's
runtime activation resize where it exists, so a context's memory follows the volume's shape rather
than the largest grid the profile allows. Before the set is renamed into place they are run against
the CPU path on two phantoms (export/volume_check.py; the numbers go into engines.json).

Nothing here has run on real TensorRT: it cannot be installed on the development machines. The
code is type-checked against tensorrt-stubs 10.13 (the newest stubs; none exist for 11), what
differs between TensorRT 10 and 11 is in runtime/backends/tensorrt/compat.py, and its pure parts are unit-tested.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np

from ldseg.errors import ArtifactError, BackendUnavailable
from ldseg.export.build_options import (
    DEFAULT_MAX_INPUT_GRID,
    batch_profile,
    check_dla,
    check_optimization_level,
    file_digest,
    graphs_to_build,
    now_iso,
    resolve_precision,
    sample_profiles,
    tensors_of,
    volume_profiles,
    write_engines_json,
)
from ldseg.export.volume_check import check_sample_engines, check_volume_ops
from ldseg.io.atomic import atomic_write, check_folder_target, staged_folder
from ldseg.runtime.artifacts.bundle import Bundle, load_bundle
from ldseg.runtime.artifacts.engines import (
    ENGINE_SUFFIX,
    ENGINES_JSON,
    BatchProfile,
    EngineFile,
    EngineSet,
    Environment,
    InputProfile,
    bundle_hash,
    major_of,
)
from ldseg.runtime.backends.tensorrt import compat as trt_compat
from ldseg.runtime.backends.tensorrt.compat import TrtApi
from ldseg.runtime.backends.tensorrt.probe import detect_environment, logged_errors, require_tensorrt, trt_logger
from ldseg.runtime.sample_graphs import SAMPLE_GRAPHS
from ldseg.runtime.samples import SampleResult
from ldseg.runtime.volume_graphs import GRAPHS
from ldseg.runtime.volume_ops import FLOAT32

if TYPE_CHECKING:
    import tensorrt as trt

Progress = Callable[[str], None]


@dataclass(frozen=True)
class BuildOptions:
    precision: str  # the resolved engine precision (= the bundle's)
    workspace_bytes: int | None
    optimization_level: int | None
    dla_core: int | None


def build_engines(
    bundle_dir: Path | str,
    out_dir: Path | str,
    *,
    precision: str = "best",
    max_batch: int = 1,
    opt_batch: int | None = None,
    workspace_gb: float | None = None,
    timing_cache: Path | str | None = None,
    dla_core: int | None = None,
    optimization_level: int | None = None,
    include_denoiser: bool = False,
    volume_ops: bool = True,
    max_input_grid: int = DEFAULT_MAX_INPUT_GRID,
    device: int = 0,
    overwrite: bool = False,
    progress: Progress | None = None,
    trust_unvalidated: bool = False,
) -> Path:
    """Build one engine per graph of the bundle into `out_dir` (written atomically).

    Raises ArtifactError (bundle tampered, precision disagreement, graph TensorRT cannot parse),
    BackendUnavailable (no TensorRT, no GPU, no such DLA core, build failed on this GPU),
    OutputError (`out_dir` exists without `overwrite`), ValueError (bad option values).
    """
    say = progress or (lambda _msg: None)
    bundle = load_bundle(bundle_dir, trust_unvalidated=trust_unvalidated)  # verifies every graph's SHA-256
    engine_precision = resolve_precision(precision, bundle.precision, bundle.path)
    check_dla(dla_core, engine_precision)
    check_optimization_level(optimization_level)
    if workspace_gb is not None and workspace_gb <= 0:
        raise ValueError(f"workspace must be > 0 GB, got {workspace_gb}")
    graphs = graphs_to_build(bundle, include_denoiser)
    if "decoder" not in graphs:
        warnings.warn(
            f"{bundle.path} has no decoder graph: the engines give labels only (no probabilities, so no "
            "multi-sample averaging)",
            RuntimeWarning,
            stacklevel=2,
        )
    profiles = {g: batch_profile(bundle.graph(g), max_batch, opt_batch, fixed=dla_core is not None) for g in graphs}
    three_d = len(bundle.config.image_size) == 3
    volume = volume_profiles(bundle.config.image_size, max_input_grid) if volume_ops and three_d else {}
    num_classes = bundle.config.num_classes
    keeps_samples = bool(volume) and "decoder" in graphs and max_batch >= 2
    samples = sample_profiles(bundle.config.image_size, num_classes, max_batch) if keeps_samples else {}
    on_gpu = {**volume, **samples}  # engines.json's volume_ops: their profiles
    target = Path(out_dir)
    check_folder_target(target, overwrite, ENGINES_JSON)  # fail before minutes of building

    require_tensorrt()
    import tensorrt as trt

    env = detect_environment(device)
    from ldseg.runtime.backends.tensorrt.cuda import set_device

    set_device(device)
    logger = trt_logger()
    builder = trt.Builder(logger)
    if dla_core is not None and dla_core >= builder.num_DLA_cores:
        raise BackendUnavailable(
            f"DLA core {dla_core} requested, this device has {builder.num_DLA_cores} DLA core(s) "
            "(DLA exists on Jetson AGX/NX Orin and Xavier, not on discrete GPUs)"
        )
    options = BuildOptions(
        precision=engine_precision,
        workspace_bytes=None if workspace_gb is None else int(workspace_gb * (1 << 30)),
        optimization_level=optimization_level,
        dla_core=dla_core,
    )
    cache_path = Path(timing_cache) if timing_cache is not None else None
    cache_bytes = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    say(
        f"TensorRT {env.trt_version} on {env.gpu_name} (sm {env.compute_capability}): {engine_precision} engines "
        f"from {bundle.precision} bundle {bundle.path} (strongly typed), batch "
        f"{profiles[graphs[0]].min_batch}..{max_batch} (opt {profiles[graphs[0]].opt_batch})"
        + (f", DLA core {dla_core} with GPU fallback" if dla_core is not None else "")
        + (f", timing cache {cache_path} ({'hit' if cache_bytes else 'new'})" if cache_path else "")
    )
    if optimization_level == 0 and cache_path is not None:
        say("builder optimization level 0 ignores the timing cache")

    runtime = trt.Runtime(logger)
    engines: dict[str, EngineFile] = {}
    started = time.perf_counter()
    shared_cache: trt.ITimingCache | None = None
    with staged_folder(target, overwrite=overwrite, marker=ENGINES_JSON) as tmp:
        volume_engines: dict[str, EngineFile] = {}
        for graph in [*graphs, *on_gpu]:
            say(f"building {graph} ...")
            clock = time.perf_counter()
            config = builder.create_builder_config()
            shared_cache = _attach_timing_cache(config, shared_cache, cache_bytes, say)
            if graph in on_gpu:  # ldseg's own small graphs: the volume and sample engines
                model = GRAPHS[graph](FLOAT32) if graph in volume else SAMPLE_GRAPHS[graph](num_classes)
                network, parser = _parse(builder, logger, model.SerializeToString(), graph)
                plan = _build_network(builder, logger, config, network, graph, on_gpu[graph], options, gpu_only=True)
                inputs, outputs = tensors_of(model)
            else:
                network, parser = _parse(builder, logger, bundle.graph_path(graph), graph)
                _check_network_io(network, bundle, graph, bundle.graph_path(graph))
                plan = _build_network(builder, logger, config, network, graph, profiles[graph].inputs, options)
                inputs, outputs = bundle.graph(graph).inputs, bundle.graph(graph).outputs
            del parser, network  # built: the weights they held are in the plan
            seconds = time.perf_counter() - clock
            engine_file = tmp / f"{graph}{ENGINE_SUFFIX}"
            engine_file.write_bytes(memoryview(plan))
            layers_file = _write_layer_info(runtime, plan, tmp / f"{graph}.layers.json", say)
            size, digest = file_digest(engine_file)
            entry = EngineFile(graph, engine_file.name, size, digest, round(seconds, 2), inputs, outputs, layers_file)
            (volume_engines if graph in on_gpu else engines)[graph] = entry
            say(f"{graph}: {size / 2**20:.1f} MiB in {seconds:.1f} s")
            if cache_path is not None and shared_cache is not None:
                _save_timing_cache(shared_cache, cache_path)  # after each graph: a crash keeps the work
        engine_set = describe_engine_set(bundle, target, env, profiles, engines, options, cache_path,
                                         time.perf_counter() - started, trt_compat.api(trt))  # fmt: skip
        if volume:
            engine_set = dataclasses.replace(
                engine_set, volume_engines=volume_engines, volume_profiles=on_gpu, max_input_grid=max_input_grid
            )
            say("checking the volume engines against the CPU path ...")
            staged = dataclasses.replace(engine_set, path=tmp)
            checks = {"volume_check": _check_volume_engines(staged, runtime, device)}
            worst = max(c["image_max_abs"] for c in checks["volume_check"]["cases"])
            say(f"volume engines: images within {worst:.1e} of the CPU path, labels differing "
                f"{[c['labels_differing'] for c in checks['volume_check']['cases']]}")  # fmt: skip
            if samples:
                checks["sample_check"] = _check_sample_engines(staged, runtime, device, min(3, max_batch))
                say(f"sample engines: mean within {checks['sample_check']['mean_max_abs']:.1e} of the host's, "
                    f"entropy within {checks['sample_check']['entropy_max_abs']:.1e}")  # fmt: skip
            engine_set = dataclasses.replace(engine_set, builder={**engine_set.builder, **checks})
        write_engines_json(tmp, engine_set)
    say(f"wrote {target}")
    return target


def describe_engine_set(
    bundle: Bundle,
    target: Path,
    env: Environment,
    profiles: dict[str, BatchProfile],
    engines: dict[str, EngineFile],
    options: BuildOptions,
    cache_path: Path | None,
    seconds: float,
    api: TrtApi | None = None,
) -> EngineSet:
    """What engines.json records about a build (also how the tests fake one without TensorRT)."""
    api = api or TrtApi(env.trt_version, major_of(env.trt_version), 0, False)
    return EngineSet(
        path=target,
        bundle_path=str(bundle.path.absolute()),
        bundle_hash=bundle_hash(bundle.path),
        bundle_precision=bundle.precision,
        preset=bundle.preset,
        precision=options.precision,
        tensorrt_version=env.trt_version,
        gpu_name=env.gpu_name,
        compute_capability=env.compute_capability,
        dla_core=options.dla_core,
        profiles=profiles,
        engines=engines,
        config=bundle.config,
        sampler=bundle.sampler,
        steps=bundle.steps,
        table=bundle.table,
        built_at=now_iso(),
        build_seconds=round(seconds, 2),
        builder={
            **api.describe(),
            "workspace_bytes": options.workspace_bytes,
            "optimization_level": 3 if options.optimization_level is None else options.optimization_level,
            "timing_cache": None if cache_path is None else str(cache_path.absolute()),
            "tf32": options.precision != "fp32",
        },
    )


def _attach_timing_cache(
    config: trt.IBuilderConfig, cache: trt.ITimingCache | None, cache_bytes: bytes, say: Progress
) -> trt.ITimingCache:
    """One timing cache shared by every graph of the build (and saved across builds)."""
    if cache is None:
        cache = config.create_timing_cache(cache_bytes)
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            say("the timing cache was made by another TensorRT or GPU: starting a new one")
            cache = config.create_timing_cache(b"")
            config.set_timing_cache(cache, ignore_mismatch=False)
        return cache
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        raise BackendUnavailable("TensorRT refused its own timing cache")
    return cache


def _save_timing_cache(cache: trt.ITimingCache, path: Path) -> None:
    data = bytes(memoryview(cache.serialize()))

    def write(tmp: Path) -> None:
        tmp.write_bytes(data)

    atomic_write(path, write, overwrite=True)


def _parse(
    builder: trt.Builder, logger: trt.ILogger, source: Path | bytes, graph: str
) -> tuple[trt.INetworkDefinition, trt.OnnxParser]:
    """A strongly typed network from a bundle's ONNX file or a volume graph's bytes, with its parser:
    the parser owns the network's weights, so the caller keeps it until the engine is built."""
    import tensorrt as trt

    network = builder.create_network(trt_compat.api(trt).network_flags)  # strongly typed, 10 and 11 alike
    parser = trt.OnnxParser(network, logger)
    parsed = parser.parse_from_file(str(source)) if isinstance(source, Path) else parser.parse(source)
    if not parsed:
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        where = source if isinstance(source, Path) else f"{graph} (ldseg/runtime/volume_graphs.py, sample_graphs.py)"
        raise ArtifactError(
            f"{where}: TensorRT {trt.__version__} cannot parse this graph: {errors or logged_errors(logger)}"
        )
    network.name = graph
    return network, parser


def _build_network(
    builder: trt.Builder,
    logger: trt.ILogger,
    config: trt.IBuilderConfig,
    network: trt.INetworkDefinition,
    graph: str,
    profile: tuple[InputProfile, ...],
    options: BuildOptions,
    *,
    gpu_only: bool = False,
) -> trt.IHostMemory:
    import tensorrt as trt

    trt_profile = builder.create_optimization_profile()
    for item in profile:
        trt_profile.set_shape(item.name, trt.Dims(list(item.min)), trt.Dims(list(item.opt)), trt.Dims(list(item.max)))
    if config.add_optimization_profile(trt_profile) < 0:
        raise ArtifactError(f"{graph}: TensorRT rejected the profile {[(i.name, i.min, i.max) for i in profile]}")

    if options.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    if options.optimization_level is not None:
        config.builder_optimization_level = options.optimization_level
    if options.precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)  # "fp32" means FP32 math, as in the torch reference
    if gpu_only:
        trt_compat.allow_activation_resize(config, trt)
    elif options.dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = options.dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # per-layer precision in the inspector

    plan = builder.build_serialized_network(network, config)
    if plan is None:  # the stubs say IHostMemory; the binding returns None on failure
        raise BackendUnavailable(f"TensorRT could not build {graph} on this GPU: {logged_errors(logger)}")
    return plan


def _loader(engine_set: EngineSet, runtime: trt.Runtime) -> Callable[[str], trt.ICudaEngine]:
    """Deserialize an engine of the set just built (in the staging folder)."""

    def load(graph: str) -> trt.ICudaEngine:
        engine = runtime.deserialize_cuda_engine(engine_set.engine_path(graph).read_bytes())
        if engine is None:  # the binding returns None on failure; the stubs do not say so
            raise BackendUnavailable(f"TensorRT cannot deserialize the {graph} engine it just built")
        return engine

    return load


def _check_volume_engines(engine_set: EngineSet, runtime: trt.Runtime, device: int) -> dict[str, Any]:
    """Run the volume engines just built (in the staging folder) against the CPU path (volume_check)."""
    from ldseg.runtime.backends.tensorrt.volume import TrtVolumeOps

    ops = TrtVolumeOps(engine_set, _loader(engine_set, runtime), device)
    try:
        return check_volume_ops(ops, engine_set.config.image_size, engine_set.config.num_classes)
    finally:
        ops.release()


def _check_sample_engines(engine_set: EngineSet, runtime: trt.Runtime, device: int, samples: int) -> dict[str, Any]:
    """Run the sample engines just built on `samples` phantom probability volumes, as the backend runs
    them (samples.TrtSamples after the decoder), against the host path (volume_check)."""
    from ldseg.runtime.backends.tensorrt import cuda
    from ldseg.runtime.backends.tensorrt.engine_runner import EngineRunner
    from ldseg.runtime.backends.tensorrt.samples import TrtSamples
    from ldseg.runtime.backends.tensorrt.volume import TrtVolumeOps

    load, config = _loader(engine_set, runtime), engine_set.config
    ops = TrtVolumeOps(engine_set, load, device)
    stream = cuda.Stream()
    runner = EngineRunner(engine_set, load, device, stream)

    def keep(probabilities: np.ndarray) -> SampleResult:
        decoded = cuda.PinnedArray(probabilities.shape, np.float32)
        buffer = cuda.DeviceBuffer(decoded.nbytes)
        slot = SimpleNamespace(shape=probabilities.shape, nbytes=decoded.nbytes, buffer=buffer)
        try:
            decoded.array[...] = probabilities
            stream.copy_htod(slot.buffer.ptr, decoded.ptr, decoded.nbytes)
            kept = TrtSamples(runner, ops.kept, ops, len(probabilities), config.image_size, config.num_classes)
            kept.add(0, None, slot)
            return kept.result({}, len(probabilities))
        finally:
            stream.synchronize()
            slot.buffer.free()
            decoded.free()

    try:
        return check_sample_engines(keep, config.image_size, config.num_classes, samples)
    finally:
        runner.release()
        stream.destroy()
        ops.release()


def _check_network_io(network: trt.INetworkDefinition, bundle: Bundle, graph: str, path: Path) -> None:
    info = bundle.graph(graph)
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    outputs = [network.get_output(i).name for i in range(network.num_outputs)]
    if inputs != [t.name for t in info.inputs] or outputs != [t.name for t in info.outputs]:
        raise ArtifactError(
            f"{path}: TensorRT sees inputs {inputs} and outputs {outputs}; the manifest says "
            f"{[t.name for t in info.inputs]} -> {[t.name for t in info.outputs]}"
        )


def _write_layer_info(runtime: trt.Runtime, plan: trt.IHostMemory, path: Path, say: Progress) -> str | None:
    """Save the engine inspector's per-layer JSON (precision and tactic of every layer)."""
    import tensorrt as trt

    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise BackendUnavailable(f"TensorRT cannot deserialize the engine it just built ({path.stem})")
    info = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    path.write_text(info)
    summary = trt_compat.layer_summary(info)  # reads 10's "Bindings" and 11's "I/O Tensors" alike
    say(
        f"{path.stem}: {summary['layers']} layers, {summary['int8_layers']} with an INT8 format, "
        f"{summary['io_tensors']} I/O tensors (see {path.name})"
    )
    return path.name
