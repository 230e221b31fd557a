"""`mgll-train eval --protocol` and `--suite chest`: named benchmark protocols on real layouts.

Tiny CheXpert, CheXpert 5x200, RSNA Pneumonia and COVIDx builds come from the fixture releases
(real annotation rows where the release has them, generated images); one random-init
`mgll-tiny` checkpoint is evaluated.
Expected values are counted from what the fixtures wrote (CSV cells, chosen rows) or worked by
hand, never by the code under test.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gzip
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from mgll_data.build.engine import BuildOptions, build
from mgll_data.build.pipeline import load_pipeline
from mgll_data.sources.chexpert import select_zero_shot
from mgll_train.checkpoint import save_checkpoint
from mgll_train.cli import main
from mgll_train.data.labels import PerLabelPolicy, apply_label_policy
from mgll_train.evaluate.cli import load_model_from_checkpoint
from mgll_train.evaluate.flags import add_eval_arguments, eval_defaults
from mgll_train.evaluate.metrics import multiclass_metrics, single_class
from mgll_train.evaluate.protocols import CHEXPERT_COMPETITION, PROTOCOLS
from mgll_train.evaluate.suite import protocol_args
from mgll_train.evaluate.zeroshot import (
    multiclass_zeroshot_scores,
    prompt_embeddings,
    vocabulary_prompts,
)
from mgll_train.model import create_model
from tests.benchmark_fixture import (
    COMPETITION,
    make_chexpert,
    make_chexpert_5x200,
)
from tests.nih_fixture import xrv_data_file
from tests.segmentation_fixture import make_rsna
from tests.test_covidx import _three_class, make_two_class

PER_5X200_LABEL = 3  # images per class in the tiny 5x200 build
# Where each protocol's numbers sit in its metrics.json.
BLOCKS = {
    "chexpert-probe": "linear_probe",
    "chexpert-finetune": "linear_probe",
    "chexpert-5x200-zeroshot": "zeroshot_multiclass",
    "rsna-probe": "linear_probe",
    "covidx-probe": "linear_probe_multiclass",
    "siim-segmentation": "segmentation",
    "rsna-segmentation": "segmentation",
}
QUICK = ["--workers", "0", "--bootstrap", "40", "--probe-epochs", "2", "--no-progress"]

# The competition labels of the 8 valid.csv rows, planted so that the per-label uncertain
# policy decides what the probe can score: with MGCA's policy (U-ones for Atelectasis and
# Pleural Effusion, U-zeros for Cardiomegaly) Atelectasis and Pleural Effusion get their only
# positives from -1, and Cardiomegaly loses its only positives to 0.
PLANTED = {
    "Atelectasis": ["-1.0", "-1.0", "0.0", "0.0", "0.0", "0.0", "0.0", "0.0"],
    "Cardiomegaly": ["-1.0", "0.0", "-1.0", "0.0", "0.0", "0.0", "0.0", "0.0"],
    "Consolidation": ["0.0", "0.0", "0.0", "1.0", "-1.0", "0.0", "0.0", "0.0"],
    "Edema": ["0.0", "1.0", "1.0", "0.0", "0.0", "0.0", "0.0", "0.0"],
    "Pleural Effusion": ["0.0", "0.0", "0.0", "0.0", "0.0", "0.0", "-1.0", "0.0"],
}
# Labels with both classes in the test split under that policy, by hand from PLANTED.
SCORED_UNDER_MGCA = ["Consolidation", "Edema", "Atelectasis", "Pleural Effusion"]


@dataclass
class Builds:
    root: Path
    builds: Path  # a folder of builds named unlike their pipelines
    checkpoint: Path
    chexpert: Path
    five: Path
    rsna: Path
    two_class: Path  # a COVIDx CXR-2 build: positive / negative only


def _build(pipeline: str | Path, raw: Path, out: Path) -> Path:
    build(load_pipeline(pipeline), raw, out, BuildOptions(image_size=32, progress=False))
    return out


def _small_5x200(folder: Path) -> Path:
    """pipelines/chexpert_5x200.yaml drawing PER_5X200_LABEL images per label, not 200."""
    raw = yaml.safe_load(load_pipeline("chexpert_5x200").path.read_text())
    raw["labels"]["zero_shot_per_label"] = PER_5X200_LABEL
    path = folder / "chexpert_5x200.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _plant_valid(release: Path) -> None:
    """Rewrite valid.csv with the PLANTED competition labels (other cells as written)."""
    path = release / "valid.csv"
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header, rows = list(reader.fieldnames or []), list(reader)
    for i, row in enumerate(rows):
        for label, values in PLANTED.items():
            row[label] = values[i]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, header, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _first_rows(count: int) -> list[dict[str, str]]:
    """The first rows of the real CheXpert train.csv (the whole file takes seconds to read)."""
    with gzip.open(xrv_data_file("chexpert_train.csv.gz"), "rt", newline="") as f:
        return list(itertools.islice(csv.DictReader(f), count))


def _keep_rows(path: Path, rows: list[dict[str, str]]) -> None:
    """Cut the copied real train.csv.gz down to `rows`, so the build reads 15 rows, not 223k."""
    with gzip.open(path, "rt", newline="") as f:
        header = next(csv.reader(f))
    with gzip.open(path, "wt", newline="") as f:
        writer = csv.DictWriter(f, header, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> Builds:
    root = tmp_path_factory.mktemp("protocols")
    folder = root / "builds"
    fixture = make_chexpert(root / "chexpert-raw", train_count=30, valid_count=8)
    _plant_valid(fixture.root / "CheXpert-v1.0-small")
    chexpert = _build("chexpert", fixture.root, folder / "a")
    picked = select_zero_shot(_first_rows(5000), COMPETITION, PER_5X200_LABEL, 0)
    release = make_chexpert_5x200(
        root / "five-raw", [r["Path"] for found in picked.values() for r in found]
    )
    _keep_rows(release / "train.csv.gz", [r for found in picked.values() for r in found])
    five = _build(_small_5x200(root), release, folder / "b")
    rsna_raw, _ = make_rsna(root / "rsna-raw")
    rsna = _build("rsna_pneumonia", rsna_raw, folder / "c")
    covidx_raw, covidx_pipeline = _three_class(root / "covidx" / "raw", 0.1)
    _build(covidx_pipeline, covidx_raw, folder / "d")
    two_class = _build("covidx", make_two_class(root / "covidx-2" / "raw"), root / "two-class")
    torch.manual_seed(0)  # a random-init mgll-tiny, saved as fit saves its checkpoints
    model = create_model("mgll-tiny", None, weights_follow=True).model
    checkpoint = root / "tiny.pt"
    state = {"model_name": "mgll-tiny", "state_dict": model.state_dict(), "epoch": 0, "step": 0}
    save_checkpoint(checkpoint, state)
    return Builds(root, folder, checkpoint, chexpert, five, rsna, two_class)


def _eval(builds: Builds, out: Path, *flags: str) -> dict[str, Any]:
    main(["eval", "--checkpoint", str(builds.checkpoint), "--out", str(out), *QUICK, *flags])
    return json.loads((out / "metrics.json").read_text())


# ------------------------------------------------------------------------------ per-label policy


def test_per_label_policy_sets_each_uncertain_label_and_drops_the_others():
    names = ["Atelectasis", "Cardiomegaly", "Support Devices", "Edema"]
    policy = PerLabelPolicy.for_names(
        names, {"Atelectasis": "positive", "Cardiomegaly": "negative"}, "ignore",
        ["Atelectasis", "Cardiomegaly", "Edema"],
    )  # fmt: skip
    stored = np.array([[-1.0, -1.0, 1.0, -1.0], [np.nan, 1.0, 0.0, np.nan]], dtype=np.float32)
    annotated = np.array([True, True, True, False])
    got = np.stack([apply_label_policy(row, annotated, policy, "negative") for row in stored])
    want = np.array([[1.0, 0.0, np.nan, np.nan], [0.0, 1.0, np.nan, np.nan]])
    np.testing.assert_array_equal(got, want)
    # The global policy is unchanged: every -1 the same way, every label kept.
    plain = apply_label_policy(stored[0], annotated, "positive", "negative")
    np.testing.assert_array_equal(plain, [1.0, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="2 labels"):
        apply_label_policy(stored[0], annotated, PerLabelPolicy.for_names(names[:2], {}), "ignore")


# ---------------------------------------------------------------------------- multi-class metrics


def test_multiclass_accuracy_and_macro_f1_by_hand():
    truth = np.array([0, 0, 1, 1, 2, 2, 3, 4])
    predicted = np.array([0, 1, 1, 1, 2, 0, 4, 4])
    out = multiclass_metrics(truth, predicted, ["a", "b", "c", "d", "e"], bootstrap=200)
    assert out["accuracy"] == pytest.approx(5 / 8)
    # per class 2TP / (2TP + FP + FN): a 2/4, b 4/5, c 2/3, d 0/1 -> 0, e 2/3
    f1 = [2 / 4, 4 / 5, 2 / 3, 0.0, 2 / 3]
    assert out["macro_f1"] == pytest.approx(sum(f1) / 5)
    assert [out["per_class"][c]["f1"] for c in "abcde"] == pytest.approx(f1)
    lo, hi = out["accuracy_ci95"]
    assert 0 <= lo < 5 / 8 < hi <= 1  # resamples vary; the point estimate is inside
    assert single_class(
        np.array([[1, 0, np.nan], [1, 1, 1], [0, 1, -1], [0, np.nan, 1]]), ["x", "y", "z"],
        ["z", "x"],
    ).tolist() == [1, -1, -1, 0]  # fmt: skip


def test_5x200_zeroshot_counts_each_class_and_scores_all(builds, tmp_path):
    metrics = _eval(builds, tmp_path, "--protocol", "chexpert-5x200-zeroshot", "--data",
                    str(builds.five))  # fmt: skip
    block = metrics["zeroshot_multiclass"]
    assert metrics["protocol"]["name"] == "chexpert-5x200-zeroshot"
    assert block["left_out"] == 0 and block["images"] == 5 * PER_5X200_LABEL
    for label in COMPETITION:
        assert block["per_class"][label]["images"] == PER_5X200_LABEL
    # accuracy is a count of the 15 images; macro F1 the mean of five F1s
    assert block["accuracy"] * block["images"] == pytest.approx(round(block["accuracy"] * 15))
    f1 = [block["per_class"][c]["f1"] for c in COMPETITION]
    assert block["macro_f1"] == pytest.approx(np.mean(f1))


def test_multiclass_zeroshot_picks_the_class_whose_prompts_an_image_matches(builds):
    """An image feature equal to (a multiple of) a class's prompt ensemble has cosine 1 with
    that class: it must be assigned that class, whatever order the classes are given in."""
    bundle, _ = load_model_from_checkpoint(builds.checkpoint, torch.device("cpu"))
    prompts = vocabulary_prompts("chest_xray")
    cpu = torch.device("cpu")
    ensembles = [
        prompt_embeddings(bundle.model, bundle.tokenizer, prompts[c][0], cpu) for c in COMPETITION
    ]
    images = 3.0 * torch.stack(ensembles).numpy()  # unnormalised, as extracted features are
    order = list(reversed(COMPETITION))
    scores = multiclass_zeroshot_scores(bundle.model, bundle.tokenizer, images, order, prompts, cpu)
    assert scores.argmax(axis=1).tolist() == [order.index(c) for c in COMPETITION]
    assert scores.max(axis=1) == pytest.approx(np.ones(5), abs=1e-5)


# --------------------------------------------------------------------------------- --protocol


@pytest.mark.wires("mgll-train eval", "--protocol")
def test_chexpert_probe_applies_mgca_uncertain_policy_and_names_itself(builds, tmp_path):
    metrics = _eval(builds, tmp_path, "--protocol", "chexpert-probe", "--data",
                    str(builds.chexpert))  # fmt: skip
    protocol = metrics["protocol"]
    assert (protocol["name"], protocol["version"]) == ("chexpert-probe", 1)
    assert protocol["overrides"] == {"probe_epochs": 2}
    assert metrics["split"] == "test" and metrics["images"] == 8
    probe = metrics["linear_probe"]
    assert probe["mode"] == "linear" and probe["train_split"] == "train"
    names = load_names(builds.chexpert)
    want = [n for n in names if n in SCORED_UNDER_MGCA]
    for subset in ("1%", "10%", "100%"):
        assert probe[subset]["labels"] == want
        assert probe[subset]["macro_auroc_ci95"][0] is not None
    table = (tmp_path / "table.txt").read_text()
    assert table.startswith("protocol chexpert-probe v1 on ")
    assert "overridden (not the protocol's setup): probe-epochs 2" in table


def load_names(data: Path) -> list[str]:
    shard = sorted((data / "data").glob("*.parquet"))[0]
    return json.loads(pq.read_schema(shard).metadata[b"mgll"])["label_names"]


def test_global_uncertain_flag_is_unchanged_and_differs_from_the_protocol(builds, tmp_path):
    """Without --protocol, --uncertain positive turns every -1 into 1: Cardiomegaly then has
    positives and is scored, which the protocol's U-zeros prevents."""
    metrics = _eval(builds, tmp_path, "--data", str(builds.chexpert), "--tasks", "linear-probe",
                    "--uncertain", "positive", "--unmentioned", "negative",
                    "--train-data", str(builds.chexpert))  # fmt: skip
    assert "Cardiomegaly" in metrics["linear_probe"]["100%"]["labels"]
    assert "protocol" not in metrics


def test_a_flag_the_protocol_fixes_is_a_one_line_error(builds, tmp_path, capsys):
    for flags, flag in [(["--uncertain", "positive"], "--uncertain"), (["--split", "train"],
                        "--split"), (["--finetune"], "--finetune")]:  # fmt: skip
        with pytest.raises(SystemExit) as exc:
            _eval(builds, tmp_path, "--protocol", "chexpert-probe", "--data",
                  str(builds.chexpert), *flags)  # fmt: skip
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and flag in err and "chexpert-probe v1" in err


def test_a_fixed_flag_given_at_its_default_value_is_still_a_conflict(builds, tmp_path, capsys):
    """Each flag below is given the value it has when left out, which is not what the protocol
    runs (its per-label uncertain policy, unmentioned as negative, its one task): refused."""
    for flags in [["--uncertain", "ignore"], ["--unmentioned", "ignore"],
                  ["--tasks", "zeroshot,linear-probe,retrieval"]]:  # fmt: skip
        with pytest.raises(SystemExit) as exc:
            _eval(builds, tmp_path, "--protocol", "chexpert-probe", "--data",
                  str(builds.chexpert), *flags)  # fmt: skip
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        assert f"{' '.join(flags)} conflicts with protocol chexpert-probe v1" in err
    assert not (tmp_path / "metrics.json").exists()


def test_a_budget_flag_given_at_its_default_value_wins_and_is_an_override_if_it_differs():
    """A protocol whose budget differs from the flags' defaults: a flag given at its default
    value still wins over the protocol's (and is an override); one equal to the protocol's is
    no override; one not given takes the protocol's."""
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    budget = (("probe_epochs", 7), ("probe_lr", 0.001), ("finetune_lr", 0.5))
    protocol = dataclasses.replace(PROTOCOLS["chexpert-probe"], defaults=budget)
    args = parser.parse_args(["--checkpoint", "c.pt", "--out", "o", "--probe-epochs", "50",
                              "--probe-lr", "0.001"])  # fmt: skip
    assert eval_defaults()["probe_epochs"] == 50  # the flag's own default
    run, overrides = protocol_args(protocol, args, list(CHEXPERT_COMPETITION))
    assert (run.probe_epochs, run.probe_lr, run.finetune_lr) == (50, 0.001, 0.5)
    assert overrides == {"probe_epochs": 50}


def test_a_build_of_another_release_is_refused(builds, tmp_path, capsys):
    with pytest.raises(SystemExit):
        _eval(builds, tmp_path, "--protocol", "chexpert-probe", "--data", str(builds.rsna))
    err = capsys.readouterr().err
    assert "a build of rsna_pneumonia" in err and "needs a build of chexpert" in err


def test_a_two_class_covidx_build_is_refused_by_the_three_class_protocol(builds, tmp_path, capsys):
    with pytest.raises(SystemExit):
        _eval(builds, tmp_path, "--protocol", "covidx-probe", "--data", str(builds.two_class))
    err = capsys.readouterr().err
    # one line naming the classes a two-class release lacks
    assert len(err.strip().splitlines()) == 1
    assert "No Finding, Pneumonia" in err and "covidx-probe v1" in err


# ------------------------------------------------------------------------------------- --suite


@pytest.mark.wires("mgll-train eval", "--suite", "--builds")
def test_suite_runs_what_is_built_and_tables_equal_the_protocol_metrics(builds, tmp_path):
    out = tmp_path / "suite"
    main(["eval", "--checkpoint", str(builds.checkpoint), "--out", str(out), *QUICK,
          "--suite", "chest", "--builds", str(builds.builds), "--seg-epochs", "1"])  # fmt: skip
    summary = json.loads((out / "suite.json").read_text())
    ran = [p["name"] for p in summary["protocols"]]
    # SIIM-ACR is not built: skipped, saying so; the others ran (folders a-d, any names)
    assert summary["skipped"] == {
        "siim-segmentation": f"no build of siim_acr under {builds.builds}"
    }
    assert sorted(ran) == sorted(set(PROTOCOLS) - {"siim-segmentation"})
    covidx = json.loads((out / "covidx-probe" / "metrics.json").read_text())
    probe = covidx["linear_probe_multiclass"]
    assert covidx["images"] == 6 and probe["test_left_out"] == 0  # 2 test images per class
    for subset in ("1%", "10%", "100%"):
        assert probe[subset]["accuracy"] * 6 == pytest.approx(round(probe[subset]["accuracy"] * 6))
    md = (out / "suite.md").read_text()
    tex = (out / "suite.tex").read_text()
    for entry in summary["protocols"]:
        metrics = json.loads((out / entry["name"] / "metrics.json").read_text())
        assert metrics["protocol"]["name"] == entry["name"]
        for r in entry["results"]:
            block = metrics[BLOCKS[entry["name"]]]
            source = block if r["setting"] == "zero-shot" else block[r["setting"]]
            assert r["value"] == source[r["metric"]]
            if r["value"] is not None:
                lo, hi = r["ci95"]
                cell = f"{r['value']:.4f} [{lo:.4f}, {hi:.4f}]"
                assert cell in md
                assert f"{r['value']:.4f} {{\\scriptsize [{lo:.4f}, {hi:.4f}]}}" in tex
    assert "siim-segmentation: skipped, no build of siim_acr" in md
    assert "\\begin{tabular}" in tex and "chexpert-5x200-zeroshot v1" in tex
