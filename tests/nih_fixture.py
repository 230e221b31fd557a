"""Tiny ChestX-ray14 releases shaped like the real one (reference §2.6), built from real CSV rows.

The rows come from the real `Data_Entry_2017_v2020.csv.gz` and `BBox_List_2017.csv.gz` shipped
in the torchxrayvision wheel; images are small generated PNGs in the modes met in the wild, plus
the nasty cases: RGBA, LA, P, 16-bit, a truncated file, a missing file, a row in neither split
list, a row with an unknown label, and an image that no row names.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import importlib.util
import io
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
    "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"


def xrv_data_file(name: str) -> Path:
    """A data file shipped in the torchxrayvision wheel (found without importing torch)."""
    spec = importlib.util.find_spec("torchxrayvision")
    assert spec and spec.submodule_search_locations, "torchxrayvision is a [test] dependency"
    return Path(spec.submodule_search_locations[0]) / "data" / name


def real_rows() -> list[dict[str, str]]:
    """All 112,120 rows of the real v2020 Data_Entry file, as strings."""
    with gzip.open(xrv_data_file("Data_Entry_2017_v2020.csv.gz"), "rt", newline="") as f:
        reader = csv.reader(f)
        next(reader)
        return [dict(zip(_FIELDS, row, strict=True)) for row in reader]


def real_boxes() -> list[list[str]]:
    with gzip.open(xrv_data_file("BBox_List_2017.csv.gz"), "rt", newline="") as f:
        reader = csv.reader(f)
        next(reader)
        return [row[:6] for row in reader]


_FIELDS = ["index", "labels", "follow_up", "patient", "age", "sex", "view", "w", "h", "sx", "sy"]


def is_test_patient(patient: str) -> bool:
    return hashlib.sha256(f"fixture-test:{int(patient)}".encode()).digest()[0] < 64


@dataclass
class NihFixture:
    """A generated release and what a correct build must make of it."""

    root: Path
    rows: list[
        dict[str, str]
    ]  # every Data_Entry row written (real ones, plus the unknown-label row)
    good: set[str] = field(default_factory=set)  # image names that must become records
    bad: dict[str, str] = field(default_factory=dict)  # image name -> expected quarantine stage
    modes: dict[str, str] = field(default_factory=dict)  # image name -> mode written
    boxes: list[list[str]] = field(default_factory=list)
    test_names: set[str] = field(default_factory=set)
    train_val_names: set[str] = field(default_factory=set)


def select_rows(count: int) -> list[dict[str, str]]:
    """`count` real rows from whole patients, including the multi-label and boxed ones."""
    rows = real_rows()
    boxed = {b[0] for b in real_boxes()}
    by_patient: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_patient.setdefault(row["patient"], []).append(row)
    chosen: list[dict[str, str]] = []
    # Patients 1..N cover multi-label and non-alphabetical rows; add patients with boxes.
    all_boxes = real_boxes()
    counts: dict[str, int] = {}
    for b in all_boxes:
        counts[b[0]] = counts.get(b[0], 0) + 1
    wanted = [
        next(b[0] for b in all_boxes if b[1] == "Infiltrate"),  # the box-file spelling
        next(name for name, n in sorted(counts.items()) if n >= 2),  # two boxes on one image
        sorted(boxed)[0],
    ]
    boxed_patients = [str(int(name[:8])) for name in wanted]
    for patient in boxed_patients + [str(p) for p in range(1, 30806)]:
        if len(chosen) >= count:
            break
        if patient in by_patient and all(r not in chosen for r in by_patient[patient]):
            chosen.extend(by_patient[patient])
    return sorted(chosen[:count], key=lambda r: r["index"])


def _png(mode: str, size: tuple[int, int], rng: np.random.Generator) -> bytes:
    grey = rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8)
    if mode == "I;16":
        image = Image.fromarray(grey.astype(np.uint16) * 16)  # 16-bit PNG, 12-bit range
    elif mode == "P":
        image = Image.fromarray(grey, mode="L").convert("P")
    else:
        image = Image.fromarray(grey, mode="L").convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def make_release(
    root: Path,
    count: int = 40,
    layout: str = "kaggle",
    dialect: str = "v2020",
    seed: int = 0,
) -> NihFixture:
    """Write a release of `count` real rows under `root` in the given layout and dialect.

    layout: `kaggle` (images_001/images/*.png), `box` (images/images_001.tar.gz read directly),
    `extracted` (images/*.png).
    """
    rng = np.random.default_rng(seed)
    rows = select_rows(count)
    unknown = dict(
        rows[-1],
        index="00030999_000.png",
        labels="Atelectasis|Lung_Spots",
        patient="30999",
        follow_up="0",
    )
    rows.append(unknown)
    fixture = NihFixture(root=root, rows=rows)
    names = [r["index"] for r in rows]
    special = {names[1]: "RGBA", names[2]: "LA", names[3]: "I;16", names[4]: "P", names[5]: "RGB"}
    truncated, missing, orphan = names[6], names[7], names[8]
    fixture.bad = {truncated: "image", missing: "image", orphan: "scan", unknown["index"]: "labels"}
    fixture.good = set(names) - set(fixture.bad)

    images: dict[str, bytes] = {}
    for name in names:
        if name == missing:
            continue
        mode = special.get(name, "L")
        fixture.modes[name] = mode
        data = _png(mode, (24, 16) if name == names[9] else (16, 16), rng)
        images[name] = data[: len(data) // 2] if name == truncated else data
    images["00099999_000.png"] = _png("L", (16, 16), rng)  # named by no row: ignored
    _write_images(root, images, layout)

    _write_data_entry(root, rows, dialect)
    fixture.boxes = _write_boxes(root, names)
    for name, row in zip(names, rows, strict=True):
        if name == orphan:
            continue
        (fixture.test_names if is_test_patient(row["patient"]) else fixture.train_val_names).add(
            name
        )
    # The lists use CRLF and lack a final newline, as some copies do.
    (root / "test_list.txt").write_bytes("\r\n".join(sorted(fixture.test_names)).encode())
    (root / "train_val_list.txt").write_text("\n".join(sorted(fixture.train_val_names)) + "\n")
    return fixture


def _write_images(root: Path, images: dict[str, bytes], layout: str) -> None:
    if layout == "box":
        (root / "images").mkdir(parents=True, exist_ok=True)
        names = sorted(images)
        half = len(names) // 2
        for number, chunk in ((1, names[:half]), (2, names[half:])):
            with tarfile.open(root / "images" / f"images_{number:03d}.tar.gz", "w:gz") as tar:
                for name in chunk:
                    info = tarfile.TarInfo(f"images/{name}")
                    info.size = len(images[name])
                    tar.addfile(info, io.BytesIO(images[name]))
        return
    for number, name in enumerate(sorted(images)):
        if layout == "kaggle":
            folder = root / f"images_{number % 2 + 1:03d}" / "images"
        else:
            folder = root / "images"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(images[name])


def _write_data_entry(root: Path, rows: list[dict[str, str]], dialect: str) -> None:
    if dialect == "v2020":
        lines = [HEADER] + [",".join(r[k] for k in _FIELDS) for r in rows]
        (root / "Data_Entry_2017_v2020.csv").write_text("\n".join(lines) + "\n")
        return
    # The 2017 original: CRLF, trailing comma in the header, zero-padded ids, `058Y` ages.
    lines = [HEADER + ","]
    for k, r in enumerate(rows):
        unit = "M" if k == 0 else "Y"
        age = f"{int(r['age']):03d}{unit}"
        lines.append(
            ",".join(
                [
                    r["index"],
                    r["labels"],
                    f"{int(r['follow_up']):03d}",
                    f"{int(r['patient']):08d}",
                    age,
                    r["sex"],
                    r["view"],
                    r["w"],
                    r["h"],
                    "0.143",
                    "0.143",
                ]
            )
        )
    (root / "Data_Entry_2017.csv").write_bytes(("\r\n".join(lines) + "\r\n").encode())


def _write_boxes(root: Path, names: list[str]) -> list[list[str]]:
    present = set(names)
    boxes = [b for b in real_boxes() if b[0] in present]
    with open(root / "BBox_List_2017.csv", "w", newline="") as f:
        f.write(BBOX_HEADER + "\n")
        csv.writer(f, lineterminator="\n").writerows(boxes)
    return boxes
