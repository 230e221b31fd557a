#!/usr/bin/env python3
"""Build a tiny, independent, realistic MIMIC-CXR-JPG 2.0.0 + MIMIC-CXR 2.0.0 release.

Layout mimics what `wget -r -N -c -np https://physionet.org/files/<project>/2.0.0/` leaves:

    release/physionet.org/robots.txt
    release/physionet.org/files/mimic-cxr-jpg/2.0.0/...   (JPGs + label/metadata/split CSVs)
    release/physionet.org/files/mimic-cxr/2.0.0/...       (DICOMs + reports + record lists)

(wget also leaves an index.html in every directory it recursed through; those are
reproduced too.)

Written by a separate author from the public format description only (the project's
shared/reference/source-formats.md, sections 1 and 3.4-3.5), without reading the project's code
or its own fixture, as an acceptance fixture for the MIMIC-CXR source.
Deterministic: fixed seeds, gzip mtime 0, fixed zip timestamps.

Usage: python mimic_release.py [OUT_DIR]; writes OUT_DIR/release/, OUT_DIR/expected.json
(ground truth per dicom_id) and OUT_DIR/nasty_cases.json (OUT_DIR defaults to this folder).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import re
import shutil
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

HERE = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else Path(__file__).resolve().parent
REL = HERE / "release"
ROOT = REL / "physionet.org"
JPG_DIR = ROOT / "files" / "mimic-cxr-jpg" / "2.0.0"
CXR_DIR = ROOT / "files" / "mimic-cxr" / "2.0.0"

LABELS = [
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
]

FINAL_REPORT_LINE = " " * 33 + "FINAL REPORT"

# ----------------------------------------------------------------------------------------------
# Reports.  Each report is a list of blocks:
#   ("HEADER", "block"|"inline", [paragraph, ...])  -- a titled section
#   (None, None, [paragraph, ...])                  -- untitled paragraphs
# A paragraph is a str (wrapped) or a list of str (one line each, e.g. numbered items).
# "preamble" is raw lines placed above FINAL REPORT (WET READ block).
# ----------------------------------------------------------------------------------------------
REPORTS: dict[str, dict] = {}

REPORTS["50414267"] = dict(
    blocks=[
        ("EXAMINATION", "inline", ["CHEST (PA AND LAT)"]),
        (
            "INDICATION",
            "inline",
            ["___ year old woman with cough and low-grade fever  // eval for pneumonia"],
        ),
        ("TECHNIQUE", "inline", ["Chest PA and lateral"]),
        ("COMPARISON", "inline", ["Chest radiograph ___"]),
        (
            "FINDINGS",
            "block",
            [
                "The lungs are clear without focal consolidation.  No pleural effusion "
                "or pneumothorax is seen.  The cardiac and mediastinal silhouettes are "
                "within normal limits.  No acute osseous abnormalities."
            ],
        ),
        ("IMPRESSION", "block", ["No acute cardiopulmonary process."]),
    ]
)

REPORTS["53189527"] = dict(
    blocks=[
        ("EXAMINATION", "inline", ["CHEST (PA AND LAT)"]),
        (
            "INDICATION",
            "inline",
            ["___ with worsening shortness of breath, history of CHF  // ?fluid overload"],
        ),
        ("TECHNIQUE", "inline", ["AP and left lateral views of the chest"]),
        ("COMPARISON", "inline", ["___"]),
        (
            "FINDINGS",
            "block",
            [
                "Moderate cardiomegaly is unchanged.  There is moderate pulmonary "
                "vascular congestion with mild interstitial edema, slightly worse "
                "compared to the prior study.  Small bilateral pleural effusions with "
                "adjacent bibasilar atelectasis.  No pneumothorax.  A right-sided PICC "
                "terminates in the low SVC."
            ],
        ),
        (
            "IMPRESSION",
            "block",
            [
                [
                    "1.  Mild interstitial pulmonary edema and small bilateral pleural effusions.",
                    "2.  Stable moderate cardiomegaly.",
                    "3.  Right PICC tip in the low SVC.",
                    "4.  No pneumothorax.",
                ]
            ],
        ),
    ]
)

# No headers at all: free paragraphs (official splitter -> full report / last_paragraph)
REPORTS["53911762"] = dict(
    blocks=[
        (None, None, ["PA AND LATERAL CHEST, ___"]),
        (
            None,
            None,
            [
                "Comparison is made to the prior study from ___.  The heart size is normal.  "
                "The mediastinal and hilar contours are unremarkable.  There is a small nodular "
                "opacity projecting over the left mid lung measuring approximately 9 mm, not "
                "clearly seen on the prior examination.  The lungs are otherwise clear.  No "
                "pleural effusion or pneumothorax.",
                "Nine millimeter nodular opacity in the left mid lung.  Recommend chest CT for "
                "further evaluation.  These findings were discussed with Dr. ___ by Dr. ___ by "
                "telephone at 11:20 a.m. on ___.",
            ],
        ),
    ]
)

# WET READ block above FINAL REPORT, separated by a full line of underscores.
REPORTS["56699142"] = dict(
    preamble=[
        " WET READ: ___ ___ ___ 9:42 PM",
        "  Patchy left base opacity, could be atelectasis though infection is not",
        "  excluded.  No pneumothorax.",
        " " + "_" * 78,
    ],
    blocks=[
        ("EXAMINATION", "inline", ["CHEST (PA AND LAT)"]),
        ("INDICATION", "inline", ["___ year old man with fever and productive cough  // r/o pna"]),
        ("TECHNIQUE", "inline", ["Chest PA and lateral"]),
        ("COMPARISON", "inline", ["___"]),
        (
            "FINDINGS",
            "block",
            [
                "There is a new patchy opacity at the left lung base, best seen on "
                "the lateral view, which may reflect atelectasis, though pneumonia "
                "cannot be excluded.  There is no pleural effusion or pneumothorax. "
                " Heart size is normal.  The mediastinal and hilar contours are "
                "unremarkable."
            ],
        ),
        (
            "IMPRESSION",
            "block",
            [
                "Left basilar opacity, likely atelectasis, though pneumonia cannot "
                "be excluded in the appropriate clinical setting."
            ],
        ),
    ],
)

# Authored (labels are consistent with it) but NOT written to disk / zip: the missing report.
REPORTS["57375967"] = dict(
    missing=True,
    blocks=[
        ("EXAMINATION", "inline", ["CHEST (PA AND LAT)"]),
        (
            "INDICATION",
            "inline",
            ["___ year old man with left pleural effusion, s/p thoracentesis"],
        ),
        ("TECHNIQUE", "inline", ["AP and lateral views of the chest"]),
        ("COMPARISON", "inline", ["___"]),
        (
            "FINDINGS",
            "block",
            [
                "Interval decrease in size of the moderate left pleural effusion.  "
                "Residual left basilar opacity likely reflects atelectasis.  No "
                "pneumothorax."
            ],
        ),
        (
            "IMPRESSION",
            "block",
            [
                "Interval decrease in moderate left pleural effusion.  No "
                "pneumothorax following thoracentesis."
            ],
        ),
    ],
)

# Custom-rule study of the official splitter (custom_indices [0,0]: no conclusion at all).
REPORTS["58235663"] = dict(
    blocks=[
        ("EXAMINATION", "inline", ["CHEST (PORTABLE AP)"]),
        ("INDICATION", "inline", ["___ year old man with new right IJ line  // line placement"]),
        ("COMPARISON", "inline", ["___"]),
        (
            "NOTE",
            "inline",
            [
                "This image was obtained for line positioning and was reviewed with the "
                "clinical team at the time of the examination.  Please refer to the "
                "subsequent radiograph of ___ for the complete interpretation."
            ],
        ),
    ]
)

# Misspelled header IMPRESSON
REPORTS["59263316"] = dict(
    blocks=[
        ("EXAMINATION", "inline", ["CHEST (PA AND LAT)"]),
        (
            "INDICATION",
            "inline",
            ["History: ___M with right chest wall pain after mechanical fall"],
        ),
        ("TECHNIQUE", "inline", ["Chest PA and lateral"]),
        ("COMPARISON", "inline", ["None."]),
        (
            "FINDINGS",
            "block",
            [
                "There are acute, minimally displaced fractures of the right lateral "
                "sixth and seventh ribs.  No pneumothorax or pleural effusion.  The "
                "lungs are clear.  The cardiomediastinal silhouette is normal."
            ],
        ),
        (
            "IMPRESSON",
            "block",
            ["Acute right sixth and seventh rib fractures without pneumothorax."],
        ),
    ]
)

# Only an IMPRESSION header
REPORTS["51205541"] = dict(
    blocks=[
        (
            "IMPRESSION",
            "block",
            [
                "In comparison with the study of ___, the endotracheal tube has been "
                "removed.  The nasogastric tube extends to the stomach.  Persistent "
                "retrocardiac opacity likely reflects atelectasis.  No "
                "pneumothorax."
            ],
        ),
    ]
)

# One non-ASCII character (degree sign) to test decoding
REPORTS["54418863"] = dict(
    blocks=[
        ("EXAMINATION", "inline", ["CHEST (PA AND LAT)"]),
        (
            "INDICATION",
            "inline",
            ["___ year old woman with history of breast cancer, evaluate for metastatic disease."],
        ),
        ("TECHNIQUE", "inline", ["Chest PA and left lateral"]),
        ("COMPARISON", "inline", ["CT chest ___ and chest radiograph ___."]),
        (
            "FINDINGS",
            "block",
            [
                "Patient is rotated approximately 10\u00b0 to the right.  Postsurgical "
                "changes in the left axilla with surgical clips.  Heart size is top "
                "normal.  There is no focal consolidation, pleural effusion, or "
                "pneumothorax.  No discrete pulmonary nodules are identified."
            ],
        ),
        ("IMPRESSION", "block", ["No radiographic evidence of intrathoracic metastatic disease."]),
    ]
)

REPORTS["52781130"] = dict(
    blocks=[
        ("EXAMINATION", "inline", ["CHEST (PA AND LAT)"]),
        (
            "INDICATION",
            "inline",
            [
                "___ year old man with sudden onset left chest pain and dyspnea.  "
                "Evaluate for pneumothorax."
            ],
        ),
        ("TECHNIQUE", "inline", ["Chest PA and lateral"]),
        ("COMPARISON", "inline", ["None."]),
        (
            "FINDINGS",
            "block",
            [
                "There is a moderate left apical pneumothorax measuring approximately "
                "3 cm from the apex, without mediastinal shift.  The lungs are "
                "otherwise clear.  Heart size is normal.  No pleural effusion."
            ],
        ),
        ("IMPRESSION", "block", ["Moderate left apical pneumothorax without evidence of tension."]),
        (
            "NOTIFICATION",
            "inline",
            [
                "The findings were discussed with ___, M.D. by ___, M.D. on the "
                "telephone on ___ at 2:14 PM, 5 minutes after discovery of the "
                "findings."
            ],
        ),
    ]
)

REPORTS["55106824"] = dict(
    blocks=[
        ("EXAMINATION", "inline", ["CHEST (PA AND LAT)"]),
        ("INDICATION", "inline", ["___ year old woman with hypoxia, on BiPAP  // ?pna ?edema"]),
        ("TECHNIQUE", "inline", ["Upright AP and left lateral views of the chest"]),
        ("COMPARISON", "inline", ["___"]),
        (
            "FINDINGS",
            "block",
            [
                "Heart size is mildly enlarged.  There are bilateral hazy perihilar "
                "opacities with indistinct pulmonary vasculature, possibly reflecting "
                "mild pulmonary edema.  Superimposed infection at the right base "
                "cannot be excluded.  Small right pleural effusion.  No "
                "pneumothorax."
            ],
        ),
        (
            "IMPRESSION",
            "block",
            [
                [
                    "1. Possible mild pulmonary edema.",
                    "2. Right basilar opacity, may reflect atelectasis or pneumonia.",
                    "3. Small right pleural effusion.",
                ]
            ],
        ),
    ]
)

REPORTS["50883926"] = dict(
    blocks=[
        ("EXAMINATION", "inline", ["CHEST (PA AND LAT)"]),
        (
            "INDICATION",
            "inline",
            [
                "___ year old man with tuberculosis exposure, positive PPD.  "
                "Evaluate for active disease."
            ],
        ),
        ("TECHNIQUE", "inline", ["PA, lateral, and apical lordotic views of the chest"]),
        ("COMPARISON", "inline", ["___"]),
        (
            "FINDINGS",
            "block",
            [
                "Calcified granuloma in the right upper lobe is unchanged.  The apical "
                "lordotic view demonstrates no apical consolidation or cavitation.  "
                "The lungs are otherwise clear.  There is no pleural effusion or "
                "pneumothorax.  The cardiomediastinal silhouette is normal."
            ],
        ),
        (
            "IMPRESSION",
            "block",
            [
                "No radiographic evidence of active tuberculosis.  Stable calcified "
                "right upper lobe granuloma, consistent with prior granulomatous "
                "disease."
            ],
        ),
        ("RECOMMENDATION(S)", "inline", ["Clinical correlation."]),
    ]
)


def _wrap(text: str) -> list[str]:
    return [
        " " + ln
        for ln in textwrap.wrap(text, width=78, break_long_words=False, break_on_hyphens=False)
    ]


def _para_lines(p) -> list[str]:
    if isinstance(p, str):
        return _wrap(p)
    out = []
    for item in p:
        out += _wrap(item)
    return out


def render_report(rep: dict) -> str:
    lines = list(rep.get("preamble", []))
    lines.append(FINAL_REPORT_LINE)
    first = True
    for header, style, paras in rep["blocks"]:
        if not first:
            lines.append(" ")
        first = False
        if header is None:
            for i, p in enumerate(paras):
                if i:
                    lines.append(" ")
                lines += _para_lines(p)
        elif style == "inline":
            assert isinstance(paras[0], str)
            lines += _wrap(f"{header}:  {paras[0]}")
            for p in paras[1:]:
                lines.append(" ")
                lines += _para_lines(p)
        else:  # block: "HEADER: " line, blank line, paragraphs
            lines.append(f" {header}: ")
            for p in paras:
                lines.append(" ")
                lines += _para_lines(p)
    assert all(len(ln) <= 79 for ln in lines), [ln for ln in lines if len(ln) > 79]
    return "\n".join(lines) + "\n"


def norm(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip()


def section_text(rep: dict, names: set[str]):
    """Ground truth from the structure: text of the (last) final-report section with that name."""
    found = None
    for header, _style, paras in rep["blocks"]:
        if header in names:
            flat = []
            for p in paras:
                flat += [p] if isinstance(p, str) else list(p)
            found = norm(" ".join(flat))
    return found


# ----------------------------------------------------------------------------------------------
# Cohort
# ----------------------------------------------------------------------------------------------
# subject -> split (patient-disjoint)
SUBJECTS = {
    10000032: "train",
    10046166: "train",
    11573679: "train",
    13859433: "validate",
    15496609: "test",
    18730522: "train",
}

PORT = "CHEST (PORTABLE AP)"
PALAT = "CHEST (PA AND LAT)"
# study_id, subject_id, StudyDate, StudyTime(float), [image specs]
# image spec: (ViewPosition, procedure, view code meaning, orientation, flags)
STUDIES = [
    (
        50414267,
        10000032,
        21800506,
        213014.531,
        [
            ("PA", PALAT, "postero-anterior", "Erect", {}),
            ("LATERAL", PALAT, "lateral", "Erect", {}),
        ],
    ),
    (
        53189527,
        10000032,
        21800626,
        80556.875,
        [
            ("AP", PALAT, "antero-posterior", "Erect", {}),
            ("LL", PALAT, "left lateral", "Erect", {}),
            ("", "", "", "", {}),
        ],
    ),  # blank ViewPosition & procedure
    (
        53911762,
        10000032,
        21810115,
        153240.0,
        [
            ("PA", PALAT, "postero-anterior", "Erect", {}),
            ("LATERAL", PALAT, "lateral", "Erect", {}),
        ],
    ),
    (
        56699142,
        10046166,
        21530203,
        203355.109,
        [
            ("PA", PALAT, "postero-anterior", "Erect", {}),
            ("LATERAL", PALAT, "lateral", "Erect", {}),
        ],
    ),
    (
        57375967,
        10046166,
        21530204,
        93002.5,
        [
            ("AP", PALAT, "antero-posterior", "Erect", {}),
            ("LATERAL", PALAT, "lateral", "Erect", {}),
        ],
    ),
    (58235663, 11573679, 21620918, 31520.0, [("AP", PORT, "antero-posterior", "Recumbent", {})]),
    (
        59263316,
        11573679,
        21621002,
        121212.062,
        [
            ("PA", PALAT, "postero-anterior", "Erect", {}),
            ("LATERAL", PALAT, "lateral", "Erect", {}),
        ],
    ),
    (
        51205541,
        13859433,
        21471130,
        65433.312,
        [
            ("AP", PORT, "antero-posterior", "Recumbent", {}),
            ("AP", PORT, "antero-posterior", "", {}),
        ],
    ),  # orientation blank
    (
        54418863,
        13859433,
        21470810,
        141109.0,
        [
            ("PA", PALAT, "postero-anterior", "Erect", {}),
            ("LL", PALAT, "left lateral", "Erect", {}),
        ],
    ),
    (
        52781130,
        15496609,
        21931225,
        135510.343,
        [
            ("PA", PALAT, "postero-anterior", "Erect", {}),
            ("LATERAL", PALAT, "lateral", "Erect", {"jpg_missing": True}),
        ],
    ),
    (
        55106824,
        15496609,
        21940107,
        174409.281,
        [
            ("AP", PALAT, "antero-posterior", "Erect", {"jpg_corrupt": True}),
            ("LL", PALAT, "left lateral", "Erect", {}),
        ],
    ),
    (
        50883926,
        18730522,
        21360421,
        103330.75,
        [
            ("PA", PALAT, "postero-anterior", "Erect", {}),
            ("LATERAL", PALAT, "lateral", "Erect", {"no_split": True}),
            ("AP AXIAL", PALAT, "antero-posterior", "Erect", {}),
        ],
    ),  # rare view (apical lordotic)
]

# Study-level labels (1.0 / 0.0 / -1.0; absent = blank). Study 58235663 is absent from both files.
CHEXPERT = {
    50414267: {"No Finding": 1.0},
    53189527: {
        "Cardiomegaly": 1.0,
        "Edema": 1.0,
        "Pleural Effusion": 1.0,
        "Pneumothorax": 0.0,
        "Support Devices": 1.0,
    },
    53911762: {
        "Cardiomegaly": 0.0,
        "Lung Lesion": 1.0,
        "Lung Opacity": 1.0,
        "Pleural Effusion": 0.0,
        "Pneumothorax": 0.0,
    },
    56699142: {"Atelectasis": -1.0, "Lung Opacity": 1.0, "Pneumonia": -1.0},
    57375967: {"Pleural Effusion": 1.0, "Pneumothorax": 0.0},
    59263316: {"Fracture": 1.0, "Pneumothorax": 0.0},
    51205541: {
        "Atelectasis": -1.0,
        "Lung Opacity": 1.0,
        "Pneumothorax": 0.0,
        "Support Devices": 1.0,
    },
    54418863: {"Lung Lesion": 0.0, "No Finding": 1.0},
    52781130: {"Pneumothorax": 1.0},
    55106824: {
        "Atelectasis": -1.0,
        "Edema": -1.0,
        "Lung Opacity": 1.0,
        "Pleural Effusion": 1.0,
        "Pneumonia": -1.0,
    },
    50883926: {"Lung Lesion": 1.0},
}
NEGBIO = {k: dict(v) for k, v in CHEXPERT.items()}
NEGBIO[56699142]["Atelectasis"] = 1.0  # disagrees with chexpert (-1.0)
del NEGBIO[54418863]["Lung Lesion"]  # disagrees with chexpert (0.0 vs blank)
NEGBIO[53911762]["Cardiomegaly"] = -1.0  # disagrees with chexpert (0.0)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def gz_bytes(text: str, name: str) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(filename=name, mode="wb", fileobj=buf, mtime=0, compresslevel=9) as fh:
        fh.write(text.encode("utf-8"))
    return buf.getvalue()


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def csv_text(df: pd.DataFrame) -> str:
    return df.to_csv(index=False, lineterminator="\n")


def make_pixels(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """12-bit noise background with one bright gaussian blob."""
    bg = rng.normal(1100.0, 180.0, size=(rows, cols))
    yy, xx = np.mgrid[0:rows, 0:cols]
    cy, cx = rng.uniform(0.25, 0.75) * rows, rng.uniform(0.25, 0.75) * cols
    sig = rng.uniform(4.0, 9.0)
    blob = rng.uniform(1800.0, 2700.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sig**2))
    return np.clip(np.rint(bg + blob), 0, 4095).astype(np.uint16)


def to_jpg_bytes(arr12: np.ndarray) -> bytes:
    """MIMIC-CXR-JPG recipe: min-max to 8 bit, histogram equalisation, JPEG q95."""
    a = arr12.astype(np.float64)
    a = (a - a.min()) / max(a.max() - a.min(), 1.0) * 255.0
    u8 = np.rint(a).astype(np.uint8)
    hist = np.bincount(u8.ravel(), minlength=256)
    cdf = hist.cumsum()
    cdf_min = cdf[cdf > 0][0]
    lut = np.clip(np.rint((cdf - cdf_min) * 255.0 / max(cdf[-1] - cdf_min, 1)), 0, 255)
    eq = lut.astype(np.uint8)[u8]
    buf = io.BytesIO()
    Image.fromarray(eq, mode="L").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def uid_from_hex(h: str) -> str:
    return "2.25." + str(int(h[:32], 16))


def code_item(value: str, scheme: str, meaning: str) -> Dataset:
    it = Dataset()
    it.CodeValue = value
    it.CodingSchemeDesignator = scheme
    it.CodeMeaning = meaning
    return it


PROC_CODES = {PALAT: "C11", PORT: "C12"}
VIEW_CODES = {
    "postero-anterior": "R-10214",
    "antero-posterior": "R-10206",
    "lateral": "R-10232",
    "left lateral": "R-10236",
}
ORIENT_CODES = {"Erect": "F-10440", "Recumbent": "F-10450"}


def make_dicom(
    arr: np.ndarray,
    subject: int,
    study: int,
    dicom_id: str,
    date: int,
    time_f: float,
    view: str,
    proc: str,
    view_meaning: str,
    orient: str,
) -> bytes:
    h = dicom_id.replace("-", "")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = uid_from_hex(h)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyDate = str(date)
    hhmmss, frac = f"{time_f:.3f}".split(".")
    ds.StudyTime = f"{int(hhmmss):06d}.{frac}"
    ds.AccessionNumber = ""
    ds.Modality = "DX"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ReferringPhysicianName = ""
    if proc:
        ds.ProcedureCodeSequence = Sequence([code_item(PROC_CODES[proc], "CLP", proc)])
        ds.PerformedProcedureStepDescription = proc
    ds.AnatomicRegionSequence = Sequence([code_item("T-D3000", "SNM3", "Chest")])
    ds.PatientName = ""
    ds.PatientID = str(subject)
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethodCodeSequence = Sequence(
        [
            code_item(c, "DCM", m)
            for c, m in [
                ("113100", "Basic Application Confidentiality Profile"),
                ("113105", "Clean Descriptors Option"),
                ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
                ("113101", "Clean Pixel Data Option"),
                ("113103", "Clean Graphics Option"),
            ]
        ]
    )
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view
    ds.StudyInstanceUID = uid_from_hex(hashlib.sha256(f"study{study}".encode()).hexdigest())
    ds.SeriesInstanceUID = uid_from_hex(hashlib.sha256(f"series{dicom_id}".encode()).hexdigest())
    ds.StudyID = str(study)
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = arr.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    if view_meaning:
        ds.ViewCodeSequence = Sequence([code_item(VIEW_CODES[view_meaning], "SRT", view_meaning)])
    if orient:
        ds.PatientOrientationCodeSequence = Sequence(
            [code_item(ORIENT_CODES[orient], "SRT", orient)]
        )
    ds.GraphicAnnotationSequence = Sequence([Dataset()])
    ds.PixelData = arr.astype("<u2").tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def index_html(rel_dir: str, entries: list[str]) -> bytes:
    items = "\n".join(f'<li><a href="{e}">{e}</a></li>' for e in entries)
    return (
        f"<!DOCTYPE html>\n<html><head><title>Index of /files/{rel_dir}</title></head>\n"
        f"<body><h1>Index of /files/{rel_dir}</h1>\n<ul>\n"
        f'<li><a href="../">Parent Directory</a></li>\n{items}\n</ul></body></html>\n'
    ).encode()


def add_index_files(project_dir: Path, rel_name: str) -> None:
    """wget -r leaves the directory-listing page as index.html in every directory it walked."""
    dirs = [project_dir] + sorted(p for p in project_dir.rglob("*") if p.is_dir())
    for d in dirs:
        entries = sorted(
            (p.name + "/") if p.is_dir() else p.name for p in d.iterdir() if p.name != "index.html"
        )
        rel = f"{rel_name}/" + ("" if d == project_dir else str(d.relative_to(project_dir)) + "/")
        (d / "index.html").write_bytes(index_html(rel, entries))


LICENSE = """PhysioNet Credentialed Health Data License 1.5.0

(Placeholder text for a synthetic test fixture. This release contains no real patient data;
all identifiers, images and reports were generated for software testing.)
"""

README_JPG = """MIMIC-CXR-JPG - chest radiographs with structured labels (synthetic test fixture)

Files:
  mimic-cxr-2.0.0-metadata.csv.gz  image metadata derived from the DICOM headers
  mimic-cxr-2.0.0-chexpert.csv.gz  labels extracted with the CheXpert labeler
  mimic-cxr-2.0.0-negbio.csv.gz    labels extracted with NegBio
  mimic-cxr-2.0.0-split.csv.gz     recommended train/validate/test split
  IMAGE_FILENAMES                  list of all JPG files
  files/                           JPG images, files/pXX/pXXXXXXXX/sXXXXXXXX/<dicom_id>.jpg
"""

README_CXR = """MIMIC-CXR Database (synthetic test fixture)

Files:
  cxr-record-list.csv.gz  one row per DICOM image
  cxr-study-list.csv.gz   one row per study (free-text report)
  mimic-cxr-reports.zip   all free-text reports
  files/                  DICOM images and reports, files/pXX/pXXXXXXXX/sXXXXXXXX.txt
"""


def sha256sums(project_dir: Path, extra: dict[str, bytes]) -> bytes:
    """PhysioNet-style SHA256SUMS.txt ('<hash> <path>'); `extra` = files that should be in the
    release but did not arrive on disk (missing downloads) or arrived damaged."""
    hashes = {}
    for p in sorted(project_dir.rglob("*")):
        if p.is_file() and p.name not in ("SHA256SUMS.txt", "index.html"):
            hashes[str(p.relative_to(project_dir))] = hashlib.sha256(p.read_bytes()).hexdigest()
    for rel, data in extra.items():
        hashes[rel] = hashlib.sha256(data).hexdigest()
    return "".join(f"{h} {rel}\n" for rel, h in sorted(hashes.items())).encode()


# ----------------------------------------------------------------------------------------------
def main() -> None:
    if REL.exists():
        shutil.rmtree(REL)
    JPG_DIR.mkdir(parents=True)
    CXR_DIR.mkdir(parents=True)
    write(ROOT / "robots.txt", b"User-agent: *\nDisallow: /admin/\n")

    rnd = random.Random(20240611)
    rng = np.random.default_rng(20240611)
    sizes = [(64, 64), (64, 56), (56, 64), (64, 52)]

    meta_rows, split_rows, record_rows, study_rows = [], [], [], []
    expected: dict[str, dict] = {}
    nasty: dict[str, list] = {
        k: []
        for k in [
            "report_missing",
            "study_absent_from_chexpert_negbio",
            "blank_viewposition",
            "wet_read_above_final_report",
            "misspelled_header_IMPRESSON",
            "report_without_headers",
            "report_only_impression",
            "jpg_missing",
            "jpg_corrupt_truncated",
            "image_in_no_split",
            "rare_view_AP_AXIAL",
            "studytime_without_leading_zero",
            "orientation_blank",
            "non_ascii_report",
            "custom_rule_study_official_splitter",
            "negbio_disagrees_with_chexpert",
            "report_with_notification_after_impression",
            "report_with_recommendations_after_impression",
        ]
    }
    jpg_extra, cxr_extra = {}, {}
    zip_members: dict[str, bytes] = {}

    for study, subject, date, time_f, images in STUDIES:
        grp = f"p{str(subject)[:2]}"
        study_rel = f"files/{grp}/p{subject}/s{study}"
        rep = REPORTS[str(study)]
        txt = render_report(rep).encode("utf-8")
        report_rel = f"{study_rel}.txt"
        if rep.get("missing"):
            cxr_extra[report_rel] = txt  # listed, checksummed, but not on disk/zip
            nasty["report_missing"].append(f"s{study}")
        else:
            write(CXR_DIR / report_rel, txt)
            zip_members[report_rel] = txt
        study_rows.append((subject, study, report_rel))
        if time_f < 100000:
            nasty["studytime_without_leading_zero"].append(f"s{study} ({time_f!r})")

        impression = None if rep.get("missing") else section_text(rep, {"IMPRESSION", "IMPRESSON"})
        findings = None if rep.get("missing") else section_text(rep, {"FINDINGS"})
        chex = CHEXPERT.get(study)

        for view, proc, vmean, orient, flags in images:
            dicom_id = "-".join(f"{rnd.getrandbits(32):08x}" for _ in range(5))
            rows, cols = sizes[rnd.randrange(len(sizes))]
            arr = make_pixels(rng, rows, cols)
            dcm = make_dicom(arr, subject, study, dicom_id, date, time_f, view, proc, vmean, orient)
            write(CXR_DIR / f"{study_rel}/{dicom_id}.dcm", dcm)
            jpg = to_jpg_bytes(arr)
            jpg_rel = f"{study_rel}/{dicom_id}.jpg"
            if flags.get("jpg_missing"):
                jpg_extra[jpg_rel] = jpg
                nasty["jpg_missing"].append(dicom_id)
            elif flags.get("jpg_corrupt"):
                write(JPG_DIR / jpg_rel, jpg[: len(jpg) * 2 // 5])  # truncated download
                jpg_extra[jpg_rel] = jpg
                nasty["jpg_corrupt_truncated"].append(dicom_id)
            else:
                write(JPG_DIR / jpg_rel, jpg)
            meta_rows.append(
                dict(
                    dicom_id=dicom_id,
                    subject_id=subject,
                    study_id=study,
                    PerformedProcedureStepDescription=proc or None,
                    ViewPosition=view or None,
                    Rows=rows,
                    Columns=cols,
                    StudyDate=date,
                    StudyTime=time_f,
                    ProcedureCodeSequence_CodeMeaning=proc or None,
                    ViewCodeSequence_CodeMeaning=vmean or None,
                    PatientOrientationCodeSequence_CodeMeaning=orient or None,
                )
            )
            record_rows.append((subject, study, dicom_id, f"{study_rel}/{dicom_id}.dcm"))
            split = SUBJECTS[subject]
            if flags.get("no_split"):
                nasty["image_in_no_split"].append(dicom_id)
                split_out = None
            else:
                split_rows.append((dicom_id, study, subject, split))
                split_out = {"validate": "validation"}.get(split, split)
            if view == "":
                nasty["blank_viewposition"].append(dicom_id)
            if view == "AP AXIAL":
                nasty["rare_view_AP_AXIAL"].append(dicom_id)
            if orient == "" and view != "":
                nasty["orientation_blank"].append(dicom_id)
            expected[dicom_id] = dict(
                subject_id=subject,
                study_id=study,
                split=split_out,
                view=view,
                image_ok=not (flags.get("jpg_missing") or flags.get("jpg_corrupt")),
                report="missing" if rep.get("missing") else "ok",
                impression=impression,
                findings=findings,
                chexpert=None if chex is None else {k: chex[k] for k in LABELS if k in chex},
            )

    by_study = {s: (subj, imgs) for s, subj, _, _, imgs in STUDIES}
    for s in (56699142,):
        nasty["wet_read_above_final_report"].append(f"s{s}")
    nasty["misspelled_header_IMPRESSON"].append("s59263316")
    nasty["report_without_headers"].append("s53911762")
    nasty["report_only_impression"].append("s51205541")
    nasty["non_ascii_report"].append("s54418863 (degree sign, UTF-8)")
    nasty["custom_rule_study_official_splitter"].append("s58235663 (p11573679)")
    nasty["study_absent_from_chexpert_negbio"] += [f"s{s}" for s in by_study if s not in CHEXPERT]
    nasty["negbio_disagrees_with_chexpert"] += [
        f"s{s}" for s in CHEXPERT if CHEXPERT[s] != NEGBIO[s]
    ]
    nasty["report_with_notification_after_impression"].append("s52781130")
    nasty["report_with_recommendations_after_impression"].append("s50883926")

    # ---------------- MIMIC-CXR-JPG CSVs ----------------
    meta_cols = [
        "dicom_id",
        "subject_id",
        "study_id",
        "PerformedProcedureStepDescription",
        "ViewPosition",
        "Rows",
        "Columns",
        "StudyDate",
        "StudyTime",
        "ProcedureCodeSequence_CodeMeaning",
        "ViewCodeSequence_CodeMeaning",
        "PatientOrientationCodeSequence_CodeMeaning",
    ]
    meta = pd.DataFrame(meta_rows, columns=meta_cols)
    meta = meta.sort_values(["subject_id", "study_id", "dicom_id"], kind="stable")
    write(
        JPG_DIR / "mimic-cxr-2.0.0-metadata.csv.gz",
        gz_bytes(csv_text(meta), "mimic-cxr-2.0.0-metadata.csv"),
    )

    for name, table in (("chexpert", CHEXPERT), ("negbio", NEGBIO)):
        rows = []
        for study, subject, *_ in STUDIES:
            if study in table:
                rows.append(
                    {
                        "subject_id": subject,
                        "study_id": study,
                        **{k: table[study].get(k, np.nan) for k in LABELS},
                    }
                )
        df = pd.DataFrame(rows, columns=["subject_id", "study_id"] + LABELS)
        df[LABELS] = df[LABELS].astype("float64")
        df = df.sort_values(["subject_id", "study_id"], kind="stable")
        write(
            JPG_DIR / f"mimic-cxr-2.0.0-{name}.csv.gz",
            gz_bytes(csv_text(df), f"mimic-cxr-2.0.0-{name}.csv"),
        )

    split_df = pd.DataFrame(split_rows, columns=["dicom_id", "study_id", "subject_id", "split"])
    split_df = split_df.sort_values(["subject_id", "study_id", "dicom_id"], kind="stable")
    write(
        JPG_DIR / "mimic-cxr-2.0.0-split.csv.gz",
        gz_bytes(csv_text(split_df), "mimic-cxr-2.0.0-split.csv"),
    )

    img_list = sorted(f"files/p{str(r[0])[:2]}/p{r[0]}/s{r[1]}/{r[2]}.jpg" for r in record_rows)
    write(JPG_DIR / "IMAGE_FILENAMES", ("\n".join(img_list) + "\n").encode())
    write(JPG_DIR / "LICENSE.txt", LICENSE.encode())
    write(JPG_DIR / "README", README_JPG.encode())

    # ---------------- MIMIC-CXR CSVs + reports zip ----------------
    rec = pd.DataFrame(sorted(record_rows), columns=["subject_id", "study_id", "dicom_id", "path"])
    write(CXR_DIR / "cxr-record-list.csv.gz", gz_bytes(csv_text(rec), "cxr-record-list.csv"))
    stl = pd.DataFrame(sorted(study_rows), columns=["subject_id", "study_id", "path"])
    write(CXR_DIR / "cxr-study-list.csv.gz", gz_bytes(csv_text(stl), "cxr-study-list.csv"))

    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        dirs = set()
        for rel in zip_members:
            parts = rel.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                dirs.add("/".join(parts[:i]) + "/")
        for name in sorted(dirs | set(zip_members)):
            zi = zipfile.ZipInfo(name, date_time=(2019, 9, 10, 12, 0, 0))
            if name.endswith("/"):
                zi.external_attr = (0o40755 << 16) | 0x10
                zf.writestr(zi, b"")
            else:
                zi.external_attr = 0o100644 << 16
                zi.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(zi, zip_members[name])
    write(CXR_DIR / "mimic-cxr-reports.zip", zbuf.getvalue())
    write(CXR_DIR / "LICENSE.txt", LICENSE.encode())
    write(CXR_DIR / "README", README_CXR.encode())

    write(JPG_DIR / "SHA256SUMS.txt", sha256sums(JPG_DIR, jpg_extra))
    write(CXR_DIR / "SHA256SUMS.txt", sha256sums(CXR_DIR, cxr_extra))
    add_index_files(JPG_DIR, "mimic-cxr-jpg/2.0.0")
    add_index_files(CXR_DIR, "mimic-cxr/2.0.0")

    (HERE / "expected.json").write_text(
        json.dumps(expected, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (HERE / "nasty_cases.json").write_text(json.dumps(nasty, indent=1) + "\n", encoding="utf-8")
    print(
        f"patients={len(SUBJECTS)} studies={len(STUDIES)} images={len(expected)} "
        f"reports_on_disk={len(zip_members)} chexpert_rows={len(CHEXPERT)} "
        f"split_rows={len(split_rows)}"
    )


if __name__ == "__main__":
    main()
