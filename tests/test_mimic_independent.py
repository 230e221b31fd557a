"""Acceptance: the MIMIC-CXR source on a release built by a separate author.

`tests/independent/mimic_release.py` was written from the public format description only,
without the project's code or its own fixture, and lays the releases out as PhysioNet's
`wget -r` leaves them (`physionet.org/files/mimic-cxr-jpg/2.0.0/`, with `index.html` files,
`SHA256SUMS.txt`, reports in the zip and on disk). Its `expected.json` is the ground truth
(split, view, subject and study, sections, CheXpert labels per dicom_id); the NegBio labels are
its `NEGBIO` table (written to `mimic-cxr-2.0.0-negbio.csv.gz`), and `nasty_cases.json` lists the
studies where NegBio and CheXpert disagree.

The default build runs in-process; the `--labels negbio`, `--labels text` and `--views` builds go
through the command line, once each, shared by the module.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from datasets import load_dataset

from mgll_data.build.engine import BuildOptions, build
from mgll_data.build.pipeline import load_pipeline
from mgll_data.vocab import load_vocabulary
from tests.conftest import run_module
from tests.independent.mimic_release import CHEXPERT, NEGBIO
from tests.mimic_fixture import make_independent_release

PIPELINE = load_pipeline("mimic_cxr")
NAMES = load_vocabulary("chest_xray").names
JPG_FILES = Path("physionet.org/files/mimic-cxr-jpg/2.0.0")

Rows = dict[str, dict]


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    return make_independent_release(tmp_path_factory.mktemp("independent-mimic"))


@pytest.fixture(scope="module")
def expected(release) -> dict[str, dict]:
    return json.loads((release / "expected.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def nasty(release) -> dict[str, list]:
    return json.loads((release / "nasty_cases.json").read_text(encoding="utf-8"))


def _read_build(out: Path) -> tuple[Rows, dict[str, str]]:
    """Rows by dicom_id and quarantine reasons by dicom_id of the build at `out`."""
    rows = {
        row["id"].split(":", 1)[1]: row
        for path in sorted((out / "data").glob("*.parquet"))
        for row in pq.read_table(path).to_pylist()
    }
    lines = (out / "_build" / "quarantine.jsonl").read_text().splitlines()
    quarantine = {json.loads(x)["id"].split(":", 1)[1]: json.loads(x)["reason"] for x in lines}
    return rows, quarantine


def _build(release: Path, out: Path, **source_options) -> tuple[Rows, dict[str, str]]:
    options = BuildOptions(
        image_size=64, progress=False, source_options=tuple(sorted(source_options.items()))
    )
    build(PIPELINE, release / "release", out, options)  # the folder above physionet.org/
    return _read_build(out)


def _cli_build(root: Path, out: Path, *flags: str) -> tuple[Rows, dict[str, str]]:
    """`mgll-build-dataset build mimic_cxr --root ROOT --out OUT --image-size 64 FLAGS`."""
    args = ["build", "mimic_cxr", "--root", str(root), "--out", str(out), "--image-size", "64"]
    result = run_module("mgll_data", [*args, "--no-progress", *flags], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return _read_build(out)


def _labels(row: dict) -> dict[str, float]:
    """The asserted (non-NaN) labels of a row, by vocabulary name."""
    return {n: v for n, v in zip(NAMES, row["labels"], strict=True) if not math.isnan(v)}


def _normalised(text: str) -> str:
    return " ".join(text.split())


def _usable(expected: dict[str, dict]) -> set[str]:
    """The dicom_ids that must become rows: a readable image in a split."""
    return {d for d, e in expected.items() if e["image_ok"] and e["split"] is not None}


def _assert_identity(rows: Rows, expected: dict[str, dict]) -> None:
    """Every row's view, patient and study are expected.json's (a blank view is no view)."""
    for dicom_id, row in rows.items():
        e = expected[dicom_id]
        assert row["view"] == (e["view"] or None), dicom_id
        assert row["patient_id"] == f"p{e['subject_id']}", dicom_id
        assert row["study_id"] == f"s{e['study_id']}", dicom_id


@pytest.fixture(scope="module")
def jpg_build(release, tmp_path_factory) -> tuple[Path, Rows, dict[str, str]]:
    out = tmp_path_factory.mktemp("mimic-independent-jpg") / "jpg"
    return (out, *_build(release, out))


@pytest.fixture(scope="module")
def negbio_build(release, tmp_path_factory) -> tuple[Rows, dict[str, str]]:
    out = tmp_path_factory.mktemp("mimic-independent-negbio") / "negbio"
    return _cli_build(release / "release", out, "--labels", "negbio")


@pytest.fixture(scope="module")
def views_build(release, tmp_path_factory) -> tuple[Rows, dict[str, str]]:
    out = tmp_path_factory.mktemp("mimic-independent-views") / "views"
    return _cli_build(release / "release", out, "--views", "PA,AP")


# Label CSVs rewritten to contradict the reports (the `--labels text` build must not read them):
# s52781130's report finds a pneumothorax, s50414267's finds nothing.
CONTRADICTIONS = {
    52781130: {"Pneumothorax": 0.0, "No Finding": 1.0},
    50414267: {"Pneumothorax": 1.0, "Pleural Effusion": 1.0},
}


def _contradict(csv_gz: Path) -> None:
    table = pd.read_csv(csv_gz)
    for study, labels in CONTRADICTIONS.items():
        row = table["study_id"] == study
        assert row.sum() == 1
        table.loc[row, [c for c in table.columns if c not in ("subject_id", "study_id")]] = None
        for name, value in labels.items():
            table.loc[row, name] = value
    text = io.StringIO()
    table.to_csv(text, index=False)
    csv_gz.write_bytes(gzip.compress(text.getvalue().encode()))


@pytest.fixture(scope="module")
def text_build(release, tmp_path_factory) -> tuple[Rows, dict[str, str]]:
    work = tmp_path_factory.mktemp("mimic-independent-text")
    root = work / "release"
    shutil.copytree(release / "release", root)
    for name in ("chexpert", "negbio"):
        _contradict(root / JPG_FILES / f"mimic-cxr-2.0.0-{name}.csv.gz")
    return _cli_build(root, work / "text", "--labels", "text")


def test_jpg_build_matches_the_independent_ground_truth(jpg_build, expected):
    out, rows, quarantine = jpg_build
    keep = _usable(expected)
    assert set(rows) == keep  # one row per usable image, nothing else
    assert set(quarantine) == set(expected) - keep  # every other image, with a reason
    for dicom_id, reason in quarantine.items():
        e = expected[dicom_id]
        if e["split"] is None:
            assert "no split" in reason
        else:
            assert "missing" in reason or "truncated" in reason or "corrupt" in reason, reason
    for dicom_id, row in rows.items():
        e = expected[dicom_id]
        assert row["split"] == e["split"], dicom_id
        assert row["text_description"] and row["text_explanation"]  # never empty
        if e["impression"] is not None:
            assert _normalised(row["text_description"]) == e["impression"], dicom_id
            assert row["text_origin"][1] == "impression"
        if e["findings"] is not None:
            assert _normalised(row["text_explanation"]) == e["findings"], dicom_id
        if e["chexpert"] is not None:  # CSV labels carried exactly
            assert _labels(row) == {k: float(v) for k, v in e["chexpert"].items()}, dicom_id
        missing = json.loads(row["extra"])["report"] == "missing"
        assert missing == (e["report"] == "missing"), dicom_id
        if missing:
            assert row["text_origin"][1] == "label_template"
    dataset = load_dataset(str(out))
    assert sum(len(split) for split in dataset.values()) == len(keep)


def test_rows_carry_the_expected_view_patient_and_study(jpg_build, expected):
    _, rows, _ = jpg_build
    _assert_identity(rows, expected)
    # the release's awkward views arrive as written: blank, "AP AXIAL", LL
    views = {row["view"] for row in rows.values()}
    assert {None, "AP AXIAL", "LL", "LATERAL", "PA", "AP"} <= views


def test_dicom_build_converts_every_image_in_a_split(release, expected, tmp_path):
    rows, quarantine = _build(release, tmp_path / "dicom", images="dicom")
    assert set(rows) == {d for d, e in expected.items() if e["split"] is not None}
    assert all("no split" in reason for reason in quarantine.values())
    _assert_identity(rows, expected)
    for row in rows.values():
        dicom = json.loads(row["extra"])["dicom"]
        assert dicom["Modality"] == "DX" and "PatientID" not in dicom
        assert "PatientName" not in row["extra"] and "StudyDate" not in dicom


@pytest.mark.wires("mgll-build-dataset build", "--labels")
def test_labels_negbio_carries_the_negbio_csv(negbio_build, expected, nasty):
    rows, _ = negbio_build
    assert set(rows) == _usable(expected)
    _assert_identity(rows, expected)
    disagree = {int(s[1:]) for s in nasty["negbio_disagrees_with_chexpert"]}
    assert disagree and all(NEGBIO[s] != CHEXPERT[s] for s in disagree)
    seen = set()
    for dicom_id, row in rows.items():
        study = expected[dicom_id]["study_id"]
        extra = json.loads(row["extra"])
        if study not in NEGBIO:  # absent from both CSVs: mined from the report instead
            assert extra["labels_from"] == "text", dicom_id
            continue
        assert extra["labels_from"] == "negbio", dicom_id
        assert _labels(row) == NEGBIO[study], dicom_id
        seen.add(study)
    assert disagree <= seen  # every disagreement was built, and NegBio's side won


@pytest.mark.wires("mgll-build-dataset build", "--labels")
def test_labels_text_come_from_the_reports_not_the_csvs(text_build, expected):
    rows, quarantine = text_build
    no_report = {d for d, e in expected.items() if e["report"] == "missing"}
    assert no_report  # s57375967: labelled in both CSVs, but its report is not in the release
    # a study with CSV labels but no report has nothing to mine: its images are refused
    assert set(rows) == _usable(expected) - no_report
    assert no_report & _usable(expected) <= set(quarantine)
    assert all("no report text" in quarantine[d] for d in no_report & _usable(expected))
    _assert_identity(rows, expected)
    assert {json.loads(r["extra"])["labels_from"] for r in rows.values()} == {"text"}

    def study_labels(study: int) -> dict[str, float]:
        found = [_labels(r) for d, r in rows.items() if expected[d]["study_id"] == study]
        assert found and all(labels == found[0] for labels in found)  # one label set a study
        return found[0]

    # "Moderate left apical pneumothorax without evidence of tension." (CSV: no pneumothorax)
    assert study_labels(52781130).get("Pneumothorax") == 1.0
    assert study_labels(52781130).get("No Finding") != 1.0
    # "No acute cardiopulmonary process." (CSV: pneumothorax and effusion)
    normal = study_labels(50414267)
    assert normal.get("No Finding") == 1.0
    assert normal.get("Pneumothorax") != 1.0 and normal.get("Pleural Effusion") != 1.0
    # "Acute right sixth and seventh rib fractures without pneumothorax."
    assert study_labels(59263316).get("Fracture") == 1.0
    assert study_labels(59263316).get("Pneumothorax") != 1.0
    # "Mild interstitial pulmonary edema and small bilateral pleural effusions. Stable
    # moderate cardiomegaly. ... No pneumothorax."
    chf = study_labels(53189527)
    assert chf.get("Edema") == chf.get("Pleural Effusion") == chf.get("Cardiomegaly") == 1.0
    assert chf.get("Pneumothorax") != 1.0


@pytest.mark.wires("mgll-build-dataset build", "--views")
def test_views_keeps_exactly_those_view_positions(views_build, expected):
    rows, quarantine = views_build
    wanted = {d for d in _usable(expected) if expected[d]["view"] in ("PA", "AP")}
    # neither "AP AXIAL" (not AP), nor a blank view, nor the laterals
    assert set(rows) == wanted
    assert any(expected[d]["view"] == "AP AXIAL" for d in _usable(expected))
    _assert_identity(rows, expected)
    # the corrupt AP image is still refused; filtered views are skipped, not quarantined
    assert set(quarantine) == {
        d for d, e in expected.items() if e["view"] in ("PA", "AP") and d not in wanted
    }
