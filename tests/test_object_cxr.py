"""Object-CXR: foreign-object outlines (rectangles, ellipses, polygons) as labels and masks.

No annotation file of the release is on this machine: the fixture writes `train.csv` and
`dev.csv` as the release ships them (`image_name,annotation`, `;`-separated shapes `type
coords...`) beside `train/` and `dev/` of small JPEGs of varying sizes, with the quirks a
download has (CRLF, an extra folder, an unlisted image) and broken rows.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
from matplotlib.path import Path as MplPath
from PIL import Image

from mgll_data.build.engine import BuildOptions, build
from mgll_data.build.pipeline import load_pipeline
from mgll_data.errors import UserError
from mgll_data.imaging.masks import MaskSpec, rasterise
from mgll_data.publish.inspect import validate_dataset
from mgll_data.sources.object_cxr import parse_annotation
from mgll_data.vocab import load_vocabulary

VOCAB = load_vocabulary("chest_xray")
STORED = 48  # --image-size: the 64 px images are resized, the 40 px ones kept
POLYGON = [(3.2, 1.1), (27.7, 4.3), (15.1, 12.9), (25.3, 26.6), (2.4, 22.2)]  # concave

# name -> (size (w, h), annotation cell); the first dev rows are the test split
TRAIN = {
    "00001.jpg": ((64, 56), ""),
    "00002.jpg": ((40, 36), "0 4 6 20 15"),
    "00003.jpg": ((64, 56), "1 10.5 8 41 30.2"),
    "00004.jpg": ((40, 36), "2 " + " ".join(f"{x} {y}" for x, y in POLYGON)),
    # three shapes, the rectangle reaching past the image
    "00005.jpg": ((64, 56), "0 40 30 70 60;1 2 2 20 14;2 30.3 5.2 50.1 8.3 45.3 25.4"),
    "00006.jpg": ((40, 36), ""),
    "00007.jpg": ((40, 36), "0 1 1 9 9"),
}
DEV = {"08001.jpg": ((64, 56), "1 20 10 44 40"), "08002.jpg": ((40, 36), "")}
BROKEN = {  # name -> (annotation, what the reason says)
    "00010.jpg": ("3 1 1 5 5", "shape 1 has type '3' (expected 0, 1 or 2)"),
    "00011.jpg": ("0 1 1 5 5;2 1 1 5 5 9", "shape 2 (polygon) has 5 numbers"),
    "00012.jpg": ("0 9 1 5 5", "shape 1 (rectangle) is '9 1 5 5'; expected x1 y1 x2 y2"),
    "00013.jpg": ("1 1 1 nan 5", "shape 1 has coordinate 'nan', not a finite number"),
}


def _jpeg(path: Path, size: tuple[int, int], seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0]), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def make_object_cxr(root: Path) -> Path:
    """The release: both CSVs (train.csv with CRLF, as Windows tools leave it), the image folders
    with an unlisted image and an extra folder, a missing image, a repeated row, broken rows."""
    rows = [(name, cell) for name, (_, cell) in TRAIN.items()]
    rows += [(name, cell) for name, (cell, _) in BROKEN.items()]
    rows += [("00020.jpg", "0 1 1 5 5"), ("00002.jpg", "0 4 6 20 15")]  # missing; repeated
    rows += [("00030.jpg", ""), ("00030.jpg", "0 1 1 5 5")]  # conflicting rows
    lines = ["image_name,annotation"] + [f"{name},{cell}" for name, cell in rows]
    root.mkdir(parents=True)
    (root / "train.csv").write_bytes(("\r\n".join(lines) + "\r\n").encode())
    dev_lines = ["image_name,annotation"] + [f"{n},{cell}" for n, (_, cell) in DEV.items()]
    (root / "dev.csv").write_text("\n".join(dev_lines) + "\n")
    for seed, (name, (size, _)) in enumerate({**TRAIN, **DEV}.items()):
        _jpeg(root / ("dev" if name in DEV else "train") / name, size, seed)
    for seed, name in enumerate([*BROKEN, "00030.jpg", "09999.jpg"]):  # 09999: not listed
        _jpeg(root / "train" / name, (40, 36), 100 + seed)
    _jpeg(root / "train" / "__MACOSX" / "._00001.jpg", (8, 8), 7)  # archiver clutter
    _jpeg(root / "extra" / "00001.jpg", (8, 8), 8)  # a folder the release does not have
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = make_object_cxr(tmp_path_factory.mktemp("object") / "raw")
    out = tmp_path_factory.mktemp("out") / "object_cxr"
    build(load_pipeline("object_cxr"), root, out, BuildOptions(progress=False, image_size=STORED))
    rows = [
        r for p in sorted((out / "data").glob("*.parquet")) for r in pq.read_table(p).to_pylist()
    ]
    return root, out, {r["id"].split(":", 1)[1]: r for r in rows}


# --- rasterising the shapes: the pixel-centre rule, checked independently ------------------


def _centres(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres (x, y) of a (height, width) grid."""
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    return xs, ys


def test_rectangle_covers_the_pixels_whose_centre_is_inside():
    mask = rasterise(MaskSpec(boxes=((4, 6, 16, 9),)), (40, 36)) == 255
    xs, ys = _centres(40, 36)
    assert np.array_equal(mask, (4 <= xs) & (xs < 20) & (6 <= ys) & (ys < 15))
    assert mask.sum() == 16 * 9


def test_ellipse_hand_checked_pixels():
    # The ellipse in the box (2, 2)-(8, 6): centre (5, 4), half-axes 3 and 2. Row 2 (y = 2.5)
    # reaches |x - 5| <= 3 * sqrt(1 - 0.75**2) = 1.98: centres 3.5 to 6.5; rows 3 and 4 (y = 3.5,
    # 4.5) reach 2.90: centres 2.5 to 7.5; rows 1 and 6 (y = 1.5, 6.5) lie outside.
    mask = rasterise(MaskSpec(ellipses=((2, 2, 8, 6),)), (10, 8)) == 255
    expected = np.zeros((8, 10), bool)
    expected[2, 3:7] = expected[5, 3:7] = True
    expected[3, 2:8] = expected[4, 2:8] = True
    assert np.array_equal(mask, expected)
    # Reaching past the top-left corner: centre (0, 0), half-axes 4 and 2. Row 0 (y = 0.5)
    # reaches |x| <= 4 * sqrt(1 - 0.25**2) = 3.87: centres 0.5 to 3.5; row 1 (y = 1.5) 2.65.
    mask = rasterise(MaskSpec(ellipses=((-4, -2, 4, 2),)), (6, 4)) == 255
    expected = np.zeros((4, 6), bool)
    expected[0, 0:4] = expected[1, 0:3] = True
    assert np.array_equal(mask, expected)


def test_polygon_matches_matplotlib_on_pixel_centres():
    xs, ys = _centres(30, 30)
    centres = np.column_stack([xs.ravel(), ys.ravel()])
    # No centre lies on an edge, so any point-in-polygon rule must agree.
    for a, b in zip(POLYGON, POLYGON[1:] + POLYGON[:1], strict=True):
        edge = np.subtract(b, a)
        t = np.clip((centres - a) @ edge / (edge @ edge), 0, 1)
        assert np.hypot(*(centres - a - t[:, None] * edge).T).min() > 1e-3
    inside = MplPath(POLYGON).contains_points(centres).reshape(30, 30)
    mask = rasterise(MaskSpec(polygons=(tuple(POLYGON),)), (30, 30)) == 255
    assert np.array_equal(mask, inside)
    assert 100 < mask.sum() < 600 and not mask[14, 28]  # the notch at the right is outside


def test_a_polygon_drawn_as_a_rectangle_covers_what_the_box_covers():
    # Every edge runs through pixel centres: both keep the top and left edges, not the others
    # (x 1.5 to 6.5 holds the centres of columns 1-5; y 2.5 to 5.5 those of rows 2-4).
    corners = ((1.5, 2.5), (6.5, 2.5), (6.5, 5.5), (1.5, 5.5))
    as_polygon = rasterise(MaskSpec(polygons=(corners,)), (12, 10)) == 255
    as_box = rasterise(MaskSpec(boxes=((1.5, 2.5, 5, 3),)), (12, 10)) == 255
    expected = np.zeros((10, 12), bool)
    expected[2:5, 1:6] = True
    assert np.array_equal(as_polygon, expected) and np.array_equal(as_box, expected)


def test_an_ellipse_keeps_the_centres_on_its_edge():
    # Centre (1.5, 0.5), half-axes 1 and 0.5: the centres 0.5 and 2.5 of row 0 lie on the edge.
    mask = rasterise(MaskSpec(ellipses=((0.5, 0, 2.5, 1),)), (4, 1)) == 255
    assert mask.tolist() == [[True, True, True, False]]


@pytest.mark.parametrize(("cell", "problem"), [(cell, why) for cell, why in BROKEN.values()])
def test_unreadable_annotations_say_what_is_wrong(cell, problem):
    with pytest.raises(ValueError, match="^" + problem.split("(")[0]) as caught:
        parse_annotation(cell)
    assert problem in str(caught.value)


# --- the build -------------------------------------------------------------------------------


def _expected_mask(cell: str, size: tuple[int, int]) -> np.ndarray:
    """The cell's shapes on pixel centres of the original image, computed without mgll: the
    box and ellipse inequalities, matplotlib for polygons."""
    xs, ys = _centres(*size)
    mask = np.zeros((size[1], size[0]), bool)
    for part in filter(None, cell.split(";")):
        kind, *v = part.split()
        c = [float(t) for t in v]
        if kind == "0":
            mask |= (c[0] <= xs) & (xs < c[2]) & (c[1] <= ys) & (ys < c[3])
        elif kind == "1":
            cx, cy, a, b = (
                (c[0] + c[2]) / 2,
                (c[1] + c[3]) / 2,
                (c[2] - c[0]) / 2,
                (c[3] - c[1]) / 2,
            )
            mask |= ((xs - cx) / a) ** 2 + ((ys - cy) / b) ** 2 <= 1
        else:
            points = np.column_stack([xs.ravel(), ys.ravel()])
            mask |= MplPath(np.reshape(c, (-1, 2))).contains_points(points).reshape(mask.shape)
    return mask


def _stored(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """Nearest-neighbour: stored pixel i shows the original pixel under its centre."""
    rows = np.floor((np.arange(height) + 0.5) * mask.shape[0] / height).astype(int)
    cols = np.floor((np.arange(width) + 0.5) * mask.shape[1] / width).astype(int)
    return mask[rows][:, cols]


def test_build_labels_masks_and_boxes_follow_the_csv(built):
    _, out, rows = built
    planted = {**TRAIN, **DEV}
    assert sorted(rows) == sorted(Path(n).stem for n in planted)
    index = VOCAB.names.index("Foreign Object")
    with_objects = [n for n, (_, cell) in planted.items() if cell]
    assert sum(r["labels"][index] == 1.0 for r in rows.values()) == len(with_objects) == 6
    assert sum(r["labels"][index] == 0.0 for r in rows.values()) == len(planted) - 6
    for name, (size, cell) in planted.items():
        row = rows[Path(name).stem]
        assert (row["orig_width"], row["orig_height"]) == size
        mask = np.asarray(Image.open(io.BytesIO(row["mask"]["bytes"]))) == 255
        expected = _stored(_expected_mask(cell, size), row["width"], row["height"])
        assert np.array_equal(mask, expected), name
        assert mask.any() == bool(cell)
        extra = json.loads(row["extra"])
        assert (
            len(extra.get("boxes", [])) == len(extra["shapes"]) == len(cell.split(";")) * bool(cell)
        )
    assert rows["00001"]["width"] == STORED and rows["00002"]["width"] == 40  # never upscaled
    # 00002: one rectangle (4, 6)-(20, 15) on a 40 x 36 image kept at its size
    assert json.loads(rows["00002"]["extra"])["boxes"] == [
        {"label": "Foreign Object", "x": 4.0, "y": 6.0, "w": 16.0, "h": 9.0}
    ]
    assert rows["00001"]["text_description"] == "No foreign object over the lung fields."
    assert rows["00002"]["text_category"] == "Foreign Object"


def test_dev_is_the_test_split_and_train_keeps_a_validation_share(built):
    _, out, rows = built
    assert {rows[Path(n).stem]["split"] for n in DEV} == {"test"}
    assert {rows[Path(n).stem]["split"] for n in TRAIN} <= {"train", "validation"}
    loaded = datasets.load_dataset(str(out))
    assert sum(len(loaded[s]) for s in loaded) == len(TRAIN) + len(DEV)
    assert len(loaded["test"]) == len(DEV)
    assert loaded["test"].features["mask"] == datasets.Image()
    assert validate_dataset(out) == []


def test_broken_missing_and_repeated_rows_are_quarantined_with_their_line(built):
    root, out, rows = built
    lines = (root / "train.csv").read_bytes().decode().split("\r\n")
    quarantine = {}
    for entry in map(json.loads, (out / "_build/quarantine.jsonl").read_text().splitlines()):
        quarantine.setdefault(entry["id"].split(":", 1)[1], []).append(entry["reason"])

    def line(name: str, cell: str) -> int:
        return lines.index(f"{name},{cell}") + 1

    for name, (cell, problem) in BROKEN.items():
        reason = quarantine[Path(name).stem][0]
        assert reason.startswith(f"unreadable annotation (train.csv line {line(name, cell)}: ")
        assert problem in reason
    assert quarantine["00020"] == [
        f"missing image: train.csv line {line('00020.jpg', '0 1 1 5 5')} names train/00020.jpg"
    ]
    first, again = line("00002.jpg", "0 4 6 20 15"), len(lines) - 3
    assert quarantine["00002"] == [
        f"00002.jpg listed again (train.csv line {again}; first at train.csv line {first})"
    ]
    assert len(quarantine["00030"]) == 2 and "00030" not in rows
    assert "conflicting annotations" in quarantine["00030"][0]
    assert "09999" not in rows and "09999" not in quarantine  # present, not listed: ignored


def test_a_release_without_dev_csv_or_an_image_folder_is_refused(tmp_path):
    root = tmp_path / "raw"
    root.mkdir()
    (root / "train.csv").write_text("image_name,annotation\n00001.jpg,\n")
    _jpeg(root / "train" / "00001.jpg", (16, 16), 0)
    with pytest.raises(UserError, match=r"not an Object-CXR release; missing dev\.csv"):
        build(load_pipeline("object_cxr"), root, tmp_path / "out", BuildOptions(progress=False))
    (root / "dev.csv").write_text("image_name,annotation\n08001.jpg,\n")
    with pytest.raises(UserError) as caught:
        build(load_pipeline("object_cxr"), root, tmp_path / "out", BuildOptions(progress=False))
    assert (
        str(caught.value)
        == f"{root / 'dev'}: image folder missing; dev.csv names the images of dev/"
    )


def test_the_documented_image_path_header_with_folders_in_the_names(tmp_path):
    # The challenge page documents `image_path,annotation` with paths; the file name is used.
    root = tmp_path / "raw"
    root.mkdir()
    (root / "train.csv").write_text("image_path,annotation\n/data/train/00001.jpg,0 1 1 5 5\n")
    (root / "dev.csv").write_text("image_path,annotation\ndev\\08001.jpg,\n")
    _jpeg(root / "train" / "00001.jpg", (16, 16), 0)
    _jpeg(root / "dev" / "08001.jpg", (16, 16), 1)
    out = tmp_path / "out"
    build(load_pipeline("object_cxr"), root, out, BuildOptions(progress=False, image_size=16))
    rows = {
        r["id"]: r for p in (out / "data").glob("*.parquet") for r in pq.read_table(p).to_pylist()
    }
    index = VOCAB.names.index("Foreign Object")
    assert {k: r["labels"][index] for k, r in rows.items()} == {
        "object_cxr:00001": 1.0,
        "object_cxr:08001": 0.0,
    }
