"""Metrics sinks: metrics.jsonl always, TensorBoard per `--report-to`."""

from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mgll_train import reporting
from mgll_train.reporting import MetricsReporter, ReportError, numeric_leaves


def test_numeric_leaves_flattens_and_skips_non_numbers():
    tree = {"a": 1, "b": {"c": 2.5, "d": [1, 2], "e": "x", "f": float("inf")}, "g": True}
    assert dict(numeric_leaves(tree)) == {"a": 1.0, "b/c": 2.5, "b/f": float("inf")}


def test_tensorboard_mirrors_train_and_eval_records(tmp_path):
    reporter = MetricsReporter(tmp_path, "tensorboard")
    reporter.train({"step": 1, "epoch": 0, "loss": 2.0, "truncated": {"category": 0.5}}, step=1)
    reporter.train({"step": 2, "epoch": 0, "loss": 1.5, "truncated": {"category": 0.0}}, step=2)
    reporter.evaluation({"zeroshot": {"macro_auroc": 0.75, "per_label": {"A": 0.7}}}, 1, step=2)
    reporter.close()

    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [set(line) for line in lines] == [{"train"}, {"train"}, {"eval", "epoch"}]
    assert lines[2]["epoch"] == 1

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {
        "train/loss",
        "train/truncated/category",
        "val/zeroshot/macro_auroc",
        "val/zeroshot/per_label/A",
    }
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 2.0), (2, 1.5)]
    assert events.Scalars("val/zeroshot/macro_auroc")[0].value == pytest.approx(0.75)


def test_none_writes_json_lines_only(tmp_path):
    reporter = MetricsReporter(tmp_path, "none")
    reporter.train({"step": 1, "loss": 1.0}, step=1)
    reporter.close()
    assert reporter.tensorboard_dir is None
    assert not (tmp_path / "tensorboard").exists()
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1


def test_missing_package(tmp_path, monkeypatch):
    monkeypatch.setattr(reporting, "tensorboard_available", lambda: False)
    quiet = MetricsReporter(tmp_path, "auto")  # auto stays quiet without the package
    assert quiet.tensorboard_dir is None
    with pytest.raises(ReportError, match="tensorboard package is not installed"):
        MetricsReporter(tmp_path, "tensorboard")
    with pytest.raises(ReportError, match="tensorboard package is not installed"):
        reporting.check_report_to("tensorboard")  # what fit() runs first, on every rank
    reporting.check_report_to("auto")
