"""ODIR-5K: the official workbook (one row per patient, two eyes) or Kaggle's `full_df.csv`.

Per-eye labels come from that eye's diagnostic keywords (split on the full-width comma `，` and on
`,`), never from the patient-level N…O flags, which are kept in `extra`. Non-diagnostic keywords
(lens dust, low image quality, …) become `extra.quality_flags`; an anterior-segment photograph or
"no fundus image" is quarantined. Labels are what the release asserts: an asserted diagnosis
leaves its ancestors unset (no propagation up the hierarchy) and an ungraded one its grades.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd

from ...build.items import ImageRef
from ...errors import UserError
from ...storage import open_binary
from ..base import ScanResult
from ..tables import read_csv_table, require_columns
from ..toolkit import find_file, index_images, parse_finite, pick_image
from .common import TOP, FundusSource

ODIR_WORKBOOKS = ("ODIR-5K_Training_Annotations(Updated)_V2.xlsx", "data.xlsx")
ODIR_FULL_DF = ("full_df.csv",)
ODIR_COLUMNS = (
    "ID",
    "Patient Age",
    "Patient Sex",
    "Left-Fundus",
    "Right-Fundus",
    "Left-Diagnostic Keywords",
    "Right-Diagnostic Keywords",
)
_EYE = re.compile(r"_(left|right)\b", re.IGNORECASE)
_KEYWORD_SEPARATORS = re.compile(r"[，,、;；]")


def split_keywords(raw: str) -> list[str]:
    """`lens dust，normal fundus` -> ['lens dust', 'normal fundus'] (lower case, one space)."""
    words = (" ".join(part.split()).lower() for part in _KEYWORD_SEPARATORS.split(str(raw)))
    return [w for w in words if w]


class OdirSource(FundusSource):
    """ODIR-5K: the official workbook, Kaggle's `data.xlsx`, or Kaggle's `full_df.csv`."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        config = self.pipeline.labels
        self.keyword_map: dict[str, Any] = {
            " ".join(k.split()).lower(): v for k, v in config.keywords.items()
        }
        self.normal_keywords = {k.lower() for k in config.normal_keywords}
        self.quality_keywords = {k.lower() for k in config.quality_keywords}
        self.not_fundus_keywords = {k.lower() for k in config.not_fundus_keywords}
        self.unknown_target = config.unknown_keyword_label
        self.flags = config.patient_flags
        self._annotated = self.annotated_labels()

    def annotated_labels(self) -> list[str]:
        targets = set(TOP) | {self.unknown_target}
        for value in self.keyword_map.values():
            targets.update([value] if isinstance(value, str) else list(value))
        return self.vocabulary_order(targets)

    def scan(self) -> ScanResult:
        workbook = find_file(self.root, ODIR_WORKBOOKS, loose=True)
        full_df = find_file(self.root, ODIR_FULL_DF, loose=True)
        images = index_images(self.root)
        if workbook is None and full_df is None:
            raise UserError(
                f"{self.root}: not an ODIR-5K release; missing the annotation workbook "
                f"({' or '.join(ODIR_WORKBOOKS)}) or Kaggle's full_df.csv"
            )
        if not images:
            raise UserError(
                f"{self.root}: no fundus images found (expected ODIR-5K_Training_Dataset/"
                "<ID>_left.jpg or Training Images/ / preprocessed_images/)"
            )
        result = ScanResult(items=[])
        if workbook is not None:
            table = self._read_workbook(workbook)
            result.inputs = [workbook]
            eyes = [
                (row, side, row[f"{side}-Fundus"])
                for row in table.to_dict("records")
                for side in ("Left", "Right")
            ]
            note = f"{workbook.name}: {len(table)} patients, {len(eyes)} eyes"
            if full_df is not None:
                note += f" ({full_df.name} ignored: the workbook is the official table)"
        else:
            assert full_df is not None
            table = read_csv_table(full_df, (*ODIR_COLUMNS, "filename"))
            result.inputs = [full_df]
            eyes = []
            for row in table.to_dict("records"):
                match = _EYE.search(row["filename"])
                side = match.group(1).capitalize() if match else ""
                eyes.append((row, side, row["filename"]))
            note = f"{full_df.name}: {len(table)} eye rows"
        result.notes.append(note)
        table_name = result.inputs[0].name
        unknown: Counter[str] = Counter()
        for row, side, filename in eyes:
            self._eye(result, row, side, str(filename).strip(), images, table_name, unknown)
        if unknown:
            result.notes.append(
                f"{sum(unknown.values())} keywords not in the pipeline's keyword map were "
                f"labelled {self.unknown_target!r}: " + ", ".join(sorted(unknown))
            )
        return result

    def _read_workbook(self, path: Path) -> pd.DataFrame:
        try:
            from openpyxl.utils.exceptions import InvalidFileException  # pandas' .xlsx engine
        except ImportError:
            raise UserError(
                f"{path}: reading the ODIR workbook needs openpyxl (pip install openpyxl==3.1.5), "
                "or put Kaggle's full_df.csv in the release instead"
            ) from None
        try:
            with open_binary(path) as file, pd.ExcelFile(file, engine="openpyxl") as sheets:
                sheet = "Sheet1" if "Sheet1" in sheets.sheet_names else sheets.sheet_names[0]
                table = sheets.parse(sheet, dtype=str, keep_default_na=False)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, InvalidFileException) as err:
            raise UserError(f"{path}: not a readable .xlsx workbook ({err})") from err
        return require_columns(table, path, ODIR_COLUMNS)

    def _eye(
        self,
        result: ScanResult,
        row: dict[str, Any],
        side: str,
        filename: str,
        images: dict[str, list[str]],
        table_name: str,
        unknown: Counter[str],
    ) -> None:
        """The item of one eye's photograph, or its quarantine entry."""
        stem = os.path.splitext(filename)[0]
        item_id = f"{self.pipeline.name}:{stem}"
        where = f"{table_name} row ID {row['ID']} ({side or '?'} eye)"
        if not filename or side not in ("Left", "Right"):
            self.quarantine(result, item_id, where, f"cannot tell the eye of {filename!r}")
            return
        keywords = split_keywords(row[f"{side}-Diagnostic Keywords"])
        not_fundus = [k for k in keywords if k in self.not_fundus_keywords]
        if not_fundus:
            self.quarantine(
                result, item_id, where, f"not a fundus photograph (keyword {not_fundus[0]!r})"
            )
            return
        candidates = images.get(stem.lower())
        if not candidates:
            self.quarantine(result, item_id, where, f"no image file {filename} in the release")
            return
        labels, diagnostic, quality, reason = self._labels(keywords, unknown)
        if reason:
            self.quarantine(result, item_id, where, reason)
            return
        raw_id = str(row["ID"]).strip()
        patient = raw_id[:-2] if raw_id.endswith(".0") else raw_id
        extra: dict[str, Any] = {
            "keywords": keywords,
            "quality_flags": quality,
            "patient_labels": {
                flag: int(v) if (v := parse_finite(row.get(flag, ""))) is not None else None
                for flag in self.flags
                if flag in row
            },
        }
        age = parse_finite(row.get("Patient Age", ""))
        if age is not None and not 0 < age <= 120:
            extra["age_raw"] = str(row.get("Patient Age"))
            age = None
        sex = {"male": "M", "female": "F", "m": "M", "f": "F"}.get(
            str(row.get("Patient Sex", "")).strip().lower()
        )
        image = pick_image(candidates, self.root, prefer="train", avoid=("preprocess", "test"))
        result.items.append(
            self.item(
                id=item_id,
                split=self.split_of(patient),
                image=ImageRef(image),
                labels=labels,
                patient_id=f"{self.pipeline.name}:{patient}",
                laterality=side[0],
                age_years=age,
                sex=sex,
                sections={"keywords": ", ".join(diagnostic)},
                extra=extra,
            )
        )

    def _labels(self, keywords: list[str], unknown: Counter) -> tuple[dict, list, list, str]:
        """Per-eye labels from the eye's keywords; a non-empty last value is a quarantine reason."""
        labels: dict[str, float] = {name: 0.0 for name in self._annotated if name not in TOP}
        asserted: dict[str, float] = {}
        diagnostic, quality, normal = [], [], False
        for word in keywords:
            if word in self.quality_keywords:
                quality.append(word)
                continue
            diagnostic.append(word)
            if word in self.normal_keywords:
                normal = True
                continue
            target = self.keyword_map.get(word)
            if target is None:
                unknown[word] += 1
                target = self.unknown_target
            values = (
                {target: 1.0}
                if isinstance(target, str)
                else dict(target)
                if isinstance(target, dict)
                else {t: 1.0 for t in target}
            )
            for name, value in values.items():
                # A definite finding wins over a suspected one of the same label.
                asserted[name] = max(asserted.get(name, -1.0), float(value))
        if not diagnostic:
            return (
                {},
                [],
                quality,
                (
                    f"no diagnostic keyword (only {', '.join(quality)})"
                    if quality
                    else "no diagnostic keywords for this eye"
                ),
            )
        labels.update(asserted)
        for name in asserted:
            # No propagation: an asserted child leaves its (defaulted) ancestors unset ...
            for ancestor in self.vocab.ancestors(name):
                if ancestor not in TOP and labels.get(ancestor) == 0.0:
                    del labels[ancestor]
        for name in asserted:
            # ... and an ungraded diagnosis leaves its (defaulted) children unset.
            children = [lab.name for lab in self.vocab.labels if lab.parent == name]
            if children and not any(c in asserted for c in children):
                for child in children:
                    if labels.get(child) == 0.0:
                        del labels[child]
        # Every diagnostic keyword is either `normal fundus` or a finding (unknown ones included).
        assert asserted or normal
        labels["Abnormal"] = 1.0 if asserted else 0.0
        labels["Normal"] = 0.0 if asserted else 1.0
        return labels, diagnostic, quality, ""
