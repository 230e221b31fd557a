"""A synthetic ChestX-ray14-shaped release for `mgll-build-dataset demo`.

It copies the real layout (Kaggle copy: `images_001/images/*.png`, the v2020 `Data_Entry` CSV
with its exact header, `BBox_List_2017.csv`, the two split lists) and the real label mix: the
share of `No Finding` and each finding's frequency among abnormal images follow the v2020 counts.
Test patients are chosen by a hash, so the three splits are patient-disjoint.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from .synthetic import synthetic_radiograph

DATA_ENTRY_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
    "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"

# Image counts per label in Data_Entry_2017_v2020.csv (112,120 images).
V2020_COUNTS = {
    "Infiltration": 19894,
    "Effusion": 13317,
    "Atelectasis": 11559,
    "Nodule": 6331,
    "Mass": 5782,
    "Pneumothorax": 5302,
    "Consolidation": 4667,
    "Pleural_Thickening": 3385,
    "Cardiomegaly": 2776,
    "Emphysema": 2516,
    "Edema": 2303,
    "Fibrosis": 1686,
    "Pneumonia": 1431,
    "Hernia": 227,
}
NO_FINDING_SHARE = 60361 / 112120
ABNORMAL_IMAGES = 112120 - 60361
BOXED = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
)
_BOX_NAME = {"Infiltration": "Infiltrate"}  # BBox_List_2017.csv's spelling


def sample_findings(rng: np.random.Generator) -> list[str]:
    """One image's findings: `No Finding`, or each finding with its share among abnormal images."""
    if rng.random() < NO_FINDING_SHARE:
        return ["No Finding"]
    while True:
        found = [name for name, n in V2020_COUNTS.items() if rng.random() < n / ABNORMAL_IMAGES]
        if found:
            return sorted(found)


def _is_test_patient(patient: int, seed: int) -> bool:
    digest = hashlib.sha256(f"demo-test:{seed}:{patient}".encode()).digest()
    return digest[0] < 0.2 * 256


def write_demo_release(
    root: Path, n: int = 200, seed: int = 0, image_size: int = 1024, progress: bool | None = False
) -> Path:
    """Write a synthetic release of `n` images under `root` (deterministic for a seed).

    `progress`: show a bar (None: when stderr is a terminal, as the build's bar does)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows, boxes, train_val, test = [], [], [], []
    patient, image_no = 0, 0
    bar = tqdm(total=n, desc="generate demo release", unit="img", disable=bar_disabled(progress))
    while len(rows) < n:
        patient += 1
        age, sex = int(rng.integers(1, 95)), str(rng.choice(["M", "F"]))
        for follow_up in range(min(int(rng.integers(1, 5)), n - len(rows))):
            name = f"{patient:08d}_{follow_up:03d}.png"
            findings = sample_findings(rng)
            view = "PA" if rng.random() < 0.6 else "AP"
            width, height = int(rng.choice([2500, 2992, 3056, 2048])), int(rng.choice([2048, 2991]))
            rows.append(
                [
                    name,
                    "|".join(findings),
                    follow_up,
                    patient,
                    age,
                    sex,
                    view,
                    width,
                    height,
                    0.14300000000000002,
                    0.14300000000000002,
                ]
            )
            (test if _is_test_patient(patient, seed) else train_val).append(name)
            folder = root / f"images_{image_no // 10000 + 1:03d}" / "images"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = synthetic_radiograph(image_size, set(findings), rng)
            Image.fromarray(pixels, mode="L").save(folder / name, compress_level=1)
            for finding in findings:
                if finding in BOXED and rng.random() < 0.2:
                    x, y = rng.uniform(100, 700, 2)
                    w, h = rng.uniform(40, 300, 2)
                    boxes.append([name, _BOX_NAME.get(finding, finding), x, y, w, h])
            image_no += 1
            bar.update()
    bar.close()
    write_release_tables(root, rows, train_val, test, boxes)
    return root


def bar_disabled(progress: bool | None) -> bool | None:
    """tqdm's `disable`: None lets tqdm hide the bar when stderr is not a terminal."""
    return None if progress is None else not progress


def build_demo(out: Path, n: int, seed: int, options: Any) -> Any:
    """Write the release under ``out/_raw`` and build it with the demo's `chestxray14` pipeline,
    whose card says the data is synthetic."""
    import shutil

    from ..build.engine import build
    from .pipelines import demo_pipeline

    root = out / "_raw"
    if not (options.resume and root.is_dir()):  # --resume reads the release it began with
        shutil.rmtree(root, ignore_errors=True)
        write_demo_release(root, n=n, seed=seed, progress=options.progress)
    return build(demo_pipeline(n, seed), root, out, options)


def write_release_tables(
    root: Path,
    rows: list[list],
    train_val: list[str],
    test: list[str],
    boxes: list[list] | None = None,
) -> None:
    """ChestX-ray14's tables: `Data_Entry_2017_v2020.csv` (and `BBox_List_2017.csv` when
    `boxes` is given) in NIH's dialect, plus the two split lists."""
    with open(root / "Data_Entry_2017_v2020.csv", "w", newline="") as f:
        f.write(DATA_ENTRY_HEADER + "\n")
        csv.writer(f, lineterminator="\n").writerows(rows)
    if boxes is not None:
        with open(root / "BBox_List_2017.csv", "w", newline="") as f:
            f.write(BBOX_HEADER + "\n")
            csv.writer(f, lineterminator="\n").writerows(boxes)
    (root / "train_val_list.txt").write_text("".join(f"{r}\n" for r in train_val))
    (root / "test_list.txt").write_text("".join(f"{r}\n" for r in test))
