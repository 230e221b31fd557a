"""Tiny fundus releases shaped like the real ones (reference source-formats.md §4.8).

ODIR-5K (official workbook layout and Kaggle `full_df.csv` layout), RFMiD, APTOS 2019 and
EyePACS, each with its nasty cases: full-width commas between keywords, an anterior-segment
photograph, patient-level flags that disagree with an eye's keywords, a missing age, a duplicated
row, an eye with only quality keywords, an unknown keyword, RFMiD ids colliding across splits, an
inconsistent RFMiD row, APTOS's unlabelled test set, EyePACS names without extension and `.jpeg`
files, a label row with no image, mixed-case extensions, RGBA / P images, a mostly-black image
and unreadable files. Images are 24×20 RGB (a bright disc on black) so builds take a second.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

W, H = 24, 20
MODERATE = "Moderate Non-Proliferative Diabetic Retinopathy"
ODIR_HEADER = [
    "ID",
    "Patient Age",
    "Patient Sex",
    "Left-Fundus",
    "Right-Fundus",
    "Left-Diagnostic Keywords",
    "Right-Diagnostic Keywords",
    "N",
    "D",
    "G",
    "C",
    "A",
    "H",
    "M",
    "O",
]
RFMID_COLUMNS = (
    "DR,ARMD,MH,DN,MYA,BRVO,TSLN,ERM,LS,MS,CSR,ODC,CRVO,TV,AH,ODP,ODE,ST,AION,PT,RT,RS,CRS,EDN,"
    "RPEC,MHL,RP,CWS,CB,ODPM,PRH,MNF,HR,CRAO,TD,CME,PTCR,CF,VH,MCA,VS,BRAO,PLQ,HPED,CL"
).split(",")


def fundus_image(seed: int = 0, size: tuple[int, int] = (W, H), mode: str = "RGB") -> Image.Image:
    """A bright orange disc on a black frame (so --crop-borders has something to crop)."""
    image = Image.new("RGB", size, (0, 0, 0))
    draw = ImageDraw.Draw(image)
    w, h = size
    draw.ellipse((w // 5, h // 6, w - w // 5, h - h // 6), fill=(200, 90 + seed % 60, 40))
    if mode == "RGBA":
        return image.convert("RGBA")
    if mode == "P":
        return image.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return image


def save(image: Image.Image, path: Path, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt)


@dataclass
class Fixture:
    root: Path
    good: dict[str, dict] = field(default_factory=dict)  # id -> expected facts
    bad: dict[str, str] = field(default_factory=dict)  # id -> quarantine stage


# --- ODIR-5K --------------------------------------------------------------------------------

# ID, age, sex, left keywords, right keywords, N D G C A H M O (patient level)
ODIR_PATIENTS = [
    (0, "69", "Female", "cataract", "normal fundus", "0 0 0 1 0 0 0 0"),
    (1, "57", "Male", "normal fundus", "normal fundus", "1 0 0 0 0 0 0 0"),
    # full-width comma; patient-level D=1 although the right eye is normal
    (
        2,
        "",
        "Male",
        "moderate non proliferative retinopathy，lens dust",
        "normal fundus",
        "0 1 0 0 0 0 0 0",
    ),
    (
        4,
        "60",
        "Female",
        "anterior segment image",
        "pathological myopia，hypertensive retinopathy",
        "0 0 0 0 0 1 1 0",
    ),
    (
        5,
        "55",
        "Male",
        "lens dust，low image quality",
        "suspected glaucoma，drusen",
        "0 0 1 0 0 0 0 1",
    ),
    (
        6,
        "48",
        "Female",
        "epiretinal membrane，optic disc ghost",
        "normal fundus",
        "0 0 0 0 0 0 0 1",
    ),
    (7, "71", "Male", "normal fundus", "diabetic retinopathy", "0 1 0 0 0 0 0 0"),
]
# What the build must give for each eye: positives, quality flags, Normal?
ODIR_GOOD = {
    "odir:0_left": {"positives": ["Abnormal", "Cataract"], "quality": []},
    "odir:0_right": {"positives": ["Normal"], "quality": []},
    "odir:1_left": {"positives": ["Normal"], "quality": []},
    "odir:1_right": {"positives": ["Normal"], "quality": []},
    "odir:2_left": {
        "positives": ["Abnormal", "Moderate Non-Proliferative Diabetic Retinopathy"],
        "quality": ["lens dust"],
    },
    "odir:2_right": {"positives": ["Normal"], "quality": []},
    "odir:4_right": {
        "positives": ["Abnormal", "Hypertensive Retinopathy", "Pathological Myopia"],
        "quality": [],
    },
    "odir:5_right": {"positives": ["Abnormal", "Glaucoma Suspect", "Drusen"], "quality": []},
    "odir:6_left": {
        "positives": ["Abnormal", "Epiretinal Membrane", "Other Abnormality"],
        "quality": [],
    },
    "odir:7_right": {"positives": ["Abnormal", "Diabetic Retinopathy"], "quality": []},
}
ODIR_BAD = {
    "odir:4_left": "scan",  # anterior segment image
    "odir:5_left": "scan",  # only quality keywords
    "odir:6_right": "scan",  # label row with no image
    "odir:7_left": "image",  # unreadable file
}


def _odir_images(folder: Path, size=(W, H)) -> None:
    for pid, *_ in ODIR_PATIENTS:
        for side in ("left", "right"):
            name = f"{pid}_{side}.jpg"
            if name == "6_right.jpg":
                continue  # missing image
            if name == "5_right.jpg":
                name = "5_right.JPG"  # mixed-case extension
            if name == "7_left.jpg":
                folder.mkdir(parents=True, exist_ok=True)
                (folder / name).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
                continue
            save(fundus_image(pid * 2 + (side == "right"), size), folder / name, "JPEG")
    save(fundus_image(99, size), folder / "99_left.jpg", "JPEG")  # no row names it: ignored


def _odir_rows() -> list[list[str]]:
    return [
        [str(pid), age, sex, f"{pid}_left.jpg", f"{pid}_right.jpg", left, right, *flags.split()]
        for pid, age, sex, left, right, flags in ODIR_PATIENTS
    ]


def make_odir_official(root: Path) -> Fixture:
    """`ODIR-5K_Training_Annotations(Updated)_V2.xlsx` + `ODIR-5K_Training_Dataset/`."""
    from openpyxl import Workbook

    root.mkdir(parents=True, exist_ok=True)
    book = Workbook()
    sheet = book.active
    sheet.title = "Sheet1"
    sheet.append(ODIR_HEADER)
    for row in _odir_rows():
        # Numbers are numbers in the real workbook; the missing age is an empty cell.
        sheet.append(
            [int(row[0]), int(row[1]) if row[1] else None, *row[2:7]] + [int(v) for v in row[7:]]
        )
    book.save(root / "ODIR-5K_Training_Annotations(Updated)_V2.xlsx")
    _odir_images(root / "ODIR-5K_Training_Dataset")
    return Fixture(root, dict(ODIR_GOOD), dict(ODIR_BAD))


def make_odir_kaggle(root: Path) -> Fixture:
    """Kaggle: `full_df.csv` (one row per eye, one row twice) + original and 16×16 preprocessed."""
    root.mkdir(parents=True, exist_ok=True)
    header = [*ODIR_HEADER, "filepath", "labels", "target", "filename"]
    letters = "NDGCAHMO"
    lines = []
    for row in _odir_rows():
        flags = [int(v) for v in row[7:]]
        label = [letters[i] for i, v in enumerate(flags) if v][:1] or ["O"]
        for side in ("left", "right"):
            name = f"{row[0]}_{side}.jpg"
            lines.append(
                [
                    *row,
                    f"../input/ocular-disease-recognition-odir5k/ODIR-5K/Training Images/{name}",
                    str(label),
                    str(flags),
                    name,
                ]
            )
    lines.append(lines[3])  # 1_right duplicated
    with open(root / "full_df.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(lines)
    _odir_images(root / "ODIR-5K" / "ODIR-5K" / "Training Images")
    _odir_images(root / "preprocessed_images", size=(16, 16))
    fixture = Fixture(root, dict(ODIR_GOOD), dict(ODIR_BAD))
    return fixture


# --- RFMiD ----------------------------------------------------------------------------------

RFMID_FOLDERS = {
    "train": ("a. Training Set", "a. RFMiD_Training_Labels.csv"),
    "validation": ("b. Validation Set", "b. RFMiD_Validation_Labels.csv"),
    "test": ("c. Testing Set", "c. RFMiD_Testing_Labels.csv"),
}
# split -> rows (ID, Disease_Risk, positive columns)
RFMID_ROWS = {
    "train": [(1, 0, []), (2, 1, ["DR", "MH", "ODC"]), (3, 1, ["PTCR"])],
    "validation": [(1, 0, []), (2, 1, ["DR"]), (3, 1, [])],
    "test": [(1, 0, []), (2, 1, ["ARMD"]), (3, 0, []), (4, 0, ["DR"])],
}
RFMID_GOOD = {
    "rfmid:train-1": ["Normal"],
    "rfmid:train-2": ["Abnormal", "Diabetic Retinopathy", "Media Haze", "Optic Disc Cupping"],
    "rfmid:train-3": ["Abnormal", "Post-Traumatic Choroidal Rupture"],
    "rfmid:validation-1": ["Normal"],
    "rfmid:validation-2": ["Abnormal", "Diabetic Retinopathy"],
    "rfmid:validation-3": ["Abnormal"],
    "rfmid:test-1": ["Normal"],
    "rfmid:test-2": ["Abnormal", "Age-Related Macular Degeneration"],
}
RFMID_BAD = {"rfmid:test-3": "scan", "rfmid:test-4": "scan"}


def make_rfmid(root: Path) -> Fixture:
    for split, rows in RFMID_ROWS.items():
        folder, table = RFMID_FOLDERS[split]
        lines = ["ID,Disease_Risk," + ",".join(RFMID_COLUMNS)]
        for rid, risk, positives in rows:
            cells = ["1" if c in positives else "0" for c in RFMID_COLUMNS]
            lines.append(f"{rid},{risk}," + ",".join(cells))
            if (split, rid) == ("test", 3):
                continue  # label row with no image
            mode = "P" if (split, rid) == ("validation", 3) else "RGB"
            mode = "RGBA" if (split, rid) == ("train", 1) else mode
            save(
                fundus_image(rid, mode=mode),
                root / "1. Original Images" / folder / f"{rid}.png",
                "PNG",
            )
        gt = root / "2. Groundtruths"
        gt.mkdir(parents=True, exist_ok=True)
        (gt / table).write_text("\r\n".join(lines) + "\r\n")
    return Fixture(root, {k: {"positives": v} for k, v in RFMID_GOOD.items()}, dict(RFMID_BAD))


# --- APTOS 2019 -----------------------------------------------------------------------------

APTOS_ROWS = [
    ("000c1434d8d7", "2"),
    ("001639a390f0", "4"),
    ("0024cdab0c1e", "1"),
    ("002c21358ce6", "0"),
    ("005b95c28852", "3"),
    ("0083ee8054ee", "x"),  # not a grade
    ("00a8624548a9", "0"),  # no image
]
APTOS_BAD = {"aptos:0083ee8054ee": "scan", "aptos:00a8624548a9": "scan"}


def make_aptos(root: Path) -> Fixture:
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.csv").write_text(
        "id_code,diagnosis\n" + "".join(f"{a},{b}\n" for a, b in APTOS_ROWS)
    )
    (root / "test.csv").write_text("id_code\n0005cfc8afb6\n003f0afdcd15\n")
    (root / "sample_submission.csv").write_text("id_code,diagnosis\n0005cfc8afb6,0\n")
    for i, (code, _grade) in enumerate(APTOS_ROWS):
        if code == "00a8624548a9":
            continue
        if code == "005b95c28852":
            image = fundus_image(i, mode="RGBA")
        elif code == "002c21358ce6":  # mostly black, with a wide dark frame
            image = Image.new("RGB", (40, 20), (0, 0, 0))
            ImageDraw.Draw(image).ellipse((12, 2, 28, 18), fill=(60, 30, 10))
        else:
            image = fundus_image(i)
        save(image, root / "train_images" / f"{code}.png", "PNG")
    for code in ("0005cfc8afb6", "003f0afdcd15"):
        save(fundus_image(7), root / "test_images" / f"{code}.png", "PNG")
    good = {
        f"aptos:{code}": {"grade": int(grade)}
        for code, grade in APTOS_ROWS
        if f"aptos:{code}" not in APTOS_BAD
    }
    return Fixture(root, good, dict(APTOS_BAD))


# --- EyePACS --------------------------------------------------------------------------------

EYEPACS_TRAIN = [
    ("10_left", 0),
    ("10_right", 1),
    ("13_left", 2),
    ("13_right", 4),
    ("15_left", 3),  # no image
    ("15_right", 0),  # empty (unreadable) file
]
EYEPACS_TEST = [("1_left", 0, "Public"), ("1_right", 2, "Private")]


def make_eyepacs(root: Path) -> Fixture:
    root.mkdir(parents=True, exist_ok=True)
    (root / "trainLabels.csv").write_text(
        "image,level\n" + "".join(f"{n},{g}\n" for n, g in EYEPACS_TRAIN)
    )
    (root / "retinopathy_solution.csv").write_text(
        "image,level,Usage\n" + "".join(f"{n},{g},{u}\n" for n, g, u in EYEPACS_TEST)
    )
    for i, (name, _) in enumerate(EYEPACS_TRAIN):
        if name == "15_left":
            continue
        path = root / "train" / f"{name}.jpeg"
        if name == "15_right":
            path.write_bytes(b"")
            continue
        save(fundus_image(i), path, "JPEG")
    save(fundus_image(5), root / "train" / "99_left.jpeg", "JPEG")  # no label row: ignored
    for i, (name, _, _) in enumerate(EYEPACS_TEST):
        save(fundus_image(i + 10), root / "test" / f"{name}.jpeg", "JPEG")
    good = {f"eyepacs:{n}": {"grade": g, "split": None} for n, g in EYEPACS_TRAIN[:4]}
    good.update({f"eyepacs:{n}": {"grade": g, "split": "test"} for n, g, _ in EYEPACS_TEST})
    return Fixture(root, good, {"eyepacs:15_left": "scan", "eyepacs:15_right": "image"})


# --- IDRiD and Messidor-2 -------------------------------------------------------------------


def make_idrid(root: Path) -> Fixture:
    """Part B with the trailing-space header and empty trailing columns; part A with a mask gap."""
    grading = root / "B. Disease Grading"
    tables = {
        "a. IDRiD_Disease Grading_Training Labels.csv": [("IDRiD_001", 3, 2), ("IDRiD_002", 0, 0)],
        "b. IDRiD_Disease Grading_Testing Labels.csv": [("IDRiD_001", 2, 0), ("IDRiD_103", 0, 1)],
    }
    (grading / "2. Groundtruths").mkdir(parents=True)
    for table, rows in tables.items():
        lines = ["Image name,Retinopathy grade,Risk of macular edema ,,"]
        lines += [f"{n},{g},{d},," for n, g, d in rows] + [",,,,"]
        (grading / "2. Groundtruths" / table).write_text("\r\n".join(lines) + "\r\n")
    for i, name in enumerate(("IDRiD_001", "IDRiD_002")):
        save(
            fundus_image(i),
            grading / "1. Original Images" / "a. Training Set" / f"{name}.jpg",
            "JPEG",
        )
    # Testing IDRiD_001 collides with training IDRiD_001 by name (a different image).
    save(
        fundus_image(5), grading / "1. Original Images" / "b. Testing Set" / "IDRiD_001.jpg", "JPEG"
    )
    seg = root / "A. Segmentation"
    save(fundus_image(1), seg / "1. Original Images" / "a. Training Set" / "IDRiD_01.jpg", "JPEG")
    mask = seg / "2. All Segmentation Groundtruths" / "a. Training Set" / "1. Microaneurysms"
    save(Image.new("L", (W, H)), mask / "IDRiD_01_MA.tif", "TIFF")
    severe = ["Abnormal", "Severe Non-Proliferative Diabetic Retinopathy", "Diabetic Macular Edema"]
    good = {
        "idrid:train-IDRiD_001": {"positives": severe},
        "idrid:train-IDRiD_002": {"positives": ["Normal"]},
        "idrid:test-IDRiD_001": {"positives": ["Abnormal", MODERATE]},
    }
    return Fixture(root, good, {"idrid:test-IDRiD_103": "scan"})


def make_messidor2(root: Path) -> Fixture:
    """`messidor_data.csv` with an ungradable row and mixed-case extensions."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "messidor_data.csv").write_text(
        "image_id,adjudicated_dr_grade,adjudicated_dme,adjudicated_gradable\n"
        "20051019_38557_0100_PP.png,0,0,1\n"
        "20051020_43808_0100_PP.jpg,2,1,1\n"
        "IM002385.jpg,,,0\n"
    )
    images = root / "IMAGES"
    save(fundus_image(1), images / "20051019_38557_0100_PP.png", "PNG")
    save(fundus_image(2), images / "20051020_43808_0100_PP.JPG", "JPEG")
    save(fundus_image(3), images / "IM002385.JPG", "JPEG")
    good = {
        "messidor2:20051019_38557_0100_PP": {"positives": ["Normal"]},
        "messidor2:20051020_43808_0100_PP": {
            "positives": ["Abnormal", MODERATE, "Diabetic Macular Edema"]
        },
    }
    return Fixture(root, good, {"messidor2:IM002385": "scan"})
