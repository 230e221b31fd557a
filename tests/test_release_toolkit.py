"""The release toolkit: walking, finding, indexing, and reading values as every source does."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import pytest
import yaml

from mgll_data.build.pipeline import load_pipeline
from mgll_data.errors import UserError
from mgll_data.sources import SOURCES, make_source
from mgll_data.sources.fundus.graded import GradedLayout, GradedSource
from mgll_data.sources.tables import read_csv_table
from mgll_data.sources.toolkit import (
    decode_text,
    find_file,
    index_images,
    is_hidden,
    parse_age,
    parse_finite,
    pick_image,
    release_files,
    walk_release,
)
from mgll_data.vocab import load_vocabulary


def _touch(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


# --- walking -------------------------------------------------------------------------------


def test_hidden_names():
    for name in (".DS_Store", "._0_left.jpg", "__MACOSX", ".git"):
        assert is_hidden(name), name
    for name in ("0_left.jpg", "MACOSX", "a._b.png", "train_images"):
        assert not is_hidden(name), name


def test_walk_prunes_hidden_folders_and_files(tmp_path):
    _touch(
        tmp_path,
        "b/2.png",
        "a/1.png",
        "a/.DS_Store",
        "a/._1.png",
        "__MACOSX/a/._1.png",
        ".cache/3.png",
    )
    walked = [
        (Path(folder).relative_to(tmp_path).as_posix(), dirs, files)
        for folder, dirs, files in walk_release(tmp_path)
    ]
    assert walked == [(".", ["a", "b"], []), ("a", [], ["1.png"]), ("b", [], ["2.png"])]
    assert [p.relative_to(tmp_path).as_posix() for p in release_files(tmp_path)] == [
        "a/1.png",
        "b/2.png",
    ]


def test_walk_depth_and_skip(tmp_path):
    _touch(tmp_path, "top.csv", "a/one.csv", "a/b/two.csv", "files/p10/x.csv")
    shallow = [p.name for p in release_files(tmp_path, max_depth=1)]
    assert shallow == ["top.csv", "one.csv"]  # walk order: a folder's files, then its folders
    kept = [
        Path(folder).name
        for folder, _, _ in walk_release(tmp_path, skip_dir=lambda p: p.name == "files")
    ]
    assert "files" not in kept and "b" in kept


# --- finding files -------------------------------------------------------------------------


def test_find_file_exact_gz_depth_and_order(tmp_path):
    _touch(tmp_path, "deep/x/labels.csv", "sub/labels.csv.gz", "other.csv")
    assert find_file(tmp_path, ("labels.csv",)) == tmp_path / "sub/labels.csv.gz"  # shallowest
    assert find_file(tmp_path, ("labels.csv",), max_depth=0) is None
    assert find_file(tmp_path, ("missing.csv", "other.csv")) == tmp_path / "other.csv"
    _touch(tmp_path, "labels.csv")
    assert find_file(tmp_path, ("labels.csv",)) == tmp_path / "labels.csv"
    # earlier names win over shallower files
    assert find_file(tmp_path, ("other.csv", "labels.csv")) == tmp_path / "other.csv"
    assert find_file(tmp_path, ("LABELS.csv",)) is None  # exact unless loose


def test_find_file_loose_prefix_and_case(tmp_path):
    _touch(tmp_path, "2. Groundtruths/a. RFMiD_Training_Labels.CSV", "xRFMiD_Testing_Labels.csv")
    found = find_file(tmp_path, ("RFMiD_Training_Labels.csv",), loose=True)
    assert found == tmp_path / "2. Groundtruths/a. RFMiD_Training_Labels.CSV"
    # a prefix must end in a separator: `xRFMiD...` is another name
    assert find_file(tmp_path, ("RFMiD_Testing_Labels.csv",), loose=True) is None


def test_find_file_ignores_macos_twins(tmp_path):
    _touch(tmp_path, "__MACOSX/._train.csv", "._train.csv", ".hidden/train.csv")
    assert find_file(tmp_path, ("train.csv",), loose=True) is None
    _touch(tmp_path, "aptos/train.csv")
    assert find_file(tmp_path, ("train.csv",), loose=True) == tmp_path / "aptos/train.csv"


# --- images --------------------------------------------------------------------------------


def test_index_images_by_stem_without_clutter(tmp_path):
    _touch(
        tmp_path,
        "train/IM1.JPG",
        "test/im1.png",
        "train/notes.txt",
        "train/._IM1.JPG",
        "__MACOSX/train/IM2.jpg",
    )
    index = index_images(tmp_path)
    assert sorted(index) == ["im1"]
    assert [Path(p).relative_to(tmp_path).as_posix() for p in index["im1"]] == [
        "test/im1.png",
        "train/IM1.JPG",
    ]
    assert index_images(tmp_path, (".png",))["im1"] == [str(tmp_path / "test" / "im1.png")]
    best = pick_image(index["im1"], tmp_path, prefer="train")
    assert best == str(tmp_path / "train" / "IM1.JPG")
    assert pick_image(index["im1"], tmp_path, avoid=("test",)) == best


# --- values --------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", ["inf", "-inf", "Infinity", "1e400", "nan", "NaN", "", "x", None])
def test_parse_finite_rejects_infinity_nan_and_text(raw):
    assert parse_finite(raw) is None


def test_parse_finite_numbers():
    assert parse_finite(" 2 ") == 2.0 and parse_finite("0.143") == 0.143
    assert parse_finite(3) == 3.0 and parse_finite("-1.0") == -1.0
    assert all(math.isfinite(parse_finite(v)) for v in ("1e300", "-0"))


def test_parse_age_units_and_limits():
    assert parse_age("057") == 57.0 and parse_age(" 58Y ") == 58.0 and parse_age("45 y") == 45.0
    assert parse_age("006M") == 0.5
    assert parse_age("026W") == pytest.approx(0.498, abs=1e-3)
    assert parse_age("010D") == pytest.approx(10 / 365.25)
    assert parse_age("120") == 120.0 and parse_age("121") is None
    for raw in ("", None, "abc", "5.5", "-3", "12X"):
        assert parse_age(raw) is None, raw


def test_decode_text_latin1_fallback():
    assert decode_text("café".encode()) == "café"
    assert decode_text("café".encode("latin-1")) == "café"
    assert decode_text(b"\xef\xbb\xbfa") == "\ufeffa"  # a BOM is the caller's to drop


def test_read_csv_table_latin1_gz_bom(tmp_path):
    latin = tmp_path / "latin.csv"
    latin.write_bytes("ID,Name\r\n1,Zoë,\r\n".encode("latin-1"))
    assert read_csv_table(latin, ("ID",)).to_dict("records") == [{"ID": "1", "Name": "Zoë"}]
    packed = tmp_path / "packed.csv.gz"
    packed.write_bytes(gzip.compress('\ufeff"ID",n\n007,\n'.encode()))
    assert read_csv_table(packed, ("ID",)).to_dict("records") == [{"ID": "007", "n": ""}]
    with pytest.raises(UserError, match="missing column"):
        read_csv_table(latin, ("Age",))
    broken = tmp_path / "broken.csv.gz"
    broken.write_bytes(b"\x1f\x8bnot gzip")
    with pytest.raises(UserError, match="not a readable CSV"):
        read_csv_table(broken, ())


# --- the graded-release reader's configuration ---------------------------------------------


GRADED = ("aptos", "eyepacs", "idrid", "messidor2")


def test_graded_pipelines_share_one_reader_and_the_vocabulary_wording():
    vocab = load_vocabulary("fundus")
    icdr = vocab.raw["gradings"]["icdr"]
    assert sorted(icdr["grades"]) == [0, 1, 2, 3, 4]
    for name in GRADED:
        pipeline = load_pipeline(name)
        assert SOURCES[pipeline.source] is GradedSource
        assert pipeline.raw["labels"]["grading"] == "icdr"
        assert "grades" not in pipeline.raw["labels"]  # the wording lives in the vocabulary
        layout = GradedLayout.from_pipeline(pipeline)
        assert layout.tables and layout.id_column and layout.grade_column


def test_graded_reader_names_a_broken_release_section(tmp_path):
    pipeline = load_pipeline("aptos")
    vocab = load_vocabulary("fundus")
    bad = tmp_path / "bad.yaml"
    raw = dict(pipeline.raw, release={"name": "an X release"})
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError, match="release.id_column"):
        make_source(load_pipeline(str(bad)), tmp_path, vocab)
    raw = dict(pipeline.raw, labels={"grading": "nope"})
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError, match="labels.grading"):
        make_source(load_pipeline(str(bad)), tmp_path, vocab)
