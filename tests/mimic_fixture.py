"""A tiny MIMIC-CXR + MIMIC-CXR-JPG release with the nasty cases (reference §1.8).

Three patients, eight studies, thirteen images:

- s50414267: A1 PA (.dcm.gz), A2 LATERAL; normal report, every header, `___`, empty section
- s53189527: B1 AP (MONOCHROME1), B2 LL, B3 blank view; WET READ + addendum above FINAL REPORT,
  `IMPRESSON:` typo, a degree sign
- s53911762: C1 PA; no IMPRESSION/FINDINGS (empty FINDINGS header): last_paragraph
- s57375967: D1 AP; report missing (in the study list, neither on disk nor in the zip)
- s56699142: E1 PA, E2 SWIMMERS; absent from chexpert/negbio: labels from the text
- s58235663: F1 PA corrupt, F2 LATERAL missing, F3 AP; special-case study (no conclusion)
- s59999999: G1 PA; in no split

CSVs are `.csv.gz`; reports sit in `mimic-cxr-reports.zip` (under a `mimic-cxr-reports/` prefix)
and one also as `files/.../s50414267.txt`. StudyTime `80556.875` lacks its leading zero.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from tests.dicom_fixture import chest, make_dx, to_bytes

CHEXPERT_COLUMNS = [
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
    "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other",
    "Pneumonia", "Pneumothorax", "Support Devices",
]  # fmt: skip


def dicom_id(name: str) -> str:
    digest = hashlib.sha256(name.encode()).hexdigest()
    return "-".join(digest[i : i + 8] for i in range(0, 40, 8))


# name, subject, study, view, study date, study time, split (None: in no split), image case
IMAGES = [
    ("A1", "10000032", "50414267", "PA", "21800506", "213014.531", "train", "ok"),
    ("A2", "10000032", "50414267", "LATERAL", "21800506", "213014.531", "train", "ok"),
    ("B1", "10000032", "53189527", "AP", "21800506", "80556.875", "train", "ok"),
    ("B2", "10000032", "53189527", "LL", "21800506", "80556.875", "train", "ok"),
    ("B3", "10000032", "53189527", "", "21800506", "80556.875", "train", "ok"),
    ("C1", "10000032", "53911762", "PA", "21810101", "101500", "train", "ok"),
    ("D1", "10000764", "57375967", "AP", "21321010", "154000.1", "validate", "ok"),
    ("E1", "10000764", "56699142", "PA", "21330505", "91500", "validate", "ok"),
    ("E2", "10000764", "56699142", "SWIMMERS", "21330505", "91500", "validate", "ok"),
    ("F1", "11573679", "58235663", "PA", "21500101", "120000", "test", "corrupt"),
    ("F2", "11573679", "58235663", "LATERAL", "21500101", "120000", "test", "missing"),
    ("F3", "11573679", "58235663", "AP", "21500101", "120000", "test", "ok"),
    ("G1", "11573679", "59999999", "PA", "21510101", "120000", None, "ok"),
]
IDS = {name: dicom_id(name) for name, *_ in IMAGES}


def _style(text: str) -> str:
    """MIMIC's convention: every blank line is a single space."""
    return "\n".join(line or " " for line in text.split("\n")[:-1]) + "\n"


REPORT_A = _style("""                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___ year old woman with cough  // ?pneumonia

 TECHNIQUE:  Chest PA and lateral

 COMPARISON:  ___

 FINDINGS:

 The lungs are clear without focal consolidation.  No pleural effusion or
 pneumothorax is seen.  Heart size is normal.  Dr. ___ was informed at ___.

 IMPRESSION:

 No acute cardiopulmonary process.

 NOTIFICATION:

""")
REPORT_B = _style("""WET READ: ___ ___ 10:15 PM
  Enlarged heart, question of small effusion.  IMPRESSION: prelim only
______________________________________________________________________________
 ADDENDUM:
 Findings were discussed with Dr. ___ at 11:00 on ___.
______________________________________________________________________________
                                 FINAL REPORT
 EXAMINATION:  CHEST (PORTABLE AP)

 INDICATION:  ___M with dyspnea, temp 38.5\u00b0C

 FINDINGS:

 Endotracheal tube terminates 4 cm above the carina.  Moderate cardiomegaly.
 Small bilateral pleural effusions.  No pneumothorax.

 IMPRESSON:

 Moderate cardiomegaly with small bilateral pleural effusions.  Mild
 pulmonary edema cannot be excluded.
""")
REPORT_C = _style("""                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___ with chest pain

 FINDINGS:

 COMPARISON:  ___.

 PA and lateral views of the chest demonstrate clear lungs.  The
 cardiomediastinal silhouette is normal.  No acute process.
""")
REPORT_E = _style("""                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 FINDINGS:

 Small right pleural effusion.  No pneumothorax.

 IMPRESSION:

 Small right pleural effusion.  No pneumothorax.
""")
REPORT_F = _style("""                                 FINAL REPORT
 EXAMINATION:  CHEST (PORTABLE AP)

 IMPRESSION:

 Study reviewed; see separate note.
""")
REPORT_G = _style("""                                 FINAL REPORT
 IMPRESSION:  Right lower lobe pneumonia.
""")
REPORTS = {
    "50414267": REPORT_A,
    "53189527": REPORT_B,
    "53911762": REPORT_C,
    "56699142": REPORT_E,
    "58235663": REPORT_F,
    "59999999": REPORT_G,
}
# Study -> {column: value}; blank elsewhere. s56699142 is absent (the ~8-study gap).
CHEXPERT = {
    "50414267": {"No Finding": "1.0"},
    "53189527": {
        "Cardiomegaly": "1.0",
        "Edema": "-1.0",
        "Pleural Effusion": "1.0",
        "Pneumothorax": "0.0",
        "Support Devices": "1.0",
    },
    "53911762": {"No Finding": "1.0"},
    "57375967": {"Atelectasis": "-1.0", "Lung Opacity": "1.0"},
    "58235663": {"No Finding": "1.0"},
    "59999999": {"Pneumonia": "1.0"},
}
NEGBIO = {k: dict(v) for k, v in CHEXPERT.items()}
NEGBIO["53189527"]["Edema"] = "0.0"  # disagrees with chexpert on one label


def _csv_gz(path: Path, header: list[str], rows: list[list[str]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    path.write_bytes(gzip.compress(buffer.getvalue().encode(), mtime=0))


def _jpg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = (rng.random((32, 32)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "L").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_release(root: Path) -> Path:
    """Write the fixture under `root` (mimic-cxr/2.0.0 and mimic-cxr-jpg/2.0.0); returns root."""
    cxr = root / "mimic-cxr" / "2.0.0"
    jpg = root / "mimic-cxr-jpg" / "2.0.0"
    cxr.mkdir(parents=True)
    jpg.mkdir(parents=True)
    meta_rows, split_rows, record_rows = [], [], []
    for k, (name, subject, study, view, date, time, split, case) in enumerate(IMAGES):
        did = IDS[name]
        folder = f"files/p{subject[:2]}/p{subject}/s{study}"
        procedure = "" if view == "" else "CHEST (PA AND LAT)"
        orientation = "" if name == "B2" else "Erect"
        meta_rows.append(
            [did, subject, study, procedure, view, "32", "32", date, time, procedure,
             view.lower() if view else "", orientation]
        )  # fmt: skip
        if split is not None:
            split_rows.append([did, study, subject, split])
        suffix = ".dcm.gz" if name == "A1" else ".dcm"
        record_rows.append([subject, study, did, f"{folder}/{did}{suffix}"])
        if case == "missing":
            continue
        (jpg / folder).mkdir(parents=True, exist_ok=True)
        (cxr / folder).mkdir(parents=True, exist_ok=True)
        if case == "corrupt":
            (jpg / folder / f"{did}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
            (cxr / folder / f"{did}.dcm").write_bytes(b"\0" * 128 + b"DICM truncated")
            continue
        (jpg / folder / f"{did}.jpg").write_bytes(_jpg(k))
        photometric = "MONOCHROME1" if name == "B1" else "MONOCHROME2"
        pixels = chest(40, 32)
        if photometric == "MONOCHROME1":
            pixels = (4095 - pixels).astype(np.uint16)
        data = to_bytes(make_dx(pixels, photometric=photometric, ViewPosition=view or "AP"))
        if suffix == ".dcm.gz":
            data = gzip.compress(data, mtime=0)
        (cxr / folder / f"{did}{suffix}").write_bytes(data)
    meta_header = [
        "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
        "Rows", "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
        "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning",
    ]  # fmt: skip
    _csv_gz(jpg / "mimic-cxr-2.0.0-metadata.csv.gz", meta_header, meta_rows)
    _csv_gz(
        jpg / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"],
        split_rows,
    )  # fmt: skip
    for file_name, table in (("chexpert", CHEXPERT), ("negbio", NEGBIO)):
        rows = []
        for _name, subject, study, *_ in IMAGES:
            if study in table and [subject, study] not in [r[:2] for r in rows]:
                rows.append([subject, study, *[table[study].get(c, "") for c in CHEXPERT_COLUMNS]])
        _csv_gz(
            jpg / f"mimic-cxr-2.0.0-{file_name}.csv.gz",
            ["subject_id", "study_id", *CHEXPERT_COLUMNS],
            rows,
        )
    _csv_gz(cxr / "cxr-record-list.csv.gz", ["subject_id", "study_id", "dicom_id", "path"],
            record_rows)  # fmt: skip
    studies = sorted({(s, st) for _, s, st, *_ in IMAGES})
    _csv_gz(
        cxr / "cxr-study-list.csv.gz", ["subject_id", "study_id", "path"],
        [[s, st, f"files/p{s[:2]}/p{s}/s{st}.txt"] for s, st in studies],
    )  # fmt: skip
    with zipfile.ZipFile(cxr / "mimic-cxr-reports.zip", "w") as archive:
        for subject, study in studies:
            if study in REPORTS:
                info = zipfile.ZipInfo(
                    f"mimic-cxr-reports/files/p{subject[:2]}/p{subject}/s{study}.txt",
                    date_time=(1980, 1, 1, 0, 0, 0),
                )
                archive.writestr(info, REPORTS[study].encode("utf-8"))
    (cxr / "files/p10/p10000032/s50414267.txt").write_text(REPORT_A, encoding="utf-8")
    return root


def strip_reports(root: Path) -> Path:
    """Remove every report of a `make_release` release, with the files that locate the MIMIC-CXR
    release (`mimic-cxr-reports.zip`, `cxr-record-list.csv.gz`): the JPG release alone."""
    cxr = root / "mimic-cxr" / "2.0.0"
    for name in ("mimic-cxr-reports.zip", "cxr-record-list.csv.gz"):
        (cxr / name).unlink()
    for path in sorted(cxr.glob("files/p*/p*/s*.txt")):
        path.unlink()
    return root


def write_report_files(root: Path, folder: str, studies: list[str] | None = None) -> Path:
    """The reports of `studies` (all of REPORTS) as `root/folder/files/pXX/pSUBJECT/sSTUDY.txt`,
    as unpacking `mimic-cxr-reports.zip` or fetching only the reports leaves them."""
    subjects = {study: subject for _, subject, study, *_ in IMAGES}
    for study in REPORTS if studies is None else studies:
        subject = subjects[study]
        path = root / folder / f"files/p{subject[:2]}/p{subject}/s{study}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(REPORTS[study], encoding="utf-8")
    return root


INDEPENDENT_SCRIPT = Path(__file__).parent / "independent" / "mimic_release.py"


def make_independent_release(root: Path) -> Path:
    """The release written by `independent/mimic_release.py` (from the public format
    description only, run as its own program) under `root`; returns root."""
    subprocess.run([sys.executable, str(INDEPENDENT_SCRIPT), str(root)], check=True,
                   capture_output=True)  # fmt: skip
    return root
