"""`mgll-build-dataset demo --learnable` and evaluation during `mgll-train fit`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from mgll_data.demo.controlled_task import FINDINGS, render, report_texts, sample_case
from tests.conftest import run_module


def test_cases_co_occur_and_are_imbalanced():
    rng = np.random.default_rng(0)
    cases = [sample_case(rng) for _ in range(3000)]
    counts = {f: sum(f in c for c in cases) for f in FINDINGS}
    normal = sum(not c for c in cases) / len(cases)
    assert 0.35 < normal < 0.55
    assert max(counts.values()) > 3 * min(counts.values()) > 0  # imbalance
    assert sum(len(c) > 1 for c in cases) > 0.1 * len(cases)  # several findings per image
    heart = [c for c in cases if "Cardiomegaly" in c]
    p_edema_heart = sum("Edema" in c for c in heart) / len(heart)
    p_edema = counts["Edema"] / len(cases)
    assert p_edema_heart > 3 * p_edema  # realistic co-occurrence


def test_each_finding_changes_the_image_and_the_finer_texts():
    base = render({}, 64, np.random.default_rng(1)).astype(float)
    for finding in FINDINGS:
        case = {finding: {"side": "right", "zone": "lower", "severity": 2}}
        img = render(case, 64, np.random.default_rng(1)).astype(float)
        assert np.abs(img - base).mean() > 0.5, finding  # a visible sign
    a = {"Effusion": {"side": "left", "zone": "lower", "severity": 0}}
    b = {"Effusion": {"side": "right", "zone": "lower", "severity": 2}}
    da, ea = report_texts(a)
    db, eb = report_texts(b)
    assert da != db and ea != eb  # same category, different finer texts
    assert "left" in da and "small" in da.lower() and "right" in db and "large" in db.lower()
    assert "No pneumothorax." in ea


def _run(module: str, args: list[str]) -> subprocess.CompletedProcess:
    return run_module(module, args, timeout=300)


@pytest.fixture(scope="module")
def learnable(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("learnable") / "ds"
    result = _run("mgll_data", ["demo", "--learnable", "--n", "150", "--out", str(out),
                                "--no-progress"])  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def test_learnable_demo_is_a_valid_dataset_with_report_texts(learnable):
    result = _run("mgll_data", ["validate", str(learnable)])
    assert result.returncode == 0 and "valid" in result.stdout, result.stdout + result.stderr
    rows = pq.read_table(sorted((learnable / "data").glob("*.parquet"))[0]).to_pylist()
    abnormal = [r for r in rows if r["positive_labels"] != ["No Finding"]]
    assert abnormal and {r["split"] for r in rows} <= {"train", "validation", "test"}
    for r in abnormal:
        assert r["text_origin"][1:] == ["learnable_report", "learnable_findings"]
        words = ("left", "right", "bilateral", "mild", "moderate", "severe", "small", "large")
        assert any(w in r["text_description"].lower() for w in words)
        assert r["text_category"] != r["text_description"]
    assert rows[0]["width"] == 64


def test_fit_with_val_data_appends_eval_lines(learnable, tmp_path):
    result = _run(
        "mgll_train",
        ["fit", "--train-data", str(learnable), "--val-data", str(learnable), "--val-split",
         "test", "--zeroshot-frequency", "2", "--epochs", "2", "--batch-size", "16",
         "--workers", "0", "--device", "cpu", "--logs", str(tmp_path), "--name", "r",
         "--warmup", "1"],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in lines if "eval" in x]
    assert [e["epoch"] for e in evals] == [1, 2]
    assert "retrieval" in evals[0]["eval"] and "zeroshot" not in evals[0]["eval"]
    assert {"zeroshot", "retrieval"} <= set(evals[1]["eval"])
    assert evals[1]["eval"]["split"] == "test"
    assert set(evals[1]["eval"]["retrieval"]["image_to_text"]) >= {"R@1", "R@5", "R@10"}
