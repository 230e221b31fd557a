"""MIMIC-CXR end to end: layouts, splits, quarantine, sections -> texts, CSV/text labels, DICOM."""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import shutil
import zipfile
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest

from mgll_data.build.engine import BuildOptions, build
from mgll_data.build.pipeline import load_pipeline
from mgll_data.errors import UserError
from mgll_data.record import read_mgll_metadata
from mgll_data.sources import make_source
from mgll_data.sources.mimic_cxr import parse_study_time
from mgll_data.vocab import load_vocabulary
from tests.dicom_fixture import PHI
from tests.mimic_fixture import (
    CHEXPERT,
    IDS,
    NEGBIO,
    make_release,
    strip_reports,
    write_report_files,
)

PIPELINE = load_pipeline("mimic_cxr")
VOCAB = load_vocabulary("chest_xray")
NAME = {v: k for k, v in IDS.items()}
CHEXPERT_14 = sorted(PIPELINE.raw["labels"]["map"].values())


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return make_release(tmp_path_factory.mktemp("mimic"))


def _build(root: Path, out: Path, **source_options) -> None:
    options = tuple(sorted(source_options.items()))
    build(PIPELINE, root, out, BuildOptions(progress=False, image_size=64, source_options=options))


def _rows(out: Path) -> dict[str, dict]:
    rows = {}
    for path in sorted((out / "data").glob("*.parquet")):
        for row in pq.read_table(path).to_pylist():
            rows[NAME[row["id"].split(":", 1)[1]]] = row
    return rows


def _quarantine(out: Path) -> dict[str, dict]:
    lines = (out / "_build" / "quarantine.jsonl").read_text().splitlines()
    return {NAME[json.loads(x)["id"].split(":", 1)[1]]: json.loads(x) for x in lines}


def _labels(row: dict) -> dict[str, float]:
    return {n: v for n, v in zip(VOCAB.names, row["labels"], strict=True) if not math.isnan(v)}


def _csv_labels(table: dict, study: str) -> dict[str, float]:
    return {k: float(v) for k, v in table[study].items()}


@pytest.fixture(scope="module")
def jpg_build(release, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "jpg"
    _build(release, out)
    return out


@pytest.fixture(scope="module")
def dicom_build(release, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "dicom"
    _build(release, out, images="dicom")
    return out


def test_jpg_build_rows_quarantine_and_dataset(jpg_build):
    rows = _rows(jpg_build)
    assert sorted(rows) == ["A1", "A2", "B1", "B2", "B3", "C1", "D1", "E1", "E2", "F3"]
    quarantine = _quarantine(jpg_build)
    assert sorted(quarantine) == ["F1", "F2", "G1"]
    assert "in no split" in quarantine["G1"]["reason"]
    assert (
        quarantine["F2"]["reason"].startswith("image missing")
        and quarantine["F2"]["stage"] == "scan"
    )
    assert quarantine["F1"]["stage"] == "image"  # corrupt JPG
    ds = datasets.load_dataset(str(jpg_build))
    assert {k: len(v) for k, v in ds.items()} == {"train": 6, "validation": 3, "test": 1}
    assert ds["train"][0]["image"].mode == "L"
    shard = next((jpg_build / "data").glob("*.parquet"))
    meta = read_mgll_metadata(pq.read_schema(shard), str(shard))
    assert sorted(meta["annotated_labels"]) == CHEXPERT_14
    card = (jpg_build / "README.md").read_text()
    assert "Credentialed" in card and "MIMIC-CXR-JPG" in card


def test_identifiers_views_and_order(jpg_build):
    rows = _rows(jpg_build)
    a1 = rows["A1"]
    assert a1["id"] == f"mimic_cxr:{IDS['A1']}"
    assert (a1["patient_id"], a1["study_id"], a1["split"]) == ("p10000032", "s50414267", "train")
    assert rows["D1"]["split"] == "validation"  # `validate` in the CSV
    assert rows["B3"]["view"] is None and rows["E2"]["view"] == "SWIMMERS"
    extra = {k: json.loads(r["extra"]) for k, r in rows.items()}
    # s53189527 at 08:05:56 (`80556.875`) precedes s50414267 at 21:30 on the same day.
    assert extra["B1"]["study_order"] == 0 and extra["A1"]["study_order"] == 1
    assert extra["C1"]["study_order"] == 2
    assert (
        "patient_orientation" not in extra["B2"] and extra["A1"]["patient_orientation"] == "Erect"
    )
    assert parse_study_time("80556.875") == pytest.approx(8 * 3600 + 5 * 60 + 56.875)
    assert parse_study_time("093412") == parse_study_time("93412") == 9 * 3600 + 34 * 60 + 12
    assert parse_study_time("250000") is None and parse_study_time("") is None
    for row in rows.values():  # no dates anywhere
        assert "21800506" not in row["extra"] and "2180" not in row["extra"]


def test_texts_come_from_the_right_sections(jpg_build):
    rows = _rows(jpg_build)
    assert rows["A1"]["text_description"] == "No acute cardiopulmonary process."
    assert rows["A1"]["text_explanation"].startswith("The lungs are clear without focal")
    assert "___" in rows["A1"]["text_explanation"]
    assert rows["A1"]["text_origin"] == ["labels", "impression", "findings"]
    b1 = rows["B1"]  # WET READ above; `IMPRESSON:` typo
    assert b1["text_description"].startswith("Moderate cardiomegaly with small bilateral")
    assert "prelim" not in b1["text_description"] and b1["text_origin"][1] == "impression"
    c1 = rows["C1"]  # no impression / findings
    assert c1["text_origin"] == ["labels", "last_paragraph", "vocabulary"]
    assert c1["text_description"].startswith("PA and lateral views of the chest")
    assert rows["D1"]["text_origin"] == ["labels", "label_template", "vocabulary"]  # no report
    assert json.loads(rows["D1"]["extra"])["report"] == "missing"
    f3 = rows["F3"]  # special-case study: its IMPRESSION is not a conclusion
    assert f3["text_origin"][1] == "label_template"
    assert json.loads(f3["extra"])["report"] == "indices"


def test_official_section_rules_from_the_users_copy(release, tmp_path):
    from tests.test_sections import OFFICIAL_RULES

    rules = tmp_path / "section_parser.py"
    rules.write_text(OFFICIAL_RULES)
    out = tmp_path / "out"
    _build(release, out, section_rules=str(rules))
    rows = _rows(out)
    assert rows["A1"]["text_description"] == "Chest PA and lateral"  # last TECHNIQUE section
    assert json.loads(rows["A1"]["extra"])["report"] == "section_name"
    assert rows["C1"]["text_origin"][1] == "label_template"  # [0, 0]: no conclusion at all
    assert json.loads(rows["C1"]["extra"])["report"] == "indices"
    assert rows["F3"]["text_origin"][1] == "label_template"  # the built-in case still holds


def test_csv_labels_exact_and_text_fallback(jpg_build):
    rows = _rows(jpg_build)
    for name, study in (("A1", "50414267"), ("B2", "53189527"), ("D1", "57375967")):
        assert _labels(rows[name]) == _csv_labels(CHEXPERT, study)
        assert json.loads(rows[name]["extra"])["labels_from"] == "chexpert"
    assert rows["B1"]["text_category"] == "Cardiomegaly, Pleural Effusion, Support Devices"
    # s56699142 is absent from the CSV: mined from its impression, only CheXpert's labels.
    assert _labels(rows["E1"]) == {"Pleural Effusion": 1.0, "Pneumothorax": 0.0}
    assert json.loads(rows["E1"]["extra"])["labels_from"] == "text"


def test_negbio_and_quarantine_policy(release, tmp_path):
    source = make_source(PIPELINE, release, VOCAB, {"labels": "negbio"})
    items = {NAME[i.id.split(":")[1]]: i for i in source.scan().items}
    assert items["B1"].labels == _csv_labels(NEGBIO, "53189527")
    assert items["B1"].labels["Edema"] == 0.0
    labels = dataclasses.replace(PIPELINE.labels, missing="quarantine")
    strict = make_source(dataclasses.replace(PIPELINE, labels=labels), release, VOCAB)
    scan = strict.scan()
    reasons = {NAME[q.id.split(":")[1]]: q.reason for q in scan.quarantine}
    assert "absent from mimic-cxr-2.0.0-chexpert.csv.gz" in reasons["E1"]


def test_text_labels_and_view_filter(release, tmp_path):
    source = make_source(PIPELINE, release, VOCAB, {"labels": "text", "views": "PA,AP"})
    scan = source.scan()
    items = {NAME[i.id.split(":")[1]]: i for i in scan.items}
    assert sorted(items) == ["A1", "B1", "C1", "E1", "F1", "F3"]  # F1: corrupt, image stage
    assert items["A1"].labels == {"No Finding": 1.0}
    b1 = items["B1"].labels  # impression: cardiomegaly, effusions, "edema cannot be excluded"
    assert b1["Cardiomegaly"] == 1.0 and b1["Pleural Effusion"] == 1.0 and b1["Edema"] == -1.0
    assert "No Finding" not in b1
    assert items["F3"].labels == {"No Finding": 1.0}  # special case: no conclusion at all
    reasons = {NAME[q.id.split(":")[1]]: q.reason for q in scan.quarantine}
    assert "no report text" in reasons["D1"]
    assert source.annotated_labels() == VOCAB.names


def test_dicom_build_no_phi_and_deterministic(release, dicom_build, tmp_path):
    rows = _rows(dicom_build)
    assert sorted(rows) == ["A1", "A2", "B1", "B2", "B3", "C1", "D1", "E1", "E2", "F3"]
    assert _quarantine(dicom_build)["F1"]["stage"] == "image"  # corrupt DICOM
    assert json.loads(rows["A1"]["extra"])["dicom"]  # .dcm.gz went through the DICOM stage
    for row in rows.values():
        blob = json.dumps({k: v for k, v in row.items() if k != "image"}, default=str)
        for value in PHI.values():
            assert value not in blob, value
        assert row["image"]["path"].startswith("mimic_cxr:")
    # Second build: byte-identical data and card.
    again = tmp_path / "again"
    _build(release, again, images="dicom")
    for path in sorted((dicom_build / "data").glob("*.parquet")):
        assert path.read_bytes() == (again / "data" / path.name).read_bytes()
    assert (dicom_build / "README.md").read_bytes() == (again / "README.md").read_bytes()


def test_reports_on_disk_only_and_layout_errors(release, tmp_path):
    root = tmp_path / "r"
    shutil.copytree(release, root)
    (root / "mimic-cxr/2.0.0/mimic-cxr-reports.zip").unlink()
    source = make_source(PIPELINE, root, VOCAB)
    items = {NAME[i.id.split(":")[1]]: i for i in source.scan().items}
    assert items["A1"].sections["impression"] == "No acute cardiopulmonary process."
    assert items["B1"].sections == {}  # its report was only in the zip
    with pytest.raises(UserError, match="--images 'png'"):
        make_source(PIPELINE, root, VOCAB, {"images": "png"})
    with pytest.raises(UserError, match="does not take --size"):
        make_source(PIPELINE, root, VOCAB, {"size": "1"})
    (root / "mimic-cxr-jpg/2.0.0/mimic-cxr-2.0.0-split.csv.gz").unlink()
    with pytest.raises(UserError, match="missing mimic-cxr-2.0.0-split.csv"):
        make_source(PIPELINE, root, VOCAB).scan()


def test_bad_label_value_is_one_line_error(release, tmp_path):
    root = tmp_path / "r"
    shutil.copytree(release, root)
    path = root / "mimic-cxr-jpg/2.0.0/mimic-cxr-2.0.0-chexpert.csv.gz"
    text = gzip.decompress(path.read_bytes()).decode().replace("-1.0", "maybe", 1)
    path.write_bytes(gzip.compress(text.encode()))
    with pytest.raises(UserError, match="expected 1.0, 0.0, -1.0 or blank") as err:
        make_source(PIPELINE, root, VOCAB).scan()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("folder", ["mimic-cxr/2.0.0", "mimic-cxr-reports"])
def test_report_files_found_without_record_list_or_zip(release, tmp_path, folder):
    # Reports unpacked into the MIMIC-CXR folder, or into a folder of their own beside the JPG
    # release; neither cxr-record-list.csv.gz nor mimic-cxr-reports.zip is there to locate them.
    root = write_report_files(strip_reports(shutil.copytree(release, tmp_path / "r")), folder)
    scan = make_source(PIPELINE, root, VOCAB).scan()
    items = {NAME[i.id.split(":")[1]]: i for i in scan.items}
    assert items["B1"].sections["impression"].startswith("Moderate cardiomegaly with small")
    assert items["E1"].sections["findings"] == "Small right pleural effusion. No pneumothorax."
    assert items["D1"].sections == {}  # s57375967 has no report anywhere
    # Studies with an item: A, B, C, D, E, F (G is in no split); D's report is missing.
    assert "reports found for 5 of 6 studies" in scan.notes
    assert not any(n.startswith("WARNING") for n in scan.notes)
    text = make_source(PIPELINE, root, VOCAB, {"labels": "text"}).scan()
    labels = {NAME[i.id.split(":")[1]]: i.labels for i in text.items}
    assert labels["B1"]["Cardiomegaly"] == 1.0 and labels["E1"]["Pleural Effusion"] == 1.0


def test_build_summary_counts_reports_and_warns_when_most_are_missing(release, jpg_build, tmp_path):
    manifest = json.loads((jpg_build / "_build" / "manifest.json").read_text())
    assert "reports found for 5 of 6 studies" in manifest["notes"]
    root = write_report_files(
        strip_reports(shutil.copytree(release, tmp_path / "r")), "mimic-cxr/2.0.0", ["50414267"]
    )
    out = tmp_path / "out"
    summary = build(
        PIPELINE, root, out, BuildOptions(progress=False, image_size=32, source_options=())
    )
    lines = summary.lines()
    assert "note: reports found for 1 of 6 studies" in lines
    warning = next(line for line in lines if "WARNING" in line)
    assert "most studies have no report (5 of 6)" in warning and "label templates" in warning
    assert _rows(out)["B1"]["text_origin"][1] == "label_template"


def test_oversized_reports_and_a_zip_bomb_are_skipped_and_counted(release, tmp_path):
    """A 2 MiB report file on disk and a zip member that declares 64 MiB (a bomb: zeros
    deflate ~1000x) are not read: their studies have no report, and a note says how many."""
    root = shutil.copytree(release, tmp_path / "r")
    cxr = root / "mimic-cxr" / "2.0.0"
    (cxr / "files/p10/p10000032/s50414267.txt").write_bytes(b"A" * (2 * 2**20))
    reports = cxr / "mimic-cxr-reports.zip"
    with zipfile.ZipFile(reports) as old:
        members = {info.filename: old.read(info) for info in old.infolist()}
    bomb = next(name for name in members if name.endswith("s53189527.txt"))
    members[bomb] = bytes(64 * 2**20)
    with zipfile.ZipFile(reports, "w", zipfile.ZIP_DEFLATED) as new:
        for name, data in members.items():
            new.writestr(name, data)
    out = tmp_path / "out"
    summary = build(
        PIPELINE, root, out, BuildOptions(progress=False, image_size=32, source_options=())
    )
    lines = summary.lines()
    assert "note: reports found for 3 of 6 studies" in lines  # 5 of 6 in the release
    assert (
        "note: 2 report files over 1 MiB or unreadable were skipped: their studies count as "
        "having no report" in lines
    )
    rows = _rows(out)
    assert rows["A1"]["text_origin"][1] == rows["B1"]["text_origin"][1] == "label_template"


def test_text_labels_without_any_report_stop_before_image_work(release, tmp_path):
    root = strip_reports(shutil.copytree(release, tmp_path / "r"))
    out = tmp_path / "out"
    options = BuildOptions(progress=False, image_size=32, source_options=(("labels", "text"),))
    with pytest.raises(UserError, match="--labels text needs report texts") as err:
        build(PIPELINE, root, out, options)
    message = str(err.value)
    assert "\n" not in message
    assert "files/pXX/pSUBJECT/sSTUDY.txt under" in message
    assert message.startswith(f"{root}: ")
    assert "under mimic-cxr-jpg/2.0.0, mimic-cxr/2.0.0" in message  # where it looked
    assert "no mimic-cxr-reports.zip found" in message
    assert not list(out.rglob("*.parquet"))  # stopped before any image was read


def test_mesh_labels_are_not_a_mimic_option(release):
    with pytest.raises(UserError, match="--labels 'mesh': expected one of"):
        make_source(PIPELINE, release, VOCAB, {"labels": "mesh"})
