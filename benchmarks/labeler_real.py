"""Report labeler quality and speed on REAL reports: the Indiana University chest X-ray reports.

The reports come from the installed `torchxrayvision` wheel
(`torchxrayvision/data/NLMCXR_reports.tgz`: 3,955 `ecgen-radiology/<n>.xml`, with COMPARISON /
INDICATION / FINDINGS / IMPRESSION as `<AbstractText Label="...">`, MeSH headings under
`<MeSH><major>`, de-identification as `XXXX`). They are read straight from the archive, never
extracted.

HELD OUT: reports whose number n is divisible by 4 are never read, scored or looked at. They are
dropped by member NAME (`is_dev`) before their XML is opened, in every function here; only the
development split (n % 4 != 0, 2,972 reports, of which the indexed ones with a FINDINGS or
IMPRESSION are scored) is used, and the labeler was tuned on it, so scores here are scores on a
set the rules were fitted to.

Reference: the report's MeSH *major* headings (the part before the first `/`), mapped to the
vocabulary's labels by `MESH_TO_LABEL`, an explicit table built from the headings' frequencies
on the development split. A label is 1 when one of its headings is there, else 0 (MeSH codes
presence only). `normal` is the collection's "nothing to index" heading: No Finding. Reports
indexed `No Indexing` (no reference) are skipped. Labels with fewer than `MIN_SUPPORT`
positives in the scored reports are left out of the table. Not mapped on purpose: `Opacity`,
`Density`, `Airspace Disease`, `Infiltrate` (MeSH splits what CheXpert's Lung Opacity lumps
together, and codes the opacity of an atelectasis or a scar as well), `Cicatrix` (scar: Fibrosis
in the vocabulary but mostly pleural or apical scarring), `Lung/hyperdistention` (hyperinflation:
not emphysema), `Calcinosis` (mostly calcified lymph nodes and aorta, not lung lesions),
`Pulmonary Congestion` (CheXpert reads vascular congestion as uncertain edema, not edema).

Where MeSH and CheXpert's conventions differ the labeler follows CheXpert, and the score pays:
MeSH indexes "borderline cardiomegaly" and "atelectasis or scarring" as findings (uncertain
here), "enlarged cardiac silhouette" as `Cardiac Shadow` (Cardiomegaly here), and withholds
`normal` for any indexed finding (spine, aorta, devices), while No Finding here ignores what is
not a label.

Scoring, per label, of the positive class only: a system's label counts as positive when its
value is 1 (uncertain -1 counts as NOT positive); Lung Lesion is positive when Lung Lesion,
Nodule or Mass is. Precision, recall, F1 and the macro F1 over the table's labels, on the whole
report ("FINDINGS: ...\\n\\nIMPRESSION: ...") and on the impression alone.

Systems, same texts, same process:
- `labeler`: `default_labeler().label(text)` (the whole vocabulary, so No Finding is CheXpert's
  rule over every finding label);
- `keywords`: any vocabulary mention (word-bounded, case-insensitive) -> 1;
- `negcue`: keywords, minus those with a negation cue earlier in their sentence (`NEG_CUES`);
- `negspacy`: negspaCy's NegEx over the vocabulary's mentions (`benchmarks/labeler_dev.py`),
  skipped with a note when negspacy is not installed.
No Finding for the baselines: 1 when none of their finding labels (any label but No Finding and
Support Devices) is 1.

Usage: python benchmarks/labeler_real.py [--limit N] [--repeat 3] [--errors LABEL]
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mgll_data.build.pipeline import load_pipeline  # noqa: E402
from mgll_data.labeler import default_labeler  # noqa: E402
from mgll_data.text.labeler import NO_FINDING, NO_FINDING_IGNORES, prepare_text  # noqa: E402
from mgll_data.vocab import Vocabulary  # noqa: E402

MEMBER = re.compile(r"^(?:\./)?ecgen-radiology/(\d+)\.xml$")
HELD_OUT_MODULUS = 4  # n % 4 == 0: held out, never read
MIN_SUPPORT = 5
# MeSH major heading (before the first "/") -> vocabulary label: the IU X-ray pipeline's table
# (`pipelines/iu_xray.yaml`, with the headings' frequencies on the development split), so this
# benchmark scores against the labels an `iu_xray` build stores.
MESH_TO_LABEL = dict(load_pipeline("iu_xray").labels.map)
NO_REFERENCE = "No Indexing"
LESION_PARTS = ("Lung Lesion", "Nodule", "Mass")
# The negation-cue baseline's cues (before the keyword, in its sentence).
NEG_CUES = re.compile(r"\b(no|without|negative for|free of|clear of|resolved|removed)\b", re.I)
SENTENCE = re.compile(r"[^.!?\n]+")


def default_archive() -> Path:
    """`NLMCXR_reports.tgz` inside the installed torchxrayvision package."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("torchxrayvision is not installed (it ships the IU reports)")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "NLMCXR_reports.tgz"


def is_dev(name: str) -> bool:
    """True for a development report's member name; held-out (n % 4 == 0) and others False."""
    match = MEMBER.match(name)
    return bool(match) and int(match.group(1)) % HELD_OUT_MODULUS != 0


def report_number(name: str) -> int:
    return int(MEMBER.match(name).group(1))


@dataclass(frozen=True)
class Report:
    """One development report: number, sections (lower-case label -> text), MeSH majors."""

    number: int
    sections: dict[str, str]
    majors: tuple[str, ...]

    def text(self, impression_only: bool = False) -> str:
        """FINDINGS and IMPRESSION as a report would print them (or the impression alone)."""
        parts = ("impression",) if impression_only else ("findings", "impression")
        return "\n\n".join(
            f"{p.upper()}: {self.sections[p]}" for p in parts if self.sections.get(p)
        )

    def reference(self) -> set[str]:
        """The labels MeSH gives this report (see `MESH_TO_LABEL`)."""
        return {MESH_TO_LABEL[h] for h in self.majors if h in MESH_TO_LABEL}


def iter_dev_members(archive: Path) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of development reports only, streamed from the archive; the
    held-out ones are skipped by name before their content is read."""
    with tarfile.open(archive, "r|gz") as tar:
        for member in tar:
            if member.isfile() and is_dev(member.name):
                yield member.name, tar.extractfile(member).read()


def parse_report(name: str, data: bytes) -> Report:
    root = ET.fromstring(data)
    sections = {
        (node.get("Label") or "").lower(): " ".join((node.text or "").split())
        for node in root.iter("AbstractText")
    }
    majors = tuple((node.text or "").split("/")[0].strip() for node in root.iter("major"))
    return Report(report_number(name), sections, majors)


def load_dev_reports(archive: Path | None = None, limit: int | None = None) -> list[Report]:
    """Scorable development reports (indexed, with findings or an impression), by number;
    `limit` keeps the first ones."""
    reports = [parse_report(n, d) for n, d in iter_dev_members(archive or default_archive())]
    reports = [
        r for r in reports if NO_REFERENCE not in r.majors and r.text() and r.majors != ("",)
    ]
    reports.sort(key=lambda r: r.number)
    return reports[:limit] if limit else reports


class KeywordMatcher:
    """Any vocabulary mention of a label -> 1."""

    name = "keywords"

    def __init__(self, vocab: Vocabulary):
        self.patterns = {}
        for label in vocab.labels:
            mentions = sorted(vocab.mentions_for(label.name), key=len, reverse=True)
            if mentions and label.name != NO_FINDING:
                alternation = "|".join(re.escape(m) for m in mentions)
                self.patterns[label.name] = re.compile(rf"\b(?:{alternation})\b", re.I)

    def keep(self, sentence: str, start: int) -> bool:
        return True

    def label(self, text: str) -> dict[str, float]:
        labels = {}
        for sentence in SENTENCE.findall(text):
            for name, pattern in self.patterns.items():
                if any(self.keep(sentence, m.start()) for m in pattern.finditer(sentence)):
                    labels[name] = 1.0
        return with_no_finding(labels)


class NegationCueMatcher(KeywordMatcher):
    """Keywords, dropping one with a negation cue before it in its sentence."""

    name = "negcue"

    def keep(self, sentence: str, start: int) -> bool:
        return not NEG_CUES.search(sentence[:start])


class OurLabeler:
    name = "labeler"

    def __init__(self, vocab: Vocabulary):
        self.labeler = default_labeler(vocab.domain)

    def label(self, text: str) -> dict[str, float]:
        return self.labeler.label(text)


def with_no_finding(labels: dict[str, float]) -> dict[str, float]:
    """No Finding = 1 when no finding label (Support Devices aside) is positive."""
    if not any(k not in NO_FINDING_IGNORES and v == 1.0 for k, v in labels.items()):
        labels[NO_FINDING] = 1.0
    return labels


def negspacy_system(vocab: Vocabulary):
    """negspaCy's NegEx on the vocabulary's mentions, or None when negspacy is missing."""
    spec = importlib.util.spec_from_file_location(
        "labeler_dev", ROOT / "benchmarks" / "labeler_dev.py"
    )
    dev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dev)

    class Negspacy(dev.NegspacyBaseline):
        def label(self, text: str) -> dict[str, float]:
            values: dict[str, list[float]] = {}
            for ent in self.nlp(prepare_text(text)).ents:
                if ent.label_ != self.EXCLUDE:
                    values.setdefault(ent.label_, []).append(0.0 if ent._.negex else 1.0)
            return with_no_finding({k: max(v) for k, v in values.items()})

    try:
        return Negspacy(vocab)
    except ImportError:
        return None


def positives(labels: dict[str, float]) -> set[str]:
    """The labels a system calls positive (1), with Lung Lesion = Lung Lesion, Nodule or Mass."""
    found = {k for k, v in labels.items() if v == 1.0}
    if found & set(LESION_PARTS):
        found.add("Lung Lesion")
    return found


def score(reference: list[set[str]], predicted: list[set[str]], names: Iterable[str]) -> dict:
    """{label: {p, r, f1, n}} of the positive class, and "macro" F1 over `names`."""
    table = {}
    for name in names:
        tp = sum(name in r and name in p for r, p in zip(reference, predicted, strict=True))
        fp = sum(name not in r and name in p for r, p in zip(reference, predicted, strict=True))
        fn = sum(name in r and name not in p for r, p in zip(reference, predicted, strict=True))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        table[name] = {"p": precision, "r": recall, "f1": f1, "n": tp + fn}
    table["macro"] = sum(row["f1"] for row in table.values()) / len(table)
    return table


def scored_labels(reports: list[Report]) -> list[str]:
    """Labels of the reference with at least `MIN_SUPPORT` positives, in vocabulary order."""
    order = list(dict.fromkeys(MESH_TO_LABEL.values()))
    counts = {name: sum(name in r.reference() for r in reports) for name in order}
    return [name for name in order if counts[name] >= MIN_SUPPORT]


def systems(vocab: Vocabulary) -> list:
    found = [OurLabeler(vocab), KeywordMatcher(vocab), NegationCueMatcher(vocab)]
    negspacy = negspacy_system(vocab)
    if negspacy is not None:
        found.append(negspacy)
    return found


def throughput(system, texts: list[str], repeat: int) -> float:
    """Reports per second of `system.label`, one report at a time."""
    started = time.perf_counter()
    for _ in range(repeat):
        for text in texts:
            system.label(text)
    return len(texts) * repeat / (time.perf_counter() - started)


def run(limit: int | None = None, repeat: int = 0, reports: list[Report] | None = None) -> dict:
    """{"reports", "labels", "systems": {name: {"whole", "impression", "predicted",
    "per_s"}}}: every system scored on the whole reports and on the impressions alone."""
    from mgll_data.vocab import load_vocabulary

    vocab = load_vocabulary("chest_xray")
    reports = reports if reports is not None else load_dev_reports(limit=limit)
    names = scored_labels(reports)
    reference = [r.reference() for r in reports]
    results: dict = {"reports": reports, "labels": names, "systems": {}}
    for system in systems(vocab):
        entry: dict = {}
        for part, only in (("whole", False), ("impression", True)):
            predicted = [system.label(r.text(only)) for r in reports]
            entry[part] = score(reference, [positives(p) for p in predicted], names)
            entry.setdefault("predicted", predicted)
        if repeat:
            entry["per_s"] = throughput(system, [r.text() for r in reports], repeat)
        results["systems"][system.name] = entry
    return results


def print_table(results: dict) -> None:
    names, systems_ = results["labels"], results["systems"]
    n = len(results["reports"])
    print(f"IU development split (n % 4 != 0): {n} scored reports; reference = MeSH majors")
    for part in ("whole", "impression"):
        print(f"\n== {part} report: P / R / F1 of the positive class ==")
        print(f"{'label':18s}" + "".join(f" {s + ' P/R/F1':>18s}" for s in systems_) + "     n")
        for name in names:
            rows = [systems_[s][part][name] for s in systems_]
            cells = "".join(f"  {r['p']:4.2f} {r['r']:4.2f} {r['f1']:4.2f}" for r in rows)
            print(f"{name:18s}{cells}  {rows[0]['n']:4d}")
        print(
            f"{'macro F1':18s}" + "".join(f" {systems_[s][part]['macro']:>18.3f}" for s in systems_)
        )
    if any("per_s" in entry for entry in systems_.values()):
        print()
        keyword = systems_["keywords"].get("per_s")
        for s, entry in systems_.items():
            ratio = f"  ({entry['per_s'] / keyword:.2f}x keywords)" if keyword else ""
            print(f"{s:9s} {entry['per_s']:8,.0f} whole reports/s{ratio}")


def print_errors(results: dict, label: str) -> None:
    """False positives / negatives of our labeler for `label` (development split only): the
    report number, the sentences that decided it (for No Finding: those with a finding), else
    the text, and the MeSH majors."""
    labeler = default_labeler()
    predicted = results["systems"]["labeler"]["predicted"]
    for report, got in zip(results["reports"], predicted, strict=True):
        want, have = label in report.reference(), label in positives(got)
        if want == have:
            continue
        text = report.text()
        doc = labeler.nlp(prepare_text(text))
        if label == NO_FINDING:
            decided = [
                m
                for m in labeler._mentions(doc)
                if m.label not in (NO_FINDING, *NO_FINDING_IGNORES) and m.value != 0.0
            ]
        else:
            decided = [m for m in labeler._mentions(doc) if m.label in _parts(label)]
        sentences = sorted({doc[m.start].sent.text.strip() for m in decided})
        shown = " | ".join(sentences) or text
        print(f"{'FN' if want else 'FP'} {report.number}: {shown}  [{', '.join(report.majors)}]")


def _parts(label: str) -> tuple[str, ...]:
    return LESION_PARTS if label == "Lung Lesion" else (label,)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="first N dev reports (all)")
    parser.add_argument("--repeat", type=int, default=3, help="passes for reports/s (3)")
    parser.add_argument(
        "--errors",
        metavar="LABEL",
        action="append",
        help="list the labeler's false positives / negatives for LABEL (repeatable)",
    )
    args = parser.parse_args()
    results = run(limit=args.limit, repeat=0 if args.errors else args.repeat)
    print_table(results)
    for label in args.errors or ():
        print(f"\n== {label}: false positives / negatives (development split) ==")
        print_errors(results, label)


if __name__ == "__main__":
    main()
