"""`merge` (configs per source, refusal of mismatches) and `export` (webdataset, mgll-json)."""

from __future__ import annotations

import io
import json
import math
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mgll_data.cli import main
from mgll_data.errors import UserError
from mgll_data.publish.export import export, sample_key
from mgll_data.publish.inspect import read_card_header
from mgll_data.publish.merge import check_compatible, merge
from mgll_data.record import SCHEMA_VERSION
from mgll_data.schema import schema_version
from tests.fake_hub import build_dataset, pipeline_variant, write_release


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("merge-export")


@pytest.fixture(scope="module")
def two(work):
    release = write_release(work / "raw")
    a = build_dataset(release, work / "a", rows_per_shard=4)
    b = build_dataset(release, work / "b", pipeline_variant(work, name="nih_b"), rows_per_shard=8)
    return a, b


CARD_FIGURES = [
    "figures/label_cooccurrence.png",
    "figures/label_prevalence.png",
    "figures/sample_images.png",
]


def rows_of(folder, pattern="data/**/*.parquet"):
    rows = []
    for path in sorted(folder.glob(pattern)):
        rows += pq.read_table(path).to_pylist()
    return rows


def test_merge_gives_a_config_per_source_and_a_default_of_all(two, work):
    from datasets import load_dataset

    a, b = two
    merged = work / "merged"
    merge([a, b], merged)
    # byte-for-byte copies under data/{source}/
    for src, name in ((a, "chestxray14"), (b, "nih_b")):
        for shard in src.glob("data/*.parquet"):
            assert (merged / "data" / name / shard.name).read_bytes() == shard.read_bytes()
    everything = load_dataset(str(merged))
    only_b = load_dataset(str(merged), "nih_b")
    ids_a, ids_b = {r["id"] for r in rows_of(a)}, {r["id"] for r in rows_of(b)}
    all_ids = {i for split in everything.values() for i in split["id"]}
    assert all_ids == ids_a | ids_b and not ids_a & ids_b
    assert {i for split in only_b.values() for i in split["id"]} == ids_b
    header = read_card_header(merged)
    assert [c["config_name"] for c in header["configs"]] == ["default", "chestxray14", "nih_b"]
    mgll = header["mgll"]
    assert set(mgll["sources"]) == {"chestxray14", "nih_b"}
    assert mgll["annotated_labels"] == [
        n for n in mgll["label_names"] if n in mgll["sources"]["nih_b"]["annotated_labels"]
    ]
    manifest = json.loads((merged / "_build" / "manifest.json").read_text())
    assert len(manifest["licenses"]) == 2 and manifest["complete"]
    from mgll_data.publish.inspect import validate_dataset

    assert validate_dataset(merged) == []
    from mgll_train.data import resolve_data

    assert sorted(resolve_data(str(merged))) == sorted((merged / "data").rglob("*.parquet"))
    shard = next((merged / "data" / "nih_b").glob("*.parquet"))
    shard.write_bytes(b"PAR1 not really")
    assert any("nih_b" in p and "not a readable Parquet" in p for p in validate_dataset(merged))


def test_merge_refuses_a_mismatch_naming_both_datasets(two, work, capsys):
    a, b = two
    other = work / "b-other-vocab"
    shutil.copytree(b, other)
    card = other / "README.md"
    text = card.read_text()
    header_end = text.index("\n---\n", 4)
    changed = text[:header_end].replace("vocab_version: ", "vocab_version: x", 1)
    card.write_text(changed + text[header_end:])
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", str(a), str(other), "--out", str(work / "bad")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert str(a) in err[0] and str(other) in err[0] and "vocab_version differs" in err[0]
    assert not (work / "bad" / "README.md").exists()

    with pytest.raises(UserError, match="both are source 'chestxray14'"):
        merge([a, a], work / "bad2")


def test_export_webdataset_reads_back_with_webdataset(two, work):
    import webdataset as wds

    a, _ = two
    dest = work / "wds"
    export(a, "webdataset", dest, samples_per_tar=5)
    rows = [r for r in rows_of(a) if r["split"] == "train"]
    tars = sorted(dest.glob("train-*.tar"))
    assert [t.name for t in tars] == [f"train-{i:06d}.tar" for i in range(math.ceil(len(rows) / 5))]
    # what open_clip's --dataset-type webdataset does: group by key, png/jpg + txt
    dataset = wds.WebDataset([str(t) for t in tars], shardshuffle=False).to_tuple(
        "__key__", "png", "json", "txt"
    )
    got = list(dataset)
    assert len(got) == len(rows)
    for (key, png, meta, txt), row in zip(got, rows, strict=True):
        meta = json.loads(meta)
        assert key == sample_key(row["id"]) and meta["id"] == row["id"]
        assert png == row["image"]["bytes"]
        assert txt.decode() == row["text_description"]
        assert meta["text_category"] == row["text_category"]
        assert meta["text_explanation"] == row["text_explanation"]
        assert sorted(k for k, v in meta["labels"].items() if v == 1.0) == sorted(
            row["positive_labels"]
        )
    # deterministic: fixed mtime/owner, and a second export gives the same bytes
    with tarfile.open(tars[0]) as tar:
        assert {(m.mtime, m.uid, m.uname) for m in tar.getmembers()} == {(0, 0, "")}
    again = work / "wds2"
    export(a, "webdataset", again, samples_per_tar=5)
    assert all((again / t.name).read_bytes() == t.read_bytes() for t in tars)


def test_export_mgll_json_matches_the_reference_layout(two, work):
    a, _ = two
    dest = work / "mgll-json"
    export(a, "mgll-json", dest, list_name="2level_multi_disease_list")
    rows = {r["id"]: r for r in rows_of(a)}
    seen = 0
    for split, suffix in (("train", "train"), ("test", "test")):
        index = dest / f"2level_multi_disease_list_{suffix}.txt"
        lines = index.read_text().split()
        assert lines and all(line.startswith("/") for line in lines)
        for line in lines:
            records = json.loads(Path(str(dest) + line).read_text())  # data_dir + line
            for record in records:
                row = rows[record["id"]]
                assert record["split"] == split == row["split"]
                assert record["Disease"] == row["text_category"]
                assert record["Description"] == row["text_description"]
                # the reference code: data_dir + '/All_data_npz' + splitext(ImageID[9:])[0] + '.npz'
                assert record["ImageID"].startswith("/All_data/")
                stem = record["ImageID"][9:].rsplit(".", 1)[0]
                image = np.load(str(dest) + "/All_data_npz" + stem + ".npz")["image"]
                expected = np.asarray(Image.open(io.BytesIO(row["image"]["bytes"])))
                assert image.dtype == np.uint8 and np.array_equal(image, expected)
                seen += 1
    assert seen == len(rows)


def test_card_figures_and_sections_are_deterministic(two, work):
    from datasets import load_dataset_builder

    a, _ = two
    again = build_dataset(write_release(work / "raw"), work / "a-again", rows_per_shard=4)
    assert (again / "README.md").read_bytes() == (a / "README.md").read_bytes()
    text = (a / "README.md").read_text()
    figures = sorted(p.relative_to(a).as_posix() for p in (a / "figures").glob("*.png"))
    assert figures == CARD_FIGURES
    for path in figures:
        assert f"]({path})" in text
        assert (again / path).read_bytes() == (a / path).read_bytes()
        with Image.open(a / path) as image:
            assert image.size[0] > 300 and "Software" not in image.info
            # not blank: the figure shows something
            assert np.asarray(image.convert("L")).std() > 5
    assert "## Text lengths" in text and "over 77 tokens" in text and "## Example rows" in text
    first = rows_of(a, "data/train-*.parquet")[0]
    assert f"`{first['id']}`" in text and first["text_description"] in text
    # the YAML header still parses for datasets, figures and all
    builder = load_dataset_builder(str(a))
    assert builder.info.features["labels"].length == len(read_card_header(a)["mgll"]["label_names"])


def test_merged_card_has_the_figures_and_prevalence_table_of_a_built_card(two, work):
    a, b = two
    merged = work / "merged-card"
    merge([a, b], merged)
    text = (merged / "README.md").read_text()
    figures = sorted(p.relative_to(merged).as_posix() for p in (merged / "figures").glob("*.png"))
    assert figures == CARD_FIGURES
    assert "## Figures" in text and "## Text lengths" in text and "## Example rows" in text
    for path in figures:
        assert f"]({path})" in text
        with Image.open(merged / path) as image:
            image.verify()
    # the table counts every row of both sources, split by split, read here from the shards
    mgll = read_card_header(merged)["mgll"]
    names = mgll["label_names"]
    rows = rows_of(merged)
    splits = [s for s in ("train", "validation", "test") if any(r["split"] == s for r in rows)]
    assert f"| label | {' | '.join(splits)} |" in text
    for name in ("Atelectasis", "Lung Lesion"):
        k = names.index(name)
        cells = []
        for split in splits:
            seen = [r["labels"][k] for r in rows if r["split"] == split]
            seen = [v for v in seen if not math.isnan(v)]
            positive = sum(v == 1.0 for v in seen)
            share = f"{positive / len(seen):.1%}" if seen else ""
            cells.append(f"{positive} / {len(seen)} ({share})" if seen else "not annotated")
        assert f"| {name} | {' | '.join(cells)} |" in text
    assert "Lung Lesion" not in mgll["annotated_labels"]


def test_schema_versions_1_and_2_merge_and_others_are_refused():
    """Version 2 only added optional columns, so a version 1 build merges with a version 2 one
    (when neither has optional columns); a version this code does not know is refused."""
    assert SCHEMA_VERSION == schema_version() == 2  # record.py and schemas/record.yaml agree
    block = {"domain": "chest_xray", "vocab_version": "1.2.0", "label_names": ["A", "B"]}
    v1, v2 = Path("v1-build"), Path("v2-build")
    check_compatible({v1: {**block, "schema_version": 1}, v2: {**block, "schema_version": 2}})
    with pytest.raises(UserError, match=r"^cannot merge v1-build and v3-build: schema_version "):
        check_compatible(
            {v1: {**block, "schema_version": 1}, Path("v3-build"): {**block, "schema_version": 3}}
        )
    with pytest.raises(UserError, match=r"optional_columns differs"):
        check_compatible(
            {
                v1: {**block, "schema_version": 1},
                v2: {**block, "schema_version": 2, "optional_columns": ["mask"]},
            }
        )
