"""Label extraction from radiology report text, for every source with reports.

A spaCy pipeline: blank English with scispaCy's rule tokenizer and abbreviation detector (or a
full scispaCy model when one is installed, e.g. `en_core_sci_sm`), a sentence splitter of our
own, mention phrases from the domain vocabulary through a `PhraseMatcher` on lower-cased tokens,
and NegEx/ConText-style negation and uncertainty with the project's own rules built from the
vocabulary's trigger lists. Several mentions of one label are combined as CheXpert does
(positive > uncertain > negative), and `No Finding` follows CheXpert's rule.

Why not medspaCy's ConText or negspaCy: neither is installed (medspaCy pins its own PyRuSH and
QuickUMLS stack, negspaCy only yields a negated flag, no uncertainty), and both need the same
fixes anyway: `___` suppresses their sentence breaks and "cannot exclude X" is
negated instead of uncertain. The rules here are short and read every phrase from the vocabulary.

Rules (per sentence, per mention):
- Triggers are matched like mentions; overlapping matches keep the longest (so "cannot exclude"
  beats "not", "no evidence of" beats "no"); a trigger inside a mention is not a trigger, nor is
  a pseudo-trigger ("no change", "not only", ...).
- A "pre" trigger covers the mentions after it up to the end of the sentence, a scope terminator
  (vocabulary), a clause break (`;`, `:`), another trigger, or `MAX_PRE_SCOPE` tokens; a "post"
  trigger covers the mentions before it in the same way within `MAX_POST_SCOPE` tokens.
- A post trigger ending in a hedging adverb ("is likely") directly followed by a mention hedges
  that mention (to the end of its clause) instead: "opacity is likely atelectasis" -> opacity
  1, atelectasis -1; "pneumonia is likely present at the base" still hedges the pneumonia.
- Order (CheXpert): an uncertainty trigger that contains a negation ("cannot exclude", "not
  excluded") makes the mention uncertain; else a negation makes it negative; else another
  uncertainty trigger makes it uncertain; else it is positive.
- A label's `negative_phrases` ("heart size is normal") and `uncertain_phrases` ("borderline
  cardiomegaly") give 0 / -1 directly; `mention_exclusions` ("pericardial effusion") remove the
  overlapping mention; an abbreviation defined in the text ("pneumothorax (PTX)") makes its short
  form a mention of the long form's label.
- Statements about an organ ("heart and mediastinal contours are normal", "the heart is mildly
  enlarged", "left lung is clear"; `mgll_data/text/statements.py`) give 0 for a normal state and are
  judged like mentions for an abnormal one.
- A positive or uncertain heart-failure mention adds an uncertain Cardiomegaly mention (CheXpert).
- Mentions of a label marked `mentions_count_for_parent` in the vocabulary also count for its
  parent (Nodule and Mass for Lung Lesion, Pleural Thickening for Pleural Other, Infiltration for
  Lung Opacity, as CheXpert's mention lists have them); other children (Edema under Lung
  Opacity) do not, since CheXpert labels those independently.
- `No Finding` is 1 when no label other than Support Devices is positive or uncertain (its own
  mentions only keep "no" inside them from acting as a trigger); otherwise it is not set. With
  `labels=` (e.g. CheXpert's 14) it looks at those labels only, so "emphysema" alone leaves a
  CheXpert-style No Finding = 1, as CheXpert's labeler gives.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from functools import cache

from ..vocab import Vocabulary, load_vocabulary
from .statements import NEGATIVE_STATE, OrganStatements

POSITIVE, NEGATIVE, UNCERTAIN = 1.0, 0.0, -1.0
NO_FINDING = "No Finding"
NO_FINDING_IGNORES = ("Support Devices",)
MAX_PRE_SCOPE = 12  # tokens between a pre trigger and a mention it covers
MAX_POST_SCOPE = 8  # tokens between a mention and a post trigger that covers it
MAX_PHRASE_GAP = 3  # words between a label's fixed phrase and a mention it decides
# Grammar, not medicine: phrases that contain a negation word but negate nothing (NegEx "pseudo").
PSEUDO_TRIGGERS = (
    "no change",
    "no interval change",
    "no significant change",
    "no significant interval change",
    "no substantial change",
    "no definite change",
    "no appreciable change",
    "not significantly changed",
    "not changed",
    "without change",
    "without interval change",
    "no increase",
    "no decrease",
    "no further",
    "not only",
    "not necessarily",
    "no longer",
    "gram negative",
    "not well seen",
    "not well evaluated",
    "not well assessed",
    "not as well seen",
    "without significant change",
    # Partly resolved is still there ("has nearly resolved, with minimal residual atelectasis").
    "nearly resolved",
    "almost resolved",
    "partially resolved",
    "partly resolved",
    "incompletely resolved",
    "not completely resolved",
    "not entirely resolved",
    "largely resolved",
    "mostly resolved",
)
# Clause breaks that end any trigger's scope, besides the vocabulary's terminators.
CLAUSE_BREAKS = (";", ":", "there", "which", "whereas")
# "is likely" / "are probably" ...: hedge what follows when a finding follows right after.
HEDGING_ADVERBS = ("likely", "probably", "possibly")
MAX_HEDGE_BRIDGE = 3
HEDGE_BRIDGE_WORDS = frozenset(
    "a an the some due to secondary related from representing reflecting mild minimal small "
    "early developing subsegmental focal patchy residual compressive dependent basilar "
    "bibasilar bilateral left right linear plate-like discoid mildly moderately slightly "
    "minimally markedly severely somewhat old new healed healing prior chronic acute recent "
    "underlying".split()
)
# CheXpert: heart failure (positive or uncertain) implies possible cardiomegaly.
HEART_FAILURE = ("chf", "heart failure", "congestive heart failure", "cardiac failure")
NEGATION_WORDS = re.compile(r"\b(no|not|cannot|can't|n't|without|rule|ruled|exclude|excluded)\b")
_DEID = re.compile(r"_{2,}")
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
# scispaCy's abbreviation detector warns on every doc that its empty global matcher has no rules.
warnings.filterwarnings("ignore", message=r"\[W036\]")


@dataclass(frozen=True)
class Mention:
    """One labelled span of a report: label, value (1/0/-1), token span and text."""

    label: str
    value: float
    start: int
    end: int
    text: str
    cue: str = ""  # the trigger or phrase that decided the value


def aggregate(values: Iterable[float]) -> float | None:
    """CheXpert's combination of several mentions of one label: 1 > -1 > 0; none -> None."""
    values = set(values)
    if not values:
        return None
    if POSITIVE in values:
        return POSITIVE
    if UNCERTAIN in values:
        return UNCERTAIN
    return NEGATIVE


def no_finding(labels: dict[str, float]) -> float | None:
    """1 when nothing but Support Devices is positive or uncertain, else not set (CheXpert)."""
    for name, value in labels.items():
        if name not in (NO_FINDING, *NO_FINDING_IGNORES) and value in (POSITIVE, UNCERTAIN):
            return None
    return POSITIVE


def restrict_labels(labels: dict[str, float], allowed: Collection[str]) -> dict[str, float]:
    """`labels` kept to `allowed`, with No Finding recomputed over them by CheXpert's rule
    (when `allowed` has it): "emphysema" alone is a finding among all labels, none among
    CheXpert's 14."""
    kept = {k: v for k, v in labels.items() if k in allowed and k != NO_FINDING}
    if NO_FINDING in allowed and no_finding(kept) is not None:
        kept[NO_FINDING] = POSITIVE
    return kept


def prepare_text(text: str) -> str:
    """Text for NLP, same length as the input: `___` -> `XXX` (a word, so it neither glues
    sentences together nor reads as punctuation), `vs.` -> `vs ` (the trigger, not a sentence
    end), `and/or` -> `or  `, a slash between words (`pacemaker/ICD`) -> a space, and the body
    of an INDICATION/HISTORY-like section -> spaces (the question, not the findings)."""
    text = _DEID.sub(lambda m: "X" * len(m.group(0)), text)
    text = _VERSUS.sub(lambda m: m.group(1) + " ", text)
    text = re.sub(r"(?i)\band/or\b", "or    ", text)
    text = _REQUEST_SECTION.sub(_blank_body, text)
    return _WORD_SLASH.sub(" ", text)


def _blank_body(match: re.Match) -> str:
    """The header kept, its body replaced by spaces (line breaks kept, so offsets hold)."""
    head = match.group(0)[: match.start("body") - match.start()]
    return head + re.sub(r"[^\n]", " ", match.group("body"))


class TextLabeler:
    """Extracts vocabulary labels (1/0/-1, absent = not mentioned) from report text."""

    def __init__(self, vocab: Vocabulary, model: str | None = None, labels: Sequence[str] = ()):
        import spacy
        from spacy.matcher import PhraseMatcher

        self.vocab = vocab
        self.only = set(labels) if labels else None
        self.nlp, self.model = _make_nlp(model)
        self._matcher = PhraseMatcher(self.nlp.vocab, attr="LOWER")
        self._kinds: dict[str, tuple[str, str]] = {}  # match key -> (kind, label or trigger)
        raw = vocab.raw
        for label in vocab.labels:
            self._add("mention", label.name, label.mentions)
            self._add("negative", label.name, label.negative_phrases)
            self._add("uncertain", label.name, label.uncertain_phrases)
            self._add("exclude", label.name, (raw.get("mention_exclusions") or {}).get(label.name))
        for direction in ("pre", "post"):
            self._add(f"neg_{direction}", "", (raw.get("negation_triggers") or {}).get(direction))
            self._add(
                f"unc_{direction}", "", (raw.get("uncertainty_triggers") or {}).get(direction)
            )
        self._add("terminator", "", raw.get("scope_terminators"))
        self._add("pseudo", "", [*PSEUDO_TRIGGERS, *(raw.get("pseudo_triggers") or [])])
        self._add("heart_failure", "", HEART_FAILURE)
        self._statements = OrganStatements(raw.get("organ_statements"), vocab.names)
        self._rollups = [
            (lab.name, lab.parent) for lab in vocab.labels if lab.mentions_count_for_parent
        ]
        self._spacy_version = spacy.__version__

    def _add(self, kind: str, label: str, phrases: Iterable[str] | None) -> None:
        phrases = [p for p in (phrases or ()) if p and p.strip()]
        if not phrases:
            return
        key = f"{kind}|{label}"
        self._kinds[key] = (kind, label)
        self._matcher.add(key, [self.nlp.make_doc(prepare_text(p)) for p in phrases])

    # -- extraction -------------------------------------------------------------------------
    def label(self, text: str) -> dict[str, float]:
        """Labels of one report (or section): {canonical name: 1/0/-1}; unmentioned absent."""
        return self.labels_from_doc(self.nlp(prepare_text(text)))

    def label_many(self, texts: Iterable[str], batch_size: int = 64) -> list[dict[str, float]]:
        docs = self.nlp.pipe((prepare_text(t) for t in texts), batch_size=batch_size)
        return [self.labels_from_doc(doc) for doc in docs]

    def mentions(self, text: str) -> list[Mention]:
        return self._mentions(self.nlp(prepare_text(text)))

    def labels_from_doc(self, doc) -> dict[str, float]:
        if not doc.text.strip():
            return {}
        by_label: dict[str, list[float]] = {}
        for mention in self._mentions(doc):
            by_label.setdefault(mention.label, []).append(mention.value)
        for child, parent in self._rollups:  # "nodule" also speaks for Lung Lesion
            if child in by_label:
                by_label.setdefault(parent, []).extend(by_label[child])
        labels: dict[str, float] = {}
        for name in self.vocab.names:
            if name == NO_FINDING:
                continue
            value = aggregate(by_label.get(name, ()))
            if value is not None:
                labels[name] = value
        if self.only is not None:  # No Finding then speaks for these labels only, as CheXpert's
            return restrict_labels(labels, self.only)
        if NO_FINDING in self.vocab.names and no_finding(labels) is not None:
            labels[NO_FINDING] = POSITIVE
        return labels

    def _mentions(self, doc) -> list[Mention]:
        spans: dict[str, list[tuple[int, int, str]]] = {}
        for key, start, end in self._matcher(doc):
            kind, label = self._kinds[self.nlp.vocab.strings[key]]
            spans.setdefault(kind, []).append((start, end, label))
        spans.setdefault("mention", []).extend(self._abbreviation_mentions(doc))
        statement_spans = set()  # normal-organ statements: they never decide other mentions
        for statement in self._statements.find(doc.text):  # "heart size is normal", ...
            span = doc.char_span(statement.start, statement.end, alignment_mode="expand")
            kind = "negative" if statement.kind == NEGATIVE_STATE else "mention"
            found = [(span.start, span.end, lab) for lab in statement.labels]
            spans.setdefault(kind, []).extend(found)
            if kind == "negative":
                statement_spans.update(found)
        excluded = [(s, e, lab) for s, e, lab in spans.get("exclude", ())]
        fixed = [(s, e, lab, NEGATIVE) for s, e, lab in spans.get("negative", ())] + [
            (s, e, lab, UNCERTAIN) for s, e, lab in spans.get("uncertain", ())
        ]
        # Mentions: drop those inside an exclusion or a fixed phrase of their label, and those
        # contained in a longer mention of the same label.
        candidates = []
        for s, e, lab in spans.get("mention", ()):
            if any(lab == xl and s < xe and xs < e for xs, xe, xl in excluded):
                continue
            if any(lab == fl and s < fe and fs < e for fs, fe, fl, _ in fixed):
                continue
            candidates.append((s, e, lab))
        candidates = _maximal(candidates)
        fixed_spans = _maximal([(s, e, lab) for s, e, lab, _ in fixed])
        fixed_value = {(s, e, lab): v for s, e, lab, v in fixed}
        occupied = [(s, e) for s, e, _ in candidates + fixed_spans]
        triggers = []
        for kind in ("neg_pre", "neg_post", "unc_pre", "unc_post", "terminator", "pseudo"):
            for s, e, _ in spans.get(kind, ()):
                if not any(s < oe and os_ < e for os_, oe in occupied):
                    triggers.append((s, e, kind))
        # A pseudo-trigger only wins against shorter triggers: "no longer" is pseudo, but
        # "is no longer seen" is a negation.
        triggers = [t for t in _longest(triggers) if t[2] != "pseudo"]
        triggers = _hedged_predicates(doc, triggers, {s for s, _, _ in candidates})
        # A terminator right after a pre trigger belongs to it ("likely due to X", "may be
        # secondary to X"): the hedge covers X.
        pre_ends = {e for _, e, kind in triggers if kind.endswith("_pre")}
        triggers = [t for t in triggers if not (t[2] == "terminator" and t[0] in pre_ends)]
        terminators = [t for t in triggers if t[2] == "terminator"]
        heart_failure = {(s, e) for s, e, _ in _maximal(spans.get("heart_failure", []))}
        result: list[Mention] = []
        for s, e, lab in fixed_spans:
            value = fixed_value[(s, e, lab)]
            result.append(Mention(lab, value, s, e, doc[s:e].text, "phrase"))
        for s, e, lab in candidates:
            value, cue = self._judge(doc, s, e, triggers)
            # A label's own phrase just before its mention ("interval removal of [the] ET
            # tube", same sentence, at most MAX_PHRASE_GAP words between) decides the value.
            for fs, fe, fl in fixed_spans:
                gap = doc[fe:s]
                if (
                    fl == lab
                    and (fs, fe, fl) not in statement_spans
                    and 0 <= s - fe <= MAX_PHRASE_GAP
                    and all(t.is_alpha and t.lower_ not in CLAUSE_BREAKS for t in gap)
                    and not any(t.is_sent_start for t in doc[fe : s + 1])
                    and not any(fe <= ts and te <= s for ts, te, k in terminators)
                ):
                    value, cue = fixed_value[(fs, fe, fl)], "phrase"
            result.append(Mention(lab, value, s, e, doc[s:e].text, cue))
        for s, e in sorted(heart_failure):
            value, cue = self._judge(doc, s, e, triggers)
            if value != NEGATIVE:
                result.append(Mention("Cardiomegaly", UNCERTAIN, s, e, doc[s:e].text, "chf"))
        return sorted(result, key=lambda m: (m.start, m.end, m.label))

    def _abbreviation_mentions(self, doc) -> list[tuple[int, int, str]]:
        """Short forms defined in the text ("pneumothorax (PTX)") as mentions of their label."""
        found = []
        abbreviations = getattr(doc._, "abbreviations", None) or []
        for short in abbreviations:
            long_doc = self.nlp.make_doc(short._.long_form.text)
            labels = {
                self._kinds[self.nlp.vocab.strings[key]][1]
                for key, start, end in self._matcher(long_doc)
                if self._kinds[self.nlp.vocab.strings[key]][0] == "mention"
                and end - start == len(long_doc)
            }
            found.extend((short.start, short.end, label) for label in sorted(labels))
        return found

    def _judge(self, doc, start: int, end: int, triggers) -> tuple[float, str]:
        sentence = doc[start].sent
        lo, hi = sentence.start, sentence.end
        covering: list[tuple[str, str]] = []
        # A trigger that is both pre and post ("versus", "vs") joins two alternatives: it
        # covers only the phrase next to it on each side, not across a comma.
        both = {(s, e) for s, e, k in triggers if k.endswith("_pre")} & {
            (s, e) for s, e, k in triggers if k.endswith("_post")
        }
        # Nearest pre trigger before the mention, unless a terminator/clause break intervenes.
        before = [t for t in triggers if lo <= t[0] and t[1] <= start]
        for s, e, kind in sorted(before, key=lambda t: -t[0]):
            if kind == "terminator" or start - e > MAX_PRE_SCOPE:
                break
            if _clause_break(doc, e, start):
                break
            if kind.endswith("_pre"):
                if not ((s, e) in both and _comma(doc, e, start)):
                    covering.append((kind, doc[s:e].text))
                break
        after = [t for t in triggers if end <= t[0] and t[1] <= hi]
        for s, e, kind in sorted(after, key=lambda t: t[0]):
            if kind == "terminator" or s - end > MAX_POST_SCOPE or _clause_break(doc, end, s):
                break
            if kind.endswith("_post"):
                if not ((s, e) in both and _comma(doc, end, s)):
                    covering.append((kind, doc[s:e].text))
                break
        unc = [cue for kind, cue in covering if kind.startswith("unc")]
        neg = [cue for kind, cue in covering if kind.startswith("neg")]
        for cue in unc:
            if NEGATION_WORDS.search(cue.lower()):
                return UNCERTAIN, cue
        if neg:
            return NEGATIVE, neg[0]
        if unc:
            return UNCERTAIN, unc[0]
        return POSITIVE, ""


def _hedged_predicates(doc, triggers, mention_starts: set[int]) -> list:
    """ "X is likely Y": a post trigger ending in a hedging adverb, directly followed by a
    mention (at most `MAX_HEDGE_BRIDGE` bridge words such as "a", "mild", "due to" between),
    hedges that mention instead ("opacity is likely atelectasis": the atelectasis is uncertain,
    the opacity is seen), up to the end of its clause. "X is likely." and "X is likely present
    at the base" keep hedging X."""
    result, clause_ends = [], []
    starts = sorted(mention_starts)
    for s, e, kind in triggers:
        if kind == "unc_post" and doc[e - 1].lower_ in HEDGING_ADVERBS:
            first = next((m for m in starts if m >= e), None)
            bridge = doc[e:first] if first is not None else None
            if (
                bridge is not None
                and len(bridge) <= MAX_HEDGE_BRIDGE
                and all(t.lower_ in HEDGE_BRIDGE_WORDS for t in bridge)
                and not doc[first].is_sent_start
            ):
                kind = "unc_pre"
                end = first
                while end < len(doc) and not doc[end].is_punct and not doc[end].is_sent_start:
                    end += 1
                if end < len(doc) and doc[end].sent == doc[s].sent:
                    clause_ends.append((end, end + 1, "terminator"))
        result.append((s, e, kind))
    return result + clause_ends


def _comma(doc, start: int, end: int) -> bool:
    return any(doc[i].text == "," for i in range(start, end))


def _clause_break(doc, start: int, end: int) -> bool:
    return any(doc[i].lower_ in CLAUSE_BREAKS for i in range(start, end))


def _maximal(spans: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """Drop spans strictly contained in a longer span of the same label."""
    keep = []
    for s, e, lab in sorted(set(spans)):
        if any(
            lab == ol and os_ <= s and e <= oe and (oe - os_) > (e - s) for os_, oe, ol in spans
        ):
            continue
        keep.append((s, e, lab))
    return keep


def _longest(spans: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """Overlapping triggers: the longest wins (then the earliest). The same span listed under
    several kinds ("versus" is both a pre and a post trigger) keeps all of them."""
    chosen: list[tuple[int, int, str]] = []
    taken: set[int] = set()
    for s, e, kind in sorted(spans, key=lambda t: (-(t[1] - t[0]), t[0], t[2])):
        if taken.isdisjoint(range(s, e)) or any((s, e) == (cs, ce) for cs, ce, _ in chosen):
            chosen.append((s, e, kind))
            taken.update(range(s, e))
    return sorted(set(chosen))


def _make_nlp(model: str | None):
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
    for i, token in enumerate(doc):
        if i == 0:
            token.is_sent_start = True
            continue
        prev = doc[i - 1]
        start = False
        if prev.text in _ENDERS or (
            prev.text.endswith(".")
            and len(prev.text) > 1
            and prev.whitespace_
            and token.text[:1].isupper()
        ):
            start = True
        elif prev.is_space and ("\n\n" in prev.text.replace(" ", "") or token.text in ("-", "*")):
            start = True
        elif "\n\n" in prev.whitespace_:
            start = True
        token.is_sent_start = start
    return doc


@cache
def default_labeler(domain: str = "chest_xray", model: str | None = None) -> TextLabeler:
    """One labeler per process and domain (building the matcher takes a moment)."""
    return TextLabeler(load_vocabulary(domain), model=model)
