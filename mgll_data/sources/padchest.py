"""PadChest (BIMCV): one labels CSV, 16-bit PNGs in numbered folders or in `<n>.zip` archives.

Layout: `PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv` (or `.csv.gz`) beside the image
folders `0/` … `54/` (extracted) or the archives `0.zip` … `54.zip` as downloaded; a row's image
is `<ImageDir>/<ImageID>`, found in the folder (at any depth) or as a member of the zip with
that base name. Zips are read in place through the capped reader (`archives.py`).

Each row is one image of a study. Its `Labels` (findings and differential diagnoses, in
English), `Localizations` and `LabelsLocalizationsBySentence` are Python list literals, read
by `padchest_cells.py`; a cell that is not one quarantines the image. Labels map to the
vocabulary through `labels.map`; the targets a row does not list are asserted absent (0), as
the labelling covers every finding the report names, except in rows marked `unchanged` or
`exclude`, whose reports do not list their findings (those stay NaN). A row whose `Labels`
names nothing (`nan` or `['']`, 880 rows of the real file) is quarantined. Every label, mapped
or not, is kept in `extra.padchest_labels`, the localizations and the labels by sentence beside
it, with `MethodLabel` (Physician or RNN_model) and the Spanish report (`report_es`, stemmed, as
released; never translated). `labels.method: physician` keeps only physician-labelled rows;
`--views` (or `options.views`) keeps the named projections: PA, AP (also AP_horizontal,
the supine AP), LATERAL, COSTAL.

Texts: the category from the mapped labels, the description written from the labels and
localizations of each report sentence, the explanation from the vocabulary. Splits: a salted
SHA-256 of `PatientID`.
"""

from __future__ import annotations

import re
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from ..build.items import ImageRef, QuarantineEntry, RawItem
from ..build.stages import Task
from ..errors import ItemError, UserError
from ..imaging.files import open_release_file
from ..storage import lexists
from . import archives as safe_zip
from .base import ScanResult, Source
from .padchest_cells import CellError, describe_sentences, sentence_lists, string_list
from .splits import hash_split
from .tables import read_csv_table
from .toolkit import find_file, release_files

CSV_NAMES = ("PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv",)
REQUIRED_COLUMNS = (
    "ImageID", "ImageDir", "StudyID", "PatientID", "Projection", "MethodLabel", "Report",
    "Labels", "Localizations", "LabelsLocalizationsBySentence",
)  # fmt: skip
METADATA_COLUMNS = ("PatientSex_DICOM", "Modality_DICOM", "PatientBirth", "StudyDate_DICOM")
SENTENCES_SECTION = "labels_by_sentence"  # the item section the description is read from
# Rows marked so do not list their findings: unlisted labels stay NaN rather than 0.
NOT_EXHAUSTIVE = frozenset({"unchanged", "exclude"})
# `Projection` -> the record's view; AP_horizontal is an AP film taken supine.
VIEWS = {"PA": "PA", "AP": "AP", "AP_HORIZONTAL": "AP", "L": "LATERAL", "COSTAL": "COSTAL"}
MAX_REPORT_CHARS = 10_000  # the longest real report is 825 characters
_IMAGE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\.png", re.IGNORECASE)
_IMAGE_DIR = re.compile(r"\d{1,4}")
ZIP_LIMITS = safe_zip.ZipLimits()


class PadchestSource(Source):
    """Reads the PadChest labels CSV and the images in numbered folders or zips beside it."""

    OPTIONS = frozenset({"views"})

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.label_map = self.required_label_map()
        self.table = find_file(self.root, CSV_NAMES, max_depth=1)
        views = self.options.get("views", self.pipeline.options.views) or ""
        if isinstance(views, list | tuple):
            views = ",".join(views)
        self.views = {v.strip().upper() for v in str(views).split(",") if v.strip()} or None

    def scan(self) -> ScanResult:
        if self.table is None:
            raise UserError(
                f"{self.root}: not a PadChest release; expected {CSV_NAMES[0]} (or .csv.gz) "
                "beside the image folders 0/ … 54/ or the archives 0.zip … 54.zip"
            )
        table = read_csv_table(self.table, REQUIRED_COLUMNS)
        columns = [c for c in REQUIRED_COLUMNS + METADATA_COLUMNS if c in table.columns]
        rows = [dict(zip(columns, values, strict=True)) for values in table[columns].values]
        images = _ImageIndex(self.root, {str(row["ImageDir"]).strip() for row in rows})
        result = ScanResult(items=[], inputs=[self.table], archives=images.zips)
        skipped: Counter[str] = Counter()
        cells: dict[tuple[str, str], object] = {}  # distinct cells are parsed once
        for row_number, row in zip(table.index, rows, strict=True):
            reason = self._skip(row)
            if reason:
                skipped[reason] += 1
                continue
            outcome = self._row(row, row_number, images, cells)
            if isinstance(outcome, QuarantineEntry):
                result.quarantine.append(outcome)
            else:
                result.items.append(outcome)
        result.notes += self._notes(len(rows), skipped, images, result)
        return result

    def _skip(self, row: dict[str, str]) -> str | None:
        """Why a row is left out by the pipeline's choices (method, views), or None."""
        method = self.pipeline.labels.method
        if method == "physician" and str(row["MethodLabel"]).strip() != "Physician":
            return "labels.method physician: RNN_model-labelled rows left out"
        if self.views is not None and _view(row) not in self.views:
            return f"--views {','.join(sorted(self.views))}: other projections left out"
        return None

    def _row(
        self, row: dict[str, str], row_number: int, images: _ImageIndex, cells: dict
    ) -> RawItem | QuarantineEntry:
        """The row's item, or the quarantine entry saying why it has none."""
        image_id, image_dir = str(row["ImageID"]).strip(), str(row["ImageDir"]).strip()
        assert self.table is not None
        where = f"{self.table.name} row {row_number}"
        if not (_IMAGE_ID.fullmatch(image_id) and _IMAGE_DIR.fullmatch(image_dir)):
            item_id = f"{self.pipeline.name}:row-{row_number}"
            reason = "ImageID is not a .png file name, or ImageDir not a folder number"
            return QuarantineEntry(item_id, where, "scan", reason)
        item_id = f"{self.pipeline.name}:{image_id[:-4]}"
        try:
            found = _cached(cells, row, "Labels", string_list)
            places = _cached(cells, row, "Localizations", string_list)
            sentences = _cached(cells, row, "LabelsLocalizationsBySentence", sentence_lists)
            report = _report(row)
        except CellError as err:
            return QuarantineEntry(item_id, where, "labels", err.reason)
        if not found:
            reason = "Labels names no finding (nan or [''] in the release)"
            return QuarantineEntry(item_id, where, "labels", reason)
        image = images.locate(image_dir, image_id)
        if image is None:
            reason = "image not found: neither its ImageDir folder nor <ImageDir>.zip holds it"
            return QuarantineEntry(item_id, f"{image_dir}/{image_id}", "scan", reason)
        patient = str(row["PatientID"]).strip()
        splits = self.pipeline.splits
        return RawItem(
            id=item_id,
            source=self.pipeline.name,
            split=hash_split(
                patient, splits.hash_salt, splits.validation_fraction, splits.test_fraction
            ),
            image=image,
            labels=self._labels(found),
            patient_id=patient,
            study_id=str(row["StudyID"]).strip() or None,
            view=_view(row),
            modality=str(row.get("Modality_DICOM", "")).strip().upper() or None,
            age_years=_age(row),
            sex={"M": "M", "F": "F"}.get(str(row.get("PatientSex_DICOM", "")).strip().upper()),
            sections={SENTENCES_SECTION: describe_sentences(sentences)},
            extra={
                "padchest_labels": list(found),
                "padchest_localizations": list(places),
                "padchest_labels_by_sentence": [list(s) for s in sentences],
                "method_label": str(row["MethodLabel"]).strip(),
                "projection": str(row["Projection"]).strip(),
                "report_es": report,
            },
        )

    def _labels(self, found: Sequence[str]) -> dict[str, float]:
        """1 for each target a label maps to; 0 for the other targets unless the row is marked
        as not listing its findings (`NOT_EXHAUSTIVE`), where they stay NaN (absent)."""
        exhaustive = not NOT_EXHAUSTIVE.intersection(found)
        labels = dict.fromkeys(self.label_map.values(), 0.0) if exhaustive else {}
        for name in found:
            if name in self.label_map:
                labels[self.label_map[name]] = 1.0
        return labels

    def _notes(
        self, total: int, skipped: Counter, images: _ImageIndex, result: ScanResult
    ) -> list[str]:
        """Facts for the summary: rows, layout, rows left out, labels without a vocabulary home."""
        assert self.table is not None
        notes = [
            f"{self.table.name}: {total} rows; images in {len(images.folders)} folders and "
            f"{len(images.zips)} zip archives",
            *images.problems,
            *(f"{reason}: {n}" for reason, n in sorted(skipped.items())),
        ]
        unmapped = Counter(
            name
            for item in result.items
            for name in item.extra["padchest_labels"]
            if name not in self.label_map
        )
        if unmapped:
            counts = ", ".join(f"{name} {n}" for name, n in sorted(unmapped.items()))
            notes.append(
                f"labels mapped to no vocabulary label, kept in extra.padchest_labels "
                f"(images): {counts}"
            )
        return notes

    def tasks(
        self, planned: list[tuple[tuple[str, int], RawItem]], archives: Sequence[Path] = ()
    ) -> Iterator[Task]:
        """Plain files first, in order; then each zip opened once and its members read under
        the caps (a member over a cap or unreadable is a Task with the reason)."""
        by_zip: dict[str, list[tuple[tuple[str, int], RawItem]]] = {}
        for pos, item in planned:
            if item.image.member is None:
                yield Task(pos, item)
            else:
                by_zip.setdefault(item.image.path, []).append((pos, item))
        for path, wanted in sorted(by_zip.items()):
            try:
                with open_release_file(path, self.root, what="zip archive") as handle:
                    with zipfile.ZipFile(handle) as archive:
                        for pos, item in wanted:
                            yield _member_task(archive, pos, item)
            except (ItemError, zipfile.BadZipFile, OSError) as err:
                reason = err.reason if isinstance(err, ItemError) else f"zip unreadable ({err})"
                for pos, item in wanted:
                    yield Task(pos, item, error=reason)


def _member_task(archive: zipfile.ZipFile, pos: tuple[str, int], item: RawItem) -> Task:
    """The Task of one zip member: its bytes, or the reason they could not be read."""
    assert item.image.member is not None
    try:
        data = safe_zip.read_chain(archive, (item.image.member,), ZIP_LIMITS)
    except safe_zip.MemberError as err:
        return Task(pos, item, error=err.reason)
    return Task(pos, item, image_bytes=data)


class _ImageIndex:
    """Where each image of the named folders is: a file under `<n>/`, or a member of `<n>.zip`."""

    def __init__(self, root: Path, dirs: set[str]):
        self.root = root
        self.folders: dict[str, dict[str, str]] = {}  # dir -> {file name: path}
        self.members: dict[str, tuple[Path, dict[str, str]]] = {}  # dir -> (zip, {name: member})
        self.zips: list[Path] = []
        self.problems: list[str] = []
        for name in sorted(d for d in dirs if _IMAGE_DIR.fullmatch(d)):
            folder = root / name
            if folder.is_dir() and not folder.is_symlink():
                found: dict[str, str] = {}
                for path in release_files(folder):
                    found.setdefault(path.name, str(path))
                self.folders[name] = found
            archive = root / f"{name}.zip"
            if lexists(archive):
                self._index_zip(name, archive)

    def _index_zip(self, name: str, path: Path) -> None:
        """List a zip's members by base name (its directory only; nothing is inflated)."""
        try:
            with open_release_file(path, self.root, what="zip archive") as handle:
                with zipfile.ZipFile(handle) as archive:
                    names = {}
                    for info in safe_zip.members(archive):
                        names.setdefault(info.filename.rsplit("/", 1)[-1], info.filename)
        except (ItemError, zipfile.BadZipFile, OSError) as err:
            why = err.reason if isinstance(err, ItemError) else str(err)
            self.problems.append(f"{path.name} unreadable, its images count as missing ({why})")
            return
        self.members[name] = (path, names)
        self.zips.append(path)

    def locate(self, image_dir: str, image_id: str) -> ImageRef | None:
        """The image's file or zip member, or None when neither holds it."""
        path = self.folders.get(image_dir, {}).get(image_id)
        if path is not None:
            return ImageRef(path)
        archive, names = self.members.get(image_dir, (None, {}))
        member = names.get(image_id)
        return ImageRef(str(archive), member) if member is not None else None


def _cached(
    cells: dict, row: dict[str, str], column: str, parse: Callable[[str, str], tuple]
) -> tuple:
    """`parse(row[column])`, each distinct cell parsed once per scan (a CellError is kept too)."""
    key = (column, str(row[column]))
    if key not in cells:
        try:
            cells[key] = parse(key[1], column)
        except CellError as err:
            cells[key] = err
    value = cells[key]
    if isinstance(value, CellError):
        raise value
    return value


def _report(row: dict[str, str]) -> str:
    """The Spanish report as released (stemmed), on one line; CellError when absurdly long."""
    text = " ".join(str(row["Report"]).split())
    if len(text) > MAX_REPORT_CHARS:
        raise CellError(f"Report cell is {len(text):,} characters (over {MAX_REPORT_CHARS:,})")
    return text


def _view(row: dict[str, str]) -> str | None:
    """PA, AP (AP_horizontal too), LATERAL or COSTAL; None for EXCLUDE, UNK and blanks."""
    return VIEWS.get(str(row["Projection"]).strip().upper())


def _age(row: dict[str, str]) -> float | None:
    """Study year minus birth year (the release gives only the year of birth: within a year)."""
    birth = str(row.get("PatientBirth", "")).strip().removesuffix(".0")
    year = str(row.get("StudyDate_DICOM", "")).strip()[:4]
    if not (birth.isdigit() and year.isdigit()):
        return None
    age = int(year) - int(birth)
    return float(age) if 0 <= age <= 120 else None
