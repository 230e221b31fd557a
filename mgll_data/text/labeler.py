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

Conventions (CheXpert's where its labeler decides; `benchmarks/labeler_real.py` measures them
on real reports):
- No Finding is CheXpert's rule and nothing more: devices never block it, nor do chronic
  findings outside the vocabulary (degenerative spine, aortic calcification). Chronic findings
  that are labels block it like any other: a granuloma is a Lung Lesion, scarring is Fibrosis.
- Chronic, stable, old and healed findings are findings: "stable cardiomegaly" and "old healed
  rib fractures" are 1. A partly resolved one is still there ("almost completely resolved").
  A past one is not: "history of X" negates X, as in CheXpert, and so do the sequelae of an
  old infection for Pneumonia ("prior granulomatous infection" is a lesion, not a pneumonia).
- Alternatives are uncertain, as CheXpert reads them: "X versus Y", and the vocabulary's
  "atelectasis or scarring". A plain "X or Y" is not (CheXpert finds it in a parse tree; a
  phrase rule would also catch the lists of "no effusion or pneumothorax"), so "effusion or
  thickening" keeps the effusion at 1.
- Hedges are uncertain: "may represent", "could indicate", "cannot exclude", "suggest",
  "differential considerations include", "X is in the differential", "correlate clinically
  for", "in the appropriate clinical setting", "X may not be demonstrated". A hedged phrase
  of a label ("hyperexpanded lungs": Emphysema -1) can be denied ("no hyperexpansion": 0) and
  decides no mention after it ("hyperexpanded lungs consistent with emphysema": 1); only a
  negative phrase does ("interval removal of the ET tube").
- Vascular congestion without edema is uncertain Edema (CheXpert); "volume loss" alone is no
  Atelectasis mention (CheXpert's are "atelecta-" and "collapse").
- A trigger that starts inside a label's fixed phrase and runs past its end still reads on:
  "the lungs are clear of effusion" ("lungs are clear" + "clear of").
- De-identification: `XXXX` (Indiana University) stands for any word, often not a name ("most
  XXXX representing", "no XXXX of effusion"), so it is read as no word at all; `___`
  (MIMIC-CXR) stays a word (`mgll_data/text/nlp.py`).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from itertools import pairwise

from ..vocab import Vocabulary, load_vocabulary
from .nlp import make_nlp, prepare_text
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
    # "no consolidation to suggest pneumonia": the "no" negates both, nothing is hedged.
    "to suggest",
    # Partly resolved is still there ("has nearly resolved, with minimal residual atelectasis").
    "nearly resolved",
    "almost resolved",
    "nearly completely resolved",
    "almost completely resolved",
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


class TextLabeler:
    """Extracts vocabulary labels (1/0/-1, absent = not mentioned) from report text."""

    def __init__(self, vocab: Vocabulary, model: str | None = None, labels: Sequence[str] = ()):
        import spacy
        from spacy.matcher import PhraseMatcher

        self.vocab = vocab
        self.only = set(labels) if labels else None
        self.nlp, self.model = make_nlp(model)
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
        triggers = _free_triggers(spans, candidates, fixed_spans)
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
            value, cue = fixed_value[(s, e, lab)], "phrase"
            if value == UNCERTAIN:  # a hedged phrase can still be denied: "no hyperexpansion"
                judged, judged_cue = self._judge(doc, s, e, triggers)
                if judged == NEGATIVE:
                    value, cue = judged, judged_cue
            result.append(Mention(lab, value, s, e, doc[s:e].text, cue))
        for s, e, lab in candidates:
            value, cue = self._judge(doc, s, e, triggers)
            # A label's own phrase just before its mention ("interval removal of [the] ET
            # tube", same sentence, at most MAX_PHRASE_GAP words between) decides the value.
            for fs, fe, fl in fixed_spans:
                gap = doc[fe:s]
                if (
                    fl == lab
                    and fixed_value[(fs, fe, fl)] == NEGATIVE
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
        lo, hi = _sentence(doc, start)
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
                if end < len(doc) and _sentence(doc, end) == _sentence(doc, s):
                    clause_ends.append((end, end + 1, "terminator"))
        result.append((s, e, kind))
    return result + clause_ends


def _free_triggers(spans: dict, candidates: list, fixed_spans: list) -> list:
    """Triggers not inside a mention or a fixed phrase ("no" in "no acute disease"). One that
    starts inside a fixed phrase and runs past its end reads on: "lungs are clear" + "clear
    of" in "the lungs are clear of effusion" still negates the effusion."""
    mentions = [(s, e) for s, e, _ in candidates]
    phrases = [(s, e) for s, e, _ in fixed_spans]
    triggers = []
    for kind in ("neg_pre", "neg_post", "unc_pre", "unc_post", "terminator", "pseudo"):
        for s, e, _ in spans.get(kind, ()):
            if any(s < oe and os_ < e for os_, oe in mentions):
                continue
            if any(s < oe and os_ < e and not (os_ < s and oe < e) for os_, oe in phrases):
                continue
            triggers.append((s, e, kind))
    return triggers


def _sentence(doc, i: int) -> tuple[int, int]:
    """(start, end) of the sentence holding token `i`; the bounds are found once per doc
    (spaCy's `token.sent` scans the whole doc on every call)."""
    bounds = doc.user_data.get("mgll_sentences")
    if bounds is None:
        starts = [t.i for t in doc if t.is_sent_start] + [len(doc)]
        bounds = [None] * len(doc)
        for lo, hi in pairwise(starts):
            bounds[lo:hi] = [(lo, hi)] * (hi - lo)
        doc.user_data["mgll_sentences"] = bounds
    return bounds[i]


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


@cache
def default_labeler(domain: str = "chest_xray", model: str | None = None) -> TextLabeler:
    """One labeler per process and domain (building the matcher takes a moment)."""
    return TextLabeler(load_vocabulary(domain), model=model)
