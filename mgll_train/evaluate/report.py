"""The outputs of `mgll-train eval`: JSON-safe metrics and the plots (the printed table is in
`table.py`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from .metrics import roc_curve


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


def curve_styles(count: int) -> list[tuple[Any, str]]:
    """(colour, line style) for `count` curves, no two alike: up to 20, the ten dark tab20
    colours drawn solid, then their light partners dashed; beyond, `count` colours spread over
    the turbo colour map with four line styles in turn, so neighbours differ in style too."""
    import matplotlib

    if count <= 20:
        tab20 = matplotlib.colormaps["tab20"].colors
        return [(tab20[2 * (i % 10) + i // 10], "-" if i < 10 else "--") for i in range(count)]
    turbo = matplotlib.colormaps["turbo"]
    styles = ("-", "--", ":", "-.")
    return [(turbo(i / (count - 1)), styles[i % 4]) for i in range(count)]


def roc_figure(metrics: dict[str, Any], extras: dict[str, Any]) -> Any:
    """The zero-shot ROC curve of every label in `metrics`, each in its own colour and line
    style (`curve_styles`), the legend beside the plot."""
    import matplotlib.pyplot as plt

    zs = metrics["zeroshot"]
    names = list(zs["per_label"])
    labels, scores, all_names = extras["labels"], extras["zeroshot_scores"], extras["names"]
    fig, ax = plt.subplots(figsize=(6 + 2 * math.ceil(len(names) / 30), 6))
    for name, (colour, style) in zip(names, curve_styles(len(names)), strict=True):
        j = all_names.index(name)
        keep = ~np.isnan(labels[:, j])
        fpr, tpr = roc_curve(labels[keep, j] > 0, scores[keep, j])
        auroc = zs["per_label"][name]["auroc"]
        shown = "n/a" if auroc is None else f"{auroc:.2f}"
        ax.plot(fpr, tpr, lw=1.2, color=colour, ls=style, label=f"{name} ({shown})")
    ax.plot([0, 1], [0, 1], color="k", ls=(0, (1, 3)), lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="zero-shot ROC")
    ax.set_aspect("equal")
    ax.legend(
        fontsize=6,
        loc="upper left",
        bbox_to_anchor=(1.02, 1),
        ncols=math.ceil(len(names) / 30),
        title="label (AUROC)",
        title_fontsize=6,
    )
    fig.tight_layout()
    return fig


def segmentation_figure(examples: dict[str, Any]) -> Any:
    """A few test images (one row each): the image, the true mask, the predicted mask (the
    decoder trained on 100 % of the training split), masks drawn over the image in colour."""
    import matplotlib.pyplot as plt

    images = examples["images"]
    fig, axes = plt.subplots(len(images), 3, figsize=(7.5, 2.6 * len(images)), squeeze=False)
    layers = (None, examples["true"], examples["predicted"])
    for i, image in enumerate(images):
        titles = (
            str(examples["ids"][i])[-28:],
            "true mask",
            f"predicted (Dice {examples['dice'][i]:.2f})",
        )
        for ax, masks, title in zip(axes[i], layers, titles, strict=True):
            ax.imshow(image, cmap="gray")
            if masks is not None:
                ax.imshow(np.ma.masked_where(~masks[i], masks[i]), cmap="autumn", alpha=0.5)
            ax.set_title(title, fontsize=8)
            ax.set_axis_off()
    fig.tight_layout()
    return fig


def write_plots(metrics: dict[str, Any], extras: dict[str, Any], out: Path) -> list[Path]:
    """ROC curves per label and per-label AUROC bars with CIs, and the segmentation examples
    (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    examples = extras.get("segmentation_examples") or {}
    if examples.get("images") is not None:
        fig = segmentation_figure(examples)
        path = out / "segmentation_examples.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    zs = metrics.get("zeroshot")
    if not zs or not zs["per_label"]:
        return written
    names = list(zs["per_label"])
    fig = roc_figure(metrics, extras)
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
