"""`mgll-train fit` and `export` end to end: run layout, exact resume, DDP, open_clip export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import open_clip
import pytest
import torch

from mgll_data.build.engine import BuildOptions, build
from mgll_data.build.pipeline import load_pipeline
from mgll_data.demo.nih_release import write_demo_release
from tests.conftest import run_module, small_demo_build

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return small_demo_build(tmp_path_factory.mktemp("train-data"), n=60, seed=5, raw_size=96)


def _fit_args(dataset: Path, logs: Path, name: str, *extra: str, batch_size: int = 4) -> list[str]:
    flags = {
        "--train-data": dataset,
        "--model": "mgll-tiny",
        "--batch-size": batch_size,
        "--epochs": 2,
        "--workers": 2,
        "--device": "cpu",
        "--logs": logs,
        "--name": name,
        "--warmup": 2,
        "--log-every-n-steps": 1,
        "--lr": 1e-3,
    }
    return ["fit", *(str(x) for pair in flags.items() for x in pair), *extra]


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return run_module("mgll_train", args, **kwargs)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line)["train"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


@pytest.mark.wires("mgll-train fit", "--epochs", "--log-every-n-steps", "--logs", "--name")
def test_fit_writes_open_clip_run_layout(dataset, tmp_path):
    result = _run(_fit_args(dataset, tmp_path, "run"))
    assert result.returncode == 0, result.stderr[-2000:]
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} >= {
        "out.log",
        "params.txt",
        "config.yaml",
        "metrics.jsonl",
        "checkpoints",
    }
    assert {p.name for p in (run / "checkpoints").iterdir()} == {
        "epoch_1.pt",
        "epoch_2.pt",
        "epoch_latest.pt",
    }
    metrics = _metrics(run)
    assert [m["step"] for m in metrics] == list(range(1, len(metrics) + 1))
    assert all(
        m["loss"] > 0 and set(m["truncated"]) == {"category", "description", "explanation"}
        for m in metrics
    )
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    state = torch.load(run / "checkpoints" / "epoch_2.pt", weights_only=False)
    assert (
        state["epoch"] == 2
        and state["step"] == len(metrics)
        and "logit_bias" in state["state_dict"]
    )
    assert state["label_names"][0] == "No Finding"
    assert "loss: mgll" in (run / "params.txt").read_text()
    # tensorboard is installed with the test extra, so `--report-to auto` wrote event files
    # carrying the same numbers as metrics.jsonl
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [m["step"] for m in metrics]
    assert [e.value for e in losses] == pytest.approx([m["loss"] for m in metrics], rel=1e-6)
    assert "train/truncated/description" in events.Tags()["scalars"]


@pytest.mark.wires("mgll-train fit", "--config", "--max-steps")
def test_config_file_with_command_line_override(dataset, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        f"train-data: {dataset}\nbatch_size: 8\nepochs: 1\nloss: clip\nlog-every-n-steps: 1\n"
    )
    result = _run(
        [
            "fit",
            "-c",
            str(config),
            "--epochs",
            "1",
            "--max-steps",
            "2",
            "--device",
            "cpu",
            "--logs",
            str(tmp_path),
            "--name",
            "cfg",
            "--workers",
            "0",
        ]
    )
    assert result.returncode == 0, result.stderr[-2000:]
    saved = (tmp_path / "cfg" / "config.yaml").read_text()
    assert "batch-size: 8" in saved and "loss: clip" in saved and "max-steps: 2" in saved
    assert len(_metrics(tmp_path / "cfg")) == 2
    config.write_text("no-such-flag: 1\n")
    bad = _run(["fit", "-c", str(config)])
    assert bad.returncode == 2 and "unknown key 'no-such-flag'" in bad.stderr


@pytest.mark.wires("mgll-train fit", "--resume")
def test_sigterm_then_resume_equals_an_uninterrupted_run(dataset, tmp_path):
    assert _run(_fit_args(dataset, tmp_path, "whole")).returncode == 0
    total = len(_metrics(tmp_path / "whole"))

    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "mgll_train", *_fit_args(dataset, tmp_path, "cut")],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 143, process.stderr.read()[-2000:]  # 128 + SIGTERM
    steps = sorted((tmp_path / "cut" / "checkpoints").glob("step_*.pt"))
    assert len(steps) == 1
    cut_at = int(steps[0].stem.split("_")[1])
    assert 3 <= cut_at < total, "SIGTERM must land mid-run for this test to mean much"

    resumed = _run([*_fit_args(dataset, tmp_path, "cut"), "--resume", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # the resumed run logged only the steps after the cut (a fresh start would log 1, 2, ...)
    assert [m["step"] for m in _metrics(tmp_path / "cut")] == list(range(1, total + 1))
    whole = _weights(tmp_path / "whole" / "checkpoints" / "epoch_2.pt")
    cut = _weights(tmp_path / "cut" / "checkpoints" / "epoch_2.pt")
    assert whole.keys() == cut.keys()
    for key in whole:
        assert torch.equal(whole[key], cut[key]), key


@pytest.mark.wires("mgll-train fit", "--accum-freq")  # ignored: 4-row global batches
def test_torchrun_ddp_matches_one_process(dataset, tmp_path):
    common = ["--epochs", "1", "--max-steps", "3", "--gather-with-grad", "--workers", "0"]
    single = _run(_fit_args(dataset, tmp_path, "single", *common, batch_size=8))
    assert single.returncode == 0, single.stderr[-2000:]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ddp = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--standalone",
            "-m",
            "mgll_train",
            "--",  # torchrun would otherwise read --logs as an abbreviation of its --logs-specs
            *_fit_args(dataset, tmp_path, "ddp", *common, "--accum-freq", "2", batch_size=2),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = _metrics(tmp_path / "single"), _metrics(tmp_path / "ddp")
    assert len(one) == len(two) == 3
    # 2 processes x 2 micro-batches of 2 = the same global batches of 8: the first loss is the
    # same computation; later ones follow the same updates (up to float summation order).
    assert two[0]["loss"] == pytest.approx(one[0]["loss"], rel=1e-5)
    for a, b in zip(one[1:], two[1:], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3)
    assert "2 process(es)" in (tmp_path / "ddp" / "out.log").read_text()


def test_export_loads_in_plain_open_clip(dataset, tmp_path):
    assert _run(_fit_args(dataset, tmp_path, "run", "--max-steps", "2")).returncode == 0
    checkpoint = tmp_path / "run" / "checkpoints" / "epoch_latest.pt"
    out = tmp_path / "exported"
    result = _run(["export", "--checkpoint", str(checkpoint), "--out", str(out)])
    assert result.returncode == 0, result.stderr[-2000:]
    assert {p.name for p in out.iterdir()} == {
        "open_clip_config.json",
        "open_clip_model.safetensors",
        "README.md",
    }
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    state = _weights(checkpoint)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert model.logit_bias.item() == pytest.approx(state["logit_bias"].item())
    assert tokenizer(["Cardiomegaly"]).shape[-1] == 64
    assert "--train-data" in (out / "README.md").read_text()
    missing = _run(["export", "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(out)])
    assert missing.returncode == 2 and "checkpoint not found" in missing.stderr


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """A dataset of many small shards, so there are row groups to stream over."""
    root = tmp_path_factory.mktemp("sharded")
    raw = write_demo_release(root / "raw", n=60, seed=6, image_size=96)
    options = BuildOptions(image_size=64, rows_per_shard=6, progress=False)
    build(load_pipeline("chestxray14"), raw, root / "ds", options)
    return root / "ds"


@pytest.mark.wires("mgll-train fit", "--streaming", "--resume", "--max-steps")
def test_streaming_fit_resumes_at_the_next_row_group(sharded, tmp_path):
    args = _fit_args(sharded, tmp_path, "stream", "--streaming", "--epochs", "1",
                     "--save-every-n-steps", "2")  # fmt: skip
    first = _run([*args, "--max-steps", "4"])
    assert first.returncode == 0, first.stderr[-2000:]
    state = torch.load(tmp_path / "stream" / "checkpoints" / "epoch_latest.pt",
                       weights_only=False)  # fmt: skip
    assert state["step"] == 4 and state["batch"] == 4 and state["unit"] > 0
    assert "streaming" in (tmp_path / "stream" / "out.log").read_text()
    more = _run([*args, "--max-steps", "6", "--resume", "latest"])
    assert more.returncode == 0, more.stderr[-2000:]
    assert [m["step"] for m in _metrics(tmp_path / "stream")] == [1, 2, 3, 4, 5, 6]


@pytest.mark.wires("mgll-train fit", "--streaming")
def test_streaming_under_torchrun_gives_every_rank_the_same_steps(sharded, tmp_path):
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "mgll_train", "--",
         *_fit_args(sharded, tmp_path, "sddp", "--streaming", "--workers", "0", "--epochs", "1",
                    "--gather-with-grad")],
        cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    metrics = _metrics(tmp_path / "sddp")
    log = (tmp_path / "sddp" / "out.log").read_text()
    steps = int(log.split(" steps/epoch")[0].rsplit("(", 1)[1])
    assert len(metrics) == steps > 0 and "2 process(es), streaming" in log


def test_resume_from_a_checkpoint_of_another_run_is_one_line(dataset, tmp_path):
    assert _run([*_fit_args(dataset, tmp_path, "first"), "--max-steps", "1"]).returncode == 0
    latest = tmp_path / "first" / "checkpoints" / "epoch_latest.pt"
    state = torch.load(latest, map_location="cpu", weights_only=False)
    other = tmp_path / "other.pt"
    torch.save({**state, "model_name": "ViT-B-16"}, other)
    for resume, message in (
        (other, "a checkpoint of model 'ViT-B-16'; this run trains 'mgll-tiny'"),
        (latest, "does not fit this run's model and flags"),  # --lock-image: other param groups
    ):
        args = [*_fit_args(dataset, tmp_path, "second"), "--resume", str(resume), "--lock-image"]
        result = _run(args)
        assert result.returncode == 2, result.stderr[-2000:]
        assert message in result.stderr.strip().splitlines()[-1]
        assert "Traceback" not in result.stderr
