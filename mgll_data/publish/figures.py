"""Card statistics and figures, computed from the finished shards of a build.

Figures (PNG, under `OUT/figures/`) are drawn with matplotlib's Agg backend at a fixed size and
dpi with no metadata, so a rebuild gives the same bytes; without matplotlib the card simply has
no figures. Each figure is made by a function that returns the matplotlib Figure, so what it
shows (captions, colour-bar ticks, marked bars) can be read back before it is saved.

Token counts approximate CLIP's BPE tokenizer without importing torch: the text is
split like CLIP's pre-tokenizer (lower-cased words, single digits, runs of punctuation), each
word counts one token per started 6 characters, and 2 are added for the start and end tokens.
Common words are single BPE tokens and long medical words split into several, so this is close
for report-style English; "over 77" means the text would be truncated by a 77-token context.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.parquet as pq

from ..record import TEXT_COLUMNS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CONTEXT = 77
SAMPLE_IMAGES = 8
EXAMPLE_ROWS = 3
CAPTION_WIDTH = 30  # characters per caption line under a 2-inch sample image at 7 pt
CAPTION_LINES = 3
ID_WIDTH = 44  # characters of an id shown (at 5 pt) before it is cut at the front
NOT_ANNOTATED = "not annotated"
_PIECES = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+")


def approx_clip_tokens(text: str) -> int:
    """Approximate CLIP token count of `text`, start and end tokens included (see module doc)."""
    pieces = _PIECES.findall(" ".join(text.lower().split()))
    return 2 + sum(max(1, math.ceil(len(p) / 6)) if p.isalpha() else 1 for p in pieces)


@dataclass
class Summary:
    """Counts over every row of a dataset, and the few rows and images a card shows."""

    label_names: list[str]
    positive: list[int]
    annotated: list[int]
    cooccurrence: list[list[int]]
    # split -> (positives per label, annotated rows per label)
    by_split: dict[str, tuple[list[int], list[int]]] = field(default_factory=dict)
    words: dict[str, list[int]] = field(default_factory=dict)
    tokens: dict[str, list[int]] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)
    # (id, label vector, encoded image) of the sample grid
    images: list[tuple[str, list[float], bytes]] = field(default_factory=list)


def _count_row(summary: Summary, row: dict[str, Any]) -> None:
    """Add one row's labels and text lengths to `summary`."""
    k = len(summary.label_names)
    split_positive, split_annotated = summary.by_split.setdefault(row["split"], ([0] * k, [0] * k))
    positives = []
    for i, value in enumerate(row["labels"]):
        if value == value:  # not NaN
            summary.annotated[i] += 1
            split_annotated[i] += 1
            if value == 1.0:
                summary.positive[i] += 1
                split_positive[i] += 1
                positives.append(i)
    for i in positives:
        for j in positives:
            summary.cooccurrence[i][j] += 1
    for column in TEXT_COLUMNS:
        summary.words[column].append(len(row[column].split()))
        summary.tokens[column].append(approx_clip_tokens(row[column]))


def summarise(out: Path, label_names: list[str]) -> Summary:
    """Read every shard of `out` once (all but the image column, except for a few samples)."""
    k = len(label_names)
    summary = Summary(label_names, [0] * k, [0] * k, [[0] * k for _ in range(k)])
    summary.words = {c: [] for c in TEXT_COLUMNS}
    summary.tokens = {c: [] for c in TEXT_COLUMNS}
    columns = ["id", "split", "labels", "positive_labels", *TEXT_COLUMNS]
    shards = sorted((Path(out) / "data").rglob("*.parquet"))
    # train first; in a merge (data/{source}/), each source's first shard before any second one,
    # so the samples and example rows come from several sources
    train_first = sorted(
        shards,
        key=lambda p: (not p.name.startswith("train-"), p.name.split("-of-")[0], str(p.parent)),
    )
    for path in train_first:
        for row in pq.read_table(path, columns=columns).to_pylist():
            _count_row(summary, row)
            if len(summary.examples) < EXAMPLE_ROWS:
                summary.examples.append(row)
        wanted = SAMPLE_IMAGES - len(summary.images)
        if wanted > 0:
            for row in _first_rows(path, ["id", "labels", "image"], wanted):
                summary.images.append((row["id"], row["labels"], row["image"]["bytes"]))
    return summary


def _first_rows(path: Path, columns: list[str], n: int) -> list[dict]:
    """The first `n` rows of a shard, reading only the row groups that hold them: a shard's
    whole image column is hundreds of MB at the default shard size."""
    rows: list[dict] = []
    for batch in pq.ParquetFile(path).iter_batches(batch_size=n, columns=columns):
        rows.extend(batch.to_pylist()[: n - len(rows)])
        if len(rows) == n:
            break
    return rows


def text_length_table(summary: Summary) -> list[str]:
    """Markdown rows: words and approximate CLIP tokens per text column, and how many overflow."""
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


def _pack(tokens: Sequence[str], width: int) -> list[str]:
    """`tokens` joined by spaces into lines of at most `width` characters (greedy)."""
    lines: list[str] = []
    for token in tokens:
        if lines and len(lines[-1]) + 1 + len(token) <= width:
            lines[-1] += " " + token
        else:
            lines.append(token)
    return lines


def _wrap_names(names: Sequence[str], width: int, max_lines: int, prefix: str = "") -> str:
    """`names` comma-separated in at most `max_lines` lines of `width` characters, the names
    that do not fit replaced by "+N more"; a name longer than a line is cut with "…"."""
    names = [n if len(n) <= width else n[: width - 1] + "…" for n in names]
    for shown in range(len(names), -1, -1):
        tokens = [f"{n}," for n in names[:shown]]
        if shown == len(names):
            tokens[-1] = tokens[-1][:-1]
        else:
            tokens.append(f"+{len(names) - shown} more")
        lines = _pack([prefix, *tokens] if prefix else tokens, width)
        if len(lines) <= max_lines:
            break
    return "\n".join(lines)


def sample_caption(
    row_id: str, labels: Sequence[float | None], label_names: Sequence[str]
) -> tuple[str, str]:
    """The two captions of one sample image: its positive labels (wrapped, "+N more" past
    three lines; "uncertain: …" when it has only uncertain ones; "no finding" when it has
    annotated labels and none positive; "none annotated" when every label is NaN), and its id
    (cut at the front, where ids share their source prefix, when too long)."""
    values = [math.nan if v is None else float(v) for v in labels]
    positive = [n for n, v in zip(label_names, values, strict=True) if v == 1.0]
    uncertain = [n for n, v in zip(label_names, values, strict=True) if v == -1.0]
    if positive:
        text = _wrap_names(positive, CAPTION_WIDTH, CAPTION_LINES)
    elif uncertain:
        text = _wrap_names(uncertain, CAPTION_WIDTH, CAPTION_LINES, prefix="uncertain:")
    elif any(v == v for v in values):
        text = "no finding"
    else:
        text = "none annotated"
    shown_id = row_id if len(row_id) <= ID_WIDTH else "…" + row_id[-(ID_WIDTH - 1) :]
    return text, shown_id


def prevalence_figure(summary: Summary) -> Figure:
    """Horizontal bars of positives / annotated rows per label; a label no row annotates gets
    a hatched grey bar across the plot reading "not annotated" instead of a 0 % bar."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    names = summary.label_names
    pairs = list(zip(summary.positive, summary.annotated, strict=True))
    share = [p / a if a else 0.0 for p, a in pairs]
    top = max([*share, 0.05]) * 1.25  # room for the count written after each bar
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.16 * len(names)), layout="constrained")
    for y, ((positive, annotated), value) in enumerate(zip(pairs, share, strict=True)):
        if not annotated:
            ax.barh(y, top, color="#eeeeee", edgecolor="#999999", hatch="///", linewidth=0)
            ax.text(
                top / 100,
                y,
                NOT_ANNOTATED,
                va="center",
                color="#555555",
                fontsize=7,
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5},
            )
            continue
        ax.barh(y, value, color="#3b6ea8")
        ax.text(value + top / 100, y, f"{positive} / {annotated}", va="center", fontsize=6)
    ax.set_yticks(range(len(names)), names)
    ax.set_ylim(len(names) - 0.5, -0.5)  # first label on top
    ax.set_xlim(0, top)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel("positive rows / annotated rows (all splits)")
    ax.set_title("Label prevalence")
    return fig


def count_ticks(largest: int) -> list[int]:
    """Colour-bar ticks for counts from 1 to `largest`: 1, 2, 5, 10, 20, 50, … ≤ `largest`."""
    ticks, decade = [], 1
    while decade <= largest:
        ticks += [t for t in (decade, 2 * decade, 5 * decade) if t <= largest]
        decade *= 10
    return ticks


def cooccurrence_figure(summary: Summary) -> Figure:
    """Rows positive for both labels, coloured on a log scale with the colour bar ticked at
    real counts; no rows at all is white, and labels no row annotates are named in grey."""
    import matplotlib
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm

    names = summary.label_names
    matrix = np.array(summary.cooccurrence, dtype=float).reshape(len(names), len(names))
    largest = max(int(matrix.max(initial=0)), 2)  # a log scale needs two distinct ends
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    fig, ax = plt.subplots(figsize=(7, 6), layout="constrained")
    # LogNorm masks zero (off a log scale), so never-together pairs take the "bad" colour
    image = ax.imshow(matrix, cmap=cmap, norm=LogNorm(vmin=1, vmax=largest))
    ax.set_xticks(range(len(names)), names, rotation=90)
    ax.set_yticks(range(len(names)), names)
    for ticks in (ax.get_xticklabels(), ax.get_yticklabels()):
        for tick, annotated in zip(ticks, summary.annotated, strict=True):
            if not annotated:
                tick.set_color("#999999")
    ax.set_title("Label co-occurrence: rows positive for both (diagonal: positive rows)")
    bar = fig.colorbar(image, ax=ax, shrink=0.7, label="rows (log scale; white: none)")
    ticks = count_ticks(largest)
    bar.set_ticks(ticks, labels=[str(t) for t in ticks])
    bar.minorticks_off()
    if not all(summary.annotated):
        ax.set_xlabel("grey names: labels no row annotates")
    return fig


def sample_figure(summary: Summary) -> Figure:
    """A grid of the sample images, each titled with its positive labels and, smaller, its id."""
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    cols = 4
    rows = math.ceil(len(summary.images) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2 * cols, 2.7 * rows), layout="constrained")
    cells = np.atleast_1d(axes).ravel()
    for ax in cells:
        ax.axis("off")
    for ax, (row_id, labels, data) in zip(cells, summary.images, strict=False):
        with Image.open(io.BytesIO(data)) as img:
            if img.mode in ("RGB", "RGBA", "P"):
                ax.imshow(np.asarray(img.convert("RGB")))
            else:
                ax.imshow(np.asarray(img.convert("L")), cmap="gray", vmin=0, vmax=255)
        caption, shown_id = sample_caption(row_id, labels, summary.label_names)
        ax.set_title(caption, fontsize=7)
        ax.text(0.5, -0.02, shown_id, transform=ax.transAxes, ha="center", va="top", fontsize=5)
    return fig


def write_figures(out: Path, summary: Summary) -> list[str]:
    """Draw the figures into `out/figures/`; return their paths relative to `out` ([] if no
    matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []

    folder = Path(out) / "figures"
    folder.mkdir(exist_ok=True)
    plt.rcParams.update({"svg.hashsalt": "mgll", "font.size": 8})
    drawn = [
        ("label_prevalence.png", prevalence_figure),
        ("label_cooccurrence.png", cooccurrence_figure),
        *([("sample_images.png", sample_figure)] if summary.images else []),
    ]
    written = []
    for name, draw in drawn:
        fig = draw(summary)
        fig.savefig(folder / name, dpi=100, metadata={"Software": None})
        plt.close(fig)
        written.append(f"figures/{name}")
    return written
