"""MIMIC-CXR (reports, DICOM) + MIMIC-CXR-JPG (JPG, metadata, labels, split).

The two releases may sit side by side
(`mimic-cxr/2.0.0/`, `mimic-cxr-jpg/2.0.0/`, also under `physionet.org/files/`) or be merged into
one folder; each is found by its file names. One item per metadata row (image):

- id `mimic_cxr:{dicom_id}`, patient `p{subject_id}`, study `s{study_id}`;
- split from `mimic-cxr-2.0.0-split.csv(.gz)` (`validate` -> `validation`); an image in no split,
  or whose image file is missing, is quarantined with the reason;
- image: `files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg` (`--images jpg`, default) or the MIMIC-CXR
  `.dcm` / `.dcm.gz` (`--images dicom`); `--views PA,AP` keeps only those ViewPositions;
- report: `files/pXX/pSUBJECT/sSTUDY.txt` or the same member of `mimic-cxr-reports.zip` (read in
  place); sectioned by `mgll_data.text.sections`; all non-empty sections go to `item.sections`;
- labels: `--labels chexpert` (default) / `negbio` from the study-level CSVs (1/0/-1, blank = not
  mentioned), or `text` (the project's extractor on the report's conclusion). A study absent from
  the label CSV is mined from its report text when the pipeline's `labels.missing` is `text`
  (restricted to the CSV's 14 labels, so `annotated_labels` stays true), else quarantined;
- `extra.study_order`: the study's rank among the patient's studies by StudyDate + StudyTime
  (0 = first). Dates and times themselves never reach a record (nothing identifying does).
"""

from __future__ import annotations

import math
import re
import zipfile
from pathlib import Path
from typing import get_args

from ..build.items import ImageRef, QuarantineEntry, RawItem
from ..build.pipeline import ImageMode
from ..errors import UserError
from ..storage import open_binary, relative_text
from ..text.labeler import TextLabeler, restrict_labels
from ..text.sections import conclusion, load_official_rules, section_report
from . import archives as safe_zip
from .base import ScanResult, Source
from .tables import read_csv_table
from .toolkit import decode_text, find_file, walk_release

METADATA = "mimic-cxr-2.0.0-metadata.csv"
SPLIT = "mimic-cxr-2.0.0-split.csv"
LABEL_FILES = {"chexpert": "mimic-cxr-2.0.0-chexpert.csv", "negbio": "mimic-cxr-2.0.0-negbio.csv"}
RECORD_LIST = "cxr-record-list.csv"
REPORTS_ZIP = "mimic-cxr-reports.zip"
SPLIT_NAMES = {
    "train": "train",
    "validate": "validation",
    "validation": "validation",
    "test": "test",
}
LABEL_VALUES = {"1.0": 1.0, "1": 1.0, "0.0": 0.0, "0": 0.0, "-1.0": -1.0, "-1": -1.0}
IMAGE_MODES = get_args(ImageMode)
LABEL_MODES = ("chexpert", "negbio", "text")  # `mesh` is IU X-ray's
_MAX_DEPTH = 5


def parse_study_time(raw: str) -> float | None:
    """DICOM TM as MIMIC writes it (`93412.123` for 09:34:12.123, leading zero lost) -> seconds."""
    raw = str(raw).strip()
    match = re.fullmatch(r"(\d{1,6})(?:\.(\d+))?", raw)
    if not match:
        return None
    whole = match.group(1).zfill(6)
    hours, minutes, seconds = int(whole[:2]), int(whole[2:4]), int(whole[4:6])
    if hours > 23 or minutes > 59 or seconds > 60:
        return None
    fraction = float(f"0.{match.group(2)}") if match.group(2) else 0.0
    return hours * 3600 + minutes * 60 + seconds + fraction


def _study_key(date: str, time: str) -> tuple[str, float]:
    seconds = parse_study_time(time)
    return (str(date).strip(), seconds if seconds is not None else math.inf)


def _is_data_tree(folder: Path) -> bool:
    """A release's `files/` folder of `pXX` groups (huge: never walked). PhysioNet's own
    `physionet.org/files/` above the releases is not one."""
    if folder.name != "files":
        return False
    try:
        return any(re.fullmatch(r"p\d\d", entry.name) for entry in folder.iterdir())
    except OSError:  # unreadable: os.walk would skip it too
        return True


def _find(root: Path, name: str) -> Path | None:
    """`name` or `name.gz` under root (the release folders, not their `files/` trees)."""
    return find_file(root, (name,), max_depth=_MAX_DEPTH, skip_dir=_is_data_tree)


def _report_roots(root: Path) -> list[Path]:
    """Every folder under root that holds a `files/pXX` tree, where `files/pXX/pSUBJECT/
    sSTUDY.txt` reports may be (the trees themselves are never walked)."""
    found: list[Path] = []

    def data_tree(folder: Path) -> bool:
        if _is_data_tree(folder):
            found.append(folder.parent)
            return True
        return False

    for _ in walk_release(root, max_depth=_MAX_DEPTH, skip_dir=data_tree):
        pass
    return sorted(set(found))


def _group(subject: str) -> str:
    return f"p{subject[:2]}"


class MimicCxrSource(Source):
    """Reads MIMIC-CXR-JPG's CSVs with images from either release and reports from MIMIC-CXR."""

    OPTIONS = frozenset({"images", "views", "labels", "section_rules"})

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        defaults = self.pipeline.options
        self.image_mode = str(self.options.get("images", defaults.images)).lower()
        self.label_mode = str(self.options.get("labels", defaults.labels)).lower()
        views = self.options.get("views", defaults.views) or ""
        if isinstance(views, list | tuple):
            views = ",".join(views)
        self.views = {v.strip().upper() for v in str(views).split(",") if v.strip()} or None
        if self.image_mode not in IMAGE_MODES:
            raise UserError(f"--images {self.image_mode!r}: expected one of {list(IMAGE_MODES)}")
        if self.label_mode not in LABEL_MODES:
            raise UserError(f"--labels {self.label_mode!r}: expected one of {list(LABEL_MODES)}")
        labels = self.pipeline.labels
        self.label_map = labels.map
        self.missing_policy = labels.missing
        self.text_sections = labels.text_sections
        sections = self.pipeline.sections
        # copies: the official rules are merged into them below
        self.special_indices = dict(sections.special_indices)
        self.special_names = dict(sections.special_section_names)
        self.section_rules = self._section_rules_path(sections.official_rules)
        if self.section_rules is not None:
            official_indices, official_names = load_official_rules(self.section_rules)
            # the pipeline's own entries win over the official ones, whichever table they are in
            own = set(self.special_indices) | set(self.special_names)
            self.special_indices |= {k: v for k, v in official_indices.items() if k not in own}
            self.special_names |= {k: v for k, v in official_names.items() if k not in own}
        self.metadata = _find(self.root, METADATA)
        self.split_file = _find(self.root, SPLIT)
        self.label_file = (
            _find(self.root, LABEL_FILES[self.label_mode]) if self.label_mode != "text" else None
        )
        self.record_list = _find(self.root, RECORD_LIST)
        self.reports_zip = _find(self.root, REPORTS_ZIP)
        self._labeler: TextLabeler | None = None

    # -- interface --------------------------------------------------------------------------
    def input_files(self) -> list[Path]:
        """The metadata files found in the release (for the build fingerprint)."""
        files = [self.metadata, self.split_file, self.label_file, self.record_list]
        files += [self.reports_zip, self.section_rules]
        return [f for f in files if f is not None]

    def annotated_labels(self) -> list[str]:
        if self.label_mode == "text":
            return self.vocab.names
        return super().annotated_labels()

    def scan(self) -> ScanResult:
        self._check_layout()
        assert self.metadata is not None and self.split_file is not None
        jpg_root = self.metadata.parent
        dicom_root = self._dicom_root()
        meta = read_csv_table(self.metadata, ("dicom_id", "subject_id", "study_id"))
        split_table = read_csv_table(self.split_file, ("dicom_id", "split"))
        splits = {r["dicom_id"].strip(): r["split"].strip() for r in split_table.to_dict("records")}
        csv_labels = self._read_labels()
        order = self._study_order(meta)
        # The releases' own folders first, then any other folder holding a `files/pXX` tree.
        roots = [p for p in (dicom_root, jpg_root) if p] + _report_roots(self.root)
        reports = _ReportReader(self.reports_zip, roots)
        result = ScanResult(
            items=[], notes=[self._describe(len(meta), reports)], inputs=self.input_files()
        )
        filtered = 0
        mined = 0
        sectioned_cache: dict[str, tuple] = {}
        for row in meta.to_dict("records"):
            dicom_id = row["dicom_id"].strip()
            subject = row["subject_id"].strip()
            study = row["study_id"].strip()
            item_id = f"{self.pipeline.name}:{dicom_id}"
            where = f"{self.metadata.name} row {dicom_id}"
            view = str(row.get("ViewPosition", "")).strip().upper() or None
            if self.views is not None and view not in self.views:
                filtered += 1
                continue
            split = SPLIT_NAMES.get(splits.get(dicom_id, "").lower())
            if split is None:
                reason = self._no_split(dicom_id, splits)
                result.quarantine.append(QuarantineEntry(item_id, where, "scan", reason))
                continue
            folder = f"files/{_group(subject)}/p{subject}/s{study}"
            image = self._image(jpg_root, dicom_root, folder, dicom_id)
            if isinstance(image, str):
                result.quarantine.append(QuarantineEntry(item_id, where, "scan", image))
                continue
            if study not in sectioned_cache:
                sectioned_cache[study] = self._report(reports, subject, study)
            sections, report_note = sectioned_cache[study]
            labels, labels_from = self._labels(study, csv_labels, sections)
            if isinstance(labels, QuarantineEntry):
                result.quarantine.append(
                    QuarantineEntry(item_id, where, labels.stage, labels.reason)
                )
                continue
            mined += labels_from == "text"
            extra = _extra(row, labels_from, report_note, order.get(study), sections)
            result.items.append(
                RawItem(
                    id=item_id,
                    source=self.pipeline.name,
                    split=split,
                    image=image,
                    labels=labels,
                    patient_id=f"p{subject}",
                    study_id=f"s{study}",
                    view=view,
                    modality="DX",
                    sections=sections,
                    extra=extra,
                )
            )
        if filtered:
            result.notes.append(f"--views {','.join(sorted(self.views or ()))}: {filtered} skipped")
        if mined and self.label_mode != "text":
            result.notes.append(f"{mined} images of studies absent from the label CSV: text labels")
        result.notes += self._report_notes(reports, sectioned_cache)
        return result

    # -- pieces -----------------------------------------------------------------------------
    def _describe(self, images: int, reports: _ReportReader) -> str:
        """The scan's first note: how many images, and which release each part comes from."""
        assert self.metadata is not None
        return (
            f"{self.metadata.name}: {images} images; images from "
            f"{'MIMIC-CXR DICOM' if self.image_mode == 'dicom' else 'MIMIC-CXR-JPG'}; labels "
            f"{self.label_mode}"
            + (f" ({self.label_file.name})" if self.label_file else "")
            + f"; reports {reports.describe(self.root)}"
        )

    def _report_notes(self, reports: _ReportReader, sectioned: dict[str, tuple]) -> list[str]:
        """How many studies had a report; a warning when most had none. With `--labels text`
        and no report at all, a UserError naming where reports were looked for."""
        found = sum(note != "missing" for _, note in sectioned.values())
        if self.label_mode == "text" and sectioned and not found:
            raise UserError(
                f"{self.root}: --labels text needs report texts, and no study has one; looked "
                f"for {reports.describe(self.root)}"
            )
        notes = [f"reports found for {found} of {len(sectioned)} studies"]
        if reports.refused:
            notes.append(
                f"{reports.refused} report files over {MAX_REPORT_BYTES // 2**20} MiB or "
                "unreadable were skipped: their studies count as having no report"
            )
        if found * 2 < len(sectioned):
            notes.append(
                f"WARNING: most studies have no report ({len(sectioned) - found} of "
                f"{len(sectioned)}); their descriptions and explanations come from label "
                f"templates. Looked for {reports.describe(self.root)}"
            )
        return notes

    def _no_split(self, dicom_id: str, splits: dict[str, str]) -> str:
        """Why an image has no split: absent from the split CSV, or an unknown split name."""
        assert self.split_file is not None
        if dicom_id not in splits:
            return f"in no split of {self.split_file.name}"
        return f"unknown split {splits[dicom_id]!r}"

    def _section_rules_path(self, from_pipeline: str | None) -> Path | None:
        """`--section-rules` (relative to the working directory) or the pipeline's
        `sections.official_rules` (relative to the pipeline file)."""
        if self.options.get("section_rules"):
            return Path(self.options["section_rules"]).expanduser()
        if not from_pipeline:
            return None
        path = Path(from_pipeline).expanduser()
        return path if path.is_absolute() else Path(self.pipeline.path).parent / path

    def _check_layout(self) -> None:
        missing = []
        if self.metadata is None:
            missing.append(f"{METADATA}(.gz) (MIMIC-CXR-JPG)")
        if self.split_file is None:
            missing.append(f"{SPLIT}(.gz) (MIMIC-CXR-JPG)")
        if self.label_mode != "text" and self.label_file is None:
            missing.append(f"{LABEL_FILES[self.label_mode]}(.gz) (MIMIC-CXR-JPG; or --labels text)")
        if self.image_mode == "dicom" and self._dicom_root() is None:
            missing.append(f"the MIMIC-CXR release ({RECORD_LIST}.gz or {REPORTS_ZIP}) for DICOM")
        if missing:
            raise UserError(
                f"{self.root}: not a MIMIC-CXR(-JPG) release; missing " + "; ".join(missing)
            )

    def _dicom_root(self) -> Path | None:
        for found in (self.record_list, self.reports_zip):
            if found is not None:
                return found.parent
        return None

    def _image(self, jpg_root: Path, dicom_root: Path | None, folder: str, dicom_id: str):
        if self.image_mode == "jpg":
            path = jpg_root / folder / f"{dicom_id}.jpg"
            return (
                ImageRef(str(path)) if path.is_file() else f"image missing: {folder}/{dicom_id}.jpg"
            )
        assert dicom_root is not None
        for suffix in (".dcm", ".dcm.gz"):
            path = dicom_root / folder / f"{dicom_id}{suffix}"
            if path.is_file():
                return ImageRef(str(path), format="dicom")
        return f"image missing: {folder}/{dicom_id}.dcm (or .dcm.gz)"

    def _report(self, reports: _ReportReader, subject: str, study: str):
        member = f"files/{_group(subject)}/p{subject}/s{study}.txt"
        text = reports.read(member)
        if text is None:
            return {}, "missing"
        sectioned = section_report(text, f"s{study}", self.special_indices, self.special_names)
        return sectioned.sections, sectioned.special_case or "sectioned"

    def _labels(self, study: str, csv_labels: dict[str, dict[str, float]] | None, sections):
        if csv_labels is not None and study in csv_labels:
            return csv_labels[study], self.label_mode
        if csv_labels is not None and self.missing_policy != "text":
            return QuarantineEntry(
                "", "", "labels", f"study s{study} absent from {self.label_file.name}"
            ), ""
        if not sections:
            return QuarantineEntry(
                "", "", "labels", f"study s{study}: no report text to mine labels from"
            ), ""
        text = conclusion_text(sections, self.text_sections)
        # CheXpert on an empty conclusion (a report that states no findings): only No Finding.
        labels = self.labeler().label(text) if text else {"No Finding": 1.0}
        if csv_labels is not None:  # a fallback asserts only what the CSV would have
            labels = restrict_labels(labels, set(self.label_map.values()))
        return labels, "text"

    def labeler(self) -> TextLabeler:
        if self._labeler is None:
            model = self.pipeline.labels.text_model
            self._labeler = TextLabeler(self.vocab, model=model)
        return self._labeler

    def _read_labels(self) -> dict[str, dict[str, float]] | None:
        if self.label_file is None:
            return None
        names = list(self.label_map)
        table = read_csv_table(self.label_file, ("study_id", *names))
        labels: dict[str, dict[str, float]] = {}
        for row in table.to_dict("records"):
            values: dict[str, float] = {}
            for name in names:
                raw = str(row[name]).strip()
                if raw == "" or raw.lower() == "nan":
                    continue
                if raw not in LABEL_VALUES:
                    raise UserError(
                        f"{self.label_file}: study {row['study_id']} has {name}={raw!r}; "
                        "expected 1.0, 0.0, -1.0 or blank"
                    )
                values[self.label_map[name]] = LABEL_VALUES[raw]
            labels[str(row["study_id"]).strip()] = values
        return labels

    @staticmethod
    def _study_order(meta) -> dict[str, int]:
        """Each study's rank among its patient's studies by StudyDate + StudyTime."""
        if "StudyDate" not in meta.columns:
            return {}
        keys: dict[str, dict[str, tuple]] = {}
        for row in meta.to_dict("records"):
            study = row["study_id"].strip()
            key = (*_study_key(row["StudyDate"], row.get("StudyTime", "")), study)
            patient = keys.setdefault(row["subject_id"].strip(), {})
            patient[study] = min(patient.get(study, key), key)
        order = {}
        for studies in keys.values():
            for rank, study in enumerate(sorted(studies, key=studies.__getitem__)):
                order[study] = rank
        return order


# Metadata columns kept in `extra` when not blank, under these keys.
EXTRA_COLUMNS = (
    ("PerformedProcedureStepDescription", "procedure"),
    ("ViewCodeSequence_CodeMeaning", "view_code"),
    ("PatientOrientationCodeSequence_CodeMeaning", "patient_orientation"),
)


def _extra(
    row: dict[str, str],
    labels_from: str,
    report_note: str,
    study_order: int | None,
    sections: dict[str, str],
) -> dict:
    """An image's `extra`: where its labels and report came from, its study's rank, metadata."""
    extra: dict = {"labels_from": labels_from, "report": report_note}
    if study_order is not None:
        extra["study_order"] = study_order
    for column, key in EXTRA_COLUMNS:
        value = str(row.get(column, "")).strip()
        if value:
            extra[key] = value
    if sections:
        extra["report_sections"] = sorted(sections)
    return extra


def conclusion_text(sections: dict[str, str], order: tuple[str, ...] = ()) -> str:
    """The text labels are mined from: the conclusion (as the official CSVs were made)."""
    from ..text.sections import Sectioned

    return conclusion(Sectioned(sections=sections), order)[0]


# A radiology report is a few kilobytes: a larger report file is not one (or a zip bomb).
MAX_REPORT_BYTES = 2**20
_REPORT_LIMITS = safe_zip.ZipLimits(max_member_bytes=MAX_REPORT_BYTES)


class _ReportReader:
    """Reports from `files/.../sSTUDY.txt` on disk, else from `mimic-cxr-reports.zip`."""

    def __init__(self, zip_path: Path | None, roots: list[Path]):
        self.roots = list(dict.fromkeys(roots))
        self.zip_path = zip_path
        self._zip: zipfile.ZipFile | None = None
        self._members: dict[str, str] = {}
        self.refused = 0
        if zip_path is not None:
            try:
                # Read in place (on object storage: the remote file, never copied whole); the
                # file stays open while the scan reads reports from it.
                self._zip = zipfile.ZipFile(open_binary(zip_path))
            except (zipfile.BadZipFile, OSError) as err:
                raise UserError(f"{zip_path}: not a readable zip ({err})") from err
            for name in self._zip.namelist():
                index = name.find("files/")
                if index >= 0 and name.endswith(".txt"):
                    self._members[name[index:]] = name

    def describe(self, release_root: Path) -> str:
        """Where reports are read from: the folders searched (below `release_root`: outputs
        never name the machine's folders or the bucket), and the zip if there is one."""
        shown = [relative_text(r, release_root) or "the release folder" for r in self.roots]
        folders = ", ".join(shown) or "no folder with a files/pXX tree"
        where = f"files/pXX/pSUBJECT/sSTUDY.txt under {folders}"
        if self.zip_path is None:
            return f"{where} (no {REPORTS_ZIP} found)"
        return f"{where} and in {self.zip_path.name} ({len(self._members)} reports)"

    def read(self, member: str) -> str | None:
        """The report's text; None when there is none, or when it is over `MAX_REPORT_BYTES`
        or unreadable (a bomb in the zip): counted in `refused`, the study has no report."""
        for root in self.roots:
            path = root / member
            if path.is_file():
                with open_binary(path) as file:
                    data = file.read(MAX_REPORT_BYTES + 1)
                return self._text(data if len(data) <= MAX_REPORT_BYTES else None)
        if self._zip is not None and member in self._members:
            info = self._zip.getinfo(self._members[member])
            try:
                return self._text(safe_zip.read_member(self._zip, info, _REPORT_LIMITS))
            except safe_zip.MemberError:
                return self._text(None)
        return None

    def _text(self, data: bytes | None) -> str | None:
        """The report's text; None for a refused one, counted in `refused`."""
        if data is None:
            self.refused += 1
            return None
        return decode_text(data)
