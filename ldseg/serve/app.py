"""The Serve deployment: one warm backend per replica, HTTP in front (FastAPI ingress).

    request -> auth, admission, body streamed to a temp folder   (event loop)
            -> plan, check, read and preprocess                   (worker thread)
            -> @serve.batch: the batch's requests one after another on the backend  (the model's thread)
            -> back to the input grid, written as ldseg-run writes  (worker thread) -> response

The model's thread is one thread per replica: the backend (and a GPU's CUDA graphs, cached per
shape) lives on it, built there, warmed up there (one phantom through the whole request path)
before the replica reports ready. A batch runs its requests one after another, each with its
own K samples, so each result is bit-identical to the same request alone; the batch gathers them
so that reading and writing of the next requests overlap the model.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations (Request) at run time.
import asyncio
import contextlib
import hmac
import io
import json
import logging
import math
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

import ldseg
from ldseg.errors import LdsegError
from ldseg.serve import dicomweb
from ldseg.serve.config import ServeConfig
from ldseg.serve.errors import HttpProblem, problem_of
from ldseg.serve.metrics import ServeMetrics
from ldseg.serve.pipeline import Inferred, RunOptions, finish, infer_read, options_for, plan_and_read, producer_of
from ldseg.serve.query import SegmentQuery, check_uid, parse_query
from ldseg.serve.uploads import ZIP_EXPANSION, materialize, receive

log = logging.getLogger("ldseg.serve")
api = FastAPI(title="ldseg-serve", version=ldseg.__version__)
_MEDIA = {".nii.gz": "application/gzip", ".dcm": "application/dicom", ".zip": "application/zip"}


def error_response(problem: HttpProblem) -> JSONResponse:
    return JSONResponse({"error": problem.kind, "detail": problem.detail}, problem.status, headers=problem.headers)


def media_type(path: Path) -> str:
    name = path.name.lower()
    return next((m for s, m in _MEDIA.items() if name.endswith(s)), "application/octet-stream")


def pack(files: list[Path], stem: str) -> tuple[bytes, str, str]:
    """One file as itself; several (samples > 1: seg, confidence, entropy) as one zip, stored
    uncompressed (the members are gzip already), in writing order."""
    if len(files) == 1:
        return files[0].read_bytes(), media_type(files[0]), files[0].name
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:
        for path in files:
            zf.write(path, path.name)
    return buffer.getvalue(), "application/zip", f"{stem}_outputs.zip"


def server_timing(stage_ms: dict[str, float]) -> str:
    return ", ".join(f"{name};dur={ms:.1f}" for name, ms in stage_ms.items())


@serve.deployment
@serve.ingress(api)
class SegmentService:
    def __init__(self, config: ServeConfig):
        self.config = config
        self.metrics = ServeMetrics()
        self.seg: Any = None
        self.broken: str | None = None  # why this replica must be replaced (check_health)
        self.admitted = 0
        self.mean_s = 1.0  # moving average of a request's time (Retry-After)
        self._jobs: set[asyncio.Task[None]] = set()  # 202-answered DICOMweb requests still running
        batched: Any = self._batched  # serve.batch's wrapper (its type hides these setters)
        batched.set_max_batch_size(config.max_batch)
        batched.set_batch_wait_timeout_s(config.batch_wait_s)
        self._model = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ldseg-model")
        self._warm: Future[None] = self._model.submit(self._build_and_warm_up)

    # ------------------------------------------------------------------ the model's thread

    def _build_and_warm_up(self) -> None:
        """Build the backend (normal selection, artifact cache) and run one request end to end."""
        from ldseg.api import Segmenter
        from ldseg.data.phantoms import make_phantom, write_phantom_nifti

        clock = time.perf_counter()
        self.seg = Segmenter.of(self.config.model, warn_demo=False)
        self.producer = producer_of(self.seg)
        with tempfile.TemporaryDirectory(prefix="ldseg-warmup-") as tmp:
            cfg = self.seg.config
            if cfg.spatial_dims == 3:
                phantom = make_phantom(0, cfg.image_size, cfg.num_classes)
                image = Path(tmp) / "warmup.nii.gz"
                write_phantom_nifti(phantom, image, Path(tmp) / "truth.nii.gz", overwrite=False)
                opts = options_for(self.seg, samples=1, steps=None, seed=0, output_type="nifti")
                (Path(tmp) / "out").mkdir()
                ops = self.seg.backend.volume_ops()
                read = plan_and_read(image, Path(tmp) / "out", cfg, opts, ops)
                finish(read, infer_read(read, self.seg, opts), cfg, opts, self.producer, ops)
        self.warm_s = time.perf_counter() - clock
        log.info("ldseg-serve replica ready in %.1f s: %s", self.warm_s, self.seg.why)

    def _run_batch(self, jobs: list[tuple[Any, RunOptions]]) -> list[Inferred | BaseException]:
        results: list[Inferred | BaseException] = []
        for read, opts in jobs:
            try:
                inferred = infer_read(read, self.seg, opts)
                results.append(Inferred(inferred.result, inferred.infer_ms, len(jobs)))
            except LdsegError as exc:
                results.append(exc)
            except Exception as exc:  # the backend's state is unknown now: Serve replaces this replica
                self.broken = f"the model failed ({type(exc).__name__}: {exc})"
                log.exception("model failure; this replica reports unhealthy and will be replaced")
                results.append(exc)
        return results

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def _batched(self, jobs: list[tuple[Any, RunOptions]]) -> list[Inferred | BaseException]:
        self.metrics.batch_size(len(jobs))
        return await asyncio.get_running_loop().run_in_executor(self._model, self._run_batch, jobs)

    async def _infer(self, read: Any, opts: RunOptions) -> Inferred:
        result = await self._batched((read, opts))
        if isinstance(result, BaseException):
            raise result
        return result

    # ------------------------------------------------------------------ Serve's hooks

    def check_health(self) -> None:
        """Serve calls this periodically; raising makes it replace the replica."""
        if self._warm.done() and self._warm.exception() is not None:
            raise RuntimeError(f"warm-up failed: {self._warm.exception()}")
        if self.broken is not None:
            raise RuntimeError(self.broken)

    # ------------------------------------------------------------------ request plumbing

    def _authorize(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise HttpProblem(401, "missing or wrong API key: send Authorization: Bearer <key>", "auth",
                              {"WWW-Authenticate": "Bearer"})  # fmt: skip

    @contextlib.contextmanager
    def _admission(self) -> Iterator[None]:
        """A request waits only where there is room: max_batch running plus max_queued waiting."""
        if self.admitted >= self.config.max_batch + self.config.max_queued:
            wait = max(1, min(60, math.ceil(self.mean_s * self.admitted / self.config.max_batch)))
            raise HttpProblem(
                503,
                f"busy: {self.admitted} requests in this replica (--max-batch {self.config.max_batch} + "
                f"--max-queued {self.config.max_queued}); retry in {wait} s",
                "overloaded",
                {"Retry-After": str(wait)},
            )
        self.admitted += 1
        try:
            yield
        finally:
            self.admitted -= 1

    async def _ready(self) -> None:
        if not self._warm.done():
            try:
                await asyncio.wait_for(asyncio.wrap_future(self._warm), timeout=self.config.ready_timeout_s)
            except asyncio.TimeoutError:
                raise HttpProblem(
                    503, "warming up: the backend is not ready yet", "warming", {"Retry-After": "5"}
                ) from None
        if self._warm.exception() is not None:
            raise HttpProblem(503, f"warm-up failed: {self._warm.exception()}", "backend")
        if self.broken is not None:
            raise HttpProblem(503, f"replica failing, being replaced: {self.broken}", "backend", {"Retry-After": "5"})

    async def _handle(self, endpoint: str, request: Request, work: Any) -> Response:
        """Auth, then _run: around every POST."""
        try:
            self._authorize(request)
        except HttpProblem as problem:
            self.metrics.request(endpoint, problem.status, 0.0)
            return error_response(problem)
        return await self._run(endpoint, work)

    async def _run(self, endpoint: str, work: Any) -> Response:
        """Admission, a temp folder (removed after), errors as JSON, latency recorded."""
        started, status = time.perf_counter(), 500
        try:
            with self._admission():
                await self._ready()
                tmp = await asyncio.to_thread(tempfile.mkdtemp, prefix="ldseg-serve-")
                try:
                    response: Response = await work(Path(tmp))
                except HttpProblem:
                    raise
                except Exception as exc:
                    problem = problem_of(exc, tmp)
                    if problem.status >= 500:
                        log.exception("%s failed", endpoint)
                    raise problem from exc
                finally:
                    await asyncio.to_thread(shutil.rmtree, tmp, True)
            status = response.status_code
            elapsed = time.perf_counter() - started
            self.mean_s = 0.8 * self.mean_s + 0.2 * elapsed
            return response
        except HttpProblem as problem:
            status = problem.status
            return error_response(problem)
        finally:
            self.metrics.request(endpoint, status, time.perf_counter() - started)

    async def _job(self, what: str, work: Any) -> None:
        """A request answered 202 (Prefer: respond-async), run to its end; the outcome is logged."""
        response = await self._run("dicomweb-async", work)
        outcome = bytes(response.body).decode(errors="replace")
        if response.status_code == 200:
            log.info("%s: done %s", what, outcome)
        else:
            log.warning("%s: refused %s %s", what, response.status_code, outcome)

    def _query(self, request: Request) -> SegmentQuery:
        assert self.config.max_samples is not None  # ServeConfig resolves it
        return parse_query(request.query_params, self.config.max_samples)

    def _headers(self, stage_ms: dict[str, float], batch_size: int) -> dict[str, str]:
        backend = self.seg.backend
        self.metrics.stage_times(stage_ms)
        return {
            "X-Ldseg-Backend": backend.name,
            "X-Ldseg-Device": str(backend.device),
            "X-Ldseg-Precision": backend.precision,
            "X-Ldseg-Batch-Size": str(batch_size),
            "X-Ldseg-Stages-Ms": json.dumps({k: round(v, 2) for k, v in stage_ms.items()}),
            "Server-Timing": server_timing(stage_ms),
        }

    async def _segment_upload(self, request: Request, query: SegmentQuery, tmp: Path) -> Response:
        limit = self.config.max_upload_mb << 20
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise HttpProblem(413, f"body over the upload limit of {self.config.max_upload_mb} MB", "too_large")
        body = tmp / ".body"
        await receive(request.stream(), body, limit)
        upload = await asyncio.to_thread(materialize, body, tmp, query.filename, query.format, limit * ZIP_EXPANSION)
        opts = options_for(
            self.seg,
            samples=query.samples,
            steps=query.steps,
            seed=query.seed,
            output_type=query.output_type,
            seg_type=query.seg_type,
            series=query.series,
        )
        out = tmp / ".out"
        out.mkdir()
        ops = self.seg.backend.volume_ops()
        read = await asyncio.to_thread(plan_and_read, upload.path, out, self.seg.config, opts, ops)
        inferred = await self._infer(read, opts)
        written = await asyncio.to_thread(finish, read, inferred, self.seg.config, opts, self.producer, ops)
        content, media, name = await asyncio.to_thread(pack, written.files, upload.stem)
        headers = self._headers({**inferred.stage_ms, "infer": inferred.infer_ms, **written.stage_ms},
                                inferred.batch_size)  # fmt: skip
        headers["Content-Disposition"] = f'attachment; filename="{name}"'
        return Response(content, media_type=media, headers=headers)

    async def _segment_dicomweb(self, study: str, series: str, query: SegmentQuery, tmp: Path) -> Response:
        url = self.config.dicomweb
        if url is None:
            raise HttpProblem(501, "no DICOMweb server configured: start ldseg-serve with --dicomweb URL", "config")
        timeout = self.config.dicomweb_timeout_s
        folder = tmp / "series"
        clock = time.perf_counter()
        await asyncio.to_thread(dicomweb.fetch_series, url, study, series, folder, timeout)
        fetch_ms = (time.perf_counter() - clock) * 1e3
        opts = options_for(
            self.seg, samples=query.samples, steps=query.steps, seed=query.seed, output_type="dicom-seg", series=series
        )
        out = tmp / ".out"
        out.mkdir()
        ops = self.seg.backend.volume_ops()
        read = await asyncio.to_thread(plan_and_read, folder, out, self.seg.config, opts, ops)
        inferred = await self._infer(read, opts)
        written = await asyncio.to_thread(finish, read, inferred, self.seg.config, opts, self.producer, ops)
        clock = time.perf_counter()
        uid = await asyncio.to_thread(dicomweb.store_seg, url, written.files[0], timeout)
        stages = {"fetch": fetch_ms, **inferred.stage_ms, "infer": inferred.infer_ms, **written.stage_ms,
                  "store": (time.perf_counter() - clock) * 1e3}  # fmt: skip
        body = {"sop_instance_uid": uid, "study_instance_uid": study, "source_series_instance_uid": series}
        return JSONResponse(body, headers=self._headers(stages, inferred.batch_size))

    # ------------------------------------------------------------------ endpoints

    @api.get("/v1/health")
    async def health(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except HttpProblem as problem:
            return error_response(problem)
        base = {"version": ldseg.__version__, "pid": os.getpid()}
        if not self._warm.done():
            return JSONResponse({"ready": False, "detail": "warming up", **base}, 503, headers={"Retry-After": "5"})
        failure = self._warm.exception() or self.broken
        if failure is not None:
            return JSONResponse({"ready": False, "detail": f"failed: {failure}", **base}, 503)
        backend = self.seg.backend
        return JSONResponse(
            {
                "ready": True,
                "backend": backend.name,
                "device": str(backend.device),
                "precision": backend.precision,
                "model_sha256": self.seg.selection.checkpoint_hash,
                "preset": self.seg.config.preset,
                "why": self.seg.why,
                "warm_up_s": round(self.warm_s, 2),
                **base,
            }
        )

    @api.post("/v1/segment")
    async def segment(self, request: Request) -> Response:
        async def work(tmp: Path) -> Response:
            return await self._segment_upload(request, self._query(request), tmp)

        return await self._handle("segment", request, work)

    @api.post("/v1/dicomweb/studies/{study}/series/{series}")
    async def segment_dicomweb(self, study: str, series: str, request: Request) -> Response:
        """Synchronous: 200 with the SEG's SOP Instance UID once it is stored. With `Prefer:
        respond-async` (RFC 7240): 202 at once and the work goes on; a PACS calling from inside a
        callback (Orthanc's Lua holds its lock during HttpPost, and its DICOMweb server waits on
        that lock) must not wait for its own WADO-RS answer."""
        try:
            self._authorize(request)
            query = self._query(request)
            uids = check_uid(study, "study"), check_uid(series, "series")
        except HttpProblem as problem:
            return error_response(problem)

        async def work(tmp: Path) -> Response:
            return await self._segment_dicomweb(*uids, query, tmp)

        if "respond-async" not in request.headers.get("prefer", "").lower():
            return await self._run("dicomweb", work)
        if self.admitted >= self.config.max_batch + self.config.max_queued:
            return await self._run("dicomweb", work)  # over capacity: answered 503 with Retry-After
        task = asyncio.get_running_loop().create_task(self._job(f"series {series}", work))
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)
        body = {"accepted": True, "study_instance_uid": study, "series_instance_uid": series}
        return JSONResponse(body, 202, headers={"Preference-Applied": "respond-async"})


def build(config: ServeConfig) -> Any:
    """The Serve application for `config` (serve.run it, or use ldseg.serve.launch.start)."""
    capacity = config.max_batch + config.max_queued
    deployment: Any = SegmentService  # a serve.Deployment (the decorator's type is lost on the class)
    return deployment.options(
        num_replicas=config.replicas,
        # Every request is let through to a replica, which admits or refuses it (JSON + Retry-After);
        # Serve's own queue (plain-text 503) only holds requests while no replica is up.
        max_ongoing_requests=capacity + 8,
        max_queued_requests=max(64, 4 * capacity),
        ray_actor_options={"num_cpus": config.cpus_per_replica, "num_gpus": config.gpus_per_replica},
        health_check_period_s=2,
        health_check_timeout_s=30,
        graceful_shutdown_timeout_s=5,
    ).bind(config)
