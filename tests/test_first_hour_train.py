"""`mgll-train` for a new user: a reused run name is refused, no false random-init warning,
`--epochs 0` is an error, a final summary line, a clear word on an exported folder, help and
argument errors before torch loads, help for every flag, one line for a missing accelerator,
and a quiet stop when the reader of its output goes away."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mgll_train.cli import _parser
from tests.conftest import REPO, run_module, small_demo_build

RANDOM_INIT = "No pretrained weights loaded for model"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return small_demo_build(tmp_path_factory.mktemp("first-hour-data"))


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One fresh one-step run `logs/run` and the output of its `fit`, asked to run on an
    accelerator this machine lacks (Apple's mps: known to torch, never available on Linux)."""
    logs = tmp_path_factory.mktemp("first-hour-logs")
    result = _mgll_train(*_fit(dataset, logs, "run", "--device", "mps"))
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


def test_fit_in_a_pipe_draws_no_bar_and_says_where_everything_is(trained):
    run, fit = trained
    assert "train:" not in fit.stderr and "step/s" not in fit.stderr  # stderr is no terminal
    last = fit.stdout.strip().splitlines()[-1]
    assert f"log {run / 'out.log'}" in last and f"metrics {run / 'metrics.jsonl'}" in last


@pytest.mark.wires("mgll-train fit", "--device")
def test_a_missing_accelerator_is_one_line_in_our_words(trained, caplog):
    run, fit = trained
    said = [x for x in (fit.stdout + fit.stderr).splitlines() if "mps" in x]
    assert len(said) == 1, said
    assert said[0].endswith("--device mps: no mps device is available here; running on the CPU")
    assert "open_clip" not in fit.stderr and "UserWarning" not in fit.stderr
    assert "--device mps" in (run / "out.log").read_text()
    # eval reads --device the same way
    from mgll_train.evaluate.cli import eval_device

    with caplog.at_level("WARNING", logger="mgll_train"):
        assert eval_device("mps").type == "cpu"
    assert [r.getMessage() for r in caplog.records] == [said[0].split(" | ")[-1]]


# ------------------------------------------------------------------ help and argument errors

HEAVY = ("torch", "open_clip", "open_clip_train", "datasets")


def _imported(*args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run `python -X importtime -m mgll_train args`; the top-level packages it imported."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "mgll_train", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    modules = {
        line.rsplit("|", 1)[-1].strip().split(".")[0]
        for line in result.stderr.splitlines()
        if line.startswith("import time:")
    }
    return result, modules


@pytest.mark.parametrize(
    "args, status, says",
    [
        (["--help"], 0, "fit"),
        (["fit", "--help"], 0, "--train-data"),
        (["eval", "--help"], 0, "--min-support"),
        (["export", "--help"], 0, "--checkpoint"),
        (["fit", "--batch-size", "0", "--train-data", "x"], 2, "--batch-size: must be a positive"),
        (["fit", "--batch-size", "4"], 2, "--train-data is required"),
        (["fit", "--train-data", "x", "--epochs", "0"], 2, "--epochs must be a positive"),
        (["fit", "--train-data", "x", "--save-frequency", "0"], 2, "--save-frequency: must be"),
        (["eval", "--checkpoint", "c.pt", "--out", "o"], 2, "--data"),
    ],
)
def test_help_and_argument_errors_come_before_torch(args, status, says):
    result, modules = _imported(*args)
    assert result.returncode == status, result.stderr[-2000:]
    assert says in (result.stdout if status == 0 else result.stderr)
    assert "mgll_train" in modules  # the import log was read
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))


def _options(command: str) -> list[argparse.Action]:
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices[command]
    return [a for a in parser._actions if a.option_strings and a.dest != "help"]


@pytest.mark.parametrize("command", ["fit", "eval", "export"])
def test_every_flag_says_what_it_does_and_its_default(command):
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices[command]
    for action in _options(command):
        assert action.help and len(action.help) > 10, action.option_strings
        if action.required or "(required" in action.help:  # --train-data may come from -c
            continue
        shown = parser._get_formatter()._expand_help(action)  # as --help prints it
        assert "default" in shown, (action.option_strings, shown)
        if action.default not in (None, False):  # a value, not a word, is the default
            assert f"(default: {action.default})" in shown, (action.option_strings, shown)


def test_required_flags_are_listed_as_required():
    for command, flags in (
        ("fit", {"--train-data"}),
        ("eval", {"--checkpoint", "--data", "--out"}),
        ("export", {"--checkpoint", "--out"}),
    ):
        sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
        text = sub.choices[command].format_help()
        section = text.split("required arguments:\n", 1)[1].split("\n\n", 1)[0]
        assert {f for f in flags if f"  {f} " in section} == flags, section


def _closed_stdout(*args: str) -> tuple[int, str]:
    """Run `python -m mgll_train args` whose reader is gone before it writes anything."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mgll_train", *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    return proc.wait(timeout=120), err


def test_a_closed_pipe_stops_quietly(trained, tmp_path):
    run, _ = trained
    status, err = _closed_stdout("fit", "--help")
    assert status == 0 and err == ""
    status, err = _closed_stdout(
        "export", "--checkpoint", str(run / "checkpoints" / "epoch_latest.pt"), "--out",
        str(tmp_path / "x"),
    )  # fmt: skip
    assert status == 141, err[-2000:]
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception" not in err
    assert (tmp_path / "x" / "open_clip_config.json").is_file()  # the work itself was done
