"""Follow-ups to review: the validation share carved from a train split, and CSV line numbers.

Line numbers are those a reader sees in an editor: blank lines and quoted multi-line cells
count. The expected numbers below are written out by hand from the file texts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mgll_data.build.engine import BuildOptions, build
from mgll_data.build.pipeline import SplitConfig, load_pipeline
from mgll_data.sources import make_source
from mgll_data.sources.splits import carve_validation
from mgll_data.sources.tables import read_csv_table
from mgll_data.vocab import load_vocabulary
from tests.benchmark_fixture import make_chexpert

# --- carving validation (and, where asked, test) out of a release's train split ----------------


def test_carve_validation_takes_its_share_and_ignores_test_unless_asked():
    splits = SplitConfig(validation_fraction=0.2, test_fraction=0.3, hash_salt="s")
    keys = [f"patient{k}" for k in range(4000)]
    plain = [carve_validation(k, splits) for k in keys]
    assert set(plain) == {"train", "validation"}  # a configured test share is not taken
    assert 0.17 < plain.count("validation") / len(keys) < 0.23
    both = [carve_validation(k, splits, carve_test=True) for k in keys]
    assert 0.27 < both.count("test") / len(keys) < 0.33
    assert 0.17 < both.count("validation") / len(keys) < 0.23
    # a key's side depends on the salt, and never on the order keys come in
    other = SplitConfig(validation_fraction=0.2, hash_salt="t")
    assert [carve_validation(k, other) for k in keys] != plain
    assert [carve_validation(k, splits) for k in reversed(keys)] == plain[::-1]


# --- line numbers of CSV rows -----------------------------------------------------------------


def test_table_index_is_each_rows_line_in_the_file(tmp_path):
    text = (
        "\r\n"  # 1: blank before the header
        "id,note\r\n"  # 2
        "a,one\r\n"  # 3
        "\r\n"  # 4: blank
        'b,"two\r\nlines"\r\n'  # 5-6: one record
        " \t \r\n"  # 7: spaces and a tab only
        ",\r\n"  # 8: a row of blank cells is a row
        "c,three"  # 9, no final newline
    )
    path = tmp_path / "table.csv"
    path.write_bytes(text.encode())
    table = read_csv_table(path, ("id", "note"))
    assert list(table["id"]) == ["a", "b", "", "c"]
    assert list(table.index) == [3, 5, 8, 9]


def _jpeg(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (24, 20), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_object_cxr_reasons_quote_the_true_line_after_blank_and_multiline_rows(tmp_path, newline):
    root = tmp_path / "raw"
    train = [
        "image_name,annotation",  # 1
        "00001.jpg,",  # 2
        "",  # 3: blank
        '00002.jpg,"0 4 6 20 15;',  # 4: a quoted cell over two lines
        '1 2 2 12 14"',  # 5
        "   ",  # 6: blank but for spaces
        "00010.jpg,3 1 1 5 5",  # 7: an unknown shape type
        "",  # 8
        "00020.jpg,0 1 1 5 5",  # 9: no such image
    ]
    root.mkdir()
    (root / "train.csv").write_bytes((newline.join(train) + newline).encode())
    (root / "dev.csv").write_text("image_name,annotation\n08001.jpg,\n")
    for seed, name in enumerate(["train/00001.jpg", "train/00002.jpg", "train/00010.jpg"]):
        _jpeg(root / name, seed)
    _jpeg(root / "dev" / "08001.jpg", 9)
    out = tmp_path / "out"
    build(load_pipeline("object_cxr"), root, out, BuildOptions(progress=False, image_size=16))
    entries = [json.loads(x) for x in (out / "_build/quarantine.jsonl").read_text().splitlines()]
    reasons = {e["id"]: e["reason"] for e in entries}
    assert reasons.keys() == {"object_cxr:00010", "object_cxr:00020"}  # 00002 read whole
    assert reasons["object_cxr:00010"].startswith("unreadable annotation (train.csv line 7: ")
    assert reasons["object_cxr:00020"] == "missing image: train.csv line 9 names train/00020.jpg"


def test_chexpert_names_the_true_line_of_a_bad_row_after_blank_lines(tmp_path):
    fixture = make_chexpert(tmp_path, train_count=30, valid_count=2)
    table = fixture.root / "CheXpert-v1.0-small" / "train.csv"
    header, *rows = table.read_text().splitlines()
    assert len(rows) == 30 and fixture.bad == {rows[-1].split(",")[0]}  # the last row is bad
    table.write_text("\n".join([header, "", *rows[:-1], "", rows[-1]]) + "\n")
    # header 1, blank 2, rows 3-31, blank 32: the bad row is on line 33
    scan = make_source(
        load_pipeline("chexpert"), fixture.root, load_vocabulary("chest_xray")
    ).scan()
    assert [(q.path, q.stage) for q in scan.quarantine] == [("train.csv row 33", "labels")]
