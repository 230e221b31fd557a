"""The table `mgll-train eval` prints and writes to table.txt: a readable summary of
metrics.json, in aligned columns, numbers to 4 decimals (metrics.json keeps full precision)."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import Any

from .probe import PROBE_FRACTIONS


def number(value: float | None) -> str:
    """A metric for the table: 4 decimals; below 0.001, 2 significant digits; None: n/a."""
    if value is None:
        return "n/a"
    if value != 0 and abs(value) < 1e-3:
        return f"{value:.1e}"
    return f"{value:.4f}"


def aligned(rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    """Rows of cells as lines: the first column left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(max(map(len, rows)))]
    lines = []
    for row in rows:
        rest = zip(row[1:], widths[1:], strict=False)  # a row may stop before the last column
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in rest]
        lines.append((indent + "  ".join(cells)).rstrip())
    return lines


def note(text: str) -> list[str]:
    """A note under a block, wrapped at 100 columns."""
    return textwrap.wrap(text, 100, initial_indent="  ", subsequent_indent="    ")


def _intervals(pairs: Sequence[Sequence[float | None]]) -> list[str]:
    """`[lo, hi]` cells of one width, so that the brackets and commas line up."""
    texts = [(number(lo), number(hi)) for lo, hi in pairs]
    width = max((len(t) for pair in texts for t in pair), default=3)
    return [f"[{lo.rjust(width)}, {hi.rjust(width)}]" for lo, hi in texts]


def _zeroshot(zs: dict[str, Any]) -> list[str]:
    names = list(zs["per_label"])
    summaries = [("macro", "macro_auroc")]
    low = [n for n in names if zs["per_label"][n].get("low_support")]
    if low:
        summaries.append(("macro, supported", "macro_auroc_supported"))
    summaries.append(("CheXpert five", "chexpert5_auroc"))
    cis = _intervals(
        [zs["per_label"][n]["ci95"] for n in names] + [zs[f"{key}_ci95"] for _, key in summaries]
    )
    rows = [["label", "AUROC", "95 % CI", "pos", "neg", ""]]
    for name, ci in zip(names, cis, strict=False):
        r = zs["per_label"][name]
        mark = "*" if r.get("low_support") else ""
        rows.append([name, number(r["auroc"]), ci, str(r["positives"]), str(r["negatives"]), mark])
    for (title, key), ci in zip(summaries, cis[len(names) :], strict=True):
        rows.append([title, number(zs[key]), ci])
    lines = ["", "zero-shot AUROC (95 % bootstrap CI)", *aligned(rows)]
    reasons: dict[str, list[str]] = {}
    for name, why in zs["skipped"].items():
        reasons.setdefault(why, []).append(name)
    for why, skipped in reasons.items():
        lines += note(f"skipped, {why}: {', '.join(skipped)}")
    if low:
        lines += note(
            f"* fewer than {zs['min_support']} positives or negatives: an unreliable AUROC, "
            "left out of 'macro, supported' (the plain macro keeps it)"
        )
    return lines


def _probe(lp: dict[str, Any]) -> list[str]:
    keys = [f"{f:.0%}" for f in PROBE_FRACTIONS]
    rows = [["subset", "macro AUROC", "mAP", "images", "patients"]]
    for key in keys:
        r = lp[key]
        rows.append(
            [
                f"{key} of {lp['train_split']}",
                number(r["macro_auroc"]),
                number(r["map"]),
                str(r["train_images"]),
                str(r.get("train_patients", "")),
            ]
        )
    lines = ["", f"{lp['mode']} probe ({lp['epochs']} epochs)", *aligned(rows)]
    total = lp[keys[-1]]["train_images"]
    for key in keys[:-1]:
        r = lp[key]
        if "target_images" not in r:
            continue
        lines += note(
            f"{key}: patients drawn at random (seeded) until at least {r['target_images']} of "
            f"the {total} images, then {r['patients_added_for_labels']} more patients so that "
            f"every label with a positive in {lp['train_split']} has one: {r['train_images']} "
            f"images, {r['train_patients']} patients"
        )
    return lines


def _retrieval(rt: dict[str, Any]) -> list[str]:
    rows = [["direction", "R@1", "R@5", "R@10", "graded mAP"]]
    for key in ("image_to_text", "text_to_image", "chance"):
        r = rt[key]
        cells = [number(r.get(k)) for k in ("R@1", "R@5", "R@10", "graded_map")]
        rows.append([key, *cells])
    title = f"label-aware retrieval ({rt['items']} items, {rt['label_sets']} label sets)"
    return ["", title, *aligned(rows)]


def _segmentation(seg: dict[str, Any]) -> list[str]:
    keys = [k for k in (f"{f:.0%}" for f in PROBE_FRACTIONS) if k in seg]
    cis = _intervals([seg[k]["dice_ci"] for k in keys] + [seg[k]["iou_ci"] for k in keys])
    rows = [["subset", "Dice", "95 % CI", "IoU", "95 % CI", "train images", "with region"]]
    for i, key in enumerate(keys):
        r = seg[key]
        rows.append(
            [
                f"{key} of {seg['train_split']}",
                number(r["dice"]),
                cis[i],
                number(r["iou"]),
                cis[len(keys) + i],
                str(r["train_images"]),
                str(r.get("train_positives", "")),
            ]
        )
    balanced = ", negatives balanced 1:1" if seg.get("balance_negatives") else ""
    title = f"segmentation ({seg['decoder']} decoder, {seg['epochs']} epochs{balanced})"
    lines = ["", title, *aligned(rows)]
    if keys:
        r = seg[keys[-1]]
        lines += note(
            f"per-image mean over {r['test_images']} test images with a mask "
            f"({r.get('test_positives', '?')} with a region); an image whose true and predicted "
            "masks are both empty scores 1"
        )
    return lines


def format_table(metrics: dict[str, Any]) -> str:
    """A readable summary of metrics.json."""
    lines = [
        f"evaluation of {metrics.get('checkpoint', '?')} on {metrics['data']} "
        f"[{metrics['split']}], {metrics['images']} images"
    ]
    if metrics.get("zeroshot"):
        lines += _zeroshot(metrics["zeroshot"])
    if metrics.get("linear_probe"):
        lines += _probe(metrics["linear_probe"])
    if metrics.get("retrieval"):
        lines += _retrieval(metrics["retrieval"])
    if metrics.get("segmentation"):
        lines += _segmentation(metrics["segmentation"])
    return "\n".join(lines)
