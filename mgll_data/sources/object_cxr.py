"""Object-CXR (JF Healthcare, MIDL 2020 challenge): `train.csv` and `dev.csv`
(`image_name,annotation`) beside the image folders `train/` and `dev/` of `<name>.jpg`.

An `annotation` cell is blank for an image without foreign objects, else `;`-separated shapes
`type coords...` in pixels of the image: type 0 a rectangle `x1 y1 x2 y2`, type 1 the ellipse
inscribed in the box `x1 y1 x2 y2`, type 2 a polygon `x1 y1 x2 y2 ... xn yn`. The label map's
`annotation` label (Foreign Object) is 1 when there is a shape, else 0; the mask is the union
of the shapes (`imaging/masks.py`), and each shape's bounding box goes into `extra`. An
unreadable cell, a missing image or a repeated row is quarantined with its file and line (rows
of one image that disagree, all of them); images no row names are ignored. Splits: `dev.csv`
is the test split (the challenge's test labels were never released); a share of the training
images, by a hash of the image name (the release has no patient ids), is validation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..build.items import ImageRef, QuarantineEntry, RawItem
from ..errors import UserError
from ..imaging.masks import MaskSpec
from ..record import MASK_COLUMN
from .base import ScanResult, Source
from .splits import carve_validation
from .tables import read_csv_table, require_columns
from .toolkit import find_file, find_listed, index_images

TABLES = {"train": ("train.csv", "train"), "test": ("dev.csv", "dev")}  # split: (CSV, folder)
ID_COLUMNS = ("image_name", "image_path")  # the release's header, and its documentation's
ANNOTATION = "annotation"
SHAPES = {"0": "rectangle", "1": "ellipse", "2": "polygon"}


@dataclass(frozen=True)
class Shape:
    """One annotated foreign object, in pixels of the original image."""

    kind: str  # rectangle, ellipse or polygon
    points: tuple[tuple[float, float], ...]  # two corners, or the polygon's vertices

    def bounds(self) -> tuple[float, float, float, float]:
        """(x, y, w, h) of the shape's bounding box."""
        xs = [x for x, _ in self.points]
        ys = [y for _, y in self.points]
        return min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)


def parse_annotation(text: str) -> list[Shape]:
    """An `annotation` cell as shapes; blank is none. Raises ValueError naming what is wrong: an
    unknown type, a coordinate that is not a finite number, a rectangle or ellipse that is not
    `x1 y1 x2 y2` with x1 < x2 and y1 < y2, a polygon with an odd count or fewer than 3 points."""
    shapes = []
    for number, part in enumerate((p for p in text.split(";") if p.strip()), start=1):
        kind, *tokens = part.split()
        if kind not in SHAPES:
            raise ValueError(f"shape {number} has type {kind[:12]!r} (expected 0, 1 or 2)")
        values = [_finite(token, number) for token in tokens]
        points = tuple(zip(values[0::2], values[1::2], strict=False))
        if SHAPES[kind] == "polygon":
            if len(values) % 2 or len(points) < 3:
                raise ValueError(
                    f"shape {number} (polygon) has {len(values)} numbers; expected x y pairs "
                    "of at least 3 points"
                )
        elif len(values) != 4 or not (values[0] < values[2] and values[1] < values[3]):
            raise ValueError(
                f"shape {number} ({SHAPES[kind]}) is {' '.join(tokens)[:60]!r}; expected "
                "x1 y1 x2 y2 with x1 < x2 and y1 < y2"
            )
        shapes.append(Shape(SHAPES[kind], points))
    return shapes


def _finite(token: str, number: int) -> float:
    try:
        value = float(token)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"shape {number} has coordinate {token[:20]!r}, not a finite number")
    return value


def shapes_mask(shapes: list[Shape]) -> MaskSpec:
    """The union of the shapes, in the frame of the image they were drawn on."""
    corners = {
        kind: [(*s.points[0], *s.points[1]) for s in shapes if s.kind == kind]
        for kind in ("rectangle", "ellipse")
    }
    return MaskSpec(
        frame=None,
        boxes=tuple((x1, y1, x2 - x1, y2 - y1) for x1, y1, x2, y2 in corners["rectangle"]),
        ellipses=tuple(corners["ellipse"]),
        polygons=tuple(s.points for s in shapes if s.kind == "polygon"),
    )


@dataclass(frozen=True)
class Row:
    """One row of an annotation CSV."""

    split: str
    table: Path
    line: int
    name: str  # the image's file name
    cell: str  # its annotation

    @property
    def where(self) -> str:
        return f"{self.table.name} line {self.line}"


class ObjectCxrSource(Source):
    """Reads the Object-CXR release: the two annotation CSVs and their image folders."""

    OPTIONAL_COLUMNS = (MASK_COLUMN,)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        label_map = self.required_label_map()
        if ANNOTATION not in label_map:
            raise UserError(
                f"{self.pipeline.path}: labels.map needs `{ANNOTATION}: <label>` (the label of "
                "an image with a foreign object)"
            )
        self.label = label_map[ANNOTATION]
        self.tables = {
            split: find_file(self.root, (name,), max_depth=1) for split, (name, _) in TABLES.items()
        }

    def annotated_labels(self) -> list[str]:
        return [self.label]

    def scan(self) -> ScanResult:
        tables = {split: path for split, path in self.tables.items() if path is not None}
        if len(tables) < len(TABLES):
            missing = [TABLES[s][0] for s in TABLES if s not in tables]
            raise UserError(
                f"{self.root}: not an Object-CXR release; missing {', '.join(missing)} "
                "(expected train.csv and dev.csv beside the train/ and dev/ image folders)"
            )
        result = ScanResult(items=[], inputs=list(tables.values()))
        by_image: dict[str, list[Row]] = {}
        for split, path in tables.items():
            for row in _read_rows(split, path):
                by_image.setdefault(Path(row.name).stem.lower(), []).append(row)
        images = {split: _folder(path, TABLES[split][1]) for split, path in tables.items()}
        for key in sorted(by_image):
            first, *repeats = by_image[key]
            if any((r.split, r.cell.strip()) != (first.split, first.cell.strip()) for r in repeats):
                shown = "; ".join(f"{r.where}: {r.cell.strip()[:40]!r}" for r in by_image[key])
                reason = f"{first.name} listed with conflicting annotations or splits ({shown})"
                result.quarantine += [self._entry(r, "labels", reason) for r in by_image[key]]
                continue
            for r in repeats:
                reason = f"{r.name} listed again ({r.where}; first at {first.where})"
                result.quarantine.append(self._entry(r, "scan", reason))
            self._add(result, first, images[first.split], tables[first.split].parent)
        rows = sum(len(v) for v in by_image.values())
        result.notes.append(
            f"{', '.join(p.name for p in tables.values())}: {rows} rows; "
            f"{sum(len(i) for i in images.values())} images in the folders"
        )
        return result

    def _add(self, result: ScanResult, row: Row, images: dict[str, list[str]], base: Path) -> None:
        """The row's item, or its quarantine entry."""
        path = find_listed(images, row.name, base)
        if path is None:
            folder = TABLES[row.split][1]
            reason = f"missing image: {row.where} names {folder}/{row.name}"
            result.quarantine.append(self._entry(row, "scan", reason))
            return
        try:
            shapes = parse_annotation(row.cell)
        except ValueError as err:
            reason = f"unreadable annotation ({row.where}: {err})"
            result.quarantine.append(self._entry(row, "labels", reason))
            return
        split = row.split
        if split == "train":
            split = carve_validation(row.name, self.pipeline.splits)
        boxes = [dict(zip("xywh", s.bounds(), strict=True)) for s in shapes]
        result.items.append(
            RawItem(
                id=self._id(row),
                source=self.pipeline.name,
                split=split,
                image=ImageRef(path),
                labels={self.label: 1.0 if shapes else 0.0},
                boxes=[{"label": self.label, **box} for box in boxes],
                mask=shapes_mask(shapes),
                extra={
                    "shapes": [
                        {"type": s.kind, "points": [list(p) for p in s.points]} for s in shapes
                    ]
                },
            )
        )

    def _entry(self, row: Row, stage: str, reason: str) -> QuarantineEntry:
        return QuarantineEntry(self._id(row), row.where, stage, reason)

    def _id(self, row: Row) -> str:
        return f"{self.pipeline.name}:{Path(row.name).stem or f'{row.table.stem}-line-{row.line}'}"


def _read_rows(split: str, path: Path) -> list[Row]:
    """The rows of one annotation CSV, each with the line of the file it starts on."""
    table = read_csv_table(path, (ANNOTATION,))
    column = next((c for c in ID_COLUMNS if c in table.columns), ID_COLUMNS[0])
    require_columns(table, path, (column, ANNOTATION))
    return [
        Row(split, path, line, str(name).strip().replace("\\", "/").rsplit("/", 1)[-1], str(cell))
        for line, name, cell in zip(table.index, table[column], table[ANNOTATION], strict=True)
    ]


def _folder(table: Path, name: str) -> dict[str, list[str]]:
    """The images under the folder beside a CSV, by lower-case stem."""
    folder = table.parent / name
    if not folder.is_dir():
        raise UserError(f"{folder}: image folder missing; {table.name} names the images of {name}/")
    return index_images(folder)
