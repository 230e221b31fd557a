"""Graded fundus releases (APTOS 2019, EyePACS, IDRiD disease grading, Messidor-2): one reader.

Each release is a table of image ids (or one table per official split) with an ICDR diabetic
retinopathy grade 0-4 and, for some, a diabetic macular edema (DME) grade. Their differences are
the pipeline's `release` section (checked when the pipeline is loaded: `GradedLayout` in
`build/pipeline.py`):

    release:
      name: an APTOS 2019 release      # the layout error says "not <name>"
      id_column: id_code
      grade_column: diagnosis
      dme: {column: adjudicated_dme, name: dme, extra_key: dme}  # optional
      gradable_column: adjudicated_gradable   # optional: rows with 0 are quarantined
      strip_extensions: any            # or a list; ids written with a file extension
      eye_suffix: true                 # ids `<patient>_left|right`: patient, eye, split by patient
      ids_carry_split: true            # ids restart in every official split
      skip_blank_ids: true             # trailing empty rows
      extra_columns: {Usage: kaggle_usage}  # copied into `extra` when not blank
      images: train_images/<id_code>.png   # images must exist under the root (named if not)
      missing_image: "no image {id}.png in train_images/"  # {id}, {cell}, {split}
      no_table: ...                    # named when no table is found and none is required
      tables:                          # read in this order
        - split: train                 # train: split by hash (`splits`); test: the test split
          files: [train.csv]           # names tried in order; a prefix and `.gz` are tolerated
          required: train.csv (id_code,diagnosis)   # absent: the table is optional
          if_missing: a note when an optional table is absent
          prefer_folder: train         # among same-named images, one under such a folder
          avoid: [test]                # images whose path has such a word are not this table's
          image_folders: {within: disease grading, named: training, not_within: groundtruth}
      unlabelled: [test.csv]           # tables without grades: counted in the notes, skipped

The grade wording is the vocabulary's (`gradings` in `schemas/fundus.yaml`, named by the
pipeline's `labels.grading`); the DME wording is the pipeline's `labels.dme`, whose keys are the
valid DME grades. Labels are what the release asserts: grade 0 is Normal with no diabetic
retinopathy; grades 1-4 are Abnormal with that grade, leaving `Diabetic Retinopathy` itself unset
(no propagation up the hierarchy); a DME grade above 0 is Diabetic Macular Edema and Abnormal.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from ...build.items import ImageRef
from ...build.pipeline import GradedLayout, GradedTable, ImageFolders
from ...errors import UserError
from ...storage import folder_path, relative_text
from ..base import ScanResult
from ..tables import read_csv_table
from ..toolkit import find_file, index_images, parse_finite, pick_image, walk_release
from .common import TOP, FundusSource

GRADE_LABELS = (
    "Mild Non-Proliferative Diabetic Retinopathy",
    "Moderate Non-Proliferative Diabetic Retinopathy",
    "Severe Non-Proliferative Diabetic Retinopathy",
    "Proliferative Diabetic Retinopathy",
)
_EYE_SUFFIX = re.compile(r"(.+?)_(left|right)", re.IGNORECASE)


def grade_labels(grade: int) -> dict[str, float]:
    """ICDR grade 0–4 as labels: 0 is Normal with no DR; 1–4 set one grade (DR left unset)."""
    labels = {name: 0.0 for name in GRADE_LABELS}
    if grade == 0:
        labels.update({"Normal": 1.0, "Abnormal": 0.0, "Diabetic Retinopathy": 0.0})
    else:
        labels.update({"Normal": 0.0, "Abnormal": 1.0, GRADE_LABELS[grade - 1]: 1.0})
    return labels


def dme_labels(labels: dict[str, float], dme: int) -> dict[str, float]:
    """Add a DME assertion (0 none, above 0 present) and make Normal/Abnormal agree with it."""
    labels = dict(labels, **{"Diabetic Macular Edema": float(dme > 0)})
    if dme > 0:
        labels.update({"Normal": 0.0, "Abnormal": 1.0})
    return labels


def parse_grade(raw: Any) -> int | None:
    """An ICDR grade cell (`2`, `2.0`) as 0–4; None for anything else."""
    value = parse_finite(raw)
    if value is None or value != int(value) or not 0 <= value <= 4:
        return None
    return int(value)


# --- the reader ------------------------------------------------------------------------------


class GradedSource(FundusSource):
    """A graded release laid out as its pipeline's `release` section describes."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.layout = GradedLayout.from_pipeline(self.pipeline)
        self.dme_wording = self.pipeline.labels.dme
        if self.layout.dme is not None and not self.dme_wording:
            raise UserError(f"{self.pipeline.path}: release.dme needs the wording in labels.dme")
        grading = self.pipeline.labels.grading
        gradings = self.vocab.raw.get("gradings") or {}
        if grading not in gradings:
            raise UserError(
                f"{self.pipeline.path}: labels.grading must name one of the {self.vocab.domain} "
                f"vocabulary's gradings {sorted(gradings)}, not {grading!r}"
            )
        self.grade_format = str(gradings[grading]["format"])
        self.grade_wording = {int(k): str(v) for k, v in gradings[grading]["grades"].items()}

    def annotated_labels(self) -> list[str]:
        dme = ["Diabetic Macular Edema"] if self.layout.dme is not None else []
        return self.vocabulary_order([*TOP, "Diabetic Retinopathy", *GRADE_LABELS, *dme])

    def grade_text(self, grade: int) -> str:
        """The grade in the vocabulary's wording (`Diabetic retinopathy grade 2: ...`)."""
        return self.grade_format.format(grade=grade, wording=self.grade_wording[grade])

    def scan(self) -> ScanResult:
        found = [(t, find_file(self.root, t.files, loose=True)) for t in self.layout.tables]
        needs_index = any(t.image_folders is None for t in self.layout.tables)
        images = index_images(self.root) if needs_index else {}
        self._check_layout(found, images)
        result = ScanResult(items=[], inputs=[path for _, path in found if path is not None])
        for table, path in found:
            if path is None:
                if table.if_missing:
                    result.notes.append(table.if_missing)
                continue
            table_images = self._folder_images(table) if table.image_folders else images
            self._read_table(result, table, path, table_images)
        for name in self.layout.unlabelled:
            path = find_file(self.root, (name,), loose=True)
            if path is not None:
                rows = len(read_csv_table(path, (self.layout.id_column,)))
                result.notes.append(
                    f"{path.name}: {rows} unlabelled test images skipped (no public labels)"
                )
        return result

    def _check_layout(self, found: list[tuple[GradedTable, Path | None]], images: dict) -> None:
        """A one-line UserError naming what is missing: required tables, any table, images."""
        missing = [t.required for t, path in found if t.required and path is None]
        if not missing and all(path is None for _, path in found):
            missing.append(self.layout.no_table or " or ".join(t.files[0] for t, _ in found))
        if self.layout.images and not images:
            missing.append(self.layout.images)
        if missing:
            raise UserError(f"{self.root}: not {self.layout.name}; missing " + "; ".join(missing))

    def _folder_images(self, table: GradedTable) -> dict[str, list[str]]:
        """Images under the folders `image_folders` names: a folder whose path has `within`
        (`%20` read as a space), whose own name has `named` and whose path lacks `not_within`."""
        rule = table.image_folders or ImageFolders()
        within, named = rule.within.lower(), rule.named.lower()
        not_within = rule.not_within.lower()
        images: dict[str, list[str]] = {}
        for folder, _, _ in walk_release(self.root):
            if (
                within in folder.replace("%20", " ").lower()
                and named in Path(folder).name.lower()
                and not (not_within and not_within in folder.lower())
            ):
                for stem, paths in index_images(folder_path(self.root, folder)).items():
                    images.setdefault(stem, []).extend(paths)
        return images

    def _read_table(
        self, result: ScanResult, table: GradedTable, path: Path, images: dict[str, list[str]]
    ) -> None:
        layout = self.layout
        columns = [layout.id_column, layout.grade_column]
        columns += [layout.dme.column] if layout.dme is not None else []
        frame = read_csv_table(path, columns)
        if layout.skip_blank_ids:
            frame = frame[frame[layout.id_column].str.strip() != ""]
        result.notes.append(f"{path.name}: {len(frame)} rows")
        for row in frame.to_dict("records"):
            self._row(result, row, table, path.name, images)

    def _native_id(self, cell: str) -> str:
        """The id cell without the file extension the release may write into it."""
        strip = self.layout.strip_extensions
        if strip == "any" or (strip and cell.lower().endswith(tuple(strip))):
            return os.path.splitext(cell)[0]
        return cell

    def _grades(self, row: dict[str, str]) -> tuple[int, int | None] | str:
        """(DR grade, DME grade or None); a string is the quarantine reason."""
        raw_grade = row[self.layout.grade_column]
        grade = parse_grade(raw_grade)
        dme_column = self.layout.dme
        if dme_column is None:
            if grade is None:
                return f"{self.layout.grade_column} {raw_grade!r} is not a grade 0-4"
            return grade, None
        raw_dme = row[dme_column.column]
        dme = parse_finite(raw_dme)
        if grade is None or dme not in self.dme_wording:
            return (
                f"grade {raw_grade!r} / {dme_column.name} {raw_dme!r} not readable "
                f"(expected 0-4 / 0-{max(self.dme_wording)})"
            )
        return grade, int(dme)

    def _row(
        self,
        result: ScanResult,
        row: dict[str, str],
        table: GradedTable,
        table_name: str,
        images: dict[str, list[str]],
    ) -> None:
        layout = self.layout
        cell = str(row[layout.id_column]).strip()
        native = self._native_id(cell)
        local_id = f"{table.split}-{native}" if layout.ids_carry_split else native
        item_id = f"{self.pipeline.name}:{local_id}"
        where = f"{table_name} row {cell}"
        if layout.gradable_column and str(row.get(layout.gradable_column, "1")).strip() == "0":
            self.quarantine(result, item_id, where, f"ungradable ({layout.gradable_column} 0)")
            return
        grades = self._grades(row)
        if isinstance(grades, str):
            self.quarantine(result, item_id, where, grades)
            return
        grade, dme = grades
        candidates = [
            path
            for path in images.get(native.lower(), [])
            if not any(w in relative_text(path, self.root).lower() for w in table.avoid)
        ]
        if not candidates:
            reason = layout.missing_image.format(id=native, cell=cell, split=table.split)
            self.quarantine(result, item_id, where, reason)
            return
        eye = _EYE_SUFFIX.fullmatch(native) if layout.eye_suffix else None
        patient = eye.group(1) if eye else native
        labels, text, extra = grade_labels(grade), self.grade_text(grade), {"dr_grade": grade}
        if dme is not None and layout.dme is not None:
            labels = dme_labels(labels, dme)
            text = f"{text} {self.dme_wording[dme]}".strip()
            extra[layout.dme.extra_key] = dme
        for column, key in layout.extra_columns.items():
            value = str(row.get(column, "")).strip()
            if value:
                extra[key] = value
        result.items.append(
            self.item(
                id=item_id,
                split="test" if table.split == "test" else self.split_of(patient),
                image=ImageRef(pick_image(candidates, self.root, prefer=table.prefer_folder)),
                labels=labels,
                patient_id=f"{self.pipeline.name}:{patient}" if layout.eye_suffix else None,
                laterality=eye.group(2)[0].upper() if eye else None,
                sections={"grade": text},
                extra=extra,
            )
        )
