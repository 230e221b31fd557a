"""Shared test setup: offline Hugging Face libraries and generated ChestX-ray14 releases."""

import os
import subprocess
import sys
from pathlib import Path

# Before anything imports datasets/huggingface_hub: never touch the network in tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

from tests.nih_fixture import make_release  # noqa: E402

NIH_ROWS = 300
REPO = Path(__file__).resolve().parents[1]


def small_demo_build(root: Path, n: int = 40, seed: int = 3, raw_size: int = 64) -> Path:
    """A ChestX-ray14-shaped demo of `n` images built at 64 px into `root/ds` (what the training
    tests train on: small enough for a few CPU steps)."""
    from mgll_data.build.engine import BuildOptions, build
    from mgll_data.build.pipeline import load_pipeline
    from mgll_data.demo.nih_release import write_demo_release

    raw = write_demo_release(root / "raw", n=n, seed=seed, image_size=raw_size)
    options = BuildOptions(image_size=64, progress=False)
    build(load_pipeline("chestxray14"), raw, root / "ds", options)
    return root / "ds"


def run_module(module: str, args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """`python -m module args...` from the repository root, offline, one BLAS thread each
    (several run side by side on a 2-core machine); output captured as text."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        **kwargs,
    )


@pytest.fixture(scope="session")
def nih_kaggle(tmp_path_factory):
    """A Kaggle-layout release of 300 real Data_Entry rows with every nasty case."""
    return make_release(tmp_path_factory.mktemp("nih-kaggle"), count=NIH_ROWS, layout="kaggle")
