"""The report labeler: negation, uncertainty, `___`, aggregation, No Finding, dev-set quality."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from mgll_data.text.labeler import aggregate, default_labeler, no_finding, prepare_text

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "labeler_dev.py"
CHEXPERT_LIKE = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Lesion", "Lung Opacity",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices",
)  # fmt: skip


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
        # a hedged predicate: the opacity is seen, its cause is uncertain
        ("Left basal opacity is likely atelectasis.", {"Lung Opacity": 1.0, "Atelectasis": -1.0}),
        ("Atelectasis is likely the cause.", {"Atelectasis": -1.0}),
        (  # only a finding right after "is likely" takes the hedge, to the end of its clause
            "Pneumonia is likely present at the right base with small effusion.",
            {"Pneumonia": -1.0, "Pleural Effusion": 1.0},
        ),
        (
            "Opacity is likely atelectasis, with small effusion.",
            {"Lung Opacity": 1.0, "Atelectasis": -1.0, "Pleural Effusion": 1.0},
        ),
        ("Pneumothorax is no longer visualized.", {"Pneumothorax": 0.0, "No Finding": 1.0}),
        ("Left-sided pacemaker/ICD in place.", {"Support Devices": 1.0, "No Finding": 1.0}),
        (
            "Opacity has nearly resolved, with minimal residual atelectasis.",
            {"Lung Opacity": 1.0, "Atelectasis": 1.0},
        ),  # fmt: skip
    ],
)
def test_sentences(labeler, text, expected):
    assert labeler.label(text) == expected


def test_child_mentions_that_count_for_the_parent(labeler):
    labels = labeler.label("A 2 cm nodule in the right upper lobe.")
    assert labels == {"Nodule": 1.0, "Lung Lesion": 1.0}
    assert labeler.label("No pulmonary nodules or masses.") == {
        "Nodule": 0.0, "Mass": 0.0, "Lung Lesion": 0.0, "No Finding": 1.0,
    }  # fmt: skip
    labels = labeler.label("Apical pleural thickening. Possible right basilar infiltrate.")
    assert labels["Pleural Other"] == 1.0 and labels["Lung Opacity"] == -1.0
    assert "Lung Opacity" not in labeler.label("Mild pulmonary edema.")  # scored independently
    vocab = labeler.vocab
    assert "nodule" in vocab.mentions_for("Lung Lesion") and "edema" not in vocab.mentions_for(
        "Lung Opacity"
    )


def test_no_finding_speaks_for_the_chosen_labels():
    from mgll_data.text.labeler import TextLabeler

    text = "Emphysema. No acute process."
    everything = default_labeler("chest_xray").label(text)
    assert everything == {"Emphysema": 1.0}  # the whole vocabulary: a finding, so no No Finding
    chexpert = TextLabeler(default_labeler("chest_xray").vocab, labels=CHEXPERT_LIKE).label(text)
    assert chexpert == {"No Finding": 1.0}  # CheXpert's 14: emphysema is none of them


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


@pytest.mark.parametrize(
    "text, expected",
    [
        # A pseudo-trigger ("no longer") must not hide a longer negation containing it.
        (
            "The left apical pneumothorax is no longer seen.",
            {"Pneumothorax": 0.0, "No Finding": 1.0},
        ),
        (
            "Layering effusion is no longer present on the right.",
            {"Pleural Effusion": 0.0, "No Finding": 1.0},
        ),
        ("No change in the small right pneumothorax.", {"Pneumothorax": 1.0}),  # pseudo kept
        # "versus"/"vs." hedges the alternatives next to it, not the finding before the comma.
        (
            "Left basilar opacity, atelectasis versus pneumonia.",
            {"Lung Opacity": 1.0, "Atelectasis": -1.0, "Pneumonia": -1.0},
        ),
        ("Atelectasis vs. pneumonia at the left base.", {"Atelectasis": -1.0, "Pneumonia": -1.0}),
        ("Pneumonia versus Atelectasis.", {"Atelectasis": -1.0, "Pneumonia": -1.0}),
        # A terminator right after a hedge belongs to it ("likely due to X").
        (
            "Bibasilar opacities, likely due to atelectasis.",
            {"Lung Opacity": 1.0, "Atelectasis": -1.0},
        ),
        (
            "Opacity may be secondary to aspiration pneumonia.",
            {"Lung Opacity": 1.0, "Pneumonia": -1.0},
        ),
        ("Edema, likely due to fluid overload.", {"Edema": 1.0}),  # the finding itself stays
        # A label's own phrase right before its mention decides that mention.
        ("Interval removal of the right IJ catheter.", {"Support Devices": 0.0, "No Finding": 1.0}),
        (
            "Interval removal of the left chest tube. Right PICC remains in place.",
            {"Support Devices": 1.0, "No Finding": 1.0},
        ),
    ],
)
def test_dev_set_bug_fixes(labeler, text, expected):
    assert {k: v for k, v in labeler.label(text).items() if k in CHEXPERT_LIKE} == expected


def _bench():
    spec = importlib.util.spec_from_file_location("labeler_dev", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dev_set_beats_keyword_and_negspacy_baselines():
    module = _bench()
    assert len(module.load_dev_set()) >= 150  # report sentences
    assert len(module.load_dev_reports()) >= 40  # whole reports (FINDINGS + IMPRESSION)
    results = module.run(repeat=0)
    ours = {name: results[name]["labeler"]["macro_f1"] for name in module.SET_NAMES}
    # Floors: the first measurement of each set minus about 0.05 (sentences 0.930, reports
    # 0.895, all 0.921 when written; reports_b 0.947, reports_c 0.979 and reports_d 0.983 while
    # still held out). Now (vocabulary 1.2.0): 0.99 to 0.997 on every set.
    assert ours["sentences"] >= 0.88
    assert ours["reports"] >= 0.84
    assert ours["reports_b"] >= 0.89
    assert ours["reports_c"] >= 0.92
    assert ours["reports_d"] >= 0.93
    assert ours["all"] >= 0.87
    for name in module.SET_NAMES:
        assert ours[name] >= results[name]["keywords"]["macro_f1"] + 0.3, name  # measured +0.5
        if "negspacy" in results[name]:  # measured +0.25
            assert ours[name] >= results[name]["negspacy"]["macro_f1"] + 0.1, name
    table = results["all"]["labeler"]["table"]
    for name in ("Pneumothorax", "Pleural Effusion", "Pneumonia", "Edema", "Consolidation",
                 "Atelectasis", "Cardiomegaly", "Lung Opacity"):  # fmt: skip
        assert table[name]["f1"] >= 0.85, name
    values = results["all"]["labeler"]["values"]
    assert values["negative"]["f1"] >= 0.9 and values["uncertain"]["f1"] >= 0.85


def test_dev_sets_are_well_formed():
    module = _bench()
    allowed = set(module.CHEXPERT_14)
    for row in module.load_dev_sets()["all"]:
        assert row["text"].strip() and set(row["labels"]) <= allowed, row
        assert set(row["labels"].values()) <= {1.0, 0.0, -1.0}, row
        # No Finding by CheXpert's rule, from the 13 findings.
        others = [v for k, v in row["labels"].items() if k not in ("No Finding", "Support Devices")]
        assert (row["labels"].get("No Finding") == 1.0) == (not {1.0, -1.0} & set(others)), row
    for row in module.load_dev_reports():
        assert "FINDINGS:" in row["text"] and "IMPRESSION:" in row["text"]


@pytest.mark.parametrize(
    "text, expected",
    [
        # A trigger that runs past the end of a fixed phrase still reads on ("clear" + "of").
        (
            "The lungs are clear of focal airspace disease, pneumothorax, or pleural effusion.",
            {"Lung Opacity": 0.0, "Pneumothorax": 0.0, "Pleural Effusion": 0.0, "No Finding": 1.0},
        ),
        # An XXXX de-identification token is no word: "the heart [is] slightly large".
        ("The heart XXXX is slightly large.", {"Cardiomegaly": 1.0}),
        # A hedged phrase can be denied; it decides no mention after it.
        ("No hyperexpansion of the lungs.", {"No Finding": 1.0}),
        # Hedges of real reports.
        ("Please note that fractures may not be demonstrated.", {"Fracture": -1.0}),
        ("Pneumonia is in the differential.", {"Pneumonia": -1.0}),
        ("Please correlate clinically for pneumonia.", {"Pneumonia": -1.0}),
        ("Could indicate an atypical pneumonia.", {"Pneumonia": -1.0}),
        (
            "Differential considerations include atelectasis, infiltrate, aspiration.",
            {"Lung Opacity": -1.0, "Atelectasis": -1.0},
        ),
        # Old infection is not pneumonia now; granulomatous disease is a lesion (as indexed).
        ("Residuals of prior granulomatous infection.", {"Lung Lesion": 1.0}),
        ("Prior granulomatous disease.", {"Lung Lesion": 1.0}),
        ("Hilar calcifications suggest a previous granulomatous process.", {"Lung Lesion": -1.0}),
        # CheXpert: vascular congestion is uncertain edema; "history of X" is not X now;
        # "volume loss" alone is no atelectasis mention.
        ("Mild central vascular congestion.", {"Edema": -1.0}),
        (
            "Stable right suprahilar opacity, compatible with history of right upper lobe mass.",
            {"Lung Opacity": 1.0, "Lung Lesion": 0.0},
        ),
        ("Stable right-sided volume loss.", {"No Finding": 1.0}),
        # Partial resolution leaves the finding; "pneumonitis" is a pneumonia.
        ("COPD with almost completely resolved right apical pneumothorax.", {"Pneumothorax": 1.0}),
        ("Patchy opacity consistent with pneumonitis.", {"Lung Opacity": 1.0, "Pneumonia": 1.0}),
    ],
)
def test_real_report_wordings(labeler, text, expected):
    assert {k: v for k, v in labeler.label(text).items() if k in CHEXPERT_LIKE} == expected


def test_a_hedged_phrase_decides_no_mention_after_it(labeler):
    labels = labeler.label("Hyperexpanded lungs consistent with emphysema.")
    assert labels["Emphysema"] == 1.0
    assert labeler.label("Lungs are hyperexpanded.")["Emphysema"] == -1.0


def test_masked_words_become_spaces():
    assert prepare_text("no XXXX of effusion, x-XXXX") == "no      of effusion, x-    "
    assert prepare_text("x-ray 2 x 3 cm") == "x-ray 2 x 3 cm"  # lower-case x is a word
