"""NIH ChestX-ray14: `Data_Entry` CSV (both dialects), split lists, boxes, Box/Kaggle image layouts.

Columns are selected by name; the 2017 dialect's CRLF, trailing comma, zero-padded ids and
`058Y` ages are normalised; NIH asserts the absence of its 14 findings, so those are 0 unless
listed, and the labels it never annotates are NaN.

`--labels google` adds the Google 2019 expert relabels (radiologist-adjudicated Fracture,
Pneumothorax, Airspace opacity and Nodule or mass, YES/NO, for 4,376 images of the test and
validation lists): where an image has a relabel, the labels its columns map to
(`labels.relabels`) take the relabel's values and every other label keeps NIH's; `extra` names
the relabelled labels and NIH's values they replaced. Images without a relabel keep NIH's labels
or are left out (`labels.unrelabelled: keep | drop`).
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
# The relabels as torchxrayvision ships them (one table with `Set Id`), or Google's two tables.
GOOGLE_NAMES = (
    "google2019_nih-chest-xray-labels.csv",
    "four_findings_expert_labels_test_labels.csv",
    "four_findings_expert_labels_validation_labels.csv",
)
LABEL_MODES = ("nih", "google")
_YES_NO = {"YES": 1.0, "NO": 0.0}


def strip_id(raw: str) -> str:
    """Patient ids: `00000001` (2017) and `1` (v2020) are the same patient."""
    raw = raw.strip()
    return str(int(raw)) if raw.isdigit() else raw


def in_validation(patient_id: str, fraction: float, salt: str) -> bool:
    """Whether a train_val patient goes to validation: a stable hash of the id, never hash()."""
    return hash_fraction(patient_id, salt) < fraction


class ChestXray14Source(Source):
    """Reads the NIH Box layout (tar.gz archives or extracted `images/`) or the Kaggle copy."""

    OPTIONS = frozenset({"labels"})

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        labels = self.pipeline.labels
        self.label_map = self.required_label_map()
        self.box_label_map = {**self.label_map, **labels.box_map}
        self.data_entry = _at_root(self.root, DATA_ENTRY_NAMES)
        self.bbox_file = _at_root(self.root, ("BBox_List_2017.csv",))
        self.train_val_list = _at_root(self.root, ("train_val_list.txt",))
        self.test_list = _at_root(self.root, ("test_list.txt",))
        self.box_frame = labels.box_frame
        self.label_mode = str(self.options.get("labels", "nih")).lower()
        if self.label_mode not in LABEL_MODES:
            raise UserError(
                f"pipeline {self.pipeline.name!r}: --labels {self.label_mode} is not one of "
                f"{list(LABEL_MODES)}"
            )
        self.unrelabelled = labels.unrelabelled
        self.relabel_files: list[Path] = []
        if self.label_mode == "google":
            found = [_at_root(self.root, (name,)) for name in GOOGLE_NAMES]
            self.relabel_files = [f for f in found if f is not None]

    def input_files(self) -> list[Path]:
        """The metadata files found at the root (the lists, the tables, the relabels)."""
        files = [self.data_entry, self.bbox_file, self.train_val_list, self.test_list]
        return [f for f in files if f is not None] + self.relabel_files

    def annotated_labels(self) -> list[str]:
        """The label map's targets, and with `--labels google` the relabels' targets too."""
        targets = set(self.label_map.values())
        if self.label_mode == "google":
            targets |= set(self.pipeline.labels.relabels.values())
        return [name for name in self.vocab.names if name in targets]

    def scan(self) -> ScanResult:
        missing = []
        if self.data_entry is None:
            missing.append("Data_Entry_2017_v2020.csv (or Data_Entry_2017.csv, .csv.gz)")
        if self.train_val_list is None or self.test_list is None:
            missing.append("train_val_list.txt and test_list.txt")
        files, archives = self._index_images()
        if not files and not archives:
            missing.append("images (images/*.png, images_001/images/*.png or images_001.tar.gz)")
        if self.label_mode == "google" and not self.relabel_files:
            missing.append(f"the Google 2019 relabels for --labels google ({GOOGLE_NAMES[0]})")
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
        relabels = self._read_relabels(result) if self.label_mode == "google" else None
        for row in complete_rows_first(table.to_dict("records")):
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
            relabel = relabels.get(name) if relabels is not None else None
            if isinstance(relabel, str):
                labels = relabel  # an unreadable relabel row: its reason
            if isinstance(labels, str):
                result.quarantine.append(QuarantineEntry(item_id, where, "labels", labels))
                continue
            if relabels is not None and relabel is None and self.unrelabelled == "drop":
                continue
            if name in files:
                image = ImageRef(files[name])
            elif archives:
                image = ImageRef("images_*.tar.gz", name)
            else:
                image = ImageRef(str(self.root / "images" / name))
            item = self._item(item_id, split, image, labels, patient, row, boxes.get(name, []))
            if relabel:
                apply_relabel(item, relabel)
            result.items.append(item)
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
        for row in complete_rows_first(table.to_dict("records")):
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

    def _read_relabels(self, result: ScanResult) -> dict[str, dict[str, float] | str]:
        """{image name: {label: 1/0}} from the relabel tables; a string value is why a row
        cannot be read (that image is quarantined)."""
        columns = self.pipeline.labels.relabels
        if not columns:
            raise UserError(
                f"{self.pipeline.path}: labels.relabels: --labels google needs a mapping of "
                "relabel column -> label"
            )
        relabels: dict[str, dict[str, float] | str] = {}
        for path in self.relabel_files:
            table = read_csv_table(path, ("Image Index", *columns))
            for row in complete_rows_first(table.to_dict("records")):
                cells = {target: str(row[col]).strip().upper() for col, target in columns.items()}
                bad = {t: v for t, v in cells.items() if v not in _YES_NO}
                relabels[row["Image Index"].strip()] = (
                    f"{path.name}: relabel {bad} is not YES or NO"
                    if bad
                    else {t: _YES_NO[v] for t, v in cells.items()}
                )
        how = "kept with NIH labels" if self.unrelabelled == "keep" else "left out"
        result.notes.append(
            f"--labels google: {len(relabels)} relabelled images in "
            f"{', '.join(p.name for p in self.relabel_files)}; images without one are {how}"
        )
        return relabels

    def _index_images(self) -> tuple[dict[str, str], list[Path]]:
        """Every PNG under the root by file name, and the image archives in name order."""
        files: dict[str, str] = {}
        for paths in index_images(self.root, (".png",)).values():
            for path in paths:
                files.setdefault(os.path.basename(path), path)
        archives = [p for p in release_files(self.root) if ARCHIVE_PATTERN.match(p.name)]
        return files, sorted(archives, key=lambda p: p.name)


def apply_relabel(item: RawItem, relabel: dict[str, float]) -> None:
    """Give `item` the relabel's values; `extra` names them and NIH's values they replace."""
    replaced = {label: item.labels[label] for label in relabel if label in item.labels}
    item.labels.update(relabel)
    item.extra["relabelled"] = sorted(relabel)
    if replaced:
        item.extra["nih_labels"] = dict(sorted(replaced.items()))


def _at_root(root: Path, names: tuple[str, ...]) -> Path | None:
    """The release's tables sit at its root (`name` or `name.gz`)."""
    return find_file(root, names, max_depth=0)


def complete_rows_first(rows: list[dict]) -> list[dict]:
    """`rows` with each image's duplicate rows together, the most complete (most non-empty
    fields) first, so it is the one built; the build quarantines the others as duplicate ids.
    Rows of different images keep their order."""
    first_seen: dict[str, int] = {}
    for i, row in enumerate(rows):
        first_seen.setdefault(str(row["Image Index"]).strip(), i)

    def filled(row: dict) -> int:
        return sum(str(v).strip() not in ("", "nan", "None") for v in row.values())

    order = sorted(
        range(len(rows)),
        key=lambda i: (first_seen[str(rows[i]["Image Index"]).strip()], -filled(rows[i]), i),
    )
    return [rows[i] for i in order]
