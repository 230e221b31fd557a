"""What `fit` and `eval` show while they run: a progress bar on a terminal (never in a pipe or
with --no-progress), a summary line per epoch, and a last line that says where things are."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pytest

from tests.conftest import REPO, small_demo_build

BATCH = 8
EPOCHS = 2


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return small_demo_build(tmp_path_factory.mktemp("progress-data"))


def _fit_args(dataset: Path, logs: Path, name: str, *extra: str) -> list[str]:
    return [
        "fit", "--train-data", str(dataset), "--batch-size", str(BATCH), "--epochs", str(EPOCHS),
        "--workers", "0", "--device", "cpu", "--logs", str(logs), "--name", name,
        "--log-every-n-steps", "1", "--report-to", "none", *extra,
    ]  # fmt: skip


def on_terminal(args: list[str]) -> tuple[int, str, str]:
    """`python -m mgll_train args` with stderr on a pseudo-terminal 100 columns wide (as a
    user's shell), stdout piped: ``(status, stdout, what the terminal showed)``."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mgll_train", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=follower,
    )
    os.close(follower)
    shown = bytearray()

    def drain() -> None:  # a full terminal buffer would block the process
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the process closed its end
                return
            if not chunk:
                return
            shown.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    stdout = proc.stdout.read().decode()
    status = proc.wait(timeout=300)
    reader.join(timeout=30)
    os.close(leader)
    return status, stdout, shown.decode(errors="replace")


def bar_states(terminal: str, desc: str) -> list[str]:
    """The successive states of the tqdm bar named `desc` (it redraws after a carriage return)."""
    return [s for s in re.split(r"[\r\n]", terminal) if s.startswith(f"{desc}:")]


@pytest.fixture(scope="module")
def terminal_run(dataset, tmp_path_factory) -> tuple[Path, str, str]:
    logs = tmp_path_factory.mktemp("progress-logs")
    status, stdout, terminal = on_terminal(_fit_args(dataset, logs, "bar"))
    assert status == 0, terminal[-2000:]
    return logs / "bar", stdout, terminal


def _train_records(run: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [x["train"] for x in lines if "train" in x]


def test_fit_draws_a_bar_over_the_steps_of_the_run(terminal_run):
    run, _, terminal = terminal_run
    steps = len(_train_records(run))  # one record per step (--log-every-n-steps 1)
    assert steps == EPOCHS * (steps // EPOCHS) and steps >= 4
    states = bar_states(terminal, "train")
    assert states, terminal[-2000:]
    assert f"{steps}/{steps}" in states[-1]
    assert re.search(r"loss=\d+\.\d{4}", states[-1]) and re.search(r"samples_s=\d", states[-1])
    assert all(f"/{steps} " in s for s in states)  # the total is the run's, not an epoch's


def test_fit_logs_a_summary_line_per_epoch(terminal_run):
    run, stdout, _ = terminal_run
    records = _train_records(run)
    per_epoch = len(records) // EPOCHS
    lines = [x for x in stdout.splitlines() if " done: " in x and "epoch " in x]
    assert len(lines) == EPOCHS
    for epoch, line in enumerate(lines):
        assert f"epoch {epoch + 1} of {EPOCHS} done: {per_epoch} steps" in line
        losses = [r["loss"] for r in records if r["epoch"] == epoch]
        mean = float(re.search(r"mean loss (\d+\.\d+)", line).group(1))
        assert mean == pytest.approx(sum(losses) / len(losses), abs=1e-4)
        assert float(re.search(r"([\d.]+) samples/s", line).group(1)) > 0
        assert re.search(r", \d+\.\d s$", line)
    # the same lines in out.log, which also keeps every step's loss line, its epoch counted
    # from 1 as in the epoch lines
    log = (run / "out.log").read_text()
    assert all(line.split(" | ")[-1] in log for line in lines)
    assert f"epoch 1 step {per_epoch} loss" in log and f"epoch 2 step {per_epoch + 1} loss" in log


def test_fit_ends_saying_where_everything_is(terminal_run):
    run, stdout, _ = terminal_run
    last = stdout.strip().splitlines()[-1]
    assert f"checkpoints in {run / 'checkpoints'}" in last
    assert f"log {run / 'out.log'}" in last and f"metrics {run / 'metrics.jsonl'}" in last
    assert "TensorBoard" not in last  # --report-to none writes no event files


@pytest.mark.wires("mgll-train fit", "--no-progress")
def test_no_progress_hides_the_bar_on_a_terminal(dataset, tmp_path):
    status, stdout, terminal = on_terminal(
        _fit_args(dataset, tmp_path, "quiet", "--no-progress", "--max-steps", "2")
    )
    assert status == 0, terminal[-2000:]
    assert not bar_states(terminal, "train")
    assert "epoch 1 of 2 stopped: 2 steps" in stdout  # the epoch line is not the bar's


def _eval_args(run: Path, dataset: Path, out: Path, *extra: str) -> list[str]:
    return [
        "eval", "--checkpoint", str(run / "checkpoints" / "epoch_latest.pt"), "--data",
        str(dataset), "--out", str(out), "--tasks", "retrieval", "--workers", "0",
        "--batch-size", "4", *extra,
    ]  # fmt: skip


@pytest.mark.wires("mgll-train eval", "--no-progress")
def test_eval_draws_a_bar_while_extracting_features(terminal_run, dataset, tmp_path):
    run, _, _ = terminal_run
    status, stdout, terminal = on_terminal(_eval_args(run, dataset, tmp_path / "a"))
    assert status == 0, terminal[-2000:]
    images = json.loads((tmp_path / "a" / "metrics.json").read_text())["images"]
    batches = -(-images // 4)
    states = bar_states(terminal, "features")
    assert states and all(f"/{batches} " in s for s in states), terminal[-2000:]
    assert "label-aware retrieval" in stdout
    status, _, terminal = on_terminal(_eval_args(run, dataset, tmp_path / "b", "--no-progress"))
    assert status == 0, terminal[-2000:]
    assert not bar_states(terminal, "features")
