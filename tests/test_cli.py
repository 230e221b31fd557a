"""The `mgll-build-dataset` and `mgll-train` command lines, mostly run as real subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mgll_data.demo.nih_release import write_demo_release
from mgll_train.cli import main as train_main
from mgll_train.errors import UserError
from tests.conftest import run_module

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "mgll_data", *args], capture_output=True, text=True, cwd=REPO
    )
    if check and result.returncode != 0:
        raise AssertionError(result.stderr)
    return result


def test_help_and_list():
    assert "demo" in cli("--help").stdout and "--image-size" in cli("build", "--help").stdout
    listing = cli("list").stdout
    assert "chestxray14" in listing and "redistribution=public" in listing


@pytest.mark.wires("mgll-build-dataset demo", "--n")
def test_demo_validate_info(tmp_path):
    out = tmp_path / "demo"
    result = cli("demo", "--out", str(out), "--n", "24", "--seed", "3", "--image-size", "128")
    assert "built 24 records" in result.stdout
    assert "valid" in cli("validate", str(out)).stdout
    info = cli("info", str(out)).stdout
    assert "24 rows" in info and "Cardiomegaly" in info and "not annotated" in info
    # Running the demo again replaces its build instead of failing.
    cli("demo", "--out", str(out), "--n", "24", "--seed", "3", "--image-size", "128")


def test_validate_finds_tampering(tmp_path):
    out = tmp_path / "demo"
    cli("demo", "--out", str(out), "--n", "12", "--image-size", "64")
    shard = sorted((out / "data").glob("*.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[:-100] + b"\0" * 100)
    result = cli("validate", str(out), check=False)
    assert result.returncode == 1 and "sha256 differs from the manifest" in result.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (("build", "chestxray14", "--root", "/nonexistent", "--out", "/tmp/x"), "not a directory"),
        (("build", "nosuchpipeline", "--root", ".", "--out", "/tmp/x"), "unknown pipeline"),
        (("validate", "/nonexistent"), "/nonexistent: no such folder"),
        (
            ("build", "chestxray14", "--root", "/tmp", "--out", "/tmp/x", "--workers", "0"),
            "positive integer",
        ),
    ],
)
def test_user_errors_are_one_line(args, message):
    result = cli(*args, check=False)
    assert result.returncode == 2
    # One line says what is wrong (argparse prints its usage above it for flag errors).
    assert message in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr


@pytest.mark.wires("mgll-build-dataset build", "--resume")
def test_killed_build_resumes_to_identical_output(tmp_path):
    root = write_demo_release(tmp_path / "raw", n=40, seed=1)
    common = ["build", "chestxray14", "--root", str(root), "--rows-per-shard", "2", "--no-progress"]
    cli(*common, "--out", str(tmp_path / "whole"))
    total = len(list((tmp_path / "whole" / "data").glob("*.parquet")))

    out = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "mgll_data", *common, "--out", str(out)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not list((out / "data").glob("*.parquet")) and time.time() < deadline:
        time.sleep(0.002)
    os.kill(process.pid, signal.SIGSTOP)
    done_at_kill = len(list((out / "data").glob("*.parquet")))
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert 0 < done_at_kill < total, "the build must be killed mid-way for this test to mean much"

    cli(*common, "--out", str(out), "--resume")
    for path in sorted((tmp_path / "whole" / "data").glob("*.parquet")):
        assert (out / "data" / path.name).read_bytes() == path.read_bytes()
    assert sorted(p.name for p in (out / "data").iterdir()) == sorted(
        p.name for p in (tmp_path / "whole" / "data").iterdir()
    )
    assert (out / "README.md").read_bytes() == (tmp_path / "whole" / "README.md").read_bytes()
    assert not list((out / "_build" / "tmp").iterdir())


def test_source_options_are_checked_by_the_source(tmp_path):
    out = tmp_path / "demo"
    cli("demo", "--out", str(out), "--n", "8", "--image-size", "32")
    result = cli(
        "build",
        "chestxray14",
        "--root",
        str(out / "_raw"),
        "--out",
        str(tmp_path / "x"),
        "--images",
        "dicom",
        check=False,
    )
    assert result.returncode == 2
    assert "does not take --images" in result.stderr.strip().splitlines()[-1]


# ----------------------------------------------------------------------------- mgll-train


def _not_an_mgll_build(tmp_path: Path) -> Path:
    path = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "split": ["train", "train"]}), path)
    return path


@pytest.mark.parametrize(
    "case,message",
    [
        ("missing-data", "no such file or directory"),
        ("not-mgll", "not an mgll shard"),
        ("missing-checkpoint", "checkpoint not found"),
        ("text-as-checkpoint", "not a checkpoint written by mgll-train fit"),
        ("foreign-checkpoint", "expected model_name and state_dict in it"),
        ("bad-config-value", "batch-size: invalid literal for int()"),
    ],
)
def test_train_user_errors_are_one_line(tmp_path, case, message):
    fit = ["fit", "--device", "cpu", "--workers", "0", "--logs", str(tmp_path / "logs")]
    if case == "missing-data":
        args = [*fit, "--train-data", str(tmp_path / "nowhere")]
    elif case == "not-mgll":
        args = [*fit, "--train-data", str(_not_an_mgll_build(tmp_path))]
    elif case in ("missing-checkpoint", "text-as-checkpoint", "foreign-checkpoint"):
        ckpt, out = tmp_path / "c.pt", tmp_path / "out"
        if case == "text-as-checkpoint":
            ckpt.write_text("epoch 3, loss 0.5\n")
        elif case == "foreign-checkpoint":
            torch.save({"weights": torch.zeros(2)}, ckpt)
        args = ["eval", "--checkpoint", str(ckpt), "--data", str(tmp_path), "--out", str(out)]
    else:
        config = tmp_path / "c.yaml"
        config.write_text(f"train-data: {tmp_path}\nbatch-size: many\n")
        args = ["fit", "-c", str(config)]
    result = run_module("mgll_train", args, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(("mgll-train: error: ", "mgll-train fit: error: ")), last
    assert message in last
    assert "Traceback" not in result.stderr


def _eval_args(tmp_path: Path) -> list[str]:
    return ["eval", "--checkpoint", "c.pt", "--data", "d", "--out", str(tmp_path)]


def test_train_user_error_is_one_line_in_process(tmp_path, monkeypatch, capsys):
    def user_error(args):
        raise UserError("d: no such dataset")

    monkeypatch.setattr("mgll_train.evaluate.run_eval", user_error)
    with pytest.raises(SystemExit) as exit_info:
        train_main(_eval_args(tmp_path))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "mgll-train: error: d: no such dataset\n"


def test_train_internal_value_error_keeps_its_traceback(tmp_path, monkeypatch):
    def bug(args):
        raise ValueError("shapes do not match (a bug)")

    monkeypatch.setattr("mgll_train.evaluate.run_eval", bug)
    with pytest.raises(ValueError, match="a bug") as err:
        train_main(_eval_args(tmp_path))
    assert type(err.value) is ValueError
