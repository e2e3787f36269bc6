"""Test helpers (importable, unlike conftest.py): what makes an agreement or Dice check able to fail."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

MIN_CLASS_FRACTION = 0.01  # a class must cover at least 1 % of the voxels to count


def assert_several_classes(
    labels: np.ndarray | Mapping[str, float], what: str = "reference labels", min_fraction: float = MIN_CLASS_FRACTION
) -> None:
    """At least two classes each cover >= `min_fraction` of the voxels of `labels` (a label array,
    or a {class: fraction} mapping as ldseg-bench records it).

    Call it on the reference of every agreement or Dice check: a model that puts (nearly) every voxel
    in one class agrees with anything of the same kind, so such a check could not fail."""
    if isinstance(labels, Mapping):
        fractions = {str(k): float(v) for k, v in labels.items()}
        assert abs(sum(fractions.values()) - 1.0) < 1e-6, f"{what}: class fractions {fractions} do not sum to 1"
    else:
        values, counts = np.unique(np.asarray(labels), return_counts=True)
        fractions = {str(v): float(c) / labels.size for v, c in zip(values.tolist(), counts.tolist())}
    big = [k for k, f in fractions.items() if f >= min_fraction]
    shown = ", ".join(f"{k}: {100 * f:.2f} %" for k, f in sorted(fractions.items()))
    assert len(big) >= 2, (
        f"{what}: only {len(big)} class(es) cover >= {100 * min_fraction:g} % of the voxels ({shown}); "
        "an agreement or Dice check on this output cannot fail"
    )
