"""Running a bundle never imports PyTorch (issue: the lightweight runtime), nor onnx on the CPU
(only a GPU backend's small volume and sample graphs need it), proven two ways:

- in this environment (torch installed), a fresh process that runs `ldseg-run --bundle`, the Python
  API on a bundle, or a checkpoint whose bundle is already cached, ends with no `torch` in sys.modules;
- in the runtime-only install (`pip install '.[cpu]'`, no torch at all: scripts/runtime_venv.sh makes
  it, scripts/test.sh points LDSEG_RUNTIME_PYTHON at it), `ldseg-run --bundle` writes labels identical to
  this environment's on the same bundle, for phantom NIfTI and a DICOM series -> DICOM SEG, and
  `ldseg-export inspect`, `build-engine --check` and a checkpoint without its cached bundle answer in
  one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from ldseg.data.phantoms import make_phantom, write_phantom_nifti
from tests.helpers import user_checkpoint
from tests.io.dicom_series import write_series

RUNTIME_PYTHON = os.environ.get("LDSEG_RUNTIME_PYTHON")
RUN = ("--steps", "3", "--threads", "1", "--backend", "onnxruntime")

# Runs a console script's main (or a snippet) in this process and reports whether torch got imported.
PROBE = """
import json, runpy, sys
sys.argv = {argv!r}
code = 0
try:
    {call}
except SystemExit as exc:
    code = exc.code or 0
print(json.dumps({{"torch": "torch" in sys.modules, "onnx": "onnx" in sys.modules, "code": code}}))
"""


@pytest.fixture(scope="module")
def bundle(shipped_demo_bundle: Path) -> Path:
    return shipped_demo_bundle


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("phantom")
    write_phantom_nifti(make_phantom(3), folder / "p3.nii.gz", folder / "p3_label.nii.gz", overwrite=False)
    return folder / "p3.nii.gz"


def probe(python: str, argv: list[str], call: str) -> dict[str, object]:
    code = PROBE.format(argv=argv, call=call)
    env = {**os.environ, "PYTHONUTF8": "1"}
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    result["stderr"] = done.stderr
    return result


def run_cli(python: str, module: str, *args: str) -> dict[str, object]:
    return probe(python, [module, *args], f"from ldseg.cli.{module} import main; main()")


def test_ldseg_run_on_a_bundle_imports_no_torch(bundle: Path, phantom: Path, tmp_path: Path) -> None:
    result = run_cli(sys.executable, "run", str(phantom), "--bundle", str(bundle), "-o", str(tmp_path), *RUN)
    assert result["code"] == 0, result["stderr"]
    assert result["torch"] is False, "ldseg-run --bundle imported torch"
    # nor onnx (0.6 s of a cold start here): ONNX Runtime's CPU provider builds no small graphs
    assert result["onnx"] is False, "ldseg-run --bundle imported onnx"
    assert (tmp_path / "p3_seg.nii.gz").is_file()


def test_the_python_api_on_a_bundle_imports_no_torch(bundle: Path, phantom: Path) -> None:
    call = (
        "import ldseg\n"
        f"    with ldseg.Segmenter(bundle={str(bundle)!r}, steps=3, samples=2, backend='onnxruntime') as seg:\n"
        f"        [r] = seg.segment({str(phantom)!r})\n"
        "        assert r.labels.max() > 0 and 'entropy' in r.maps"
    )
    result = probe(sys.executable, ["api"], call)
    assert result["torch"] is False and result["onnx"] is False, result


def test_a_checkpoint_whose_bundle_is_cached_runs_without_torch(phantom: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    env_cache = f"import os; os.environ['LDSEG_CACHE'] = {str(cache)!r}\n    "
    mine = user_checkpoint(tmp_path / "mine.safetensors")  # not the demo, whose bundle ships with ldseg
    argv = [str(phantom), "--checkpoint", str(mine), "-o", str(tmp_path / "out"), *RUN]
    first = probe(sys.executable, ["run", *argv], env_cache + "from ldseg.cli.run import main; main()")
    assert first["code"] == 0 and first["torch"] is True  # the first run exports the bundle: torch
    second = probe(sys.executable, ["run", *argv, "--overwrite"], env_cache + "from ldseg.cli.run import main; main()")
    assert second["code"] == 0, second["stderr"]
    assert second["torch"] is False, "a cache hit loaded the model (torch) anyway"


# --------------------------------------------------------------------------- the runtime-only install


@pytest.fixture(scope="module")
def runtime_python() -> str:
    if not RUNTIME_PYTHON:
        pytest.skip("LDSEG_RUNTIME_PYTHON is not set: scripts/test.sh makes the runtime-only venv and sets it")
    assert Path(RUNTIME_PYTHON).is_file(), f"LDSEG_RUNTIME_PYTHON={RUNTIME_PYTHON} does not exist"
    return RUNTIME_PYTHON


def test_the_runtime_only_install_has_no_torch(runtime_python: str) -> None:
    code = "import importlib.util as u; print(u.find_spec('torch') is None, u.find_spec('onnxscript') is None)"
    done = subprocess.run([runtime_python, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["True", "True"], "the runtime-only install can import torch or onnxscript"


def labels_of(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def test_runtime_only_install_writes_the_full_installs_labels(
    runtime_python: str, bundle: Path, phantom: Path, tmp_path: Path
) -> None:
    args = [str(phantom), "--bundle", str(bundle), *RUN, "--samples", "2"]
    full = run_cli(sys.executable, "run", *args, "-o", str(tmp_path / "full"))
    slim = run_cli(runtime_python, "run", *args, "-o", str(tmp_path / "slim"))
    assert full["code"] == slim["code"] == 0, slim["stderr"]
    for name in ("p3_seg.nii.gz", "p3_entropy.nii.gz"):
        a, b = labels_of(tmp_path / "full" / name), labels_of(tmp_path / "slim" / name)
        np.testing.assert_array_equal(a, b, err_msg=f"{name} differs between the full and runtime-only installs")
    assert len(np.unique(labels_of(tmp_path / "slim" / "p3_seg.nii.gz"))) >= 2


def test_runtime_only_install_writes_the_same_dicom_seg(runtime_python: str, bundle: Path, tmp_path: Path) -> None:
    volume = (make_phantom(5).image[::2] * 1000).astype(np.int16)  # (16, 64, 64) slices, rows, columns
    series = tmp_path / "series"
    write_series(series, volume)
    args = [str(series), "--bundle", str(bundle), *RUN, "--output-type", "dicom-seg"]
    for name, python in (("full", sys.executable), ("slim", runtime_python)):
        result = run_cli(python, "run", *args, "-o", str(tmp_path / name))
        assert result["code"] == 0, result["stderr"]
    segs = {name: pydicom.dcmread(next((tmp_path / name).glob("*.dcm"))) for name in ("full", "slim")}
    np.testing.assert_array_equal(segs["full"].pixel_array, segs["slim"].pixel_array)
    assert segs["slim"].pixel_array.any(), "the SEG holds no segment voxels"


def test_runtime_only_install_inspects_and_checks(runtime_python: str, bundle: Path, tmp_path: Path) -> None:
    inspect = run_cli(runtime_python, "export", "inspect", str(bundle))
    assert inspect["code"] == 0 and inspect["torch"] is False, inspect["stderr"]
    check = run_cli(runtime_python, "export", "build-engine", "--check", str(tmp_path))
    assert check["code"] != 0 and len(str(check["stderr"]).strip().splitlines()) == 1, check["stderr"]


def test_runtime_only_install_runs_the_demo_from_its_shipped_bundle(runtime_python: str, tmp_path: Path) -> None:
    env_cache = f"import os; os.environ['LDSEG_CACHE'] = {str(tmp_path / 'empty-cache')!r}\n    "
    argv = ["run", "--demo", "-o", str(tmp_path / "out"), *RUN]
    result = probe(runtime_python, argv, env_cache + "from ldseg.cli.run import main; main()")
    assert result["code"] == 0 and result["torch"] is False, result["stderr"]
    assert "shipped: fp32 ONNX bundle of demo" in str(result["stderr"])
    assert not (tmp_path / "empty-cache" / "bundles").exists() or not any(
        (tmp_path / "empty-cache" / "bundles").iterdir()
    )


def test_runtime_only_install_names_the_export_extra(runtime_python: str, phantom: Path, tmp_path: Path) -> None:
    env_cache = f"import os; os.environ['LDSEG_CACHE'] = {str(tmp_path / 'empty-cache')!r}\n    "
    mine = user_checkpoint(tmp_path / "mine.safetensors")  # the demo would take its shipped bundle
    argv = ["run", str(phantom), "--checkpoint", str(mine), "-o", str(tmp_path / "out"), *RUN]
    result = probe(runtime_python, argv, env_cache + "from ldseg.cli.run import main; main()")
    stderr = str(result["stderr"]).strip()
    assert result["code"] == 6 and "pip install 'ldseg[export]'" in stderr, stderr
    assert len(stderr.splitlines()) == 1, stderr
