"""ldseg/serve/uploads.py and errors.py without a server: names, format sniffing, zip safety, statuses."""

from __future__ import annotations

import io
import zipfile

import pytest

from ldseg.errors import ArtifactError, BackendUnavailable, InputError, OutputError
from ldseg.serve.errors import HttpProblem, problem_of
from ldseg.serve.uploads import extract_zip, materialize, safe_name, sniff


@pytest.mark.parametrize(
    ("given", "expected"),
    [("case1.nii.gz", "case1.nii.gz"), ("../../etc/passwd", "passwd"), ("a\\b\\c.nrrd", "c.nrrd"), ("", "upload"),
     ("..", "upload"), ("x y;rm -rf.mha", "x_y_rm_-rf.mha")],
)  # fmt: skip
def test_client_names_become_one_harmless_component(given, expected):
    assert safe_name(given) == expected


@pytest.mark.parametrize(
    ("head", "suffix"),
    [(b"\x1f\x8b\x08" + b"\0" * 400, ".nii.gz"), (b"NRRD0004\n", ".nrrd"), (b"PK\x03\x04" + b"\0" * 30, ".zip"),
     (b"\0" * 344 + b"n+1\0" + b"\0" * 10, ".nii"), (b"ObjectType = Image\nNDims = 3\n", ".mha")],
)  # fmt: skip
def test_formats_are_read_from_the_first_bytes(tmp_path, head, suffix):
    (tmp_path / "body").write_bytes(head)
    assert sniff(tmp_path / "body") == suffix


def test_an_unknown_format_is_415(tmp_path):
    (tmp_path / "body").write_bytes(b"hello world" * 50)
    with pytest.raises(HttpProblem) as caught:
        sniff(tmp_path / "body")
    assert caught.value.status == 415


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


@pytest.mark.parametrize("member", ["../x.dcm", "/x.dcm", "a/../../x.dcm", "C:/x.dcm"])
def test_zip_paths_outside_the_folder_are_refused_and_nothing_lands_outside(tmp_path, member):
    (tmp_path / "in.zip").write_bytes(_zip({member: b"data"}))
    with pytest.raises(InputError, match="outside the zip's folder"):
        extract_zip(tmp_path / "in.zip", tmp_path / "out", max_total=1 << 20)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["in.zip", "out"]


def test_zip_size_is_counted_on_the_bytes_written(tmp_path):
    (tmp_path / "in.zip").write_bytes(_zip({"a.dcm": b"\0" * (3 << 20)}))
    with pytest.raises(HttpProblem, match="expands to more than 2 MB") as caught:
        extract_zip(tmp_path / "in.zip", tmp_path / "out", max_total=2 << 20)
    assert caught.value.status == 413


def test_a_zip_without_dicom_files_or_with_two_folders_is_refused(tmp_path):
    dicom = b"\0" * 128 + b"DICM" + b"\0" * 16
    (tmp_path / "none.zip").write_bytes(_zip({"readme.txt": b"hi"}))
    with pytest.raises(InputError, match="the zip holds no DICOM files"):
        materialize(tmp_path / "none.zip", tmp_path, "none.zip", None, 1 << 20)
    (tmp_path / "two.zip").write_bytes(_zip({"a/1.dcm": dicom, "b/1.dcm": dicom}))
    with pytest.raises(InputError, match="DICOM files in 2 folders"):
        materialize(tmp_path / "two.zip", tmp_path, "two.zip", None, 1 << 20)
    (tmp_path / "one.zip").write_bytes(_zip({"study/series/1.dcm": dicom}))
    upload = materialize(tmp_path / "one.zip", tmp_path, "one.zip", None, 1 << 20)
    assert upload.path == tmp_path / "one" / "study" / "series" and upload.stem == "one"


def test_each_error_has_one_status_and_the_temp_folder_is_cut_from_the_reason():
    cases = [
        (InputError("/tmp/ldseg-serve-x/upload.nii.gz: truncated"), 400, "upload.nii.gz: truncated"),
        (ValueError("a DICOM SEG holds the segmentation only"), 400, None),
        (BackendUnavailable("no GPU"), 503, None),
        (ArtifactError("tampered"), 500, None),
        (OutputError("disk full"), 500, None),
        (RuntimeError("boom"), 500, "internal error (RuntimeError: boom)"),
    ]
    for exc, status, detail in cases:
        problem = problem_of(exc, "/tmp/ldseg-serve-x")
        assert problem.status == status, exc
        if detail is not None:
            assert problem.detail == detail
