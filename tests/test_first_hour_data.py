"""A new user's first hour with `mgll-build-dataset`: the demo's card, errors, help, progress."""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mgll_data.build.engine import BuildOptions, build
from mgll_data.build.pipeline import load_pipeline
from mgll_data.cli import _parser, main, run
from mgll_data.demo.nih_release import write_demo_release
from mgll_data.publish.card import split_card

from . import nih_fixture

REPO = Path(__file__).resolve().parents[1]
NIH_CITATION = "Wang X, Peng Y"


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("first-hour") / "demo"
    run(["demo", "--n", "24", "--image-size", "64", "--out", str(out), "--no-progress"])
    return out


def _top_of_body(card: str) -> str:
    """The card's title and the paragraphs before its first section."""
    _, body = split_card(card)
    return body.split("\n## ", 1)[0]


# --- the demo's card says the data is synthetic ---------------------------------------------


def test_demo_card_says_the_data_is_synthetic(demo):
    card = (demo / "README.md").read_text(encoding="utf-8")
    header, _ = split_card(card)
    top = _top_of_body(card)
    assert "Synthetic data" in top and "no patient data" in top
    assert "not NIH ChestX-ray14" in top
    assert "synthetic" in header["pretty_name"]
    assert header["license"] == "cc0-1.0"
    assert NIH_CITATION not in card and "Cite the original release" not in card
    assert "mgll-build-dataset demo --n 24 --seed 0 --out OUT" in card


def test_demo_shards_are_those_of_a_plain_chestxray14_build(demo, tmp_path):
    """Only the card changes: the records are the real reader's, byte for byte."""
    plain = tmp_path / "plain"
    options = BuildOptions(image_size=64, progress=False, overwrite=True)
    build(load_pipeline("chestxray14"), demo / "_raw", plain, options)
    shards = sorted(p.name for p in (demo / "data").glob("*.parquet"))
    assert shards == sorted(p.name for p in (plain / "data").glob("*.parquet"))
    for name in shards:
        assert (demo / "data" / name).read_bytes() == (plain / "data" / name).read_bytes()
    card = (plain / "README.md").read_text(encoding="utf-8")
    assert NIH_CITATION in card and "Synthetic data" not in _top_of_body(card)
    assert "mgll-build-dataset build chestxray14 --root RAW --out OUT" in card


def test_learnable_card_says_the_data_is_synthetic(tmp_path):
    out = tmp_path / "learnable"
    run(["demo", "--learnable", "--n", "30", "--out", str(out), "--no-progress"])
    card = (out / "README.md").read_text(encoding="utf-8")
    top = _top_of_body(card)
    assert "Synthetic data" in top and "no patient data" in top
    assert "Cite the original release" not in card
    assert "mgll-build-dataset demo --learnable --n 30 --seed 0 --out OUT" in card


def test_real_build_card_keeps_the_source_citation(tmp_path):
    nih_fixture.make_release(tmp_path / "raw", 12, "kaggle")
    out = tmp_path / "out"
    build(load_pipeline("chestxray14"), tmp_path / "raw", out, BuildOptions(image_size=32))
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "Cite the original release" in card and NIH_CITATION in card
    assert "Synthetic" not in card


# --- errors a new user meets ----------------------------------------------------------------


@pytest.mark.parametrize("command", ["info", "validate"])
def test_missing_folder_is_named(command, tmp_path, capsys):
    missing = tmp_path / "nonexistent-dir"
    with pytest.raises(SystemExit) as stop:
        main([command, str(missing)])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mgll-build-dataset: error: {missing}: no such folder"]


def test_info_into_a_closed_pipe_stops_quietly(demo):
    """`info OUT | head -1`: the reader is gone before anything is written."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mgll_data", "info", str(demo)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # long before the interpreter has started: every write hits EPIPE
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=60) == 141
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception" not in err


def test_info_into_head_shows_the_first_line(demo):
    shell = f"{sys.executable} -m mgll_data info {demo} | head -1"
    result = subprocess.run(["bash", "-c", shell], cwd=REPO, capture_output=True, text=True)
    assert result.stdout.startswith(f"{demo}: 24 rows")
    assert "Traceback" not in result.stderr


# --- help -----------------------------------------------------------------------------------


def test_every_command_and_flag_has_help():
    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    command_help = {choice.dest: choice.help for choice in sub._choices_actions}
    missing = []
    for name, command in sub.choices.items():
        if not command_help.get(name):
            missing.append(f"{name}: no help line")
        if not command.description:
            missing.append(f"{name}: no description")
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, missing


# --- progress while the demo release is generated -------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.wires("mgll-build-dataset demo", "--no-progress")
@pytest.mark.parametrize("flags,shown", [((), True), (("--no-progress",), False)])
def test_demo_generation_shows_progress(flags, shown, tmp_path, monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    run(["demo", "--n", "3", "--image-size", "32", "--out", str(tmp_path / "d"), *flags])
    assert ("generate demo release" in terminal.getvalue()) is shown


def test_release_writer_is_quiet_by_default(tmp_path, capsys):
    write_demo_release(tmp_path / "raw", n=2, image_size=32)
    assert capsys.readouterr().err == ""


# --- .gitignore covers what the README tells users to create --------------------------------


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_readme_outputs_are_ignored():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    folders = set(re.findall(r"--(?:out|logs) (?![a-z0-9]+://)([a-z][\w.-]*)/?", readme))
    assert {"demo-out", "eval-demo", "wds", "mgll-json", "logs"} <= folders
    not_ignored = [
        folder
        for folder in sorted(folders)
        if subprocess.run(
            ["git", "check-ignore", "-q", f"{folder}/file"], cwd=REPO, check=False
        ).returncode
        != 0
    ]
    assert not not_ignored, f"not in .gitignore: {not_ignored}"
