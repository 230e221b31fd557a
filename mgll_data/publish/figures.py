"""Card statistics and figures, computed from the finished shards of a build.

Figures (PNG, under `OUT/figures/`) are drawn with matplotlib's Agg backend at a fixed size and
dpi with no metadata, so a rebuild gives the same bytes; without matplotlib the card simply has
no figures. Token counts approximate CLIP's BPE tokenizer without importing torch: the text is
split like CLIP's pre-tokenizer (lower-cased words, single digits, runs of punctuation), each
word counts one token per started 6 characters, and 2 are added for the start and end tokens.
Common words are single BPE tokens and long medical words split into several, so this is close
for report-style English; "over 77" means the text would be truncated by a 77-token context.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from ..record import TEXT_COLUMNS

CONTEXT = 77
SAMPLE_IMAGES = 8
EXAMPLE_ROWS = 3
_PIECES = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+")


def approx_clip_tokens(text: str) -> int:
    """Approximate CLIP token count of `text`, start and end tokens included (see module doc)."""
    pieces = _PIECES.findall(" ".join(text.lower().split()))
    return 2 + sum(max(1, math.ceil(len(p) / 6)) if p.isalpha() else 1 for p in pieces)


@dataclass
class Summary:
    label_names: list[str]
    positive: list[int]
    annotated: list[int]
    cooccurrence: list[list[int]]
    words: dict[str, list[int]] = field(default_factory=dict)
    tokens: dict[str, list[int]] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)
    images: list[tuple[str, bytes]] = field(default_factory=list)


def summarise(out: Path, label_names: list[str]) -> Summary:
    """Read every shard of `out` once (all but the image column, except for a few samples)."""
    k = len(label_names)
    summary = Summary(label_names, [0] * k, [0] * k, [[0] * k for _ in range(k)])
    summary.words = {c: [] for c in TEXT_COLUMNS}
    summary.tokens = {c: [] for c in TEXT_COLUMNS}
    columns = ["id", "split", "labels", "positive_labels", *TEXT_COLUMNS]
    shards = sorted((Path(out) / "data").rglob("*.parquet"))
    train_first = sorted(shards, key=lambda p: (not p.name.startswith("train-"), p.name))
    for path in train_first:
        for row in pq.read_table(path, columns=columns).to_pylist():
            positives = []
            for i, value in enumerate(row["labels"]):
                if value == value:  # not NaN
                    summary.annotated[i] += 1
                    if value == 1.0:
                        summary.positive[i] += 1
                        positives.append(i)
            for i in positives:
                for j in positives:
                    summary.cooccurrence[i][j] += 1
            for column in TEXT_COLUMNS:
                summary.words[column].append(len(row[column].split()))
                summary.tokens[column].append(approx_clip_tokens(row[column]))
            if len(summary.examples) < EXAMPLE_ROWS:
                summary.examples.append(row)
        if len(summary.images) < SAMPLE_IMAGES:
            table = pq.read_table(path, columns=["id", "image"]).slice(0, SAMPLE_IMAGES)
            for row in table.to_pylist():
                if len(summary.images) < SAMPLE_IMAGES:
                    summary.images.append((row["id"], row["image"]["bytes"]))
    return summary


def text_length_table(summary: Summary) -> list[str]:
    lines = [
        f"| text | words (median / max) | tokens, approx. (median / max) | over {CONTEXT} tokens |",
        "|---|---|---|---|",
    ]
    for column in TEXT_COLUMNS:
        words, tokens = sorted(summary.words[column]), sorted(summary.tokens[column])
        if not words:
            continue
        over = sum(t > CONTEXT for t in tokens)
        lines.append(
            f"| `{column}` | {words[len(words) // 2]} / {words[-1]} | "
            f"{tokens[len(tokens) // 2]} / {tokens[-1]} | {over} ({over / len(tokens):.1%}) |"
        )
    return lines


def write_figures(out: Path, summary: Summary) -> list[str]:
    """Draw the figures into `out/figures/`; return their paths relative to `out` ([] if no
    matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    import io

    import numpy as np
    from PIL import Image

    folder = Path(out) / "figures"
    folder.mkdir(exist_ok=True)
    plt.rcParams.update({"svg.hashsalt": "mgll", "font.size": 8})
    written = []

    def save(fig, name):
        fig.savefig(folder / name, dpi=100, metadata={"Software": None})
        plt.close(fig)
        written.append(f"figures/{name}")

    names = summary.label_names
    share = [p / a if a else 0.0 for p, a in zip(summary.positive, summary.annotated, strict=True)]
    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    ax.barh(range(len(names)), share, color="#3b6ea8")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("positives / annotated rows")
    ax.set_title("Label prevalence (all splits)")
    save(fig, "label_prevalence.png")

    matrix = np.array(summary.cooccurrence, dtype=float)
    fig, ax = plt.subplots(figsize=(7, 6), layout="constrained")
    image = ax.imshow(np.log1p(matrix), cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=90)
    ax.set_yticks(range(len(names)), names)
    ax.set_title("Label co-occurrence (rows positive for both; colour log(1 + n))")
    fig.colorbar(image, ax=ax, shrink=0.7)
    save(fig, "label_cooccurrence.png")

    if summary.images:
        cols = 4
        rows = math.ceil(len(summary.images) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(2 * cols, 2.2 * rows), layout="constrained")
        for ax in np.atleast_1d(axes).ravel():
            ax.axis("off")
        for ax, (row_id, data) in zip(np.atleast_1d(axes).ravel(), summary.images, strict=False):
            with Image.open(io.BytesIO(data)) as img:
                if img.mode in ("RGB", "RGBA", "P"):
                    ax.imshow(np.asarray(img.convert("RGB")))
                else:
                    ax.imshow(np.asarray(img.convert("L")), cmap="gray", vmin=0, vmax=255)
            ax.set_title(row_id, fontsize=6)
        save(fig, "sample_images.png")
    return written
