"""ChestX-ray14 end to end: the real CSVs, both dialects, both layouts, quarantine, determinism."""

from __future__ import annotations

import gzip
import io
import json
import math
import shutil
from collections import Counter
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mgll_data.build.engine import BuildOptions, build
from mgll_data.build.pipeline import load_pipeline
from mgll_data.errors import UserError
from mgll_data.publish.inspect import validate_dataset
from mgll_data.record import read_mgll_metadata
from mgll_data.sources import make_source
from mgll_data.sources.toolkit import parse_age
from mgll_data.vocab import load_vocabulary
from tests.conftest import NIH_ROWS
from tests.nih_fixture import is_test_patient, make_release, real_rows, xrv_data_file

PIPELINE = load_pipeline("chestxray14")
VOCAB = load_vocabulary("chest_xray")
NIH_TO_VOCAB = PIPELINE.raw["labels"]["map"]


def _build(root: Path, out: Path, **options) -> None:
    build(PIPELINE, root, out, BuildOptions(progress=False, **options))


def _rows(out: Path) -> list[dict]:
    rows = []
    for path in sorted((out / "data").glob("*.parquet")):
        rows.extend(pq.read_table(path).to_pylist())
    return rows


def _comparable(row: dict) -> dict:
    """The row with NaN labels as None, so rows compare with ==."""
    return dict(row, labels=[None if math.isnan(v) else v for v in row["labels"]])


def _quarantine(out: Path) -> dict[str, dict]:
    lines = (out / "_build" / "quarantine.jsonl").read_text().splitlines()
    return {json.loads(line)["id"]: json.loads(line) for line in lines}


def test_real_data_entry_maps_completely(tmp_path):
    """All 112,120 real rows become items whose labels equal the CSV's, count for count."""
    root = tmp_path / "nih"
    root.mkdir()
    shutil.copy(xrv_data_file("Data_Entry_2017_v2020.csv.gz"), root)
    shutil.copy(xrv_data_file("BBox_List_2017.csv.gz"), root)
    rows = real_rows()
    test = [r["index"] for r in rows if is_test_patient(r["patient"])]
    train_val = [r["index"] for r in rows if not is_test_patient(r["patient"])]
    (root / "test_list.txt").write_text("\n".join(test) + "\n")
    (root / "train_val_list.txt").write_text("\n".join(train_val) + "\n")
    (root / "images").mkdir()
    with open(root / "images" / "images_001.tar.gz", "wb") as f:
        f.write(gzip.compress(b"\0" * 1024))  # an (empty) archive makes the layout complete

    scan = make_source(PIPELINE, root, VOCAB).scan()
    assert scan.quarantine == []
    assert len(scan.items) == 112_120
    expected = Counter(name for r in rows for name in r["labels"].split("|"))
    got = Counter(name for item in scan.items for name, v in item.labels.items() if v == 1.0)
    assert got == Counter({NIH_TO_VOCAB[k]: n for k, n in expected.items()})
    assert got["Infiltration"] == 19_894 and got["Pleural Effusion"] == 13_317
    # NIH asserts absence: every mapped label is 0 or 1, the rest never appear (NaN).
    assert all(set(item.labels) == set(NIH_TO_VOCAB.values()) for item in scan.items)
    assert len({item.patient_id for item in scan.items}) == 30_805
    assert sum(len(item.boxes) for item in scan.items) == 984
    # Patient-level validation split: no patient in two splits.
    splits_of = {}
    for item in scan.items:
        splits_of.setdefault(item.patient_id, set()).add(item.split)
    assert all(len(s) == 1 for s in splits_of.values())
    share = Counter(item.split for item in scan.items)
    assert 0.07 < share["validation"] / (share["train"] + share["validation"]) < 0.13


def test_build_end_to_end(nih_kaggle, tmp_path):
    out = tmp_path / "out"
    _build(nih_kaggle.root, out, workers=2, rows_per_shard=8)
    rows = {r["id"].split(":", 1)[1] + ".png": r for r in _rows(out)}
    assert set(rows) == nih_kaggle.good
    quarantine = _quarantine(out)
    assert {
        q.split(":", 1)[1] + ".png": e["stage"] for q, e in quarantine.items()
    } == nih_kaggle.bad
    assert all(e["reason"] and e["path"] for e in quarantine.values())
    assert "Lung_Spots" in quarantine["chestxray14:00030999_000"]["reason"]

    by_name = {r["index"]: r for r in nih_kaggle.rows}
    for name, row in rows.items():
        positives = {NIH_TO_VOCAB[n] for n in by_name[name]["labels"].split("|")}
        labels = dict(zip(VOCAB.names, row["labels"], strict=True))
        for label, value in labels.items():
            if label in positives:
                assert value == 1.0
            elif label in NIH_TO_VOCAB.values():
                assert value == 0.0, (name, label)
            else:
                assert math.isnan(value)
        assert set(row["positive_labels"]) == positives
        assert (row["split"] == "test") == (name in nih_kaggle.test_names)
        assert row["patient_id"] == str(int(by_name[name]["patient"]))
        assert row["view"] == by_name[name]["view"] and row["sex"] == by_name[name]["sex"]
        assert row["age_years"] == float(by_name[name]["age"])
        assert row["image"]["path"] == f"{row['id']}.png"
        assert all(
            row[c].strip() for c in ("text_category", "text_description", "text_explanation")
        )

    # Odd modes all become 8-bit grey; the 24x16 image keeps its size (never upscaled).
    for name, mode in nih_kaggle.modes.items():
        if name in rows:
            assert Image.open(io.BytesIO(rows[name]["image"]["bytes"])).mode == "L", mode
    assert {(r["width"], r["height"]) for r in rows.values()} == {(16, 16), (24, 16)}

    # Boxes: rescaled from the 1024 frame to the stored image, `Infiltrate` renamed.
    boxed = [r for r in rows.values() if "boxes" in json.loads(r["extra"])]
    assert boxed
    for row in boxed:
        extra = json.loads(row["extra"])
        assert extra["box_source_frame"] == [1024, 1024]
        for box in extra["boxes"]:
            assert box["label"] in VOCAB.names and 0 <= box["x"] <= row["width"]
    labels_boxed = {b["label"] for r in boxed for b in json.loads(r["extra"])["boxes"]}
    assert "Infiltration" in labels_boxed

    # Patient-disjoint splits; metadata block in every shard.
    patients = {}
    for row in rows.values():
        patients.setdefault(row["patient_id"], set()).add(row["split"])
    assert all(len(s) == 1 for s in patients.values())
    for shard in (out / "data").glob("*.parquet"):
        mgll = read_mgll_metadata(pq.read_schema(shard), str(shard))
        assert mgll["label_names"] == VOCAB.names
        assert mgll["annotated_labels"] == [n for n in VOCAB.names if n in NIH_TO_VOCAB.values()]
    assert validate_dataset(out) == []


def test_load_dataset_gives_schema_features(nih_kaggle, tmp_path):
    out = tmp_path / "out"
    _build(nih_kaggle.root, out)
    ds = datasets.load_dataset(str(out))
    assert set(ds) == {p.name.split("-")[0] for p in (out / "data").glob("*.parquet")}
    assert sum(len(split) for split in ds.values()) == len(nih_kaggle.good)
    train = ds["train"]
    assert isinstance(train.features["image"], datasets.Image)
    assert train.features["labels"].length == len(VOCAB)
    from mgll_data.schema import record_schema

    assert train.features == record_schema(len(VOCAB)).features()
    assert train[0]["image"].mode == "L"


def test_build_is_byte_identical(nih_kaggle, tmp_path):
    _build(nih_kaggle.root, tmp_path / "a", workers=2, rows_per_shard=8)
    _build(nih_kaggle.root, tmp_path / "b", workers=1, rows_per_shard=8)
    for rel in [
        *(f"data/{p.name}" for p in (tmp_path / "a" / "data").iterdir()),
        "README.md",
        "_build/quarantine.jsonl",
    ]:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


@pytest.mark.parametrize("layout,dialect", [("box", "v2020"), ("extracted", "2017")])
def test_other_layouts_and_dialects_give_the_same_rows(tmp_path, nih_kaggle, layout, dialect):
    """Box tarballs read directly and the 2017 dialect give the Kaggle/v2020 records."""
    other = make_release(tmp_path / "raw", count=NIH_ROWS, layout=layout, dialect=dialect)
    _build(nih_kaggle.root, tmp_path / "kaggle")
    _build(other.root, tmp_path / "other")
    reference = {r["id"]: _comparable(r) for r in _rows(tmp_path / "kaggle")}
    got = {r["id"]: _comparable(r) for r in _rows(tmp_path / "other")}
    assert set(got) == set(reference)
    for key, row in got.items():
        expected = dict(reference[key])
        if dialect == "2017":  # the old file stores rounded spacing and months for one age
            assert row["age_years"] is not None
            for field in ("age_years", "extra"):
                row.pop(field), expected.pop(field)
        assert row == expected
    assert set(_quarantine(tmp_path / "other")) == set(_quarantine(tmp_path / "kaggle"))
    if layout == "box":  # the images exist only inside the tarballs
        assert not list((tmp_path / "raw").rglob("*.png"))


def test_age_parsing():
    assert parse_age("57") == 57.0
    assert parse_age("058Y") == 58.0
    assert parse_age("011M") == pytest.approx(11 / 12, abs=1e-4)
    assert parse_age("010D") == pytest.approx(10 / 365.25, abs=1e-4)
    assert parse_age("414") is None  # impossible ages in the Kaggle copy
    assert parse_age("abc") is None


def test_wrong_root_names_what_is_missing(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as err:
        _build(tmp_path / "empty", tmp_path / "out")
    message = str(err.value)
    assert "\n" not in message
    assert "Data_Entry_2017_v2020.csv" in message and "train_val_list.txt" in message
    with pytest.raises(UserError, match="not a directory"):
        _build(tmp_path / "nope", tmp_path / "out")


def test_missing_column_is_one_line(tmp_path, nih_kaggle):
    root = tmp_path / "raw"
    shutil.copytree(nih_kaggle.root, root)
    csv = root / "Data_Entry_2017_v2020.csv"
    csv.write_text(csv.read_text().replace("Finding Labels", "Findings", 1))
    with pytest.raises(UserError, match="missing column.*Finding Labels") as err:
        _build(root, tmp_path / "out")
    assert "Data_Entry_2017_v2020.csv" in str(err.value)


def test_max_errors_fails_the_build(nih_kaggle, tmp_path):
    with pytest.raises(UserError, match="more than --max-errors 1"):
        _build(nih_kaggle.root, tmp_path / "out", max_errors=1)


def test_existing_build_needs_resume_or_overwrite(nih_kaggle, tmp_path):
    out = tmp_path / "out"
    _build(nih_kaggle.root, out, limit=5)
    with pytest.raises(UserError, match="--resume .* --overwrite"):
        _build(nih_kaggle.root, out, limit=5)
    with pytest.raises(UserError, match="other inputs, options"):
        _build(nih_kaggle.root, out, limit=6, resume=True)
    _build(nih_kaggle.root, out, limit=6, overwrite=True)
    assert len(_rows(out)) == 6  # the first six ids are all good images


def test_resume_refuses_a_changed_vocabulary(nih_kaggle, tmp_path, monkeypatch):
    import dataclasses

    from mgll_data.build import engine

    out = tmp_path / "out"
    _build(nih_kaggle.root, out, limit=5)
    vocab = load_vocabulary("chest_xray")
    changed = dataclasses.replace(vocab, raw={**vocab.raw, "scope_terminators": ["but"]})
    monkeypatch.setattr(engine, "load_vocabulary", lambda domain: changed)
    with pytest.raises(UserError, match="other inputs, options"):  # mined labels could differ
        _build(nih_kaggle.root, out, limit=5, resume=True)


def test_a_partial_duplicate_row_never_displaces_the_complete_one(tmp_path):
    """A Data_Entry row repeated with fields blanked, placed BEFORE the complete one: the
    complete row is built (patient, age, view kept) and the partial one is quarantined as a
    duplicate id, whatever the order."""
    from mgll_data.demo.nih_release import write_demo_release

    raw = write_demo_release(tmp_path / "raw", n=8, seed=4, image_size=32)
    entry = next(raw.glob("Data_Entry*.csv"))
    header, first, *rest = entry.read_text().splitlines()
    fields = first.split(",")
    name, columns = fields[0], header.split(",")
    partial = [
        v if c in ("Image Index", "Finding Labels") else ""
        for c, v in zip(columns, fields, strict=True)
    ]
    partial[columns.index("Patient ID")] = "99999"  # another patient: another split's hash
    entry.write_text("\n".join([header, ",".join(partial), first, *rest]) + "\n")
    out = tmp_path / "ds"
    build(load_pipeline("chestxray14"), raw, out, BuildOptions(image_size=32, progress=False))
    rows = {
        r["id"]: r for p in (out / "data").glob("*.parquet") for r in pq.read_table(p).to_pylist()
    }
    record = rows[f"chestxray14:{name.rsplit('.', 1)[0]}"]
    complete = dict(zip(columns, fields, strict=True))
    assert record["patient_id"] == complete["Patient ID"].lstrip("0")
    assert record["view"] == complete["View Position"]
    assert record["age_years"] == pytest.approx(float(complete["Patient Age"]))
    quarantine = (out / "_build" / "quarantine.jsonl").read_text().splitlines()
    duplicates = [json.loads(q) for q in quarantine if "duplicate id" in q]
    assert [q["id"] for q in duplicates] == [record["id"]]
