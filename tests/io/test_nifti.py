from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ldseg.errors import InputError, OutputError
from ldseg.io.nifti import Volume, read_label_volume, read_volume, write_volume

# Oblique, anisotropic, translated: catches any axis or geometry mix-up.
_AFFINE = np.array(
    [
        [0.0, 0.0, 1.2, -40.0],
        [-0.8, 0.1, 0.0, 25.0],
        [0.1, 0.9, 0.0, -3.5],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def _save(path: Path, data: np.ndarray, affine: np.ndarray = _AFFINE, **kw: object) -> Path:
    img = nib.Nifti1Image(data, affine, dtype=data.dtype)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=2)
    nib.save(img, path)
    return path


def _random_int16(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-500, 3000, size=shape, dtype=np.int16)


def _assert_one_line_naming(info: pytest.ExceptionInfo[InputError], path: Path) -> None:
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message


# --- round trip --------------------------------------------------------------------------


def test_read_volume_float32_and_geometry(tmp_path: Path) -> None:
    data = _random_int16((9, 7, 5))
    path = _save(tmp_path / "img.nii.gz", data)
    vol = read_volume(path)
    assert vol.array.dtype == np.float32
    assert vol.array.shape == (9, 7, 5)
    np.testing.assert_array_equal(vol.array, data.astype(np.float32))
    np.testing.assert_allclose(vol.affine, _AFFINE, atol=1e-6)
    assert vol.path == path


def test_written_labels_overlay_the_input(tmp_path: Path) -> None:
    src = _save(tmp_path / "img.nii.gz", _random_int16((9, 7, 5)))
    ref = read_volume(src)
    labels = np.random.default_rng(1).integers(0, 3, size=(9, 7, 5)).astype(np.uint8)
    out = tmp_path / "seg.nii.gz"
    write_volume(out, labels, ref, overwrite=False)

    a, b = nib.load(src), nib.load(out)
    assert b.shape == a.shape
    assert b.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(b.affine, a.affine)
    np.testing.assert_array_equal(b.header.get_qform(), a.header.get_qform())
    np.testing.assert_array_equal(b.header.get_sform(), a.header.get_sform())
    assert int(b.header["qform_code"]) == int(a.header["qform_code"]) == 1
    assert int(b.header["sform_code"]) == int(a.header["sform_code"]) == 2
    np.testing.assert_array_equal(b.header.get_zooms(), a.header.get_zooms())
    slope, inter = b.header.get_slope_inter()
    assert slope is None and inter is None  # labels stored verbatim, no rescaling
    np.testing.assert_array_equal(np.asanyarray(b.dataobj), labels)
    assert read_label_volume(out).array.dtype == np.uint8


def test_write_refuses_existing_and_bad_names(tmp_path: Path) -> None:
    ref = read_volume(_save(tmp_path / "img.nii.gz", _random_int16((4, 4, 4))))
    labels = np.zeros((4, 4, 4), np.uint8)
    out = tmp_path / "seg.nii"
    write_volume(out, labels, ref, overwrite=False)
    with pytest.raises(OutputError, match="exists"):
        write_volume(out, labels, ref, overwrite=False)
    write_volume(out, labels + 1, ref, overwrite=True)
    assert read_label_volume(out).array.max() == 1
    with pytest.raises(OutputError, match=r"\.nii"):
        write_volume(tmp_path / "seg.png", labels, ref, overwrite=False)
    with pytest.raises(ValueError, match="shape"):
        write_volume(tmp_path / "x.nii.gz", labels[:2], ref, overwrite=False)


def test_single_frame_4d_is_squeezed(tmp_path: Path) -> None:
    data = _random_int16((6, 5, 4, 1))
    vol = read_volume(_save(tmp_path / "img.nii.gz", data))
    assert vol.array.shape == (6, 5, 4)
    assert vol.header.get_data_shape() == (6, 5, 4)
    out = tmp_path / "seg.nii.gz"
    write_volume(out, np.zeros((6, 5, 4), np.uint8), vol, overwrite=False)
    assert nib.load(out).shape == (6, 5, 4)


def test_scaled_data_reads_as_float32(tmp_path: Path) -> None:
    path = tmp_path / "scaled.nii"
    nib.save(nib.Nifti1Image(np.arange(60, dtype=np.int32).reshape(3, 4, 5), np.eye(4)), path)
    # Put a slope/intercept into the on-disk header afterwards, as scanners write them.
    with path.open("r+b") as f:
        hdr = nib.Nifti1Header.from_fileobj(f)
        hdr["scl_slope"], hdr["scl_inter"] = 0.5, 10.0
        f.seek(0)
        f.write(hdr.binaryblock)
    vol = read_volume(path)
    assert vol.array.dtype == np.float32
    np.testing.assert_allclose(vol.array.ravel(), np.arange(60) * 0.5 + 10.0)


# --- bad inputs: one InputError line naming the file ---------------------------------------


def _truncated_gz(tmp_path: Path) -> Path:
    path = _save(tmp_path / "t.nii.gz", _random_int16((32, 32, 32)))
    blob = path.read_bytes()
    path.write_bytes(blob[: int(len(blob) * 0.7)])  # header intact, payload cut
    return path


def _truncated_nii(tmp_path: Path) -> Path:
    path = _save(tmp_path / "t.nii", _random_int16((16, 16, 16)))
    path.write_bytes(path.read_bytes()[:2000])
    return path


def _corrupt_gz(tmp_path: Path) -> Path:
    path = _save(tmp_path / "c.nii.gz", _random_int16((32, 32, 32)))
    blob = bytearray(path.read_bytes())
    for i in range(len(blob) // 2, len(blob) // 2 + 64):
        blob[i] ^= 0xA5
    path.write_bytes(bytes(blob))
    return path


def _not_gzip(tmp_path: Path) -> Path:
    path = tmp_path / "g.nii.gz"
    path.write_bytes(b"definitely not gzip" * 50)
    return path


def _not_nifti(tmp_path: Path) -> Path:
    path = tmp_path / "n.nii"
    path.write_bytes(b"\0" * 400)
    return path


def _gzip_of_garbage(tmp_path: Path) -> Path:
    path = tmp_path / "gg.nii.gz"
    path.write_bytes(gzip.compress(b"garbage" * 100))
    return path


def _two_d(tmp_path: Path) -> Path:
    return _save(tmp_path / "2d.nii.gz", _random_int16((8, 8)))


def _multi_frame(tmp_path: Path) -> Path:
    return _save(tmp_path / "4d.nii.gz", _random_int16((6, 6, 6, 3)))


def _with_value(value: float, name: str):
    def make(tmp_path: Path) -> Path:
        data = np.random.default_rng(0).normal(size=(6, 6, 6)).astype(np.float32)
        data[2, 3, 4] = value
        return _save(tmp_path / name, data)

    return make


def _constant(tmp_path: Path) -> Path:
    return _save(tmp_path / "const.nii.gz", np.full((6, 6, 6), 7, np.int16))


def _sform_only(matrix: np.ndarray, name: str):
    def make(tmp_path: Path) -> Path:
        data = _random_int16((6, 6, 6))
        hdr = nib.Nifti1Header()
        hdr.set_data_shape(data.shape)
        hdr.set_data_dtype(np.int16)
        hdr.set_sform(matrix, code=1)  # the affine nibabel reports; qform stays unset
        nib.save(nib.Nifti1Image(data, None, header=hdr), tmp_path / name)
        return tmp_path / name

    return make


def _zero_size(tmp_path: Path) -> Path:
    return _save(tmp_path / "empty.nii.gz", np.zeros((0, 4, 4), np.int16))


_SINGULAR = np.diag([1.0, 1.0, 0.0, 1.0])
_NAN_AFFINE = np.diag([1.0, np.nan, 1.0, 1.0])

BAD_INPUTS = {
    "missing": (lambda p: p / "missing.nii.gz", "no such file"),
    "directory": (lambda p: p, "directory"),
    "not gzip": (_not_gzip, "not a readable NIfTI"),
    "gzip of garbage": (_gzip_of_garbage, "not a readable NIfTI"),
    "not nifti": (_not_nifti, "not a readable NIfTI"),
    "truncated gz": (_truncated_gz, "truncated or corrupt"),
    "truncated nii": (_truncated_nii, "truncated or corrupt"),
    "corrupt gz": (_corrupt_gz, "truncated or corrupt"),
    "2d": (_two_d, "2D image"),
    "multi-frame 4d": (_multi_frame, "3 frames"),
    "zero size": (_zero_size, "empty volume"),
    "nan": (_with_value(np.nan, "nan.nii.gz"), "NaN or infinite"),
    "inf": (_with_value(np.inf, "inf.nii.gz"), "NaN or infinite"),
    "constant": (_constant, "constant image"),
    "singular affine": (_sform_only(_SINGULAR, "sing.nii.gz"), "singular affine"),
    "nan affine": (_sform_only(_NAN_AFFINE, "nanaff.nii.gz"), "non-finite"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_input_error(tmp_path: Path, case: str) -> None:
    make, expected = BAD_INPUTS[case]
    path = make(tmp_path)
    with pytest.raises(InputError, match=expected) as info:
        read_volume(path)
    _assert_one_line_naming(info, path)
    assert info.value.exit_code == 3


def test_size_guard_checks_header_before_data(tmp_path: Path) -> None:
    # Truncated payload: only a header-only check can report the size rather than the damage.
    path = _truncated_gz(tmp_path)
    with pytest.raises(InputError, match="32768 voxels, over the limit of 1000 voxels") as info:
        read_volume(path, max_voxels=1000)
    _assert_one_line_naming(info, path)
    with pytest.raises(InputError, match="over the limit"):
        read_label_volume(path, max_voxels=1000)


# --- label volumes --------------------------------------------------------------------------


def test_label_volume_allows_constant_and_keeps_ids(tmp_path: Path) -> None:
    empty = read_label_volume(_save(tmp_path / "zeros.nii.gz", np.zeros((5, 5, 5), np.int8)))
    assert empty.array.dtype == np.uint8 and empty.array.max() == 0
    ids = np.arange(125, dtype=np.int16).reshape(5, 5, 5) * 4
    vol = read_label_volume(_save(tmp_path / "ids.nii.gz", ids))
    assert vol.array.dtype == np.uint16
    np.testing.assert_array_equal(vol.array, ids)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (np.full((4, 4, 4), 1.5, np.float32), "non-integer"),
        (np.full((4, 4, 4), -1, np.int16), "negative"),
        (np.full((4, 4, 4), np.nan, np.float32), "NaN"),
    ],
)
def test_bad_label_volume(tmp_path: Path, data: np.ndarray, expected: str) -> None:
    path = _save(tmp_path / "lab.nii.gz", data)
    with pytest.raises(InputError, match=expected) as info:
        read_label_volume(path)
    _assert_one_line_naming(info, path)


def test_label_volume_shares_structural_checks(tmp_path: Path) -> None:
    path = _truncated_gz(tmp_path)
    with pytest.raises(InputError, match="truncated or corrupt"):
        read_label_volume(path)


def test_volume_is_frozen(tmp_path: Path) -> None:
    vol = read_volume(_save(tmp_path / "img.nii.gz", _random_int16((3, 3, 3))))
    assert isinstance(vol, Volume)
    with pytest.raises(AttributeError):
        vol.path = tmp_path  # type: ignore[misc]


# --- gzip read once ------------------------------------------------------------------------


def _members(path: Path, data: bytes, cuts: list[int], padding: bytes = b"") -> Path:
    """`data` gzipped as several members (gzip allows it), zero padding after each."""
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    path.write_bytes(b"".join(gzip.compress(piece) + padding for piece in pieces))
    return path


@pytest.mark.parametrize("chunk", [7, 1 << 22])  # 7: members, padding and the kept size across steps
def test_gzip_members_padding_and_trailing_bytes_read_as_gzip_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    import ldseg.io.nifti as nifti

    monkeypatch.setattr(nifti, "_INFLATE_CHUNK", chunk)
    data = _random_int16((9, 7, 5))
    labels = np.random.default_rng(2).integers(0, 4, size=(9, 7, 5)).astype(np.uint8)
    for stem, array in [("img", data), ("lab", labels)]:
        plain = _save(tmp_path / f"{stem}.nii", array).read_bytes()
        trailing = plain + bytes(range(200))  # bytes after the voxels: inflated and checked, not kept
        for name, raw, cuts in [("one", plain, []), ("three", trailing, [100, 352, 700])]:
            path = _members(tmp_path / f"{stem}-{name}.nii.gz", raw, cuts, padding=b"\0" * 11)
            assert gzip.decompress(path.read_bytes()) == raw  # what gzip itself accepts
            needed = len(plain)  # header and voxels: all nibabel reads
            assert nifti._inflate(path, needed) == (raw[:needed], len(raw))  # memory: no more than needed
            if stem == "img":
                np.testing.assert_array_equal(read_volume(path).array, data.astype(np.float32))
            else:
                np.testing.assert_array_equal(read_label_volume(path).array, labels)


@pytest.mark.parametrize("damage", ["crc", "truncated member", "garbage after padding"])
def test_damage_in_any_gzip_member_is_refused(tmp_path: Path, damage: str) -> None:
    raw = _save(tmp_path / "img.nii", _random_int16((30, 20, 10))).read_bytes()
    first, second = gzip.compress(raw[:6000]), gzip.compress(raw[6000:])  # the header readable in both
    if damage == "crc":  # the first member's CRC32 (its trailer's first 4 bytes)
        first = first[:-8] + bytes(b ^ 0xFF for b in first[-8:-4]) + first[-4:]
    elif damage == "truncated member":
        first = first[:-20]
    else:
        second = second + b"\0\0" + b"not gzip"
    path = tmp_path / "img.nii.gz"
    path.write_bytes(first + second)
    with pytest.raises(InputError, match="truncated or corrupt") as info:
        read_volume(path)
    _assert_one_line_naming(info, path)


def test_a_gzipped_volume_is_inflated_once(tmp_path: Path) -> None:
    """The voxels are read from the bytes the CRC check inflated, not from the file again."""
    import io

    import ldseg.io.nifti as nifti

    path = _save(tmp_path / "img.nii.gz", _random_int16((9, 7, 5)))
    img, _ = nifti._load_header(path, 10**6)
    assert isinstance(img.dataobj.file_like, io.BytesIO)
    plain = _save(tmp_path / "img.nii", _random_int16((9, 7, 5)))
    img, _ = nifti._load_header(plain, 10**6)
    assert img.dataobj.file_like == str(plain)  # a plain file is read (or mapped) where it lies
