"""`build --executor ray` with the release or the output on object storage, byte for byte.

One moto S3 server (`tests/s3_server.py`) and one two-CPU Ray head (`tests/ray_cluster.py`)
serve the module. The head starts inside moto's block, so its raylet and workers hold the fake
credentials in their environment, as a real node holds its own; the builds join it by address
through the real CLI in subprocesses. The ChestX-ray14 fixture (real Data_Entry rows) sits in
the bucket twice: in the Kaggle layout (plain image files, which the Ray workers fetch from the
bucket themselves) and in the NIH Box layout (tar.gz archives, streamed by the driver, whose
members travel inside the tasks). Every build is compared with the local executor's build of
the same files on disk, and the fake secret and key id must appear in no output file, no line
the CLI printed, and no log of the Ray session.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# Token authentication, Ray's default for a new instance: a driver joining by address asks
# for it (see test_ray_executor.py).
os.environ.setdefault("RAY_AUTH_MODE", "token")
pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
s3fs = pytest.importorskip("s3fs", reason="s3fs is not installed (pip install -e '.[test]')")
pytest.importorskip("moto", reason="moto is not installed (pip install -e '.[test]')")

from tests.nih_fixture import make_release  # noqa: E402
from tests.ray_cluster import ray_env, ray_head, ray_pids  # noqa: E402
from tests.s3_server import BUCKET, KEY_ID, SECRET, moto_s3  # noqa: E402
from tests.test_object_storage import (  # noqa: E402
    OPTIONS,
    REPO,
    _files,
    _main,
    assert_never_named,
    assert_same_build,
)


@pytest.fixture(scope="module")
def ray_tmp() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="mgll-rr-", dir="/tmp"))  # short: Ray's socket paths
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def services(tmp_path_factory, ray_tmp) -> Iterator[tuple[dict, tuple[str, Path]]]:
    """moto's S3 server (its storage options), and the Ray head (address, session folder)
    started inside its block: with the fake credentials in the head's environment."""
    with moto_s3(tmp_path_factory.mktemp("moto")) as options, ray_head(ray_tmp / "head") as head:
        yield options, head


@pytest.fixture(scope="module")
def s3(services) -> dict:
    return services[0]


@pytest.fixture(scope="module")
def cluster(services) -> tuple[str, Path]:
    return services[1]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ray-remote")


def _release(s3: dict, work: Path, layout: str) -> tuple[Path, Path]:
    """The fixture in `layout` on disk and at s3://BUCKET/<layout>/, and its local build."""
    fixture = make_release(work / layout, count=24, layout=layout)
    s3fs.S3FileSystem(**s3).put(f"{fixture.root}/", f"{BUCKET}/{layout}/", recursive=True)
    reference = work / f"{layout}-local"
    _main("build", "chestxray14", "--root", fixture.root, "--out", reference, *OPTIONS)
    return fixture.root, reference


@pytest.fixture(scope="module")
def kaggle(s3, work) -> tuple[Path, Path]:
    return _release(s3, work, "kaggle")


@pytest.fixture(scope="module")
def box(s3, work) -> tuple[Path, Path]:
    return _release(s3, work, "box")


def _build(ray_tmp: Path, *args: object, script: str | None = None) -> subprocess.CompletedProcess:
    """`mgll-build-dataset build ARGS` in a subprocess (through `script` when given: a Python
    program that ends by running the CLI), with this process's environment."""
    start = ["-c", script] if script else ["-m", "mgll_data"]
    done = subprocess.run(
        [sys.executable, *start, "build", "chestxray14", *map(str, args), *OPTIONS],
        cwd=REPO, env=ray_env(ray_tmp / "none"), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr + done.stdout
    assert not (ray_tmp / "none").exists()  # it joined the cluster, started no instance
    return done


def assert_no_credentials(out: Path, done: subprocess.CompletedProcess, session: Path) -> None:
    """Neither the secret nor the key id in an output file, the CLI's output or Ray's logs."""
    assert_never_named(_files(out), SECRET, KEY_ID)
    printed = {"stdout": done.stdout.encode(), "stderr": done.stderr.encode()}
    assert_never_named(printed, SECRET, KEY_ID)
    logs = {str(p): p.read_bytes() for p in (session / "logs").rglob("*") if p.is_file()}
    assert logs  # the session's logs are there to search
    assert_never_named(logs, SECRET, KEY_ID)


# The image stage in the driver process logs each image it loads: on Ray, none.
SPY = """
import sys
import mgll_data.build.stages as stages
log, load_image = open(sys.argv.pop(1), "w", buffering=1), stages.load_image

def spied(task, ctx):
    log.write(task.item.image.describe() + "\\n")
    return load_image(task, ctx)

stages.load_image = spied
from mgll_data.cli import main
main()
"""


@pytest.mark.wires("mgll-build-dataset build", "--executor", "--root")
def test_plain_files_in_a_bucket_are_fetched_by_the_ray_workers(s3, cluster, kaggle, ray_tmp, work):
    address, session = cluster
    root, reference = kaggle
    out, spy = work / "kaggle-ray", work / "driver-images.txt"
    done = _build(
        ray_tmp, "--root", f"s3://{BUCKET}/kaggle", "--out", out, "--storage-options",
        json.dumps(s3), "--executor", "ray", "--ray-address", address,
        script=SPY.replace("sys.argv.pop(1)", repr(str(spy))),
    )  # fmt: skip
    assert_same_build(out, reference)
    assert spy.read_text() == ""  # the driver loaded no image: the workers fetched them all
    assert len(ray_pids(session, "worker")) >= 1
    assert_no_credentials(out, done, session)
    assert_never_named(_files(out), BUCKET, "s3://", str(root))


def test_archives_in_a_bucket_travel_to_the_ray_workers_inside_the_tasks(
    s3, cluster, box, ray_tmp, work
):
    address, session = cluster
    _, reference = box
    out = work / "box-ray"
    done = _build(
        ray_tmp, "--root", f"s3://{BUCKET}/box", "--out", out, "--storage-options",
        json.dumps(s3), "--executor", "ray", "--ray-address", address,
    )  # fmt: skip
    assert "2 archives read directly" in done.stdout
    assert_same_build(out, reference)
    assert_no_credentials(out, done, session)


@pytest.mark.wires("mgll-build-dataset build", "--out")
def test_a_ray_build_into_a_bucket_uploads_the_local_bytes(s3, cluster, kaggle, ray_tmp, work):
    address, session = cluster
    root, reference = kaggle
    url = f"s3://{BUCKET}/built/kaggle-ray"
    done = _build(
        ray_tmp, "--root", root, "--out", url, "--storage-options", json.dumps(s3),
        "--executor", "ray", "--ray-address", address,
    )  # fmt: skip
    assert f"into {url} in" in done.stdout
    down = work / "kaggle-ray-downloaded"
    s3fs.S3FileSystem(**s3).get(f"{BUCKET}/built/kaggle-ray/", f"{down}/", recursive=True)
    assert_same_build(down, reference)
    assert_no_credentials(down, done, session)


# Joins the cluster with a hook that has every worker log the storage options it was given,
# then runs the CLI on that connection.
RECORDING = """
import json, sys
import ray
address, seen = sys.argv.pop(1), sys.argv.pop(1)

def record():
    import mgll_data.build.ray_executor as executor
    run_task = executor.run_task

    def recorded(task, ctx):
        with open(seen, "a") as log:
            log.write(json.dumps(ctx.storage_options, sort_keys=True) + "\\n")
        return run_task(task, ctx)

    executor.run_task = recorded

ray.init(address=address, runtime_env={"worker_process_setup_hook": record})
from mgll_data.cli import main
main()
"""


def test_credentials_in_storage_options_stay_with_the_driver(s3, cluster, kaggle, ray_tmp, work):
    """Given as options, the key and secret reach the driver's file system only: the workers
    get the other options (the endpoint) and read the bucket with their node's credentials."""
    address, session = cluster
    _, reference = kaggle
    out, seen = work / "kaggle-ray-options", work / "worker-options.jsonl"
    options = {**s3, "key": KEY_ID, "secret": SECRET}
    done = _build(
        ray_tmp, "--root", f"s3://{BUCKET}/kaggle", "--out", out, "--storage-options",
        json.dumps(options), "--executor", "ray",
        script=RECORDING.replace("sys.argv.pop(1), sys.argv.pop(1)", f"{address!r}, {str(seen)!r}"),
    )  # fmt: skip
    assert_same_build(out, reference)
    received = {json.loads(line)["client_kwargs"]["endpoint_url"] for line in seen.open()}
    assert received == {s3["client_kwargs"]["endpoint_url"]}  # every task had the endpoint
    assert SECRET not in seen.read_text() and KEY_ID not in seen.read_text()
    assert "credentials in --storage-options (key, secret) stay on this machine" in done.stderr
    assert_no_credentials(out, done, session)


def test_credential_options_are_taken_out_at_any_depth():
    """botocore's names under client_kwargs too; what opens the store without them stays."""
    from mgll_data.build.ray_executor import without_credentials

    options = {
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "aws_secret_access_key": "s3"},
        "token": "hf_abc",
        "requester_pays": True,
    }
    assert without_credentials(options) == (
        {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}, "requester_pays": True},
        {"aws_secret_access_key", "token"},
    )
