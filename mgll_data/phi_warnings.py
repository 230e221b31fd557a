"""Warnings from the DICOM reader, reworded so that no value or path from a file reaches a log.

pydicom's warnings, and the same texts on its `pydicom` logger, quote what they read: element
values (names, dates, identifiers) and, for some, file or folder names, which in real releases
carry patient identifiers. The build shows each kind of warning once per process with every
quoted value, path and number replaced by "…", so a user still learns that files were
malformed without the log repeating their content.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from collections.abc import Callable
from typing import Any

# Quoted strings, absolute or relative paths with a separator, and numbers (dates, UIDs, sizes).
_VALUES = re.compile(r"'[^']*'|\"[^\"]*\"|\S*[/\\]\S*|\b\d[\w.:^-]*")
_READERS = ("pydicom", "pylibjpeg", "gdcm")


def reword(message: str) -> str:
    """`message` with every value, path and number replaced by "…"."""
    return _VALUES.sub("…", " ".join(message.split()))


class _Reworded(logging.Filter):
    """Rewords every record of the DICOM readers' loggers before any handler sees it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = reword(record.getMessage()), ()
        return True


def install(stream_write: Callable[[str], Any] | None = None) -> None:
    """Route the DICOM readers' warnings through `reword`, each distinct text once per process
    (on stderr unless `stream_write` is given); other warnings are shown as before."""
    previous = warnings.showwarning
    if getattr(previous, "rewords_dicom_warnings", False) and stream_write is None:
        return  # installed already (the CLI runs many times in one test process)
    shown: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        module = str(filename).replace("\\", "/")
        if not any(f"/{name}/" in module for name in _READERS):
            previous(message, category, filename, lineno, file, line)
            return
        text = f"warning: DICOM reader: {reword(str(message))}"
        if text not in shown:
            shown.add(text)
            (stream_write or sys.stderr.write)(text + "\n")

    show.rewords_dicom_warnings = True  # type: ignore[attr-defined]
    warnings.showwarning = show
    for name in _READERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Reworded) for f in logger.filters):
            logger.addFilter(_Reworded())
