"""`push` against a fake Hub on 127.0.0.1: round trip, incremental pushes, licence guard, token.

Hub-talking code runs in subprocesses, because `HF_ENDPOINT` and `HF_HUB_DISABLE_XET` must be set
before `huggingface_hub`/`datasets` are imported (and conftest makes this process offline).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mgll_data.publish.card import split_card
from tests.fake_hub import FakeHub, build_dataset, pipeline_variant, write_release

TOKEN = "hf_SECRETtoken0123456789"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hub():
    with FakeHub() as server:
        yield server


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("hub")


@pytest.fixture(scope="module")
def release(work):
    return write_release(work / "raw")


@pytest.fixture(scope="module")
def built(work, release):
    return build_dataset(release, work / "cxr", rows_per_shard=4)


def hub_env(hub, home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HUB_DISABLE_XET="1",
        HF_HUB_OFFLINE="0",
        HF_DATASETS_OFFLINE="0",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HOME=str(home),
        HF_TOKEN="hf_dummy_env_token",
        PYTHONPATH=str(ROOT),
    )
    return env


def cli(hub, home, *args):
    return subprocess.run(
        [sys.executable, "-m", "mgll_data", *map(str, args)],
        env=hub_env(hub, home),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def remote(hub, repo_id) -> dict[str, bytes]:
    return dict(hub.repos[repo_id].files)


def local_published(out: Path) -> dict[str, bytes]:
    files = {"README.md": (out / "README.md").read_bytes()}
    for path in sorted(out.glob("data/*.parquet")) + sorted(out.glob("figures/*.png")):
        files[path.relative_to(out).as_posix()] = path.read_bytes()
    return files


LOAD_AND_COMPARE = """
import json, sys
from datasets import load_dataset
hub = load_dataset(sys.argv[1])
local = load_dataset(sys.argv[2])
print(json.dumps({
    "splits": sorted(hub),
    "features": {s: hub[s].features == local[s].features for s in local},
    "rows": {s: repr(hub[s].with_format("arrow")[:].to_pylist())
             == repr(local[s].with_format("arrow")[:].to_pylist()) for s in local},
    "num_rows": {s: hub[s].num_rows for s in hub},
    "image": type(hub["train"].features["image"]).__name__,
}))
"""


def test_push_round_trips_and_second_push_uploads_only_changes(hub, built, work, release):
    home = work / "hf-home-1"
    result = cli(hub, home, "push", built, "--repo-id", "org/cxr")
    assert result.returncode == 0, result.stderr
    shards = sorted(built.glob("data/*.parquet"))
    assert f"{len(local_published(built))} file(s) uploaded" in result.stdout
    assert any(p.startswith("figures/") for p in remote(hub, "org/cxr"))
    # byte for byte, and nothing of _build/
    assert remote(hub, "org/cxr") == local_published(built)
    assert not any(p.startswith("_build") for p in remote(hub, "org/cxr"))

    loaded = subprocess.run(
        [sys.executable, "-c", LOAD_AND_COMPARE, "org/cxr", str(built)],
        env=hub_env(hub, home),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    report = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert report["splits"] == sorted({p.name.split("-")[0] for p in shards})
    assert all(report["features"].values()) and all(report["rows"].values()), report
    assert sum(report["num_rows"].values()) == 24
    assert report["image"] == "Image"

    # nothing changed: nothing uploaded, no commit
    puts, commits = len(hub.uploads()), hub.repos["org/cxr"].commits
    again = cli(hub, home, "push", built, "--repo-id", "org/cxr")
    assert again.returncode == 0, again.stderr
    assert "0 file(s) uploaded" in again.stdout and "no commit" in again.stdout
    assert len(hub.uploads()) == puts and hub.repos["org/cxr"].commits == commits

    # a rebuild with fewer shards: the stale remote shards are deleted
    fewer = build_dataset(release, work / "cxr-fewer", rows_per_shard=8)
    assert len(list(fewer.glob("data/*.parquet"))) < len(shards)
    third = cli(hub, home, "push", fewer, "--repo-id", "org/cxr")
    assert third.returncode == 0, third.stderr
    assert remote(hub, "org/cxr") == local_published(fewer)
    stale = {p.name for p in shards} - {p.name for p in fewer.glob("data/*.parquet")}
    assert stale and f"{len(stale)} deleted" in third.stdout


def test_failing_push_never_shows_the_token(hub, built, work):
    result = cli(
        hub, work / "hf-home-2", "push", built, "--repo-id", "org/forbidden-x", "--token", TOKEN
    )
    assert result.returncode == 2
    # the server did get the token and echoed it in its error body: only redaction hides it
    assert f"Bearer {TOKEN}" in hub.auth
    assert TOKEN not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "mgll-build-dataset: error: push to org/forbidden-x"
    )
    assert "Traceback" not in result.stderr


def test_redistribution_none_refuses_data_and_card_only_uploads_no_data(hub, work, release):
    restricted = pipeline_variant(
        work,
        id="PhysioNet Credentialed Health Data License 1.5.0",
        url="https://physionet.org/content/mimic-cxr/view-license/2.0.0/",
        redistribution="none",
    )
    out = build_dataset(release, work / "restricted", restricted)
    before = len(hub.log)
    refused = cli(hub, work / "hf-home-3", "push", out, "--repo-id", "org/mimic")
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "--card-only" in lines[0] and "forbids redistribution" in lines[0]
    assert len(hub.log) == before  # refused before any request
    assert "org/mimic" not in hub.repos

    card_only = cli(hub, work / "hf-home-3", "push", out, "--repo-id", "org/mimic", "--card-only")
    assert card_only.returncode == 0, card_only.stderr
    files = remote(hub, "org/mimic")
    assert sorted(files) == ["README.md"]
    header, body = split_card(files["README.md"].decode())
    assert "configs" not in header and "dataset_info" not in header
    assert header["license_name"] == "PhysioNet Credentialed Health Data License 1.5.0"
    assert header["mgll"]["domain"] == "chest_xray"
    assert "No data in this repository" in body
    assert "mgll-build-dataset build chestxray14 --root RAW --out OUT" in body
    assert "## Example rows" not in body and "figures/" not in body


def test_build_push_to_hub_noncommercial_states_licence(hub, work, release):
    noncommercial = pipeline_variant(
        work,
        id="CC-BY-NC-4.0",
        url="https://creativecommons.org/licenses/by-nc/4.0/",
        redistribution="noncommercial",
    )
    out = work / "nc"
    result = cli(
        hub, work / "hf-home-4", "build", noncommercial, "--root", release, "--out", out,
        "--image-size", "64", "--rows-per-shard", "8", "--no-progress", "--push-to-hub", "org/nc",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "non-commercial" in result.stdout
    files = remote(hub, "org/nc")
    assert files == local_published(out)
    header, body = split_card(files["README.md"].decode())
    assert header["license"] == "cc-by-nc-4.0"
    assert "redistribution: noncommercial" in body
