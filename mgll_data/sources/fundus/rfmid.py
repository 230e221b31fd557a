"""RFMiD 1.0: the three split folders with their spaced names and the 47-column label CSVs.

The ids restart in every split, so record ids carry the split (`rfmid:train-1`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...build.items import ImageRef
from ...errors import UserError
from ...storage import child
from ..base import ScanResult
from ..tables import read_csv_table
from ..toolkit import find_file, index_images, parse_finite, pick_image, walk_release
from .common import TOP, FundusSource

RFMID_SPLITS = (
    ("train", "RFMiD_Training_Labels.csv", ("training",)),
    ("validation", "RFMiD_Validation_Labels.csv", ("validation", "evaluation")),
    ("test", "RFMiD_Testing_Labels.csv", ("testing", "test")),
)


class RfmidSource(FundusSource):
    """RFMiD 1.0: `1. Original Images/{a. Training,b. Validation,c. Testing} Set/<ID>.png`."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.column_map = self.required_label_map()

    def annotated_labels(self) -> list[str]:
        return self.vocabulary_order([*TOP, *self.column_map.values()])

    def scan(self) -> ScanResult:
        tables = {
            split: find_file(self.root, (name,), loose=True) for split, name, _ in RFMID_SPLITS
        }
        folders = self._split_folders()
        if all(t is None for t in tables.values()):
            raise UserError(
                f"{self.root}: not an RFMiD release; missing the label CSVs "
                + ", ".join(name for _, name, _ in RFMID_SPLITS)
                + " (under '2. Groundtruths/')"
            )
        lacking = [s for s, t in tables.items() if t is not None and s not in folders]
        if lacking:
            raise UserError(
                f"{self.root}: incomplete RFMiD release; no image folder for the {lacking[0]} "
                "split (expected e.g. '1. Original Images/a. Training Set/1.png')"
            )
        result = ScanResult(items=[], inputs=[t for t in tables.values() if t is not None])
        required = ("ID", "Disease_Risk", *self.column_map)
        for split, _, _ in RFMID_SPLITS:
            path = tables[split]
            if path is None:
                result.notes.append(f"no {split} labels CSV: split skipped")
                continue
            table = read_csv_table(path, required)
            images = index_images(folders[split])
            result.notes.append(f"{path.name}: {len(table)} rows; {folders[split].name}")
            for row in table.to_dict("records"):
                self._row(result, row, split, path.name, images)
        return result

    def _split_folders(self) -> dict[str, Path]:
        """The image folder of each split: `<letter>. <Split> Set`, outside the ground truths."""
        found: dict[str, Path] = {}
        for folder, dirs, _ in walk_release(self.root):
            for name in dirs:
                lower = name.lower()
                if "groundtruth" in folder.lower() or "set" not in lower:
                    continue
                for split, _, words in RFMID_SPLITS:
                    if split not in found and any(w in lower for w in words):
                        found[split] = child(self.root, folder, name)
        return found

    def _row(
        self,
        result: ScanResult,
        row: dict[str, Any],
        split: str,
        table_name: str,
        images: dict[str, list[str]],
    ) -> None:
        """The item of one label row, or its quarantine entry."""
        native = str(row["ID"]).strip()
        native = native[:-2] if native.endswith(".0") else native
        item_id = f"{self.pipeline.name}:{split}-{native}"
        where = f"{table_name} row ID {native}"
        values: dict[str, float] = {}
        for column in ("Disease_Risk", *self.column_map):
            raw = str(row[column]).strip()
            if raw == "" or raw.lower() == "nan":
                continue  # not mentioned
            value = parse_finite(raw)
            if value not in (0.0, 1.0):
                self.quarantine(result, item_id, where, f"{column} is {raw!r} (expected 0 or 1)")
                return
            values[column] = value
        risk = values.pop("Disease_Risk", None)
        labels = {self.column_map[c]: v for c, v in values.items()}
        positive = [c for c, v in values.items() if v == 1.0]
        if risk == 0.0 and positive:
            self.quarantine(
                result, item_id, where, f"Disease_Risk is 0 but {positive} are marked 1"
            )
            return
        abnormal = risk == 1.0 or bool(positive)
        if risk is None and not values:
            self.quarantine(result, item_id, where, "no labels in the row")
            return
        labels.update({"Abnormal": float(abnormal), "Normal": float(not abnormal)})
        candidates = images.get(native.lower())
        if not candidates:
            self.quarantine(result, item_id, where, f"no image {native}.png in the {split} folder")
            return
        phrases = [self.vocab.label(self.column_map[c]).phrase for c in positive]
        if positive:
            findings = "Disease risk; findings: " + ", ".join(phrases) + "."
        elif abnormal:
            findings = "Disease risk; no finding among the 45 listed conditions."
        else:
            findings = "No disease risk: normal fundus."
        result.items.append(
            self.item(
                id=item_id,
                split=split,
                image=ImageRef(pick_image(candidates, self.root)),
                labels=labels,
                sections={"findings": findings},
                extra={
                    "rfmid_id": int(native) if native.isdigit() else native,
                    "rfmid_columns": positive,
                },
            )
        )
