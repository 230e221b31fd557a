"""NIH ChestX-ray14: `Data_Entry` CSV (both dialects), split lists, boxes, Box/Kaggle image layouts.

Columns are selected by name; the 2017 dialect's CRLF, trailing comma, zero-padded ids and
`058Y` ages are normalised; NIH asserts the absence of its 14 findings, so those are 0 unless
listed, and the labels it never annotates are NaN.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..build.items import ImageRef, QuarantineEntry, RawItem
from ..errors import UserError
from .base import ScanResult, Source
from .splits import hash_fraction
from .tables import read_csv_table, read_list_file
from .toolkit import find_file, index_images, parse_age, parse_finite, release_files

DATA_ENTRY_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
REQUIRED_COLUMNS = ("Image Index", "Finding Labels", "Patient ID")
ARCHIVE_PATTERN = re.compile(r"^images_\d+\.(tar\.gz|tgz|tar)$")


def strip_id(raw: str) -> str:
    """Patient ids: `00000001` (2017) and `1` (v2020) are the same patient."""
    raw = raw.strip()
    return str(int(raw)) if raw.isdigit() else raw


def in_validation(patient_id: str, fraction: float, salt: str) -> bool:
    """Whether a train_val patient goes to validation: a stable hash of the id, never hash()."""
    return hash_fraction(patient_id, salt) < fraction


class ChestXray14Source(Source):
    """Reads the NIH Box layout (tar.gz archives or extracted `images/`) or the Kaggle copy."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        labels = self.pipeline.section("labels")
        self.label_map: dict[str, str] = labels["map"]
        self.box_label_map: dict[str, str] = {**self.label_map, **labels.get("box_map", {})}
        self.data_entry = _at_root(self.root, DATA_ENTRY_NAMES)
        self.bbox_file = _at_root(self.root, ("BBox_List_2017.csv",))
        self.train_val_list = _at_root(self.root, ("train_val_list.txt",))
        self.test_list = _at_root(self.root, ("test_list.txt",))
        frame = labels.get("box_frame")
        self.box_frame = (int(frame[0]), int(frame[1])) if frame else None

    def input_files(self) -> list[Path]:
        """The metadata files found at the root (the lists, the tables)."""
        files = [self.data_entry, self.bbox_file, self.train_val_list, self.test_list]
        return [f for f in files if f is not None]

    def scan(self) -> ScanResult:
        missing = []
        if self.data_entry is None:
            missing.append("Data_Entry_2017_v2020.csv (or Data_Entry_2017.csv, .csv.gz)")
        if self.train_val_list is None or self.test_list is None:
            missing.append("train_val_list.txt and test_list.txt")
        files, archives = self._index_images()
        if not files and not archives:
            missing.append("images (images/*.png, images_001/images/*.png or images_001.tar.gz)")
        if missing:
            raise UserError(
                f"{self.root}: not a ChestX-ray14 release; missing " + "; ".join(missing)
            )
        assert self.data_entry and self.train_val_list and self.test_list

        table = read_csv_table(self.data_entry, REQUIRED_COLUMNS)
        test = set(read_list_file(self.test_list))
        train_val = set(read_list_file(self.train_val_list))
        boxes = self._read_boxes()
        fraction, salt = self.pipeline.splits.validation_fraction, self.pipeline.splits.hash_salt
        dialect = (
            "2017 original" if self.data_entry.name.startswith("Data_Entry_2017.csv") else "v2020"
        )
        layouts = [f"{len(files)} image files"] if files else []
        if archives:
            layouts.append(f"{len(archives)} archives read directly")
        note = f"{self.data_entry.name}: {len(table)} rows ({dialect} dialect); " + " and ".join(
            layouts
        )
        result = ScanResult(items=[], notes=[note], inputs=self.input_files(), archives=archives)
        for row in table.to_dict("records"):
            name = row["Image Index"].strip()
            native = name.rsplit(".", 1)[0]
            item_id = f"{self.pipeline.name}:{native}"
            where = f"{self.data_entry.name} row {name}"
            patient = strip_id(row["Patient ID"])
            if name in test:
                split = "test"
            elif name in train_val:
                split = "validation" if in_validation(patient, fraction, salt) else "train"
            else:
                result.quarantine.append(
                    QuarantineEntry(
                        item_id, where, "scan", "in neither train_val_list.txt nor test_list.txt"
                    )
                )
                continue
            labels = self._labels(row["Finding Labels"])
            if isinstance(labels, str):
                result.quarantine.append(QuarantineEntry(item_id, where, "labels", labels))
                continue
            if name in files:
                image = ImageRef(files[name])
            elif archives:
                image = ImageRef("images_*.tar.gz", name)
            else:
                image = ImageRef(str(self.root / "images" / name))
            result.items.append(
                self._item(item_id, split, image, labels, patient, row, boxes.get(name, []))
            )
        return result

    def _item(self, item_id, split, image, labels, patient, row, boxes) -> RawItem:
        age_raw = str(row.get("Patient Age", "")).strip()
        age = parse_age(age_raw)
        if age is not None:
            age = round(age, 4)  # a month or day age in years, without binary noise
        extra: dict = {}
        follow_up = str(row.get("Follow-up #", "")).strip()
        if follow_up.isdigit():
            extra["follow_up"] = int(follow_up)
        if age is None and age_raw:
            extra["age_raw"] = age_raw
        size = (row.get("OriginalImage[Width"), row.get("Height]"))
        if all(str(v or "").strip().isdigit() for v in size):
            extra["original_size"] = [int(size[0]), int(size[1])]
        spacing = parse_finite(row.get("OriginalImagePixelSpacing[x"))
        if spacing is not None:
            # Stored values carry binary noise (0.14300000000000002); six decimals are exact.
            extra["original_pixel_spacing_mm"] = round(spacing, 6)
        sex = str(row.get("Patient Gender", "")).strip().upper()
        view = str(row.get("View Position", "")).strip().upper()
        return RawItem(
            id=item_id,
            source=self.pipeline.name,
            split=split,
            image=image,
            labels=labels,
            patient_id=patient,
            study_id=None,
            view=view or None,
            modality=None,
            age_years=age,
            sex=sex if sex in ("M", "F") else None,
            boxes=boxes,
            box_frame=self.box_frame,
            extra=extra,
        )

    def _labels(self, raw: str) -> dict[str, float] | str:
        """Map `Finding Labels` onto the vocabulary; a string return is the quarantine reason."""
        names = {n.strip() for n in str(raw).split("|") if n.strip()}
        unknown = sorted(names - set(self.label_map))
        if unknown:
            return f"unknown label {unknown[0]!r} (expected one of {sorted(self.label_map)})"
        if not names:
            return "empty Finding Labels"
        if "No Finding" in names and len(names) > 1:
            return f"'No Finding' combined with findings: {sorted(names)}"
        # NIH asserts absence: every label it annotates is 0 unless listed.
        labels = {target: 0.0 for target in self.label_map.values()}
        labels.update({self.label_map[n]: 1.0 for n in names})
        return labels

    def _read_boxes(self) -> dict[str, list[dict]]:
        if self.bbox_file is None:
            return {}
        table = read_csv_table(self.bbox_file, ("Image Index", "Finding Label", "Bbox [x"))
        boxes: dict[str, list[dict]] = {}
        for row in table.to_dict("records"):
            label = self.box_label_map.get(row["Finding Label"].strip())
            values = [parse_finite(row.get(k)) for k in ("Bbox [x", "y", "w", "h]")]
            if label is None or any(v is None for v in values):
                raise UserError(
                    f"{self.bbox_file}: row for {row['Image Index']} has label "
                    f"{row['Finding Label']!r} or box {values} that cannot be read "
                    "(expected a known finding and four numbers x,y,w,h)"
                )
            x, y, w, h = values
            boxes.setdefault(row["Image Index"].strip(), []).append(
                {"label": label, "x": x, "y": y, "w": w, "h": h}
            )
        return boxes

    def _index_images(self) -> tuple[dict[str, str], list[Path]]:
        """Every PNG under the root by file name, and the image archives in name order."""
        files: dict[str, str] = {}
        for paths in index_images(self.root, (".png",)).values():
            for path in paths:
                files.setdefault(os.path.basename(path), path)
        archives = [p for p in release_files(self.root) if ARCHIVE_PATTERN.match(p.name)]
        return files, sorted(archives, key=lambda p: p.name)


def _at_root(root: Path, names: tuple[str, ...]) -> Path | None:
    """The release's tables sit at its root (`name` or `name.gz`)."""
    return find_file(root, names, max_depth=0)
