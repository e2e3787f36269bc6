"""ldseg-serve over real HTTP on 127.0.0.1 (the package's server: demo model, API key, small limits).

Outputs are checked byte for byte against ldseg-run's for the same input and options (a SEG's
UIDs and dates aside); refusals against the reason ldseg-run prints for the same file.
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests

from ldseg.data.phantoms import make_phantom, write_phantom_nifti
from tests.helpers import assert_several_classes
from tests.io.dicom_series import write_series
from tests.serve.conftest import auth

BIN = Path(sys.executable).parent
GRID = (32, 64, 64)
TIMEOUT = 120  # seconds, per HTTP request
# A SEG's own identity and creation time differ between any two runs.
VOLATILE = {
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "ContentDate",
    "ContentTime",
    "SeriesDate",
    "SeriesTime",
    "InstanceCreationDate",
    "InstanceCreationTime",
    "DimensionOrganizationUID",
    "ContributionDateTime",
}


def _without_volatile(ds: pydicom.Dataset) -> pydicom.Dataset:
    for element in list(ds):
        if element.keyword in VOLATILE:
            del ds[element.tag]
        elif element.VR == "SQ":
            for item in element.value:
                _without_volatile(item)
    return ds


def post(server, data: bytes, path: str = "/v1/segment", headers: dict | None = None, **params) -> requests.Response:
    return requests.post(
        server.url + path, data=data, params=params, headers=auth() if headers is None else headers, timeout=TIMEOUT
    )


def zip_folder(folder: Path, prefix: str = "") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.iterdir()):
            zf.write(path, prefix + path.name)
    return buffer.getvalue()


def cli_failures(stderr: str, folder: Path) -> list[str]:
    """ldseg-run's one-line reasons for the inputs under `folder` ("failed: <path>: reason")."""
    prefix = f"failed: {folder}/"
    return [line.split("failed: ", 1)[1].strip() for line in stderr.splitlines() if line.startswith(prefix)]


def same_seg(a: bytes, b: bytes) -> None:
    """Two SEGs equal in every element but their own UIDs and dates (pixel data included)."""
    x, y = (_without_volatile(pydicom.dcmread(io.BytesIO(v))) for v in (a, b))
    assert x.PixelData == y.PixelData
    keys = {e.keyword for e in x} | {e.keyword for e in y}
    for key in sorted(keys - {"PixelData", ""}):
        assert x.get(key) == y.get(key), f"SEG element {key} differs"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A NIfTI phantom and the same phantom as a DICOM series, and ldseg-run's outputs for them."""
    root = tmp_path_factory.mktemp("inputs")
    phantom = make_phantom(7, GRID, 3)
    write_phantom_nifti(phantom, root / "case.nii.gz", root / "truth.nii.gz", overwrite=False)
    write_series(root / "series", make_phantom(8, GRID, 3).image, shuffle_seed=3)
    runs = {
        "nifti": ["ldseg-run", str(root / "case.nii.gz"), "-o", str(root / "run1")],
        "series": [
            "ldseg-run",
            str(root / "series"),
            "--output-type",
            "nifti",
            "--output-type",
            "dicom-seg",
            "-o",
            str(root / "run2"),
        ],  # fmt: skip
        "samples": [
            "ldseg-run",
            str(root / "case.nii.gz"),
            "--samples",
            "2",
            "--steps",
            "4",
            "--seed",
            "5",
            "-o",
            str(root / "run3"),
        ],  # fmt: skip
    }
    procs = {
        k: subprocess.Popen([str(BIN / a[0]), *a[1:]], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for k, a in runs.items()
    }
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"ldseg-run ({name}) failed: {err.decode(errors='replace')[-2000:]}"
    return root


def test_health_reports_the_warm_backend(server):
    r = requests.get(server.url + "/v1/health", headers=auth(), timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["ready"] is True and body["precision"] and body["device"]
    assert body["backend"] in ("openvino", "onnxruntime", "torch", "tensorrt")
    assert re.fullmatch(r"[0-9a-f]{64}", body["model_sha256"]) and body["version"]


def test_nifti_upload_gives_ldseg_runs_bytes(server, inputs):
    r = post(server, (inputs / "case.nii.gz").read_bytes(), filename="case.nii.gz")
    assert r.status_code == 200, r.text
    expected = (inputs / "run1" / "case_seg.nii.gz").read_bytes()
    assert r.content == expected, "the served segmentation differs from ldseg-run's file"
    assert_several_classes(np.asarray(nib.load(inputs / "run1" / "case_seg.nii.gz").dataobj), "ldseg-run's labels")
    assert r.headers["X-Ldseg-Backend"] == requests.get(server.url + "/v1/health", headers=auth()).json()["backend"]
    assert "loop;dur=" in r.headers["Server-Timing"] and "write;dur=" in r.headers["Server-Timing"]
    assert r.headers["Content-Disposition"] == 'attachment; filename="case_seg.nii.gz"'


def test_dicom_zip_gives_ldseg_runs_nifti_and_seg(server, inputs):
    body = zip_folder(inputs / "series", prefix="series/")  # a zip of the folder: one level down
    r = post(server, body, filename="series.zip")
    assert r.status_code == 200, r.text
    assert r.content == (inputs / "run2" / "series_seg.nii.gz").read_bytes()
    r = post(server, body, output_type="dicom-seg")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/dicom"
    same_seg(r.content, (inputs / "run2" / "series_seg.dcm").read_bytes())


def test_samples_return_a_zip_of_ldseg_runs_maps(server, inputs):
    r = post(server, (inputs / "case.nii.gz").read_bytes(), filename="case.nii.gz", samples=2, steps=4, seed=5)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        names = zf.namelist()
        assert names == ["case_seg.nii.gz", "case_confidence.nii.gz", "case_entropy.nii.gz"]
        for name in names:
            assert zf.read(name) == (inputs / "run3" / name).read_bytes(), f"{name} differs from ldseg-run's"


def test_samples_above_the_services_k_get_400_with_the_limit(server, inputs):
    """The server was started with max_samples=4 (tests/serve/conftest.py): K=5 is refused, K=4 is not."""
    body = (inputs / "case.nii.gz").read_bytes()
    r = post(server, body, filename="case.nii.gz", samples=5, steps=1)
    assert r.status_code == 400 and "at most 4 samples" in r.json()["detail"], r.text
    assert post(server, body, filename="case.nii.gz", samples=4, steps=1).status_code == 200


def test_sixteen_concurrent_requests_are_batched_and_each_equals_its_single_answer(server, tmp_path):
    bodies = []
    for seed in range(4):
        write_phantom_nifti(make_phantom(20 + seed, GRID, 3), tmp_path / f"p{seed}.nii.gz", tmp_path / "t.nii.gz", True)
        bodies.append((tmp_path / f"p{seed}.nii.gz").read_bytes())
    single = [post(server, b).content for b in bodies]
    assert len(set(single)) == 4, "different inputs must give different outputs for this check to mean anything"
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: post(server, bodies[i % 4]), range(16)))
    assert [a.status_code for a in answers] == [200] * 16, [a.text for a in answers if a.status_code != 200]
    for i, answer in enumerate(answers):
        assert answer.content == single[i % 4], f"request {i} differs from the same request alone"
    sizes = [int(a.headers["X-Ldseg-Batch-Size"]) for a in answers]
    assert max(sizes) > 1, f"no batch of more than one request formed: {sizes}"


def test_flood_past_max_queued_gets_503_with_retry_after_and_the_server_recovers(server, tmp_path):
    write_phantom_nifti(make_phantom(30, GRID, 3), tmp_path / "p.nii.gz", tmp_path / "t.nii.gz", False)
    body = (tmp_path / "p.nii.gz").read_bytes()
    flood = 3 * (server.max_batch + server.max_queued)
    with ThreadPoolExecutor(flood) as pool:
        answers = list(pool.map(lambda _: post(server, body), range(flood)))
    codes = [a.status_code for a in answers]
    refused = [a for a in answers if a.status_code == 503]
    assert refused and set(codes) <= {200, 503}, codes
    assert all(int(a.headers["Retry-After"]) >= 1 and a.json()["error"] == "overloaded" for a in refused)
    assert codes.count(200) >= server.max_batch + server.max_queued - 1
    assert post(server, body).status_code == 200  # and it still serves


def test_no_or_wrong_key_is_401(server):
    for headers in ({}, {"Authorization": "Bearer wrong-key-0123456789"}, {"Authorization": "Basic abc"}):
        r = post(server, b"x", headers=headers)
        assert r.status_code == 401 and r.json()["error"] == "auth", r.text
        assert requests.get(server.url + "/v1/health", headers=headers, timeout=TIMEOUT).status_code == 401


def test_bodies_over_the_limit_are_413(server):
    big = b"\0" * (server.max_upload_mb * (1 << 20) + 1)
    r = post(server, big)
    assert r.status_code == 413 and "upload limit of 4 MB" in r.json()["detail"], r.text

    def chunks():  # no Content-Length: counted while it streams
        for _ in range(server.max_upload_mb + 1):
            yield b"\0" * (1 << 20)

    r = post(server, chunks())  # type: ignore[arg-type]
    assert r.status_code == 413, r.text
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.dcm", b"\0" * (4 * server.max_upload_mb * (1 << 20) + 1))
    assert len(bomb.getvalue()) < server.max_upload_mb * (1 << 20)
    r = post(server, bomb.getvalue())
    assert r.status_code == 413 and "zip expands to more than" in r.json()["detail"], r.text


def _bad_inputs(folder: Path) -> dict[str, Path]:
    """Inputs ldseg-run refuses, one per kind."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    good = folder / "good.nii.gz"
    write_phantom_nifti(make_phantom(1, GRID, 3), good, folder / "truth.nii.gz", False)
    data = good.read_bytes()
    (folder / "truncated.nii.gz").write_bytes(data[: len(data) // 2])
    volume = rng.normal(size=(64, 64, 32)).astype(np.float32)
    volume[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(volume, np.eye(4)), folder / "nan.nii.gz")
    nib.save(nib.Nifti1Image(rng.normal(size=(64, 64)).astype(np.float32), np.eye(4)), folder / "flat.nii.gz")
    nib.save(nib.Nifti1Image(rng.normal(size=(16, 16, 8, 3)).astype(np.float32), np.eye(4)), folder / "four.nii.gz")
    files = write_series(folder / "badseries", make_phantom(2, GRID, 3).image[:6])
    files[2].write_bytes(files[2].read_bytes()[:1500])  # a slice cut off in its pixel data
    (folder / "truth.nii.gz").unlink()
    good.unlink()
    return {p.name: p for p in sorted(folder.iterdir())}


def test_bad_inputs_get_400_with_ldseg_runs_reason_and_the_server_keeps_serving(server, tmp_path):
    bad = _bad_inputs(tmp_path / "bad")
    run = subprocess.run(
        [str(BIN / "ldseg-run"), *map(str, bad.values()), "-o", str(tmp_path / "out"), "--backend", "torch"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 3, run.stderr
    reasons = {
        r.split(":", 1)[0]: r.replace(str(tmp_path / "bad") + "/", "")
        for r in cli_failures(run.stderr, tmp_path / "bad")
    }
    assert len(reasons) == len(bad), run.stderr
    for name, path in bad.items():
        if path.is_dir():
            r = post(server, zip_folder(path), filename=f"{name}.zip")
        else:
            r = post(server, path.read_bytes(), filename=name)
        assert r.status_code == 400, r.text
        expected = next(v for k, v in reasons.items() if Path(k).name == name or k.startswith(str(path) + "/"))
        assert r.json()["detail"] == expected, f"{name}: server and ldseg-run give different reasons"
    for data, status in ((b"", 400), (b"not a volume at all" * 30, 415)):
        assert post(server, data).status_code == status
    assert post(server, bad["nan.nii.gz"].read_bytes(), output_type="png").status_code == 400
    good = tmp_path / "good.nii.gz"
    write_phantom_nifti(make_phantom(3, GRID, 3), good, tmp_path / "t.nii.gz", False)
    assert post(server, good.read_bytes()).status_code == 200


def test_zip_members_outside_their_folder_are_refused(server, tmp_path):
    for member in ("../evil.dcm", "/abs/evil.dcm", "a/../../evil.dcm"):
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as zf:
            zf.writestr(zipfile.ZipInfo(member), b"DICM")
        r = post(server, buffer.getvalue())
        assert r.status_code == 400 and "outside the zip's folder" in r.json()["detail"], (member, r.text)
    link = zipfile.ZipInfo("link.dcm")
    link.external_attr = (0o120777 << 16) | 0
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr(link, "/etc/passwd")
    r = post(server, buffer.getvalue())
    assert r.status_code == 400 and "symbolic link" in r.json()["detail"], r.text


def test_ldseg_metrics_are_exported_with_rays(server):
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        text = requests.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).text
        if "ldseg_request_seconds_bucket" in text and "ldseg_stage_ms_bucket" in text:
            break
        time.sleep(2)
    assert "ldseg_request_seconds_bucket" in text and "ldseg_stage_ms_bucket" in text
    assert "ray_serve_" in text and "ldseg_batch_size" in text


def test_a_killed_replica_is_replaced_and_the_next_request_succeeds(server, tmp_path):
    write_phantom_nifti(make_phantom(40, GRID, 3), tmp_path / "p.nii.gz", tmp_path / "t.nii.gz", False)
    body = (tmp_path / "p.nii.gz").read_bytes()
    before = post(server, body)
    pid = requests.get(server.url + "/v1/health", headers=auth(), timeout=TIMEOUT).json()["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline, answer = time.monotonic() + 240, None
    while time.monotonic() < deadline:
        try:
            answer = post(server, body)
            if answer.status_code == 200:
                break
        except requests.RequestException:
            pass
        time.sleep(1)
    assert answer is not None and answer.status_code == 200, answer.text if answer is not None else "no answer"
    assert answer.content == before.content
    assert requests.get(server.url + "/v1/health", headers=auth(), timeout=TIMEOUT).json()["pid"] != pid
