"""`mgll-train eval --tasks segmentation`: masks in the samples, the decoder, Dice/IoU, outputs.

The data is a real RSNA Pneumonia build (`tests/segmentation_fixture.make_rsna`: the real label
table, generated DICOMs) made learnable: every box of the table is painted bright into its
DICOM (the rest of the image darkened, and a display window in the header so the build does not
stretch each image), and six positive patients are relabelled negative, so images with an empty
mask outnumber those with a region. The model is `mgll-tiny` with random weights (a frozen
random ViT still keeps where bright patches are). Expected counts are read from the Parquet
files; Dice and IoU get hand-computed cases.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
import pytest
import torch
from PIL import Image

from mgll_data.build.engine import BuildOptions, build
from mgll_data.build.pipeline import load_pipeline
from mgll_train.checkpoint import save_checkpoint
from mgll_train.cli import main
from mgll_train.data import SampleTransform, collate, make_dataset
from mgll_train.data.tokenizer import TextTokenizer
from mgll_train.errors import UserError
from mgll_train.evaluate import evaluate_model
from mgll_train.evaluate.cli import load_model_from_checkpoint
from mgll_train.evaluate.features import eval_transform
from mgll_train.evaluate.segmentation import (
    balanced_rows,
    mean_with_interval,
    region_scores,
    segmentation_block,
)
from mgll_train.model import create_model
from tests.conftest import run_module, small_demo_build
from tests.segmentation_fixture import DICOM_SIZE, make_rsna

FRAME = 1024  # RSNA boxes are given in the 1024 px frame of the real DICOMs
RELABELLED = 6  # positive patients made negative: empty masks outnumber regions in train
FRACTIONS = ("1%", "10%", "100%")

# --------------------------------------------------------------------------- Dice and IoU


def _mask(shape: tuple[int, int], *pixels: tuple[int, int]) -> np.ndarray:
    out = np.zeros(shape, dtype=bool)
    for r, c in pixels:
        out[r, c] = True
    return out


def test_dice_and_iou_of_hand_computed_masks():
    predicted = _mask((4, 4), (0, 0), (0, 1))
    true = _mask((4, 4), (0, 1), (1, 1), (1, 2))
    # |P∩T| = 1, |P| + |T| = 5, |P∪T| = 4
    dice, iou = region_scores(predicted[None], true[None])
    assert dice.tolist() == [pytest.approx(2 / 5)] and iou.tolist() == [pytest.approx(1 / 4)]
    whole = np.ones((1, 3, 3), dtype=bool)
    half = _mask((3, 3), (0, 0), (1, 1), (2, 2))[None]  # 3 of the 9 pixels
    dice, iou = region_scores(half, whole)
    assert dice[0] == pytest.approx(2 * 3 / 12) and iou[0] == pytest.approx(3 / 9)


def test_empty_masks_score_one_when_both_are_empty_and_zero_otherwise():
    empty = np.zeros((2, 2), dtype=bool)
    some = _mask((2, 2), (1, 0))
    predicted = np.stack([empty, some, empty, some])
    true = np.stack([empty, empty, some, some])
    dice, iou = region_scores(predicted, true)
    assert dice.tolist() == [1.0, 0.0, 0.0, 1.0] and iou.tolist() == [1.0, 0.0, 0.0, 1.0]


def test_interval_of_the_mean():
    constant = np.full(7, 0.25)
    assert mean_with_interval(constant, 200, seed=0) == (0.25, [0.25, 0.25])
    mean, interval = mean_with_interval(np.array([0.2, 0.4, 0.9]), 0, seed=0)
    assert mean == pytest.approx(0.5) and interval == [None, None]
    assert mean_with_interval(np.zeros(0), 200, seed=0) == (None, [None, None])
    halves = np.r_[np.zeros(20), np.ones(20)]
    mean, (lo, hi) = mean_with_interval(halves, 500, seed=0)
    assert mean == 0.5 and 0.2 < lo < 0.5 < hi < 0.8  # the binomial spread of a mean of 40


def test_balancing_keeps_every_region_and_as_many_empty_masks():
    has_region = np.zeros(10, dtype=bool)
    has_region[[2, 5]] = True
    rows = np.arange(10)
    kept = balanced_rows(rows, has_region, seed=0)
    assert {2, 5} <= set(kept.tolist()) and len(kept) == 4 and (~has_region[kept]).sum() == 2
    draws = {tuple(balanced_rows(rows, has_region, seed).tolist()) for seed in range(8)}
    assert len(draws) > 1  # a seeded draw, not always the same empty masks
    few = np.array([2, 3, 5])
    assert balanced_rows(few, has_region, seed=0).tolist() == [2, 3, 5]  # fewer empty ones
    assert balanced_rows(np.array([0, 1, 3]), has_region, 0).tolist() == [0, 1, 3]  # no region


# --------------------------------------------------------------------------- masks in samples


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _transform(size: int, **kwargs) -> SampleTransform:
    tokenizer = TextTokenizer(open_clip.get_tokenizer("ViT-B-16", context_length=16))
    return SampleTransform(tokenizer, size, (0.5,) * 3, (0.25,) * 3, masks=True, **kwargs)


def _sample(transform: SampleTransform, image: bytes, mask: bytes | None, seed: int = 0) -> dict:
    record = {"id": "x", "image": {"bytes": image}, "labels": [1.0], "text_category": "a"}
    record["mask"] = {"bytes": mask} if mask is not None else None
    labels, annotated = np.array([1.0], np.float32), np.array([True])
    return transform(record, labels, annotated, np.random.default_rng(seed))


def _scene(width: int, height: int, box: tuple[int, int, int, int]) -> tuple[np.ndarray, ...]:
    """A dark image with one bright rectangle (x0, y0, x1, y1), and its 0/255 mask."""
    image = np.full((height, width), 40, dtype=np.uint8)
    mask = np.zeros((height, width), dtype=np.uint8)
    x0, y0, x1, y1 = box
    image[y0:y1, x0:x1], mask[y0:y1, x0:x1] = 250, 255
    return image, mask


def _disagreement(sample: dict) -> float:
    """Share of pixels where the mask is not the bright part of the transformed image."""
    grey = sample["image"][0].float().numpy()
    bright = grey > (grey.max() + grey.min()) / 2
    mask = sample["mask"][0].numpy()
    assert set(np.unique(mask).tolist()) == {0.0, 1.0}
    return float((bright != (mask == 1)).mean())


@pytest.mark.parametrize(
    "encode, width, height, box, size, augment",
    [
        (_png, 48, 32, (8, 4, 24, 20), 64, False),  # upscaled, padded top and bottom
        (_jpeg, 256, 160, (64, 32, 160, 96), 32, False),  # JPEG decoded at 1/8 scale
        (_png, 40, 60, (4, 30, 36, 50), 64, True),  # padded left and right, randomly cropped
    ],
)
def test_the_mask_gets_the_image_geometry(encode, width, height, box, size, augment):
    image, mask = _scene(width, height, box)
    transform = _transform(size, augment=augment)
    sample = _sample(transform, encode(image), _png(mask))
    assert sample["mask"].shape == (1, size, size)
    assert _disagreement(sample) < 0.03  # only edge pixels may differ (bicubic vs nearest)
    # Without padding the same geometry the mask would miss the bright rectangle badly.
    stretched = np.asarray(Image.fromarray(mask).resize((size, size), Image.Resampling.NEAREST))
    other = dict(sample, mask=torch.from_numpy(stretched > 127).float()[None])
    assert _disagreement(other) > 0.05


def test_a_missing_mask_is_nan_and_batches_stack_masks():
    image, mask = _scene(32, 32, (4, 4, 12, 12))
    transform = _transform(32)
    plain = SampleTransform(transform.tokenizer, 32, (0.5,) * 3, (0.25,) * 3)
    assert "mask" in transform.columns and "mask" not in plain.columns
    assert "mask" not in _sample(plain, _png(image), _png(mask))
    known = _sample(transform, _png(image), _png(mask))
    unknown = _sample(transform, _png(image), None)
    assert torch.isnan(unknown["mask"]).all()
    batch = collate([known, unknown])
    assert batch["masks"].shape == (2, 1, 32, 32)
    assert batch["masks"][0].sum() == 8 * 8


# --------------------------------------------------------------------------- the learnable build


def _paint_boxes(raw: Path, rows: dict[str, list[dict[str, str]]]) -> None:
    """Every box of `rows` painted at 255 into its patient's DICOM, the rest halved."""
    scale = DICOM_SIZE / FRAME
    for patient, boxes in rows.items():
        path = raw / "stage_2_train_images" / f"{patient}.dcm"
        if not path.exists():  # the planted missing DICOM
            continue
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array.astype(np.uint8) // 2
        for r in boxes:
            if r["Target"] == "1":
                x, y, w, h = (float(r[c]) * scale for c in ("x", "y", "width", "height"))
                pixels[round(y) : round(y + h), round(x) : round(x + w)] = 255
        ds.PixelData = pixels.tobytes()
        ds.WindowCenter, ds.WindowWidth = 128, 256  # shown as stored: no per-image stretch
        ds.save_as(path)


def _relabel_negative(raw: Path, rows: dict, patients: list[str]) -> None:
    """`patients` rewritten in stage_2_train_labels.csv as RSNA writes a negative: no box."""
    table = raw / "stage_2_train_labels.csv"
    lines = [line for line in table.read_text().splitlines() if line.split(",")[0] not in patients]
    table.write_text("\n".join(lines + [f"{p},,,,,0" for p in patients]) + "\n")
    for p in patients:
        rows[p] = [dict(rows[p][0], x="", y="", width="", height="", Target="0")]


@pytest.fixture(scope="module")
def learnable(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("seg")
    raw, planted = make_rsna(root / "raw")
    rows = planted["rows"]
    positive = sorted(p for p, r in rows.items() if r[0]["Target"] == "1" and p != planted["bad"])
    _relabel_negative(raw, rows, positive[:RELABELLED])
    _paint_boxes(raw, rows)
    data = root / "ds"
    build(load_pipeline("rsna_pneumonia"), raw, data, BuildOptions(image_size=64, progress=False))
    checkpoint = root / "tiny.pt"
    model = create_model("mgll-tiny", None, weights_follow=True).model
    state = {"model_name": "mgll-tiny", "state_dict": model.state_dict(), "epoch": 0, "step": 0}
    save_checkpoint(checkpoint, state | {"train_data": str(data)})
    return {"root": root, "data": data, "checkpoint": checkpoint}


def _mask_counts(data: Path, split: str) -> tuple[int, int]:
    """(rows with a mask, rows whose mask has a region) of `split`, read from the Parquet."""
    known = region = 0
    for path in sorted((data / "data").glob("*.parquet")):
        for row in pq.read_table(path, columns=["split", "mask"]).to_pylist():
            if row["split"] != split or row["mask"] is None:
                continue
            known += 1
            region += bool(np.asarray(Image.open(io.BytesIO(row["mask"]["bytes"]))).any())
    return known, region


def _eval(learnable: dict[str, Path], name: str, *flags: str) -> dict:
    """metrics.json of `mgll-train eval --tasks segmentation` run in-process."""
    out = learnable["root"] / name
    main(
        ["eval", "--checkpoint", str(learnable["checkpoint"]), "--data", str(learnable["data"]),
         "--out", str(out), "--workers", "0", "--tasks", "segmentation", "--bootstrap", "100",
         *flags]
    )  # fmt: skip
    return json.loads((out / "metrics.json").read_text())["segmentation"]


@pytest.fixture(scope="module")
def cli_run(learnable) -> tuple[dict, Path, str]:
    """The command line, default decoder settings: (metrics.json, out folder, stdout)."""
    out = learnable["root"] / "cli"
    done = run_module(
        "mgll_train",
        ["eval", "--checkpoint", str(learnable["checkpoint"]), "--data", str(learnable["data"]),
         "--out", str(out), "--workers", "0", "--tasks", "segmentation", "--bootstrap", "100"],
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads((out / "metrics.json").read_text()), out, done.stdout


@pytest.mark.wires("mgll-train eval", "--tasks")
def test_eval_segmentation_end_to_end(learnable, cli_run):
    metrics, out, stdout = cli_run
    seg = metrics["segmentation"]
    assert set(metrics) >= {"segmentation", "data", "split", "images"}
    assert not {"zeroshot", "linear_probe", "retrieval"} & set(metrics)  # only what was asked
    assert seg["decoder"] == "setr-pup" and seg["epochs"] == 20
    assert seg["train_data"] == str(learnable["data"]) and seg["train_split"] == "train"
    train_known, train_regions = _mask_counts(learnable["data"], "train")
    test_known, test_regions = _mask_counts(learnable["data"], "test")
    assert train_known - train_regions > train_regions > 0  # the fixture's premise
    for key in FRACTIONS:
        r = seg[key]
        assert set(r) >= {"dice", "dice_ci", "iou", "iou_ci", "train_images", "test_images"}
        assert 0 <= r["iou"] <= r["dice"] <= 1  # per image IoU ≤ Dice, so for the means too
        for lo, hi in (r["dice_ci"], r["iou_ci"]):
            assert 0 <= lo <= hi <= 1
        assert (r["test_images"], r["test_positives"]) == (test_known, test_regions)
        assert r["train_positives"] >= 1  # every subset holds an image with a region
    assert seg["1%"]["train_images"] < seg["100%"]["train_images"] == train_known
    assert seg["100%"]["train_positives"] == train_regions
    assert (out / "segmentation_examples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "segmentation (setr-pup decoder, 20 epochs)" in stdout
    assert "100% of train" in (out / "table.txt").read_text()


@pytest.mark.wires("mgll-train eval", "--seg-epochs")
def test_the_trained_decoder_beats_the_untrained_one(learnable, cli_run):
    trained = cli_run[0]["segmentation"]["100%"]["dice"]
    untrained = _eval(learnable, "untrained", "--seg-epochs", "0")
    assert untrained["epochs"] == 0
    test_known, test_regions = _mask_counts(learnable["data"], "test")
    predict_nothing = (test_known - test_regions) / test_known  # Dice of all-empty predictions
    assert trained > untrained["100%"]["dice"] + 0.4
    assert trained > predict_nothing + 0.1  # it finds the regions, not only the empty images


@pytest.mark.wires("mgll-train eval", "--seg-lr")
def test_the_learning_rate_reaches_the_decoder(learnable, cli_run):
    frozen = _eval(learnable, "tiny-lr", "--seg-lr", "1e-9")
    assert frozen["lr"] == 1e-9
    assert frozen["100%"]["dice"] < cli_run[0]["segmentation"]["100%"]["dice"] - 0.4


@pytest.mark.wires("mgll-train eval", "--seg-balance-negatives")
def test_balancing_negatives_changes_the_training_images(learnable, cli_run):
    plain = cli_run[0]["segmentation"]
    balanced = _eval(learnable, "balanced", "--seg-balance-negatives")
    train_known, train_regions = _mask_counts(learnable["data"], "train")
    assert balanced["balance_negatives"] and not plain["balance_negatives"]
    assert plain["100%"]["train_negatives"] == train_known - train_regions
    assert balanced["100%"]["train_positives"] == balanced["100%"]["train_negatives"]
    assert balanced["100%"]["train_images"] == 2 * train_regions < plain["100%"]["train_images"]


def test_segmentation_on_a_build_without_masks_is_one_line(learnable, tmp_path, capsys):
    plain = small_demo_build(tmp_path, n=20)
    with pytest.raises(SystemExit) as exit_info:
        main(
            ["eval", "--checkpoint", str(learnable["checkpoint"]), "--data", str(plain),
             "--train-data", str(learnable["data"]), "--out", str(tmp_path / "out"),
             "--workers", "0", "--tasks", "zeroshot,segmentation"]
        )  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert str(plain / "data") in err and "no 'mask' column" in err
    assert not (tmp_path / "out" / "metrics.json").exists()


def _args(**overrides) -> argparse.Namespace:
    """Arguments as `fit`'s evaluation builds them: no segmentation flags at all."""
    values = dict(uncertain="ignore", unmentioned="ignore", seed=0, batch_size=8, workers=0,
                  bootstrap=0, finetune=False)  # fmt: skip
    return argparse.Namespace(**(values | overrides))


def test_segmentation_block_takes_plain_datasets_and_overrides(learnable):
    """Another task's datasets (no masks asked for), fit-style arguments, under no_grad."""
    bundle, _ = load_model_from_checkpoint(learnable["checkpoint"], torch.device("cpu"))
    args = _args(seg_epochs=2)
    transform = eval_transform(bundle.model, bundle.tokenizer, args)
    train = make_dataset(str(learnable["data"]), transform, split="train")
    test = make_dataset(str(learnable["data"]), transform, split="test")
    with torch.no_grad():
        block = segmentation_block(
            bundle.model, train, test, "d", "train", args, torch.device("cpu"),
            fractions=(1.0,), balance_negatives=True,
        )  # fmt: skip
    assert set(block) & set(FRACTIONS) == {"100%"} and block["epochs"] == 2
    r = block["100%"]
    assert r["dice_ci"] == [None, None] and r["train_positives"] == r["train_negatives"]


def _with_null_masks(data: Path, out: Path, null: set[int]) -> tuple[Path, int, int]:
    """The train shard with the mask cells of rows `null` emptied: (file, rows with a mask
    left, of them with a region)."""
    (shard,) = sorted((data / "data").glob("train-*.parquet"))
    table = pq.read_table(shard)
    cells = table.column("mask").to_pylist()
    kept = [None if i in null else cell for i, cell in enumerate(cells)]
    index = table.schema.get_field_index("mask")
    field = table.schema.field("mask")
    pq.write_table(table.set_column(index, field, pa.array(kept, type=field.type)), out)
    regions = [np.asarray(Image.open(io.BytesIO(c["bytes"]))).any() for c in kept if c]
    return out, len(regions), int(sum(regions))


def test_rows_without_a_mask_are_left_out_and_none_at_all_is_an_error(learnable, tmp_path):
    bundle, _ = load_model_from_checkpoint(learnable["checkpoint"], torch.device("cpu"))
    args = _args(seg_epochs=1)
    transform = eval_transform(bundle.model, bundle.tokenizer, args)
    test = make_dataset(str(learnable["data"]), transform, split="test")
    half, known, regions = _with_null_masks(
        learnable["data"], tmp_path / "half.parquet", {0, 2, 3, 7, 8, 11}
    )
    train = make_dataset(str(half), transform, split="train")
    block = segmentation_block(
        bundle.model, train, test, str(half), "train", args, torch.device("cpu"), fractions=(1.0,)
    )
    assert block["100%"]["train_images"] == known == len(train) - 6
    assert block["100%"]["train_positives"] == regions
    none, _, _ = _with_null_masks(
        learnable["data"], tmp_path / "none.parquet", set(range(len(train)))
    )
    train = make_dataset(str(none), transform, split="train")
    with pytest.raises(UserError, match="no row of split 'train' has a mask"):
        segmentation_block(bundle.model, train, test, str(none), "train", args, torch.device("cpu"))


def test_evaluate_model_runs_segmentation_and_honours_the_seed(learnable):
    bundle, _ = load_model_from_checkpoint(learnable["checkpoint"], torch.device("cpu"))
    runs = {}
    for seed in (0, 1):
        metrics, extras = evaluate_model(
            bundle.model, bundle.tokenizer, str(learnable["data"]), "test", ["segmentation"],
            _args(seed=seed, seg_epochs=1, bootstrap=50), torch.device("cpu"),
            train_data=str(learnable["data"]),
        )  # fmt: skip
        runs[seed] = metrics["segmentation"]["100%"]
        examples = extras["segmentation_examples"]
        assert examples["images"].shape[1:] == (64, 64) and len(examples["ids"]) >= 1
    assert runs[0]["dice_ci"] != runs[1]["dice_ci"]
    with pytest.raises(UserError, match="segmentation needs training data"):
        evaluate_model(
            bundle.model, bundle.tokenizer, str(learnable["data"]), "test", ["segmentation"],
            _args(), torch.device("cpu"),
        )  # fmt: skip
