"""`ldseg-serve`: a warm segmentation service (ldseg.serve on Ray Serve); the CLI only parses,
starts and prints."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from ldseg.cli.common import (
    BackendOption,
    BundleOption,
    CheckpointOption,
    DeviceOption,
    EnginesOption,
    PrecisionOption,
    ThreadsOption,
    VersionOption,
    VolumeOpsOption,
    console,
    entry,
    out,
)
from ldseg.serve.config import DEFAULT_MAX_SAMPLES

serve_typer = typer.Typer(add_completion=False, help="Serve LDSeg segmentation over HTTP (Ray Serve).")


@serve_typer.command()
def serve(
    checkpoint: CheckpointOption = None,
    bundle: BundleOption = None,
    engines: EnginesOption = None,
    backend: BackendOption = "auto",
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    threads: ThreadsOption = None,
    volume_ops: VolumeOpsOption = "auto",
    max_samples: Annotated[
        Optional[int],
        typer.Option(
            help="Largest K samples a request may ask for (engines are built for it; above it: 400). "
            f"Default: an engine set's largest batch, else {DEFAULT_MAX_SAMPLES}."
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on; anything but loopback exposes the service.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8000,
    replicas: Annotated[int, typer.Option(help="Replicas, each with its own warm backend.")] = 1,
    gpus_per_replica: Annotated[float, typer.Option(help="GPUs per replica (0: CPU).")] = 0.0,
    max_batch: Annotated[int, typer.Option(help="Requests gathered into one Serve batch.")] = 4,
    max_queued: Annotated[
        int, typer.Option(help="Requests a replica admits beyond its batch; more get 503 + Retry-After.")
    ] = 32,
    api_key_file: Annotated[
        Optional[Path], typer.Option(help="File holding the key; requests need Authorization: Bearer <key>.")
    ] = None,
    max_upload_mb: Annotated[int, typer.Option(help="Largest request body (413 beyond).")] = 2048,
    dicomweb: Annotated[
        Optional[str], typer.Option(help="DICOMweb root URL (e.g. http://127.0.0.1:8042/dicom-web).")
    ] = None,
    metrics_port: Annotated[
        Optional[int], typer.Option(help="Port of Ray's Prometheus exporter (Serve's and ldseg's metrics).")
    ] = None,
    version: VersionOption = None,
) -> None:
    """Example: `ldseg-serve --checkpoint demo`, then
    `curl --data-binary @scan.nii.gz 127.0.0.1:8000/v1/segment -o scan_seg.nii.gz`."""
    from ldseg.runs.specs import ModelSpec
    from ldseg.serve.config import ServeConfig, read_api_key
    from ldseg.serve.launch import is_loopback, start, stop

    try:
        model = ModelSpec(
            checkpoint,
            bundle,
            engines,
            backend=backend,
            device=device,
            precision=precision,
            threads=threads,
            volume_ops=volume_ops,
        )
        config = ServeConfig(
            model=model,
            max_samples=max_samples,
            host=host,
            port=port,
            replicas=replicas,
            gpus_per_replica=gpus_per_replica,
            max_batch=max_batch,
            max_queued=max_queued,
            api_key=read_api_key(api_key_file) if api_key_file is not None else None,
            max_upload_mb=max_upload_mb,
            dicomweb=dicomweb,
            metrics_port=metrics_port,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    if not is_loopback(host) and config.api_key is None:
        console.print(f"[bold yellow]warning:[/] listening on {escape(host)} without --api-key-file", highlight=False)
    ready = start(config)
    console.print(
        f"backend: [bold]{ready['backend']}[/] on {ready['device']}, {ready['precision']} ({escape(ready['why'])})",
        highlight=False,
    )
    out.print(f"ldseg-serve ready at {config.url} ({replicas} replica(s)); Ctrl-C stops it", highlight=False)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        console.print("stopping", highlight=False)
    finally:
        stop()


main = entry(serve_typer, "ldseg-serve")
