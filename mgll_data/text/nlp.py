"""The report labeler's text preparation and spaCy pipeline (tokenizer, sentence splitter).

`prepare_text` rewrites a report without changing its length (so character offsets still
point into the original): de-identification tokens, `vs.`, `and/or`, word slashes and the
question sections (INDICATION, HISTORY, ...). `make_nlp` builds the pipeline the labeler runs.
"""

from __future__ import annotations

import re
from itertools import pairwise

_DEID = re.compile(r"_{2,}")
# Indiana University's de-identification replaces words (often not names: "likely", "ray")
# by XXXX; runs of capital X only, never a lower-case "x" ("x-ray", "2 x 3 cm").
_MASKED_WORD = re.compile(r"(?<![A-Za-z])X{4,}(?![A-Za-z])")
_VERSUS = re.compile(r"(?i)\b(vs)\.(?=\s)")
# "pacemaker/ICD", "ETT/NGT": a slash between words separates them (not "s/p", "and/or").
_WORD_SLASH = re.compile(r"(?<=[A-Za-z]{2})/(?=[A-Za-z]{2})")
# Sections that state the question, not the answer ("INDICATION: evaluate for pneumothorax"):
# their text is not labelled, as CheXpert labels only what the radiologist reports. A section
# runs to the next capitalised header or blank line.
_REQUEST_SECTION = re.compile(
    r"(?m)^[ \t]*(?:INDICATION|HISTORY|CLINICAL HISTORY|CLINICAL INDICATION|CLINICAL INFORMATION|"
    r"REASON FOR (?:THE )?(?:EXAM|EXAMINATION|STUDY)|CLINICAL QUESTION)[ \t]*:"
    r"(?P<body>.*?)(?=\n[ \t]*\n|\n?[ \t]*[A-Z][A-Z ()/,&-]{2,}:|\Z)",
    re.DOTALL,
)


def prepare_text(text: str) -> str:
    """Text for NLP, same length as the input: an `XXXX` de-identification token -> spaces
    (it stands for any word, "no XXXX of effusion", "most XXXX representing", so it is read
    as no word at all), `___` -> `XXX` (a word, so it neither glues sentences together nor
    reads as punctuation), `vs.` -> `vs ` (the trigger, not a sentence end), `and/or` ->
    `or    `, a slash between words (`pacemaker/ICD`) -> a space, and the body of an
    INDICATION/HISTORY-like section -> spaces (the question, not the findings)."""
    text = _MASKED_WORD.sub(lambda m: " " * len(m.group(0)), text)
    text = _DEID.sub(lambda m: "X" * len(m.group(0)), text)
    text = _VERSUS.sub(lambda m: m.group(1) + " ", text)
    text = re.sub(r"(?i)\band/or\b", "or    ", text)
    text = _REQUEST_SECTION.sub(_blank_body, text)
    return _WORD_SLASH.sub(" ", text)


def _blank_body(match: re.Match) -> str:
    """The header kept, its body replaced by spaces (line breaks kept, so offsets hold)."""
    head = match.group(0)[: match.start("body") - match.start()]
    return head + re.sub(r"[^\n]", " ", match.group("body"))


def make_nlp(model: str | None):
    """A full scispaCy model when installed (or asked for), else blank English + scispaCy."""
    import spacy
    from spacy.language import Language

    if not Language.has_factory("mgll_sentences"):
        Language.component("mgll_sentences", func=_sentences)
    candidates = [model] if model else ["en_core_sci_sm", "en_core_sci_md", "en_core_sci_lg"]
    for name in candidates:
        if name and spacy.util.is_package(name):
            nlp = spacy.load(name, exclude=["ner", "lemmatizer"])
            nlp.add_pipe("mgll_sentences", first=True)
            used = name
            break
    else:
        from scispacy.custom_tokenizer import combined_rule_tokenizer

        nlp = spacy.blank("en")
        nlp.tokenizer = combined_rule_tokenizer(nlp)
        nlp.add_pipe("mgll_sentences")
        used = "blank_en+scispacy_tokenizer"
    try:
        import scispacy.abbreviation  # noqa: F401  (registers the factory)

        nlp.add_pipe("abbreviation_detector")
        used += "+abbreviations"
    except (ImportError, ValueError):  # pragma: no cover - scispaCy is a dependency
        pass
    return nlp, used


_ENDERS = {".", "?", "!"}


def _sentences(doc):
    """Sentence starts: after . ? ! (not inside a number), at blank lines and line-start bullets."""
    tokens = list(doc)  # one pass over plain tokens: indexing the Doc per token costs more
    if tokens:
        tokens[0].is_sent_start = True
    for prev, token in pairwise(tokens):
        text, before = token.text, prev.text
        start = False
        if before in _ENDERS or (
            before.endswith(".") and len(before) > 1 and prev.whitespace_ and text[:1].isupper()
        ):
            start = True
        elif prev.is_space and ("\n\n" in before.replace(" ", "") or text in ("-", "*")):
            start = True
        elif "\n\n" in prev.whitespace_:
            start = True
        token.is_sent_start = start
    return doc
