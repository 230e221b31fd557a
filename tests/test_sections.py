"""Report sectioning: headers, typos, preamble, WET READ blocks, last paragraph, special cases."""

from __future__ import annotations

import pytest

from mgll_data.errors import UserError
from mgll_data.text.sections import conclusion, load_official_rules, normalise_name, section_report
from tests.mimic_fixture import REPORT_A, REPORT_B, REPORT_C, REPORT_F


def test_normal_report_all_headers_and_empty_section_dropped():
    s = section_report(REPORT_A)
    assert s.sections["impression"] == "No acute cardiopulmonary process."
    assert s.sections["findings"].startswith("The lungs are clear without focal consolidation.")
    assert s.sections["preamble"] == "FINAL REPORT"
    assert s.sections["indication"] == "___ year old woman with cough // ?pneumonia"
    assert "notification" not in s.sections  # empty: dropped
    assert ("notification", "NOTIFICATION") in s.order
    assert "Dr. ___ was informed at ___." in s.sections["findings"]  # `___` kept verbatim


def test_wet_read_and_addendum_above_final_report_do_not_shadow_it():
    s = section_report(REPORT_B)
    # The WET READ's own "IMPRESSION:" is inside its block, not the report's impression.
    assert s.sections["impression"].startswith("Moderate cardiomegaly with small bilateral")
    assert "prelim only" in s.sections["wet_read"]
    assert s.sections["addendum"].startswith("Findings were discussed with Dr. ___")
    assert "\u00b0" in s.sections["indication"]
    assert ("impression", "IMPRESSON") in s.order  # the typo was normalised


def test_no_impression_or_findings_gives_last_paragraph():
    s = section_report(REPORT_C)
    assert "findings" not in s.sections  # the empty FINDINGS header is dropped
    assert s.sections["comparison"] == "___."
    assert s.sections["last_paragraph"].startswith("PA and lateral views of the chest")
    assert conclusion(s) == (s.sections["last_paragraph"], "last_paragraph")


def test_report_without_headers():
    s = section_report("Heart size normal. Lungs clear.\n\nNo acute process.")
    assert s.sections == {
        "full_report": "Heart size normal. Lungs clear.",
        "last_paragraph": "No acute process.",
    }
    assert section_report("Heart size normal.").sections == {"full_report": "Heart size normal."}


def test_header_variants():
    assert normalise_name("IMPRESSON") == "impression"
    assert normalise_name("IMPRESION") == "impression"  # unlisted typo: fuzzy match
    assert normalise_name("FINDNGS") == "findings"
    assert normalise_name("FINDINGS AND IMPRESSION") == "impression"
    assert normalise_name("CONCLUSION") == "impression"
    assert normalise_name("REASON FOR EXAMINATION") == "indication"
    assert normalise_name("CLINICAL HISTORY") == "history"
    assert normalise_name("COMPARISONS") == "comparison"
    assert normalise_name("CHEST, PA AND LATERAL") == "findings"
    assert normalise_name("INDICATION") == "indication"  # not fuzzily an impression
    assert normalise_name("NOTE") == "note"
    # First-line header, no space after the colon, and header-like text later on a header line.
    s = section_report("IMPRESSION:No acute process. COMPARISON: none\n FINDINGS: Clear lungs.")
    assert s.sections == {
        "impression": "No acute process. COMPARISON: none",
        "findings": "Clear lungs.",
    }


def test_repeated_header_keeps_last_non_empty():
    s = section_report(" FINDINGS: first\n IMPRESSION: one\n FINDINGS: second\n IMPRESSION: \n")
    assert s.sections["findings"] == "second" and s.sections["impression"] == "one"


def test_special_cases():
    s = section_report(REPORT_F, "s58235663")
    assert s.special_case == "indices"
    assert "impression" not in s.sections and "conclusion" not in s.sections
    assert section_report(REPORT_F, "s50000000").sections["impression"].startswith("Study")
    s = section_report(REPORT_A, "s1", special_section_names={"s1": "technique"})
    assert s.sections["conclusion"] == "Chest PA and lateral" and "impression" not in s.sections
    s = section_report(REPORT_A, "s2", special_indices={"s2": (0, 12)})
    assert "impression" not in s.sections and s.sections.get("conclusion", "") == ""


# Shaped like the official txt/section_parser.py (a function returning two dict literals); the
# ids and offsets here are this fixture's own. The top-level statement proves it is never run.
OFFICIAL_RULES = """
import re
open("RAN", "w").write("executed")


def custom_mimic_cxr_rules():
    custom_section_names = {
        's50414267': 'technique',  # files/p10/p10000032/s50414267.txt
        's50000001': 'RECOMMENDATIONS',
    }
    custom_indices = {
        's53911762': [0, 0],
        's50000002': [10, 20],
    }
    return custom_section_names, custom_indices
"""


def test_official_rules_are_read_as_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "section_parser.py"
    path.write_text(OFFICIAL_RULES)
    indices, names = load_official_rules(path)
    assert indices == {"s53911762": (0, 0), "s50000002": (10, 20)}
    assert names == {"s50414267": "technique", "s50000001": "recommendations"}
    assert not (tmp_path / "RAN").exists()
    s = section_report(REPORT_A, "s50414267", indices, names)
    assert s.special_case == "section_name" and s.sections["conclusion"] == "Chest PA and lateral"


def test_official_rules_bad_file(tmp_path):
    path = tmp_path / "section_parser.py"
    path.write_text("custom_indices = {'s1': [0, 1]}\n")
    with pytest.raises(UserError, match="custom_section_names not found"):
        load_official_rules(path)
    path.write_text("def broken(:\n")
    with pytest.raises(UserError, match="section_parser.py: cannot read"):
        load_official_rules(path)
    for bad in ("'x'", "'12'", "[1, 2, 3]", "[1.0, 2]"):
        path.write_text(f"custom_indices = {{'s1': {bad}}}\ncustom_section_names = {{}}\n")
        with pytest.raises(UserError, match=r"\[start, end\] pairs"):
            load_official_rules(path)
    path.write_text("custom_indices = {[1]: 2}\ncustom_section_names = {}\n")  # unhashable key
    with pytest.raises(UserError, match="not a literal dict"):
        load_official_rules(path)
