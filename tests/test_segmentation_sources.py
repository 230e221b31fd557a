"""Segmentation-ready builds: the optional `mask` column, SIIM-ACR and RSNA Pneumonia sources.

The annotation files are the real ones (torchxrayvision ships them); the DICOMs are generated,
small, and named as the CSVs say. Builds run through the real CLI.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import datasets
import numpy as np
import open_clip
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mgll_data.build.engine import BuildOptions, build
from mgll_data.build.items import ImageRef, RawItem
from mgll_data.build.pipeline import load_pipeline
from mgll_data.build.stages import BuildContext, mask_column
from mgll_data.demo.nih_release import write_demo_release
from mgll_data.errors import ItemError, UserError
from mgll_data.imaging.masks import MaskSpec, parse_siim_rle, rasterise, render_mask
from mgll_data.imaging.raster import EncodedImage, ImagePolicy
from mgll_data.publish.inspect import validate_dataset
from mgll_data.publish.merge import merge
from mgll_data.record import read_mgll_metadata
from mgll_data.schema import record_schema, validate_row
from mgll_data.sources.rsna_pneumonia import RsnaPneumoniaSource
from mgll_data.vocab import load_vocabulary
from mgll_train.data import SampleTransform, collate, make_dataset
from mgll_train.data.tokenizer import TextTokenizer
from tests.conftest import run_module
from tests.segmentation_fixture import make_rsna, make_siim, rsna_rows, siim_rows

VOCAB = load_vocabulary("chest_xray")
FRAME = 1024
STORED = 64  # --image-size: the 128 px DICOMs and the 1024 px frame both become 64 px
STEP = FRAME // STORED  # stored pixel i samples frame pixel STEP * i + STEP // 2


def independent_siim(codes: list[str]) -> np.ndarray:
    """SIIM's code decoded another way: absolute starts by cumulative sums, then (row, column)
    coordinates from the column-major position, set by fancy indexing."""
    mask = np.zeros((FRAME, FRAME), bool)
    for code in codes:
        if code.strip() == "-1":
            continue
        values = np.array(code.split(), dtype=np.int64)
        offsets, lengths = values[0::2], values[1::2]
        starts = np.cumsum(offsets) + np.cumsum(lengths) - lengths
        positions = np.concatenate(
            [np.arange(s, s + n) for s, n in zip(starts, lengths, strict=True)]
        )
        columns, rows = np.divmod(positions, FRAME)
        mask[rows, columns] = True
    return mask


def _build_cli(pipeline: str, root: Path, out: Path) -> Path:
    done = run_module(
        "mgll_data",
        ["build", pipeline, "--root", str(root), "--out", str(out), "--image-size", str(STORED)],
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return out


def _rows(out: Path) -> list[dict]:
    return [
        r for p in sorted((out / "data").glob("*.parquet")) for r in pq.read_table(p).to_pylist()
    ]


def _built_and_planted(out: Path, planted: dict, bad: str) -> tuple[dict, dict]:
    """The built rows and the planted CSV rows by native id; exactly the readable ones built."""
    built = {r["id"].split(":", 1)[1]: r for r in _rows(out)}
    dropped = (planted["missing"], planted[bad])
    good = {k: v for k, v in planted["rows"].items() if k not in dropped}
    assert sorted(built) == sorted(good)
    return built, good


def _quarantine(out: Path) -> dict[str, dict]:
    lines = (out / "_build/quarantine.jsonl").read_text().splitlines()
    return {q["id"]: q for q in map(json.loads, lines)}


def _png(image: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image["bytes"])))


def _value(row: dict, label: str) -> float:
    return row["labels"][VOCAB.names.index(label)]


def _line_of(path: Path, text: str) -> int:
    """The 1-based line of `path` that holds `text`."""
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if text in line)


@pytest.fixture(scope="module")
def siim(tmp_path_factory):
    root, planted = make_siim(tmp_path_factory.mktemp("siim") / "raw")
    return root, planted, _build_cli("siim_acr", root, tmp_path_factory.mktemp("out") / "siim")


@pytest.fixture(scope="module")
def rsna(tmp_path_factory):
    root, planted = make_rsna(tmp_path_factory.mktemp("rsna") / "raw")
    return (
        root,
        planted,
        _build_cli("rsna_pneumonia", root, tmp_path_factory.mktemp("out") / "rsna"),
    )


# --- the SIIM run-length code -------------------------------------------------------------------


def test_every_real_siim_row_decodes_like_an_independent_decoder():
    rows = siim_rows()
    assert len(rows) == 12954
    positives = 0
    for image_id, code in rows:
        runs = parse_siim_rle(code, (FRAME, FRAME))
        if code.strip() == "-1":
            assert runs == (), image_id
            continue
        positives += 1
        values = np.array(code.split(), dtype=np.int64)
        offsets, lengths = values[0::2], values[1::2]
        starts = np.cumsum(offsets) + np.cumsum(lengths) - lengths
        assert runs == tuple(zip(starts.tolist(), lengths.tolist(), strict=True)), image_id
        if positives % 16 == 0:  # the whole mask on every 16th region (time)
            mask = rasterise(MaskSpec(frame=(FRAME, FRAME), runs=runs), (FRAME, FRAME))
            assert np.array_equal(mask == 255, independent_siim([code])), image_id
    assert positives == 3576


def test_siim_code_hand_checked_pixels_are_column_major():
    # The first region of the file: "557374 2 1015 8 1009 14 ...": 557374 = 544 * 1024 + 318,
    # so the run is column 544, rows 318-319; then column 545 rows 311-318; column 546 rows 304-317.
    code = next(c for _, c in siim_rows() if c.strip() != "-1")
    assert code.startswith("557374 2 1015 8 1009 14 ")
    mask = rasterise(MaskSpec(runs=parse_siim_rle(code, (FRAME, FRAME))), (FRAME, FRAME))
    assert mask[318, 544] == mask[319, 544] == 255
    assert mask[317, 544] == mask[320, 544] == 0
    assert mask[311:319, 545].tolist() == [255] * 8 and mask[310, 545] == mask[319, 545] == 0
    assert mask[304:318, 546].tolist() == [255] * 14 and mask[303, 546] == mask[318, 546] == 0
    assert mask[544, 318] == 0  # the row-major reading of the same offset is empty


@pytest.mark.parametrize(
    ("code", "problem"),
    [
        ("", "empty EncodedPixels"),
        ("10 x5", "token 'x5' is not an integer"),
        ("10 5 7", "3 numbers"),
        ("-3 5", "pair 1 (-3 5) is invalid"),
        ("10 0", "pair 1 (10 0) is invalid"),
        (f"{FRAME * FRAME - 2} 3", "past the 1024x1024 frame"),
    ],
)
def test_unreadable_siim_codes_are_refused_with_the_problem(code, problem):
    with pytest.raises(ValueError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        parse_siim_rle(code, (FRAME, FRAME))


# --- mask geometry ------------------------------------------------------------------------------


def test_box_masks_land_where_the_rescaled_box_says():
    # A 96 x 48 frame stored at 32 x 16 (scale 1/3): a stored pixel is on exactly when its
    # centre lies in the box rescaled as the build rescales boxes.
    boxes = [(5.0, 4.0, 20.0, 9.0), (40.2, 10.7, 33.3, 30.1), (90.0, 40.0, 30.0, 30.0)]
    stored = _png({"bytes": render_mask(MaskSpec(boxes=tuple(boxes)), (96, 48), (32, 16))})
    assert stored.shape == (16, 32)
    expected = np.zeros((16, 32), bool)
    for x, y, w, h in boxes:
        sx, sy, sw, sh = x / 3, y / 3, w / 3, h / 3
        for i in range(16):
            for j in range(32):
                expected[i, j] |= sx <= j + 0.5 < sx + sw and sy <= i + 0.5 < sy + sh
    assert np.array_equal(stored == 255, expected)
    assert set(np.unique(stored)) == {0, 255}


def test_a_mask_cannot_follow_cropped_borders():
    item = RawItem("x:1", "x", "train", ImageRef("a.png"), {}, mask=MaskSpec(boxes=((1, 1, 2, 2),)))
    image = EncodedImage(b"", "png", 8, 8, 16, 16)
    cropping = BuildContext(
        "chest_xray", ImagePolicy(crop_borders=True), optional_columns=("mask",)
    )
    with pytest.raises(ItemError, match="crop-borders"):
        mask_column(item, image, cropping)
    plain = BuildContext("chest_xray", ImagePolicy(), optional_columns=("mask",))
    stored = _png(mask_column(item, image, plain))  # frame pixels 1-2 of 16: stored pixel 0 of 8
    assert stored[0, 0] == 255 and stored.sum() == 255


# --- the optional column in the schema ----------------------------------------------------------


def test_the_mask_column_exists_only_in_builds_that_have_it():
    plain, masked = record_schema(len(VOCAB)), record_schema(len(VOCAB), ["mask"])
    assert "mask" not in plain.names and masked.names == [*plain.names, "mask"]
    assert masked.features()["mask"] == datasets.Image()
    assert masked.arrow_schema().field("mask").nullable
    assert [f["name"] for f in plain.card_features()] == plain.names
    assert [f["name"] for f in masked.card_features()] == masked.names
    with pytest.raises(ValueError, match="not optional columns"):
        record_schema(len(VOCAB), ["image"])


def test_validator_checks_the_mask_only_where_the_build_has_it(siim):
    _, _, out = siim
    row = _rows(out)[0]
    plain, masked = record_schema(len(VOCAB)), record_schema(len(VOCAB), ["mask"])
    assert validate_row(row, masked, VOCAB.names) == []
    assert any("not in this build's schema" in p for p in validate_row(row, plain, VOCAB.names))
    without = {k: v for k, v in row.items() if k != "mask"}
    assert validate_row(without, plain, VOCAB.names) == []
    assert "missing column 'mask'" in validate_row(without, masked, VOCAB.names)
    empty = dict(row, mask={"bytes": b"", "path": row["mask"]["path"]})
    assert "mask has no bytes" in validate_row(empty, masked, VOCAB.names)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A 20-row demo ChestX-ray14 build: the same vocabulary, no mask column."""
    root = tmp_path_factory.mktemp("plain")
    raw = write_demo_release(root / "raw", n=20, seed=1, image_size=64)
    build(
        load_pipeline("chestxray14"), raw, root / "out", BuildOptions(progress=False, image_size=64)
    )
    return root / "out"


# --- SIIM-ACR -----------------------------------------------------------------------------------


def test_siim_build_opens_with_counts_masks_and_quarantine(siim):
    root, planted, out = siim
    built, good = _built_and_planted(out, planted, "broken")
    positive = {k for k, codes in good.items() if codes != ["-1"]}
    assert sum(_value(r, "Pneumothorax") == 1.0 for r in built.values()) == len(positive) == 16
    assert sum(_value(r, "Pneumothorax") == 0.0 for r in built.values()) == len(good) - 16
    for image_id, row in built.items():
        mask = _png(row["mask"])
        assert mask.shape == (row["height"], row["width"]) == (STORED, STORED)
        expected = independent_siim(good[image_id])[STEP // 2 :: STEP, STEP // 2 :: STEP]
        assert np.array_equal(mask == 255, expected), image_id
        assert set(np.unique(mask)) <= {0, 255}
        assert row["mask"]["path"] == f"{row['id']}.mask.png"
        assert (mask.any()) == (image_id in positive)
    assert read_mgll_metadata(next((out / "data").glob("*.parquet")))["optional_columns"] == [
        "mask"
    ]
    loaded = datasets.load_dataset(str(out))
    assert loaded["train"].features["mask"] == datasets.Image()
    assert loaded["train"][0]["mask"].size == (STORED, STORED)
    assert validate_dataset(out) == []

    quarantine = _quarantine(out)
    assert "missing DICOM" in quarantine[f"siim_acr:{planted['missing']}"]["reason"]
    broken = quarantine[f"siim_acr:{planted['broken']}"]["reason"]
    line = _line_of(root / "train-rle.csv", planted["broken"])
    assert f"train-rle.csv line {line}: EncodedPixels token 'x8' is not an integer" in broken


def test_siim_texts_come_from_the_label(siim):
    _, _, out = siim
    texts = {(r["text_category"], r["text_description"]) for r in _rows(out)}
    assert texts == {("Pneumothorax", "Pneumothorax."), ("No Pneumothorax", "No pneumothorax.")}


# --- RSNA Pneumonia -----------------------------------------------------------------------------


def test_rsna_build_labels_boxes_masks_and_quarantine(rsna):
    root, planted, out = rsna
    built, good = _built_and_planted(out, planted, "bad")
    positive = {k for k, rows in good.items() if rows[0]["Target"] == "1"}
    assert len(positive) == 16 and len(good) - len(positive) == 14
    for patient, row in built.items():
        assert row["patient_id"] == patient
        is_positive = patient in positive
        assert _value(row, "Pneumonia") == float(is_positive)
        if is_positive:
            assert _value(row, "Lung Opacity") == 1.0
        else:
            assert math.isnan(_value(row, "Lung Opacity"))
        extra = json.loads(row["extra"])
        csv_boxes = [
            [float(r[c]) for c in ("x", "y", "width", "height")] for r in good[patient] if r["x"]
        ]
        scale = STORED / FRAME
        assert [[b["x"], b["y"], b["w"], b["h"]] for b in extra.get("boxes", [])] == [
            [round(v * scale, 2) for v in box] for box in csv_boxes
        ]
        if csv_boxes:
            assert extra["box_source_frame"] == [FRAME, FRAME]
            assert {b["label"] for b in extra["boxes"]} == {"Lung Opacity"}
        mask = _png(row["mask"]) == 255
        expected = np.zeros((STORED, STORED), bool)
        for box in extra.get("boxes", []):  # pixel centres inside the rescaled box
            centres = np.arange(STORED) + 0.5
            inside_x = (box["x"] <= centres) & (centres < box["x"] + box["w"])
            inside_y = (box["y"] <= centres) & (centres < box["y"] + box["h"])
            expected |= inside_y[:, None] & inside_x[None, :]
        assert np.array_equal(mask, expected), patient
        assert mask.any() == is_positive
    annotated = read_mgll_metadata(next((out / "data").glob("*.parquet")))["annotated_labels"]
    assert annotated == ["Lung Opacity", "Pneumonia"]
    assert datasets.load_dataset(str(out))["train"].features["mask"] == datasets.Image()
    assert validate_dataset(out) == []

    quarantine = _quarantine(out)
    assert "missing DICOM" in quarantine[f"rsna_pneumonia:{planted['missing']}"]["reason"]
    line = _line_of(root / "stage_2_train_labels.csv", planted["bad"])
    bad = quarantine[f"rsna_pneumonia:{planted['bad']}"]["reason"]
    assert f"stage_2_train_labels.csv line {line}: Target 'yes' is not 0 or 1" in bad


def test_rsna_counts_of_the_real_table_and_patient_split(tmp_path):
    rows = rsna_rows()
    patients = sorted({r["patientId"] for r in rows})
    assert len(rows) == 30227 and len(patients) == 26684
    pipeline = load_pipeline("rsna_pneumonia")
    source = RsnaPneumoniaSource(tmp_path, pipeline, VOCAB)
    splits = [source.split_of(p) for p in patients]
    shares = {s: splits.count(s) / len(splits) for s in ("train", "validation", "test")}
    assert abs(shares["train"] - 0.70) < 0.01
    assert abs(shares["validation"] - 0.15) < 0.01 and abs(shares["test"] - 0.15) < 0.01


# --- the trainer --------------------------------------------------------------------------------


def test_trainer_reads_builds_with_and_without_masks(siim, plain):
    _, _, masked = siim
    plain_shard = next((plain / "data").glob("*.parquet"))
    assert "mask" not in pq.read_schema(plain_shard).names
    assert "optional_columns" not in read_mgll_metadata(plain_shard)  # its bytes are unchanged
    tokenizer = TextTokenizer(open_clip.get_tokenizer("ViT-B-16", context_length=16))
    transform = SampleTransform(tokenizer, 32, (0.5,) * 3, (0.25,) * 3)
    dataset = make_dataset(f"{masked}::{plain}", transform, split="train")
    batch = collate([dataset[i] for i in range(len(dataset))])
    sources = {i.split(":", 1)[0] for i in batch["ids"]}
    assert sources == {"siim_acr", "chestxray14"}
    assert batch["images"].shape[1:] == (3, 32, 32)
    assert batch["labels"].shape == (len(dataset), len(VOCAB))


# --- merge ---------------------------------------------------------------------------------------


def test_merge_keeps_masks_and_refuses_mixing_with_builds_without(siim, rsna, plain, tmp_path):
    merged = tmp_path / "merged"
    merge([siim[2], rsna[2]], merged)
    assert validate_dataset(merged) == []
    assert (
        datasets.load_dataset(str(merged), "default")["train"].features["mask"] == datasets.Image()
    )
    with pytest.raises(UserError, match="optional_columns differs"):
        merge([siim[2], plain], tmp_path / "mixed")


def test_exports_keep_the_masks(siim, tmp_path):
    """webdataset carries each row's mask bytes as `{key}.mask.png`; mgll-json's npz holds the
    decoded mask beside the image. Nothing of the optional column is dropped."""
    import tarfile

    from mgll_data.publish.export import export, sample_key

    out = siim[2]
    rows = {sample_key(r["id"]): r for r in _rows(out)}
    export(out, "webdataset", tmp_path / "wds")
    members = {}
    for tar_path in sorted((tmp_path / "wds").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    assert {k: members[f"{k}.mask.png"] for k in rows} == {
        k: r["mask"]["bytes"] for k, r in rows.items()
    }

    export(out, "mgll-json", tmp_path / "npz")
    npz_files = sorted((tmp_path / "npz" / "All_data_npz").rglob("*.npz"))
    assert len(npz_files) == len(rows)
    by_uid = {r["id"].split(":", 1)[1]: r for r in rows.values()}
    for path in npz_files:
        with np.load(path, allow_pickle=False) as arrays:
            row = by_uid[path.stem]
            np.testing.assert_array_equal(arrays["mask"], _png(row["mask"]))
            np.testing.assert_array_equal(arrays["image"], _png(row["image"]))
