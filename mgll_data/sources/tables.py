"""Reading the CSV and list files of releases, tolerant of their dialects.

`.csv` or `.csv.gz`; LF or CRLF; trailing commas and empty extra columns; UTF-8 with a Latin-1
fallback; every cell as a string (blank stays blank, never NaN or 0); columns chosen by name.
A table's index is each row's line number in the file (the line a quoted multi-line cell's
record starts on), so that reasons quote the line a reader finds in an editor.
"""

from __future__ import annotations

import csv
import gzip
import io
import zlib
from collections.abc import Iterator, Sequence
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
        text = decode_text(data)
        table = pd.read_csv(
            io.StringIO(text),
            dtype=str,
            keep_default_na=False,
            index_col=False,
            skipinitialspace=False,
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, OSError, EOFError, zlib.error) as err:
        raise UserError(f"{path}: not a readable CSV ({str(err).splitlines()[0]})") from err
    starts = record_lines(text)
    # pandas and csv split records alike; should they ever not, rows count on from line 2
    lines = starts[1:] if len(starts) == len(table) + 1 else range(2, len(table) + 2)
    table.index = pd.Index(lines, dtype="int64", name="line")
    return require_columns(table, path, required)


def record_lines(text: str) -> list[int]:
    """The line (from 1) on which each record of CSV `text` starts, header included.

    Records are split as pandas splits them: a quoted cell may span lines, and a line that is
    empty or holds only spaces and tabs is no record (pandas skips it). [] if `text` is not CSV.
    """
    last = [""]  # the line read last: a one-line record's whole text

    def feed() -> Iterator[str]:
        # universal newlines: \n, \r\n and a lone \r each end a line, for pandas as here
        for line in io.StringIO(text, newline=None):
            last[0] = line
            yield line

    reader = csv.reader(feed())
    starts: list[int] = []
    consumed = 0
    try:
        for _ in reader:
            first, consumed = consumed, reader.line_num
            if consumed - first > 1 or last[0].strip(" \t\n"):
                starts.append(first + 1)
    except csv.Error:  # e.g. a cell over csv's field size limit, which pandas reads
        return []
    return starts


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
