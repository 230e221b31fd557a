"""Fundus releases: ODIR-5K, RFMiD, APTOS 2019, EyePACS, IDRiD, Messidor-2 (source-formats.md §4).

Every reader yields one RawItem per fundus photograph (modality `OP`, RGB kept by the image
stage). Labels follow the `fundus` vocabulary: `Normal` or `Abnormal` is always asserted, so the
shared category formatter gives `Normal` or `Abnormal, <diseases>` (MGLL's wording). Labels are
what the release asserts: a known ICDR grade leaves `Diabetic Retinopathy` itself unset (no
propagation up the hierarchy, DESIGN §4); an ungraded diagnosis leaves its grades unset.

- ODIR-5K: the official workbook (one row per patient, two eyes) or Kaggle's `full_df.csv` (one
  row per eye). Per-eye labels come from that eye's diagnostic keywords (split on the full-width
  comma `，` and on `,`), never from the patient-level N…O flags, which are kept in `extra`.
  Non-diagnostic keywords (lens dust, low image quality, …) become `extra.quality_flags`; an
  anterior-segment photograph or "no fundus image" is quarantined.
- RFMiD: the three split folders with their spaced names and the 47-column label CSVs; the ids
  restart in every split, so record ids carry the split (`rfmid:train-1`).
- APTOS 2019: `train.csv` grades 0–4; `test.csv` has no labels and is skipped (reported).
- EyePACS: `trainLabels.csv` (`image` without extension, `.jpeg` files) and the released test
  labels `retinopathy_solution.csv` when present.
- IDRiD (part B, disease grading) and Messidor-2 (adjudicated grades): ICDR grade plus diabetic
  macular edema; Messidor-2's ungradable rows are quarantined.
"""

from __future__ import annotations

import math
import os
import re
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd

from ..build.items import ImageRef, QuarantineEntry, RawItem
from ..errors import UserError
from .base import ScanResult, Source
from .splits import hash_split
from .tables import read_csv_table, require_columns

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
GRADE_LABELS = (
    "Mild Non-Proliferative Diabetic Retinopathy",
    "Moderate Non-Proliferative Diabetic Retinopathy",
    "Severe Non-Proliferative Diabetic Retinopathy",
    "Proliferative Diabetic Retinopathy",
)
TOP = ("Normal", "Abnormal")
_KEYWORD_SPLIT = re.compile(r"[，,、;；]")


# --- shared helpers -------------------------------------------------------------------------


def index_images(root: Path) -> dict[str, list[str]]:
    """Every image file under `root` by lower-case stem (mixed-case extensions tolerated)."""
    found: dict[str, list[str]] = {}
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            stem, ext = os.path.splitext(name)
            if ext.lower() in IMAGE_EXTENSIONS and not name.startswith("."):
                found.setdefault(stem.lower(), []).append(os.path.join(folder, name))
    return found


def pick_image(candidates: list[str], root: Path, prefer: str = "", avoid: tuple = ()) -> str:
    """The best of several files with one stem: in a folder named like `prefer`, not `avoid`."""

    def rank(path: str) -> tuple:
        rel = os.path.relpath(path, root).lower()
        return (
            prefer not in rel if prefer else False,
            sum(word in rel for word in avoid),
            rel.count(os.sep),
            rel,
        )

    return min(candidates, key=rank)


def parse_float(raw: Any) -> float | None:
    try:
        value = float(str(raw).strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def grade_labels(grade: int) -> dict[str, float]:
    """ICDR grade 0–4 as labels: 0 is Normal with no DR; 1–4 set one grade (DR left unset)."""
    labels = {name: 0.0 for name in GRADE_LABELS}
    if grade == 0:
        labels.update({"Normal": 1.0, "Abnormal": 0.0, "Diabetic Retinopathy": 0.0})
    else:
        labels.update({"Normal": 0.0, "Abnormal": 1.0, GRADE_LABELS[grade - 1]: 1.0})
    return labels


def parse_grade(raw: Any) -> int | None:
    value = parse_float(raw)
    if value is None or value != int(value) or not 0 <= value <= 4:
        return None
    return int(value)


def find_file(root: Path, names: tuple[str, ...]) -> Path | None:
    """The file (searched recursively) named like one of `names`, earliest name then shallowest.

    A name may carry a prefix (`a. RFMiD_Training_Labels.csv`) and `.gz`; case is ignored.
    """
    hits = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            lower = name.lower().removesuffix(".gz")
            for order, wanted in enumerate(n.lower() for n in names):
                head = lower[: len(lower) - len(wanted)]
                if lower.endswith(wanted) and (not head or head[-1] in " ._-"):
                    path = Path(folder) / name
                    hits.append((order, len(path.relative_to(root).parts), str(path)))
    return Path(min(hits)[2]) if hits else None


class FundusSource(Source):
    """Shared plumbing: split settings, image index and the grade wording of the pipeline."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.labels_config = self.pipeline.section("labels")
        splits = self.pipeline.section("splits")
        self.validation_fraction = float(splits.get("validation_fraction", 0.1))
        self.test_fraction = float(splits.get("test_fraction", 0.0))
        self.salt = str(splits.get("hash_salt", self.pipeline.name))
        self._inputs: list[Path] = []

    def input_files(self) -> list[Path]:
        return list(self._inputs)

    def split_of(self, key: str, test_fraction: float | None = None) -> str:
        test = self.test_fraction if test_fraction is None else test_fraction
        return hash_split(key, self.salt, self.validation_fraction, test)

    def grade_text(self, grade: int) -> str:
        wording = {int(k): v for k, v in self.labels_config.get("grades", {}).items()}
        return str(self.labels_config.get("grade_format", "{wording}")).format(
            grade=grade, wording=wording[grade]
        )

    def quarantine(self, result: ScanResult, item_id: str, where: str, reason: str) -> None:
        result.quarantine.append(QuarantineEntry(item_id, where, "scan", reason))

    def item(self, **fields) -> RawItem:
        return RawItem(source=self.pipeline.name, modality="OP", **fields)


def _annotated(vocab_names: list[str], targets: set[str]) -> list[str]:
    return [name for name in vocab_names if name in targets]


# --- ODIR-5K --------------------------------------------------------------------------------

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
ODIR_FLAGS = ("N", "D", "G", "C", "A", "H", "M", "O")
_EYE = re.compile(r"_(left|right)\b", re.IGNORECASE)


def split_keywords(raw: str) -> list[str]:
    """`lens dust，normal fundus` -> ['lens dust', 'normal fundus'] (lower case, one space)."""
    words = (" ".join(part.split()).lower() for part in _KEYWORD_SPLIT.split(str(raw)))
    return [w for w in words if w]


class OdirSource(FundusSource):
    """ODIR-5K: the official workbook, Kaggle's `data.xlsx`, or Kaggle's `full_df.csv`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        config = self.labels_config
        self.keyword_map: dict[str, Any] = {
            " ".join(str(k).split()).lower(): v for k, v in config.get("keywords", {}).items()
        }
        self.normal_keywords = {k.lower() for k in config.get("normal_keywords", [])}
        self.quality_keywords = {k.lower() for k in config.get("quality_keywords", [])}
        self.not_fundus_keywords = {k.lower() for k in config.get("not_fundus_keywords", [])}
        self.unknown_target = config.get("unknown_keyword_label", "Other Abnormality")
        self.flags = config.get("patient_flags", list(ODIR_FLAGS))
        self._annotated = self.annotated_labels()

    def annotated_labels(self) -> list[str]:
        targets = set(TOP) | {self.unknown_target}
        for value in self.keyword_map.values():
            targets.update([value] if isinstance(value, str) else list(value))
        return _annotated(self.vocab.names, targets)

    def scan(self) -> ScanResult:
        workbook = find_file(self.root, ODIR_WORKBOOKS)
        full_df = find_file(self.root, ODIR_FULL_DF)
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
            self._inputs = [workbook]
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
            self._inputs = [full_df]
            eyes = []
            for row in table.to_dict("records"):
                match = _EYE.search(row["filename"])
                side = match.group(1).capitalize() if match else ""
                eyes.append((row, side, row["filename"]))
            note = f"{full_df.name}: {len(table)} eye rows"
        result.notes.append(note)
        table_name = self._inputs[0].name
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
            sheets = pd.ExcelFile(path, engine="openpyxl")
            sheet = "Sheet1" if "Sheet1" in sheets.sheet_names else sheets.sheet_names[0]
            table = sheets.parse(sheet, dtype=str, keep_default_na=False)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, InvalidFileException) as err:
            raise UserError(f"{path}: not a readable .xlsx workbook ({err})") from err
        return require_columns(table, path, ODIR_COLUMNS)

    def _eye(self, result, row, side, filename, images, table_name, unknown) -> None:
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
                flag: int(v) if (v := parse_float(row.get(flag, ""))) is not None else None
                for flag in self.flags
                if flag in row
            },
        }
        age = parse_float(row.get("Patient Age", ""))
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


# --- RFMiD ----------------------------------------------------------------------------------

RFMID_SPLITS = (
    ("train", "RFMiD_Training_Labels.csv", ("training",)),
    ("validation", "RFMiD_Validation_Labels.csv", ("validation", "evaluation")),
    ("test", "RFMiD_Testing_Labels.csv", ("testing", "test")),
)


class RfmidSource(FundusSource):
    """RFMiD 1.0: `1. Original Images/{a. Training,b. Validation,c. Testing} Set/<ID>.png`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.column_map: dict[str, str] = self.labels_config["map"]

    def annotated_labels(self) -> list[str]:
        return _annotated(self.vocab.names, set(TOP) | set(self.column_map.values()))

    def scan(self) -> ScanResult:
        tables = {split: find_file(self.root, (name,)) for split, name, _ in RFMID_SPLITS}
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
        result = ScanResult(items=[])
        self._inputs = [t for t in tables.values() if t is not None]
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
        found: dict[str, Path] = {}
        for folder, dirs, _ in os.walk(self.root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in dirs:
                lower = name.lower()
                if "groundtruth" in folder.lower() or "set" not in lower:
                    continue
                for split, _, words in RFMID_SPLITS:
                    if split not in found and any(w in lower for w in words):
                        found[split] = Path(folder) / name
        return found

    def _row(self, result, row, split, table_name, images) -> None:
        native = str(row["ID"]).strip()
        native = native[:-2] if native.endswith(".0") else native
        item_id = f"{self.pipeline.name}:{split}-{native}"
        where = f"{table_name} row ID {native}"
        values: dict[str, float] = {}
        for column in ("Disease_Risk", *self.column_map):
            raw = str(row[column]).strip()
            if raw == "" or raw.lower() == "nan":
                continue  # not mentioned
            value = parse_float(raw)
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


# --- APTOS 2019 -----------------------------------------------------------------------------


class AptosSource(FundusSource):
    """APTOS 2019 Blindness Detection: `train.csv` + `train_images/<id_code>.png`."""

    def annotated_labels(self) -> list[str]:
        return _annotated(self.vocab.names, {*TOP, "Diabetic Retinopathy", *GRADE_LABELS})

    def scan(self) -> ScanResult:
        train = find_file(self.root, ("train.csv",))
        test = find_file(self.root, ("test.csv",))
        images = index_images(self.root)
        if train is None or not images:
            missing = [] if train else ["train.csv (id_code,diagnosis)"]
            missing += [] if images else ["train_images/<id_code>.png"]
            raise UserError(
                f"{self.root}: not an APTOS 2019 release; missing " + "; ".join(missing)
            )
        self._inputs = [train]
        table = read_csv_table(train, ("id_code", "diagnosis"))
        result = ScanResult(items=[], notes=[f"{train.name}: {len(table)} rows"])
        if test is not None:
            unlabelled = len(read_csv_table(test, ("id_code",)))
            result.notes.append(
                f"{test.name}: {unlabelled} unlabelled test images skipped (no public labels)"
            )
        for row in table.to_dict("records"):
            code = row["id_code"].strip()
            item_id = f"{self.pipeline.name}:{code}"
            where = f"{train.name} row {code}"
            grade = parse_grade(row["diagnosis"])
            if grade is None:
                self.quarantine(
                    result, item_id, where, f"diagnosis {row['diagnosis']!r} is not a grade 0-4"
                )
                continue
            candidates = [
                p
                for p in images.get(code.lower(), [])
                if "test" not in os.path.relpath(p, self.root).lower()
            ]
            if not candidates:
                self.quarantine(result, item_id, where, f"no image {code}.png in train_images/")
                continue
            result.items.append(
                self.item(
                    id=item_id,
                    split=self.split_of(code),
                    image=ImageRef(pick_image(candidates, self.root, prefer="train")),
                    labels=grade_labels(grade),
                    sections={"grade": self.grade_text(grade)},
                    extra={"dr_grade": grade},
                )
            )
        return result


# --- EyePACS --------------------------------------------------------------------------------


class EyepacsSource(FundusSource):
    """Kaggle DR Detection: `trainLabels.csv`, `train/<image>.jpeg`, released test labels."""

    def annotated_labels(self) -> list[str]:
        return _annotated(self.vocab.names, {*TOP, "Diabetic Retinopathy", *GRADE_LABELS})

    def scan(self) -> ScanResult:
        train = find_file(self.root, ("trainLabels.csv",))
        solution = find_file(self.root, ("retinopathy_solution.csv", "testLabels.csv"))
        images = index_images(self.root)
        if train is None or not images:
            missing = [] if train else ["trainLabels.csv (image,level)"]
            missing += [] if images else ["train/<image>.jpeg"]
            raise UserError(f"{self.root}: not an EyePACS release; missing " + "; ".join(missing))
        self._inputs = [p for p in (train, solution) if p is not None]
        result = ScanResult(items=[])
        tables = [("train", train, read_csv_table(train, ("image", "level")))]
        if solution is not None:
            tables.append(("test", solution, read_csv_table(solution, ("image", "level"))))
        else:
            result.notes.append("no retinopathy_solution.csv: no test split")
        for kind, path, table in tables:
            result.notes.append(f"{path.name}: {len(table)} rows")
            for row in table.to_dict("records"):
                self._row(result, row, kind, path.name, images)
        return result

    def _row(self, result, row, kind, table_name, images) -> None:
        name = row["image"].strip()
        if name.lower().endswith((".jpeg", ".jpg", ".png")):
            name = os.path.splitext(name)[0]
        item_id = f"{self.pipeline.name}:{name}"
        where = f"{table_name} row {name}"
        match = re.fullmatch(r"(.+?)_(left|right)", name, re.IGNORECASE)
        grade = parse_grade(row["level"])
        if grade is None:
            self.quarantine(result, item_id, where, f"level {row['level']!r} is not a grade 0-4")
            return
        candidates = images.get(name.lower())
        if not candidates:
            self.quarantine(result, item_id, where, f"no image {name}.jpeg in the release")
            return
        patient = match.group(1) if match else name
        if kind == "test":
            split = "test"
        else:
            split = self.split_of(patient)
        extra: dict[str, Any] = {"dr_grade": grade}
        usage = str(row.get("Usage", "")).strip()
        if usage:
            extra["kaggle_usage"] = usage
        result.items.append(
            self.item(
                id=item_id,
                split=split,
                image=ImageRef(pick_image(candidates, self.root, prefer=kind)),
                labels=grade_labels(grade),
                patient_id=f"{self.pipeline.name}:{patient}",
                laterality=match.group(2)[0].upper() if match else None,
                sections={"grade": self.grade_text(grade)},
                extra=extra,
            )
        )


# --- IDRiD (disease grading) ----------------------------------------------------------------

IDRID_TABLES = (
    ("train", "IDRiD_Disease Grading_Training Labels.csv", "training"),
    ("test", "IDRiD_Disease Grading_Testing Labels.csv", "testing"),
)
IDRID_COLUMNS = ("Image name", "Retinopathy grade", "Risk of macular edema")


def dme_labels(labels: dict[str, float], dme: int) -> dict[str, float]:
    """Add a DME assertion (0 none, 1 or 2 present) and make Normal/Abnormal agree with it."""
    labels = dict(labels, **{"Diabetic Macular Edema": float(dme > 0)})
    if dme > 0:
        labels.update({"Normal": 0.0, "Abnormal": 1.0})
    return labels


class IdridSource(FundusSource):
    """IDRiD part B: `B. Disease Grading/` (folder names may be URL-encoded by some mirrors)."""

    def annotated_labels(self) -> list[str]:
        targets = {*TOP, "Diabetic Retinopathy", *GRADE_LABELS, "Diabetic Macular Edema"}
        return _annotated(self.vocab.names, targets)

    def scan(self) -> ScanResult:
        tables = {split: find_file(self.root, (name,)) for split, name, _ in IDRID_TABLES}
        if all(t is None for t in tables.values()):
            raise UserError(
                f"{self.root}: not an IDRiD release; missing 'B. Disease Grading/2. Groundtruths/"
                "a. IDRiD_Disease Grading_Training Labels.csv' (and the Testing Labels)"
            )
        grading = [
            Path(folder)
            for folder, _, _ in os.walk(self.root)
            if "disease grading" in folder.replace("%20", " ").lower()
        ]
        self._inputs = [t for t in tables.values() if t is not None]
        result = ScanResult(items=[])
        for split, _, word in IDRID_TABLES:
            path = tables[split]
            if path is None:
                result.notes.append(f"no IDRiD {split} grading CSV: split skipped")
                continue
            folders = [
                f for f in grading if word in f.name.lower() and "groundtruth" not in str(f).lower()
            ]
            images: dict[str, list[str]] = {}
            for folder in folders:
                for stem, paths in index_images(folder).items():
                    images.setdefault(stem, []).extend(paths)
            table = read_csv_table(path, IDRID_COLUMNS)
            table = table[table["Image name"].str.strip() != ""]  # trailing empty rows
            result.notes.append(f"{path.name}: {len(table)} rows")
            for row in table.to_dict("records"):
                name = row["Image name"].strip()
                # Both official sets number their images from IDRiD_001: ids carry the set.
                item_id = f"{self.pipeline.name}:{split}-{name}"
                where = f"{path.name} row {name}"
                grade = parse_grade(row["Retinopathy grade"])
                dme = parse_float(row["Risk of macular edema"])
                if grade is None or dme not in (0.0, 1.0, 2.0):
                    self.quarantine(
                        result,
                        item_id,
                        where,
                        f"grade {row['Retinopathy grade']!r} / macular edema risk "
                        f"{row['Risk of macular edema']!r} not readable (expected 0-4 / 0-2)",
                    )
                    continue
                candidates = images.get(name.lower())
                if not candidates:
                    self.quarantine(result, item_id, where, f"no image {name}.jpg for {split}")
                    continue
                dme_text = self.labels_config.get("dme", {}).get(int(dme), "")
                result.items.append(
                    self.item(
                        id=item_id,
                        split=split if split == "test" else self.split_of(name, 0.0),
                        image=ImageRef(pick_image(candidates, self.root)),
                        labels=dme_labels(grade_labels(grade), int(dme)),
                        sections={"grade": f"{self.grade_text(grade)} {dme_text}".strip()},
                        extra={"dr_grade": grade, "dme_risk": int(dme)},
                    )
                )
        return result


# --- Messidor-2 (Krause et al. adjudicated grades) ------------------------------------------


class Messidor2Source(FundusSource):
    """Messidor-2 images with `messidor_data.csv` (Krause et al. adjudicated grades)."""

    def annotated_labels(self) -> list[str]:
        targets = {*TOP, "Diabetic Retinopathy", *GRADE_LABELS, "Diabetic Macular Edema"}
        return _annotated(self.vocab.names, targets)

    def scan(self) -> ScanResult:
        path = find_file(self.root, ("messidor_data.csv",))
        images = index_images(self.root)
        if path is None or not images:
            missing = [] if path else ["messidor_data.csv (image_id, adjudicated_dr_grade, ...)"]
            missing += [] if images else ["the Messidor-2 images (IMAGES/*.png, *.JPG)"]
            raise UserError(f"{self.root}: not a Messidor-2 release; missing " + "; ".join(missing))
        self._inputs = [path]
        table = read_csv_table(path, ("image_id", "adjudicated_dr_grade", "adjudicated_dme"))
        result = ScanResult(items=[], notes=[f"{path.name}: {len(table)} rows"])
        for row in table.to_dict("records"):
            stem = os.path.splitext(row["image_id"].strip())[0]
            item_id = f"{self.pipeline.name}:{stem}"
            where = f"{path.name} row {row['image_id'].strip()}"
            if str(row.get("adjudicated_gradable", "1")).strip() == "0":
                self.quarantine(result, item_id, where, "ungradable (adjudicated_gradable 0)")
                continue
            grade = parse_grade(row["adjudicated_dr_grade"])
            dme = parse_float(row["adjudicated_dme"])
            if grade is None or dme not in (0.0, 1.0):
                self.quarantine(
                    result,
                    item_id,
                    where,
                    f"grade {row['adjudicated_dr_grade']!r} / dme {row['adjudicated_dme']!r} "
                    "not readable (expected 0-4 / 0-1)",
                )
                continue
            candidates = images.get(stem.lower())
            if not candidates:
                self.quarantine(
                    result, item_id, where, f"no image {row['image_id']} in the release"
                )
                continue
            dme_text = self.labels_config.get("dme", {}).get(int(dme), "")
            result.items.append(
                self.item(
                    id=item_id,
                    split=self.split_of(stem),
                    image=ImageRef(pick_image(candidates, self.root)),
                    labels=dme_labels(grade_labels(grade), int(dme)),
                    sections={"grade": f"{self.grade_text(grade)} {dme_text}".strip()},
                    extra={"dr_grade": grade, "dme": int(dme)},
                )
            )
        return result
