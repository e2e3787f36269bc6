"""report.html (ldseg/qc/report.py): outlier flags, ranking, escaping, and a real browser render."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from ldseg.qc.metrics import ClassQC, VolumeQC
from ldseg.qc.report import cohort_flags, ranked, render_report, write_report

GREEN = (0, 255, 0)  # nothing on the page but the test's preview is pure green


def record(name: str, entropy: float | None, voxels=(1000, 2000), components=(1, 1), preview=None) -> VolumeQC:
    classes = {str(c): ClassQC(f"class {c}", n, float(n), k) for c, n, k in zip((1, 2), voxels, components)}
    return VolumeQC(name, f"in/{name}.nii.gz", [10, 10, 10], 8, classes, entropy, 0.01, preview=preview)


def cohort() -> list[VolumeQC]:
    return [
        record("a", 0.010),
        record("b", 0.011),
        record("c", 0.012, components=(3, 1)),
        record("d", 0.009, voxels=(3000, 2000)),
        record("e", 0.050),
        record("f", 0.010, voxels=(0, 2000)),
    ]


def test_flags_name_each_outlier_and_nothing_else():
    flags = cohort_flags(cohort())
    assert flags["a"] == flags["b"] == []
    assert flags["c"] == ["class 1: 3 components"]
    assert flags["d"] == ["class 1: volume 3.00x the cohort median"]
    assert len(flags["e"]) == 1 and flags["e"][0].startswith("high entropy")
    assert flags["f"] == ["class 1: missing"]


def test_cohort_rules_need_three_volumes():
    small = [record("a", 0.01), record("d", 0.5, voxels=(9000, 2000), components=(2, 1))]
    assert cohort_flags(small) == {"a": [], "d": ["class 1: 2 components"]}


def test_most_uncertain_first_and_k1_last():
    records = [record("x", None), *cohort()]
    assert [r.name for r in ranked(records)] == ["e", "c", "b", "a", "f", "d", "x"]


def test_html_is_escaped_and_self_contained(tmp_path):
    Image.new("RGB", (300, 200), GREEN).save(tmp_path / "a_preview.png")
    records = [record("a", 0.01, preview="a_preview.png"), record("<script>alert(1)</script>", 0.02)]
    html = render_report(records, tmp_path, {"model": "demo"}, [("bad.nii.gz", "no such file")])
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;" in html
    assert html.index("&lt;script&gt;") < html.index("<b>a</b>")  # higher entropy first
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html), "no network references"
    assert 'src="data:image/png;base64,' in html and "bad.nii.gz" in html


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("no chromium on PATH: the headless render check needs it (apt-get install chromium)")


def test_headless_browser_renders_the_report_from_disk(tmp_path):
    browser = _chromium()
    Image.new("RGB", (600, 400), GREEN).save(tmp_path / "a_preview.png")
    write_report(
        tmp_path / "report.html",
        [record("a", 0.01, preview="a_preview.png"), record("b", 0.02)],
        {"model": "demo"},
        overwrite=False,
    )
    shot = tmp_path / "shot.png"
    # No network: every host resolves to nothing and the proxy is a closed port.
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--host-resolver-rules=MAP * ~NOTFOUND",
            "--proxy-server=127.0.0.1:9",
            f"--screenshot={shot}",
            "--window-size=1200,900",
            (tmp_path / "report.html").as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    green = np.all(pixels == GREEN, axis=-1)
    assert green.sum() > 100 * 100, "the inline preview thumbnail was not drawn"
    dark_text = (pixels.max(axis=-1) < 80).sum()
    assert dark_text > 500, "no text drawn"
