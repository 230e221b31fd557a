"""MIDRC: RICORD-1c as downloaded from TCIA, and MIDRC Data Commons (Gen3) downloads.

Reference: shared/reference/source-formats.md §3. One item per DICOM image; no reports, so
(DESIGN §6) the description is the study description (`XR CHEST 1 VIEW AP`) and the explanation
a sentence composed from the series description, view, modality and body part, both read from
the DICOM header (falling back to the release's tables) into `item.sections`.

Identifiers and PHI: ids are `{source}:{sha256(SOPInstanceUID)[:20]}` (files whose header cannot
be read: a hash of the series UID and file position), `study_id` a hash of the StudyInstanceUID,
`patient_id` the release's de-identified anonymised MRN (`419639-000001`, the case id on the
Data Commons) or a hash when the id does not have that shape. Folder and member names (TCIA's
descriptive folders carry dates, study ids and descriptions; zip members carry whatever the
packer wrote) never reach a record, the quarantine or the manifest: `ImageRef.path` is a neutral
description, and the real location is kept inside the source, which supplies the image bytes
itself (`tasks()`). DICOM fields reach `extra["dicom"]` only through the DICOM stage whitelist.

Splits: neither release has one; patients are assigned to train / validation / test by a
salted SHA-256 of the patient id (`splits` in the pipeline).

RICORD labels (`MidrcRicordSource`):
- `COVID-19` = 1 for every image (RT-PCR positive is RICORD-1c's inclusion criterion;
  `labels.covid19_all_positive`);
- the reader classes (Typical / Indeterminate / Atypical Appearance, Negative for Pneumonia) and
  grades (Mild / Moderate / Severe Airspace Disease) from the MD.ai export. Each reader counts
  once per study and label group: when a reader annotated a study twice, their latest
  annotation (`updatedAt`, else `createdAt`, else file order) wins. Readers are combined per
  group by `labels.reader_policy`:
  * `majority` (default): the value chosen by more than half of the readers who answered the
    group is 1 and the other values of the group 0; with no such value (a tie, or every reader
    different) each value some reader chose is -1 (uncertain) and the others 0;
  * `unanimous`: 1 only when every reader agrees, otherwise as a tie;
  * `any`: every value some reader chose is 1, the others 0.
  A group no reader answered stays NaN. Each reader's choice is kept in `extra.readers` under a
  pseudonym (`reader-` + hash of the MD.ai user id), with the policy in `extra.reader_policy`.
- An image of a study without any annotation keeps NaN reader labels (`labels.unannotated:
  keep`, the default: NaN is "not annotated" in the schema) or is quarantined (`quarantine`).
  An annotated study with no image in the download (withdrawn from TCIA) is quarantined, one
  entry per study, so the summary shows it.

Data Commons labels (`MidrcCommonsSource`): `COVID-19` from the `measurement` node: the most
recent `COVID-19` test with 0 <= days_to_study - test_days_from_index <= 14 (`labels.covid_window_
days`); Positive = 1, Negative = 0; two results on that day that disagree = -1; none = NaN.
The mRALE CSV (optional) adds `extra.mrale` (score and the four components, quality issue).
Study zips (`<case_id>/<study>.zip`, found anywhere under the root) are read in place; DICOMs are
searched recursively, into nested zips of any depth, which are read from memory.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import io
import json
import math
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from ..build.items import ImageRef, QuarantineEntry, RawItem
from ..build.stages import Task
from ..errors import UserError
from .base import ScanResult, Source
from .splits import hash_split
from .tables import read_csv_table

METADATA_COLUMNS = (
    "Series UID",
    "Collection",
    "3rd Party Analysis",
    "Data Description URI",
    "Subject ID",
    "Study UID",
    "Study Description",
    "Study Date",
    "Series Description",
    "Manufacturer",
    "Modality",
    "SOP Class Name",
    "SOP Class UID",
    "Number of Images",
    "File Size",
    "File Location",
    "Download Timestamp",
)
REQUIRED_METADATA = ("Series UID", "Subject ID", "Study UID", "File Location")
HEADER_TAGS = (
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "StudyDescription",
    "SeriesDescription",
    "ViewPosition",
    "Modality",
    "BodyPartExamined",
    "PatientSex",
    "PatientAge",
)
READER_POLICIES = ("majority", "unanimous", "any")
ANON_MRN = re.compile(r"(\d{5,7}-\d{6})$")
SEX = {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F"}
DICOM_NAME = re.compile(r"\.(dcm|dicom)$", re.IGNORECASE)


def short_hash(text: str, length: int = 20) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def patient_key(raw: str) -> str:
    """The release's anonymised MRN (`<site>-<6 digits>`), else a hash: never free folder text."""
    match = ANON_MRN.search(str(raw).strip())
    return match.group(1) if match else "h" + short_hash(str(raw).strip(), 16)


def split_of(patient: str, splits: dict[str, Any], salt: str) -> str:
    """train / validation / test by a salted SHA-256 of the patient id (never hash())."""
    validation = float(splits.get("validation_fraction", 0.1))
    test = float(splits.get("test_fraction", 0.1))
    return hash_split(patient, salt, validation, test)


def parse_age(raw: Any) -> float | None:
    """DICOM AS (`045Y`, `006M`) or a plain number of years."""
    text = str(raw or "").strip().upper()
    match = re.fullmatch(r"(\d{1,3})([DWMY]?)", text)
    if not match:
        return None
    value = float(match.group(1))
    return value / {"D": 365.25, "W": 52.18, "M": 12.0, "Y": 1.0, "": 1.0}[match.group(2)]


def read_header(data: bytes | Path) -> dict[str, str] | None:
    """The descriptive header fields of a DICOM (no pixels); None when it cannot be read."""
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        ds = pydicom.dcmread(source, stop_before_pixels=True, force=True)
    except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, KeyError, IndexError):
        return None
    out = {}
    for keyword in HEADER_TAGS:
        try:
            value = ds.get(keyword)
        except Exception:  # noqa: BLE001 - a malformed element reads as absent
            value = None
        if value is not None and str(value).strip():
            out[keyword] = " ".join(str(value).split())
    return out if "SOPInstanceUID" in out else None


def series_text(fields: dict[str, str]) -> str:
    """Granularity 3 for MIDRC: series description, view, modality and body part, as sentences."""
    parts = []
    if fields.get("series"):
        parts.append(f"Series: {fields['series']}.")
    facts = []
    if fields.get("view"):
        facts.append(f"view {fields['view']}")
    if fields.get("modality"):
        facts.append(f"modality {fields['modality']}")
    if fields.get("body_part"):
        facts.append(f"body part {fields['body_part']}")
    if facts:
        sentence = ", ".join(facts)
        parts.append(sentence[:1].upper() + sentence[1:] + ".")
    return " ".join(parts)


def _clean(value: Any) -> str:
    text = " ".join(str(value or "").split())
    return "" if text.upper() in ("NA", "NAN", "NONE", "NULL") else text


@dataclass
class _Image:
    """A DICOM found by a source: where its bytes are (kept inside the source) and its header."""

    path: Path  # the file, or the top-level zip
    chain: tuple[str, ...]  # member names: zip member, then members of nested zips
    header: dict[str, str] | None
    label: str  # neutral description for the ImageRef (no folder or member text)


class _MidrcSource(Source):
    """What both MIDRC layouts share: header-derived texts, splits, neutral refs, byte supply."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._where: dict[str, _Image] = {}
        self.splits = self.pipeline.section("splits")
        self.salt = str(self.splits.get("hash_salt", self.pipeline.name))

    def _item(
        self,
        image: _Image,
        *,
        fallback_id: str,
        patient: str,
        study_uid: str,
        labels: dict[str, float],
        table: dict[str, str],
        extra: dict[str, Any],
        sex: str | None = None,
        age: float | None = None,
    ) -> RawItem:
        header = image.header or {}
        native = header.get("SOPInstanceUID")
        item_id = f"{self.pipeline.name}:{short_hash(native) if native else fallback_id}"
        fields = {
            "study": _clean(header.get("StudyDescription")) or _clean(table.get("study")),
            "series": _clean(header.get("SeriesDescription")) or _clean(table.get("series")),
            "view": (_clean(header.get("ViewPosition")) or _clean(table.get("view"))).upper(),
            "modality": (_clean(header.get("Modality")) or _clean(table.get("modality"))).upper(),
            "body_part": _clean(header.get("BodyPartExamined")) or _clean(table.get("body_part")),
        }
        sections = {}
        if fields["study"]:
            sections["study_description"] = fields["study"]
        text = series_text(fields)
        if text:
            sections["series_text"] = text
        if sex is None:
            sex = SEX.get(_clean(header.get("PatientSex")).upper())
        if age is None:
            age = parse_age(header.get("PatientAge"))
        self._where[item_id] = image
        return RawItem(
            id=item_id,
            source=self.pipeline.name,
            split=split_of(patient, self.splits, self.salt),
            image=ImageRef(image.label, format="dicom"),
            labels=labels,
            patient_id=patient,
            study_id="s" + short_hash(study_uid, 16) if study_uid else None,
            view=fields["view"] or None,
            modality=fields["modality"] or None,
            age_years=age,
            sex=sex,
            sections=sections,
            extra=extra,
        )

    def tasks(self, planned: list[tuple[tuple[str, int], RawItem]]) -> Iterator[Task]:
        """Tasks with the image bytes read here: files directly, each zip opened once."""
        by_zip: dict[Path, list[tuple[tuple[str, int], RawItem, _Image]]] = {}
        for pos, item in planned:
            image = self._where.get(item.id)
            if image is None:
                yield Task(pos, item, error="image location unknown (not found by the scan)")
            elif not image.chain:
                try:
                    data = image.path.read_bytes()
                except OSError as err:
                    yield Task(pos, item, error=f"cannot read the DICOM file ({err.strerror})")
                    continue
                yield Task(pos, item, image_bytes=data)
            else:
                by_zip.setdefault(image.path, []).append((pos, item, image))
        for path in sorted(by_zip):
            try:
                with zipfile.ZipFile(path) as archive:
                    for pos, item, image in by_zip[path]:
                        try:
                            data = _read_chain(archive, image.chain)
                        except (zipfile.BadZipFile, KeyError, OSError, EOFError) as err:
                            yield Task(pos, item, error=f"cannot read zip member ({err})")
                            continue
                        yield Task(pos, item, image_bytes=data)
            except (zipfile.BadZipFile, OSError) as err:
                for pos, item, _ in by_zip[path]:
                    yield Task(pos, item, error=f"study zip unreadable ({err})")


def _read_chain(archive: zipfile.ZipFile, chain: tuple[str, ...]) -> bytes:
    data = archive.read(chain[0])
    for member in chain[1:]:
        with zipfile.ZipFile(io.BytesIO(data)) as inner:
            data = inner.read(member)
    return data


def walk_zip(archive: zipfile.ZipFile, prefix: tuple[str, ...] = (), depth: int = 0):
    """(chain, bytes) of every DICOM-looking member, nested zips searched (read in memory).

    Members are DICOM when named `.dcm`/`.dicom` or, with no extension, when they carry the
    `DICM` preamble marker. Yields ("error", chain, reason) for an unreadable nested zip.
    """
    for info in sorted(archive.infolist(), key=lambda i: i.filename):
        if info.is_dir():
            continue
        name = info.filename
        chain = (*prefix, name)
        lower = name.lower()
        if lower.endswith(".zip"):
            if depth >= 8:
                continue
            try:
                with zipfile.ZipFile(io.BytesIO(archive.read(name))) as inner:
                    yield from walk_zip(inner, chain, depth + 1)
            except (zipfile.BadZipFile, OSError, EOFError) as err:
                yield ("error", chain, f"nested zip unreadable ({err})")
            continue
        base = lower.rsplit("/", 1)[-1]
        if DICOM_NAME.search(base):
            yield ("dicom", chain, archive.read(name))
        elif "." not in base:
            data = archive.read(name)
            if data[128:132] == b"DICM":
                yield ("dicom", chain, data)


# ------------------------------------------------------------------------------------------
# RICORD-1c on TCIA
# ------------------------------------------------------------------------------------------


class MidrcRicordSource(_MidrcSource):
    """RICORD-1c from TCIA: metadata.csv, the descriptive DICOM tree, the MD.ai export JSON."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        labels = self.pipeline.section("labels")
        self.label_map: dict[str, str] = dict(labels.get("map") or {})
        self.groups: dict[str, list[str]] = {
            group: list(names) for group, names in (labels.get("groups") or {}).items()
        }
        self.group_of = {name: g for g, names in self.groups.items() for name in names}
        self.policy = str(labels.get("reader_policy", "majority")).lower()
        if self.policy not in READER_POLICIES:
            raise UserError(
                f"{self.pipeline.path}: labels.reader_policy must be one of "
                f"{list(READER_POLICIES)}, not {self.policy!r}"
            )
        self.unannotated = str(labels.get("unannotated", "keep")).lower()
        if self.unannotated not in ("keep", "quarantine"):
            raise UserError(
                f"{self.pipeline.path}: labels.unannotated must be 'keep' or 'quarantine', "
                f"not {self.unannotated!r}"
            )
        self.covid_all = bool(labels.get("covid19_all_positive", True))
        self.metadata = _find_file(self.root, "metadata.csv")
        self.annotations = _find_annotation_json(self.root)

    def input_files(self) -> list[Path]:
        return [p for p in (self.metadata, self.annotations) if p is not None]

    def annotated_labels(self) -> list[str]:
        names = set(self.label_map.values()) | ({"COVID-19"} if self.covid_all else set())
        return [name for name in self.vocab.names if name in names]

    def scan(self) -> ScanResult:
        missing = []
        if self.metadata is None:
            missing.append("metadata.csv (the NBIA Data Retriever's series list)")
        if self.annotations is None:
            missing.append("the MD.ai annotation export (*annotations*.json)")
        if missing:
            raise UserError(f"{self.root}: not a RICORD-1c download; missing " + "; ".join(missing))
        assert self.metadata is not None and self.annotations is not None
        table = read_csv_table(self.metadata, REQUIRED_METADATA)
        readers, label_notes = self._read_annotations(self.annotations)
        result = ScanResult(items=[], notes=[])
        seen_studies: set[str] = set()
        for number, row in enumerate(table.to_dict("records"), start=2):
            series_uid = _clean(row["Series UID"])
            study_uid = _clean(row["Study UID"])
            patient = patient_key(row["Subject ID"])
            where = f"{self.metadata.name} row {number}"
            folder = self._folder(row["File Location"])
            files = sorted(folder.glob("*.dcm")) if folder is not None else []
            if not files:
                result.quarantine.append(
                    QuarantineEntry(
                        f"{self.pipeline.name}:series-{short_hash(series_uid)}",
                        where,
                        "scan",
                        "series folder missing or holds no .dcm file",
                    )
                )
                continue
            seen_studies.add(study_uid)
            study_readers = readers.get(study_uid, {})
            if not study_readers and self.unannotated == "quarantine":
                for index, _ in enumerate(files):
                    result.quarantine.append(
                        QuarantineEntry(
                            f"{self.pipeline.name}:{short_hash(f'{series_uid}/{index}')}",
                            where,
                            "labels",
                            "study has no reader annotation (labels.unannotated: quarantine)",
                        )
                    )
                continue
            labels, extra = self._labels(study_readers)
            table_fields = {
                "study": row.get("Study Description", ""),
                "series": row.get("Series Description", ""),
                "modality": row.get("Modality", ""),
            }
            for index, path in enumerate(files):
                image = _Image(
                    path=path,
                    chain=(),
                    header=read_header(path),
                    label=f"{self.metadata.name} row {number} file {index + 1}",
                )
                result.items.append(
                    self._item(
                        image,
                        fallback_id=short_hash(f"{series_uid}/{index}"),
                        patient=patient,
                        study_uid=study_uid,
                        labels=labels,
                        table=table_fields,
                        extra=dict(extra),
                    )
                )
        withdrawn = sorted(set(readers) - seen_studies)
        for study_uid in withdrawn:
            result.quarantine.append(
                QuarantineEntry(
                    f"{self.pipeline.name}:study-{short_hash(study_uid)}",
                    f"{self.annotations.name}",
                    "scan",
                    "annotated study has no image in the download (withdrawn)",
                )
            )
        unannotated = len(seen_studies - set(readers))
        result.notes.append(
            f"{self.metadata.name}: {len(table)} series; {self.annotations.name}: "
            f"{len(readers)} annotated studies; reader policy {self.policy}"
            + (
                f"; {unannotated} studies without annotation ({self.unannotated})"
                if unannotated
                else ""
            )
        )
        result.notes.extend(label_notes)
        return result

    def _folder(self, location: str) -> Path | None:
        rel = str(location).strip().replace("\\", "/")
        while rel.startswith("./"):
            rel = rel[2:]
        if not rel or ".." in rel.split("/"):
            return None
        for base in (self.metadata.parent, self.metadata.parent.parent):
            candidate = base / rel
            if candidate.is_dir():
                return candidate
        return None

    def _read_annotations(self, path: Path) -> tuple[dict[str, dict[str, dict[str, str]]], list]:
        """{study uid: {reader pseudonym: {group: vocabulary label}}}, latest annotation wins."""
        try:
            data = json.loads(path.read_bytes().decode("utf-8", errors="replace"))
        except (json.JSONDecodeError, OSError) as err:
            raise UserError(f"{path}: not a readable MD.ai export ({err})") from err
        if not isinstance(data, dict) or "labelGroups" not in data or "datasets" not in data:
            raise UserError(f"{path}: not an MD.ai export (expected 'labelGroups' and 'datasets')")
        names: dict[str, str] = {}
        for group in data.get("labelGroups") or []:
            for label in group.get("labels") or []:
                names[str(label.get("id"))] = str(label.get("name", "")).strip()
        latest: dict[tuple[str, str, str], tuple[tuple, str]] = {}
        unmapped: set[str] = set()
        order = 0
        for dataset in data.get("datasets") or []:
            for ann in dataset.get("annotations") or []:
                order += 1
                study = _clean(ann.get("StudyInstanceUID"))
                name = names.get(str(ann.get("labelId")))
                target = self.label_map.get(name or "")
                if not study or target is None:
                    if name:
                        unmapped.add(name)
                    continue
                reader = "reader-" + short_hash(str(ann.get("createdById", "unknown")), 8)
                group = self.group_of.get(target, target)
                stamp = str(ann.get("updatedAt") or ann.get("createdAt") or "")
                key = (study, reader, group)
                rank = (stamp, order)
                if key not in latest or rank >= latest[key][0]:
                    latest[key] = (rank, target)
        readers: dict[str, dict[str, dict[str, str]]] = {}
        for (study, reader, group), (_, target) in sorted(latest.items()):
            readers.setdefault(study, {}).setdefault(reader, {})[group] = target
        notes = []
        if unmapped:
            notes.append(f"MD.ai labels not in labels.map, ignored: {sorted(unmapped)}")
        return readers, notes

    def _labels(self, readers: dict[str, dict[str, str]]) -> tuple[dict[str, float], dict]:
        labels: dict[str, float] = {"COVID-19": 1.0} if self.covid_all else {}
        for group, values in self.groups.items():
            votes = [choice[group] for choice in readers.values() if group in choice]
            labels.update(combine(votes, values, self.policy))
        extra = {
            "reader_policy": self.policy,
            "readers": {r: dict(sorted(c.items())) for r, c in sorted(readers.items())},
            "covid19_from": "inclusion criterion (RT-PCR positive)" if self.covid_all else None,
        }
        return labels, {k: v for k, v in extra.items() if v is not None}


def combine(votes: list[str], values: list[str], policy: str) -> dict[str, float]:
    """One label group's values from its readers' choices (see the module docstring)."""
    if not votes:
        return {}
    counts = {value: votes.count(value) for value in values}
    chosen = [v for v in values if counts[v]]
    if policy == "any":
        return {v: 1.0 if counts[v] else 0.0 for v in values}
    winner = None
    if policy == "majority":
        winner = next((v for v in values if counts[v] * 2 > len(votes)), None)
    elif len(chosen) == 1:
        winner = chosen[0]
    if winner is not None:
        return {v: 1.0 if v == winner else 0.0 for v in values}
    return {v: -1.0 if counts[v] else 0.0 for v in values}


def _find_file(root: Path, name: str) -> Path | None:
    direct = root / name
    if direct.is_file():
        return direct
    found = sorted(p for p in root.glob(f"*/{name}") if p.is_file())
    return found[0] if found else None


def _find_annotation_json(root: Path) -> Path | None:
    found = sorted(
        p
        for pattern in ("*.json", "*/*.json")
        for p in root.glob(pattern)
        if "annotation" in p.name.lower() and p.is_file()
    )
    return found[0] if found else None


# ------------------------------------------------------------------------------------------
# MIDRC Data Commons (Gen3)
# ------------------------------------------------------------------------------------------

NODES = ("case", "imaging_study", "radiography_exam", "dx_series", "cr_series", "measurement")
REQUIRED_NODES = ("case", "imaging_study")
MRALE_COLUMNS = (
    "extent_right_numerical",
    "density_right_numerical",
    "extent_left_numerical",
    "density_left_numerical",
)


def parse_list(raw: Any) -> list[str]:
    """A list-valued cell: `['a', 'b']` (Python list string), `a,b`, `"a,b"` or `a`."""
    text = str(raw or "").strip()
    if not text:
        return []
    if text.startswith("["):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text.strip("[]").split(",")
        if isinstance(value, (list, tuple)):
            return [str(v).strip().strip("'\"") for v in value if str(v).strip()]
    return [v.strip().strip("'\"") for v in text.strip('"').split(",") if v.strip()]


def read_tsv(path: Path) -> list[dict[str, str]]:
    """A Gen3 node TSV as rows of stripped strings (UTF-8 with a Latin-1 fallback)."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    reader = csv.DictReader(io.StringIO(text), delimiter="\t")
    if reader.fieldnames is None:
        raise UserError(f"{path}: empty node table (expected a header row)")
    rows = []
    for row in reader:
        rows.append({str(k).strip(): str(v or "").strip() for k, v in row.items() if k})
    return rows


def _float(raw: Any) -> float | None:
    try:
        value = float(str(raw).strip())
    except ValueError:
        return None
    return None if math.isnan(value) else value


class MidrcCommonsSource(_MidrcSource):
    """MIDRC Data Commons: node TSVs, the Gen3 manifest, per-study zips, optional mRALE CSV."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        labels = self.pipeline.section("labels")
        self.window = float(labels.get("covid_window_days", 14))
        self.tables = {node: _find_node(self.root, node) for node in NODES}
        self.manifest = _find_manifest(self.root)
        self.mrale = next(iter(sorted(self.root.rglob("*mRALE*.csv"))), None)

    def input_files(self) -> list[Path]:
        files = [p for p in self.tables.values() if p is not None]
        return files + [p for p in (self.manifest, self.mrale) if p is not None]

    def annotated_labels(self) -> list[str]:
        return ["COVID-19"]

    def scan(self) -> ScanResult:
        missing = [f"{node}.tsv" for node in REQUIRED_NODES if self.tables[node] is None]
        if missing:
            raise UserError(
                f"{self.root}: not a MIDRC Data Commons download; missing node table(s) "
                + ", ".join(missing)
                + " (Gen3 TSV exports)"
            )
        nodes = {n: read_tsv(p) if p else [] for n, p in self.tables.items()}
        for node, columns in (
            ("case", ("submitter_id",)),
            ("imaging_study", ("study_uid", "case_ids")),
        ):
            if nodes[node] and any(c not in nodes[node][0] for c in columns):
                raise UserError(
                    f"{self.tables[node]}: missing column(s) {list(columns)}; "
                    f"found {list(nodes[node][0])[:12]}"
                )
        cases = {row["submitter_id"]: row for row in nodes["case"]}
        studies = {row["study_uid"]: row for row in nodes["imaging_study"] if row["study_uid"]}
        exams = {r.get("submitter_id", ""): r for r in nodes["radiography_exam"]}
        series = {
            r.get("series_uid") or r.get("submitter_id", ""): r
            for r in (*nodes["dx_series"], *nodes["cr_series"])
        }
        tests = self._tests(nodes["measurement"])
        mrale = self._mrale()
        result = ScanResult(items=[], notes=[])
        images_by_study, ignored = self._zip_images(result)
        for study_uid in sorted(studies):
            study = studies[study_uid]
            case_ids = parse_list(study.get("case_ids"))
            case_id = case_ids[0] if case_ids else ""
            found = images_by_study.pop(study_uid, [])
            if not found:
                result.quarantine.append(
                    QuarantineEntry(
                        f"{self.pipeline.name}:study-{short_hash(study_uid)}",
                        f"{self.tables['imaging_study'].name} study {short_hash(study_uid, 12)}",
                        "scan",
                        "no DICOM of this study in any downloaded zip",
                    )
                )
                continue
            case = cases.get(case_id, {})
            patient = patient_key(case_id) if case_id else "h" + short_hash(study_uid, 16)
            labels, covid_extra = self._covid(tests.get(case_id, []), study)
            exam = exams.get(study_uid, {})
            extra: dict[str, Any] = {"covid19": covid_extra}
            if study_uid in mrale:
                extra["mrale"] = mrale[study_uid]
            project = study.get("project_id") or case.get("project_id")
            if project:
                extra["project_id"] = project
            age = _float(study.get("age_at_imaging")) or _float(case.get("age_at_index"))
            for image in found:
                header = image.header or {}
                ser = series.get(header.get("SeriesInstanceUID", ""), {})
                table = {
                    "study": exam.get("exam_description")
                    or study.get("study_description")
                    or parse_list(study.get("study_description_0"))[:1],
                    "series": ser.get("series_description", ""),
                    "view": ser.get("view_position") or exam.get("view_position", ""),
                    "modality": ser.get("modality", ""),
                }
                table = {k: v if isinstance(v, str) else "".join(v) for k, v in table.items()}
                result.items.append(
                    self._item(
                        image,
                        fallback_id=short_hash(f"{study_uid}/{'/'.join(image.chain)}"),
                        patient=patient,
                        study_uid=study_uid,
                        labels=dict(labels),
                        table=table,
                        extra=json.loads(json.dumps(extra)),
                        sex=SEX.get(str(case.get("sex", "")).strip().upper()),
                        age=age,
                    )
                )
        ignored += sum(len(v) for v in images_by_study.values())
        zips = len({i.path for i in self._where.values()})
        result.notes.append(
            f"{len(studies)} studies in imaging_study; images from {zips} zip(s) read in place"
            + (f"; {ignored} DICOMs of studies not in the node tables ignored" if ignored else "")
            + (f"; mRALE from {self.mrale.name}" if self.mrale else "")
            + (
                f"; manifest {self.manifest.name}: {_count_objects(self.manifest)} objects"
                if self.manifest
                else ""
            )
        )
        return result

    def _zip_images(self, result: ScanResult) -> tuple[dict[str, list[_Image]], int]:
        by_study: dict[str, list[_Image]] = {}
        for number, path in enumerate(sorted(self.root.rglob("*.zip")), start=1):
            rel = f"zip {number} ({path.parent.name}/{short_hash(path.name, 8)})"
            if not ANON_MRN.search(path.parent.name):
                rel = f"zip {number}"
            try:
                with zipfile.ZipFile(path) as archive:
                    entries = list(walk_zip(archive))
            except (zipfile.BadZipFile, OSError) as err:
                result.quarantine.append(
                    QuarantineEntry(
                        f"{self.pipeline.name}:zip-{short_hash(str(path.relative_to(self.root)))}",
                        rel,
                        "scan",
                        f"study zip unreadable ({err})",
                    )
                )
                continue
            for index, (kind, chain, payload) in enumerate(entries, start=1):
                label = f"{rel} member {index}"
                if kind == "error":
                    result.quarantine.append(
                        QuarantineEntry(
                            f"{self.pipeline.name}:{short_hash(f'{path.name}/{chain}')}",
                            label,
                            "scan",
                            payload,
                        )
                    )
                    continue
                header = read_header(payload)
                image = _Image(path=path, chain=chain, header=header, label=label)
                study = (header or {}).get("StudyInstanceUID")
                if study is None:
                    # No readable header: keep it with the zip's study (its name) so the image
                    # stage reports why it is unusable.
                    study = Path(path.name).stem
                by_study.setdefault(study, []).append(image)
        return by_study, 0  # (images, ignored so far)

    def _tests(self, rows: list[dict[str, str]]) -> dict[str, list[tuple[float, str]]]:
        tests: dict[str, list[tuple[float, str]]] = {}
        for row in rows:
            if "covid" not in row.get("test_name", "").lower():
                continue
            day = _float(row.get("test_days_from_index"))
            result = row.get("test_result_text", "").strip().lower()
            if day is None or result not in ("positive", "negative"):
                continue
            for case_id in parse_list(row.get("case_ids") or row.get("cases.submitter_id")):
                tests.setdefault(case_id, []).append((day, result))
        return tests

    def _covid(self, tests: list[tuple[float, str]], study: dict[str, str]):
        """The most recent test 0..window days before the study: 1 / 0, -1 when it disagrees."""
        day = _float(study.get("days_to_study"))
        if day is None:
            return {}, {"result": None, "reason": "study has no days_to_study"}
        window = [(d, r) for d, r in tests if 0 <= day - d <= self.window]
        if not window:
            return {}, {"result": None, "reason": f"no COVID-19 test 0-{self.window:g} days before"}
        latest = max(d for d, _ in window)
        results = sorted({r for d, r in window if d == latest})
        value = -1.0 if len(results) > 1 else (1.0 if results[0] == "positive" else 0.0)
        info = {"result": "/".join(results), "days_before_study": day - latest}
        return {"COVID-19": value}, info

    def _mrale(self) -> dict[str, dict[str, Any]]:
        if self.mrale is None:
            return {}
        table = read_csv_table(self.mrale, ("StudyInstanceUID", "mRALE Score"))
        out = {}
        for row in table.to_dict("records"):
            entry: dict[str, Any] = {"score": _float(row["mRALE Score"])}
            for column in MRALE_COLUMNS:
                if column in row:
                    entry[column.removesuffix("_numerical")] = _float(row[column])
            issue = str(row.get("quality_issue", "")).strip()
            if issue:
                entry["quality_issue"] = issue
            out[str(row["StudyInstanceUID"]).strip()] = entry
        return out


def _find_node(root: Path, node: str) -> Path | None:
    pattern = re.compile(rf"^{node}(?:[_-][\w.-]*)?\.tsv$", re.IGNORECASE)
    found = sorted(p for p in root.rglob("*.tsv") if pattern.match(p.name))
    return found[0] if found else None


def _count_objects(path: Path) -> int:
    try:
        return len(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, OSError, UnicodeDecodeError):
        return 0


def _find_manifest(root: Path) -> Path | None:
    for path in sorted(root.rglob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, OSError, UnicodeDecodeError):
            continue
        if isinstance(data, list) and data and isinstance(data[0], dict) and "object_id" in data[0]:
            return path
    return None


__all__ = ["MidrcCommonsSource", "MidrcRicordSource", "combine", "parse_list"]
