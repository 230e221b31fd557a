"""`mgll-train` for a new user: a reused run name is refused, no false random-init warning,
`--epochs 0` is an error, a final summary line, and a clear word on an exported folder."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from mgll_data.build.engine import BuildOptions, build
from mgll_data.build.pipeline import load_pipeline
from mgll_data.demo.nih_release import write_demo_release
from tests.conftest import run_module

RANDOM_INIT = "No pretrained weights loaded for model"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("first-hour-data")
    raw = write_demo_release(root / "raw", n=40, seed=3, image_size=64)
    build(
        load_pipeline("chestxray14"), raw, root / "ds", BuildOptions(image_size=64, progress=False)
    )
    return root / "ds"


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One fresh one-step run `logs/run` and the output of its `fit`."""
    logs = tmp_path_factory.mktemp("first-hour-logs")
    result = _mgll_train(*_fit(dataset, logs, "run"))
    assert result.returncode == 0, result.stderr[-2000:]
    return logs / "run", result


def _fit(dataset: Path, logs: Path, name: str, *extra: str) -> list[str]:
    return [
        "fit", "--train-data", str(dataset), "--model", "mgll-tiny", "--batch-size", "4",
        "--workers", "0", "--device", "cpu", "--logs", str(logs), "--name", name,
        "--max-steps", "1", "--report-to", "none", *extra,
    ]  # fmt: skip


def _mgll_train(*args: str) -> subprocess.CompletedProcess:
    return run_module("mgll_train", list(args))


def _eval(checkpoint: Path, dataset: Path, out: Path) -> subprocess.CompletedProcess:
    return _mgll_train(
        "eval", "--checkpoint", str(checkpoint), "--data", str(dataset), "--out", str(out),
        "--tasks", "zeroshot", "--bootstrap", "5", "--workers", "0",
    )  # fmt: skip


@pytest.mark.wires("mgll-train fit", "--name", "--resume")
def test_fit_refuses_an_existing_run_name_unless_resuming(trained, dataset):
    run, _ = trained
    before = {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()}
    rows = (run / "metrics.jsonl").read_text()
    again = _mgll_train(*_fit(dataset, run.parent, "run"))
    assert again.returncode == 2
    (line,) = again.stderr.strip().splitlines()
    assert str(run) in line and "--resume latest" in line and "--name" in line
    assert {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()} == before
    assert (run / "metrics.jsonl").read_text() == rows
    # --resume continues the run, and its weights are loaded: no random-init warning
    resumed = _mgll_train(
        *_fit(dataset, run.parent, "run", "--resume", "latest", "--max-steps", "2")
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert RANDOM_INIT not in resumed.stdout + resumed.stderr
    # an empty folder (made by hand) is not a run
    (run.parent / "empty").mkdir()
    fresh = _mgll_train(*_fit(dataset, run.parent, "empty"))
    assert fresh.returncode == 0, fresh.stderr[-2000:]


def test_random_init_warning_only_where_true(trained, dataset, tmp_path):
    run, fit = trained
    assert RANDOM_INIT in fit.stdout + fit.stderr  # a fresh fit without --pretrained: true
    checkpoint = run / "checkpoints" / "epoch_latest.pt"
    export = _mgll_train("export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "x"))
    assert export.returncode == 0, export.stderr[-2000:]
    assert RANDOM_INIT not in export.stdout + export.stderr
    evaluated = _eval(checkpoint, dataset, tmp_path / "eval")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert RANDOM_INIT not in evaluated.stdout + evaluated.stderr


def test_fit_ends_with_a_summary_line(trained):
    run, fit = trained
    last = fit.stdout.strip().splitlines()[-1]
    assert "done: 1 steps" in last and "epochs" in last and "final loss" in last
    assert " s; checkpoints in " in last and str(run / "checkpoints") in last
    assert (run / "checkpoints" / "epoch_latest.pt").is_file()


@pytest.mark.wires("mgll-train fit", "--epochs", "--config")
def test_zero_epochs_is_an_error(dataset, tmp_path):
    zero = _mgll_train(*_fit(dataset, tmp_path, "zero", "--epochs", "0"))
    assert zero.returncode == 2
    (line,) = zero.stderr.strip().splitlines()  # one line, no usage block
    assert "--epochs must be a positive integer, got 0" in line and "nothing" in line
    config = tmp_path / "c.yaml"
    config.write_text("epochs: 0\n")
    from_config = _mgll_train(*_fit(dataset, tmp_path, "zero", "-c", str(config)))
    assert from_config.returncode == 2 and "--epochs must be a positive" in from_config.stderr
    assert not (tmp_path / "zero").exists()


@pytest.mark.wires("mgll-train eval", "--checkpoint")
def test_eval_of_an_exported_folder_says_what_it_expected(trained, dataset, tmp_path):
    run, _ = trained
    folder = tmp_path / "exported"
    export = _mgll_train(
        "export", "--checkpoint", str(run / "checkpoints" / "epoch_latest.pt"), "--out", str(folder)
    )
    assert export.returncode == 0, export.stderr[-2000:]
    result = _eval(folder, dataset, tmp_path / "eval")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "not found" not in line
    assert ".pt" in line and "mgll-train fit" in line and f"local-dir:{folder}" in line
