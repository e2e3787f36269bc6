"""ldseg/io/formats: dispatch, the NRRD/MetaImage readers' validation, atomic writers."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from ldseg.errors import InputError, OutputError
from ldseg.io.formats import DICOM, METAIMAGE, NIFTI, NRRD, format_of
from ldseg.io.geometry import Geometry
from ldseg.runs.volumes import expand_folder, stem
from tests.io.dicom_series import oblique_direction, write_series

GEOMETRY = Geometry((0.7, 1.3, 2.9), (10.1, -3.3, 7.7), tuple(oblique_direction().ravel()))


def _itk(array_kji: np.ndarray, geometry: Geometry = GEOMETRY) -> sitk.Image:
    image = sitk.GetImageFromArray(array_kji)
    geometry.apply_to(image)
    return image


def _noise(shape=(5, 6, 7)) -> np.ndarray:
    return np.random.default_rng(0).normal(size=shape).astype(np.float32)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p for p in os.listdir(folder) if p.startswith("."))


@pytest.mark.parametrize("name", ["a.nrrd", "a.nhdr", "a.mha", "a.mhd"])
def test_itk_formats_read_array_and_geometry(tmp_path, name):
    array = _noise()
    sitk.WriteImage(_itk(array), str(tmp_path / name))
    volume = format_of(tmp_path / name).read(tmp_path / name)
    np.testing.assert_array_equal(volume.array, array.transpose(2, 1, 0))  # (i, j, k) like nibabel
    assert volume.array.dtype == np.float32
    # MetaImage stores spacing and direction as given; NRRD stores their products (1-ulp changes)
    np.testing.assert_allclose(volume.geometry.spacing, GEOMETRY.spacing, rtol=0, atol=1e-12)
    np.testing.assert_allclose(volume.geometry.direction, GEOMETRY.direction, rtol=0, atol=1e-12)
    assert volume.geometry.origin == GEOMETRY.origin
    np.testing.assert_allclose(volume.affine, GEOMETRY.affine(), atol=1e-12)


def test_dispatch_by_extension_then_content(tmp_path):
    assert format_of(Path("x.nii.gz")) is NIFTI and format_of(Path("X.NRRD")) is NRRD
    assert format_of(Path("x.mhd")) is METAIMAGE
    sitk.WriteImage(_itk(_noise()), str(tmp_path / "a.nrrd"))
    (tmp_path / "scan").write_bytes((tmp_path / "a.nrrd").read_bytes())  # no extension: sniffed
    assert format_of(tmp_path / "scan") is NRRD
    nib.save(nib.Nifti1Image(_noise(), np.eye(4)), tmp_path / "b.nii")
    (tmp_path / "scan2").write_bytes((tmp_path / "b.nii").read_bytes())
    assert format_of(tmp_path / "scan2") is NIFTI
    assert format_of(tmp_path) is DICOM  # a folder is a series
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="notes.txt: not a volume ldseg reads"):
        format_of(tmp_path / "notes.txt")


def test_folder_expansion_finds_volume_files_and_dicom_series(tmp_path):
    sitk.WriteImage(_itk(_noise()), str(tmp_path / "a.nrrd"))
    sitk.WriteImage(_itk(_noise()), str(tmp_path / "b.mha"))
    assert expand_folder(tmp_path) == [tmp_path / "a.nrrd", tmp_path / "b.mha"]
    series = tmp_path / "series1"
    write_series(series, np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4))
    assert expand_folder(series) == [series]
    assert stem(series) == "series1" and stem(tmp_path / "a.nrrd") == "a"
    study = tmp_path / "study"
    write_series(study / "mr2", np.ones((2, 3, 4), np.int16))
    write_series(study / "mr1", np.ones((2, 3, 4), np.int16))
    (study / ".hidden").mkdir()
    assert expand_folder(study) == [study / "mr1", study / "mr2"]  # one series per subfolder
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("nothing here")
    with pytest.raises(InputError, match="empty: no .nii"):
        expand_folder(empty)


@pytest.mark.parametrize("fmt", [NRRD, METAIMAGE], ids=["nrrd", "mha"])
def test_itk_reader_refusals_name_the_file(tmp_path, fmt):
    ext = fmt.write_suffix

    def refused(name: str, image: sitk.Image, match: str) -> None:
        path = tmp_path / f"{name}{ext}"
        sitk.WriteImage(image, str(path))
        with pytest.raises(InputError, match=f"{name}{ext}: .*{match}"):
            fmt.read(path)

    refused("flat", sitk.GetImageFromArray(_noise((6, 7))), "2D image")
    refused("rgb", sitk.GetImageFromArray(np.zeros((3, 4, 5, 3), np.uint8), isVector=True), "scalar voxels")
    frames = sitk.JoinSeries([sitk.GetImageFromArray(_noise((3, 4, 5))) for _ in range(2)])  # 4D, 2 frames
    refused("frames", frames, "2 frames")
    nan = _noise()
    nan[1, 2, 3] = np.nan
    refused("nan", _itk(nan), "NaN")
    refused("constant", _itk(np.full((3, 4, 5), 7, np.float32)), "constant image")
    with pytest.raises(InputError, match="over the limit"):
        sitk.WriteImage(_itk(_noise()), str(tmp_path / f"big{ext}"))
        fmt.read(tmp_path / f"big{ext}", max_voxels=100)
    with pytest.raises(InputError, match="no such file"):
        fmt.read(tmp_path / f"absent{ext}")


@pytest.mark.parametrize("directions", ["(1,0,0) (1,0,0) (0,0,1)", "(0,0,0) (0,1,0) (0,0,1)"])
def test_degenerate_geometry_is_refused(tmp_path, directions):
    """ITK will not even hold such an image; the refusal must still be one line naming the file."""
    path = tmp_path / "degenerate.nrrd"
    header = (
        f"NRRD0004\ntype: float\ndimension: 3\nspace: left-posterior-superior\nsizes: 2 2 2\n"
        f"space directions: {directions}\nencoding: raw\nendian: little\nspace origin: (0,0,0)\n\n"
    )
    path.write_bytes(header.encode() + np.arange(8, dtype=np.float32).tobytes())
    with pytest.raises(InputError, match="degenerate.nrrd: .*(determinant|degenerate|spacing)"):
        NRRD.read(path)


@pytest.mark.parametrize("fmt", [NRRD, METAIMAGE], ids=["nrrd", "mha"])
def test_truncated_and_lying_files_are_refused(tmp_path, fmt):
    ext = fmt.write_suffix
    path = tmp_path / f"full{ext}"
    sitk.WriteImage(_itk(_noise((20, 30, 40))), str(path))  # uncompressed: the header states the size
    data = path.read_bytes()
    (tmp_path / f"short{ext}").write_bytes(data[: len(data) - 100])
    with pytest.raises(InputError, match=f"short{ext}: truncated"):
        fmt.read(tmp_path / f"short{ext}")
    (tmp_path / f"junk{ext}").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(InputError, match=f"junk{ext}: "):
        fmt.read(tmp_path / f"junk{ext}")


@pytest.mark.parametrize("fmt", [NRRD, METAIMAGE, NIFTI], ids=["nrrd", "mha", "nifti"])
def test_writers_are_atomic_and_refuse_overwrite(tmp_path, fmt):
    source = tmp_path / "in.mha"
    sitk.WriteImage(_itk(_noise()), str(source))
    reference = METAIMAGE.read(source)
    labels = (reference.array > 0).astype(np.uint8)
    out = tmp_path / "out"
    out.mkdir()
    target = out / f"seg{fmt.write_suffix}"
    fmt.write(target, labels, reference, overwrite=False, dtype=np.uint8)
    with pytest.raises(OutputError, match="exists"):
        fmt.write(target, labels, reference, overwrite=False, dtype=np.uint8)
    with pytest.raises(ValueError, match="shape"):
        fmt.write(out / f"bad{fmt.write_suffix}", labels[:-1], reference, overwrite=False, dtype=np.uint8)
    assert sorted(os.listdir(out)) == [target.name] and not _leftovers(out)
    back = sitk.ReadImage(str(target))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back).transpose(2, 1, 0), labels)
    assert back.GetPixelID() == sitk.sitkUInt8


def test_a_failing_itk_write_is_one_output_error_and_leaves_nothing(tmp_path, monkeypatch):
    source = tmp_path / "in.mha"
    sitk.WriteImage(_itk(_noise()), str(source))
    reference = METAIMAGE.read(source)
    out = tmp_path / "out"
    out.mkdir()

    def full_disk(image, name, useCompression=False):  # ITK half-writes, then reports in its own words
        Path(name).write_bytes(b"partial")
        raise RuntimeError("sitk::ERROR: ITK ERROR: NrrdImageIO(0x1): Write: Error writing: out of space")

    monkeypatch.setattr(sitk, "WriteImage", full_disk)
    with pytest.raises(OutputError, match=r"seg.nrrd: cannot write \(Write: Error writing: out of space\)"):
        NRRD.write(
            out / "seg.nrrd", np.zeros(reference.array.shape, np.uint8), reference, overwrite=False, dtype=np.uint8
        )
    assert os.listdir(out) == []
