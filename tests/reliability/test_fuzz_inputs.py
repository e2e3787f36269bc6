"""Property-based fuzzing of everything that reads an input file.

The contract under test (README, "Errors and exit codes"): `prepare(path, cfg)` either returns
a model-grid image (right shape, float32, finite, in [0, 1]) whose geometry can be written back,
or raises InputError whose single-line message starts with the file's path. Never any other
exception: in a folder run any other exception would abort thousands of files.

Generated cases are tiny (a few hundred voxels) so the >= 1,000 NIfTI cases plus the 2D cases run
in well under two minutes on two cores. derandomize=True makes every CI run see the same cases;
raise FUZZ_SCALE locally (e.g. FUZZ_SCALE=20) for a longer hunt.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import struct
import subprocess
import sys
import tempfile
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context, event
from PIL import Image

from ldseg.errors import InputError
from ldseg.io.preprocess import image2d_to_model_grid, image_to_model_grid
from ldseg.model.config import PRESETS, ModelConfig
from ldseg.runs.volumes import Prepared, prepare, write_map

CFG3 = PRESETS["demo"]
CFG2 = PRESETS["glas2d"]
_SCALE = max(1, int(os.environ.get("FUZZ_SCALE", "1")))

# Examples per fuzz test (1,150 NIfTI + 300 2D). Each test counts the examples whose body ran to
# the end and fails if fewer than its quota did; the module then checks that >= 1,000 NIfTI cases ran.
NIFTI_EXAMPLES = {"arrays": 400, "datatypes": 100, "header_fields": 350, "bytes": 300}
IMAGE2D_EXAMPLES = 300
MIN_NIFTI_CASES = 1000
RAN: dict[str, int] = {}  # test name -> examples run to the end in this session


def _fuzz(examples: int) -> Callable[[Callable[..., None]], Callable[[], None]]:
    """Settings for a @given test, plus the count of examples it actually ran, asserted >= `examples`
    (x FUZZ_SCALE): hypothesis stops early when a strategy runs out of distinct cases, and an
    overrun or filtered example never reaches the body, so max_examples alone proves nothing."""
    quota = examples * _SCALE

    def decorate(test: Callable[..., None]) -> Callable[[], None]:
        configured = settings(
            max_examples=quota,
            deadline=None,
            derandomize=True,
            database=None,
            print_blob=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )(test)
        body = configured.hypothesis.inner_test  # type: ignore[attr-defined]
        ran = 0

        def counted(*args: object, **kwargs: object) -> None:
            nonlocal ran
            body(*args, **kwargs)
            ran += 1

        # hypothesis documents inner_test as the hook for wrapping each example's call
        configured.hypothesis.inner_test = counted  # type: ignore[attr-defined]

        def run() -> None:
            nonlocal ran
            ran = 0
            configured()
            RAN[test.__name__] = ran
            assert ran >= quota, f"{test.__name__}: only {ran} of {quota} examples ran"

        run.__name__ = run.__qualname__ = test.__name__
        run.__doc__ = test.__doc__
        return run

    return decorate


@pytest.fixture(scope="module", autouse=True)
def _nifti_cases_add_up() -> Iterator[None]:
    yield
    nifti = {name: n for name, n in RAN.items() if name.startswith("test_fuzz_nifti_")}
    if len(nifti) == len(NIFTI_EXAMPLES):  # all four ran in this session (not a -k selection)
        assert sum(nifti.values()) >= MIN_NIFTI_CASES, f"only {sum(nifti.values())} NIfTI cases ran: {nifti}"


# --------------------------------------------------------------------------- the property


def _event(text: str) -> None:
    if currently_in_test_context():  # _check also serves the plain (non-hypothesis) tests
        event(text)


def _check(path: Path, cfg: ModelConfig, workdir: Path) -> Prepared | InputError:
    """prepare() -> a valid Prepared (also written back) or a well-formed InputError."""
    with warnings.catch_warnings():
        # nibabel/numpy warn about odd headers and casts; the outcome is what is specified here.
        warnings.simplefilter("ignore")
        try:
            prepared = prepare(path, cfg)
        except InputError as exc:
            message = str(exc)
            assert message.startswith(f"{path}: "), message
            assert "\n" not in message and len(message) < 1000, message
            assert exc.exit_code == 3
            # --hypothesis-show-statistics lists how often each kind of refusal came up
            _event("refused: " + " ".join(message[len(str(path)) + 2 :].split("(")[0].split()[:4]))
            return exc
        # any other exception propagates: that is the failure this file hunts for
    _event("accepted")
    image = prepared.image
    assert image.shape == cfg.image_shape and image.dtype == np.float32
    assert np.isfinite(image).all()
    assert image.min() >= 0.0 and image.max() <= 1.0
    # An accepted input must also be writable back on its own grid: a header that reads but
    # cannot be saved would fail a run after the (expensive) inference.
    shape = prepared.input_shape
    labels = np.zeros(shape, np.uint8)
    labels.flat[0] = 1
    target = workdir / ("out_seg.nii.gz" if cfg.spatial_dims == 3 else "out_seg.png")
    write_map(target, prepared, labels, overwrite=False, dtype=np.uint8)
    if cfg.spatial_dims == 3:
        back = nib.load(target)
        assert back.shape == shape
        np.testing.assert_array_equal(np.asarray(back.dataobj), labels)
        np.testing.assert_allclose(back.affine, prepared.reference.affine, rtol=1e-6, atol=1e-6)
    else:
        with Image.open(target) as back:
            assert back.size == (shape[1], shape[0])
    target.unlink()
    return prepared


def _run(blob: bytes, name: str, cfg: ModelConfig = CFG3) -> tuple[Path, Prepared | InputError]:
    """Write `blob` under `name` in a fresh folder and check it (the folder is then removed)."""
    with tempfile.TemporaryDirectory(prefix="ldseg-fuzz-") as tmp:
        path = Path(tmp) / name
        path.write_bytes(blob)
        return path, _check(path, cfg, Path(tmp))


# --------------------------------------------------------------------------- NIfTI building

DTYPES = (np.int8, np.int16, np.uint8, np.float32, np.float64)
_HDR_SIZE = {1: 348, 2: 540}


def _header(version: int, dtype: np.dtype | type, shape: tuple[int, ...]) -> nib.Nifti1Header:
    hdr = nib.Nifti1Header() if version == 1 else nib.Nifti2Header()
    hdr.set_data_dtype(dtype)
    hdr.set_data_shape(shape)
    return hdr


def _assemble(
    hdr: nib.Nifti1Header,
    version: int,
    payload: bytes,
    extension: bytes = b"\0\0\0\0",
    mutate: Callable[[nib.Nifti1Header], None] | None = None,
) -> bytes:
    """Header + extension block + payload at the 16-byte aligned offset (vox_offset points there
    unless `mutate` changes it, which may also break any other field)."""
    offset = -(-(_HDR_SIZE[version] + len(extension)) // 16) * 16
    hdr["vox_offset"] = offset
    if mutate is not None:
        mutate(hdr)
    head = hdr.binaryblock + extension
    return head + b"\0" * (offset - len(head)) + payload


def _maybe_gzip(blob: bytes, gz: bool) -> bytes:
    return gzip.compress(blob, compresslevel=1, mtime=0) if gz else blob


def _affine(kind: str, rng: np.random.Generator) -> np.ndarray:
    a = np.eye(4)
    scales = rng.uniform(0.2, 4.0, 3)
    if kind == "scaled":
        a[:3, :3] = np.diag(scales)
    elif kind == "flipped":  # permuted axes with sign flips (e.g. LPS vs RAS)
        a[:3, :3] = np.eye(3)[rng.permutation(3)] * rng.choice([-1.0, 1.0], 3) * scales
    elif kind == "oblique":
        q, r = np.linalg.qr(rng.normal(size=(3, 3)))
        a[:3, :3] = (q * np.sign(np.diag(r))) @ np.diag(scales)
    elif kind == "sheared":  # legal NIfTI (sform), non-orthogonal but invertible
        a[:3, :3] = np.diag(scales) + np.triu(rng.uniform(-2.0, 2.0, (3, 3)), 1)
    elif kind == "tiny":  # micrometre voxels in metres: tiny but not singular
        a[:3, :3] = np.diag(scales * 1e-20)
    elif kind == "singular-zero":
        a[:3, :3] = np.diag(scales)
        a[:3, rng.integers(3)] = 0.0
    elif kind == "singular-dependent":  # one axis exactly twice another (exact in float32 too)
        a[:3, :3] = rng.uniform(-2.0, 2.0, (3, 3)).astype(np.float32)  # exact in NIfTI-1 and 2
        i, j = rng.choice(3, 2, replace=False)
        a[:3, i] = 2.0 * a[:3, j]
    elif kind in ("nan", "inf", "-inf"):
        a[:3, :3] = np.diag(scales)
        a[rng.integers(3), rng.integers(4)] = float(kind)
    a[:3, 3] = np.where(np.isfinite(a[:3, 3]), rng.uniform(-100.0, 100.0, 3), a[:3, 3])
    return a


def _affine_ok(affine: np.ndarray, version: int) -> tuple[bool, str]:
    # srow_* are float32 in NIfTI-1, float64 in NIfTI-2
    stored = affine.astype(np.float32).astype(np.float64) if version == 1 else affine
    if not np.isfinite(stored).all():
        return False, "non-finite"
    if np.linalg.matrix_rank(stored[:3, :3]) < 3:
        return False, "singular affine"
    return True, ""


_EXTREMES = ((-3e38, 3e38), (-2e38, 2e38), (0.0, 1e-44), (1e30, 1e30 * (1 + 1e-9)), (-1e20, 1e20))


def _content(kind: str, dtype: type, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    n = math.prod(shape)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        arr = np.asarray(rng.integers(info.min, info.max, size=shape, endpoint=True)).astype(dtype)
    else:
        arr = np.asarray(rng.normal(0.0, 100.0, shape) * 10.0 ** rng.integers(-3, 4)).astype(dtype)
    if n == 0:
        return arr
    floating = np.issubdtype(dtype, np.floating)
    if kind == "constant":
        arr[...] = arr.flat[0]
    elif kind == "two-values":
        arr = np.where(rng.random(shape) < 0.5, arr.flat[0], arr.flat[n - 1]).astype(dtype)
    elif kind in ("nan", "inf", "-inf") and floating:
        arr.flat[rng.integers(n, size=rng.integers(1, 3))] = float(kind)
    elif kind == "extreme" and floating:
        lo, hi = _EXTREMES[rng.integers(len(_EXTREMES))]
        with np.errstate(over="ignore"):
            arr = np.where(rng.random(shape) < 0.5, lo, hi).astype(dtype)
        arr.flat[0], arr.flat[n - 1] = dtype(lo), dtype(hi)  # both ends present
    return arr


def _expected_error(shape: tuple[int, ...], affine: np.ndarray, arr: np.ndarray, version: int) -> str | None:
    """The InputError reason the readers must give, in the order they check; None = accept."""
    if len(shape) < 3:
        return "D image of shape"  # nibabel reads a 0D header (dim[0] = 0) as 1D
    if math.prod(shape[3:]) != 1:
        return "frames"
    if 0 in shape[:3]:
        return "empty volume"
    ok, reason = _affine_ok(affine, version)
    if not ok:
        return reason
    with np.errstate(over="ignore", invalid="ignore"):
        f32 = arr.astype(np.float32)
        lo, hi = f32.min(), f32.max()
        if not (np.isfinite(lo) and np.isfinite(hi)):
            return "NaN or infinite"
        if lo == hi:
            return "constant image"
        if not np.isfinite(hi - lo):  # float32 min-max standardization would overflow
            return "too wide"
    return None


# --------------------------------------------------------------------------- 1. arrays/affines

_VALID_AFFINES = ("identity", "scaled", "flipped", "oblique", "sheared", "tiny")
_BAD_AFFINES = ("singular-zero", "singular-dependent", "nan", "inf", "-inf")
_VALID_CONTENTS = ("random", "two-values")
_BAD_CONTENTS = ("constant", "nan", "inf", "-inf", "extreme")
_FLOAT_ONLY = {"nan", "inf", "-inf", "extreme"}


@st.composite
def volume_cases(draw: st.DrawFn) -> dict:
    """Mostly one defect at a time (shape, values or affine), so each one is hit often."""
    defect = draw(st.sampled_from(("none", "shape", "values", "affine", "several")))
    several = defect == "several"
    if defect == "shape" or (several and draw(st.booleans())):
        ndim = draw(st.integers(0, 5))
        shape = tuple(draw(st.integers(0, 6) if axis < 3 else st.sampled_from((0, 1, 2, 3))) for axis in range(ndim))
    else:  # 3D, or 4D/5D with a single frame
        ndim = draw(st.sampled_from((3, 3, 4, 5)))
        shape = tuple(draw(st.integers(1, 6) if axis < 3 else st.just(1)) for axis in range(ndim))
    bad_values = defect == "values" or (several and draw(st.booleans()))
    content = draw(st.sampled_from(_BAD_CONTENTS if bad_values else _VALID_CONTENTS))
    floats = (np.float32, np.float64)
    dtype = draw(st.sampled_from(floats if content in _FLOAT_ONLY else DTYPES))
    bad_affine = defect == "affine" or (several and draw(st.booleans()))
    return {
        "shape": shape,
        "dtype": dtype,
        "content": content,
        "affine": draw(st.sampled_from(_BAD_AFFINES if bad_affine else _VALID_AFFINES)),
        "seed": draw(st.integers(0, 2**32 - 1)),
        "version": draw(st.sampled_from((1, 1, 2))),
        "gz": draw(st.booleans()),
        "sform_code": draw(st.integers(1, 4)),
        "qform_code": draw(st.integers(0, 4)),
    }


@_fuzz(NIFTI_EXAMPLES["arrays"])
@given(case=volume_cases())
def test_fuzz_nifti_arrays_and_affines(case: dict) -> None:
    rng = np.random.default_rng(case["seed"])
    shape, dtype = case["shape"], case["dtype"]
    arr = _content(case["content"], dtype, shape, rng)
    affine = _affine(case["affine"], rng)
    hdr = _header(case["version"], dtype, shape)
    hdr.set_sform(affine, code=case["sform_code"])  # sform wins whenever sform_code > 0
    hdr["qform_code"] = case["qform_code"]  # identity quaternion, unit pixdim
    blob = _assemble(hdr, case["version"], arr.tobytes(order="F"))
    name = "vol.nii.gz" if case["gz"] else "vol.nii"
    path, result = _run(_maybe_gzip(blob, case["gz"]), name)

    expected = _expected_error(shape, affine, arr, case["version"])
    if expected is None:
        assert isinstance(result, Prepared), f"valid input refused: {result}"
        truth = image_to_model_grid(arr.reshape(shape[:3]).astype(np.float32), CFG3.image_size)
        np.testing.assert_allclose(result.image[0], truth, rtol=0, atol=1e-6)
        np.testing.assert_allclose(result.reference.affine, affine, rtol=1e-6, atol=1e-5)
    else:
        assert isinstance(result, InputError), f"expected InputError ({expected}), got a result"
        assert expected in str(result), str(result)


# Every NIfTI-1 data type code (nibabel's table) plus nonsense; the payload always fits the code.
_CODES = sorted({code for code in nib.nifti1.data_type_codes.code.keys() if isinstance(code, int)})


@_fuzz(NIFTI_EXAMPLES["datatypes"])
@given(
    code=st.sampled_from(_CODES),
    shape=st.tuples(st.integers(1, 5), st.integers(1, 5), st.integers(1, 5)),
    seed=st.integers(0, 2**32 - 1),
    gz=st.booleans(),
)
def test_fuzz_nifti_datatypes(code: int, shape: tuple[int, int, int], seed: int, gz: bool) -> None:
    dtype = nib.nifti1.data_type_codes.dtype[code]
    hdr = nib.Nifti1Header()
    try:
        hdr.set_data_dtype(code)
    except Exception:  # codes nibabel can name but not store (e.g. 'none'): write it raw
        hdr["datatype"] = code
    hdr.set_data_shape(shape)
    hdr.set_sform(np.diag([1.5, 1.0, 2.0, 1.0]), code=1)
    payload = np.random.default_rng(seed).bytes(max(1, dtype.itemsize) * math.prod(shape))
    result = _run(_maybe_gzip(_assemble(hdr, 1, payload), gz), "vol.nii.gz" if gz else "vol.nii")[1]
    if dtype.itemsize == 0:  # codes nibabel cannot read (binary, float128, complex256, ...)
        assert isinstance(result, InputError), result
    elif dtype.kind not in "biuf":  # complex, RGB(A): not a scalar intensity
        assert isinstance(result, InputError) and "data type" in str(result), result


# --------------------------------------------------------------------------- 2. header fields

_F = st.sampled_from(
    (0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 1e-30, 1e30, 3e38, -3e38, 1e-45, math.nan, math.inf, -math.inf)
) | st.floats(width=32)
_SMALL_INT = st.sampled_from((-32768, -1, 0, 1, 2, 3, 4, 5, 7, 8, 100, 32767)) | st.integers(-32768, 32767)
_DIM = st.lists(st.sampled_from((-1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 100, 32767)), min_size=8, max_size=8)
_DATATYPES = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2304, 12345, -1)
_FIELDS: dict[str, st.SearchStrategy] = {
    "scl_slope": _F,
    "scl_inter": _F,
    "dim": _DIM,
    "pixdim": st.lists(_F, min_size=8, max_size=8),
    "qform_code": st.integers(-2, 6) | st.just(99),
    "sform_code": st.integers(-2, 6) | st.just(99),
    "quatern_b": _F | st.floats(-2, 2),
    "quatern_c": _F | st.floats(-2, 2),
    "quatern_d": _F | st.floats(-2, 2),
    "qoffset_x": _F,
    "srow_x": st.lists(_F, min_size=4, max_size=4),
    "srow_y": st.lists(_F, min_size=4, max_size=4),
    "datatype": st.sampled_from(_DATATYPES),
    "bitpix": _SMALL_INT,
    "vox_offset": st.sampled_from((0.0, 100.0, 348.0, 351.0, 352.0, 353.0, 368.0, 1e6, 3e38, math.nan, math.inf, -5.0)),
    "sizeof_hdr": st.sampled_from((0, 1, 348, 540, 2**31 - 1, -1)),
    "magic": st.sampled_from((b"n+1", b"ni1", b"n+2", b"\0\0\0", b"abc")),
    "cal_min": _F,
    "cal_max": _F,
    "intent_code": _SMALL_INT,
    "xyzt_units": st.integers(0, 255),
    "dim_info": st.integers(0, 255),
    "slice_code": st.integers(0, 255),
    "slice_start": _SMALL_INT,
    "slice_end": _SMALL_INT,
}


@st.composite
def extensions(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        return b"\0\0\0\0"
    esize = draw(st.sampled_from((-16, 0, 3, 8, 16, 32, 2**31 - 8)) | st.integers(-(2**31), 2**31 - 1))
    ecode = draw(st.sampled_from((0, 2, 4, 6, 40)) | st.integers(-(2**31), 2**31 - 1))
    body = draw(st.binary(max_size=40))
    flag = draw(st.sampled_from((b"\1\0\0\0", b"\1\1\1\1", b"\0\1\0\0")))
    return flag + struct.pack("<ii", esize, ecode) + body


@st.composite
def header_cases(draw: st.DrawFn) -> dict:
    names = draw(st.lists(st.sampled_from(sorted(_FIELDS)), min_size=1, max_size=4, unique=True))
    return {
        "fields": {name: draw(_FIELDS[name]) for name in names},
        "extension": draw(extensions()),
        "shape": tuple(draw(st.integers(2, 5)) for _ in range(3)),
        "dtype": draw(st.sampled_from(DTYPES)),
        "seed": draw(st.integers(0, 2**32 - 1)),
        "version": draw(st.sampled_from((1, 1, 1, 2))),
        "gz": draw(st.booleans()),
    }


def _set_field(hdr: nib.Nifti1Header, name: str, value: object) -> None:
    current = hdr[name]
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            hdr[name] = value
        except (OverflowError, ValueError, TypeError):
            # out of range for this header version's field type: store the wrapped-around bits
            hdr[name] = np.asarray(value).astype(np.asarray(current).dtype)


@_fuzz(NIFTI_EXAMPLES["header_fields"])
@given(case=header_cases())
def test_fuzz_nifti_header_fields(case: dict) -> None:
    rng = np.random.default_rng(case["seed"])
    arr = _content("random", case["dtype"], case["shape"], rng)
    hdr = _header(case["version"], case["dtype"], case["shape"])
    affine = _affine("oblique", rng)
    hdr.set_qform(affine, code=1)
    hdr.set_sform(affine, code=1)

    def mutate(h: nib.Nifti1Header) -> None:
        for name, value in case["fields"].items():
            _set_field(h, name, value)

    blob = _assemble(hdr, case["version"], arr.tobytes(order="F"), case["extension"], mutate)
    _run(_maybe_gzip(blob, case["gz"]), "hdr.nii.gz" if case["gz"] else "hdr.nii")


# --------------------------------------------------------------------------- 3. bytes

_OPS = ("truncate", "flip", "overwrite", "insert", "append", "trailer", "zero-run")


@st.composite
def corruptions(draw: st.DrawFn) -> list[tuple]:
    ops = []
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(_OPS))
        pos = draw(st.integers(0, 2**20))  # taken modulo the length
        ops.append((op, pos, draw(st.binary(min_size=1, max_size=16)), draw(st.integers(1, 255))))
    return ops


def _corrupt(blob: bytes, ops: list[tuple]) -> bytes:
    data = bytearray(blob)
    for op, pos, chunk, xor in ops:
        at = pos % (len(data) + 1)
        if op == "truncate":
            del data[at:]
        elif op == "flip" and data:
            data[at % len(data)] ^= xor
        elif op == "overwrite":
            data[at : at + len(chunk)] = chunk
        elif op == "insert":
            data[at:at] = chunk
        elif op == "append":
            data += chunk
        elif op == "trailer" and data:  # gzip CRC32/ISIZE live in the last 8 bytes
            data[-1 - (pos % min(8, len(data)))] ^= xor
        elif op == "zero-run":
            data[at : at + 8 * len(chunk)] = b"\0" * len(data[at : at + 8 * len(chunk)])
    return bytes(data)


@_fuzz(NIFTI_EXAMPLES["bytes"])
@given(
    shape=st.tuples(st.integers(2, 6), st.integers(2, 6), st.integers(1, 6)),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**32 - 1),
    version=st.sampled_from((1, 1, 2)),
    gz=st.booleans(),
    ops=corruptions(),
)
def test_fuzz_nifti_bytes(shape, dtype, seed, version, gz, ops) -> None:
    rng = np.random.default_rng(seed)
    arr = _content("random", dtype, shape, rng)
    arr.flat[0], arr.flat[-1] = 0, 1  # never constant: an accepted file must equal the original
    hdr = _header(version, dtype, shape)
    hdr.set_sform(_affine("flipped", rng), code=2)
    original = _maybe_gzip(_assemble(hdr, version, arr.tobytes(order="F")), gz)
    name = "vol.nii.gz" if gz else "vol.nii"
    _, result = _run(_corrupt(original, ops), name)
    if gz and isinstance(result, Prepared):
        # The gzip CRC is verified, so damage that still reads must leave the data untouched.
        truth = image_to_model_grid(arr.astype(np.float32), CFG3.image_size)
        np.testing.assert_allclose(result.image[0], truth, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- 4. 2D images

# (mode to create, format): every pair Pillow can write; what it reads back decides the oracle.
_PAIRS = (
    ("RGB", "PNG"),
    ("L", "PNG"),
    ("1", "PNG"),
    ("RGBA", "PNG"),
    ("LA", "PNG"),
    ("P", "PNG"),
    ("I;16", "PNG"),
    ("RGB", "BMP"),
    ("L", "BMP"),
    ("1", "BMP"),
    ("P", "BMP"),
    ("RGBA", "BMP"),
    ("RGB", "TIFF"),
    ("CMYK", "TIFF"),
    ("F", "TIFF"),
    ("I", "TIFF"),
    ("I;16", "TIFF"),
    ("YCbCr", "TIFF"),
    ("LAB", "TIFF"),
    ("RGB", "JPEG"),
    ("L", "JPEG"),
    ("CMYK", "JPEG"),
    ("RGB", "GIF"),
    ("RGB", "PPM"),
    ("F", "PPM"),
)
_SUFFIX = {"PNG": ".png", "BMP": ".bmp", "TIFF": ".tif", "JPEG": ".jpg", "GIF": ".png", "PPM": ".png"}
_OK_MODES = {"RGB", "L", "1"}


def _image_bytes(mode: str, fmt: str, size: tuple[int, int], constant: bool, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    h, w = size
    base = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    if constant:
        base = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(0, 256, 3)))
    if mode in ("I", "I;16", "F"):
        im = Image.fromarray(
            rng.integers(0, 65535, (h, w)).astype({"I": np.int32, "I;16": np.uint16, "F": np.float32}[mode])
            if not constant
            else np.full((h, w), 7, {"I": np.int32, "I;16": np.uint16, "F": np.float32}[mode])
        )
    elif mode == "P":
        im = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    else:
        im = base.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


@_fuzz(IMAGE2D_EXAMPLES)
@given(
    pair=st.sampled_from(_PAIRS),
    size=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    constant=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
    damage=st.none() | corruptions(),
)
def test_fuzz_image2d(pair, size, constant, seed, damage) -> None:
    mode, fmt = pair
    blob = _image_bytes(mode, fmt, size, constant, seed)
    if damage:
        blob = _corrupt(blob, damage)
    with tempfile.TemporaryDirectory(prefix="ldseg-fuzz-") as tmp:
        path = Path(tmp) / f"img{_SUFFIX[fmt]}"
        path.write_bytes(blob)
        result = _check(path, CFG2, Path(tmp))
        if damage is not None:
            return
        with Image.open(path) as im:  # the oracle: what Pillow reads back from the clean file
            stored = im.mode
            rgb = np.asarray(im.convert("RGB"), dtype=np.float32)
    if stored not in _OK_MODES:
        assert isinstance(result, InputError) and "mode" in str(result), (stored, result)
    elif rgb.min() == rgb.max():
        assert isinstance(result, InputError) and "constant" in str(result), (stored, result)
    else:
        assert isinstance(result, Prepared), f"valid {stored} {fmt} refused: {result}"
        np.testing.assert_allclose(result.image, image2d_to_model_grid(rgb, CFG2.image_size), atol=1e-6)


def _png(width: int, height: int, bit_depth: int = 8, color_type: int = 2, idat: bytes = b"") -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("name", "blob"),
    [
        ("zero-width.png", _png(0, 5, idat=zlib.compress(b""))),
        ("zero-height.png", _png(5, 0, idat=zlib.compress(b""))),
        ("bomb.png", _png(60000, 60000, idat=zlib.compress(b"\0" * 100))),  # > 2x Pillow's limit
        ("lying.png", _png(3000, 3000, idat=zlib.compress(b"\0" * 100))),  # header says 9 Mpx
        ("bad-depth.png", _png(4, 4, bit_depth=7)),
        ("empty.png", b""),
        ("nifti.png", gzip.compress(b"\0" * 400)),
    ],
)
def test_crafted_2d_headers(name: str, blob: bytes, tmp_path: Path) -> None:
    path = tmp_path / name
    path.write_bytes(blob)
    assert isinstance(_check(path, CFG2, tmp_path), InputError)


# --------------------------------------------------------------------------- 5. odd paths


def test_odd_paths_are_input_errors(tmp_path: Path) -> None:
    folder = tmp_path / "folder.nii.gz"
    folder.mkdir()
    loop = tmp_path / "loop.nii"
    loop.symlink_to(loop)
    dangling = tmp_path / "dangling.nii.gz"
    dangling.symlink_to(tmp_path / "nowhere.nii.gz")
    empty = tmp_path / "empty.nii"
    empty.write_bytes(b"")
    wrong_suffix = tmp_path / "vol.img"
    wrong_suffix.write_bytes(b"\0" * 400)
    for path in (folder, loop, dangling, empty, wrong_suffix, tmp_path / "missing.nii"):
        assert isinstance(_check(path, CFG3, tmp_path), InputError), path
    assert isinstance(_check(tmp_path / "missing.png", CFG2, tmp_path), InputError)


# --------------------------------------------------------------------------- 6. memory guard

_MEASURE = r"""
import sys, numpy as np, nibabel as nib
from pathlib import Path
from ldseg.errors import InputError
from ldseg.model.config import PRESETS
from ldseg.runs.volumes import prepare

def hwm_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

before = hwm_mb()
try:
    prepare(Path(sys.argv[1]), PRESETS["demo"])
    outcome = "accepted"
except InputError as exc:
    outcome = "InputError " + str(exc)
print(outcome)
print(hwm_mb() - before)
"""


def _lying(
    version: int, shape: tuple[int, ...], dtype: type, extension: bytes = b"\0\0\0\0", vox_offset: float | None = None
) -> bytes:
    hdr = _header(version, dtype, shape)
    hdr.set_sform(np.eye(4), code=1)

    def mutate(h: nib.Nifti1Header) -> None:
        if vox_offset is not None:
            h["vox_offset"] = vox_offset

    return _assemble(hdr, version, b"\1\2" * 512, extension, mutate)  # 1 KiB of "data"


@pytest.mark.parametrize("gz", [False, True], ids=["nii", "nii.gz"])
@pytest.mark.parametrize(
    "case",
    ["dims-under-the-limit", "dims-over-the-limit", "huge-vox-offset", "huge-extension"],
)
def test_lying_header_costs_no_memory(case: str, gz: bool, tmp_path: Path) -> None:
    """A tiny file whose header promises ~1 GB (or sits data 2 GB away) is refused without
    allocating what the header promises: peak RSS grows by less than 64 MB."""
    blob = {
        "dims-under-the-limit": lambda: _lying(1, (500, 500, 500), np.float64),  # 1 GB, < 512**3
        "dims-over-the-limit": lambda: _lying(2, (2**20, 2**20, 2**20), np.float64),
        "huge-vox-offset": lambda: _lying(1, (8, 8, 8), np.int16, vox_offset=2.0**31),
        "huge-extension": lambda: _lying(
            1, (8, 8, 8), np.int16, b"\1\0\0\0" + struct.pack("<ii", 2**31 - 8, 4), vox_offset=2.0**31
        ),
    }[case]()
    path = tmp_path / ("lying.nii.gz" if gz else "lying.nii")
    path.write_bytes(_maybe_gzip(blob, gz))
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parents[2],
    )
    assert result.returncode == 0, result.stderr
    outcome, grown = result.stdout.strip().splitlines()[-2:]
    assert outcome.startswith(f"InputError {path}: "), outcome
    assert float(grown) < 64, f"peak RSS grew by {float(grown):.0f} MB reading a {len(blob)} byte file"
