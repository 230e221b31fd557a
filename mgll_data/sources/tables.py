"""Reading the CSV and list files of releases, tolerant of their dialects.

`.csv` or `.csv.gz`; LF or CRLF; trailing commas and empty extra columns; UTF-8 with a Latin-1
fallback; every cell as a string (blank stays blank, never NaN or 0); columns chosen by name.
"""

from __future__ import annotations

import gzip
import io
import zlib
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from ..errors import UserError
from .toolkit import decode_text


def read_csv_table(path: Path, required: Sequence[str]) -> pd.DataFrame:
    """Read a release CSV as strings; a one-line UserError if unreadable or lacking a column."""
    try:
        data = path.read_bytes()
        if path.name.lower().endswith(".gz"):
            data = gzip.decompress(data)
        table = pd.read_csv(
            io.StringIO(decode_text(data)),
            dtype=str,
            keep_default_na=False,
            index_col=False,
            skipinitialspace=False,
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, OSError, EOFError, zlib.error) as err:
        raise UserError(f"{path}: not a readable CSV ({str(err).splitlines()[0]})") from err
    return require_columns(table, path, required)


def require_columns(table: pd.DataFrame, path: Path, required: Sequence[str]) -> pd.DataFrame:
    """Strip the column names (and a BOM); a one-line UserError naming any missing column."""
    table.columns = [str(c).strip().lstrip("\ufeff") for c in table.columns]
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise UserError(
            f"{path}: missing column(s) {missing}; expected at least {list(required)}, "
            f"found {list(table.columns)[:16]}"
        )
    return table


def read_list_file(path: Path) -> list[str]:
    """One entry per line; CRLF, blank lines and a missing final newline tolerated."""
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err})") from err
    return [line.strip() for line in text.splitlines() if line.strip()]
