"""Texts built from labels: the shared category formatter and the label-only templates
(`docs/architecture.md`, "The three granularities").

The category text is written by one formatter for every source, so identical label sets always
give identical text. Description and explanation templates come from the pipeline YAML; the
medical wording (phrases, explanations) comes from the vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..vocab import Vocabulary

NO_FINDING = "No Finding"


def _names_with(labels: Sequence[float], vocab: Vocabulary, value: float) -> list[str]:
    return [
        name
        for name, v in zip(vocab.names, labels, strict=True)
        if not math.isnan(v) and v == value and name != NO_FINDING
    ]


def positive_names(labels: Sequence[float], vocab: Vocabulary) -> list[str]:
    """Names of the labels that are 1, in vocabulary order (`No Finding` included)."""
    return [name for name, v in zip(vocab.names, labels, strict=True) if v == 1.0]


# The category of a study marked abnormal (`No Finding` 0) with none of the vocabulary's
# findings: PadChest's scoliosis or aortic elongation alone.
OTHER_FINDING = "Other Finding"
OTHER_FINDING_EXPLANATION = "A finding outside the labelled categories."


def _no_finding(labels: Sequence[float], vocab: Vocabulary) -> float | None:
    """The `No Finding` value (NaN: not annotated), or None without such a label (fundus)."""
    if NO_FINDING not in vocab.names:
        return None
    return labels[vocab.names.index(NO_FINDING)]


def _unasserted_normal(labels: Sequence[float], vocab: Vocabulary) -> list[str]:
    """The annotated negatives of an image whose `No Finding` is not annotated. Empty
    otherwise.

    A release that annotates one finding (SIIM-ACR's pneumothorax, Object-CXR's foreign
    objects) says nothing about the rest: its negatives are "no pneumothorax", not normal
    radiographs, and must not share the normals' text.
    """
    value = _no_finding(labels, vocab)
    if value is None or not math.isnan(value):
        return []
    return _names_with(labels, vocab, 0.0)


def format_category(labels: Sequence[float], vocab: Vocabulary) -> str:
    """Granularity 1: positives joined by ', '; else `Possible X, Y`; else `Other Finding` when
    `No Finding` is 0; else, when `No Finding` is not annotated, the annotated negatives, `No X,
    Y`; else `No Finding`."""
    positives = _names_with(labels, vocab, 1.0)
    if positives:
        return ", ".join(positives)
    uncertain = _names_with(labels, vocab, -1.0)
    if uncertain:
        return "Possible " + ", ".join(uncertain)
    if _no_finding(labels, vocab) == 0.0:
        return OTHER_FINDING
    negatives = _unasserted_normal(labels, vocab)
    return "No " + ", ".join(negatives) if negatives else NO_FINDING


def join_phrases(phrases: Sequence[str], conjunction: str = "and") -> str:
    """'a', 'a and b', 'a, b and c' (or 'a, b or c' for negations)."""
    if len(phrases) <= 1:
        return "".join(phrases)
    return ", ".join(phrases[:-1]) + f" {conjunction} " + phrases[-1]


def _sentence(template: str, phrases: Sequence[str], conjunction: str = "and") -> str:
    text = template.format(findings=join_phrases(phrases, conjunction))
    return text[:1].upper() + text[1:]


def describe_labels(labels: Sequence[float], vocab: Vocabulary, template: Mapping[str, Any]) -> str:
    """Granularity 2 for label-only sources: sentences on positives, uncertain and negatives.

    `template` keys: `positive`, `uncertain`, `negative` (each with `{findings}`), `none_positive`
    (used when nothing is positive or uncertain) and `max_negatives` (how many asserted negatives,
    in vocabulary order, to mention; 0 for none).
    """
    phrase = {label.name: label.phrase for label in vocab.labels}
    positives = [phrase[n] for n in _names_with(labels, vocab, 1.0)]
    uncertain = [phrase[n] for n in _names_with(labels, vocab, -1.0)]
    negatives = [phrase[n] for n in _names_with(labels, vocab, 0.0)]
    sentences = []
    if positives:
        sentences.append(_sentence(template["positive"], positives))
    if uncertain:
        sentences.append(_sentence(template["uncertain"], uncertain, "or"))
    if not positives and not uncertain:
        sentences.append(template["none_positive"])
    max_negatives = int(template.get("max_negatives", 0))
    if negatives and max_negatives > 0:
        sentences.append(_sentence(template["negative"], negatives[:max_negatives], "or"))
    return " ".join(sentences)


def explain_labels(labels: Sequence[float], vocab: Vocabulary) -> str:
    """Granularity 3 for label-only sources: the vocabulary's explanations of the positives.

    With no positive label, the uncertain ones are explained; with neither, as the category
    (`format_category`): a finding outside the categories, the annotated negatives named (`No
    pneumothorax.`), or `No Finding`'s explanation.
    """
    names = _names_with(labels, vocab, 1.0) or _names_with(labels, vocab, -1.0)
    if not names:
        if _no_finding(labels, vocab) == 0.0:
            return OTHER_FINDING_EXPLANATION
        negatives = _unasserted_normal(labels, vocab)
        if negatives:
            phrase = {label.name: label.phrase for label in vocab.labels}
            return _sentence("No {findings}.", [phrase[n] for n in negatives], "or")
        names = [NO_FINDING]
    return " ".join(vocab.label(name).explanation for name in names)
