"""PadChest built through the real CLI from the real labels CSV of the torchxrayvision wheel (all
160,861 rows) with 16-bit PNGs generated for a few dozen rows, some in folders, some in zips."""

from __future__ import annotations

import ast
import csv
import functools
import gzip
import io
import json
import math
import shutil
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from mgll_data.build.pipeline import load_pipeline
from mgll_data.errors import UserError
from mgll_data.sources import make_source
from mgll_data.vocab import load_vocabulary
from tests.conftest import run_module
from tests.nih_fixture import xrv_data_file

CSV_NAME = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz"
REAL_ROWS = 160_861
VOCAB = load_vocabulary("chest_xray")
# Vocabulary label -> the PadChest labels that name it, written out from the PadChest label
# tree (Bustos et al. 2020) and the vocabulary's wording.
EXPECTED_MAP = {
    "No Finding": ["normal"],
    "Enlarged Cardiomediastinum": [
        "mediastinal enlargement", "superior mediastinal enlargement", "mediastinal mass",
        "calcified mediastinal adenopathy"],
    "Cardiomegaly": ["cardiomegaly"],
    "Lung Opacity": [
        "alveolar pattern", "ground glass pattern", "interstitial pattern",
        "reticular interstitial pattern", "reticulonodular interstitial pattern",
        "increased density", "miliary opacities"],
    "Lung Lesion": ["lung metastasis", "cavitation", "lepidic adenocarcinoma"],
    "Edema": ["pulmonary edema", "kerley lines"],
    "Consolidation": ["consolidation", "air bronchogram"],
    "Pneumonia": ["pneumonia", "atypical pneumonia"],
    "Atelectasis": [
        "atelectasis", "laminar atelectasis", "lobar atelectasis", "segmental atelectasis",
        "total atelectasis", "round atelectasis", "atelectasis basal"],
    "Pneumothorax": ["pneumothorax", "hydropneumothorax"],
    "Pleural Effusion": [
        "pleural effusion", "loculated pleural effusion", "loculated fissural effusion",
        "costophrenic angle blunting", "empyema"],
    "Pleural Other": ["pleural plaques", "calcified pleural plaques", "pleural mass"],
    "Pleural Thickening": [
        "pleural thickening", "apical pleural thickening", "calcified pleural thickening"],
    "Fracture": [
        "fracture", "rib fracture", "callus rib fracture", "clavicle fracture",
        "humeral fracture", "vertebral fracture", "vertebral compression",
        "vertebral anterior compression"],
    "Support Devices": [
        "NSG tube", "endotracheal tube", "tracheostomy tube", "gastrostomy tube",
        "chest drain tube", "ventriculoperitoneal drain tube", "nephrostomy tube",
        "double J stent", "catheter", "central venous catheter",
        "central venous catheter via jugular vein", "central venous catheter via subclavian vein",
        "central venous catheter via umbilical vein", "reservoir central venous catheter",
        "pacemaker", "dual chamber device", "single chamber device", "electrical device",
        "artificial heart valve", "artificial mitral heart valve", "artificial aortic heart valve",
        "aortic endoprosthesis", "endoprosthesis", "sternotomy", "osteosynthesis material",
        "humeral prosthesis"],
    "Emphysema": ["emphysema", "bullas", "COPD signs"],
    "Fibrosis": ["pulmonary fibrosis", "fibrotic band"],
    "Hernia": ["hiatal hernia"],
    "Infiltration": ["infiltrates"],
    "Mass": ["mass", "pulmonary mass"],
    "Nodule": ["nodule", "multiple nodules", "granuloma", "calcified granuloma"],
}  # fmt: skip
# One image for the first row holding each of these labels: every kind of mapping, the markers
# that leave labels unasserted, unmapped-only findings.
SAMPLED_LABELS = (
    "normal", "cardiomegaly", "pleural effusion", "pneumonia", "atelectasis", "nodule", "mass",
    "pneumothorax", "consolidation", "emphysema", "pulmonary fibrosis", "hiatal hernia",
    "COPD signs", "unchanged", "exclude", "scoliosis", "infiltrates", "pulmonary edema",
    "NSG tube", "callus rib fracture", "pleural thickening", "hydropneumothorax",
    "costophrenic angle blunting", "lung metastasis", "suboptimal study",
)  # fmt: skip
# An RNN_model row's flat cell: each label followed by its localizations.
RNN_CELL = "['cardiomegaly', 'loc cardiac', 'aortic elongation', 'loc aortic']"


def _parse(cell: str) -> list:
    """The test's own reading of a list cell (pandas wrote a missing list as nan)."""
    return [] if cell.strip() == "nan" else ast.literal_eval(cell)


def _labels_of(row: dict[str, str]) -> frozenset[str]:
    return _labels_in(row["Labels"])


@functools.cache
def _labels_in(cell: str) -> frozenset[str]:
    return frozenset(name.strip() for name in _parse(cell) if name.strip())


@dataclass
class Release:
    root: Path
    rows: list[dict[str, str]]  # every row of the real CSV
    chosen: list[dict[str, str]]  # rows given an image
    zipped: set[str] = field(default_factory=set)  # ImageIDs whose image is a zip member
    bomb: str = ""  # the ImageID whose zip member is a compression bomb


def _png16(seed: int, size: tuple[int, int] = (40, 48)) -> bytes:
    """A 12-bit radiograph as PadChest stores it: a 16-bit PNG, values 0..4095, a gradient."""
    width, height = size
    ramp = np.linspace(0, 4095, width)[None, :].repeat(height, 0)
    noise = np.random.default_rng(seed).integers(0, 64, (height, width))
    pixels = np.clip(ramp + noise, 0, 4095).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _choose(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """The first two rows (a normal PA, a lateral with localized findings), the first row for
    each sampled label, an AP_horizontal row, an RNN row with a flat cell, a row whose
    sentences hold a bare nan, and a row whose Labels is nan (it must be quarantined)."""
    chosen = {r["ImageID"]: r for r in rows[:2]}
    parsed = {}
    for row in rows:
        cell = row["Labels"]
        if cell not in parsed:
            parsed[cell] = {n.strip() for n in _parse(cell)}
    for label in SAMPLED_LABELS:
        row = next(r for r in rows if label in parsed[r["Labels"]] and r["ImageID"] not in chosen)
        chosen[row["ImageID"]] = row
    tests = (
        lambda r: r["Projection"] == "AP_horizontal",
        lambda r: r["LabelsLocalizationsBySentence"] == RNN_CELL,
        lambda r: r["LabelsLocalizationsBySentence"].startswith("[nan, "),
        lambda r: r["Labels"] == "nan",
    )
    for test in tests:
        row = next(r for r in rows if test(r) and r["ImageID"] not in chosen)
        chosen[row["ImageID"]] = row
    return list(chosen.values())


def _write_images(root: Path, chosen: list[dict[str, str]]) -> Release:
    """Every third chosen row's folder goes into `<ImageDir>.zip` (members under `<n>/`, with
    macOS clutter beside them); one zipped image is a 2 MiB bomb of zeros."""
    zipped_dirs = {row["ImageDir"] for row in chosen[2::3]}
    release = Release(root, [], chosen)
    archives: dict[str, zipfile.ZipFile] = {}
    for k, row in enumerate(chosen):
        data = _png16(k)
        directory, name = row["ImageDir"], row["ImageID"]
        if directory not in zipped_dirs:
            (root / directory).mkdir(exist_ok=True)
            (root / directory / name).write_bytes(data)
            continue
        if directory not in archives:
            archives[directory] = zipfile.ZipFile(root / f"{directory}.zip", "w")
            archives[directory].writestr(f"__MACOSX/{directory}/._{name}", b"\0" * 10)
        if not release.bomb and 2 <= k < len(chosen) - 1:  # not the rows tested by name
            release.bomb, data = name, bytes(2 * 2**20)
        archives[directory].writestr(f"{directory}/{name}", data, zipfile.ZIP_DEFLATED)
        release.zipped.add(name)
    for archive in archives.values():
        archive.close()
    return release


def make_chosen_release(root: Path) -> Release:
    """The chosen real rows alone (an uncompressed CSV, as unpacked) with their images."""
    rows = _read_rows(xrv_data_file(CSV_NAME))
    chosen = _choose(rows)
    root.mkdir(parents=True)
    with open(root / CSV_NAME.removesuffix(".gz"), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(chosen)
    return _write_images(root, chosen)


def _read_rows(path: Path) -> list[dict[str, str]]:
    with gzip.open(path, "rt", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _cli_build(root: Path, out: Path, *extra: str) -> Path:
    done = run_module(
        "mgll_data",
        ["build", "padchest", "--root", str(root), "--out", str(out), "--image-size", "32",
         "--no-progress", *extra],
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def _records(out: Path) -> dict[str, dict]:
    rows = []
    for path in sorted((out / "data").glob("*.parquet")):
        rows += pq.read_table(path).to_pylist()
    return {row["id"]: row for row in rows}


def _quarantine(out: Path) -> list[dict]:
    path = out / "_build" / "quarantine.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def real():
    """Every row of the real CSV, and the rows chosen to get an image."""
    rows = _read_rows(xrv_data_file(CSV_NAME))
    return rows, _choose(rows)


@pytest.fixture(scope="module")
def full(real, tmp_path_factory):
    """The whole real CSV (copied as downloaded) with images for the chosen rows, built."""
    rows, chosen = real
    root = tmp_path_factory.mktemp("padchest")
    shutil.copy(xrv_data_file(CSV_NAME), root / CSV_NAME)
    release = _write_images(root, chosen)
    release.rows = rows
    return release, _cli_build(root, tmp_path_factory.mktemp("out") / "padchest")


def _id(row: dict[str, str]) -> str:
    return "padchest:" + row["ImageID"].removesuffix(".png")


def test_every_real_row_is_a_record_or_quarantined_with_its_reason(full):
    release, out = full
    assert len(release.rows) == REAL_ROWS
    records, quarantined = _records(out), _quarantine(out)
    by_stage: dict[str, set[str]] = {}
    for entry in quarantined:
        by_stage.setdefault(entry["stage"], set()).add(entry["id"])
    no_findings = {_id(r) for r in release.rows if not _labels_of(r)}
    assert len(no_findings) == 880  # 103 nan cells and 777 [''] cells in the real file
    assert by_stage["labels"] == no_findings
    chosen = {_id(r) for r in release.chosen}
    assert by_stage["scan"] == {_id(r) for r in release.rows} - chosen - no_findings
    assert by_stage["image"] == {"padchest:" + release.bomb.removesuffix(".png")}
    assert set(records) == chosen - no_findings - by_stage["image"]
    assert len(records) + len(quarantined) == REAL_ROWS
    reasons = {e["stage"]: e["reason"] for e in quarantined}
    assert reasons["scan"].startswith("image not found")
    assert "over the 100x ratio cap" in reasons["image"]
    # the zips were read: their images (but the bomb) are records
    assert {f"padchest:{n.removesuffix('.png')}" for n in release.zipped} - set(records) == {
        "padchest:" + release.bomb.removesuffix(".png")
    }


def test_per_label_counts_equal_the_csv(full):
    release, out = full
    records = _records(out)
    built = [r for r in release.chosen if _id(r) in records]
    for label in VOCAB.names:
        index = VOCAB.index(label)
        got = Counter(
            "nan" if math.isnan(v) else v for v in (records[_id(r)]["labels"][index] for r in built)
        )
        want: Counter = Counter()
        for row in built:
            names = _labels_of(row)
            if label not in EXPECTED_MAP:
                want["nan"] += 1
            elif names & set(EXPECTED_MAP[label]):
                want[1.0] += 1
            else:  # unlisted: absent, unless the report does not list its findings
                want["nan" if names & {"unchanged", "exclude"} else 0.0] += 1
        assert got == want, label
    # the sample reaches every kind: positives of most mapped labels, and unasserted rows
    positives = {
        VOCAB.names[i] for r in records.values() for i, v in enumerate(r["labels"]) if v == 1
    }
    assert len(positives) >= 15
    assert any(all(math.isnan(v) for v in r["labels"]) for r in records.values())


def test_texts_extra_and_metadata_of_known_rows(full):
    release, out = full
    records = _records(out)
    lateral = records[_id(release.rows[1])]  # the CSV's second row, physician-labelled
    assert lateral["text_category"] == "Lung Opacity, Fibrosis"
    assert lateral["text_description"] == (
        "Pulmonary fibrosis (basal bilateral). Chronic changes. Kyphosis. "
        "Pseudonodule and ground glass pattern (basal)."
    )
    assert lateral["text_explanation"].startswith(VOCAB.label("Lung Opacity").explanation)
    assert lateral["text_origin"] == ["labels", "labels_by_sentence", "vocabulary"]
    assert lateral["view"] == "LATERAL" and lateral["sex"] == "M"
    assert lateral["age_years"] == 2015 - 1929  # study 20150914, born 1929
    extra = json.loads(lateral["extra"])
    assert extra["method_label"] == "Physician" and extra["projection"] == "L"
    assert extra["padchest_labels"] == [
        "pulmonary fibrosis", "chronic changes", "kyphosis", "pseudonodule", "ground glass pattern"
    ]  # fmt: skip
    assert extra["padchest_localizations"] == ["loc basal", "loc basal bilateral"]
    assert extra["report_es"].startswith("cambi pulmonar cronic sever . sign fibrosis bibasal")
    normal = records[_id(release.rows[0])]
    assert normal["text_category"] == "No Finding" and normal["text_description"] == "Normal."
    assert normal["view"] == "PA" and normal["patient_id"] == release.rows[0]["PatientID"]
    rnn_row = next(r for r in release.chosen if r["LabelsLocalizationsBySentence"] == RNN_CELL)
    rnn = records[_id(rnn_row)]
    assert rnn["text_description"] == "Cardiomegaly (cardiac). Aortic elongation (aortic)."
    assert json.loads(rnn["extra"])["method_label"] == "RNN_model"
    supine = next(r for r in release.chosen if r["Projection"] == "AP_horizontal")
    assert records[_id(supine)]["view"] == "AP"


def test_patients_stay_in_one_split_and_the_build_loads(full):
    release, out = full
    records = _records(out)
    splits = {(r["patient_id"], r["split"]) for r in records.values()}
    assert len({p for p, _ in splits}) == len(splits)
    loaded = datasets.load_dataset(str(out))
    assert sum(len(split) for split in loaded.values()) == len(records)


def test_sixteen_bit_pngs_are_rescaled_by_their_own_range(full):
    release, out = full
    record = _records(out)[_id(release.rows[0])]
    pixels = np.asarray(Image.open(io.BytesIO(record["image"]["bytes"])))
    assert pixels.dtype == np.uint8 and pixels.shape == (32, 27)  # 40 x 48, longest side 32
    # a 0..4095 ramp: clipped to 8 bits it would be white from its 16th part on
    assert pixels.min() < 30 and pixels.max() > 225 and 80 < np.median(pixels) < 176


def test_unmapped_labels_are_counted_in_the_build_notes(full):
    release, out = full
    notes = json.loads((out / "_build" / "manifest.json").read_text())["notes"]
    note = next(n for n in notes if n.startswith("labels mapped to no vocabulary label"))
    built = [r for r in release.chosen if _id(r) in _records(out)]
    scoliosis = sum("scoliosis" in _labels_of(r) for r in built)
    assert scoliosis > 0 and f"scoliosis {scoliosis}" in note
    assert "cardiomegaly" not in note


# --- a small release of real rows with hostile cells ------------------------------------------


@pytest.fixture(scope="module")
def small(real, tmp_path_factory):
    """The chosen real rows (uncompressed CSV) with hostile cells added, images in folders."""
    rows, chosen = real
    root = tmp_path_factory.mktemp("padchest-small")
    hostile = {
        "malformed": dict(chosen[2], Labels="['cardiomegaly'"),
        "huge": dict(chosen[3], Labels="['" + "a" * 2_000_000 + "']"),
        "nested": dict(chosen[4], LabelsLocalizationsBySentence="[" * 5000 + "]" * 5000),
        "not_strings": dict(chosen[5], Localizations="[1, 2]"),
        "code": dict(chosen[6], Labels="__import__('os').system('false')"),
        "escape": dict(chosen[7], ImageID="../../outside.png"),
    }
    for key, row in hostile.items():
        row["ImageID"] = row["ImageID"] if key == "escape" else f"hostile{key}.png"
    written = chosen + list(hostile.values())
    with open(root / CSV_NAME.removesuffix(".gz"), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(written)
    for k, row in enumerate(written):
        if "/" not in row["ImageID"]:
            (root / row["ImageDir"]).mkdir(exist_ok=True)
            (root / row["ImageDir"] / row["ImageID"]).write_bytes(_png16(k))
    return root, chosen, hostile


def test_hostile_cells_are_quarantined_with_their_reason(small):
    root, chosen, hostile = small
    scan = make_source(load_pipeline("padchest"), root, VOCAB).scan()
    reasons = {q.id: q.reason for q in scan.quarantine}
    assert reasons["padchest:hostilemalformed"] == (
        "Labels cell \"['cardiomegaly'\" is not a list literal"
    )
    assert reasons["padchest:hostilehuge"] == "Labels cell is 2,000,004 characters (over 10,000)"
    assert reasons["padchest:hostilenested"].startswith("LabelsLocalizationsBySentence cell '[[[")
    assert reasons["padchest:hostilenot_strings"] == (
        "Localizations cell '[1, 2]' is not a list of strings"
    )
    assert reasons["padchest:hostilecode"].endswith("is not a list literal")
    escape = [q for q in scan.quarantine if q.id.startswith("padchest:row-")]
    assert len(escape) == 1 and "not a .png file name" in escape[0].reason
    # the real rows are unaffected: all but the nan-labelled one are items
    assert {i.id for i in scan.items} == {_id(r) for r in chosen if _labels_of(r)}


@pytest.mark.wires("mgll-build-dataset build", "--views")
def test_views_keep_only_the_named_projections(small, tmp_path):
    root, chosen, hostile = small
    out = _cli_build(root, tmp_path / "frontal", "--views", "PA,AP")
    views = {r["view"] for r in _records(out).values()}
    assert views == {"PA", "AP"}
    frontal = {_id(r) for r in chosen if r["Projection"] in ("PA", "AP", "AP_horizontal")}
    assert set(_records(out)) == frontal & {_id(r) for r in chosen if _labels_of(r)}
    notes = json.loads((out / "_build" / "manifest.json").read_text())["notes"]
    written = [*chosen, *hostile.values()]
    lateral = sum(r["Projection"] not in ("PA", "AP", "AP_horizontal") for r in written)
    assert f"--views AP,PA: other projections left out: {lateral}" in notes


def test_method_physician_keeps_only_physician_rows(small, tmp_path):
    root, chosen, _ = small
    raw = yaml.safe_load(load_pipeline("padchest").path.read_text())
    raw["labels"]["method"] = "physician"
    path = tmp_path / "padchest-physician.yaml"
    path.write_text(yaml.safe_dump(raw))
    scan = make_source(load_pipeline(str(path)), root, VOCAB).scan()
    physician = {_id(r) for r in chosen if r["MethodLabel"] == "Physician" and _labels_of(r)}
    assert {i.id for i in scan.items} == physician
    assert 0 < len(physician) < len([r for r in chosen if _labels_of(r)])


def test_a_folder_without_the_labels_csv_is_refused(tmp_path):
    source = make_source(load_pipeline("padchest"), tmp_path, VOCAB)
    with pytest.raises(UserError, match="not a PadChest release; expected PADCHEST_chest_x_ray"):
        source.scan()
