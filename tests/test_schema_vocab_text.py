"""The record schema, the chest X-ray vocabulary and the text formatters."""

from __future__ import annotations

import math

import pyarrow as pa
from datasets import Image, Value

from mgll_data.build.pipeline import load_pipeline
from mgll_data.schema import record_schema, validate_row
from mgll_data.text.templates import describe_labels, explain_labels, format_category
from mgll_data.vocab import load_vocabulary

VOCAB = load_vocabulary("chest_xray")
NAN = math.nan
CHEXPERT = [
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
]


def _labels(**values: float) -> list[float]:
    vector = [NAN] * len(VOCAB)
    for name, value in values.items():
        vector[VOCAB.index(name.replace("_", " "))] = value
    return vector


def test_vocabulary_is_the_union_of_chexpert_and_nih():
    assert VOCAB.names[:14] == CHEXPERT
    nih = load_pipeline("chestxray14").raw["labels"]["map"].values()
    assert set(nih) <= set(VOCAB.names[:21]) and len(VOCAB) == 30
    # 1.1.0 appended the MIDRC labels after the 21, so the original positions never move.
    assert VOCAB.names[20] == "Pleural Thickening" and VOCAB.names[21] == "COVID-19"
    # RICORD reader classes/grades (1.1.0) and Object-CXR's Foreign Object (1.3.0): asserted by
    # readers, never text-mined
    reader_classes = VOCAB.names[22:]
    assert VOCAB.names[29] == "Foreign Object"
    assert VOCAB.ancestors("Cardiomegaly") == ["Enlarged Cardiomediastinum"]
    assert VOCAB.ancestors("Nodule") == ["Lung Lesion", "Lung Opacity"]
    for label in VOCAB.labels:
        assert label.explanation and label.positive_prompts and label.negative_prompts
        assert label.mentions or label.name in ("No Finding", *reader_classes)


def test_schema_derivations_agree():
    schema = record_schema(len(VOCAB))
    features = schema.features()
    assert isinstance(features["image"], Image)
    assert features["labels"].length == 30 and features["width"] == Value("int32")
    arrow = schema.arrow_schema({"label_names": VOCAB.names})
    assert arrow.field("labels").type == pa.list_(pa.float32(), 30)
    assert not arrow.field("id").nullable and arrow.field("view").nullable
    assert b"huggingface" in arrow.metadata and b"mgll" in arrow.metadata
    assert [f["name"] for f in schema.card_features()] == schema.names


def _valid_row() -> dict:
    labels = _labels(Cardiomegaly=1.0, Edema=0.0)
    return {
        "id": "demo:1",
        "source": "demo",
        "image": {"bytes": b"x", "path": "demo:1.png"},
        "width": 1,
        "height": 1,
        "orig_width": 1,
        "orig_height": 1,
        "modality": None,
        "view": "PA",
        "laterality": None,
        "patient_id": "1",
        "study_id": None,
        "split": "train",
        "labels": labels,
        "positive_labels": ["Cardiomegaly"],
        "text_category": "Cardiomegaly",
        "text_description": "d",
        "text_explanation": "e",
        "text_origin": ["a", "b", "c"],
        "age_years": None,
        "sex": "M",
        "extra": "{}",
    }


def test_validator_accepts_a_valid_row_and_names_each_problem():
    schema = record_schema(len(VOCAB))
    assert validate_row(_valid_row(), schema, VOCAB.names) == []
    cases = {
        "split": ("val", "not one of"),
        "labels": ([1.0] * 3, "length 3"),
        "positive_labels": (["Edema"], "disagree"),
        "text_description": ("  ", "empty"),
        "sex": ("X", "not one of"),
        "extra": ('{"b": 1, "a": 2}', "sorted keys"),
        "id": ("other:1", "does not start"),
    }
    for column, (value, message) in cases.items():
        row = dict(_valid_row(), **{column: value})
        problems = validate_row(row, schema, VOCAB.names)
        assert any(message in p for p in problems), (column, problems)
    bad_value = dict(_valid_row(), labels=_labels(Cardiomegaly=0.5))
    assert any("1/0/-1/NaN" in p for p in validate_row(bad_value, schema, VOCAB.names))


def test_category_formatter():
    assert format_category(_labels(Pleural_Effusion=1.0, Cardiomegaly=1.0), VOCAB) == (
        "Cardiomegaly, Pleural Effusion"  # vocabulary order, whatever the input order
    )
    assert format_category(_labels(Edema=-1.0, Atelectasis=-1.0, Mass=0.0), VOCAB) == (
        "Possible Edema, Atelectasis"
    )
    # Negatives without No Finding = 1 are not a normal study: they are named
    assert format_category(_labels(Edema=0.0), VOCAB) == "No Edema"
    assert format_category(_labels(Pneumothorax=0.0, Edema=0.0), VOCAB) == (
        "No Edema, Pneumothorax"  # vocabulary order
    )
    # Marked abnormal with none of the vocabulary's findings (PadChest's scoliosis alone)
    assert format_category(_labels(Edema=0.0, No_Finding=0.0), VOCAB) == "Other Finding"
    assert format_category(_labels(No_Finding=0.0), VOCAB) == "Other Finding"
    assert format_category(_labels(Edema=0.0, No_Finding=1.0), VOCAB) == "No Finding"
    assert format_category(_labels(No_Finding=1.0), VOCAB) == "No Finding"
    assert format_category([NAN] * len(VOCAB), VOCAB) == "No Finding"


TEMPLATE = {
    "positive": "{findings}.",
    "uncertain": "possible {findings}.",
    "negative": "no {findings}.",
    "none_positive": "No acute abnormality.",
    "max_negatives": 2,
}


def test_label_descriptions_and_explanations():
    labels = _labels(
        Cardiomegaly=1.0, Pleural_Effusion=1.0, Edema=0.0, Mass=0.0, Nodule=0.0, Pneumonia=-1.0
    )
    assert describe_labels(labels, VOCAB, TEMPLATE) == (
        "Cardiomegaly and pleural effusion. Possible pneumonia. "
        "No pulmonary edema or pulmonary mass."
    )
    assert describe_labels(_labels(No_Finding=1.0), VOCAB, TEMPLATE) == "No acute abnormality."
    explanation = explain_labels(labels, VOCAB)
    assert explanation == " ".join(
        VOCAB.label(n).explanation for n in ("Cardiomegaly", "Pleural Effusion")
    )
    no_finding = VOCAB.label("No Finding").explanation
    assert explain_labels(_labels(Edema=0.0, No_Finding=1.0), VOCAB) == no_finding
    assert explain_labels([NAN] * len(VOCAB), VOCAB) == no_finding
    other = "A finding outside the labelled categories."
    assert explain_labels(_labels(Edema=0.0, No_Finding=0.0), VOCAB) == other
    phrases = (VOCAB.label("Edema").phrase, VOCAB.label("Pneumothorax").phrase)
    assert explain_labels(_labels(Pneumothorax=0.0, Edema=0.0), VOCAB) == (
        f"No {phrases[0]} or {phrases[1]}."
    )
