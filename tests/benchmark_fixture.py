"""Small CheXpert, VinDr-CXR and ChestX-ray14 (+ Google relabels) releases from the real CSVs.

The rows are the real ones shipped in the torchxrayvision wheel (`chexpert_train.csv.gz`,
`vinbigdata-train.csv.gz`, `google2019_nih-chest-xray-labels.csv.gz`,
`Data_Entry_2017_v2020.csv.gz`); only a few dozen of them get a generated image, named as the
CSV names it, so builds stay fast.
"""

from __future__ import annotations

import csv
import gzip
import io
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from tests.dicom_fixture import chest, make_dx, to_bytes
from tests.nih_fixture import _FIELDS as NIH_FIELDS
from tests.nih_fixture import HEADER as NIH_HEADER
from tests.nih_fixture import real_rows as nih_rows
from tests.nih_fixture import xrv_data_file

CHEXPERT_LABELS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices",
)  # fmt: skip
COMPETITION = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
GOOGLE_COLUMNS = ("Fracture", "Pneumothorax", "Airspace opacity", "Nodule or mass")


def read_gz_csv(name: str) -> tuple[list[str], list[dict[str, str]]]:
    """The header and every row of a real CSV shipped in the torchxrayvision wheel."""
    with gzip.open(xrv_data_file(name), "rt", newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _write_csv(path: Path, header: list[str], rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, header, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _jpeg(rng: np.random.Generator, size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size[::-1], dtype=np.uint8), "L").save(buffer, "JPEG")
    return buffer.getvalue()


# --- CheXpert --------------------------------------------------------------------------------


@dataclass
class ChexpertFixture:
    root: Path
    header: list[str]
    train: list[dict[str, str]]  # train.csv rows as written
    valid: list[dict[str, str]]  # valid.csv rows as written
    missing: set[str] = field(default_factory=set)  # Paths without an image
    bad: set[str] = field(default_factory=set)  # Paths with an unreadable label cell


def make_chexpert(root: Path, train_count: int = 30, valid_count: int = 8) -> ChexpertFixture:
    """CheXpert-v1.0-small/ with the first real patients' rows and a JPEG for each.

    valid.csv takes real rows of later patients, moved under `valid/`; one train row has no image
    and one has a label cell that is not 1.0/0.0/-1.0/blank.
    """
    header, rows = read_gz_csv("chexpert_train.csv.gz")
    train = [dict(r) for r in rows[:train_count]]
    valid = []
    for k, row in enumerate(rows[1000 : 1000 + valid_count]):
        parts = row["Path"].split("/")
        valid.append(
            dict(row, Path="/".join([parts[0], "valid", f"patient{64541 + k}", *parts[3:]]))
        )
    train[-1] = dict(train[-1], Edema="2.0")
    fixture = ChexpertFixture(root, header, train, valid, {train[-2]["Path"]}, {train[-1]["Path"]})
    release = root / "CheXpert-v1.0-small"
    _write_csv(release / "train.csv", header, train)
    _write_csv(release / "valid.csv", header, valid)
    rng = np.random.default_rng(0)
    for row in train + valid:
        if row["Path"] in fixture.missing:
            continue
        path = root / row["Path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_jpeg(rng, (32, 28)))
    return fixture


def make_chexpert_5x200(root: Path, chosen_paths: list[str]) -> Path:
    """The whole real train.csv (gzipped, as found) with JPEGs for `chosen_paths` only."""
    release = root / "CheXpert-v1.0-small"
    release.mkdir(parents=True)
    shutil.copyfile(xrv_data_file("chexpert_train.csv.gz"), release / "train.csv.gz")
    rng = np.random.default_rng(1)
    for rel in chosen_paths:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_jpeg(rng, (24, 20)))
    return release


# --- VinDr-CXR -------------------------------------------------------------------------------


@dataclass
class VindrFixture:
    root: Path
    train: list[dict[str, str]]  # annotation rows written (real)
    test: list[dict[str, str]]  # annotations_test.csv rows (no rad_id: one consensus reader)
    sizes: dict[str, tuple[int, int]]  # image id -> DICOM (columns, rows)
    missing: str = ""  # image id in the annotations without a DICOM


def vindr_by_image(rows: list[dict[str, str]]) -> dict[str, list[dict[str, str]]]:
    """The annotation rows of each image id, in file order."""
    found: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        found.setdefault(row["image_id"], []).append(row)
    return found


def make_vindr(root: Path, count: int = 12) -> VindrFixture:
    """annotations/annotations_train.csv (+ _test) and train/, test/ of `<image_id>.dicom`.

    The images are the first real ones with a disagreement between readers, then all-"No
    finding" ones; one more image id has rows but no DICOM.
    """
    header, rows = read_gz_csv("vinbigdata-train.csv.gz")
    by_image = vindr_by_image(rows)
    split_votes = [i for i, r in by_image.items() if len({x["class_name"] for x in r}) > 2]
    normal = [i for i, r in by_image.items() if {x["class_name"] for x in r} == {"No finding"}]
    chosen = split_votes[: count - 3] + normal[:3]
    missing = split_votes[count]
    train = [row for image_id in chosen + [missing] for row in by_image[image_id]]
    test_ids = split_votes[count + 1 : count + 3]
    # The test table is one consensus: one reader's rows, without the rad_id column.
    test = [
        {k: v for k, v in row.items() if k != "rad_id"}
        for image_id in test_ids
        for row in by_image[image_id]
        if row["rad_id"] == by_image[image_id][0]["rad_id"]
    ]
    _write_csv(root / "annotations" / "annotations_train.csv", header, train)
    _write_csv(
        root / "annotations" / "annotations_test.csv", [h for h in header if h != "rad_id"], test
    )
    sizes = {}
    for k, image_id in enumerate(chosen + test_ids):
        cols, rws = 64 - 2 * (k % 3), 56 + k % 2 * 8
        ds = make_dx(chest(rws, cols), photometric="MONOCHROME1" if k == 1 else "MONOCHROME2")
        folder = root / ("test" if image_id in test_ids else "train")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{image_id}.dicom").write_bytes(to_bytes(ds))
        sizes[image_id] = (cols, rws)
    return VindrFixture(root, train, test, sizes, missing)


# --- ChestX-ray14 with the Google relabels ---------------------------------------------------


@dataclass
class GoogleFixture:
    root: Path
    rows: list[dict[str, str]]  # Data_Entry rows written
    relabels: dict[str, dict[str, str]]  # image name -> its relabel row (real), for all 4,376


def make_nih_with_relabels(root: Path, relabelled: int = 10, plain: int = 6) -> GoogleFixture:
    """A Kaggle-layout ChestX-ray14 release of real rows, `relabelled` of which have a Google
    relabel (the real table is copied whole), and `plain` of which do not."""
    _, google = read_gz_csv("google2019_nih-chest-xray-labels.csv.gz")
    relabels = {row["Image Index"]: row for row in google}
    entries = nih_rows()
    # Relabels with a YES in each column, then ones without a relabel.
    picked: list[dict[str, str]] = []
    for column in GOOGLE_COLUMNS * 3:
        name = next(
            n
            for n, r in relabels.items()
            if r[column] == "YES" and n not in {p["index"] for p in picked}
        )
        picked.append(next(r for r in entries if r["index"] == name))
        if len(picked) == relabelled:
            break
    picked += [r for r in entries if r["index"] not in relabels][:plain]
    rows = sorted(picked, key=lambda r: r["index"])
    rng = np.random.default_rng(2)
    folder = root / "images_001" / "images"
    folder.mkdir(parents=True)
    for row in rows:
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), "L").save(buffer, "PNG")
        (folder / row["index"]).write_bytes(buffer.getvalue())
    lines = [NIH_HEADER] + [",".join(r[k] for k in NIH_FIELDS) for r in rows]
    (root / "Data_Entry_2017_v2020.csv").write_text("\n".join(lines) + "\n")
    test = [r["index"] for r in rows if relabels.get(r["index"], {}).get("Set Id") == "test"]
    (root / "test_list.txt").write_text("\n".join(test) + "\n")
    rest = [r["index"] for r in rows if r["index"] not in test]
    (root / "train_val_list.txt").write_text("\n".join(rest) + "\n")
    shutil.copyfile(
        xrv_data_file("google2019_nih-chest-xray-labels.csv.gz"),
        root / "google2019_nih-chest-xray-labels.csv.gz",
    )
    return GoogleFixture(root, rows, relabels)
