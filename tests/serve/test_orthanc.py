"""The PACS round trip: a series C-STOREd into Orthanc (Debian's package, started by the fixture on
127.0.0.1) is segmented by ldseg-serve through deploy/orthanc/ldseg.lua (OnStableSeries ->
POST /v1/dicomweb/...), and the DICOM SEG lands back in Orthanc. A series ldseg refuses gets its
reason from the endpoint, and nothing is stored for it.
"""

from __future__ import annotations

import time

import highdicom as hd
import numpy as np
import pydicom
import pytest
import requests

from ldseg.data.phantoms import make_phantom
from tests.io.dicom_series import ROOT, write_series
from tests.serve.conftest import SCU_AET, auth

GRID = (32, 64, 64)
WAIT_S = 180  # for the SEG to appear: stable age (1 s) + fetch + segment + store, on 2 busy cores


def c_store(orthanc, files) -> None:
    from pynetdicom import AE, StoragePresentationContexts

    ae = AE(ae_title=SCU_AET)
    ae.requested_contexts = StoragePresentationContexts
    assoc = ae.associate("127.0.0.1", orthanc.dicom_port, ae_title="ORTHANC")
    assert assoc.is_established, "no association with Orthanc"
    try:
        for path in files:
            status = assoc.send_c_store(pydicom.dcmread(path))
            assert status and status.Status == 0x0000, f"C-STORE of {path.name}: {status}"
    finally:
        assoc.release()


def qido_seg(orthanc, study: str) -> list[dict]:
    r = requests.get(f"{orthanc.dicomweb}/studies/{study}/series", params={"Modality": "SEG"}, timeout=30)
    if r.status_code == 204 or not r.content:
        return []
    r.raise_for_status()
    return r.json()


def test_a_stored_series_comes_back_with_its_seg(orthanc, server, tmp_path):
    from dicomweb_client.api import DICOMwebClient

    bad_study, study = f"{ROOT}.71", f"{ROOT}.72"
    bad = write_series(tmp_path / "bad", make_phantom(5, GRID, 3).image, series=f"{ROOT}.71.1", prefix="B")
    for path in bad:  # no FrameOfReferenceUID: ldseg refuses a SEG for it
        ds = pydicom.dcmread(path)
        del ds.FrameOfReferenceUID
        ds.StudyInstanceUID = bad_study
        ds.save_as(path)
    files = write_series(tmp_path / "good", make_phantom(6, GRID, 3).image, series=f"{ROOT}.72.1")
    for path in files:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = study
        ds.save_as(path)
    c_store(orthanc, bad)
    c_store(orthanc, files)

    deadline, found = time.monotonic() + WAIT_S, []
    while time.monotonic() < deadline and not found:
        found = qido_seg(orthanc, study)
        time.sleep(1)
    assert found, f"no SEG in Orthanc after {WAIT_S} s; Orthanc log:\n{orthanc.log.read_text()[-3000:]}"

    client = DICOMwebClient(orthanc.dicomweb)
    seg_series = found[0]["0020000E"]["Value"][0]
    [seg_ds] = client.retrieve_series(study, seg_series)
    seg = hd.seg.Segmentation.from_dataset(seg_ds)
    sources = {pydicom.dcmread(p).SOPInstanceUID for p in files}
    referenced = {uid for _, _, uid in seg.get_source_image_uids()}
    assert referenced == sources, "the SEG must reference the stored series' instances"
    assert seg.number_of_segments == 2 and seg.SegmentSequence[0].SegmentLabel == "structure 1"
    pixels = seg.get_pixels_by_source_instance(sorted(sources), ignore_spatial_locations=True)
    assert pixels.shape[0] == len(files) and np.count_nonzero(pixels) > 0

    # The refused series: nothing stored for it, and the endpoint says why.
    assert qido_seg(orthanc, bad_study) == []
    r = requests.post(f"{server.url}/v1/dicomweb/studies/{bad_study}/series/{ROOT}.71.1", headers=auth(), timeout=120)
    assert r.status_code == 400 and "no FrameOfReferenceUID" in r.json()["detail"], r.text
    assert qido_seg(orthanc, bad_study) == []


def test_an_unknown_series_is_404_and_a_bad_uid_400(orthanc, server):
    r = requests.post(f"{server.url}/v1/dicomweb/studies/{ROOT}.99/series/{ROOT}.99.1", headers=auth(), timeout=60)
    assert r.status_code == 404, r.text
    r = requests.post(f"{server.url}/v1/dicomweb/studies/1.2.x/series/3", headers=auth(), timeout=60)
    assert r.status_code == 400 and "not a DICOM UID" in r.json()["detail"], r.text


@pytest.mark.parametrize("missing", ["orthanc"])
def test_skips_say_why(missing):
    """Documented behaviour: without Orthanc these tests skip with the apt-get line (conftest)."""
    from tests.serve.conftest import orthanc_missing

    reason = orthanc_missing()
    assert reason is None or "apt-get install" in reason
