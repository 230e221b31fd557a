"""Dataset-card figures and the eval ROC plot, read back from the matplotlib objects: sample
captions name each image's labels, never-annotated labels are marked as such, the co-occurrence
colour bar is ticked at real counts, and many ROC curves stay distinguishable."""

from __future__ import annotations

import io
import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pyarrow.parquet as pq
import pytest
from matplotlib.colors import to_rgba
from PIL import Image

from mgll_data.publish.card import prevalence_table
from mgll_data.publish.figures import (
    Summary,
    cooccurrence_figure,
    count_ticks,
    prevalence_figure,
    sample_caption,
    sample_figure,
    summarise,
)
from mgll_train.evaluate.report import curve_styles, roc_figure, write_plots
from tests.fake_hub import build_dataset, write_release

NAMES = [
    "No Finding",
    "Cardiomegaly",
    "Lung Lesion",
    "Pleural Effusion",
    "Enlarged Cardiomediastinum",
]
NAN = math.nan


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The 24-image ChestX-ray14-shaped release, built with 64-pixel images."""
    work = tmp_path_factory.mktemp("card-figures")
    return build_dataset(write_release(work / "raw"), work / "out", rows_per_shard=8)


def summary_of(positive, annotated, cooccurrence=None, images=()):
    k = len(positive)
    matrix = cooccurrence if cooccurrence is not None else [[0] * k for _ in range(k)]
    return Summary(NAMES[:k], positive, annotated, matrix, images=list(images))


# -- the sample grid ------------------------------------------------------------------------------


def test_sample_caption_names_positive_labels_and_says_when_there_are_none():
    assert sample_caption("cxr:1", [0, 1, NAN, 1, 0], NAMES) == (
        "Cardiomegaly, Pleural Effusion",
        "cxr:1",
    )
    # annotated, none positive; nothing annotated at all (NaN or a missing value)
    assert sample_caption("cxr:2", [0, 0, NAN, 0, NAN], NAMES)[0] == "no finding"
    assert sample_caption("cxr:3", [NAN, None, NAN, NAN, NAN], NAMES)[0] == "none annotated"
    # only uncertain labels: not "no finding"
    assert sample_caption("cxr:4", [0, -1, NAN, 0, 0], NAMES)[0] == "uncertain: Cardiomegaly"


def test_sample_caption_wraps_and_truncates_long_label_lists_and_ids():
    caption, _ = sample_caption("cxr:5", [1, 1, 1, 1, 1], NAMES)
    # 30-character lines, at most three; what does not fit is counted
    assert caption == (
        "No Finding, Cardiomegaly,\nLung Lesion, Pleural Effusion,\nEnlarged Cardiomediastinum"
    )
    many = [f"Finding number {i}" for i in range(9)]
    caption, _ = sample_caption("cxr:6", [1.0] * 9, many)
    assert caption == ("Finding number 0,\nFinding number 1,\nFinding number 2, +6 more")
    long_name = ["A label whose name is far longer than a caption line"]
    assert sample_caption("cxr:7", [1.0], long_name)[0] == "A label whose name is far lon…"
    long_id = "mimic_cxr:" + "0123456789" * 5
    assert sample_caption(long_id, [0.0], ["x"])[1] == "…" + long_id[-43:]


def test_sample_grid_titles_each_image_with_its_labels_and_a_smaller_id(built):
    fig = sample_figure(summarise(built, _label_names(built)))
    # independent of the `labels` vector the captions are made from: the row's positive_labels
    train = []
    for path in sorted((built / "data").glob("train-*.parquet")):
        train += pq.read_table(path, columns=["id", "positive_labels"]).to_pylist()
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 8
    for ax, row in zip(shown, train[:8], strict=True):
        title = ax.title
        assert title.get_text().replace(",\n", ", ") == ", ".join(row["positive_labels"])
        (id_text,) = ax.texts
        assert id_text.get_text() == row["id"]
        assert id_text.get_fontsize() < title.get_fontsize()


def _label_names(out):
    from mgll_data.publish.inspect import read_card_header

    return read_card_header(out)["mgll"]["label_names"]


def test_sample_grid_of_hand_made_images_shows_no_finding_and_none_annotated():
    grey = io.BytesIO()
    Image.new("L", (8, 8), 128).save(grey, format="PNG")
    images = [("a:1", [0.0, 0.0, NAN], grey.getvalue()), ("a:2", [NAN, NAN, NAN], grey.getvalue())]
    fig = sample_figure(summary_of([0, 0, 0], [1, 1, 0], images=images))
    titles = [ax.get_title() for ax in fig.axes if ax.images]
    assert titles == ["no finding", "none annotated"]


# -- prevalence -----------------------------------------------------------------------------------


def test_prevalence_marks_never_annotated_labels_instead_of_a_zero_bar():
    # Lung Lesion: no row annotates it; Cardiomegaly: annotated, never positive
    fig = prevalence_figure(summary_of([3, 0, 0, 2], [10, 10, 0, 8]))
    (ax,) = fig.axes
    bars = sorted(ax.patches, key=lambda bar: bar.get_y())
    assert [bool(bar.get_hatch()) for bar in bars] == [False, False, True, False]
    assert bars[1].get_width() == 0 and bars[0].get_width() == pytest.approx(0.3)
    # the hatched bar spans the plot, grey, so it cannot be read as a share
    assert bars[2].get_width() == pytest.approx(ax.get_xlim()[1])
    texts = {round(t.get_position()[1]): t.get_text() for t in ax.texts}
    assert texts == {0: "3 / 10", 1: "0 / 10", 2: "not annotated", 3: "2 / 8"}
    share = ax.xaxis.get_major_formatter()(0.25, 0)  # the axis reads in percent
    assert share.endswith("%") and float(share[:-1]) == 25


def test_prevalence_table_says_not_annotated_rather_than_zero_percent():
    counts = {"train": ([3, 0, 0], [10, 10, 0]), "test": ([1, 0, 0], [4, 0, 0])}
    assert prevalence_table(NAMES[:3], counts) == [
        "| label | train | test |",
        "|---|---|---|",
        "| No Finding | 3 / 10 (30.0%) | 1 / 4 (25.0%) |",
        "| Cardiomegaly | 0 / 10 (0.0%) | not annotated |",
        "| Lung Lesion | not annotated | not annotated |",
    ]


def test_built_card_table_reads_not_annotated_for_labels_the_source_lacks(built):
    from mgll_data.publish.inspect import read_card_header

    mgll = read_card_header(built)["mgll"]
    missing = [n for n in mgll["label_names"] if n not in mgll["annotated_labels"]]
    assert "Lung Lesion" in missing  # ChestX-ray14 has no such finding
    text = (built / "README.md").read_text()
    splits = [s for s in ("train", "validation", "test") if any(built.glob(f"data/{s}-*"))]
    for name in missing:
        assert f"| {name} | " + " | ".join(["not annotated"] * len(splits)) + " |" in text
    assert "(0.0%) |" not in text.split("| Lung Lesion |")[1].split("\n")[0]


# -- co-occurrence --------------------------------------------------------------------------------


def test_count_ticks_are_one_two_five_per_decade():
    assert count_ticks(150) == [1, 2, 5, 10, 20, 50, 100]
    assert count_ticks(2) == [1, 2]
    assert count_ticks(1000) == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]


def test_cooccurrence_colour_bar_is_ticked_at_counts_on_a_log_scale():
    matrix = [[150, 10, 0], [10, 12, 1], [0, 1, 1]]
    fig = cooccurrence_figure(summary_of([150, 12, 1], [200, 200, 200], matrix))
    ax, bar_ax = fig.axes
    (image,) = ax.images
    # the image holds the counts themselves, not log(1 + n)
    assert float(image.get_array().max()) == 150
    labels = [t.get_text() for t in bar_ax.get_yticklabels()]
    assert labels == ["1", "2", "5", "10", "20", "50", "100"]

    def height(label):  # where a tick sits along the colour bar, 0 (bottom) to 1 (top)
        value = bar_ax.get_yticks()[labels.index(label)]
        point = bar_ax.transData.transform((0, value))
        return bar_ax.transAxes.inverted().transform(point)[1]

    # decades are equally spaced (log), and 10 is far above where a linear bar would put it
    assert height("100") - height("10") == pytest.approx(height("10") - height("1"), abs=0.01)
    assert height("10") > 0.4
    # a pair never seen together is white, not the colour of a count
    colours = image.to_rgba(image.get_array())
    assert tuple(colours[0, 2]) == (1.0, 1.0, 1.0, 1.0)
    assert tuple(colours[1, 2]) != (1.0, 1.0, 1.0, 1.0)


def test_cooccurrence_names_never_annotated_labels_in_grey():
    fig = cooccurrence_figure(summary_of([2, 1, 0], [5, 5, 0]))
    ax = fig.axes[0]
    colours = [to_rgba(t.get_color()) for t in ax.get_yticklabels()]
    assert colours[0] == colours[1] != colours[2]


# -- ROC curves -----------------------------------------------------------------------------------


def _zeroshot(k, n=40, seed=0):
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, k)) < 0.4).astype(float)
    labels[:2] = [[0.0] * k, [1.0] * k]  # both classes in every column
    labels[5, 0] = NAN
    scores = labels + rng.normal(0, 0.8, (n, k))
    names = [f"label {j}" for j in range(k)]
    per_label = {name: {"auroc": 0.5 + j / 100, "ci95": [0.4, 0.6]} for j, name in enumerate(names)}
    metrics = {"zeroshot": {"per_label": per_label}}
    return metrics, {"labels": labels, "zeroshot_scores": scores, "names": names}


def test_twelve_roc_curves_have_twelve_distinct_colours(tmp_path):
    metrics, extras = _zeroshot(12)
    fig = roc_figure(metrics, extras)
    (ax,) = fig.axes
    curves = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
    assert [c.get_label() for c in curves] == [f"label {j} (0.{50 + j})" for j in range(12)]
    assert len({to_rgba(c.get_color()) for c in curves}) == 12
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == [c.get_label() for c in curves]
    written = write_plots(metrics, extras, tmp_path)
    for path in written:
        with Image.open(path) as png:
            png.verify()


@pytest.mark.parametrize("count", [1, 12, 20, 21, 45, 120])
def test_curve_styles_never_repeat_and_neighbours_differ(count):
    styles = curve_styles(count)
    assert len(styles) == count
    keys = [(to_rgba(colour), style) for colour, style in styles]
    assert len(set(keys)) == count
    assert len({colour for colour, _ in keys}) == count  # colours alone tell them apart
    if count > 20:
        assert all(a[1] != b[1] for a, b in zip(keys, keys[1:], strict=False))
