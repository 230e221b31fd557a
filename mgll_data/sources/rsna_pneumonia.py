"""RSNA Pneumonia Detection Challenge: `stage_2_train_images/<patientId>.dcm` and
`stage_2_train_labels.csv` (`patientId,x,y,width,height,Target`).

One row per box of lung opacity suggestive of pneumonia (`Target` 1), or one row without a box
(`Target` 0) for an image without one. Each patient has one image. The label map's `Target`
label (Pneumonia) is the row's Target; each box asserts the box map's `Target` label (Lung
Opacity). Target 0 leaves Lung Opacity unannotated: the challenge's negatives include its "No
Lung Opacity / Not Normal" class, which does not assert the absence of every opacity. Boxes go
into `extra` rescaled to the stored image, and the mask covers exactly the boxes. A row that
cannot be read (an unknown Target, a Target 1 row without a finite positive box, a patient with
both Targets) quarantines the patient with a reason naming the line. Splits: a salted hash of
the patientId (70/15/15 in the shipped pipeline).
"""

from __future__ import annotations

import math

from ..imaging.masks import MaskSpec
from .kaggle_dicom import Annotation, KaggleDicomSource, Rows
from .toolkit import parse_finite

ID_COLUMN, TARGET_COLUMN = "patientId", "Target"
BOX_COLUMNS = ("x", "y", "width", "height")


class RsnaPneumoniaSource(KaggleDicomSource):
    """Reads the RSNA Pneumonia stage 2 training release."""

    TABLE_NAMES = ("stage_2_train_labels.csv", "stage_1_train_labels.csv")
    TABLE_COLUMNS = (ID_COLUMN, *BOX_COLUMNS, TARGET_COLUMN)
    RELEASE = "RSNA Pneumonia Detection"

    def annotated_labels(self) -> list[str]:
        targets = [self.label_map[TARGET_COLUMN], self._box_label()]
        return self.ordered_labels(targets)

    def _box_label(self) -> str:
        return self.pipeline.labels.box_map.get(TARGET_COLUMN, self.label_map[TARGET_COLUMN])

    def annotate(self, rows: Rows) -> Annotation | str:
        boxes = []
        targets = set()
        for line, row in rows:
            target = str(row[TARGET_COLUMN]).strip()
            if target not in ("0", "1"):
                return f"unreadable row ({self.where(line)}: Target {target[:20]!r} is not 0 or 1)"
            targets.add(target)
            if target == "1":
                values = [parse_finite(row[c]) for c in BOX_COLUMNS]
                x, y, w, h = (v if v is not None else math.nan for v in values)
                if not (w > 0 and h > 0 and math.isfinite(x) and math.isfinite(y)):
                    shown = ",".join(str(row[c])[:12] for c in BOX_COLUMNS)
                    return (
                        f"unreadable row ({self.where(line)}: Target 1 without a box of "
                        f"positive size: x,y,w,h = {shown})"
                    )
                boxes.append((x, y, w, h))
        if len(targets) > 1:
            return f"conflicting rows ({self.where(rows[0][0])}: Target 0 and 1 for one patient)"
        labels = {self.label_map[TARGET_COLUMN]: 1.0 if boxes else 0.0}
        if boxes:
            labels[self._box_label()] = 1.0
        fields = {
            "patient_id": str(rows[0][1][ID_COLUMN]).strip(),
            "boxes": [
                {"label": self._box_label(), "x": x, "y": y, "w": w, "h": h} for x, y, w, h in boxes
            ],
        }
        return Annotation(labels, MaskSpec(frame=self.frame, boxes=tuple(boxes)), fields)
