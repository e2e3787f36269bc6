"""Installed distribution versions (for records and for telling clashing installs apart)."""

from __future__ import annotations

from collections.abc import Iterable

LDSEG_VERSION = "0.1.0"  # ldseg.__version__ (here so that modules low in the layers can record it)


def installed_versions(names: Iterable[str]) -> dict[str, str]:
    """{distribution: version} of those of `names` that are installed."""
    from importlib import metadata  # here: ~50 ms of import that the run path's first screen need not pay

    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found
