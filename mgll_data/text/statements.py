"""Statements about an organ rather than a named finding, for the report labeler.

Radiologists often describe the heart, mediastinum or lungs instead of naming a finding: "heart
size and mediastinal contours are within normal limits", "the heart remains moderately
enlarged", "left lung is clear", "widening of the postoperative mediastinum". A phrase list per
finding cannot cover the combinations (subjects joined by "and", verbs, adverbs), so the
vocabulary's `organ_statements` block describes them as a small grammar:

    SUBJECT [(, | and) SUBJECT]... [LINK | :] [FILLER]... STATE   "heart and mediastinum are normal"
    ADJECTIVE SUBJECT [(, | and) SUBJECT]...                  "normal heart size and contours"
    NOUN of [the] [word] SUBJECT                              "enlargement of the heart"

Each subject names the labels it speaks for, each state the labels it can describe; a
statement speaks for their intersection. A state is either `negative` (a normal organ: the
labels get 0) or `judged` (an abnormal one: the labeler's negation and uncertainty rules decide,
so "the heart is not enlarged" is 0 and "the heart is likely enlarged" is -1).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

NEGATIVE_STATE, JUDGED_STATE = "negative", "judged"
# A normal-state statement under one of these is no longer a plain "normal" ("not normal").
_NEGATED_FILLER = re.compile(r"\b(not|no|never)\b", re.IGNORECASE)


# What may follow a state: the end of a clause, or a word that starts a new one. Anything else
# means the state word belongs to the next noun ("heart size is stable, large effusion") or to
# a range ("top normal to mildly enlarged"), which is not a plain statement.
_CLAUSE_END = (
    r"(?=\s*(?:[.,;:!?)]|$)|\s+(?:and|but|with|without|compared|since|when|which|although|"
    r"though|however|as|on|in|at|for|given|from|relative|allowing|accounting)\b)"
)
# A subject with neither a link nor a colon must open its clause ("Heart size normal.", not
# "mildly enlarged heart normal lungs").
_CLAUSE_OPENERS = ".;:!?(\n"


@dataclass(frozen=True)
class Statement:
    """One statement in a text: the span the labeler uses (the whole statement for a normal
    state, the state words for a judged one) and the labels it speaks for."""

    start: int
    end: int
    labels: tuple[str, ...]
    kind: str  # NEGATIVE_STATE or JUDGED_STATE


def _alternation(phrases: list[str]) -> str:
    """A regex alternation of phrases, longest first, any whitespace between words."""
    words = sorted({p.strip().lower() for p in phrases if p and p.strip()}, key=len, reverse=True)
    return "|".join(r"\s+".join(re.escape(w) for w in p.split()) for p in words)


class OrganStatements:
    """Finds organ statements as the vocabulary's `organ_statements` block describes them."""

    def __init__(self, block: Mapping[str, Any] | None, label_names: list[str]) -> None:
        block = block or {}
        self.subjects: dict[str, tuple[str, ...]] = {
            " ".join(k.lower().split()): tuple(v or ())
            for k, v in (block.get("subjects") or {}).items()
        }
        self.states: list[tuple[str, tuple[str, ...], list[str]]] = []
        for entry in block.get("states") or ():
            self.states.append((entry["value"], tuple(entry["labels"]), list(entry["phrases"])))
        self.nouns = [(tuple(e["labels"]), list(e["phrases"])) for e in block.get("nouns") or ()]
        self.adjectives = [
            (tuple(e["labels"]), list(e["phrases"])) for e in block.get("adjectives") or ()
        ]
        known = set(label_names)
        named = [
            *self.subjects.values(),
            *(s[1] for s in self.states),
            *(n[0] for n in [*self.nouns, *self.adjectives]),
        ]
        for labels in named:
            unknown = set(labels) - known
            if unknown:
                raise ValueError(f"organ_statements names unknown labels {sorted(unknown)}")
        for value, _, phrases in self.states:
            if value not in (NEGATIVE_STATE, JUDGED_STATE):
                raise ValueError(f"organ_statements: state value {value!r} is not negative/judged")
            if not _alternation(phrases):
                raise ValueError("organ_statements: a state without phrases")
        self._subject = re.compile(rf"\b(?:the\s+)?({_alternation(list(self.subjects))})\b", re.I)
        # Every position where a subject can start: the subject-first patterns are tried there
        # only (the same matches as scanning the whole text, several times faster).
        self._subject_starts = re.compile(
            rf"(?=\b(?:the\s+)?(?:{_alternation(list(self.subjects))}))", re.I
        )
        self._patterns = self._compile(block) if self.subjects else []

    def _compile(self, block: Mapping[str, Any]) -> list[tuple[re.Pattern, str, tuple, bool]]:
        subject = rf"(?:the\s+)?(?:{_alternation(list(self.subjects))})"
        chain = rf"{subject}(?:\s*,\s*(?:and\s+)?{subject}|\s+and\s+{subject})*"
        # Optional groups only for non-empty lists: an empty alternation inside a repetition
        # would backtrack exponentially on long runs of spaces.
        link = _alternation(list(block.get("links") or ()))
        link = rf"(?P<link>\s*:|\s+(?:{link}))?" if link else r"(?P<link>\s*:)?"
        filler = _alternation(list(block.get("fillers") or ()))
        fillers = rf"(?:\s+(?:{filler}),?)*" if filler else ""
        patterns = []
        for value, labels, phrases in self.states:
            # "heart size is normal", "Heart: normal size", "silhouette is unchanged, normal"
            regex = (
                rf"\b(?P<subjects>{chain})(?P<between>{link}{fillers})"
                rf"\s+(?P<state>{_alternation(phrases)})\b{_CLAUSE_END}"
            )
            patterns.append((re.compile(regex, re.I), value, labels, True))
        for labels, phrases in self.adjectives:
            # "normal heart size and mediastinal contours": the whole chain is normal
            regex = rf"\b(?P<state>{_alternation(phrases)})\s+(?P<subjects>{chain})\b"
            patterns.append((re.compile(regex, re.I), NEGATIVE_STATE, labels, False))
        for labels, phrases in self.nouns:
            regex = (
                rf"\b(?P<state>{_alternation(phrases)})\s+of\s+(?:the\s+)?(?:[a-z-]+\s+)??"
                rf"(?P<subjects>{subject})\b"
            )
            patterns.append((re.compile(regex, re.I), JUDGED_STATE, labels, False))
        return patterns

    def find(self, text: str) -> list[Statement]:
        """Every statement in `text` (see `Statement` for the spans)."""
        found = []
        starts = [m.start() for m in self._subject_starts.finditer(text)]
        for pattern, value, state_labels, subject_first in self._patterns:
            matches = (
                _matches_at(pattern, text, starts) if subject_first else pattern.finditer(text)
            )
            for match in matches:
                spoken = {
                    label
                    for name in self._subject.findall(match.group("subjects"))
                    for label in self.subjects[" ".join(name.lower().split())]
                }
                labels = tuple(sorted(spoken & set(state_labels)))
                if not labels or "\n\n" in match.group(0).replace(" ", ""):
                    continue  # no label in common, or across a paragraph break
                groups = match.groupdict()
                if "link" in groups and not groups["link"]:
                    before = text[: match.start()].rstrip(" \t")
                    if before and before[-1] not in _CLAUSE_OPENERS:
                        continue
                if value == NEGATIVE_STATE:
                    if _NEGATED_FILLER.search(groups.get("between") or ""):
                        continue
                    span = (match.start(), match.end())
                else:
                    span = (match.start("state"), match.end("state"))
                found.append(Statement(*span, labels, value))
        return found


def _matches_at(pattern: re.Pattern, text: str, starts: list[int]):
    """`pattern.finditer(text)` for a pattern that can only match at `starts`: the same
    non-overlapping matches, left to right."""
    end = 0
    for start in starts:
        if start < end:
            continue
        match = pattern.match(text, start)
        if match:
            end = max(match.end(), start + 1)
            yield match


__all__ = ["JUDGED_STATE", "NEGATIVE_STATE", "OrganStatements", "Statement"]
