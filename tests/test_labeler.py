"""The report labeler: negation, uncertainty, `___`, aggregation, No Finding, dev-set quality."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from mgll_data.labeler import aggregate, default_labeler, no_finding, prepare_text

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "labeler_dev.py"


@pytest.fixture(scope="module")
def labeler():
    return default_labeler("chest_xray")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("No pneumothorax.", {"Pneumothorax": 0.0, "No Finding": 1.0}),
        ("Cannot exclude pneumonia.", {"Pneumonia": -1.0}),
        ("Pneumothorax cannot be excluded.", {"Pneumothorax": -1.0}),
        ("Small left pleural effusion.", {"Pleural Effusion": 1.0}),
        ("No change in the moderate right pleural effusion.", {"Pleural Effusion": 1.0}),
        (
            "No pneumothorax, but there is a small effusion.",
            {"Pneumothorax": 0.0, "Pleural Effusion": 1.0},
        ),
        ("Small pericardial effusion.", {"No Finding": 1.0}),  # an exclusion, not pleural
        ("Mild edema, likely due to CHF.", {"Edema": 1.0, "Cardiomegaly": -1.0}),
        ("Pneumothorax (PTX) on the right. PTX is larger.", {"Pneumothorax": 1.0}),
    ],
)
def test_sentences(labeler, text, expected):
    assert labeler.label(text) == expected


def test_deid_tokens_do_not_break_sentences_or_carry_negation(labeler):
    text = "No evidence of pneumonia or edema. ___ year old with cardiomegaly."
    assert labeler.label(text) == {"Pneumonia": 0.0, "Edema": 0.0, "Cardiomegaly": 1.0}
    assert prepare_text("___ M ___") == "XXX M XXX"  # same length: offsets kept
    doc = labeler.nlp(prepare_text(text))
    assert len(list(doc.sents)) == 2


def test_support_devices_do_not_block_no_finding(labeler):
    labels = labeler.label("Endotracheal tube in good position. Lungs are clear.")
    assert labels["Support Devices"] == 1.0 and labels["No Finding"] == 1.0
    assert "No Finding" not in labeler.label("Possible small left effusion.")


def test_aggregation_rules():
    assert aggregate([0.0, -1.0]) == -1.0
    assert aggregate([0.0, 1.0]) == 1.0
    assert aggregate([-1.0, 1.0]) == 1.0
    assert aggregate([0.0, 0.0]) == 0.0
    assert aggregate([]) is None
    assert no_finding({"Support Devices": 1.0, "Pneumothorax": 0.0}) == 1.0
    assert no_finding({"Fracture": -1.0}) is None
    assert default_labeler("chest_xray").label("") == {}


def test_dev_set_beats_keyword_baseline():
    spec = importlib.util.spec_from_file_location("labeler_dev", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.run(repeat=1)
    assert len(module.load_dev_set()) >= 40
    assert results["labeler"]["macro_f1"] >= 0.8
    assert results["labeler"]["macro_f1"] >= results["keywords"]["macro_f1"] + 0.3
    for name in ("Pneumothorax", "Pleural Effusion", "Pneumonia", "Edema"):
        assert results["labeler"]["table"][name]["f1"] >= 0.8, name
