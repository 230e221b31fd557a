"""Radiology report sectioning: header detection, name normalisation and the MIMIC-CXR rules.

The project's own implementation of the behaviour the official MIMIC-CXR section splitter is known
for (the release's own `txt/section_parser.py`); no code is taken from it.

- A header is an ALL-CAPS run (`A-Z`, space, `( ) / , & -`) at the start of a line, followed by
  a colon. Unlike the official regex this also finds a header on the first line, without the
  leading space and with no whitespace after the colon (`IMPRESSION:No acute ...`); a
  header-like string later on the same line as a header is not a header (as officially).
- Text before the first header is the `preamble`; a report without headers is `full_report`.
- WET READ and addendum blocks written *above* the final report (separated from it by a full line
  of underscores) are cut off first and kept as `wet_read` / `addendum` sections, so headers inside
  them never shadow the final report's.
- Names are lower-cased and normalised: a table of variants and known typos, then a fuzzy match
  (so unlisted typos such as `IMPRESSON` / `FINDNGS` still land), then "contains" rules, then
  view-like titles (`CHEST, PA AND LATERAL:`) become `findings`.
- Empty sections are dropped; when a name repeats, the last non-empty occurrence wins (as the
  official conclusion picker does).
- With neither `impression` nor `findings`, the last section's text after its first paragraph
  becomes `last_paragraph`.
- Per-study special cases (`SPECIAL_INDICES`, `SPECIAL_SECTION_NAMES`) set `conclusion` and drop
  the generic conclusion candidates. Only the case the reference names is built in; the full
  official table is read from the user's copy of the official `section_parser.py`
  (`load_official_rules`, parsed as data and never executed), and a pipeline may add more.
- `___` de-identification tokens are kept verbatim in every section text.
"""

from __future__ import annotations

import ast
import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

# A header at a line start: capitals with a few punctuation characters, then a colon.
_HEADER = re.compile(r"(?m)^[ \t]*([A-Z][A-Z ()/,&-]{0,60}?)[ \t]*:(?=\s|[A-Za-z_]|$)[ \t]*")
_UNDERSCORE_LINE = re.compile(r"(?m)^[ \t]*_{20,}[ \t]*$")
_PARAGRAPH = re.compile(r"\n[ \t]*\n")
_FINAL_REPORT = re.compile(r"FINAL REPORT", re.IGNORECASE)

# Variants and frequent typos -> canonical names (lower case, single spaces).
NAME_TABLE: dict[str, str] = {
    # impression
    "impression": "impression",
    "impressions": "impression",
    "impresson": "impression",
    "impressoin": "impression",
    "imression": "impression",
    "impresion": "impression",
    "imprssion": "impression",
    "imprression": "impression",
    "impreession": "impression",
    "impressio": "impression",
    "impession": "impression",
    "conclusion": "impression",
    "conclusions": "impression",
    "findings and impression": "impression",
    "findings/impression": "impression",
    "impression and recommendation": "impression",
    "impression and recommendations": "impression",
    "summary": "impression",
    # findings
    "findings": "findings",
    "finding": "findings",
    "findngs": "findings",
    "findigns": "findings",
    "fidings": "findings",
    "finidngs": "findings",
    "fiindings": "findings",
    "findins": "findings",
    "report": "findings",
    "chest, two views": "findings",
    "chest two views": "findings",
    # comparison
    "comparison": "comparison",
    "comparisons": "comparison",
    "comparsion": "comparison",
    "comparision": "comparison",
    "comparison exam": "comparison",
    "comparison exams": "comparison",
    "comparison study": "comparison",
    "comparison studies": "comparison",
    "reference exam": "comparison",
    "prior": "comparison",
    "prior study": "comparison",
    "priors": "comparison",
    # history / indication / examination
    "history": "history",
    "clinical history": "history",
    "patient history": "history",
    "clinical information": "history",
    "pfi": "history",
    "provisional findings impression": "history",
    "indication": "indication",
    "indications": "indication",
    "reason for exam": "indication",
    "reason for examination": "indication",
    "clinical indication": "indication",
    "exam": "examination",
    "examination": "examination",
    "type of examination": "examination",
    "study": "examination",
    "procedure": "examination",
    "technique": "technique",
    "recommendation": "recommendations",
    "recommendations": "recommendations",
    "recommendation(s)": "recommendations",
    "notification": "notification",
    "wet read": "wet_read",
    "wetread": "wet_read",
    "addendum": "addendum",
    "final report": "final_report",
}
# Names that absorb any header containing them (checked in this order).
CONTAINS_ORDER = ("impression", "findings", "history", "comparison", "addendum")
# Typo-tolerant matching: only against these, and only for names of similar length.
FUZZY_TARGETS = ("impression", "findings", "comparison", "indication", "technique", "examination")
FUZZY_CUTOFF = 0.85
# View-like titles (`CHEST, PA AND LATERAL:`, `PORTABLE AP VIEW:`) introduce findings.
_VIEWISH = re.compile(
    r"\b(chest|portable|pa and lat(eral)?|ap and lat(eral)?|pa|ap|lateral|frontal|upright|supine|"
    r"semi-?upright|one view|two views|single view|views?|ribs?|bone windows?|radiograph)\b"
)

# The per-study cases of the official splitter that the project knows: study -> (start, end) of
# the conclusion in the report text ((0, 0): the report states no conclusion at all).
SPECIAL_INDICES: dict[str, tuple[int, int]] = {"s58235663": (0, 0)}
# study -> section name whose *last* occurrence is the conclusion.
SPECIAL_SECTION_NAMES: dict[str, str] = {}
CONCLUSION_CANDIDATES = ("impression", "findings", "last_paragraph", "comparison", "full_report")


@dataclass
class Sectioned:
    """A sectioned report: `sections` (name -> text, empty ones dropped) and the header order."""

    sections: dict[str, str]
    order: list[tuple[str, str]] = field(default_factory=list)  # (normalised, raw header)
    special_case: str | None = None  # "indices" / "section_name" when a per-study rule fired


def normalise_name(raw: str) -> str:
    """A raw header (`IMPRESSON`, `CHEST, PA AND LAT`) -> a canonical section name."""
    name = " ".join(raw.lower().replace("_", " ").split()).strip(" ,-/")
    if name in NAME_TABLE:
        return NAME_TABLE[name]
    for word in CONTAINS_ORDER:
        if word in name:
            return word
    compact = name.replace(" ", "")
    for target in FUZZY_TARGETS:
        if abs(len(compact) - len(target)) <= 2 and (
            difflib.SequenceMatcher(None, compact, target).ratio() >= FUZZY_CUTOFF
        ):
            return NAME_TABLE.get(target, target)
    if _VIEWISH.search(name):
        return "findings"
    return name.replace(" ", "_")


def clean_text(text: str) -> str:
    """Section text as stored: lines stripped, paragraphs kept as blank lines, `___` kept."""
    paragraphs = [" ".join(p.split()) for p in _PARAGRAPH.split(text)]
    return "\n\n".join(p for p in paragraphs if p)


def _split_headers(text: str) -> list[tuple[str, str, str]]:
    """(normalised name, raw header, raw text) in document order; `preamble` first if any."""
    matches = []
    position = 0
    while True:
        match = _HEADER.search(text, position)
        if match is None:
            break
        matches.append(match)
        # A header-like string on the same line as this header is not a header.
        newline = text.find("\n", match.end())
        if newline < 0:
            break
        position = newline + 1
    if not matches:
        return [("full_report", "", text)]
    parts = []
    if text[: matches[0].start()].strip():
        parts.append(("preamble", "", text[: matches[0].start()]))
    for match, following in zip(matches, matches[1:] + [None], strict=True):
        end = following.start() if following is not None else len(text)
        raw = match.group(1).strip()
        parts.append((normalise_name(raw), raw, text[match.end() : end]))
    return parts


def _split_blocks(text: str) -> tuple[list[tuple[str, str]], str]:
    """Cut WET READ / addendum blocks that sit above FINAL REPORT off the report body."""
    lines = list(_UNDERSCORE_LINE.finditer(text))
    if not lines:
        return [], text
    blocks: list[tuple[str, str]] = []
    start = 0
    for line in lines:
        if not _FINAL_REPORT.search(text[line.end() :]):
            break  # the final report is above this line: keep the rest as it is
        block = text[start : line.start()]
        if block.strip():
            header = _HEADER.search(block)
            name = normalise_name(header.group(1)) if header else "addendum"
            body = block[header.end() :] if header else block
            blocks.append((name if name in ("wet_read", "addendum") else "addendum", body))
        start = line.end()
    return blocks, text[start:]


def section_report(
    text: str,
    study_id: str | None = None,
    special_indices: Mapping[str, tuple[int, int]] | None = None,
    special_section_names: Mapping[str, str] | None = None,
) -> Sectioned:
    """Split one report into named sections (see the module docstring for the rules)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    blocks, body = _split_blocks(text)
    parts = _split_headers(body)
    sections: dict[str, str] = {}
    order: list[tuple[str, str]] = []
    for name, raw, chunk in [(n, n.upper(), b) for n, b in blocks] + parts:
        order.append((name, raw))
        cleaned = clean_text(chunk)
        if cleaned:
            sections.pop(name, None)  # the last non-empty occurrence wins, in document order
            sections[name] = cleaned
    if "impression" not in sections and "findings" not in sections and sections:
        last = next(reversed(sections))
        if last not in ("wet_read", "addendum"):
            first, _, rest = sections[last].partition("\n\n")
            if rest.strip():
                sections[last] = first
                sections["last_paragraph"] = rest
    result = Sectioned(sections=sections, order=order)
    indices = {**SPECIAL_INDICES, **(special_indices or {})}
    names = {**SPECIAL_SECTION_NAMES, **(special_section_names or {})}
    if study_id is not None and (study_id in indices or study_id in names):
        if study_id in indices:
            start, end = indices[study_id]
            conclusion = clean_text(text[start:end])
            result.special_case = "indices"
        else:
            wanted = names[study_id]
            found = [chunk for name, _, chunk in parts if name == wanted]
            conclusion = clean_text(found[-1]) if found else ""
            result.special_case = "section_name"
        for name in CONCLUSION_CANDIDATES:
            sections.pop(name, None)
        if conclusion:
            sections["conclusion"] = conclusion
    return result


def conclusion(sectioned: Sectioned, order: tuple[str, ...] = ()) -> tuple[str, str]:
    """The conclusion the CheXpert/NegBio labels were made from: (text, section name)."""
    for name in order or ("conclusion", *CONCLUSION_CANDIDATES[:4]):
        if sectioned.sections.get(name, "").strip():
            return sectioned.sections[name], name
    return "", ""


def load_official_rules(path: str | Path) -> tuple[dict[str, tuple[int, int]], dict[str, str]]:
    """The per-study tables of the official splitter, from a copy of its `section_parser.py`.

    MIMIC-CXR users have the MIT-LCP `mimic-cxr` repository (`txt/section_parser.py`, also in
    `mimic-code`'s `mimic-iv-cxr/txt/`); rather than keep a second copy of its study lists, we
    read the dict literals assigned to `custom_indices` and `custom_section_names` there. The
    file is parsed with `ast` and never imported or run. Returns (indices, section names).
    """
    path = Path(path)
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (OSError, UnicodeDecodeError, SyntaxError) as err:
        raise UserError(f"{path}: cannot read the official section rules ({err})") from None
    tables: dict[str, dict] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            for target in node.targets:
                if isinstance(target, ast.Name) and target.id in (
                    "custom_indices",
                    "custom_section_names",
                ):
                    try:
                        tables[target.id] = ast.literal_eval(node.value)
                    except (ValueError, TypeError):
                        raise UserError(
                            f"{path}: {target.id} is not a literal dict of study ids"
                        ) from None
    if set(tables) != {"custom_indices", "custom_section_names"}:
        missing = sorted({"custom_indices", "custom_section_names"} - set(tables))
        raise UserError(
            f"{path}: expected the official section_parser.py with dict literals "
            f"custom_indices and custom_section_names; {', '.join(missing)} not found"
        )
    indices: dict[str, tuple[int, int]] = {}
    for study, pair in tables["custom_indices"].items():
        ok = isinstance(pair, list | tuple) and len(pair) == 2
        if not ok or not all(isinstance(x, int) and not isinstance(x, bool) for x in pair):
            raise UserError(
                f"{path}: custom_indices must map study ids to [start, end] pairs of integers "
                f"({study!r}: {pair!r})"
            )
        indices[str(study)] = (pair[0], pair[1])
    names = {str(k): str(v).lower() for k, v in tables["custom_section_names"].items()}
    return indices, names
