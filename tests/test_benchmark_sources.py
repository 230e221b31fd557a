"""CheXpert (with the 5x200 zero-shot set), VinDr-CXR and ChestX-ray14's Google relabels, built
through the real CLI from fixtures driven by the real annotation files."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest
import yaml

from mgll_data.build.pipeline import load_pipeline
from mgll_data.errors import UserError
from mgll_data.record import read_mgll_metadata
from mgll_data.sources import make_source
from mgll_data.sources.chexpert import select_zero_shot
from mgll_data.sources.vindr_cxr import reader_labels
from mgll_data.vocab import load_vocabulary
from tests.benchmark_fixture import (
    CHEXPERT_LABELS,
    COMPETITION,
    GOOGLE_COLUMNS,
    make_chexpert,
    make_chexpert_5x200,
    make_nih_with_relabels,
    make_vindr,
    read_gz_csv,
    vindr_by_image,
)
from tests.conftest import run_module

VOCAB = load_vocabulary("chest_xray")
# VinDr class -> vocabulary label, written out here from the VinDr-CXR paper's class list.
VINDR_TO_VOCAB = {
    "No finding": "No Finding", "Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly",
    "Consolidation": "Consolidation", "Infiltration": "Infiltration",
    "Lung Opacity": "Lung Opacity", "Nodule/Mass": "Lung Lesion",
    "Pleural effusion": "Pleural Effusion", "Pleural thickening": "Pleural Thickening",
    "Pneumothorax": "Pneumothorax", "Pulmonary fibrosis": "Fibrosis",
}  # fmt: skip
GOOGLE_TO_VOCAB = {
    "Fracture": "Fracture", "Pneumothorax": "Pneumothorax", "Airspace opacity": "Lung Opacity",
    "Nodule or mass": "Lung Lesion",
}  # fmt: skip


def _cli_build(pipeline: str, root: Path, out: Path, *extra: str) -> Path:
    done = run_module(
        "mgll_data",
        ["build", pipeline, "--root", str(root), "--out", str(out), "--image-size", "32",
         "--no-progress", *extra],
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def _rows(out: Path) -> dict[str, dict]:
    rows = []
    for path in sorted((out / "data").glob("*.parquet")):
        rows += pq.read_table(path).to_pylist()
    return {row["id"]: row for row in rows}


def _labels(row: dict) -> dict[str, float]:
    return {n: v for n, v in zip(VOCAB.names, row["labels"], strict=True) if not math.isnan(v)}


def _quarantine(out: Path) -> list[dict]:
    path = out / "_build" / "quarantine.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _pipeline_copy(name: str, tmp: Path, **labels) -> Path:
    raw = yaml.safe_load(load_pipeline(name).path.read_text())
    raw["labels"].update(labels)
    path = tmp / f"{name}-variant.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# --- CheXpert --------------------------------------------------------------------------------


def _fixture_and_build(make, pipeline: str, factory) -> tuple:
    """A release written by `make` in a fresh folder, and its build through the CLI."""
    fixture = make(factory.mktemp(pipeline))
    return fixture, _cli_build(pipeline, fixture.root, factory.mktemp("out") / pipeline)


@pytest.fixture(scope="module")
def chexpert(tmp_path_factory):
    return _fixture_and_build(make_chexpert, "chexpert", tmp_path_factory)


def test_chexpert_labels_splits_and_metadata_match_the_csv(chexpert):
    fixture, out = chexpert
    loaded = datasets.load_dataset(str(out))
    records = [r for split in loaded.values() for r in split]
    good = [
        (row, split)
        for rows, split in ((fixture.train, None), (fixture.valid, "test"))
        for row in rows
        if row["Path"] not in fixture.missing | fixture.bad
    ]
    assert len(records) == len(good)
    # Per label, the count of each value (blank = NaN) equals the CSV's.
    for column in CHEXPERT_LABELS:
        index = VOCAB.names.index(column)
        got = Counter(
            "nan" if math.isnan(r["labels"][index]) else r["labels"][index] for r in records
        )
        want = Counter(float(row[column]) if row[column] else "nan" for row, _ in good)
        assert got == want, column
    by_id = _rows(out)
    for row, split in good:
        patient, study, view = row["Path"].split("/")[2:]
        record = by_id[f"chexpert:{patient}_{study}_{view.removesuffix('.jpg')}"]
        assert record["patient_id"] == patient
        assert record["sex"] == {"Male": "M", "Female": "F"}[row["Sex"]]
        assert record["age_years"] == float(row["Age"])
        assert record["view"] == (row["AP/PA"] or "LATERAL")
        if split == "test":
            assert record["split"] == "test"  # valid.csv is the test split
        else:
            assert record["split"] in ("train", "validation")
    patients = {(r["patient_id"], r["split"]) for r in by_id.values()}
    assert len({p for p, _ in patients}) == len(patients)  # no patient in two splits
    metadata = read_mgll_metadata(sorted((out / "data").glob("*.parquet"))[0])
    assert sorted(metadata["annotated_labels"]) == sorted(CHEXPERT_LABELS)


def test_chexpert_quarantines_a_missing_image_and_an_unreadable_label(chexpert):
    _, out = chexpert
    reasons = sorted((q["stage"], q["reason"]) for q in _quarantine(out))
    assert len(reasons) == 2
    assert reasons[0][0] == "image"
    assert reasons[1] == ("labels", "Edema is '2.0' (expected 1.0, 0.0, -1.0 or blank)")


def test_chexpert_zero_shot_exclude_leaves_out_exactly_the_set(chexpert, tmp_path):
    fixture, _ = chexpert
    labels = ["Atelectasis", "Edema", "Pleural Effusion"]  # those with candidates in the fixture
    path = _pipeline_copy(
        "chexpert",
        tmp_path,
        zero_shot_labels=labels,
        zero_shot_per_label=1,
        zero_shot_mode="exclude",
    )
    scan = make_source(load_pipeline(str(path)), fixture.root, VOCAB).scan()
    kept = {item.extra["chexpert_path"] for item in scan.items}
    # Neither an item nor quarantined (the bad row is quarantined at scan): left out.
    left_out = {r["Path"] for r in fixture.train} - kept - fixture.bad
    for label in labels:
        candidates = {r["Path"] for r in fixture.train if _is_candidate(r, label, False, labels)}
        assert len(left_out & candidates) == 1, label  # one image drawn per label
    assert len(left_out) == 3
    assert {r["Path"] for r in fixture.valid} <= kept
    assert "3 zero-shot set images left out" in " ".join(scan.notes)


def test_chexpert_without_valid_csv_names_what_it_expected(tmp_path):
    (tmp_path / "train.csv").write_text("Path,Sex\n")
    source = make_source(load_pipeline("chexpert"), tmp_path, VOCAB)
    with pytest.raises(UserError, match="not a CheXpert release; expected train.csv and valid.csv"):
        source.scan()


# --- the 5x200 zero-shot set -----------------------------------------------------------------


@pytest.fixture(scope="module")
def chexpert_rows():
    return read_gz_csv("chexpert_train.csv.gz")[1]


def _is_candidate(row: dict[str, str], label: str, strict: bool, among=COMPETITION) -> bool:
    """GLoRIA's rule, written out: frontal, 1.0 in `label`, not 1.0 in the other four."""
    if row["Frontal/Lateral"] != "Frontal" or row[label] != "1.0":
        return False
    others = [row[c] for c in among if c != label]
    allowed = ("", "0.0") if strict else ("", "0.0", "-1.0")
    return all(value in allowed for value in others)


@pytest.mark.parametrize("others", ["not_positive", "negative_or_blank"])
def test_5x200_rule_on_the_whole_real_train_csv(chexpert_rows, others):
    strict = others == "negative_or_blank"
    chosen = select_zero_shot(chexpert_rows, COMPETITION, 200, 0, others)
    assert list(chosen) == list(COMPETITION)
    paths = [row["Path"] for rows in chosen.values() for row in rows]
    assert len(paths) == len(set(paths)) == 1000  # 200 per label, no image twice
    for label, rows in chosen.items():
        assert len(rows) == 200
        assert all(_is_candidate(row, label, strict) for row in rows), label
    # With no cap, the selection is exactly the candidates the rule admits.
    everything = select_zero_shot(chexpert_rows, COMPETITION, 10**9, 0, others)
    for label in COMPETITION:
        want = [r["Path"] for r in chexpert_rows if _is_candidate(r, label, strict)]
        assert {r["Path"] for r in everything[label]} == set(want)
        # a draw, not the first rows of the file
        assert {r["Path"] for r in chosen[label]} != set(want[:200])


def test_5x200_draw_is_fixed_by_the_seed(chexpert_rows):
    again = select_zero_shot(list(reversed(chexpert_rows)), COMPETITION, 200, 0)
    first = select_zero_shot(chexpert_rows, COMPETITION, 200, 0)
    other = select_zero_shot(chexpert_rows, COMPETITION, 200, 1)
    paths = {label: [r["Path"] for r in rows] for label, rows in first.items()}
    assert {label: [r["Path"] for r in rows] for label, rows in again.items()} == paths
    assert {label: [r["Path"] for r in rows] for label, rows in other.items()} != paths


def test_5x200_pipeline_builds_the_selected_images(chexpert_rows, tmp_path):
    chosen = select_zero_shot(chexpert_rows, COMPETITION, 200, 0)
    with_images = {label: rows[:8] for label, rows in chosen.items()}
    paths = [row["Path"] for rows in with_images.values() for row in rows]
    release = make_chexpert_5x200(tmp_path / "raw", paths)
    out = _cli_build("chexpert_5x200", release, tmp_path / "out")
    records = _rows(out)
    assert len(records) == 40
    assert len(_quarantine(out)) == 960  # the rest of the 1,000 have no image here
    for label, rows in with_images.items():
        for row in rows:
            patient, study, view = row["Path"].split("/")[2:]
            record = records[f"chexpert_5x200:{patient}_{study}_{view.removesuffix('.jpg')}"]
            assert record["split"] == "test" and record["view"] in ("AP", "PA")
            assert json.loads(record["extra"])["zero_shot_label"] == label
            five = {c: _labels(record).get(c) for c in COMPETITION}
            assert [c for c, v in five.items() if v == 1.0] == [label]


# --- VinDr-CXR -------------------------------------------------------------------------------


def _consensus(classes_by_reader: dict[str, set[str]], policy: str) -> dict[str, float]:
    """Each label's value from the readers' marks, counted here without the source's code."""
    labels = {}
    marks = [{VINDR_TO_VOCAB.get(c) for c in cs} for cs in classes_by_reader.values()]
    for target in set(VINDR_TO_VOCAB.values()):
        yes, n = sum(target in m for m in marks), len(marks)
        if policy == "any":
            labels[target] = 1.0 if yes else 0.0
        elif policy == "unanimous":
            labels[target] = 1.0 if yes == n else 0.0 if yes == 0 else -1.0
        else:
            labels[target] = 1.0 if 2 * yes > n else 0.0 if 2 * (n - yes) > n else -1.0
    return labels


def _classes(rows: list[dict[str, str]]) -> dict[str, set[str]]:
    readers: dict[str, set[str]] = {}
    for row in rows:
        readers.setdefault(row.get("rad_id") or "consensus", set()).add(row["class_name"])
    return readers


@pytest.mark.parametrize("policy", ["majority", "unanimous", "any"])
def test_vindr_consensus_on_every_real_image(policy):
    by_image = vindr_by_image(read_gz_csv("vinbigdata-train.csv.gz")[1])
    assert len(by_image) == 15000
    for image_id, rows in by_image.items():
        readers = _classes(rows)
        assert reader_labels(readers, VINDR_TO_VOCAB, policy) == _consensus(readers, policy), (
            image_id
        )


@pytest.fixture(scope="module")
def vindr(tmp_path_factory):
    return _fixture_and_build(make_vindr, "vindr_cxr", tmp_path_factory)


def test_vindr_records_labels_readers_and_boxes(vindr):
    fixture, out = vindr
    assert len(datasets.load_dataset(str(out))["test"]) == 2
    records = _rows(out)
    train_rows = vindr_by_image(fixture.train)
    test_rows = vindr_by_image(fixture.test)
    assert set(records) == {f"vindr_cxr:{i}" for i in fixture.sizes}
    counts: Counter[str] = Counter()
    for image_id, (cols, rws) in fixture.sizes.items():
        record = records[f"vindr_cxr:{image_id}"]
        rows = train_rows.get(image_id) or test_rows[image_id]
        readers = _classes(rows)
        want = _consensus(readers, "majority")
        assert _labels(record) == want, image_id
        counts.update(label for label, value in want.items() if value == 1.0)
        extra = json.loads(record["extra"])
        assert extra["readers"] == {r: sorted(c) for r, c in readers.items()}
        want_splits = ("test",) if image_id in test_rows else ("train", "validation")
        assert record["split"] in want_splits
        boxed = [r for r in rows if r["x_min"]]
        assert len(extra.get("boxes", [])) == len(boxed)
        scale_x, scale_y = record["width"] / cols, record["height"] / rws
        got = sorted(
            (reader, b["label"], b["x"], b["y"], b["w"], b["h"])
            for reader, b in zip(extra.get("box_readers", []), extra.get("boxes", []), strict=True)
        )
        expected = sorted(
            (
                r.get("rad_id", "consensus"),
                VINDR_TO_VOCAB.get(r["class_name"], r["class_name"]),
                round(float(r["x_min"]) * scale_x, 2),
                round(float(r["y_min"]) * scale_y, 2),
                round((float(r["x_max"]) - float(r["x_min"])) * scale_x, 2),
                round((float(r["y_max"]) - float(r["y_min"])) * scale_y, 2),
            )
            for r in boxed
        )
        assert [g[:2] for g in got] == [e[:2] for e in expected]
        for g, e in zip(got, expected, strict=True):
            assert g[2:] == pytest.approx(e[2:], abs=0.011)  # both sides round to 2 decimals
    assert counts  # the fixture holds positives
    quarantined = _quarantine(out)
    assert [q["id"] for q in quarantined] == [f"vindr_cxr:{fixture.missing}"]


@pytest.mark.parametrize("policy", ["unanimous", "any"])
def test_vindr_reader_policy_from_the_pipeline(vindr, tmp_path, policy):
    fixture, _ = vindr
    pipeline = load_pipeline(str(_pipeline_copy("vindr_cxr", tmp_path, reader_policy=policy)))
    scan = make_source(pipeline, fixture.root, VOCAB).scan()
    by_image = vindr_by_image(fixture.train + fixture.test)
    differs = 0
    for item in scan.items:
        readers = _classes(by_image[item.id.split(":", 1)[1]])
        assert item.labels == _consensus(readers, policy)
        differs += item.labels != _consensus(readers, "majority")
        assert item.extra["reader_policy"] == policy
    assert differs  # the fixture's disagreements make the policies differ


# --- ChestX-ray14 with the Google relabels ----------------------------------------------------


@pytest.fixture(scope="module")
def google(tmp_path_factory):
    fixture = make_nih_with_relabels(tmp_path_factory.mktemp("nih-google"))
    outs = tmp_path_factory.mktemp("out")
    default = _cli_build("chestxray14", fixture.root, outs / "default")
    relabelled = _cli_build("chestxray14", fixture.root, outs / "google", "--labels", "google")
    return fixture, default, relabelled


@pytest.mark.wires("mgll-build-dataset build", "--labels")
def test_google_relabels_replace_exactly_the_four_labels(google):
    fixture, default, relabelled = google
    before, after = _rows(default), _rows(relabelled)
    assert set(before) == set(after) == {f"chestxray14:{r['index'][:-4]}" for r in fixture.rows}
    changed = 0
    for item_id, record in after.items():
        name = item_id.split(":", 1)[1] + ".png"
        old, new = _labels(before[item_id]), _labels(record)
        extra = json.loads(record["extra"])
        relabel = fixture.relabels.get(name)
        if relabel is None:
            assert new == old and "relabelled" not in extra
            continue
        want = {GOOGLE_TO_VOCAB[c]: {"YES": 1.0, "NO": 0.0}[relabel[c]] for c in GOOGLE_COLUMNS}
        assert {k: new[k] for k in want} == want
        assert {k: v for k, v in new.items() if k not in want} == {
            k: v for k, v in old.items() if k not in want
        }
        assert extra["relabelled"] == sorted(want)
        assert extra["nih_labels"] == {"Pneumothorax": old["Pneumothorax"]}
        changed += new != old
    assert changed  # some relabels disagree with NIH or add labels NIH does not annotate
    annotated = read_mgll_metadata(sorted((relabelled / "data").glob("*.parquet"))[0])
    assert {"Fracture", "Lung Opacity", "Lung Lesion"} <= set(annotated["annotated_labels"])
    plain = read_mgll_metadata(sorted((default / "data").glob("*.parquet"))[0])
    assert "Fracture" not in plain["annotated_labels"]


def test_default_build_ignores_the_relabel_file(google, tmp_path):
    fixture, default, _ = google
    bare = tmp_path / "raw"
    for path in fixture.root.rglob("*"):
        if path.is_file() and not path.name.startswith("google2019"):
            target = bare / path.relative_to(fixture.root)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    again = _cli_build("chestxray14", bare, tmp_path / "out")
    shards = sorted(p.relative_to(default) for p in (default / "data").glob("*.parquet"))
    assert shards == sorted(p.relative_to(again) for p in (again / "data").glob("*.parquet"))
    for shard in shards:
        assert (default / shard).read_bytes() == (again / shard).read_bytes()
    source = make_source(load_pipeline("chestxray14"), bare, VOCAB, {"labels": "google"})
    with pytest.raises(UserError, match="google2019_nih-chest-xray-labels.csv"):
        source.scan()


def test_google_unrelabelled_drop_leaves_out_images_without_a_relabel(google, tmp_path):
    fixture, _, _ = google
    path = _pipeline_copy("chestxray14", tmp_path, unrelabelled="drop")
    scan = make_source(load_pipeline(str(path)), fixture.root, VOCAB, {"labels": "google"}).scan()
    names = {item.id.split(":", 1)[1] + ".png" for item in scan.items}
    assert names == {r["index"] for r in fixture.rows if r["index"] in fixture.relabels}
    assert len(names) < len(fixture.rows)
