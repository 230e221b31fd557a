"""Shared test setup: offline Hugging Face libraries and generated ChestX-ray14 releases."""

import os

# Before anything imports datasets/huggingface_hub: never touch the network in tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

from tests.nih_fixture import make_release  # noqa: E402

NIH_ROWS = 300


@pytest.fixture(scope="session")
def nih_kaggle(tmp_path_factory):
    """A Kaggle-layout release of 300 real Data_Entry rows with every nasty case."""
    return make_release(tmp_path_factory.mktemp("nih-kaggle"), count=NIH_ROWS, layout="kaggle")
