"""`mgll-train eval`: metrics vs scikit-learn, bootstrap, retrieval hits and chance, end to end."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from mgll_train.evaluate.metrics import (
    auroc,
    average_precision,
    bootstrap_weights,
    macro_auroc_map,
    multilabel_auroc,
    weighted_auroc,
)
from mgll_train.evaluate.probe import draw_patient_subset, patient_subset
from mgll_train.evaluate.report import clean_metrics
from mgll_train.evaluate.retrieval import chance_recall, label_set_keys, retrieval_metrics
from mgll_train.evaluate.table import format_table
from tests.conftest import run_module


def _scores_with_ties(seed: int, n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.3
    scores = np.round(rng.normal(size=n) + y * 0.8, 1)  # rounding makes many ties
    return y, scores


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_and_ap_match_sklearn(seed):
    y, s = _scores_with_ties(seed)
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert auroc(y, -s) == pytest.approx(1 - auroc(y, s), abs=1e-12)


def test_weighted_auroc_equals_sklearn_with_sample_weight():
    y, s = _scores_with_ties(3, 80)
    w = bootstrap_weights(len(y), 5, seed=0)
    got = weighted_auroc(y, s, w)
    for b in range(5):
        assert got[b] == pytest.approx(roc_auc_score(y, s, sample_weight=w[b]), abs=1e-12)


def test_auroc_is_nan_without_both_classes():
    assert np.isnan(auroc(np.ones(5, bool), np.arange(5.0)))
    assert np.isnan(average_precision(np.zeros(5, bool), np.arange(5.0)))


def test_multilabel_auroc_ci_skips_and_chexpert_five():
    rng = np.random.default_rng(0)
    names = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion", "Mass"]
    labels = (rng.random((150, 6)) < 0.3).astype(np.float32)
    labels[:, 5] = 0  # Mass: one class only -> skipped
    labels[:10, 0] = np.nan  # left out of Atelectasis only
    scores = labels + rng.normal(0, 0.8, labels.shape)
    scores[:10, 0] = 99.0  # would wreck the score if NaN rows were counted
    out = multilabel_auroc(labels, scores, names, bootstrap=200, seed=4)
    keep = ~np.isnan(labels[:, 0])
    assert out["per_label"]["Atelectasis"]["auroc"] == pytest.approx(
        roc_auc_score(labels[keep, 0], scores[keep, 0])
    )
    assert "Mass" in out["skipped"] and "Mass" not in out["per_label"]
    assert out["chexpert5_auroc"] == pytest.approx(
        np.mean([out["per_label"][n]["auroc"] for n in names[:5]])
    )
    for r in [
        *out["per_label"].values(),
        {"auroc": out["macro_auroc"], "ci95": out["macro_auroc_ci95"]},
    ]:
        lo, hi = r["ci95"]
        assert lo <= r["auroc"] <= hi and hi - lo > 0.01
    again = multilabel_auroc(labels, scores, names, bootstrap=200, seed=4)
    other = multilabel_auroc(labels, scores, names, bootstrap=200, seed=5)
    assert again == out
    assert other["macro_auroc_ci95"] != out["macro_auroc_ci95"]


def test_macro_auroc_map_matches_sklearn_on_usable_labels():
    rng = np.random.default_rng(1)
    labels = (rng.random((60, 3)) < 0.4).astype(np.float32)
    labels[:, 2] = 1.0
    scores = rng.normal(size=(60, 3))
    out = macro_auroc_map(labels, scores, ["a", "b", "c"])
    assert out["labels"] == ["a", "b"]
    assert out["macro_auroc"] == pytest.approx(roc_auc_score(labels[:, :2], scores[:, :2]))
    assert out["map"] == pytest.approx(average_precision_score(labels[:, :2], scores[:, :2]))


def test_retrieval_hit_needs_the_exact_label_set_and_chance_level():
    # Items 0,1: {A}; item 2: {A, B}; item 3: {} (No Finding).
    labels = np.array([[1, 0], [1, 0], [1, 1], [0, 0]], dtype=np.float32)
    keys = label_set_keys(labels)
    assert keys[0] == keys[1] and len(set(keys.tolist())) == 3
    # Each image's nearest text is item 2's: a hit only for item 2 (item 0,1 share A but not the
    # whole set). Second nearest is the item's own text.
    image = np.eye(4, dtype=np.float32)
    text = np.eye(4, dtype=np.float32) * 0.5
    text[2] = 1.0
    got = retrieval_metrics(image, text, keys, labels, ks=(1, 2))
    assert got["R@1"] == pytest.approx(1 / 4)  # only item 2
    assert got["R@2"] == pytest.approx(1.0)
    # Chance by hand, N = 4: key {A} has 2 items -> R@1 = 2/4; the other keys 1/4.
    assert chance_recall(keys, 1) == pytest.approx((0.5 + 0.5 + 0.25 + 0.25) / 4)
    # R@2: {A}: 1 - C(2,2)/C(4,2) = 5/6; singletons: 1 - C(3,2)/C(4,2) = 1/2.
    assert chance_recall(keys, 2) == pytest.approx((5 / 6 * 2 + 0.5 * 2) / 4)
    # Graded mAP, query 0: ranking [2, 0, 1, 3] with Jaccard relevance [1/2, 1, 1, 0].
    rel = np.array([0.5, 1, 1, 0])
    ap0 = np.sum(rel * np.cumsum(rel) / np.arange(1, 5)) / rel.sum()
    one = retrieval_metrics(
        image[:1], text, keys, labels, query_keys=keys[:1], query_labels=labels[:1]
    )
    assert one["graded_map"] == pytest.approx(ap0)


def test_patient_subset_is_patient_level_with_a_positive_per_label():
    rng = np.random.default_rng(0)
    patients = [f"p{i // 3}" for i in range(300)]
    labels = np.zeros((300, 3), dtype=np.float32)
    labels[:, 0] = rng.random(300) < 0.3
    labels[299, 1] = 1  # a rare label: one positive image
    rows = patient_subset(patients, labels, 0.01, seed=0)
    chosen = {patients[r] for r in rows}
    assert set(rows.tolist()) == {i for i, p in enumerate(patients) if p in chosen}
    assert labels[rows, 1].sum() >= 1 and labels[rows, 0].sum() >= 1
    assert len(rows) < 30
    assert np.array_equal(rows, patient_subset(patients, labels, 0.01, seed=0))
    assert len(patient_subset(patients, labels, 1.0, seed=0)) == 300


def test_low_support_labels_are_marked_and_left_out_of_the_supported_macro():
    rng = np.random.default_rng(2)
    labels = (rng.random((100, 3)) < 0.4).astype(np.float32)
    labels[:, 1] = 0
    labels[[3, 50, 77], 1] = 1  # three positives: under a minimum support of 5
    labels[:, 2] = 1
    labels[:4, 2] = 0  # four negatives: under 5 too
    scores = labels + rng.normal(0, 1.0, labels.shape)
    out = multilabel_auroc(labels, scores, ["a", "b", "c"], bootstrap=50, seed=0, min_support=5)
    sk = [roc_auc_score(labels[:, j], scores[:, j]) for j in range(3)]
    assert [out["per_label"][n]["low_support"] for n in "abc"] == [False, True, True]
    assert out["per_label"]["b"]["auroc"] == pytest.approx(sk[1])  # still reported
    assert out["macro_auroc"] == pytest.approx(np.mean(sk))  # the plain macro keeps them
    assert out["macro_auroc_supported"] == pytest.approx(sk[0])
    assert out["min_support"] == 5
    four = multilabel_auroc(labels, scores, ["a", "b", "c"], bootstrap=0, min_support=4)
    assert [four["per_label"][n]["low_support"] for n in "abc"] == [False, True, False]
    assert four["macro_auroc_supported"] == pytest.approx((sk[0] + sk[2]) / 2)


def _table_metrics() -> dict:
    label = {"ci95": [0.61234567, 0.80123], "positives": 40, "negatives": 60}
    return {
        "checkpoint": "c.pt", "data": "d", "split": "test", "images": 100,
        "zeroshot": {
            "per_label": {
                "Cardiomegaly": {**label, "auroc": 0.712345678, "low_support": False},
                "A label name longer than twenty-eight characters": {
                    "auroc": 1.0, "ci95": [None, None], "positives": 2, "negatives": 98,
                    "low_support": True,
                },
            },
            "skipped": {"Hernia": "not annotated in this split"},
            "macro_auroc": 0.85617, "macro_auroc_ci95": [0.7, 0.95],
            "macro_auroc_supported": 0.712345678, "macro_auroc_supported_ci95": [0.61, 0.8],
            "chexpert5_auroc": None, "chexpert5_auroc_ci95": [None, None], "min_support": 5,
        },
        "linear_probe": {
            "mode": "linear", "epochs": 3, "train_split": "train",
            "1%": {"macro_auroc": 0.5, "map": 0.25, "train_images": 9, "train_patients": 3,
                   "target_images": 3, "patients_added_for_labels": 2},
            "10%": {"macro_auroc": 0.6, "map": 0.3, "train_images": 33, "train_patients": 11,
                    "target_images": 30, "patients_added_for_labels": 0},
            "100%": {"macro_auroc": 0.7, "map": 0.00012345, "train_images": 300,
                     "train_patients": 100},
        },
    }  # fmt: skip


def test_table_aligns_the_ci_column_and_rounds_to_four_decimals():
    metrics = _table_metrics()
    table = format_table(metrics).splitlines()
    start = table.index("zero-shot AUROC (95 % bootstrap CI)")
    header, *rows = table[start + 1 : start + 7]
    assert [r.split()[0] for r in rows] == ["Cardiomegaly", "A", "macro", "macro,", "CheXpert"]
    closing = {r.index("]") for r in rows} | {header.index("CI") + 1}
    opening = {r.index("[") for r in rows}
    assert len(closing) == 1 and len(opening) == 1  # the CI column lines up, header included
    assert header.index("AUROC") + 4 == rows[0].index("0.7123") + 5  # right-aligned numbers
    assert "0.7123  [0.6123, 0.8012]" in rows[0] and "0.712345678" not in "\n".join(table)
    assert rows[1].rstrip().endswith("*") and "   n/a]" in rows[1]
    assert "1.2e-04" in "\n".join(table)  # a tiny value keeps its digits
    # metrics.json keeps full precision
    assert clean_metrics(metrics)["zeroshot"]["per_label"]["Cardiomegaly"]["auroc"] == 0.712345678
    notes = "\n".join(table)
    assert "* fewer than 5 positives or negatives" in notes and "macro, supported" in notes
    assert "skipped, not annotated in this split: Hernia" in notes


def test_few_shot_subsets_report_how_they_were_drawn():
    patients = [f"p{i // 3:03d}" for i in range(300)]  # 100 patients of 3 images
    labels = np.zeros((300, 3), dtype=np.float32)
    labels[:, 0] = 1  # every patient has label 0
    labels[298, 1] = 1  # label 1: one patient (p099)
    labels[150, 2] = 1  # label 2: one patient (p050)
    subset = draw_patient_subset(patients, labels, 0.01, seed=0)
    # ceil(1 % of 300) = 3 images: one patient drawn; then p099 and p050 for labels 1 and 2
    assert subset.target_rows == 3 and subset.drawn_patients == 1
    assert subset.added_patients == 2 and len(subset.rows) == 9
    assert {patients[r] for r in subset.rows} >= {"p099", "p050"}
    assert np.array_equal(subset.rows, patient_subset(patients, labels, 0.01, seed=0))
    table = format_table(_table_metrics())
    note = " ".join(table.split("1%: ", 1)[1].split("\n  10%")[0].split())
    assert note == (
        "patients drawn at random (seeded) until at least 3 of the 300 images, then 2 more "
        "patients so that every label with a positive in train has one: 9 images, 3 patients"
    )


# ------------------------------------------------------------------------------- end to end


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return run_module("mgll_train", args, timeout=300)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    from mgll_data.build.engine import BuildOptions, build
    from mgll_data.build.pipeline import load_pipeline
    from mgll_data.demo.nih_release import write_demo_release

    root = tmp_path_factory.mktemp("eval")
    raw = write_demo_release(root / "raw", n=80, seed=5, image_size=96)
    build(
        load_pipeline("chestxray14"), raw, root / "ds", BuildOptions(image_size=64, progress=False)
    )
    fit = _run(
        ["fit", "--train-data", str(root / "ds"), "--max-steps", "3", "--workers", "0",
         "--device", "cpu", "--logs", str(root / "logs"), "--name", "run", "--batch-size", "8",
         "--warmup", "1"]
    )  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-2000:]
    return root / "logs" / "run" / "checkpoints" / "epoch_latest.pt", root / "ds"


def test_eval_end_to_end_is_reproducible(checkpoint, tmp_path):
    ckpt, data = checkpoint
    outs = []
    for name in ("a", "b"):
        result = _run(
            ["eval", "--checkpoint", str(ckpt), "--data", str(data), "--split", "test",
             "--out", str(tmp_path / name), "--workers", "0", "--bootstrap", "100",
             "--probe-epochs", "3"]
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        assert "zero-shot AUROC" in result.stdout and "R@5" in result.stdout
        outs.append(tmp_path / name)
    first = json.loads((outs[0] / "metrics.json").read_text())
    assert first == json.loads((outs[1] / "metrics.json").read_text())
    assert set(first) >= {"zeroshot", "linear_probe", "retrieval"}
    zs = first["zeroshot"]
    assert zs["per_label"] and 0 <= zs["macro_auroc"] <= 1
    assert "Cardiomegaly" in zs["per_label"] or "Cardiomegaly" in zs["skipped"]
    assert set(first["linear_probe"]) >= {"1%", "10%", "100%"}
    assert (
        first["linear_probe"]["100%"]["train_images"] > first["linear_probe"]["1%"]["train_images"]
    )
    rt = first["retrieval"]
    assert set(rt["image_to_text"]) == {"R@1", "R@5", "R@10", "graded_map"}
    assert 0 < rt["chance"]["R@1"] <= rt["chance"]["R@5"] <= rt["chance"]["R@10"] <= 1
    for png in ("roc_curves.png", "auroc_per_label.png"):
        assert (outs[0] / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (outs[0] / "table.txt").read_text().startswith("evaluation of")


@pytest.mark.wires("mgll-train eval", "--finetune")
def test_finetune_runs_end_to_end(checkpoint, tmp_path):
    ckpt, data = checkpoint
    result = _run(
        ["eval", "--checkpoint", str(ckpt), "--data", str(data), "--split", "test",
         "--out", str(tmp_path / "ft"), "--workers", "0", "--tasks", "linear-probe",
         "--finetune", "--probe-epochs", "1"]
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    probe = json.loads((tmp_path / "ft" / "metrics.json").read_text())["linear_probe"]
    assert probe["mode"] == "finetune"
    for subset in ("1%", "10%", "100%"):
        assert 0 <= probe[subset]["macro_auroc"] <= 1


@pytest.mark.wires("mgll-train eval", "--tasks")
def test_eval_rejects_unknown_task(checkpoint, tmp_path, capsys):
    from mgll_train.cli import main

    ckpt, data = checkpoint
    with pytest.raises(SystemExit) as exit_info:
        main(
            ["eval", "--checkpoint", str(ckpt), "--data", str(data), "--tasks", "zeroshot,bogus",
             "--out", str(tmp_path), "--workers", "0"]
        )  # fmt: skip
    assert exit_info.value.code == 2 and "unknown eval tasks" in capsys.readouterr().err
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.wires("mgll-train eval", "--min-support")
def test_min_support_sets_which_labels_are_marked(checkpoint, tmp_path, capsys):
    from mgll_train.cli import main

    ckpt, data = checkpoint
    marked = {}
    for support in ("0", "1000"):
        main(
            ["eval", "--checkpoint", str(ckpt), "--data", str(data), "--tasks", "zeroshot",
             "--out", str(tmp_path / support), "--workers", "0", "--bootstrap", "0",
             "--min-support", support]
        )  # fmt: skip
        zs = json.loads((tmp_path / support / "metrics.json").read_text())["zeroshot"]
        marked[support] = {n for n, r in zs["per_label"].items() if r["low_support"]}
        assert zs["min_support"] == int(support)
    table = capsys.readouterr().out
    assert marked["0"] == set() and marked["1000"] == set(zs["per_label"]) != set()
    assert zs["macro_auroc_supported"] is None and zs["macro_auroc"] is not None
    assert "* fewer than 1000 positives or negatives" in table
