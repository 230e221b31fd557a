"""Locate the data folders (`schemas/`, `pipelines/`) in a wheel or in a source checkout."""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def resource_dir(name: str) -> Path:
    """Return the folder `name` ("schemas" or "pipelines").

    A wheel ships them inside the package as `mgll_data/_data/<name>`; a source checkout (or an
    editable install) keeps them at the repository root beside `mgll_data/`.
    """
    for candidate in (_PACKAGE_DIR / "_data" / name, _PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"mgll data folder {name!r} not found beside {_PACKAGE_DIR}")
