"""COVIDx CXR: the split lists as the splits, both label variants, and a download's quirks.

No list file of the release is on this machine: the fixtures write `train.txt`, `val.txt` and
`test.txt` as COVIDx CXR-2 on ships them (`patient_id filename class data_source`, classes
positive / negative) and, for COVIDx v1-v8, `train.txt` and `test.txt` of three columns with
COVID-19 / pneumonia / normal; images are small PNGs and JPEGs of varying sizes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from mgll_data.build.engine import BuildOptions, build
from mgll_data.build.pipeline import load_pipeline
from mgll_data.errors import UserError
from mgll_data.publish.inspect import validate_dataset
from mgll_data.record import read_mgll_metadata
from mgll_data.vocab import load_vocabulary

VOCAB = load_vocabulary("chest_xray")
SIZES = [(64, 64), (48, 40), (30, 52)]

# CXR-2 on: (patient, file, class, data source) per list; the line numbers are the positions.
TWO_CLASS = {
    "train.txt": [
        ("1", "a1.png", "positive", "cohen"),
        ("2", "a2.jpg", "negative", "rsna"),
        ("3", "a3.png", "negative", "rsna"),
        ("4", "a4.jpeg", "positive", "ricord"),
        ("5", "a5.png", "negative", "bimcv"),
    ],
    "val.txt": [("6", "v1.png", "positive", "sirm"), ("7", "v2.png", "negative", "rsna")],
    "test.txt": [
        ("8", "t1.png", "positive", "bimcv"),
        ("9", "t2.png", "negative", "rsna"),
        ("10", "t3.png", "positive", "stonybrook"),
    ],
}


def _image(path: Path, k: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    size = SIZES[k % len(SIZES)]
    pixels = np.random.default_rng(k).integers(0, 255, (size[1], size[0]), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _write(path: Path, lines: list[str], newline: str = "\n") -> None:
    path.write_bytes((newline.join(lines) + newline).encode())


def make_two_class(root: Path) -> Path:
    """A CXR-2-style release with a download's quirks: tabs and runs of spaces in a line, CRLF
    in test.txt, a listed image missing, an image no list names, a line repeated, one file in
    two lists with different classes, a short line, a name leaving the folder, an extra folder."""
    root.mkdir(parents=True)
    folders = {"train.txt": "train", "val.txt": "val", "test.txt": "test"}
    lines = {name: [" ".join(entry) for entry in entries] for name, entries in TWO_CLASS.items()}
    lines["train.txt"][1] = "2\ta2.jpg   negative \t rsna  "  # tabs and spaces
    lines["train.txt"] += [
        "11 gone.png positive cohen",  # the image is missing
        "1 a1.png positive cohen",  # repeated
        "12 both.png positive cohen",  # ... and in test.txt as negative
        "13 short.png",  # too few fields
        "14 ../escape.png negative rsna",  # not a file name
        "",  # a blank line keeps the numbering
    ]
    lines["test.txt"].append("12 both.png negative rsna")
    for name, text in lines.items():
        _write(root / name, text, "\r\n" if name == "test.txt" else "\n")
    k = 0
    for name, entries in TWO_CLASS.items():
        for entry in entries:
            _image(root / folders[name] / entry[1], k)
            k += 1
    for folder, file in [("train", "both.png"), ("test", "both.png"), ("train", "spare.png")]:
        _image(root / folder / file, k)
        k += 1
    _image(root / "extras" / "a1.png", 99)  # a folder the release does not have
    return root


def _build(root: Path, out: Path, pipeline: str | Path = "covidx") -> dict[str, dict]:
    build(load_pipeline(str(pipeline)), root, out, BuildOptions(progress=False, image_size=48))
    rows = [
        r for p in sorted((out / "data").glob("*.parquet")) for r in pq.read_table(p).to_pylist()
    ]
    return {r["id"].split(":", 1)[1]: r for r in rows}


def _quarantine(out: Path) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for entry in map(json.loads, (out / "_build/quarantine.jsonl").read_text().splitlines()):
        found.setdefault(entry["id"].split(":", 1)[1], []).append(entry)
    return found


def _value(row: dict, label: str) -> float:
    return row["labels"][VOCAB.names.index(label)]


@pytest.fixture(scope="module")
def two_class(tmp_path_factory):
    root = make_two_class(tmp_path_factory.mktemp("covidx") / "raw")
    out = tmp_path_factory.mktemp("out") / "covidx"
    return root, out, _build(root, out)


def test_two_class_lists_are_the_splits_with_their_counts(two_class):
    _, out, rows = two_class
    splits = {"train.txt": "train", "val.txt": "validation", "test.txt": "test"}
    for name, entries in TWO_CLASS.items():
        for patient, file, label_class, data_source in entries:
            row = rows[Path(file).stem]
            assert row["split"] == splits[name] and row["patient_id"] == patient
            assert _value(row, "COVID-19") == (1.0 if label_class == "positive" else 0.0)
            assert math.isnan(_value(row, "Pneumonia")) and math.isnan(_value(row, "No Finding"))
            assert json.loads(row["extra"])["data_source"] == data_source
    assert len(rows) == sum(len(e) for e in TWO_CLASS.values()) == 10
    positives = [e for entries in TWO_CLASS.values() for e in entries if e[2] == "positive"]
    assert sum(_value(r, "COVID-19") == 1.0 for r in rows.values()) == len(positives) == 5
    assert sum(_value(r, "COVID-19") == 0.0 for r in rows.values()) == 10 - 5
    assert rows["t1"]["text_category"] == "COVID-19" and rows["t2"]["text_description"] == (
        "No COVID-19."
    )
    shard = next((out / "data").glob("*.parquet"))
    assert read_mgll_metadata(pq.read_schema(shard), shard)["annotated_labels"] == ["COVID-19"]
    loaded = datasets.load_dataset(str(out))
    assert {s: len(loaded[s]) for s in loaded} == {"train": 5, "validation": 2, "test": 3}
    assert validate_dataset(out) == []
    card = (out / "README.md").read_text()
    assert "Licences differ by collection" in card and "Mixed per-collection licences" in card


def test_quirky_lines_are_quarantined_with_their_file_and_line(two_class):
    _, out, rows = two_class
    quarantine = _quarantine(out)
    (missing,) = quarantine["gone"]
    assert missing["path"] == "train.txt line 6"
    assert missing["reason"] == "missing image: train.txt line 6 lists train/gone.png"
    (repeat,) = quarantine["a1"]
    assert repeat["reason"] == "a1.png listed again (train.txt line 7; first at train.txt line 1)"
    assert "a1" in rows  # the first listing is built
    both = quarantine["both"]
    assert sorted(e["path"] for e in both) == ["test.txt line 4", "train.txt line 8"]
    assert "conflicting split, class or patient" in both[0]["reason"] and "both" not in rows
    short = quarantine["train-line-9"][0]["reason"]
    assert short.startswith("train.txt line 9: 2 fields '13 short.png'; expected `patient_id")
    assert "train.txt line 10: 4 fields" in quarantine["train-line-10"][0]["reason"]
    assert "spare" not in rows and "spare" not in quarantine  # not listed: ignored


def _three_class(root: Path, val_fraction: float) -> tuple[Path, Path]:
    """A COVIDx v1-v8-style release (3 columns, no val list) and a pipeline drawing
    `val_fraction` of the training patients as validation."""
    root.mkdir(parents=True)
    classes = ["COVID-19", "pneumonia", "normal"]
    train = [f"p{k // 2} tr{k}.png {classes[k % 3]}" for k in range(24)]  # 12 patients
    test = [f"q{k} te{k}.png {classes[k % 3]}" for k in range(6)]
    _write(root / "train_COVIDx5.txt", train)
    _write(root / "test_COVIDx5.txt", test)
    for k, line in enumerate(train + test):
        name = line.split()[1]
        _image(root / ("train" if name.startswith("tr") else "test") / name, k)
    raw = yaml.safe_load(load_pipeline("covidx").path.read_text())
    raw["splits"]["validation_fraction"] = val_fraction
    pipeline = root.parent / "covidx.yaml"
    pipeline.write_text(yaml.safe_dump(raw))
    return root, pipeline


def test_three_class_variant_labels_and_a_patient_split_validation(tmp_path):
    root, pipeline = _three_class(tmp_path / "raw", 0.5)
    rows = _build(root, tmp_path / "out", pipeline)
    assert len(rows) == 30
    shard = next((tmp_path / "out" / "data").glob("*.parquet"))
    annotated = read_mgll_metadata(pq.read_schema(shard), shard)["annotated_labels"]
    assert annotated == ["No Finding", "Pneumonia", "COVID-19"]
    expected = {  # class -> (COVID-19, Pneumonia, No Finding); NaN: not asserted
        "COVID-19": (1.0, math.nan, math.nan),
        "pneumonia": (0.0, 1.0, 0.0),
        "normal": (0.0, 0.0, 1.0),
    }
    lines = (root / "train_COVIDx5.txt").read_text().splitlines()
    lines += (root / "test_COVIDx5.txt").read_text().splitlines()
    by_patient: dict[str, set[str]] = {}
    for line in lines:
        patient, name, label_class = line.split()
        row = rows[Path(name).stem]
        got = tuple(_value(row, label) for label in ("COVID-19", "Pneumonia", "No Finding"))
        assert np.array_equal(got, expected[label_class], equal_nan=True), line
        assert "data_source" not in json.loads(row["extra"])
        by_patient.setdefault(patient, set()).add(row["split"])
        if name.startswith("te"):
            assert row["split"] == "test"
    assert all(len(splits) == 1 for splits in by_patient.values())  # patients stay together
    train_splits = [s for p, (s,) in by_patient.items() if p.startswith("p")]
    assert {"train", "validation"} == set(train_splits)
    counts = {c: sum(line.split()[2] == c for line in lines) for c in expected}
    assert sum(_value(r, "COVID-19") == 1.0 for r in rows.values()) == counts["COVID-19"] == 10
    assert sum(_value(r, "Pneumonia") == 1.0 for r in rows.values()) == counts["pneumonia"]
    assert sum(_value(r, "No Finding") == 1.0 for r in rows.values()) == counts["normal"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            "9 x.png viral covid",
            "test_COVIDx5.txt: line 7: unknown class 'viral' (expected one of COVID-19, pneumonia",
        ),
        ("9 x.png positive", "test_COVIDx5.txt: line 7: class 'positive' mixes variants; "),
    ],
)
def test_an_unknown_or_mixed_class_stops_the_build_naming_file_and_line(tmp_path, line, message):
    root, pipeline = _three_class(tmp_path / "raw", 0.1)
    with (root / "test_COVIDx5.txt").open("a") as f:
        f.write(line + "\n")
    with pytest.raises(UserError) as caught:
        _build(root, tmp_path / "out", pipeline)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert str(caught.value).startswith(str(root / "test_COVIDx5.txt"))


def test_a_missing_list_or_image_folder_is_refused_in_one_line(tmp_path):
    root = tmp_path / "raw"
    root.mkdir()
    _write(root / "train.txt", ["1 a.png positive cohen"])
    _image(root / "train" / "a.png", 0)
    with pytest.raises(UserError, match=r"not a COVIDx CXR release; missing test\.txt"):
        _build(root, tmp_path / "out")
    _write(root / "test.txt", ["2 b.png negative rsna"])
    with pytest.raises(UserError) as caught:
        _build(root, tmp_path / "out")
    assert str(caught.value) == (
        f"{root / 'test'}: image folder missing; test.txt lists the images of test/ beside it"
    )
