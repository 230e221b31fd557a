"""What both MIDRC layouts share: DICOM headers, record texts, identifiers, image bytes.

MIDRC releases carry no reports, so the description is the study description
(`XR CHEST 1 VIEW AP`) and the explanation a sentence composed from the series description,
view, modality and body part, both read from the DICOM header (falling back to the release's
tables) into `item.sections`.

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
"""

from __future__ import annotations

import hashlib
import io
import re
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pydicom
from pydicom.errors import InvalidDicomError

from ...build.items import ImageRef, RawItem
from ...build.stages import Task
from ...errors import ItemError
from ...imaging.files import open_release_file
from .. import archives as safe_zip
from ..archives import ZipLimits
from ..base import Source
from ..splits import hash_split
from ..toolkit import parse_age

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
ANON_MRN = re.compile(r"(\d{5,7}-\d{6})$")
SEX = {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F"}
DICOM_NAME = re.compile(r"\.(dcm|dicom)$", re.IGNORECASE)
ZIP_LIMITS = ZipLimits()  # member size, ratio and nesting caps for study zips


def short_hash(text: str, length: int = 20) -> str:
    """The first `length` hex digits of the SHA-256 of `text`: ids that carry no PHI."""
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def patient_key(raw: str) -> str:
    """The release's anonymised MRN (`<site>-<6 digits>`), else a hash: never free folder text."""
    match = ANON_MRN.search(str(raw).strip())
    return match.group(1) if match else "h" + short_hash(str(raw).strip(), 16)


def read_header(data: bytes | Path | IO[bytes]) -> dict[str, str] | None:
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


def clean(value: Any) -> str:
    """A header or table value on one line; placeholders (`NA`, `None`, ...) read as blank."""
    text = " ".join(str(value or "").split())
    return "" if text.upper() in ("NA", "NAN", "NONE", "NULL") else text


@dataclass
class DicomImage:
    """A DICOM found by a source: where its bytes are (kept inside the source) and its header."""

    path: Path  # the file, or the top-level zip
    chain: tuple[str, ...]  # member names: zip member, then members of nested zips
    header: dict[str, str] | None
    label: str  # neutral description for the ImageRef (no folder or member text)


class MidrcSource(Source):
    """What both MIDRC layouts share: header-derived texts, splits, neutral refs, byte supply."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        splits = self.pipeline.splits  # a MIDRC pipeline's test share defaults to 0.1
        self.validation_fraction = splits.validation_fraction
        self.test_fraction = splits.test_fraction
        self.salt = splits.hash_salt

    def split_of(self, patient: str) -> str:
        """train / validation / test by a salted SHA-256 of the patient id (never hash())."""
        return hash_split(patient, self.salt, self.validation_fraction, self.test_fraction)

    def make_item(
        self,
        image: DicomImage,
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
        """The record of one DICOM: header fields first, the release's `table` fields as the
        fallback; `sex` and `age` given by the release win over the header's."""
        header = image.header or {}
        native = header.get("SOPInstanceUID")
        item_id = f"{self.pipeline.name}:{short_hash(native) if native else fallback_id}"
        fields = {
            "study": clean(header.get("StudyDescription")) or clean(table.get("study")),
            "series": clean(header.get("SeriesDescription")) or clean(table.get("series")),
            "view": (clean(header.get("ViewPosition")) or clean(table.get("view"))).upper(),
            "modality": (clean(header.get("Modality")) or clean(table.get("modality"))).upper(),
            "body_part": clean(header.get("BodyPartExamined")) or clean(table.get("body_part")),
        }
        sections = {}
        if fields["study"]:
            sections["study_description"] = fields["study"]
        text = series_text(fields)
        if text:
            sections["series_text"] = text
        if sex is None:
            sex = SEX.get(clean(header.get("PatientSex")).upper())
        if age is None:
            age = parse_age(header.get("PatientAge"))
        return RawItem(
            id=item_id,
            source=self.pipeline.name,
            split=self.split_of(patient),
            image=ImageRef(image.label, format="dicom"),
            labels=labels,
            location=image,
            patient_id=patient,
            study_id="s" + short_hash(study_uid, 16) if study_uid else None,
            view=fields["view"] or None,
            modality=fields["modality"] or None,
            age_years=age,
            sex=sex,
            sections=sections,
            extra=extra,
        )

    def tasks(
        self, planned: list[tuple[tuple[str, int], RawItem]], archives: Sequence[Path] = ()
    ) -> Iterator[Task]:
        """Tasks with the image bytes read here: files directly, each zip opened once."""
        by_zip: dict[Path, list[tuple[tuple[str, int], RawItem, DicomImage]]] = {}
        for pos, item in planned:
            image = item.location
            if image is None:
                yield Task(pos, item, error="image location unknown (not found by the scan)")
            elif not image.chain:
                try:
                    data = read_dicom_file(image.path, self.root)
                except ItemError as err:
                    yield Task(pos, item, error=err.reason)
                    continue
                yield Task(pos, item, image_bytes=data)
            else:
                by_zip.setdefault(image.path, []).append((pos, item, image))
        for path in sorted(by_zip):
            try:
                with (
                    open_release_file(path, self.root, what="study zip") as file,
                    zipfile.ZipFile(file) as archive,
                ):
                    for pos, item, image in by_zip[path]:
                        try:
                            data = safe_zip.read_chain(archive, image.chain, ZIP_LIMITS)
                        except safe_zip.MemberError as err:
                            yield Task(pos, item, error=err.reason)
                            continue
                        yield Task(pos, item, image_bytes=data)
            except (zipfile.BadZipFile, OSError, ItemError) as err:
                reason = (
                    err.reason if isinstance(err, ItemError) else f"study zip unreadable ({err})"
                )
                for pos, item, _ in by_zip[path]:
                    yield Task(pos, item, error=reason)


def read_dicom_file(path: Path, root: Path) -> bytes:
    """A DICOM file's bytes: a regular file inside `root`, at most the zip member cap
    (ItemError otherwise: `imaging/files.py` says why)."""
    cap = ZIP_LIMITS.max_member_bytes
    with open_release_file(path, root, what="DICOM file") as file:
        data = file.read(cap + 1)
    if len(data) > cap:
        raise ItemError("image", f"DICOM file over the {cap // 2**20} MiB cap")
    return data


def walk_zip(
    archive: zipfile.ZipFile, limits: ZipLimits = ZIP_LIMITS
) -> Iterator[tuple[str, tuple[str, ...], Any]]:
    """("dicom", chain, header) of every DICOM-looking member, streamed (`sources/archives.py`):
    no member is held in memory, nested zips are searched under the same caps.

    Members are DICOM when named `.dcm`/`.dicom` or, with no extension, when they carry the
    `DICM` preamble marker; `header` is `read_header`'s (None when unreadable). Yields
    ("error", chain, reason) for a member over a cap and an unreadable nested zip.
    """
    for entry in safe_zip.walk(archive, limits):
        if entry.error is not None or entry.archive is None or entry.info is None:
            yield ("error", entry.chain, entry.error)
            continue
        base = entry.chain[-1].lower().rsplit("/", 1)[-1]
        named = DICOM_NAME.search(base) is not None
        if not named and "." in base:
            continue
        try:
            with safe_zip.open_member(entry.archive, entry.info, limits) as stream:
                if not named and stream.read(132)[128:132] != b"DICM":
                    continue
                stream.seek(0)
                header = read_header(stream)
        except safe_zip.MemberError as err:
            yield ("error", entry.chain, err.reason)
            continue
        yield ("dicom", entry.chain, header)
