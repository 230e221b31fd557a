"""MIDRC Data Commons (Gen3) downloads: node TSVs, the Gen3 manifest, per-study zips, mRALE.

Labels: `COVID-19` from the `measurement` node: the most recent `COVID-19` test with
0 <= days_to_study - test_days_from_index <= 14 (`labels.covid_window_days`); Positive = 1,
Negative = 0; two results on that day that disagree = -1; none = NaN. The mRALE CSV (optional)
adds `extra.mrale` (score and the four components, quality issue). Study zips
(`<case_id>/<study>.zip`, found anywhere under the root) are read in place; DICOMs are searched
recursively, into nested zips (at most 4 levels), with every member streamed under size and
compression-ratio caps (`sources/archives.py`).
"""

from __future__ import annotations

import ast
import csv
import fnmatch
import io
import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...build.items import QuarantineEntry, RawItem
from ...errors import ItemError, UserError
from ...imaging.files import open_release_file
from ..base import ScanResult
from ..tables import read_csv_table
from ..toolkit import decode_text, parse_finite, release_files
from .series import (
    ANON_MRN,
    SEX,
    DicomImage,
    MidrcSource,
    patient_key,
    short_hash,
    walk_zip,
)

NODES = ("case", "imaging_study", "radiography_exam", "dx_series", "cr_series", "measurement")
REQUIRED_NODES = ("case", "imaging_study")
REQUIRED_NODE_COLUMNS = (("case", ("submitter_id",)), ("imaging_study", ("study_uid", "case_ids")))
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
    """A Gen3 node TSV as rows of stripped strings (UTF-8 with a Latin-1 fallback, BOM dropped)."""
    text = decode_text(path.read_bytes()).removeprefix("\ufeff")
    reader = csv.DictReader(io.StringIO(text), delimiter="\t")
    if reader.fieldnames is None:
        raise UserError(f"{path}: empty node table (expected a header row)")
    rows = []
    for row in reader:
        rows.append({str(k).strip(): str(v or "").strip() for k, v in row.items() if k})
    return rows


@dataclass
class _Clinical:
    """The node tables a study's records draw on, keyed for lookup."""

    cases: dict[str, dict[str, str]]
    exams: dict[str, dict[str, str]]
    series: dict[str, dict[str, str]]
    tests: dict[str, list[tuple[float, str]]]
    mrale: dict[str, dict[str, Any]]


class MidrcCommonsSource(MidrcSource):
    """MIDRC Data Commons: node TSVs, the Gen3 manifest, per-study zips, optional mRALE CSV."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.window = self.pipeline.labels.covid_window_days
        self._files = sorted(release_files(self.root))
        self.tables = {node: self._find_node(node) for node in NODES}
        self.manifest = self._find_manifest()
        self.mrale = next(
            (p for p in self._files if fnmatch.fnmatchcase(p.name, "*mRALE*.csv")), None
        )

    def input_files(self) -> list[Path]:
        """The metadata files found in the release (for the build fingerprint)."""
        files = [p for p in self.tables.values() if p is not None]
        return files + [p for p in (self.manifest, self.mrale) if p is not None]

    def annotated_labels(self) -> list[str]:
        return ["COVID-19"]

    def scan(self) -> ScanResult:
        nodes = self._read_nodes()
        studies = {row["study_uid"]: row for row in nodes["imaging_study"] if row["study_uid"]}
        clinical = _Clinical(
            cases={row["submitter_id"]: row for row in nodes["case"]},
            exams={r.get("submitter_id", ""): r for r in nodes["radiography_exam"]},
            series={
                r.get("series_uid") or r.get("submitter_id", ""): r
                for r in (*nodes["dx_series"], *nodes["cr_series"])
            },
            tests=self._tests(nodes["measurement"]),
            mrale=self._mrale(),
        )
        result = ScanResult(items=[], inputs=self.input_files())
        images_by_study = self._zip_images(result)
        study_table = self.tables["imaging_study"]
        assert study_table is not None
        for study_uid in sorted(studies):
            found = images_by_study.pop(study_uid, [])
            if not found:
                result.quarantine.append(
                    QuarantineEntry(
                        f"{self.pipeline.name}:study-{short_hash(study_uid)}",
                        f"{study_table.name} study {short_hash(study_uid, 12)}",
                        "scan",
                        "no DICOM of this study in any downloaded zip",
                    )
                )
                continue
            result.items.extend(self._study_items(study_uid, studies[study_uid], found, clinical))
        ignored = sum(len(v) for v in images_by_study.values())
        result.notes.append(self._summary(len(studies), ignored, result.items))
        return result

    def _read_nodes(self) -> dict[str, list[dict[str, str]]]:
        """Every node table's rows; a UserError when a required table or column is missing."""
        missing = [f"{node}.tsv" for node in REQUIRED_NODES if self.tables[node] is None]
        if missing:
            raise UserError(
                f"{self.root}: not a MIDRC Data Commons download; missing node table(s) "
                + ", ".join(missing)
                + " (Gen3 TSV exports)"
            )
        nodes = {n: read_tsv(p) if p else [] for n, p in self.tables.items()}
        for node, columns in REQUIRED_NODE_COLUMNS:
            if nodes[node] and any(c not in nodes[node][0] for c in columns):
                raise UserError(
                    f"{self.tables[node]}: missing column(s) {list(columns)}; "
                    f"found {list(nodes[node][0])[:12]}"
                )
        return nodes

    def _study_items(
        self,
        study_uid: str,
        study: dict[str, str],
        images: list[DicomImage],
        clinical: _Clinical,
    ) -> list[RawItem]:
        """The records of one imaging study's DICOMs, with its case's clinical facts."""
        case_ids = parse_list(study.get("case_ids"))
        case_id = case_ids[0] if case_ids else ""
        case = clinical.cases.get(case_id, {})
        patient = patient_key(case_id) if case_id else "h" + short_hash(study_uid, 16)
        labels, covid_extra = self._covid(clinical.tests.get(case_id, []), study)
        exam = clinical.exams.get(study_uid, {})
        extra: dict[str, Any] = {"covid19": covid_extra}
        if study_uid in clinical.mrale:
            extra["mrale"] = clinical.mrale[study_uid]
        project = study.get("project_id") or case.get("project_id")
        if project:
            extra["project_id"] = project
        age = parse_finite(study.get("age_at_imaging")) or parse_finite(case.get("age_at_index"))
        items = []
        for image in images:
            header = image.header or {}
            series = clinical.series.get(header.get("SeriesInstanceUID", ""), {})
            table = {
                "study": exam.get("exam_description")
                or study.get("study_description")
                or parse_list(study.get("study_description_0"))[:1],
                "series": series.get("series_description", ""),
                "view": series.get("view_position") or exam.get("view_position", ""),
                "modality": series.get("modality", ""),
            }
            table = {k: v if isinstance(v, str) else "".join(v) for k, v in table.items()}
            items.append(
                self.make_item(
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
        return items

    def _summary(self, studies: int, ignored: int, items: list[RawItem]) -> str:
        zips = len({item.location.path for item in items})
        return (
            f"{studies} studies in imaging_study; images from {zips} zip(s) read in place"
            + (f"; {ignored} DICOMs of studies not in the node tables ignored" if ignored else "")
            + (f"; mRALE from {self.mrale.name}" if self.mrale else "")
            + (
                f"; manifest {self.manifest.name}: {_count_objects(self.manifest)} objects"
                if self.manifest
                else ""
            )
        )

    def _zip_images(self, result: ScanResult) -> dict[str, list[DicomImage]]:
        """The DICOMs of every study zip by StudyInstanceUID, read as streams (only headers
        are read, `walk_zip`); unreadable zips and members over a cap are quarantined."""
        by_study: dict[str, list[DicomImage]] = {}
        zips = [p for p in self._files if p.name.endswith(".zip")]
        for number, path in enumerate(zips, start=1):
            rel = f"zip {number} ({path.parent.name}/{short_hash(path.name, 8)})"
            if not ANON_MRN.search(path.parent.name):
                rel = f"zip {number}"
            try:
                with (
                    open_release_file(path, self.root, what="study zip") as file,
                    zipfile.ZipFile(file) as archive,
                ):
                    entries = list(walk_zip(archive))
            except (zipfile.BadZipFile, OSError, ItemError) as err:
                reason = err.reason if isinstance(err, ItemError) else str(err)
                result.quarantine.append(
                    QuarantineEntry(
                        f"{self.pipeline.name}:zip-{short_hash(str(path.relative_to(self.root)))}",
                        rel,
                        "scan",
                        f"study zip unreadable ({reason})",
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
                image = DicomImage(path=path, chain=chain, header=payload, label=label)
                study = (payload or {}).get("StudyInstanceUID")
                if study is None:
                    # No readable header: keep it with the zip's study (its name) so the image
                    # stage reports why it is unusable.
                    study = Path(path.name).stem
                by_study.setdefault(study, []).append(image)
        return by_study

    def _tests(self, rows: list[dict[str, str]]) -> dict[str, list[tuple[float, str]]]:
        """Each case's COVID-19 tests: (days from index, positive / negative)."""
        tests: dict[str, list[tuple[float, str]]] = {}
        for row in rows:
            if "covid" not in row.get("test_name", "").lower():
                continue
            day = parse_finite(row.get("test_days_from_index"))
            result = row.get("test_result_text", "").strip().lower()
            if day is None or result not in ("positive", "negative"):
                continue
            for case_id in parse_list(row.get("case_ids") or row.get("cases.submitter_id")):
                tests.setdefault(case_id, []).append((day, result))
        return tests

    def _covid(
        self, tests: list[tuple[float, str]], study: dict[str, str]
    ) -> tuple[dict[str, float], dict[str, Any]]:
        """The most recent test 0..window days before the study: 1 / 0, -1 when it disagrees."""
        day = parse_finite(study.get("days_to_study"))
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
        """The mRALE scores by StudyInstanceUID (none without the CSV)."""
        if self.mrale is None:
            return {}
        table = read_csv_table(self.mrale, ("StudyInstanceUID", "mRALE Score"))
        out = {}
        for row in table.to_dict("records"):
            entry: dict[str, Any] = {"score": parse_finite(row["mRALE Score"])}
            for column in MRALE_COLUMNS:
                if column in row:
                    entry[column.removesuffix("_numerical")] = parse_finite(row[column])
            issue = str(row.get("quality_issue", "")).strip()
            if issue:
                entry["quality_issue"] = issue
            out[str(row["StudyInstanceUID"]).strip()] = entry
        return out

    def _find_node(self, node: str) -> Path | None:
        """`<node>.tsv`, or `<node>_<anything>.tsv` as Gen3 names its exports."""
        pattern = re.compile(rf"^{node}(?:[_-][\w.-]*)?\.tsv$", re.IGNORECASE)
        return next(
            (p for p in self._files if p.name.endswith(".tsv") and pattern.match(p.name)), None
        )

    def _find_manifest(self) -> Path | None:
        """The gen3-client manifest: a JSON list of objects with `object_id`."""
        for path in self._files:
            if not path.name.endswith(".json"):
                continue
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, OSError, UnicodeDecodeError):
                continue
            if isinstance(data, list) and data and isinstance(data[0], dict):
                if "object_id" in data[0]:
                    return path
        return None


def _count_objects(path: Path) -> int:
    try:
        return len(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, OSError, UnicodeDecodeError):
        return 0
