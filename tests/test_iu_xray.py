"""IU X-ray (Open-i NLMCXR) end to end on real development reports: both layouts, MeSH and text
labels, de-identification tokens, DICOM-header PHI, quarantine.

HELD OUT: the fixture holds only reports numbered n % 4 != 0, filtered by member name before
any is opened (`tests/iu_fixture.py`); nothing here reads the others.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest
import yaml

from mgll_data.build.engine import BuildOptions, build
from mgll_data.build.pipeline import load_pipeline
from mgll_data.errors import UserError
from mgll_data.record import read_mgll_metadata
from mgll_data.sources import make_source
from mgll_data.vocab import load_vocabulary
from tests.conftest import run_module
from tests.iu_fixture import BOMB, MALFORMED, MISSING_IMAGE, dev_reports, make_release
from tests.iu_fixture import metadata_rows as fixture_metadata

PIPELINE = load_pipeline("iu_xray")
VOCAB = load_vocabulary("chest_xray")
MESH_MAP = PIPELINE.raw["labels"]["map"]  # the pipeline's table is the specification
# Read straight from the raw XML bytes, independently of the source's ElementTree parsing.
MAJOR = re.compile(rb"<major>([^<]*)</major>")
PARENT = re.compile(rb'<parentImage id="([^"]+)"')
SECTION = re.compile(rb'<AbstractText Label="(FINDINGS|IMPRESSION)">([^<]*)</AbstractText>')
# DICOM header columns that identify a patient or a visit: none may reach any output file.
PHI_COLUMNS = (
    "Accession Number",
    "Patient's Birth Date",
    "Study Date",
    "Content Date",
    "Study Instance UID",
    "Series Instance UID",
    "SOP Instance UID",
    "Requested Procedure ID",
    "Reason for the Requested Procedure",
    "Issue Date of Imaging Service Request",
    "Performed Procedure Step Start Time",
)


def _build(root: Path, out: Path, **source_options: str) -> Path:
    options = tuple(sorted(source_options.items()))
    build(PIPELINE, root, out, BuildOptions(progress=False, image_size=32, source_options=options))
    return out


def _rows(out: Path) -> dict[str, dict]:
    rows = {}
    for path in sorted((out / "data").glob("*.parquet")):
        for row in pq.read_table(path).to_pylist():
            rows[row["id"].split(":", 1)[1]] = row
    return rows


def _quarantine(out: Path) -> dict[str, dict]:
    lines = (out / "_build" / "quarantine.jsonl").read_text().splitlines()
    return {json.loads(x)["id"].split(":", 1)[1]: json.loads(x) for x in lines}


def _values(row: dict) -> dict[str, float]:
    return {n: v for n, v in zip(VOCAB.names, row["labels"], strict=True) if not math.isnan(v)}


def _expected_mesh() -> tuple[dict[str, set[str]], set[str]]:
    """image id -> the labels its report's MeSH headings give, and the unindexed images."""
    expected, unindexed = {}, set()
    for _, data in dev_reports():
        headings = {m.split(b"/")[0].strip().decode() for m in MAJOR.findall(data)}
        images = [i.decode() for i in PARENT.findall(data) if i.decode() != MISSING_IMAGE]
        if "No Indexing" in headings:
            unindexed.update(images)
            continue
        findings = {MESH_MAP[h] for h in headings if h in MESH_MAP and h != "normal"}
        labels = findings or ({"No Finding"} if "normal" in headings else set())
        expected.update(dict.fromkeys(images, labels))
    return expected, unindexed


@pytest.fixture(scope="module")
def tgz_build(tmp_path_factory):
    root = make_release(tmp_path_factory.mktemp("iu") / "raw", "tgz")
    return _build(root, tmp_path_factory.mktemp("iu-out") / "tgz")


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    return make_release(tmp_path_factory.mktemp("iu") / "raw", "extracted")


@pytest.fixture(scope="module")
def extracted_build(extracted, tmp_path_factory):
    return _build(extracted, tmp_path_factory.mktemp("iu-out") / "extracted")


def test_tgz_build_opens_with_load_dataset_and_keeps_reports_whole(tgz_build):
    rows = _rows(tgz_build)
    expected, unindexed = _expected_mesh()
    assert sorted(rows) == sorted(expected)  # every named image with a PNG, indexed reports
    ds = datasets.load_dataset(str(tgz_build))
    assert sum(len(split) for split in ds.values()) == len(rows)
    assert ds["train"][0]["image"].mode == "L"
    splits_by_report: dict[str, set[str]] = {}
    for row in rows.values():
        assert row["patient_id"] == row["study_id"] == row["id"].split(":")[1].split("_")[0]
        splits_by_report.setdefault(row["study_id"], set()).add(row["split"])
    assert all(len(s) == 1 for s in splits_by_report.values())  # a report is never split
    assert len({s for v in splits_by_report.values() for s in v}) > 1
    shard = next((tgz_build / "data").glob("*.parquet"))
    meta = read_mgll_metadata(pq.read_schema(shard), str(shard))
    assert set(meta["annotated_labels"]) == set(MESH_MAP.values())
    assert "CC BY-NC-ND 4.0" in (tgz_build / "README.md").read_text()


def test_mesh_labels_match_the_headings(tgz_build):
    rows = _rows(tgz_build)
    expected, _ = _expected_mesh()
    counts = Counter(n for row in rows.values() for n, v in _values(row).items() if v == 1.0)
    wanted = Counter(label for labels in expected.values() for label in labels)
    assert counts == wanted and len(wanted) >= 5
    for image, labels in expected.items():  # every mapped label asserted, 0 unless a heading
        values = _values(rows[image])
        assert set(values) == set(MESH_MAP.values())
        assert {n for n, v in values.items() if v == 1.0} == labels, image
    # By hand: CXR1 `normal`; CXR10 `Calcified Granuloma`; CXR1001 `Markings`, `Fibrosis`
    # (neither mapped); CXR1034 `Calcified Granuloma`, `Hernia, Hiatal`.
    assert rows["CXR1_1_IM-0001-3001"]["positive_labels"] == ["No Finding"]
    assert rows["CXR10_IM-0002-1001"]["positive_labels"] == ["Lung Lesion"]
    assert rows["CXR1001_IM-0004-1001"]["positive_labels"] == []
    assert sorted(rows["CXR1034_IM-0028-1001"]["positive_labels"]) == ["Hernia", "Lung Lesion"]


def test_texts_come_from_sections_without_deid_tokens(tgz_build):
    rows = _rows(tgz_build)
    tokens = sum(b"XXXX" in text for _, data in dev_reports() for _, text in SECTION.findall(data))
    assert tokens >= 10  # the fixture's reports do carry the token
    for row in rows.values():
        for column in ("text_category", "text_description", "text_explanation"):
            assert "XXXX" not in row[column], (row["id"], row[column])
    r1001 = rows["CXR1001_IM-0004-1001"]
    assert r1001["text_description"] == "Diffuse fibrosis. No visible focal acute disease."
    assert r1001["text_explanation"] == (
        "Interstitial markings are diffusely prominent throughout both lungs. Heart size is "
        "normal. Pulmonary ___ normal."
    )
    assert r1001["text_origin"] == ["labels", "impression", "findings"]


def test_dicom_metadata_whitelisted_and_phi_never_written(tgz_build):
    rows = _rows(tgz_build)
    header, metadata = fixture_metadata()
    phi = {
        row[header.index(c)]
        for row in metadata
        for c in PHI_COLUMNS
        if len(row[header.index(c)]) > 5
    }
    assert len(phi) > 50  # the fixture's table carries them
    # The whitelisted fields did arrive (real values of the CSV's CXR1001 rows).
    first, lateral = rows["CXR1001_IM-0004-1001"], rows["CXR1001_IM-0004-1002"]
    assert (first["view"], lateral["view"], first["modality"]) == ("PA", "LL", "CR")
    assert json.loads(first["extra"])["patient_orientation"] == ["L", "F"]
    blobs = [json.dumps([{k: v for k, v in r.items() if k != "image"} for r in rows.values()])]
    blobs += [
        p.read_text(errors="replace")
        for p in sorted(tgz_build.rglob("*"))
        if p.is_file() and p.suffix != ".parquet"
    ]
    for value in sorted(phi):
        assert not any(value in blob for blob in blobs), value


def test_quarantine_missing_image_malformed_xml_and_unindexed(tgz_build, extracted_build):
    _, unindexed = _expected_mesh()
    for out, missing_reason in ((tgz_build, "image found in no archive"), (extracted_build, "")):
        quarantine = _quarantine(out)
        assert sorted(quarantine) == sorted(
            [MISSING_IMAGE, f"CXR{MALFORMED}", f"CXR{BOMB}", *unindexed]
        )
        assert quarantine[MISSING_IMAGE]["reason"].startswith(
            missing_reason or f"image missing: {MISSING_IMAGE}.png"
        )
        assert quarantine[f"CXR{MALFORMED}"]["reason"].startswith("malformed report XML")
        assert "amplification" in quarantine[f"CXR{BOMB}"]["reason"]  # entity bomb refused
        assert all("not indexed" in quarantine[i]["reason"] for i in unindexed) and unindexed


def test_extracted_layout_builds_the_same_bytes(tgz_build, extracted_build):
    names = sorted(p.name for p in (tgz_build / "data").glob("*.parquet"))
    assert names == sorted(p.name for p in (extracted_build / "data").glob("*.parquet"))
    for name in names:
        assert (tgz_build / "data" / name).read_bytes() == (
            extracted_build / "data" / name
        ).read_bytes()


@pytest.mark.wires("mgll-build-dataset build", "--labels")
def test_text_labels_from_the_command_line(extracted, tmp_path):
    out = tmp_path / "text"
    args = ["build", "iu_xray", "--root", str(extracted), "--out", str(out), "--labels", "text"]
    result = run_module("mgll_data", [*args, "--image-size", "32", "--no-progress"])
    assert result.returncode in (0, 1), result.stderr
    assert "labels text" in result.stdout
    rows = _rows(out)
    _, unindexed = _expected_mesh()
    assert unindexed <= set(rows)  # not indexed in MeSH, labelled from its text
    # "Diffuse fibrosis": a label the MeSH table cannot give (its heading maps to nothing).
    assert _values(rows["CXR1001_IM-0004-1001"])["Fibrosis"] == 1.0
    shard = next((out / "data").glob("*.parquet"))
    assert read_mgll_metadata(pq.read_schema(shard), str(shard))["annotated_labels"] == VOCAB.names


def test_layout_and_option_errors_are_one_line(tmp_path, extracted):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="missing NLMCXR_reports.tgz") as err:
        make_source(PIPELINE, tmp_path / "empty", VOCAB).scan()
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=r"--labels 'chexpert': expected one of \['mesh', 'text'\]"):
        make_source(PIPELINE, extracted, VOCAB, {"labels": "chexpert"})
    # A pipeline of this source that names no options still defaults to the MeSH labels.
    raw = {k: v for k, v in PIPELINE.raw.items() if k != "options"}
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    mine = make_source(load_pipeline(str(tmp_path / "mine.yaml")), extracted, VOCAB)
    assert set(mine.annotated_labels()) == set(MESH_MAP.values()) != set(VOCAB.names)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "NLMCXR_reports.tgz").write_bytes(b"\x1f\x8b\x08\x00 not a gzip stream")
    (broken / "CXR1_1_IM-0001-3001.png").write_bytes(b"")
    with pytest.raises(UserError, match="NLMCXR_reports.tgz: not a readable tar archive"):
        make_source(PIPELINE, broken, VOCAB).scan()
