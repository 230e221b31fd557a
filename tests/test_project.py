"""The project as a newcomer meets it: README commands, CI, packaging, lint."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """The commands in the README's Quick start code blocks."""
    readme = (REPO / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", quick, re.S)]


def test_ci_runs_exactly_the_readme_commands():
    setup, tests = readme_commands()[:2]
    ci_lines = [
        line
        for line in (REPO / ".ci" / "run").read_text().splitlines()
        if line and not line.startswith("#") and not line.startswith(("set ", "cd "))
    ]
    assert ci_lines == [setup, tests]
    assert "pytest" in tests and "demo" in setup


def test_wheel_ships_schemas_and_pipelines(tmp_path):
    """A non-editable install finds its data from any working directory."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("mgll-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "mgll_data/_data/schemas/record.yaml" in names
    assert "mgll_data/_data/schemas/chest_xray.yaml" in names
    assert "mgll_data/_data/pipelines/chestxray14.yaml" in names
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = (
        "import mgll_data.resources as r, mgll_data.cli as c; "
        "print(r.resource_dir('schemas')); c.main(['list'])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert str(target / "mgll_data" / "_data" / "schemas") in result.stdout
    assert "chestxray14" in result.stdout


def test_ruff_is_clean():
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", str(REPO)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout


def test_public_entry_points_keep_their_import_paths():
    """Code written against the documented paths keeps working after the tree was reorganised."""
    from mgll_data import labeler
    from mgll_data.text import labeler as text_labeler
    from mgll_train import loss
    from mgll_train.losses import ClipLoss, MGLLLoss, OfficialMGLLLoss

    assert labeler.default_labeler is text_labeler.default_labeler
    assert labeler.TextLabeler is text_labeler.TextLabeler
    assert loss.MGLLLoss is MGLLLoss
    assert isinstance(loss.MGLLLoss(mode="clip"), ClipLoss)
    assert isinstance(loss.MGLLLoss(mode="mgll-official"), OfficialMGLLLoss)
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {
        "mgll-build-dataset": "mgll_data.cli:main",
        "mgll-train": "mgll_train.cli:main",
    }
