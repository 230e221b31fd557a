"""Fundus end to end: the vocabulary, ODIR-5K, RFMiD, APTOS 2019, EyePACS, and their merge."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from mgll_data.build.engine import BuildOptions, build
from mgll_data.build.pipeline import load_pipeline
from mgll_data.errors import UserError
from mgll_data.publish.inspect import validate_dataset
from mgll_data.publish.merge import merge
from mgll_data.sources import make_source
from mgll_data.sources.fundus.odir import split_keywords
from mgll_data.sources.splits import hash_split
from mgll_data.vocab import load_vocabulary
from tests import fundus_fixture as ff

VOCAB = load_vocabulary("fundus")
PIPELINES = ("odir", "rfmid", "aptos", "eyepacs")
OPTIONAL = ("idrid", "messidor2")
MODERATE = "Moderate Non-Proliferative Diabetic Retinopathy"


def _build(name: str, root: Path, out: Path, **options) -> None:
    build(load_pipeline(name), root, out, BuildOptions(progress=False, **options))


def _rows(out: Path) -> dict[str, dict]:
    rows = {}
    for path in sorted((out / "data").rglob("*.parquet")):
        rows.update({r["id"]: r for r in pq.read_table(path).to_pylist()})
    return rows


def _quarantine(out: Path) -> dict[str, dict]:
    lines = (out / "_build" / "quarantine.jsonl").read_text().splitlines()
    return {json.loads(line)["id"]: json.loads(line) for line in lines}


def _labels(row: dict) -> dict[str, float]:
    return dict(zip(VOCAB.names, row["labels"], strict=True))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, tuple[ff.Fixture, Path]]:
    """Each fixture release built once (the merge test reuses these builds)."""
    base = tmp_path_factory.mktemp("fundus")
    makers = {
        "odir": ff.make_odir_official,
        "rfmid": ff.make_rfmid,
        "aptos": ff.make_aptos,
        "eyepacs": ff.make_eyepacs,
    }
    result = {}
    for name, maker in makers.items():
        fixture = maker(base / f"{name}-release")
        out = base / f"{name}-out"
        _build(name, fixture.root, out, rows_per_shard=4)
        result[name] = (fixture, out)
    return result


def _check_common(fixture: ff.Fixture, out: Path) -> dict[str, dict]:
    """Good rows built, bad ones quarantined with a reason, texts non-empty, RGB, OP."""
    rows = _rows(out)
    assert set(rows) == set(fixture.good)
    quarantine = _quarantine(out)
    assert {k: v["stage"] for k, v in quarantine.items()} == fixture.bad
    assert all(entry["reason"] and entry["path"] for entry in quarantine.values())
    for row in rows.values():
        assert all(
            row[c].strip() for c in ("text_category", "text_description", "text_explanation")
        )
        assert row["text_category"] != "No Finding"
        assert row["modality"] == "OP"
        with Image.open(io.BytesIO(row["image"]["bytes"])) as image:
            assert image.mode == "RGB"
        assert row["image"]["path"] == f"{row['id']}.png"
        labels = _labels(row)
        assert labels["Normal"] + labels["Abnormal"] == 1.0  # exactly one of the two is set
    loaded = datasets.load_dataset(str(out))
    assert sum(len(loaded[s]) for s in loaded) == len(rows)
    assert validate_dataset(out) == []
    return rows


# --- vocabulary ---------------------------------------------------------------------------


def test_vocabulary_hierarchy_and_knowledge():
    names = VOCAB.names
    assert names[:2] == ["Normal", "Abnormal"]
    assert VOCAB.label("Normal").parent is None and VOCAB.label("Abnormal").parent is None
    grades = [lab.name for lab in VOCAB.labels if lab.parent == "Diabetic Retinopathy"]
    assert grades == [
        "Mild Non-Proliferative Diabetic Retinopathy",
        MODERATE,
        "Severe Non-Proliferative Diabetic Retinopathy",
        "Proliferative Diabetic Retinopathy",
    ]
    assert VOCAB.ancestors(MODERATE) == ["Diabetic Retinopathy", "Abnormal"]
    assert VOCAB.ancestors("Pathological Myopia") == ["Myopia", "Abnormal"]
    for label in VOCAB.labels:
        assert label.explanation and label.phrase and label.positive_prompts, label.name
    # The grade criteria say what separates them (ICDR).
    assert (
        "microaneurysms" in VOCAB.label("Mild Non-Proliferative Diabetic Retinopathy").explanation
    )
    assert "4-2-1" in VOCAB.label("Severe Non-Proliferative Diabetic Retinopathy").explanation
    # Every pipeline's label targets exist; RFMiD maps its 45 conditions to 45 distinct labels.
    rfmid = load_pipeline("rfmid").raw["labels"]["map"]
    assert list(rfmid) == ff.RFMID_COLUMNS and len(set(rfmid.values())) == 45
    assert set(rfmid.values()) <= set(names)
    for value in load_pipeline("odir").raw["labels"]["keywords"].values():
        targets = [value] if isinstance(value, str) else list(value)
        assert set(targets) <= set(names), value
    for name in PIPELINES + OPTIONAL:
        pipeline = load_pipeline(name)
        assert pipeline.domain == "fundus"
        assert pipeline.raw["image"] == {"color": "rgb", "crop_borders": False}
        assert pipeline.license["citation"] and pipeline.license["url"]


def test_split_keywords_and_hash_split():
    assert split_keywords("lens dust，normal fundus") == ["lens dust", "normal fundus"]
    assert split_keywords(" Moderate  non proliferative retinopathy, cataract ") == [
        "moderate non proliferative retinopathy",
        "cataract",
    ]
    assert split_keywords("") == []
    splits = [hash_split(str(i), "s", 0.1, 0.1) for i in range(2000)]
    assert hash_split("7", "s", 0.1, 0.1) == hash_split("7", "s", 0.1, 0.1)
    assert 150 < splits.count("test") < 250 and 150 < splits.count("validation") < 250


# --- ODIR-5K ------------------------------------------------------------------------------


def test_odir_official_workbook(built):
    fixture, out = built["odir"]
    rows = _check_common(fixture, out)
    for row_id, expected in fixture.good.items():
        row = rows[row_id]
        assert row["positive_labels"] == [n for n in VOCAB.names if n in expected["positives"]]
        assert json.loads(row["extra"])["quality_flags"] == expected["quality"]
        assert row["laterality"] == ("L" if row_id.endswith("_left") else "R")
    # Full-width comma split; the eye's own keywords, not the patient's D flag; lens dust kept
    # as a quality flag, not a disease.
    left, right = rows["odir:2_left"], rows["odir:2_right"]
    assert left["text_category"] == f"Abnormal, {MODERATE}"
    assert left["text_description"] == "moderate non proliferative retinopathy"
    assert left["text_origin"] == ["labels", "keywords", "vocabulary"]
    assert VOCAB.label(MODERATE).explanation in left["text_explanation"]
    assert VOCAB.label("Abnormal").explanation in left["text_explanation"]
    assert right["text_category"] == "Normal"
    assert right["text_explanation"] == VOCAB.label("Normal").explanation
    assert json.loads(right["extra"])["patient_labels"]["D"] == 1
    assert _labels(right)["Diabetic Retinopathy"] == 0.0
    # A known grade leaves DR itself unset; an ungraded DR leaves the grades unset.
    assert math.isnan(_labels(left)["Diabetic Retinopathy"])
    assert _labels(left)["Mild Non-Proliferative Diabetic Retinopathy"] == 0.0
    ungraded = _labels(rows["odir:7_right"])
    assert ungraded["Diabetic Retinopathy"] == 1.0 and math.isnan(ungraded[MODERATE])
    # Labels ODIR never speaks of stay NaN (RFMiD-only conditions).
    assert math.isnan(_labels(right)["Optociliary Shunt"])
    # Missing age, patient ids namespaced, both eyes in one split.
    assert left["age_years"] is None and right["sex"] == "M"
    assert rows["odir:0_left"]["age_years"] == 69.0 and rows["odir:0_left"]["sex"] == "F"
    assert left["patient_id"] == "odir:2" and left["split"] == right["split"]
    quarantine = _quarantine(out)
    assert "anterior segment image" in quarantine["odir:4_left"]["reason"]
    assert "lens dust" in quarantine["odir:5_left"]["reason"]
    assert "6_right.jpg" in quarantine["odir:6_right"]["reason"]
    manifest = json.loads((out / "_build" / "manifest.json").read_text())
    assert any("optic disc ghost" in note for note in manifest["notes"])
    assert manifest["counts"]["rows"]["train"] + manifest["counts"]["rows"]["test"] >= 1


def test_odir_kaggle_full_df_matches_workbook(built, tmp_path):
    fixture = ff.make_odir_kaggle(tmp_path / "kaggle")
    out = tmp_path / "out"
    _build("odir", fixture.root, out)
    rows = _rows(out)
    assert set(rows) == set(fixture.good)
    quarantine = _quarantine(out)
    assert quarantine["odir:1_right"]["reason"].startswith("duplicate id")
    official = _rows(built["odir"][1])
    for row_id, row in rows.items():
        assert row["labels"] == pytest.approx(official[row_id]["labels"], nan_ok=True)
        assert row["text_category"] == official[row_id]["text_category"]
        # The original 24x20 image is used, not the 16x16 preprocessed copy.
        assert (row["orig_width"], row["orig_height"]) == (ff.W, ff.H)


# --- RFMiD --------------------------------------------------------------------------------


def test_rfmid_official_splits_and_colliding_ids(built):
    fixture, out = built["rfmid"]
    rows = _check_common(fixture, out)
    for row_id, expected in fixture.good.items():
        row = rows[row_id]
        assert row["positive_labels"] == [n for n in VOCAB.names if n in expected["positives"]]
        assert row["split"] == row_id.split(":")[1].split("-")[0]
    assert {r["split"] for r in rows.values()} == {"train", "validation", "test"}
    three = rows["rfmid:train-2"]
    assert three["text_category"] == (
        "Abnormal, Diabetic Retinopathy, Media Haze, Optic Disc Cupping"
    )
    assert "media haze" in three["text_description"]
    normal = _labels(rows["rfmid:train-1"])
    assert normal["Normal"] == 1.0 and normal["Diabetic Retinopathy"] == 0.0
    assert normal["Coloboma"] == 0.0 and math.isnan(normal["Cataract"])  # not an RFMiD column
    assert rows["rfmid:validation-3"]["text_category"] == "Abnormal"
    quarantine = _quarantine(out)
    assert "Disease_Risk is 0" in quarantine["rfmid:test-4"]["reason"]
    block = yaml.safe_load((out / "README.md").read_text().split("---")[1])["mgll"]
    assert len(block["annotated_labels"]) == 47


# --- APTOS --------------------------------------------------------------------------------


def test_aptos_grades(built):
    fixture, out = built["aptos"]
    rows = _check_common(fixture, out)
    for row_id, expected in fixture.good.items():
        labels = _labels(rows[row_id])
        grade = expected["grade"]
        assert json.loads(rows[row_id]["extra"])["dr_grade"] == grade
        assert labels["Normal"] == float(grade == 0)
        assert str(grade) in rows[row_id]["text_description"]
    assert rows["aptos:002c21358ce6"]["text_category"] == "Normal"
    assert rows["aptos:002c21358ce6"]["text_description"] == (
        "Diabetic retinopathy grade 0: no diabetic retinopathy."
    )
    assert rows["aptos:000c1434d8d7"]["text_category"] == f"Abnormal, {MODERATE}"
    assert rows["aptos:000c1434d8d7"]["text_explanation"].endswith(
        VOCAB.label(MODERATE).explanation
    )
    manifest = json.loads((out / "_build" / "manifest.json").read_text())
    assert any("2 unlabelled test images skipped" in n for n in manifest["notes"])
    assert not any(r["id"].startswith("aptos:0005cfc8afb6") for r in rows.values())


def test_aptos_crop_borders(built, tmp_path):
    fixture, _ = built["aptos"]
    out = tmp_path / "cropped"
    _build("aptos", fixture.root, out, crop_borders=True)
    dark = _rows(out)["aptos:002c21358ce6"]
    assert dark["orig_width"] < 40 and dark["width"] < 40  # the black frame is gone


# --- EyePACS ------------------------------------------------------------------------------


def test_eyepacs_names_without_extension_and_test_labels(built):
    fixture, out = built["eyepacs"]
    rows = _check_common(fixture, out)
    for row_id, expected in fixture.good.items():
        row = rows[row_id]
        assert json.loads(row["extra"])["dr_grade"] == expected["grade"]
        if expected["split"] == "test":
            assert row["split"] == "test"
        else:
            assert row["split"] in ("train", "validation")
    assert rows["eyepacs:10_left"]["laterality"] == "L"
    assert rows["eyepacs:10_left"]["patient_id"] == "eyepacs:10"
    assert rows["eyepacs:10_left"]["split"] == rows["eyepacs:10_right"]["split"]
    assert json.loads(rows["eyepacs:1_right"]["extra"])["kaggle_usage"] == "Private"
    assert (
        rows["eyepacs:13_right"]["text_category"] == "Abnormal, Proliferative Diabetic Retinopathy"
    )
    quarantine = _quarantine(out)
    assert "15_left.jpeg" in quarantine["eyepacs:15_left"]["reason"]
    assert "eyepacs:99_left" not in rows and "eyepacs:99_left" not in quarantine


# --- layout errors ------------------------------------------------------------------------


@pytest.mark.parametrize("name", PIPELINES + OPTIONAL)
def test_wrong_layout_is_one_line_user_error(name, tmp_path):
    (tmp_path / "notes.txt").write_text("not a release")
    with pytest.raises(UserError) as err:
        make_source(load_pipeline(name), tmp_path, VOCAB).scan()
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)


def test_odir_corrupt_workbook_is_user_error(tmp_path):
    (tmp_path / "ODIR-5K_Training_Dataset").mkdir()
    ff.save(ff.fundus_image(), tmp_path / "ODIR-5K_Training_Dataset" / "0_left.jpg", "JPEG")
    (tmp_path / "ODIR-5K_Training_Annotations(Updated)_V2.xlsx").write_bytes(b"PK\x03\x04junk")
    with pytest.raises(UserError, match="not a readable .xlsx workbook") as err:
        make_source(load_pipeline("odir"), tmp_path, VOCAB).scan()
    assert "\n" not in str(err.value)


def test_rfmid_labels_without_image_folder(tmp_path):
    ff.make_rfmid(tmp_path)
    shutil.rmtree(tmp_path / "1. Original Images" / "b. Validation Set")
    with pytest.raises(UserError, match="validation"):
        make_source(load_pipeline("rfmid"), tmp_path, VOCAB).scan()


# --- merge --------------------------------------------------------------------------------


def test_four_builds_merge_load_and_validate(built, tmp_path):
    out = tmp_path / "merged"
    merge([built[name][1] for name in PIPELINES], out)
    assert validate_dataset(out) == []
    merged = datasets.load_dataset(str(out))
    ids = [i for split in merged for i in merged[split]["id"]]
    expected = set().union(*(built[name][0].good for name in PIPELINES))
    assert set(ids) == expected and len(ids) == len(expected)
    card = (out / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    for name in PIPELINES:
        licence = load_pipeline(name).license
        assert header["mgll"]["sources"][name]["license"]["id"] == licence["id"]
        assert licence["id"] in card
    assert header["mgll"]["domain"] == "fundus"
    per_source = datasets.load_dataset(str(out), "rfmid")
    assert set(per_source) == {"train", "validation", "test"}

    # The merged corpus trains: a smoke run of the tiny model on the CPU.
    train_rows = sum(1 for split in merged for s in merged[split]["split"] if s == "train")
    batch = min(4, train_rows)
    run = subprocess.run(
        [sys.executable, "-m", "mgll_train", "fit", "--train-data", str(out), "--model",
         "mgll-tiny", "--batch-size", str(batch), "--max-steps", "2", "--workers", "0",
         "--device", "cpu", "--logs", str(tmp_path / "logs"), "--name", "smoke",
         "--log-every-n-steps", "1"],
        capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    metrics = (tmp_path / "logs" / "smoke" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 2 and all(math.isfinite(json.loads(m)["train"]["loss"]) for m in metrics)


# --- IDRiD and Messidor-2 (optional sources) -----------------------------------------------


@pytest.mark.parametrize("name", ["idrid", "messidor2"])
def test_idrid_and_messidor2(name, tmp_path):
    fixture = {"idrid": ff.make_idrid, "messidor2": ff.make_messidor2}[name](tmp_path / "release")
    out = tmp_path / "out"
    _build(name, fixture.root, out)
    rows = _check_common(fixture, out)
    for row_id, expected in fixture.good.items():
        assert rows[row_id]["positive_labels"] == [
            n for n in VOCAB.names if n in expected["positives"]
        ]
    if name == "idrid":
        # The official testing set is the test split; its ids do not collide with training's.
        assert rows["idrid:test-IDRiD_001"]["split"] == "test"
        assert rows["idrid:train-IDRiD_001"]["split"] in ("train", "validation")
        assert "within one disc diameter" in rows["idrid:train-IDRiD_001"]["text_description"]
        assert _labels(rows["idrid:train-IDRiD_002"])["Diabetic Macular Edema"] == 0.0
    else:
        assert "ungradable" in _quarantine(out)["messidor2:IM002385"]["reason"]
        assert rows["messidor2:20051020_43808_0100_PP"]["text_category"] == (
            "Abnormal, Moderate Non-Proliferative Diabetic Retinopathy, Diabetic Macular Edema"
        )
