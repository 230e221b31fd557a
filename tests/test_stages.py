"""Per-item stages: texts from report sections with fallbacks, and the DICOM/raster dispatch."""

from __future__ import annotations

import io
import json
import math

from PIL import Image

from mgll_data.build.items import ImageRef, RawItem
from mgll_data.build.stages import BuildContext, Task, build_texts, run_task
from mgll_data.imaging.raster import ImagePolicy
from mgll_data.vocab import load_vocabulary
from tests.dicom_fixture import chest, make_dx, to_bytes

VOCAB = load_vocabulary("chest_xray")
CONFIG = {
    "description": {
        "sections": ["impression", "last_paragraph"],
        "positive": "{findings}.",
        "uncertain": "possible {findings}.",
        "negative": "no {findings}.",
        "none_positive": "No acute abnormality.",
        "max_negatives": 0,
    },
    "explanation": {"sections": ["findings"]},
}


def _labels(**values: float) -> list[float]:
    vector = [math.nan] * len(VOCAB)
    for name, value in values.items():
        vector[VOCAB.index(name)] = value
    return vector


def test_texts_prefer_sections_in_order_then_fall_back():
    labels = _labels(Cardiomegaly=1.0)
    sections = {
        "impression": "  Mild cardiomegaly.\n",
        "findings": "The heart is enlarged.",
        "last_paragraph": "ignored",
    }
    texts, origins = build_texts(labels, sections, VOCAB, CONFIG)
    assert texts == ["Cardiomegaly", "Mild cardiomegaly.", "The heart is enlarged."]
    assert origins == ["labels", "impression", "findings"]
    texts, origins = build_texts(
        labels, {"impression": " ", "last_paragraph": "Big heart."}, VOCAB, CONFIG
    )
    assert texts[1:] == ["Big heart.", VOCAB.label("Cardiomegaly").explanation]
    assert origins == ["labels", "last_paragraph", "vocabulary"]
    texts, origins = build_texts(labels, {}, VOCAB, CONFIG)
    assert texts[1] == "Cardiomegaly." and origins[1] == "label_template"


def test_dicom_images_go_through_the_dicom_stage(tmp_path):
    path = tmp_path / "s1.dcm"
    path.write_bytes(to_bytes(make_dx(chest())))
    item = RawItem(
        id="t:1",
        source="t",
        split="train",
        image=ImageRef(str(path)),
        labels={"Cardiomegaly": 1.0},
        sections={"impression": "Enlarged heart."},
    )
    ctx = BuildContext(domain="chest_xray", image_policy=ImagePolicy(image_size=32), texts=CONFIG)
    outcome = run_task(Task(("train", 0), item), ctx)
    assert outcome.quarantine is None, outcome.quarantine
    record = outcome.record
    assert Image.open(io.BytesIO(record["image"]["bytes"])).mode == "L"
    assert max(record["width"], record["height"]) == 32
    dicom = json.loads(record["extra"])["dicom"]
    assert dicom["Modality"] == "DX" and "PatientName" not in dicom
    assert record["text_description"] == "Enlarged heart."
    assert ImageRef("x/y.dcm.gz").is_dicom and ImageRef("a.zip", "0001", format="dicom").is_dicom
    assert not ImageRef("x/y.png").is_dicom
