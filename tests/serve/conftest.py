"""One Orthanc (if installed) and one ldseg-serve (Ray Serve, demo model) for all of tests/serve.

Ray starts once per session of these tests (it is the slow part on 2 cores); Orthanc is started
from the Debian package with its own configuration and storage in a temporary folder, before the
server, whose DICOMweb endpoint points at it. Both listen on 127.0.0.1 ports picked free here.
Missing Ray Serve or Orthanc skips the tests that need them, with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
API_KEY = "test-key-0123456789abcdef"
ORTHANC_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
SCU_AET = "LDSEGTEST"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve_missing() -> str | None:
    try:
        import fastapi  # noqa: F401
        import requests  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError as exc:
        return f"Ray Serve is not installed ({exc}): pip install -e '.[serve,dev]'"
    return None


@dataclass(frozen=True)
class Orthanc:
    http: str  # http://127.0.0.1:PORT
    dicom_port: int
    dicomweb: str  # the DICOMweb root
    log: Path


def orthanc_missing() -> str | None:
    if shutil.which("Orthanc") is None:
        return "Orthanc is not installed: apt-get install orthanc orthanc-dicomweb (.ci/run does)"
    if not ORTHANC_PLUGIN.exists():
        return f"the Orthanc DICOMweb plugin is missing ({ORTHANC_PLUGIN}): apt-get install orthanc-dicomweb"
    return None


def _wait_http(url: str, seconds: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    import requests

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {seconds} s")


@pytest.fixture(scope="package")
def orthanc_or_reason(tmp_path_factory: pytest.TempPathFactory, serve_port: int) -> Iterator[Orthanc | str]:
    """Orthanc on 127.0.0.1 (deploy/orthanc's configuration, temp storage, free ports), or why not."""
    reason = orthanc_missing() or _serve_missing()
    if reason is not None:
        yield reason
        return
    folder = tmp_path_factory.mktemp("orthanc")
    config = json.loads((REPO / "deploy" / "orthanc" / "orthanc.json").read_text())
    http_port, dicom_port = free_port(), free_port()
    config.update(
        StorageDirectory=str(folder / "db"),
        IndexDirectory=str(folder / "db"),
        HttpPort=http_port,
        DicomPort=dicom_port,
        StableAge=1,
        DicomModalities={"test": [SCU_AET, "127.0.0.1", free_port()]},
        LuaScripts=[str(REPO / "deploy" / "orthanc" / "ldseg.lua")],
        Plugins=[str(ORTHANC_PLUGIN)],
    )
    (folder / "orthanc.json").write_text(json.dumps(config, indent=2))
    log = folder / "orthanc.log"
    env = {**os.environ, "LDSEG_SERVE_URL": f"http://127.0.0.1:{serve_port}", "LDSEG_API_KEY": API_KEY}
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            ["Orthanc", str(folder / "orthanc.json")], stdout=sink, stderr=subprocess.STDOUT, env=env
        )
    try:
        _wait_http(f"http://127.0.0.1:{http_port}/system", 60, proc)
        yield Orthanc(f"http://127.0.0.1:{http_port}", dicom_port, f"http://127.0.0.1:{http_port}/dicom-web", log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="package")
def serve_port() -> int:
    return free_port()


@pytest.fixture(scope="package")
def server(orthanc_or_reason: Orthanc | str, serve_port: int, tmp_path_factory: pytest.TempPathFactory):
    """ldseg-serve with the demo model: API key, small limits (413 and 503 are cheap to reach)."""
    reason = _serve_missing()
    if reason is not None:
        pytest.skip(reason)
    from ldseg.runs.specs import ModelSpec
    from ldseg.serve.config import ServeConfig
    from ldseg.serve.launch import start, stop

    config = ServeConfig(
        model=ModelSpec(checkpoint="demo"),
        max_samples=4,
        port=serve_port,
        max_batch=4,
        batch_wait_s=0.05,
        max_queued=12,
        api_key=API_KEY,
        max_upload_mb=4,
        dicomweb=orthanc_or_reason.dicomweb if isinstance(orthanc_or_reason, Orthanc) else None,
        metrics_port=free_port(),
        ready_timeout_s=300,
    )
    start(config, log_to_driver=False)
    try:
        yield config
    finally:
        stop()


@pytest.fixture(scope="package")
def orthanc(orthanc_or_reason: Orthanc | str, server) -> Orthanc:
    if isinstance(orthanc_or_reason, str):
        pytest.skip(orthanc_or_reason)
    return orthanc_or_reason


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}
