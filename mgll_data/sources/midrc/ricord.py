"""RICORD-1c (MIDRC's COVID-19 chest radiographs) as downloaded from TCIA.

Layout: the NBIA Data Retriever's `metadata.csv` (one row per series, with the series folder),
the descriptive DICOM folder tree, and the MD.ai annotation export (JSON).

Labels:
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
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...build.items import QuarantineEntry
from ...errors import ItemError, UserError
from ...imaging.files import open_release_file
from ..base import ScanResult
from ..tables import read_csv_table
from ..toolkit import find_file, is_hidden, release_files
from .series import DicomImage, MidrcSource, clean, patient_key, read_header, short_hash

# metadata.csv has 17 columns; these are the ones the reader needs.
REQUIRED_METADATA = ("Series UID", "Subject ID", "Study UID", "File Location")


class MidrcRicordSource(MidrcSource):
    """RICORD-1c from TCIA: metadata.csv, the descriptive DICOM tree, the MD.ai export JSON."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        labels = self.pipeline.labels
        self.label_map = labels.map
        self.groups = labels.groups
        self.group_of = {name: g for g, names in self.groups.items() for name in names}
        self.policy = labels.reader_policy
        self.unannotated = labels.unannotated
        self.covid_all = labels.covid19_all_positive
        self.metadata = find_file(self.root, ("metadata.csv",), max_depth=1)
        self.annotations = _find_annotation_json(self.root)

    def input_files(self) -> list[Path]:
        """The metadata files found in the release (for the build fingerprint)."""
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
        result = ScanResult(items=[], inputs=self.input_files())
        seen_studies: set[str] = set()
        for number, row in zip(table.index, table.to_dict("records"), strict=True):
            study_uid = self._series(result, number, row, readers)
            if study_uid is not None:
                seen_studies.add(study_uid)
        for study_uid in sorted(set(readers) - seen_studies):
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

    def _series(
        self,
        result: ScanResult,
        number: int,
        row: dict[str, str],
        readers: dict[str, dict[str, dict[str, str]]],
    ) -> str | None:
        """The items of one metadata.csv row (a series folder); its study UID, or None when the
        folder holds no DICOM."""
        assert self.metadata is not None
        series_uid = clean(row["Series UID"])
        study_uid = clean(row["Study UID"])
        where = f"{self.metadata.name} row {number}"
        folder = self._folder(row["File Location"])
        # AppleDouble twins (`._1-1.dcm`) of a macOS copy match the glob but are not DICOMs.
        found = folder.glob("*.dcm") if folder is not None else ()
        files = sorted(path for path in found if not is_hidden(path.name))
        if not files:
            result.quarantine.append(
                QuarantineEntry(
                    f"{self.pipeline.name}:series-{short_hash(series_uid)}",
                    where,
                    "scan",
                    "series folder missing or holds no .dcm file",
                )
            )
            return None
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
            return study_uid
        labels, extra = self._labels(study_readers)
        table_fields = {
            "study": row.get("Study Description", ""),
            "series": row.get("Series Description", ""),
            "modality": row.get("Modality", ""),
        }
        patient = patient_key(row["Subject ID"])
        for index, path in enumerate(files):
            image = DicomImage(
                path=path,
                chain=(),
                header=self._header(path),
                label=f"{self.metadata.name} row {number} file {index + 1}",
            )
            result.items.append(
                self.make_item(
                    image,
                    fallback_id=short_hash(f"{series_uid}/{index}"),
                    patient=patient,
                    study_uid=study_uid,
                    labels=labels,
                    table=table_fields,
                    extra=dict(extra),
                )
            )
        return study_uid

    def _header(self, path: Path) -> dict[str, str] | None:
        """The DICOM's descriptive header; None when it cannot be read. A FIFO or a symlink
        out of the release is never read here: the image stage quarantines it with the reason."""
        try:
            with open_release_file(path, self.root, what="DICOM file") as file:
                return read_header(file)
        except ItemError:
            return None

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
                study = clean(ann.get("StudyInstanceUID"))
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


def combine(votes: list[str], values: Sequence[str], policy: str) -> dict[str, float]:
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


def _find_annotation_json(root: Path) -> Path | None:
    """The MD.ai export: a `.json` named like `*annotation*`, at the root or one folder down."""
    found = sorted(
        path
        for path in release_files(root, max_depth=1)
        if path.name.endswith(".json") and "annotation" in path.name.lower()
    )
    return found[0] if found else None
