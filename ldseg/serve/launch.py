"""Start ldseg-serve in this process: Ray on this machine, Serve's HTTP proxy on --host/--port,
the deployment, then wait until a replica answers /v1/health as ready."""

from __future__ import annotations

import ipaddress
import json
import time
import urllib.error
import urllib.request
from typing import Any

from ldseg.errors import BackendUnavailable, LdsegError
from ldseg.serve.config import ServeConfig

INSTALL_HINT = "ldseg-serve needs Ray Serve: pip install 'ldseg[serve]'"
APP_NAME = "ldseg"


def import_serve() -> Any:
    try:
        from ray import serve
    except ImportError as exc:
        raise BackendUnavailable(INSTALL_HINT) from exc
    return serve


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def health(config: ServeConfig, timeout: float = 5.0) -> tuple[int, dict[str, Any]]:
    """GET /v1/health: (status, JSON body); (0, {}) while nothing answers."""
    request = urllib.request.Request(config.url + "/v1/health")
    if config.api_key:
        request.add_header("Authorization", f"Bearer {config.api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read())
        except ValueError:
            return exc.code, {}
    except (urllib.error.URLError, OSError, ValueError):
        return 0, {}


def wait_ready(config: ServeConfig) -> dict[str, Any]:
    """Poll /v1/health until a replica is warm; LdsegError with its reason if warm-up failed."""
    deadline = time.monotonic() + config.ready_timeout_s
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status, body = health(config)
        if status == 200 and body.get("ready"):
            return body
        if str(body.get("detail", "")).startswith("failed"):
            raise LdsegError(f"ldseg-serve: the replica could not start: {body['detail']}")
        time.sleep(0.5)
    raise LdsegError(f"ldseg-serve: no replica ready after {config.ready_timeout_s:.0f} s ({body or 'no answer'})")


def start(config: ServeConfig, *, log_to_driver: bool = True) -> dict[str, Any]:
    """Start Ray (if this process has none), Serve and the app; returns the first ready health."""
    import ray

    serve = import_serve()
    from ldseg.serve.app import build

    if not ray.is_initialized():
        options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": log_to_driver}
        if config.metrics_port is not None:
            options["_metrics_export_port"] = config.metrics_port
        ray.init(**options)
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build(config), name=APP_NAME, route_prefix="/", blocking=False)
    return wait_ready(config)


def stop() -> None:
    import ray

    serve = import_serve()
    serve.shutdown()
    ray.shutdown()
