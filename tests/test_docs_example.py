"""The example source of `docs/architecture.md` builds a real dataset, as the page says it does."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from mgll_data.build.engine import BuildOptions, build
from mgll_data.build.pipeline import load_pipeline
from mgll_data.errors import UserError
from mgll_data.sources import SOURCES

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"


def _example_source() -> type:
    spec = importlib.util.spec_from_file_location("labels_csv", EXAMPLES / "labels_csv.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.LabelsCsvSource


def _release(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    rows = [("a.png", "Cardiomegaly|Effusion"), ("b.png", "No Finding"), ("c.png", "Effusion")]
    rows += [(f"n{k}.png", "No Finding") for k in range(5)]
    rng = np.random.default_rng(0)
    for name, _ in rows:
        Image.fromarray(rng.integers(0, 255, (40, 30), dtype=np.uint8), "L").save(
            root / "images" / name
        )
    rows += [("missing.png", "Cardiomegaly"), ("../a.png", "Effusion"), ("d.png", "Lung_Spots")]
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8), "L").save(root / "images" / "d.png")
    lines = ["image,findings", *(f"{n},{f}" for n, f in rows)]
    (root / "labels.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def test_example_source_builds_a_loadable_dataset(tmp_path, monkeypatch):
    monkeypatch.setitem(SOURCES, "labels_csv", _example_source())
    out = tmp_path / "out"
    build(
        load_pipeline(str(EXAMPLES / "labels_csv.yaml")),
        _release(tmp_path / "raw"),
        out,
        BuildOptions(image_size=32, progress=False),
    )
    rows = {}
    for split in datasets.load_dataset(str(out)).values():
        rows.update({r["id"]: r for r in split})
    assert len(rows) == 8
    a = rows["labels_csv:a.png"]
    assert a["text_category"] == "Cardiomegaly, Pleural Effusion"
    assert a["positive_labels"] == ["Cardiomegaly", "Pleural Effusion"]
    assert max(a["image"].size) == 32 and a["orig_width"] == 30
    assert rows["labels_csv:b.png"]["text_category"] == "No Finding"
    lines = (out / "_build" / "quarantine.jsonl").read_text().splitlines()
    reasons = {e["id"]: e["reason"] for e in map(json.loads, lines)}
    assert reasons == {
        "labels_csv:missing.png": "no such image file",
        "labels_csv:../a.png": "image name is not a plain file name",
        "labels_csv:d.png": "unknown findings ['Lung_Spots']",
    }


def test_example_source_names_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(SOURCES, "labels_csv", _example_source())
    (tmp_path / "raw").mkdir()
    with pytest.raises(UserError, match="no labels.csv"):
        build(
            load_pipeline(str(EXAMPLES / "labels_csv.yaml")),
            tmp_path / "raw",
            tmp_path / "out",
            BuildOptions(progress=False),
        )
