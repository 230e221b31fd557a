"""VinDr-CXR 1.0.0 (PhysioNet) and the Kaggle VinBigData copy: per-reader boxes, DICOM images.

Layouts: `annotations/annotations_train.csv` (+ `annotations_test.csv`) beside `train/` and
`test/` folders of `<image_id>.dicom` (PhysioNet), or `train.csv` beside `train/` (Kaggle).
Each row is one reader's (`rad_id`) finding on one image, with a box in DICOM pixels
(`x_min,y_min,x_max,y_max`); a `No finding` row has no box. Three readers read every training
image and mark every finding they see, so a finding a reader did not mark is one they assert
absent.

Labels: per vocabulary label, each reader votes present (a row of a class mapped to it) or
absent, and `labels.reader_policy` combines the votes as RICORD's reader groups are combined
(`midrc.ricord.combine`: majority, unanimous or any; a tie or a disagreement under `unanimous`
is -1). A table without `rad_id` (the test set's consensus labels) is one reader. Classes the
label map does not name are kept in `extra.readers` and counted in the build notes. Every box
goes to `extra.boxes`, rescaled to the stored image, labelled with its vocabulary name (or the
VinDr class name when unmapped); `extra.box_readers[i]` is the reader of box i.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from ..build.items import ImageRef, QuarantineEntry, RawItem
from ..errors import UserError
from .base import ScanResult, Source
from .midrc.ricord import combine
from .splits import carve_validation
from .tables import read_csv_table
from .toolkit import find_file, parse_finite, release_files

REQUIRED_COLUMNS = ("image_id", "class_name")
BOX_COLUMNS = ("x_min", "y_min", "x_max", "y_max")
# (table names, image folder, split): the PhysioNet names first, then the Kaggle copy's.
TABLES = (
    (("annotations_train.csv", "train.csv"), "train", "train"),
    (("annotations_test.csv",), "test", "test"),
)
CONSENSUS_READER = "consensus"  # the reader of a table without `rad_id`
_ABSENT = "\x00absent"  # a vote for "this reader did not mark the label"


def reader_labels(
    readers: Mapping[str, set[str]], label_map: Mapping[str, str], policy: str
) -> dict[str, float]:
    """The image's labels from each reader's set of class names, combined by `policy`.

    Every target of `label_map` gets a value: a reader votes for it when they marked a class
    mapped to it, else against it.
    """
    labels: dict[str, float] = {}
    for target in sorted(set(label_map.values())):
        votes = [
            target if any(label_map.get(name) == target for name in classes) else _ABSENT
            for classes in readers.values()
        ]
        labels[target] = combine(votes, (target, _ABSENT), policy)[target]
    return labels


class VindrCxrSource(Source):
    """Reads VinDr-CXR: the annotation tables and the `.dicom` files of each split."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.label_map = self.required_label_map()
        self.policy = self.pipeline.labels.reader_policy
        self.tables = [
            (found, folder, split)
            for names, folder, split in TABLES
            if (found := find_file(self.root, names, max_depth=1)) is not None
        ]

    def input_files(self) -> list[Path]:
        """The annotation tables found (for the build fingerprint)."""
        return [table for table, _, _ in self.tables]

    def scan(self) -> ScanResult:
        if not any(split == "train" for _, _, split in self.tables):
            raise UserError(
                f"{self.root}: not a VinDr-CXR release; expected annotations/annotations_train.csv"
                " (PhysioNet) or train.csv (Kaggle) beside train/<image_id>.dicom"
            )
        result = ScanResult(items=[], inputs=self.input_files())
        unmapped: Counter[str] = Counter()
        for table, folder, split in self.tables:
            images = _dicom_index(self.root / folder)
            annotations = _read_annotations(table)
            for image_id, readers in sorted(annotations.items()):
                unmapped.update(
                    name for r in readers.values() for name in r["classes"] - set(self.label_map)
                )
                path = images.get(image_id)
                if path is None:
                    result.quarantine.append(
                        QuarantineEntry(
                            f"{self.pipeline.name}:{image_id}",
                            f"{table.name} image {image_id}",
                            "scan",
                            f"no DICOM file {folder}/{image_id}.dicom",
                        )
                    )
                    continue
                result.items.append(self._item(image_id, path, readers, split))
            result.notes.append(
                f"{table.name}: {len(annotations)} images ({split}); "
                f"{len(images)} DICOM files in {folder}/"
            )
        result.notes.append(f"reader policy {self.policy}")
        if unmapped:
            counts = ", ".join(f"{name} {n}" for name, n in sorted(unmapped.items()))
            result.notes.append(
                f"classes mapped to no vocabulary label, kept in extra.readers (reader-image "
                f"pairs): {counts}"
            )
        return result

    def _item(self, image_id: str, path: Path, readers: dict[str, dict], split: str) -> RawItem:
        if split == "train":
            split = carve_validation(image_id, self.pipeline.splits, carve_test=True)
        classes = {reader: r["classes"] for reader, r in readers.items()}
        boxes, box_readers = [], []
        for reader, found in sorted(readers.items()):
            for box in found["boxes"]:
                boxes.append({**box, "label": self.label_map.get(box["label"], box["label"])})
                box_readers.append(reader)
        extra = {
            "reader_policy": self.policy,
            "readers": {reader: sorted(names) for reader, names in sorted(classes.items())},
        }
        if box_readers:
            extra["box_readers"] = box_readers
        return RawItem(
            id=f"{self.pipeline.name}:{image_id}",
            source=self.pipeline.name,
            split=split,
            image=ImageRef(str(path), format="dicom"),
            labels=reader_labels(classes, self.label_map, self.policy),
            boxes=boxes,
            extra=extra,
        )


def _read_annotations(table: Path) -> dict[str, dict[str, dict]]:
    """{image id: {reader: {"classes": set of class names, "boxes": [x, y, w, h boxes]}}}."""
    rows = read_csv_table(table, REQUIRED_COLUMNS).to_dict("records")
    found: dict[str, dict[str, dict]] = {}
    for row in rows:
        image_id = str(row["image_id"]).strip()
        name = str(row["class_name"]).strip()
        if not image_id or not name:
            continue
        reader = str(row.get("rad_id", "")).strip() or CONSENSUS_READER
        entry = found.setdefault(image_id, {}).setdefault(reader, {"classes": set(), "boxes": []})
        entry["classes"].add(name)
        corners = [parse_finite(row.get(column)) for column in BOX_COLUMNS]
        if (
            all(v is not None for v in corners)
            and corners[2] > corners[0]
            and corners[3] > corners[1]
        ):
            x0, y0, x1, y1 = corners
            entry["boxes"].append({"label": name, "x": x0, "y": y0, "w": x1 - x0, "h": y1 - y0})
    return found


def _dicom_index(folder: Path) -> dict[str, Path]:
    """The `.dicom` (or `.dcm`) files of a split folder by image id."""
    if not folder.is_dir():
        return {}
    return {
        path.name.rsplit(".", 1)[0]: path
        for path in release_files(folder)
        if path.name.lower().endswith((".dicom", ".dcm"))
    }
