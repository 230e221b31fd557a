"""The one check for file names made from data (ids, source names, manifest paths, flags).

A value read from a dataset or a manifest becomes a path component only when it matches
`SAFE_COMPONENT`: letters, digits, `_`, `-` and `.`, not starting with a dot (so never `..`,
a hidden file or an empty name), at most 255 characters. Anything else (a `/`, a NUL, `../`)
is refused with a UserError naming the value, so nothing is ever written outside its folder.
"""

from __future__ import annotations

import re

from .errors import UserError

SAFE_COMPONENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,254}")


def safe_path_component(value: str, what: str) -> str:
    """`value` unchanged if it is a safe file name; else a UserError saying `what` it was."""
    if not isinstance(value, str) or not SAFE_COMPONENT.fullmatch(value):
        raise UserError(
            f"{what} {value!r} is not a safe file name (expected letters, digits, '_', '-' "
            "and '.', not starting with '.')"
        )
    return value


def safe_relative_path(value: str, what: str) -> str:
    """A `/`-separated relative path whose every component is safe (e.g. `data/x.parquet`)."""
    if not isinstance(value, str):
        raise UserError(f"{what} {value!r} is not a relative path")
    for part in value.split("/"):
        try:
            safe_path_component(part, what)
        except UserError:
            raise UserError(
                f"{what} {value!r} is not a safe relative path (each part letters, digits, "
                "'_', '-' and '.', not starting with '.')"
            ) from None
    return value
