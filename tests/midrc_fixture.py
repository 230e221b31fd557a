"""Tiny MIDRC releases with the nasty cases (reference §3.7).

RICORD-1c (TCIA download, `make_ricord`): two patients, three studies on disk, four series:
- R1 (patient 419639-000001, `XR CHEST 1 VIEW AP`): series `1.000000-NA` with one CR
  MONOCHROME1 image (A); series `2.000000-CHEST AP PORTABLE` with a DX MONOCHROME2 SIGMOID image
  with a multi-valued window (B) and a DX For-Processing image (F). Readers 1-3: Typical,
  Typical, Indeterminate; grades Moderate, Moderate, Severe. Reader 1 annotated it twice: first
  Atypical/Severe (older `createdAt`), then Typical/Moderate.
- R2 (patient 440808-000002, `CHEST 1V`): a good CR (C) and a corrupt `.dcm` (X). Readers disagree
  three ways (Typical, Indeterminate, Atypical); two grades tie (Mild, Severe).
- R3 (patient 440808-000002): one image (D), no annotation at all.
- R4: annotated, but withdrawn (in the JSON only).
Folder names carry PHI (the fake accession number and a shifted date in the descriptive study
folder) and every DICOM carries the planted PHI tags of `tests.dicom_fixture.PHI`.

Data Commons (`make_commons`): two cases, four studies in `imaging_study`:
- C1 (case 419639-002973, day 10): zip `419639-002973/<uid>.zip` whose members sit under a PHI
  folder name, with a nested zip holding another nested zip: images G (top level), H (depth 1),
  I (depth 2). Tests: Positive on day 3 (7 days before), Negative on day -20 → COVID-19 = 1.
- C2 (case 419639-002974, day 5): a good DX (J), a For-Processing DX (K), a corrupt member (Y).
  Tests: Positive day -30 (outside the window), Negative day 0 → COVID-19 = 0 → `No Finding`.
- C3 (case 419639-002974, day 40): no zip downloaded → quarantined.
- C4 (case 419639-002973, day 50): image L; two tests on day 45 that disagree → -1.
mRALE: C1 scored 8; C2 `None/None` with a quality issue.
"""

from __future__ import annotations

import csv
import io
import json
import zipfile
from pathlib import Path

import numpy as np

from tests.dicom_fixture import DX_PROCESSING, chest, make_dx, to_bytes

CR_CLASS = "1.2.840.10008.5.1.4.1.1.1"
ROOT = "1.2.826.0.1.3680043.10.474"
PHI_FOLDER = "06-05-2187-ACC24681357-XR CHEST 1 VIEW AP-69651"
PHI_MEMBER_FOLDER = "ZYXWVUT_QWERTYUIOP_19430917"
PHI_TEXT = ("ACC24681357", "06-05-2187", "ZYXWVUT", "Qwertyuiop", "19430917")

METADATA_HEADER = [
    "Series UID", "Collection", "3rd Party Analysis", "Data Description URI", "Subject ID",
    "Study UID", "Study Description", "Study Date", "Series Description", "Manufacturer",
    "Modality", "SOP Class Name", "SOP Class UID", "Number of Images", "File Size",
    "File Location", "Download Timestamp",
]  # fmt: skip


def uid(*parts) -> str:
    return ".".join([ROOT, *map(str, parts)])


def dicom(name: str, study: str, series: str, **kwargs) -> bytes:
    """A 60x48 chest DICOM; `kind` picks the nasty variants."""
    kind = kwargs.pop("kind", "dx")
    pixels = chest()
    tags = dict(
        StudyInstanceUID=study,
        SeriesInstanceUID=series,
        SOPInstanceUID=uid(9, abs(hash_name(name))),
    )
    tags.update(kwargs)
    if kind == "cr_mono1":
        ds = make_dx(4095 - pixels, photometric="MONOCHROME1", sop_class=CR_CLASS, **tags)
        ds.Modality = "CR"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        return to_bytes(ds)
    if kind == "sigmoid":
        tags.update(WindowCenter=[2048, 1800], WindowWidth=[4096, 3000], VOILUTFunction="SIGMOID")
        ds = make_dx(pixels, bits_stored=14, **tags)
    elif kind == "processing":
        ds = make_dx(pixels, sop_class=DX_PROCESSING, **tags)
    else:
        ds = make_dx(pixels, **tags)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return to_bytes(ds)


def hash_name(name: str) -> int:
    return int.from_bytes(name.encode().ljust(8, b"_")[:8], "big") % 10**12


CORRUPT = b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xffgarbage-not-a-dicom"

# --------------------------------------------------------------------------------------------
# RICORD-1c

STUDY = {"R1": uid(419639, 1), "R2": uid(440808, 2), "R3": uid(440808, 3), "R4": uid(440808, 4)}
SERIES = {
    "R1a": uid(419639, 1, 1),
    "R1b": uid(419639, 1, 2),
    "R2a": uid(440808, 2, 1),
    "R3a": uid(440808, 3, 1),
}
# image name -> (study, series key, file name, kind, StudyDescription, SeriesDescription, view)
RICORD_IMAGES = {
    "A": ("R1", "R1a", "1-1.dcm", "cr_mono1", "XR CHEST 1 VIEW AP", "", "AP"),
    "B": ("R1", "R1b", "1-1.dcm", "sigmoid", "XR CHEST 1 VIEW AP", "CHEST AP PORTABLE", "AP"),
    "F": ("R1", "R1b", "1-2.dcm", "processing", "XR CHEST 1 VIEW AP", "CHEST AP PORTABLE", "AP"),
    "C": ("R2", "R2a", "1-1.dcm", "cr_mono1", "CHEST 1V", "PA", "PA"),
    "X": ("R2", "R2a", "1-2.dcm", "corrupt", "", "", ""),
    "D": ("R3", "R3a", "1-01.dcm", "dx", "CHEST 1V", "AP", "AP"),
}
SUBJECT = {"R1": "MIDRC-RICORD-1C-419639-000001", "R2": "MIDRC-RICORD-1C-440808-000002"}
SUBJECT["R3"] = SUBJECT["R2"]
LABELS = {  # MD.ai label id -> name, in three groups as the export has them
    "L_typ": "Typical Appearance",
    "L_ind": "Indeterminate Appearance",
    "L_aty": "Atypical Appearance",
    "L_neg": "Negative for Pneumonia",
    "L_mild": "Mild Opacities",
    "L_mod": "Moderate Opacities",
    "L_sev": "Severe Opacities",
    "L_exc": "Exclude",
}
# (study, reader user id, label id, createdAt)
ANNOTATIONS = [
    ("R1", "U_reader1", "L_aty", "2020-10-01T10:00:00Z"),
    ("R1", "U_reader1", "L_sev", "2020-10-01T10:00:00Z"),
    ("R1", "U_reader1", "L_typ", "2020-11-01T10:00:00Z"),
    ("R1", "U_reader1", "L_mod", "2020-11-01T10:00:00Z"),
    ("R1", "U_reader2", "L_typ", "2020-10-02T10:00:00Z"),
    ("R1", "U_reader2", "L_mod", "2020-10-02T10:00:00Z"),
    ("R1", "U_reader3", "L_ind", "2020-10-03T10:00:00Z"),
    ("R1", "U_reader3", "L_sev", "2020-10-03T10:00:00Z"),
    ("R2", "U_reader1", "L_typ", "2020-10-04T10:00:00Z"),
    ("R2", "U_reader1", "L_mild", "2020-10-04T10:00:00Z"),
    ("R2", "U_reader2", "L_ind", "2020-10-05T10:00:00Z"),
    ("R2", "U_reader2", "L_sev", "2020-10-05T10:00:00Z"),
    ("R2", "U_reader3", "L_aty", "2020-10-06T10:00:00Z"),
    ("R2", "U_reader3", "L_exc", "2020-10-06T10:00:00Z"),
    ("R4", "U_reader1", "L_neg", "2020-10-07T10:00:00Z"),
]


def make_ricord(root: Path) -> Path:
    base = root / "manifest-1612365584013"
    coll = base / "MIDRC-RICORD-1C"
    rows = []
    for key in ("R1a", "R1b", "R2a", "R3a"):
        members = {n: v for n, v in RICORD_IMAGES.items() if v[1] == key}
        study_key = next(iter(members.values()))[0]
        study_desc = next(v[4] for v in members.values() if v[4])
        series_desc = next(iter(members.values()))[5]
        number = "1.000000" if key.endswith("a") else "2.000000"
        study_folder = (
            PHI_FOLDER
            if study_key == "R1"
            else f"01-18-2005-NA-{study_desc}-{STUDY[study_key][-5:]}"
        )
        series_folder = f"{number}-{series_desc or 'NA'}-{SERIES[key][-5:]}"
        rel = Path(SUBJECT[study_key]) / study_folder / series_folder
        folder = coll / rel
        folder.mkdir(parents=True)
        for name, (_, _, file, kind, sdesc, serdesc, view) in members.items():
            if kind == "corrupt":
                (folder / file).write_bytes(CORRUPT)
                continue
            data = dicom(
                name,
                STUDY[study_key],
                SERIES[key],
                kind=kind,
                StudyDescription=sdesc,
                SeriesDescription=serdesc or "",
                ViewPosition=view,
                PatientSex="F",
                PatientAge="045Y",
            )
            (folder / file).write_bytes(data)
        rows.append(
            {
                "Series UID": SERIES[key],
                "Collection": "MIDRC-RICORD-1C",
                "3rd Party Analysis": "NO",
                "Data Description URI": "https://doi.org/10.7937/91ah-v663",
                "Subject ID": SUBJECT[study_key],
                "Study UID": STUDY[study_key],
                "Study Description": study_desc,
                "Study Date": "06-05-2187" if study_key == "R1" else "01-18-2005",
                "Series Description": series_desc or "NA",
                "Manufacturer": "",
                "Modality": "CR",
                "SOP Class Name": "Computed Radiography Image Storage",
                "SOP Class UID": CR_CLASS,
                "Number of Images": str(len(members)),
                "File Size": "163.31 KB",
                "File Location": "./MIDRC-RICORD-1C/" + rel.as_posix(),
                "Download Timestamp": "2021-02-03T10:00:00.000",
            }
        )
    with open(base / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, METADATA_HEADER, lineterminator="\r\n")
        writer.writeheader()
        writer.writerows(rows)
    export = {
        "id": "MwBeK3Nr",
        "labelGroups": [
            {"id": "G_class", "name": "Classification", "labels": []},
            {"id": "G_grade", "name": "Airspace Disease Grading", "labels": []},
            {"id": "G_other", "name": "Other", "labels": []},
        ],
        "datasets": [{"id": "D_1c", "annotations": []}],
    }
    for label_id, name in LABELS.items():
        group = 0 if label_id in ("L_typ", "L_ind", "L_aty", "L_neg") else 1
        group = 2 if label_id == "L_exc" else group
        export["labelGroups"][group]["labels"].append(
            {"id": label_id, "name": name, "description": name, "scope": "STUDY"}
        )
    for index, (study, reader, label_id, created) in enumerate(ANNOTATIONS):
        export["datasets"][0]["annotations"].append(
            {
                "id": f"A_{index}",
                "StudyInstanceUID": STUDY[study],
                "SeriesInstanceUID": None,
                "SOPInstanceUID": None,
                "labelId": label_id,
                "createdById": reader,
                "createdAt": created,
            }
        )
    name = "1c_mdai_rsna_project_MwBeK3Nr_annotations_labelgroup_all_2021-01-08-164102.json"
    (base / name).write_text(json.dumps(export), encoding="utf-8")
    return base


def series_folder(base: Path, key: str) -> Path:
    """The folder `make_ricord` wrote series `key` (`R1a`, ...) to."""
    return next(p for p in base.rglob(f"*-{SERIES[key][-5:]}") if p.is_dir())


def ricord_dicom(name: str, key: str, pixels=None, **tags) -> bytes:
    """A DICOM of series `key` (`R1a`, ...) as `make_ricord` writes them; `pixels` (uint16,
    default the chest phantom) and `tags` replace the defaults (e.g. SOPInstanceUID)."""
    study = STUDY[f"R{key[1]}"]
    pixels = chest() if pixels is None else pixels
    fields = dict(
        StudyInstanceUID=study,
        SeriesInstanceUID=SERIES[key],
        SOPInstanceUID=uid(9, abs(hash_name(name))),
        StudyDescription="CHEST 1V",
        ViewPosition="AP",
    )
    fields.update(tags)
    ds = make_dx(pixels, **fields)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return to_bytes(ds)


def add_ricord_duplicate(base: Path) -> Path:
    """A second file with image C's SOPInstanceUID but other pixels (a flat field), written
    after C in C's series folder (`1-3.dcm`, file 3 of metadata.csv row 4); returns it."""
    flat = np.full(chest().shape, 1000, dtype=np.uint16)
    path = series_folder(base, "R2a") / "1-3.dcm"
    path.write_bytes(ricord_dicom("C", "R2a", flat, SOPInstanceUID=uid(9, abs(hash_name("C")))))
    return path


# --------------------------------------------------------------------------------------------
# Data Commons

CASES = {"C1": "419639-002973", "C2": "419639-002974", "C3": "419639-002974", "C4": "419639-002973"}
DC_STUDY = {k: uid(419639, 100 + i) for i, k in enumerate(("C1", "C2", "C3", "C4"))}
DC_SERIES = {k: DC_STUDY[k] + ".1" for k in DC_STUDY}
DAYS = {"C1": 10, "C2": 5, "C3": 40, "C4": 50}
EXAM = {"C1": "XR CHEST 1 VIEW AP", "C2": "CHEST 1V", "C3": "CHEST 1V", "C4": "XR CHEST 2V PA"}
# image -> (study, kind, SeriesDescription)
DC_IMAGES = {
    "G": ("C1", "dx", "CHEST AP"),
    "H": ("C1", "dx", "CHEST AP"),
    "I": ("C1", "dx", "CHEST AP"),
    "J": ("C2", "cr_mono1", "Chest"),
    "K": ("C2", "processing", "Chest"),
    "Y": ("C2", "corrupt", ""),
    "L": ("C4", "dx", "PA"),
}


def _dc_dicom(name: str) -> bytes:
    study, kind, series = DC_IMAGES[name]
    if kind == "corrupt":
        return CORRUPT
    view = "PA" if study == "C4" else "AP"
    return dicom(
        name,
        DC_STUDY[study],
        DC_SERIES[study],
        kind=kind,
        StudyDescription=EXAM[study],
        SeriesDescription=series,
        ViewPosition=view,
    )


def _zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _tsv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def make_commons(root: Path) -> Path:
    base = root / "midrc"
    downloads = base / "downloads"
    # C1: member under a PHI folder, a nested zip, inside it another nested zip.
    deep = _zip({"3.dcm": _dc_dicom("I")})
    inner = _zip({"x/y/2.dcm": _dc_dicom("H"), "deeper/deep.zip": deep})
    c1 = _zip({f"{PHI_MEMBER_FOLDER}/series1/1.dcm": _dc_dicom("G"), "nested/inner.zip": inner})
    c2 = _zip({f"s/{n}.dcm": _dc_dicom(n) for n in ("J", "K", "Y")} | {"README.txt": b"hello"})
    c4 = _zip({"a/b/c/d/1.dcm": _dc_dicom("L")})
    for key, data in (("C1", c1), ("C2", c2), ("C4", c4)):
        folder = downloads / CASES[key]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{DC_STUDY[key]}.zip").write_bytes(data)
    manifest = [{"object_id": f"dg.MD1R/0000000{i}-aaaa-4bbb-8ccc-dddddddddddd"} for i in range(4)]
    (base / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    _tsv(
        base / "object_list.tsv",
        ["case_ids", "study_uid", "project_id", "object_id"],
        [
            [str([CASES[k]]), DC_STUDY[k], "Open-R1", str([m["object_id"]])]
            for k, m in zip(("C1", "C2", "C3", "C4"), manifest, strict=True)
        ],
    )
    _tsv(
        base / "case.tsv",
        [
            "datasets.submitter_id",
            "submitter_id",
            "type",
            "age_at_index",
            "covid19_positive",
            "case_ids",
            "sex",
            "site_id",
            "project_id",
        ],  # fmt: skip
        [
            ["Open-R1", "419639-002973", "case", "57", "Yes", "", "Female", "419639", "Open-R1"],
            ["Open-R1", "419639-002974", "case", "63", "No", "", "Male", "419639", "Open-R1"],
        ],
    )
    _tsv(
        base / "imaging_study.tsv",
        [
            "study_uid",
            "case_ids",
            "project_id",
            "age_at_imaging",
            "study_description",
            "days_to_study",
            "object_id",
        ],  # fmt: skip
        [
            [DC_STUDY[k], f"['{CASES[k]}']", "Open-R1", "", EXAM[k], str(DAYS[k]), ""]
            for k in ("C1", "C2", "C3", "C4")
        ],
    )
    _tsv(
        base / "radiography_exam.tsv",
        [
            "imaging_studies.submitter_id",
            "case_ids",
            "exam_description",
            "view_position",
            "exam_notes",
            "type",
            "project_id",
            "submitter_id",
        ],  # fmt: skip
        [
            [DC_STUDY[k], CASES[k], EXAM[k], "AP", "", "radiography_exam", "Open-R1", DC_STUDY[k]]
            for k in ("C1", "C2", "C3", "C4")
        ],
    )
    series_header = [
        "radiography_exams.submitter_id", "case_ids", "image_type", "modality",
        "pixel_spacing", "series_description", "series_uid", "view_position", "project_id",
        "submitter_id",
    ]  # fmt: skip
    _tsv(
        base / "dx_series.tsv",
        series_header,
        [
            [
                DC_STUDY[k],
                CASES[k],
                "ORIGINAL,PRIMARY,",
                "DX",
                "0.139,0.139",
                "CHEST AP",
                DC_SERIES[k],
                "AP",
                "Open-R1",
                DC_SERIES[k],
            ]
            for k in ("C1", "C4")
        ],  # fmt: skip
    )
    _tsv(
        base / "cr_series.tsv",
        series_header,
        [
            [
                DC_STUDY["C2"],
                CASES["C2"],
                "DERIVED,PRIMARY",
                "CR",
                "",
                "Chest",
                DC_SERIES["C2"],
                "AP",
                "Open-R1",
                DC_SERIES["C2"],
            ]
        ],  # fmt: skip
    )
    _tsv(
        base / "measurement.tsv",
        ["case_ids", "test_name", "test_result_text", "test_days_from_index", "project_id"],
        [
            ["419639-002973", "COVID-19", "Positive", "3", "Open-R1"],
            ["419639-002973", "COVID-19", "Negative", "-20", "Open-R1"],
            ["419639-002973", "COVID-19", "Positive", "45", "Open-R1"],
            ["419639-002973", "COVID-19", "Negative", "45", "Open-R1"],
            ["419639-002974", "COVID-19", "Positive", "-30", "Open-R1"],
            ["419639-002974", "COVID-19", "Negative", "0", "Open-R1"],
            ["419639-002974", "Influenza", "Positive", "4", "Open-R1"],
        ],
    )
    with open(
        base / "MIDRC mRALE Mastermind Training Annotations_2079_20230428.csv",
        "w",
        newline="",
        encoding="utf-8",
    ) as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "StudyInstanceUID",
                "extent_right",
                "density_right",
                "extent_left",
                "density_left",
                "quality_issue",
                "extent_right_numerical",
                "density_right_numerical",
                "extent_left_numerical",
                "density_left_numerical",
                "mRALE Score",
            ]  # fmt: skip
        )
        writer.writerow([DC_STUDY["C1"], "25-50%", "Moderate", "<=25%", "Hazy", "", 2, 2, 1, 1, 6])
        writer.writerow([DC_STUDY["C2"], "None", "None", "None", "None", "Other QA", 0, 0, 0, 0, 0])
    return base


__all__ = ["add_ricord_duplicate", "make_commons", "make_ricord"]
