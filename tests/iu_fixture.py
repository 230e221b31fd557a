"""A small IU X-ray (Open-i NLMCXR) release built from REAL development reports.

The reports are the first `COUNT` development reports of torchxrayvision's
`NLMCXR_reports.tgz`, copied byte for byte. HELD OUT: reports whose number n is divisible by 4
are never read: members are filtered by NAME before their content is opened, and the metadata
rows by the report number in their image id before any other cell is looked at.

The release, in either layout (`tgz`: NLMCXR_reports.tgz + NLMCXR_png.tgz as downloaded;
`extracted`: ecgen-radiology/*.xml + NLMCXR_png/*.png), holds:

- generated 40 x 48 grey PNGs named `<parentImage id>.png`, except `MISSING_IMAGE`;
- `nlmcxr_dicom_metadata.csv.gz`: the real rows of the fixture's images, every column (with
  the birth dates, accession numbers and dates that must never reach a record);
- `MALFORMED` (a truncated XML) and `BOMB` (an entity-expansion bomb of a few hundred bytes),
  numbered so that n % 4 != 0.
"""

from __future__ import annotations

import csv
import functools
import gzip
import io
import re
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from mgll_data.sources.iu_xray import parse_report

MEMBER = re.compile(r"^(?:\./)?ecgen-radiology/(\d+)\.xml$")
IMAGE_NUMBER = re.compile(r"^CXR(\d+)_")
COUNT = 40
MALFORMED = 99_999  # 99999 % 4 == 3
BOMB = 99_998  # % 4 == 2
MISSING_IMAGE = "CXR1_1_IM-0001-4001"  # report 1's second image: no PNG anywhere
TRUNCATED_XML = b'<?xml version="1.0"?>\n<eCitation><MeSH><major>normal</major></MeSH>\n'
BOMB_XML = (
    b'<?xml version="1.0"?>\n<!DOCTYPE lolz [<!ENTITY lol "lololololololololol">'
    + b"".join(
        f'<!ENTITY lol{k} "{("&lol" + (str(k - 1) if k > 1 else "") + ";") * 10}">'.encode()
        for k in range(1, 10)
    )
    + b"]>\n<eCitation><MeSH><major>&lol9;</major></MeSH>"
    b'<parentImage id="CXR99998_IM-0001-1001"/></eCitation>\n'
)


def data_dir() -> Path:
    """torchxrayvision's data folder (found through the installed package)."""
    import torchxrayvision

    return Path(torchxrayvision.__file__).parent / "data"


def is_dev(number: int) -> bool:
    return number % 4 != 0


@functools.lru_cache(maxsize=1)
def dev_reports() -> tuple[tuple[int, bytes], ...]:
    """(number, XML bytes) of the first COUNT development reports, in archive order."""
    found = []
    with tarfile.open(data_dir() / "NLMCXR_reports.tgz", "r|gz") as tar:
        for member in tar:
            match = MEMBER.match(member.name)
            if not member.isfile() or not match or not is_dev(int(match.group(1))):
                continue  # held out (or not a report): never opened
            found.append((int(match.group(1)), tar.extractfile(member).read()))
            if len(found) == COUNT:
                break
    return tuple(found)


def image_ids() -> list[str]:
    """Every image id the fixture's real reports name (in report order)."""
    return [i for number, data in dev_reports() for i in parse_report(number, data).images]


@functools.lru_cache(maxsize=1)
def metadata_rows() -> tuple[list[str], tuple[list[str], ...]]:
    """The real metadata header and the rows of the fixture's images (dev reports only)."""
    wanted = set(image_ids())
    text = gzip.decompress((data_dir() / "nlmcxr_dicom_metadata.csv.gz").read_bytes()).decode()
    reader = csv.reader(io.StringIO(text))
    header = next(reader)
    rows = []
    for row in reader:
        match = IMAGE_NUMBER.match(row[0])
        if match and is_dev(int(match.group(1))) and row[0] in wanted:
            rows.append(row)
    return header, tuple(rows)


def _png(seed: int) -> bytes:
    pixels = (np.random.default_rng(seed).random((40, 48)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "L").save(buffer, format="PNG")
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _tgz(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            _add(tar, name, data)


def make_release(root: Path, layout: str = "tgz") -> Path:
    """Write the fixture under `root` in the `tgz` or `extracted` layout; returns root."""
    root.mkdir(parents=True, exist_ok=True)
    reports = {f"ecgen-radiology/{n}.xml": data for n, data in dev_reports()}
    reports[f"ecgen-radiology/{MALFORMED}.xml"] = TRUNCATED_XML
    reports[f"ecgen-radiology/{BOMB}.xml"] = BOMB_XML
    images = {f"{i}.png": _png(k) for k, i in enumerate(image_ids()) if i != MISSING_IMAGE}
    if layout == "tgz":
        _tgz(root / "NLMCXR_reports.tgz", reports)
        _tgz(root / "NLMCXR_png.tgz", images)
    else:
        for folder, files in (("", reports), ("NLMCXR_png/", images)):
            for name, data in files.items():
                path = root / f"{folder}{name}"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
    header, rows = metadata_rows()
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([header, *rows])
    (root / "nlmcxr_dicom_metadata.csv.gz").write_bytes(
        gzip.compress(buffer.getvalue().encode(), mtime=0)
    )
    return root
