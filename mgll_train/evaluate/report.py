"""The outputs of `mgll-train eval`: JSON-safe metrics, the printed table and the plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from .metrics import roc_curve
from .probe import PROBE_FRACTIONS


def clean_metrics(value: Any) -> Any:
    """A JSON-safe copy of metrics (for metrics.json and metrics.jsonl): NaN/inf → None, numpy
    scalars → Python, tuples → lists, keys → str."""
    if isinstance(value, dict):
        return {str(k): clean_metrics(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_metrics(v) for v in value]
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _fmt(value: float | None, digits: int = 3) -> str:
    """A number for the table, or "n/a" aligned to its width."""
    return "  n/a" if value is None else f"{value:.{digits}f}"


def format_table(metrics: dict[str, Any]) -> str:
    """A readable summary of metrics.json."""
    lines = [
        f"evaluation of {metrics.get('checkpoint', '?')} on {metrics['data']} "
        f"[{metrics['split']}], {metrics['images']} images"
    ]
    zs = metrics.get("zeroshot")
    if zs:
        lines += [
            "",
            "zero-shot AUROC (95 % bootstrap CI)",
            f"  {'label':28} AUROC  CI          pos/neg",
        ]
        for name, r in zs["per_label"].items():
            lo, hi = r["ci95"]
            lines.append(
                f"  {name:28} {_fmt(r['auroc'])}  [{_fmt(lo)}, {_fmt(hi)}]  "
                f"{r['positives']}/{r['negatives']}"
            )
        lo, hi = zs["macro_auroc_ci95"]
        lines.append(f"  {'macro':28} {_fmt(zs['macro_auroc'])}  [{_fmt(lo)}, {_fmt(hi)}]")
        lo, hi = zs["chexpert5_auroc_ci95"]
        lines.append(
            f"  {'CheXpert five':28} {_fmt(zs['chexpert5_auroc'])}  [{_fmt(lo)}, {_fmt(hi)}]"
        )
        for name, why in zs["skipped"].items():
            lines.append(f"  {name:28} skipped: {why}")
    lp = metrics.get("linear_probe")
    if lp:
        lines += ["", f"{lp['mode']} probe ({lp['epochs']} epochs)   macro AUROC   mAP   images"]
        for key in (f"{f:.0%}" for f in PROBE_FRACTIONS):
            r = lp[key]
            lines.append(
                f"  {key:>5} of {lp['train_split']:10} {_fmt(r['macro_auroc']):>10}  "
                f"{_fmt(r['map'])}  {r['train_images']}"
            )
    rt = metrics.get("retrieval")
    if rt:
        lines += ["", f"label-aware retrieval ({rt['items']} items, {rt['label_sets']} label sets)"]
        lines.append("  direction        R@1    R@5    R@10   graded mAP")
        for key in ("image_to_text", "text_to_image", "chance"):
            r = rt[key]
            lines.append(
                f"  {key:15} {_fmt(r['R@1'])}  {_fmt(r['R@5'])}  {_fmt(r['R@10'])}  "
                f"{_fmt(r.get('graded_map'))}"
            )
    return "\n".join(lines)


def write_plots(metrics: dict[str, Any], extras: dict[str, Any], out: Path) -> list[Path]:
    """ROC curves per label and per-label AUROC bars with CIs (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    zs = metrics.get("zeroshot")
    if not zs or not zs["per_label"]:
        return []
    written = []
    names = list(zs["per_label"])
    labels, scores, all_names = extras["labels"], extras["zeroshot_scores"], extras["names"]
    fig, ax = plt.subplots(figsize=(6, 6))
    for name in names:
        j = all_names.index(name)
        keep = ~np.isnan(labels[:, j])
        fpr, tpr = roc_curve(labels[keep, j] > 0, scores[keep, j])
        ax.plot(fpr, tpr, lw=1, label=f"{name} ({zs['per_label'][name]['auroc']:.2f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="zero-shot ROC")
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    path = out / "roc_curves.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(names) + 2), 4))
    values = [zs["per_label"][n]["auroc"] for n in names]
    ci = [zs["per_label"][n]["ci95"] for n in names]
    ax.bar(range(len(names)), values, color="#4c72b0")
    # A percentile interval need not contain the point estimate (few resamples, small splits):
    # draw each interval about its own midpoint, so [lo, hi] is shown as it is.
    spans = [(x, c) for x, c in enumerate(ci) if c[0] is not None and c[1] is not None]
    if spans:
        ax.errorbar(
            [x for x, _ in spans],
            [(lo + hi) / 2 for _, (lo, hi) in spans],
            yerr=[(hi - lo) / 2 for _, (lo, hi) in spans],
            fmt="none",
            ecolor="k",
            capsize=3,
        )
    ax.axhline(0.5, color="k", ls="--", lw=0.8)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set(ylim=(0, 1), ylabel="AUROC", title="zero-shot AUROC per label (95 % CI)")
    fig.tight_layout()
    path = out / "auroc_per_label.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)
    return written
