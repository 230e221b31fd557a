"""SIIM-ACR and RSNA Pneumonia releases built from their REAL annotation files.

The annotation CSVs that the `torchxrayvision` wheel ships are read whole; a subset of their
images (every kind of row: negatives, one region, several regions) gets a small generated DICOM
named as the CSV says, in the release's folder layout. Header fields of the RSNA DICOMs are
copied from the real header table of the same patient.
"""

from __future__ import annotations

import csv
import gzip
import io
import warnings
import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np
from pydicom.uid import ExplicitVRLittleEndian

from tests.dicom_fixture import chest, make_dx, to_bytes

XRV_DATA = Path(__import__("torchxrayvision").__file__).parent / "data"
SIIM_CSV = XRV_DATA / "siim-pneumothorax-train-rle.csv.gz"
RSNA_ZIP = XRV_DATA / "kaggle_stage_2_train_labels.csv.zip"
RSNA_HEADERS = XRV_DATA / "kaggle_stage_2_train_images_dicom_headers.csv.gz"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # the SOP class both releases' DICOMs carry
DICOM_SIZE = 128  # the real DICOMs are 1024 x 1024; regions are given in that frame


def siim_rows() -> list[tuple[str, str]]:
    """Every (ImageId, EncodedPixels) row of the real SIIM-ACR `train-rle.csv`."""
    with gzip.open(SIIM_CSV, "rt", newline="") as f:
        reader = csv.reader(f)
        assert next(reader) == ["ImageId", " EncodedPixels"]
        return [(row[0], row[1]) for row in reader]


def rsna_rows() -> list[dict[str, str]]:
    """Every row of the real RSNA `stage_2_train_labels.csv`."""
    with zipfile.ZipFile(RSNA_ZIP) as archive:
        text = archive.read("stage_2_train_labels.csv").decode()
    return list(csv.DictReader(io.StringIO(text)))


def _pick(groups: dict[str, list], kinds: list[tuple[int, object]]) -> list[str]:
    """Ids in file order: `count` ids of each kind (a predicate on a group's rows)."""
    chosen: list[str] = []
    for count, wanted in kinds:
        found = [key for key, rows in groups.items() if wanted(rows) and key not in chosen]
        chosen += found[:count]
    return chosen


def _dicom(pixels_seed: int, **tags) -> bytes:
    """An 8-bit MONOCHROME2 secondary-capture DICOM like both releases' (uncompressed here)."""
    pixels = (chest(DICOM_SIZE, DICOM_SIZE) // 16).astype(np.uint16)
    pixels = np.roll(pixels, pixels_seed % 17, axis=1)
    ds = make_dx(pixels, phi=False, sop_class=SECONDARY_CAPTURE)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = pixels.astype(np.uint8).tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Modality = "CR"
    del ds.PresentationIntentType
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return to_bytes(ds)


def make_siim(root: Path) -> tuple[Path, dict]:
    """A SIIM-ACR release of 30 real images (+ a broken row, a missing DICOM, a test image).

    Returns the root and what was planted: `rows` (the CSV rows written, by image id),
    `missing` (an id without DICOM), `broken` (an id whose row cannot be decoded).
    """
    groups: dict[str, list[str]] = defaultdict(list)
    for image_id, code in siim_rows():
        groups[image_id].append(code)
    negative = lambda codes: codes == ["-1"]  # noqa: E731
    single = lambda codes: len(codes) == 1 and codes != ["-1"]  # noqa: E731
    several = lambda codes: len(codes) >= 3  # noqa: E731
    chosen = _pick(groups, [(14, negative), (10, single), (6, several)])
    missing = next(k for k, codes in groups.items() if single(codes) and k not in chosen)
    broken = "1.2.276.0.7230010.3.1.4.8323329.99999.1517875999.999999"
    rows = {k: groups[k] for k in [*chosen, missing]}
    rows[broken] = ["557374 2 1015 x8"]
    lines = ["ImageId, EncodedPixels"]
    lines += [f"{k},{code}" for k in sorted(rows) for code in rows[k]]
    root.mkdir(parents=True, exist_ok=True)
    (root / "train-rle.csv").write_text("\n".join(lines) + "\n")
    for n, image_id in enumerate(sorted([*chosen, broken])):
        folder = root / "dicom-images-train" / f"1.2.276.0.7230010.3.1.2.{n}" / f"1.2.3.{n}"
        folder.mkdir(parents=True)
        tags = {"SOPInstanceUID": image_id, "PatientID": f"patient-{n}", "ViewPosition": "PA"}
        (folder / f"{image_id}.dcm").write_bytes(_dicom(n, **tags))
    test = root / "dicom-images-test" / "1.2.9" / "1.2.9.1"
    test.mkdir(parents=True)
    (test / "1.2.9.1.1.dcm").write_bytes(_dicom(99, SOPInstanceUID="1.2.9.1.1"))
    return root, {"rows": rows, "missing": missing, "broken": broken}


def _headers(ids: set[str]) -> dict[str, dict[str, str]]:
    """The real DICOM header fields of the given patients (RSNA's header table)."""
    with gzip.open(RSNA_HEADERS, "rt", newline="") as f:
        return {row["PatientID"]: row for row in csv.DictReader(f) if row["PatientID"] in ids}


def make_rsna(root: Path) -> tuple[Path, dict]:
    """An RSNA Pneumonia release of 30 real patients (+ a missing DICOM, a bad Target row)."""
    groups: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in rsna_rows():
        groups[row["patientId"]].append(row)
    negative = lambda rows: rows[0]["Target"] == "0"  # noqa: E731
    boxes = lambda n: lambda rows: rows[0]["Target"] == "1" and len(rows) == n  # noqa: E731
    chosen = _pick(groups, [(14, negative), (6, boxes(1)), (8, boxes(2)), (1, boxes(3)),
                            (1, boxes(4))])  # fmt: skip
    missing = next(k for k, rows in groups.items() if negative(rows) and k not in chosen)
    bad = "ffffffff-0000-4000-8000-000000000000"
    rows = {k: groups[k] for k in [*chosen, missing]}
    rows[bad] = [dict(patientId=bad, x="", y="", width="", height="", Target="yes")]
    columns = ["patientId", "x", "y", "width", "height", "Target"]
    lines = [",".join(columns)] + [
        ",".join(row[c] for c in columns) for k in sorted(rows) for row in rows[k]
    ]
    root.mkdir(parents=True, exist_ok=True)
    (root / "stage_2_train_labels.csv").write_text("\n".join(lines) + "\n")
    headers = _headers(set(chosen))
    assert set(headers) == set(chosen)  # every generated DICOM but the bad row's copies real fields
    images = root / "stage_2_train_images"
    images.mkdir()
    for n, patient in enumerate(sorted([*chosen, bad])):
        real = headers.get(patient, {})
        tags = {
            "PatientID": patient,
            "BodyPartExamined": real.get("BodyPartExamined", "CHEST"),
            "ViewPosition": real.get("ViewPosition", "PA"),
            "PatientSex": real.get("PatientSex", "M"),
            "PatientAge": real.get("PatientAge", "51"),
            "ConversionType": real.get("ConversionType", "WSD"),
            "PixelSpacing": [real.get("PixelSpacing", "0.14")[:8]] * 2,
        }
        with warnings.catch_warnings():  # RSNA writes PatientAge as "51", not the AS "051Y"
            warnings.simplefilter("ignore", UserWarning)
            (images / f"{patient}.dcm").write_bytes(_dicom(n, **tags))
    return root, {"rows": rows, "missing": missing, "bad": bad}
