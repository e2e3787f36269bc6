"""DICOMweb glue (dicomweb-client): fetch a series with WADO-RS into a folder ldseg reads, store a
SEG back with STOW-RS. A PACS that cannot be reached, or answers with an error, is a 502 naming it;
a series it does not hold is a 404. Nothing is stored unless the SEG was written.
"""

from __future__ import annotations

from pathlib import Path

import pydicom

from ldseg.errors import BackendUnavailable
from ldseg.serve.errors import HttpProblem, one_line

INSTALL_HINT = "the DICOMweb endpoint needs dicomweb-client: pip install 'ldseg[serve]'"


def _client(url: str, timeout: float):  # noqa: ANN202 (dicomweb_client has no stubs)
    try:
        from dicomweb_client.api import DICOMwebClient
    except ImportError as exc:
        raise BackendUnavailable(INSTALL_HINT) from exc
    return DICOMwebClient(url=url, timeout=timeout)


def _upstream(url: str, what: str, exc: Exception) -> HttpProblem:
    import requests

    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        code = exc.response.status_code
        if code == 404:
            return HttpProblem(404, f"{what}: not found on the DICOMweb server {url}", "not_found")
        return HttpProblem(502, f"{what}: the DICOMweb server {url} answered {code}", "upstream")
    return HttpProblem(502, f"{what}: DICOMweb server {url} unreachable ({one_line(str(exc))})", "upstream")


def fetch_series(url: str, study: str, series: str, folder: Path, timeout: float = 60.0) -> list[Path]:
    """WADO-RS: every instance of the series as a Part 10 file in `folder` (created)."""
    import requests

    what = f"series {series} of study {study}"
    try:
        datasets = _client(url, timeout).retrieve_series(study, series)
    except (requests.RequestException, OSError) as exc:
        raise _upstream(url, what, exc) from exc
    if not datasets:
        raise HttpProblem(404, f"{what}: the DICOMweb server {url} returned no instances", "not_found")
    folder.mkdir(parents=True)
    files = []
    for k, ds in enumerate(datasets):
        path = folder / f"{k:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def store_seg(url: str, path: Path, timeout: float = 60.0) -> str:
    """STOW-RS the SEG at `path`; its SOP Instance UID."""
    import requests

    ds = pydicom.dcmread(path)
    try:
        _client(url, timeout).store_instances([ds])
    except (requests.RequestException, OSError) as exc:
        raise _upstream(url, f"storing SEG {ds.SOPInstanceUID}", exc) from exc
    return str(ds.SOPInstanceUID)
