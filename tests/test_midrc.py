"""MIDRC end to end: RICORD-1c (TCIA + MD.ai) and Data Commons (node TSVs + study zips)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest

from mgll_data.build.engine import BuildOptions, build
from mgll_data.build.pipeline import load_pipeline
from mgll_data.errors import UserError
from mgll_data.publish.inspect import validate_dataset
from mgll_data.publish.merge import merge
from mgll_data.record import read_mgll_metadata
from mgll_data.sources.midrc.commons import parse_list
from mgll_data.sources.midrc.ricord import combine
from mgll_data.vocab import load_vocabulary
from tests.dicom_fixture import PHI
from tests.fake_hub import build_dataset, write_release
from tests.midrc_fixture import DC_STUDY, PHI_TEXT, STUDY, make_commons, make_ricord

VOCAB = load_vocabulary("chest_xray")
APPEARANCE = ["Typical Appearance", "Indeterminate Appearance", "Atypical Appearance",
              "Negative for Pneumonia"]  # fmt: skip
GRADE = ["Mild Airspace Disease", "Moderate Airspace Disease", "Severe Airspace Disease"]


def _build(name: str, root: Path, out: Path) -> Path:
    build(load_pipeline(name), root, out, BuildOptions(progress=False, image_size=64))
    return out


def _rows(out: Path) -> list[dict]:
    rows = []
    for path in sorted((out / "data").glob("*.parquet")):
        rows += pq.read_table(path).to_pylist()
    return rows


def _by_study(rows: list[dict], uids: dict[str, str]) -> dict[str, list[dict]]:
    from mgll_data.sources.midrc.series import short_hash

    keys = {"s" + short_hash(uid, 16): name for name, uid in uids.items()}
    out: dict[str, list[dict]] = {}
    for row in rows:
        out.setdefault(keys[row["study_id"]], []).append(row)
    return out


def _labels(row: dict) -> dict[str, float]:
    return {n: v for n, v in zip(VOCAB.names, row["labels"], strict=True) if not math.isnan(v)}


def _quarantine(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "_build/quarantine.jsonl").read_text().splitlines()]


def _all_output_bytes(out: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file())


@pytest.fixture(scope="module")
def ricord(tmp_path_factory):
    root = make_ricord(tmp_path_factory.mktemp("ricord"))
    return root, _build("midrc_ricord", root, tmp_path_factory.mktemp("out") / "ricord")


@pytest.fixture(scope="module")
def commons(tmp_path_factory):
    root = make_commons(tmp_path_factory.mktemp("commons"))
    return root, _build("midrc_commons", root, tmp_path_factory.mktemp("out") / "commons")


def test_vocabulary_appends_midrc_labels_after_the_original_21():
    assert VOCAB.version == "1.3.0" and len(VOCAB) == 30
    assert VOCAB.names[0] == "No Finding" and VOCAB.names[20] == "Pleural Thickening"
    assert VOCAB.names[21:29] == ["COVID-19", *APPEARANCE, *GRADE]
    for name in VOCAB.names[21:29]:
        label = VOCAB.label(name)
        assert label.explanation and label.positive_prompts and label.negative_prompts


def test_reader_combination_policies():
    values = ["T", "I", "A", "N"]
    assert combine(["T", "T", "I"], values, "majority") == {"T": 1, "I": 0, "A": 0, "N": 0}
    assert combine(["T", "I", "A"], values, "majority") == {"T": -1, "I": -1, "A": -1, "N": 0}
    assert combine(["T", "I"], values, "majority") == {"T": -1, "I": -1, "A": 0, "N": 0}
    assert combine(["T", "T", "I"], values, "unanimous") == {"T": -1, "I": -1, "A": 0, "N": 0}
    assert combine(["T", "T"], values, "unanimous") == {"T": 1, "I": 0, "A": 0, "N": 0}
    assert combine(["T", "I"], values, "any") == {"T": 1, "I": 1, "A": 0, "N": 0}
    assert combine([], values, "majority") == {}


def test_parse_list_cells():
    assert parse_list("['419639-002973']") == ["419639-002973"]
    assert parse_list("['a', 'b']") == ["a", "b"]
    assert parse_list('"a,b"') == ["a", "b"]
    assert parse_list("ORIGINAL,PRIMARY,") == ["ORIGINAL", "PRIMARY"]
    assert parse_list("") == []


def test_ricord_rows_labels_texts_and_quarantine(ricord):
    _, out = ricord
    studies = _by_study(_rows(out), STUDY)
    assert {k: len(v) for k, v in studies.items()} == {"R1": 2, "R2": 1, "R3": 1}
    # R1: majority Typical/Moderate; reader 1's earlier Atypical/Severe annotation is superseded
    r1 = studies["R1"][0]
    expected = dict.fromkeys([*APPEARANCE, *GRADE], 0.0)
    expected.update({"COVID-19": 1.0, "Typical Appearance": 1.0, "Moderate Airspace Disease": 1.0})
    assert _labels(r1) == expected
    extra = json.loads(r1["extra"])
    assert extra["reader_policy"] == "majority" and len(extra["readers"]) == 3
    assert sorted(c["appearance"] for c in extra["readers"].values()) == [
        "Indeterminate Appearance", "Typical Appearance", "Typical Appearance"]  # fmt: skip
    assert all(r.startswith("reader-") for r in extra["readers"])
    assert r1["text_category"] == "COVID-19, Typical Appearance, Moderate Airspace Disease"
    assert {r["text_description"] for r in studies["R1"]} == {"XR CHEST 1 VIEW AP"}
    explanations = {r["modality"]: r["text_explanation"] for r in studies["R1"]}
    assert explanations == {
        "CR": "View AP, modality CR, body part CHEST.",
        "DX": "Series: CHEST AP PORTABLE. View AP, modality DX, body part CHEST.",
    }
    assert r1["text_origin"] == ["labels", "study_description", "series_text"]
    # R2: three-way disagreement and a tied grade -> uncertain; the Exclude label ignored
    r2 = _labels(studies["R2"][0])
    assert [r2[n] for n in APPEARANCE] == [-1.0, -1.0, -1.0, 0.0]
    assert [r2[n] for n in GRADE] == [-1.0, 0.0, -1.0]
    assert studies["R2"][0]["text_description"] == "CHEST 1V"
    # R3: no annotation -> reader labels NaN, COVID-19 from the inclusion criterion
    assert _labels(studies["R3"][0]) == {"COVID-19": 1.0}
    assert json.loads(studies["R3"][0]["extra"])["readers"] == {}
    for row in (r1, studies["R3"][0]):
        assert row["patient_id"] in ("419639-000001", "440808-000002")
        assert row["sex"] == "F" and row["age_years"] == 45.0
    reasons = sorted(q["reason"].split(" (")[0] for q in _quarantine(out))
    assert reasons == [
        "DICOM is For Processing",
        "annotated study has no image in the download",
        "not a DICOM image",
    ]
    shard = sorted((out / "data").glob("*.parquet"))[0]
    block = read_mgll_metadata(pq.read_schema(shard), shard)
    assert block["vocab_version"] == "1.3.0"
    assert block["annotated_labels"] == ["COVID-19", *APPEARANCE, *GRADE]
    assert (
        "noncommercial" in (out / "README.md").read_text()
        or "CC BY-NC 4.0" in (out / "README.md").read_text()
    )


def test_ricord_dataset_opens_and_has_no_phi(ricord):
    root, out = ricord
    loaded = datasets.load_dataset(str(out))
    assert sum(len(split) for split in loaded.values()) == 4
    blob = _all_output_bytes(out)
    planted = [*PHI.values(), *PHI_TEXT, "manifest-1612365584013", str(root)]
    found = [value for value in planted if value.encode() in blob or value.lower().encode() in blob]
    assert found == []
    assert b"MIDRC-RICORD-1C-419639" not in blob  # folder / DICOM PatientID text
    assert validate_dataset(out) == []
    assert "This dataset is DICOM-derived" in (out / "README.md").read_text()


def test_ricord_unannotated_quarantine_policy_and_missing_layout(ricord, tmp_path):
    import yaml

    root, _ = ricord
    raw = yaml.safe_load(load_pipeline("midrc_ricord").path.read_text())
    raw["labels"]["unannotated"] = "quarantine"
    raw["labels"]["reader_policy"] = "any"
    variant = tmp_path / "variant.yaml"
    variant.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    build(load_pipeline(str(variant)), root, out, BuildOptions(progress=False, image_size=64))
    studies = _by_study(_rows(out), STUDY)
    assert sorted(studies) == ["R1", "R2"]
    assert [_labels(studies["R2"][0])[n] for n in APPEARANCE] == [1.0, 1.0, 1.0, 0.0]
    assert any("no reader annotation" in q["reason"] for q in _quarantine(out))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="metadata.csv"):
        build(load_pipeline("midrc_ricord"), empty, tmp_path / "o2", BuildOptions(progress=False))


def test_commons_rows_covid_window_mrale_and_nested_zips(commons):
    root, out = commons
    studies = _by_study(_rows(out), DC_STUDY)
    assert {k: len(v) for k, v in studies.items()} == {"C1": 3, "C2": 1, "C4": 1}
    for row in studies["C1"]:  # top level, nested, doubly nested: all read in place
        assert _labels(row) == {"COVID-19": 1.0}
        assert row["text_description"] == "XR CHEST 1 VIEW AP"
        assert row["text_explanation"] == "Series: CHEST AP. View AP, modality DX, body part CHEST."
        assert row["patient_id"] == "419639-002973" and row["sex"] == "F"
        extra = json.loads(row["extra"])
        assert extra["mrale"]["score"] == 6.0 and extra["covid19"]["days_before_study"] == 7.0
        assert extra["dicom"]["Modality"] == "DX"
    c2 = studies["C2"][0]
    assert _labels(c2) == {"COVID-19": 0.0}  # -30 positive is outside the window; day 0 negative
    # COVID-negative says nothing of other findings: not the normals' "No Finding"
    assert c2["text_category"] == "No COVID-19" and c2["modality"] == "CR"
    assert json.loads(c2["extra"])["mrale"]["quality_issue"] == "Other QA"
    assert _labels(studies["C4"][0]) == {"COVID-19": -1.0}
    assert studies["C4"][0]["text_category"] == "Possible COVID-19"
    reasons = sorted(q["reason"].split(" (")[0] for q in _quarantine(out))
    assert reasons == [
        "DICOM is For Processing",
        "no DICOM of this study in any downloaded zip",
        "not a DICOM image",
    ]
    # zips are read in place: nothing was extracted next to them
    assert sorted(p.suffix for p in (root / "downloads").rglob("*") if p.is_file()) == [".zip"] * 3


def test_commons_dataset_opens_and_has_no_phi(commons):
    root, out = commons
    loaded = datasets.load_dataset(str(out))
    assert sum(len(split) for split in loaded.values()) == 5
    blob = _all_output_bytes(out)
    planted = [*PHI.values(), *PHI_TEXT, str(root)]
    found = [value for value in planted if value.encode() in blob or value.lower().encode() in blob]
    assert found == []
    assert validate_dataset(out) == []
    with pytest.raises(UserError, match="imaging_study"):
        (root / "imaging_study.tsv").rename(root / "moved.txt")
        try:
            _build("midrc_commons", root, out.parent / "again")
        finally:
            (root / "moved.txt").rename(root / "imaging_study.tsv")


def test_midrc_merges_with_chestxray14(ricord, commons, tmp_path):
    nih = build_dataset(write_release(tmp_path / "nih"), tmp_path / "nih_out")
    merged = tmp_path / "merged"
    merge([nih, ricord[1], commons[1]], merged)
    assert validate_dataset(merged) == []
    loaded = datasets.load_dataset(str(merged))
    ids = {i for split in loaded.values() for i in split["id"]}
    assert {i.split(":")[0] for i in ids} == {"chestxray14", "midrc_ricord", "midrc_commons"}
    assert all(len(labels) == len(VOCAB) for split in loaded.values() for labels in split["labels"])
