"""Acceptance: the MIMIC-CXR source on a release built by a separate author.

`tests/independent/mimic_release.py` was written from the public format description only,
without the project's code or its own fixture, and lays the releases out as PhysioNet's
`wget -r` leaves them (`physionet.org/files/mimic-cxr-jpg/2.0.0/`, with `index.html` files,
`SHA256SUMS.txt`, reports in the zip and on disk). Its `expected.json` is the ground truth.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from datasets import load_dataset

from mgll_data.build.engine import BuildOptions, build
from mgll_data.build.pipeline import load_pipeline
from mgll_data.vocab import load_vocabulary

SCRIPT = Path(__file__).parent / "independent" / "mimic_release.py"
PIPELINE = load_pipeline("mimic_cxr")
NAMES = load_vocabulary("chest_xray").names


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("independent-mimic")
    subprocess.run([sys.executable, str(SCRIPT), str(out)], check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def expected(release) -> dict[str, dict]:
    return json.loads((release / "expected.json").read_text(encoding="utf-8"))


def _build(release: Path, out: Path, **source_options) -> tuple[dict, dict]:
    options = BuildOptions(
        image_size=64, progress=False, source_options=tuple(sorted(source_options.items()))
    )
    build(PIPELINE, release / "release", out, options)  # the folder above physionet.org/
    rows = {
        row["id"].split(":", 1)[1]: row
        for path in sorted((out / "data").glob("*.parquet"))
        for row in pq.read_table(path).to_pylist()
    }
    lines = (out / "_build" / "quarantine.jsonl").read_text().splitlines()
    quarantine = {json.loads(x)["id"].split(":", 1)[1]: json.loads(x)["reason"] for x in lines}
    return rows, quarantine


def _normalised(text: str) -> str:
    return " ".join(text.split())


def test_jpg_build_matches_the_independent_ground_truth(release, expected, tmp_path):
    rows, quarantine = _build(release, tmp_path / "jpg")
    keep = {d for d, e in expected.items() if e["image_ok"] and e["split"] is not None}
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
            labels = {n: v for n, v in zip(NAMES, row["labels"], strict=True) if not math.isnan(v)}
            assert labels == {k: float(v) for k, v in e["chexpert"].items()}, dicom_id
        missing = json.loads(row["extra"])["report"] == "missing"
        assert missing == (e["report"] == "missing"), dicom_id
        if missing:
            assert row["text_origin"][1] == "label_template"
    dataset = load_dataset(str(tmp_path / "jpg"))
    assert sum(len(split) for split in dataset.values()) == len(keep)


def test_dicom_build_converts_every_image_in_a_split(release, expected, tmp_path):
    rows, quarantine = _build(release, tmp_path / "dicom", images="dicom")
    assert set(rows) == {d for d, e in expected.items() if e["split"] is not None}
    assert all("no split" in reason for reason in quarantine.values())
    for row in rows.values():
        dicom = json.loads(row["extra"])["dicom"]
        assert dicom["Modality"] == "DX" and "PatientID" not in dicom
        assert "PatientName" not in row["extra"] and "StudyDate" not in dicom
