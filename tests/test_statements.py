"""Organ statements: "heart and mediastinal contours are normal", "the heart is enlarged", ..."""

from __future__ import annotations

import pytest

from mgll_data.text.labeler import default_labeler
from mgll_data.text.statements import OrganStatements

CM, EC, LO = "Cardiomegaly", "Enlarged Cardiomediastinum", "Lung Opacity"


@pytest.fixture(scope="module")
def labeler():
    return default_labeler("chest_xray")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Heart size normal.", {CM: 0.0}),
        ("Heart and mediastinal contours are within normal limits.", {CM: 0.0, EC: 0.0}),
        ("The cardiac and mediastinal silhouettes are unremarkable.", {CM: 0.0, EC: 0.0}),
        ("Heart size is top normal.", {CM: 0.0}),
        ("The heart remains moderately enlarged.", {CM: 1.0}),
        ("The heart is not enlarged.", {CM: 0.0}),
        ("The heart is likely mildly enlarged.", {CM: -1.0}),
        ("The mediastinum is widened.", {EC: 1.0}),
        ("Mild widening of the postoperative mediastinum.", {EC: 1.0}),
        ("No enlargement of the cardiac silhouette.", {CM: 0.0}),
        ("Left lung is clear.", {LO: 0.0}),
        ("The lungs are otherwise clear.", {LO: 0.0}),
        ("The heart is not normal in size.", {}),  # a negated normal state says nothing
        ("Lung volumes are low.", {}),  # "lung volumes" is no subject
        ("The heart size is stable.", {}),  # no state: unlike CheXpert, not a finding
        ("Cardiac pacemaker leads are unchanged.", {}),
        # review cases: the state must end its clause and open-ended subjects must open one
        ("The heart size is stable, large left pleural effusion.", {}),
        ("Mediastinal contours are unchanged, widened right paratracheal stripe.", {}),
        ("Enlarged heart\n\nNormal pulmonary vascularity.", {CM: 1.0}),
        (
            "Mildly enlarged heart normal lungs",
            {CM: 1.0, LO: 0.0},
        ),  # "heart normal" is no statement
        ("Heart size is top normal to mildly enlarged.", {CM: -1.0}),  # a range: uncertain
        ("Heart: Normal size.", {CM: 0.0}),
        # a normal statement never decides a later mention ("except for", "but there is")
        ("The left lung is clear except for opacity at the base.", {LO: 1.0}),
        ("Lung bases are clear but there is opacity laterally.", {LO: 1.0}),
        ("Heart size is normal but there is cardiomegaly.", {CM: 1.0}),
    ],
)
def test_organ_statements(labeler, text, expected):
    got = {k: v for k, v in labeler.label(text).items() if k in (CM, EC, LO)}
    assert got == expected


def test_statement_labels_must_exist():
    block = {"subjects": {"heart": ["Heart Thing"]}, "states": []}
    with pytest.raises(ValueError, match="unknown labels"):
        OrganStatements(block, ["Cardiomegaly"])
    nouns = {"subjects": {"heart": []}, "nouns": [{"labels": ["Cardiomegally"], "phrases": ["x"]}]}
    with pytest.raises(ValueError, match="unknown labels"):
        OrganStatements(nouns, ["Cardiomegaly"])
    # without links or fillers the grammar stays linear on long runs of spaces
    bare = {
        "subjects": {"heart": ["Cardiomegaly"]},
        "states": [{"value": "negative", "labels": ["Cardiomegaly"], "phrases": ["normal"]}],
    }
    statements = OrganStatements(bare, ["Cardiomegaly"])
    assert statements.find("heart is" + " " * 200 + "x") == []
    assert [s.labels for s in statements.find("Heart normal.")] == [("Cardiomegaly",)]
    ok = OrganStatements(None, ["Cardiomegaly"])  # a vocabulary without the block finds nothing
    assert ok.find("Heart size is normal.") == []
