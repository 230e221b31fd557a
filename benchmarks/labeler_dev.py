"""Report labeler quality and speed on the hand-labelled dev set, beside a keyword baseline.

The dev set (`tests/data/labeler_dev.jsonl`) holds short report snippets written for this project
in the style of chest X-ray reports, each with its expected labels (1 / 0 / -1; a label not
listed is "not mentioned"). Scoring is per label over CheXpert's 14: a prediction counts as a
true positive when it is set and equals the expected value; a set but wrong value is a false
positive; an expected value not matched is a false negative. The baseline is a plain keyword
matcher: any vocabulary mention present -> 1, no negation or uncertainty (and No Finding by the
same CheXpert rule). Both run in the same process, on the same texts.

Usage: python benchmarks/labeler_dev.py [--repeat 20]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mgll_data.labeler import TextLabeler, no_finding  # noqa: E402
from mgll_data.vocab import Vocabulary, load_vocabulary  # noqa: E402

DEV_SET = ROOT / "tests" / "data" / "labeler_dev.jsonl"
CHEXPERT_14 = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Lesion", "Lung Opacity",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices",
)  # fmt: skip


def load_dev_set(path: Path = DEV_SET) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class KeywordBaseline:
    """Any mention phrase of a label in the text -> 1; nothing else."""

    def __init__(self, vocab: Vocabulary):
        self.patterns = {
            label.name: re.compile(
                r"\b("
                + "|".join(re.escape(m) for m in sorted(label.mentions, key=len)[::-1])
                + r")\b",
                re.IGNORECASE,
            )
            for label in vocab.labels
            if label.mentions and label.name != "No Finding"
        }

    def label(self, text: str) -> dict[str, float]:
        labels = {name: 1.0 for name, p in self.patterns.items() if p.search(text)}
        if no_finding(labels) is not None:
            labels["No Finding"] = 1.0
        return labels


def score(expected: list[dict], predicted: list[dict], names=CHEXPERT_14) -> dict[str, dict]:
    """Per-label precision, recall, F1 (and support) over 1/0/-1 values."""
    table = {}
    for name in names:
        tp = fp = fn = 0
        for want, got in zip(expected, predicted, strict=True):
            w, g = want.get(name), got.get(name)
            if g is not None and g == w:
                tp += 1
            else:
                fp += g is not None
                fn += w is not None
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        table[name] = {"p": precision, "r": recall, "f1": f1, "n": tp + fn}
    return table


def macro_f1(table: dict[str, dict]) -> float:
    supported = [row["f1"] for row in table.values() if row["n"]]
    return sum(supported) / len(supported)


def run(repeat: int = 20) -> dict:
    vocab = load_vocabulary("chest_xray")
    rows = load_dev_set()
    texts = [r["text"] for r in rows]
    expected = [r["labels"] for r in rows]
    results = {}
    for name, labeler in (("labeler", TextLabeler(vocab)), ("keywords", KeywordBaseline(vocab))):
        if hasattr(labeler, "label_many"):
            predicted = labeler.label_many(texts)
            started = time.perf_counter()
            labeler.label_many(texts * repeat)
        else:
            predicted = [labeler.label(t) for t in texts]
            started = time.perf_counter()
            [labeler.label(t) for t in texts * repeat]
        seconds = time.perf_counter() - started
        table = score(expected, predicted)
        results[name] = {
            "table": table,
            "macro_f1": macro_f1(table),
            "per_s": len(texts) * repeat / seconds,
        }
        if name == "labeler":
            results[name]["model"] = labeler.model
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    results = run(args.repeat)
    print(f"dev set: {DEV_SET.relative_to(ROOT)} ({len(load_dev_set())} snippets)")
    print(f"{'label':28s} {'labeler P/R/F1':>20s} {'keywords P/R/F1':>20s}  n")
    for name in CHEXPERT_14:
        a, b = results["labeler"]["table"][name], results["keywords"]["table"][name]
        if not a["n"]:
            continue
        print(
            f"{name:28s} {a['p']:6.2f} {a['r']:6.2f} {a['f1']:6.2f} "
            f"{b['p']:6.2f} {b['r']:6.2f} {b['f1']:6.2f}  {a['n']}"
        )
    for name in ("labeler", "keywords"):
        r = results[name]
        print(
            f"{name:9s} macro F1 {r['macro_f1']:.3f}  throughput {r['per_s']:,.0f} snippets/s"
            + (f"  ({r['model']})" if "model" in r else "")
        )


if __name__ == "__main__":
    main()
