"""Indiana University chest X-ray collection (Open-i `NLMCXR`): reports, PNGs, DICOM headers.

Layouts, found anywhere under the root:

- reports: `NLMCXR_reports.tgz` (streamed, never extracted) or its extracted `ecgen-radiology/`
  folder of `<n>.xml`: COMPARISON / INDICATION / FINDINGS / IMPRESSION as
  `<AbstractText Label=...>`, the manual MeSH headings as `<MeSH><major>`, and one
  `<parentImage id="CXR1_1_IM-0001-3001">` per image;
- images: `NLMCXR_png.tgz` (read in one sequential pass) or the extracted `<id>.png` files;
- `nlmcxr_dicom_metadata.csv(.gz)` (optional, shipped by torchxrayvision): per-image DICOM
  header fields, of which only `METADATA_FIELDS` are ever kept (it also holds birth dates,
  accession numbers and study dates, which must never reach a record).

One item per image a report names: id `iu_xray:<image id>`; the report (`CXR<n>`) is the patient
and the study, and the unit of the hash split, so all its images share a split. Labels:
`--labels mesh` (default) maps each MeSH major heading's first part through the pipeline's
`labels.map` (an indexed report asserts 0 for every mapped label it lacks; `normal` is No
Finding, unless a mapped finding is present), `--labels text` runs the report labeler on
FINDINGS + IMPRESSION. The de-identification token `XXXX` is replaced by `___` (MIMIC-CXR's
token) in every section, so no text reads it as a word.
"""

from __future__ import annotations

import re
import tarfile
import xml.etree.ElementTree as ET
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..build.items import ImageRef, QuarantineEntry, RawItem
from ..errors import ItemError, UserError
from ..imaging.files import open_release_file
from ..safe_names import SAFE_COMPONENT
from ..storage import child, open_binary
from ..text.labeler import NO_FINDING, TextLabeler
from .base import ScanResult, Source
from .splits import hash_split
from .tables import read_csv_table
from .toolkit import find_file, index_images, release_files, walk_release

REPORTS_ARCHIVE = "NLMCXR_reports.tgz"
REPORTS_FOLDER = "ecgen-radiology"
IMAGES_ARCHIVE = re.compile(r"^NLMCXR_png\.(tgz|tar\.gz|tar)$", re.IGNORECASE)
METADATA = "nlmcxr_dicom_metadata.csv"
REPORT_NAME = re.compile(r"(?:^|/)(\d+)\.xml$")
LABEL_MODES = ("mesh", "text")
NO_INDEXING = "No Indexing"  # MeSH's "not indexed": the report asserts no label
NORMAL = "normal"
# A real report is a few KB; anything far larger is not one (and is never held in memory).
MAX_REPORT_BYTES = 1 << 20
# The metadata columns kept, and where each goes; every other column is dropped on reading.
METADATA_FIELDS = {
    "View Position": "view",
    "Modality": "modality",
    "Patient Orientation": "patient_orientation",
    "Code Meaning": "procedure",
}
DEID_TOKEN = re.compile(r"X{3,}(?:\s+X{3,})*")
DEID_PLACEHOLDER = "___"


@dataclass(frozen=True)
class Report:
    """One parsed report: its number, cleaned sections, MeSH major headings, image ids."""

    number: int
    sections: dict[str, str]
    majors: tuple[str, ...]
    images: tuple[str, ...]

    @property
    def id(self) -> str:
        return f"CXR{self.number}"


def clean_text(text: str | None) -> str:
    """Whitespace collapsed; each run of `XXXX` de-identification tokens becomes `___`."""
    return DEID_TOKEN.sub(DEID_PLACEHOLDER, " ".join(str(text or "").split()))


def parse_report(number: int, data: bytes) -> Report:
    """A report's XML as a `Report`; raises ValueError (ET.ParseError) when it is not one."""
    root = ET.fromstring(data)  # expat refuses entity-expansion bombs; no external entities
    if root.tag != "eCitation":
        raise ValueError(f"root element <{root.tag}>, expected <eCitation>")
    sections = {}
    for node in root.iter("AbstractText"):
        text = clean_text(node.text)
        if text:
            sections[(node.get("Label") or "").strip().lower()] = text
    majors = tuple((node.text or "").split("/")[0].strip() for node in root.iter("major"))
    images = tuple((node.get("id") or "").strip() for node in root.iter("parentImage"))
    return Report(number, sections, tuple(m for m in majors if m), images)


def mesh_labels(report: Report, label_map: dict[str, str]) -> tuple[dict[str, float], list[str]]:
    """Labels from the MeSH major headings, and the headings that map to nothing.

    MeSH codes presence only, and indexers code every finding, so an indexed report asserts 0 for
    every mapped label it lacks. `normal` ("nothing to index") is No Finding, unless a mapped
    finding is there too.
    """
    labels = {target: 0.0 for target in label_map.values()}
    unmapped = [h for h in report.majors if h not in label_map]
    findings = {label_map[h] for h in report.majors if h in label_map and h != NORMAL}
    findings.discard(NO_FINDING)
    labels.update(dict.fromkeys(findings, 1.0))
    if NO_FINDING in labels:
        labels[NO_FINDING] = 1.0 if NORMAL in report.majors and not findings else 0.0
    return labels, unmapped


class IuXraySource(Source):
    """Reads the IU collection as Open-i distributes it (archives or extracted)."""

    OPTIONS = frozenset({"labels"})

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.label_mode = str(self.options.get("labels", self.pipeline.options.labels)).lower()
        if self.label_mode not in LABEL_MODES:
            raise UserError(f"--labels {self.label_mode!r}: expected one of {list(LABEL_MODES)}")
        self.label_map = self.required_label_map() if self.label_mode == "mesh" else {}
        self.reports_archive = find_file(self.root, (REPORTS_ARCHIVE,))
        self.reports_folder = None if self.reports_archive else _find_folder(self.root)
        self.metadata = find_file(self.root, (METADATA,))
        self._labeler: TextLabeler | None = None

    def input_files(self) -> list[Path]:
        """The reports archive and the metadata table (for the build fingerprint)."""
        return [f for f in (self.reports_archive, self.metadata) if f is not None]

    def annotated_labels(self) -> list[str]:
        if self.label_mode == "text":
            return self.vocab.names
        return super().annotated_labels()

    def scan(self) -> ScanResult:
        files, archives = self._index_images()
        self._check_layout(files, archives)
        metadata = self._read_metadata()
        result = ScanResult(items=[], inputs=self.input_files(), archives=archives)
        unmapped: Counter = Counter()
        counts: Counter = Counter()
        for number, where, payload in self._iter_reports():
            counts["reports"] += 1
            report_id = f"{self.pipeline.name}:CXR{number}"
            if isinstance(payload, str):  # a file that could not be read
                result.quarantine.append(QuarantineEntry(report_id, where, "scan", payload))
                continue
            try:
                report = parse_report(number, payload)
            except (ET.ParseError, ValueError) as err:
                reason = f"malformed report XML ({err})"
                result.quarantine.append(QuarantineEntry(report_id, where, "scan", reason))
                continue
            if not report.images:
                counts["without images"] += 1
                continue
            labels = self._labels(report, unmapped)
            for image_id in report.images:
                entry = self._item(report, image_id, labels, where, files, archives, metadata)
                target = result.quarantine if isinstance(entry, QuarantineEntry) else result.items
                target.append(entry)
        result.notes = self._notes(counts, files, archives, unmapped)
        return result

    # -- pieces -----------------------------------------------------------------------------
    def _check_layout(self, files: dict[str, str], archives: list[Path]) -> None:
        missing = []
        if self.reports_archive is None and self.reports_folder is None:
            missing.append(f"{REPORTS_ARCHIVE} (or its extracted {REPORTS_FOLDER}/ folder)")
        if not files and not archives:
            missing.append("images (NLMCXR_png.tgz or the extracted CXR*.png files)")
        if missing:
            raise UserError(
                f"{self.root}: not an IU X-ray (Open-i NLMCXR) release; missing "
                + "; ".join(missing)
            )

    def _iter_reports(self) -> Iterator[tuple[int, str, bytes | str]]:
        """(number, where, XML bytes or why unreadable) for every report of the release."""
        if self.reports_archive is not None:
            yield from _archive_reports(self.reports_archive)
            return
        assert self.reports_folder is not None
        for path in sorted(self.reports_folder.iterdir()):
            match = REPORT_NAME.search(path.name)
            if match and not path.name.startswith("."):
                yield int(match.group(1)), f"{REPORTS_FOLDER}/{path.name}", self._read(path)

    def _read(self, path: Path) -> bytes | str:
        """A report file's bytes, or why it cannot be read (a FIFO, a link out, too large)."""
        try:
            with open_release_file(path, self.root, what="report file") as handle:
                data = handle.read(MAX_REPORT_BYTES + 1)
        except ItemError as err:
            return err.reason
        return data if len(data) <= MAX_REPORT_BYTES else _too_large(MAX_REPORT_BYTES + 1)

    def _labels(self, report: Report, unmapped: Counter) -> dict[str, float] | str:
        """The report's labels, or the reason its images cannot have any."""
        if self.label_mode == "text":
            text = "\n\n".join(
                f"{name.upper()}: {report.sections[name]}"
                for name in self.pipeline.labels.text_sections
                if report.sections.get(name)
            )
            if not text:
                return f"report {report.id}: no FINDINGS or IMPRESSION to mine labels from"
            return self.labeler().label(text)
        if not report.majors or NO_INDEXING in report.majors:
            return f"report {report.id} not indexed (MeSH {NO_INDEXING!r}): no labels"
        labels, headings = mesh_labels(report, self.label_map)
        unmapped.update(headings)
        return labels

    def labeler(self) -> TextLabeler:
        """The report labeler, loaded once (spaCy is slow to start)."""
        if self._labeler is None:
            self._labeler = TextLabeler(self.vocab, model=self.pipeline.labels.text_model)
        return self._labeler

    def _item(
        self,
        report: Report,
        image_id: str,
        labels: dict[str, float] | str,
        where: str,
        files: dict[str, str],
        archives: list[Path],
        metadata: dict[str, dict],
    ) -> RawItem | QuarantineEntry:
        """One image's RawItem, or the QuarantineEntry saying why it has none."""
        item_id = f"{self.pipeline.name}:{image_id}"
        if not SAFE_COMPONENT.fullmatch(image_id):
            reason = f"image id {image_id!r} is not a file name"
            return QuarantineEntry(f"{self.pipeline.name}:{report.id}", where, "scan", reason)
        if isinstance(labels, str):
            return QuarantineEntry(item_id, where, "labels", labels)
        name = f"{image_id}.png"
        if image_id.lower() in files:
            image = ImageRef(files[image_id.lower()])
        elif archives:
            image = ImageRef(archives[0].name, name)  # found by name in the archives' one pass
        else:
            return QuarantineEntry(item_id, where, "scan", f"image missing: {name}")
        fields = metadata.get(image_id, {})
        splits = self.pipeline.splits
        extra = {k: v for k, v in fields.items() if k not in ("view", "modality")}
        extra["report_sections"] = sorted(report.sections)
        extra["mesh"] = list(report.majors)
        return RawItem(
            id=item_id,
            source=self.pipeline.name,
            split=hash_split(
                report.id, splits.hash_salt, splits.validation_fraction, splits.test_fraction
            ),
            image=image,
            labels=dict(labels),
            patient_id=report.id,
            study_id=report.id,
            view=fields.get("view"),
            modality=fields.get("modality"),
            sections=dict(report.sections),
            extra=extra,
        )

    def _index_images(self) -> tuple[dict[str, str], list[Path]]:
        """The extracted PNGs by lower-case stem, and the PNG archives in name order."""
        files = {stem: paths[0] for stem, paths in index_images(self.root, (".png",)).items()}
        archives = [p for p in release_files(self.root) if IMAGES_ARCHIVE.match(p.name)]
        return files, sorted(archives, key=lambda p: p.name)

    def _read_metadata(self) -> dict[str, dict]:
        """image id -> the whitelisted header fields (blank ones left out)."""
        if self.metadata is None:
            return {}
        table = read_csv_table(self.metadata, ("imageid",))
        kept = [c for c in METADATA_FIELDS if c in table.columns]
        table = table[["imageid", *kept]]  # nothing else is ever looked at
        fields: dict[str, dict] = {}
        for row in table.to_dict("records"):
            values = {METADATA_FIELDS[c]: _field(c, row[c]) for c in kept}
            fields[row["imageid"].strip()] = {k: v for k, v in values.items() if v}
        return fields

    def _notes(
        self, counts: Counter, files: dict[str, str], archives: list[Path], unmapped: Counter
    ) -> list[str]:
        """The summary's facts: where reports and images came from, unmapped headings."""
        reports = self.reports_archive.name if self.reports_archive else f"{REPORTS_FOLDER}/"
        images = f"{len(files)} PNG files" if files else ""
        if archives:
            images += (" and " if images else "") + ", ".join(a.name for a in archives)
        notes = [
            f"{reports}: {counts['reports']} reports ({counts['without images']} name no image);"
            f" images from {images}; labels {self.label_mode}; DICOM header fields "
            + (f"from {self.metadata.name}" if self.metadata else "absent")
        ]
        if unmapped:
            common = ", ".join(f"{h} {n}" for h, n in sorted(unmapped.items(), key=_by_count)[:8])
            notes.append(
                f"MeSH headings mapped to no label: {sum(unmapped.values())} "
                f"({len(unmapped)} distinct; most common: {common})"
            )
        return notes


def _by_count(pair: tuple[str, int]) -> tuple[int, str]:
    return -pair[1], pair[0]


def _field(column: str, raw: str) -> str | list[str]:
    """A kept header field: Patient Orientation's `['L', 'F']` as a list, others stripped."""
    value = str(raw).strip()
    if column == "Patient Orientation":
        return re.findall(r"'([^']*)'", value) or ([value] if value else [])
    return value.upper() if column in ("View Position", "Modality") else value


def _find_folder(root: Path) -> Path | None:
    """The extracted `ecgen-radiology/` folder (the shallowest, then path order)."""
    for folder, dirs, _ in walk_release(root):
        if REPORTS_FOLDER in dirs:
            return child(root, folder, REPORTS_FOLDER)
    return None


def _archive_reports(path: Path) -> Iterator[tuple[int, str, bytes | str]]:
    """Every `<n>.xml` member of the reports archive, streamed; a broken archive is an error."""
    try:
        with open_binary(path) as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            for member in tar:
                match = REPORT_NAME.search(member.name)
                if not member.isfile() or not match:
                    continue
                if member.size > MAX_REPORT_BYTES:  # a tar header states the true size
                    yield int(match.group(1)), member.name, _too_large(member.size)
                    continue
                handle = tar.extractfile(member)
                yield int(match.group(1)), member.name, handle.read() if handle else b""
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise UserError(f"{path}: not a readable tar archive of reports ({err})") from err


def _too_large(size: int) -> str:
    return f"report file is {size:,} bytes, over the {MAX_REPORT_BYTES:,}-byte cap"
