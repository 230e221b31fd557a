"""Releases and outputs on object storage: `build --root s3://…`, `--out s3://…` and options.

A real S3 API (moto's server, in a subprocess on a free local port, torn down afterwards) holds
the ChestX-ray14 fixture in the NIH Box layout (images inside `.tar.gz` archives, streamed from
the bucket) and the build outputs. Credentials come only from the environment, with a
distinctive secret that no output file and no log may contain. Builds from the bucket and into
it are compared byte for byte with the local build of the same files. gs:// and hf:// have no
emulator here: their options are checked on the real fsspec file systems, which connect lazily.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

s3fs = pytest.importorskip("s3fs", reason="s3fs is not installed (pip install -e '.[test]')")
pytest.importorskip("moto", reason="moto is not installed (pip install -e '.[test]')")

from mgll_data.build.engine import BuildOptions, build  # noqa: E402
from mgll_data.build.pipeline import load_pipeline  # noqa: E402
from mgll_data.cli import main  # noqa: E402
from mgll_data.errors import ItemError, UserError  # noqa: E402
from mgll_data.imaging.files import read_remote_file  # noqa: E402
from mgll_data.storage import filesystem, release_root, scrub  # noqa: E402
from tests.nih_fixture import make_release  # noqa: E402
from tests.s3_server import BUCKET, KEY_ID, SECRET, moto_s3  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OPTIONS = ("--image-size", "32", "--rows-per-shard", "8", "--no-progress")


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> Iterator[dict]:
    """moto's S3 server; this process's environment holds the fake credentials meanwhile."""
    with moto_s3(tmp_path_factory.mktemp("moto")) as options:
        yield options


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("object-storage")


@pytest.fixture(scope="module")
def release(s3, work) -> Path:
    """The NIH Box layout (two images_00N.tar.gz), also uploaded to s3://BUCKET/nih/."""
    fixture = make_release(work / "nih", count=24, layout="box")
    s3fs.S3FileSystem(**s3).put(f"{fixture.root}/", f"{BUCKET}/nih/", recursive=True)
    return fixture.root


@pytest.fixture(scope="module")
def local(release, work) -> Path:
    """The reference: the local build of the same files."""
    out = work / "local"
    _main("build", "chestxray14", "--root", release, "--out", out, *OPTIONS)
    return out


def _main(*args: object) -> None:
    with pytest.raises(SystemExit) as done:
        main([str(a) for a in args])
    assert done.value.code in (0, None)


def _files(out: Path) -> dict[str, bytes]:
    return {
        path.relative_to(out).as_posix(): path.read_bytes()
        for path in sorted(out.rglob("*"))
        if path.is_file() and not path.name.startswith(".")
    }


def assert_same_build(out: Path, reference: Path) -> None:
    """Every file byte for byte; the manifest up to its timestamps and the fingerprint (which
    identifies files by size and mtime locally, by size and ETag on object storage)."""
    ours, theirs = _files(out), _files(reference)
    assert sorted(ours) == sorted(theirs)
    manifest = "_build/manifest.json"
    assert [name for name in theirs if name != manifest and ours[name] != theirs[name]] == []
    assert sum(name.endswith(".parquet") for name in theirs) >= 3
    assert (reference / "_build" / "quarantine.jsonl").read_text()  # the fixture's bad rows
    skip = ("started_at", "finished_at", "fingerprint")
    ours_m, theirs_m = json.loads(ours[manifest]), json.loads(theirs[manifest])
    assert {k: v for k, v in ours_m.items() if k not in skip} == {
        k: v for k, v in theirs_m.items() if k not in skip
    }


def assert_never_named(blobs: dict[str, bytes], *words: str) -> None:
    for word in words:
        assert [name for name, data in blobs.items() if word.encode() in data] == [], word


@pytest.mark.wires("mgll-build-dataset build", "--root", "--storage-options")
def test_a_release_in_a_bucket_builds_the_same_bytes_as_on_disk(s3, release, local, work):
    """Through the CLI in a subprocess: archives streamed from S3 by two workers' driver."""
    out = work / "from-s3"
    args = ["build", "chestxray14", "--root", f"s3://{BUCKET}/nih", "--out", out, *OPTIONS]
    args += ["--workers", "2", "--storage-options", json.dumps(s3)]
    done = subprocess.run(
        [sys.executable, "-m", "mgll_data", *map(str, args)],
        cwd=REPO,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    assert "2 archives read directly" in done.stdout
    assert_same_build(out, local)
    endpoint = s3["client_kwargs"]["endpoint_url"]
    log = {"stdout": done.stdout.encode(), "stderr": done.stderr.encode()}
    assert_never_named(_files(out), SECRET, KEY_ID, BUCKET, "s3://", endpoint, str(release))
    assert_never_named(log, SECRET, KEY_ID)


@pytest.mark.wires("mgll-build-dataset build", "--out")
def test_a_build_into_a_bucket_uploads_the_local_bytes_and_resumes_there(
    s3, release, local, work, capsys
):
    url = f"s3://{BUCKET}/built/nih"
    _main("build", "chestxray14", "--root", release, "--out", url, *OPTIONS,
          "--storage-options", json.dumps(s3))  # fmt: skip
    printed = capsys.readouterr()
    assert f"into {url} in" in printed.out
    fs = s3fs.S3FileSystem(**s3)
    down = work / "downloaded"
    fs.get(f"{BUCKET}/built/nih/", f"{down}/", recursive=True)
    assert_same_build(down, local)
    assert_never_named(_files(down), SECRET, KEY_ID, BUCKET, "s3://")
    assert_never_named({"log": (printed.out + printed.err).encode()}, SECRET, KEY_ID)

    # An existing build is refused, as on disk; --resume re-uploads only the missing shard.
    with pytest.raises(SystemExit) as refused:
        main(["build", "chestxray14", "--root", str(release), "--out", url, *OPTIONS,
              "--storage-options", json.dumps(s3)])  # fmt: skip
    assert refused.value.code == 2
    assert f"{url}: already holds a build" in capsys.readouterr().err
    fs.rm_file(f"{BUCKET}/built/nih/data/train-00001-of-00003.parquet")
    options = BuildOptions(
        image_size=32, rows_per_shard=8, progress=False, resume=True, storage_options=s3
    )
    summary = build(load_pipeline("chestxray14"), release, url, options)
    assert (summary.shards_written, summary.shards_kept) == (1, 3)
    again = work / "downloaded-again"
    fs.get(f"{BUCKET}/built/nih/", f"{again}/", recursive=True)
    assert_same_build(again, local)


def test_credentials_in_a_url_reach_the_image_stage(s3, work, monkeypatch, capsys):
    """Plain image files (the Kaggle layout) are fetched by the image stage, not the scan: with
    no credentials in the environment, those of the URL must get there too."""
    raw = make_release(work / "nih-kaggle", count=24, layout="kaggle").root
    s3fs.S3FileSystem(**s3).put(f"{raw}/", f"{BUCKET}/nih-kaggle/", recursive=True)
    _main("build", "chestxray14", "--root", raw, "--out", work / "kaggle-local", *OPTIONS)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    out = work / "kaggle-url-credentials"
    _main("build", "chestxray14", "--root", f"s3://{KEY_ID}:{SECRET}@{BUCKET}/nih-kaggle",
          "--out", out, *OPTIONS, "--storage-options", json.dumps(s3))  # fmt: skip
    printed = capsys.readouterr()
    assert_same_build(out, work / "kaggle-local")
    assert_never_named(_files(out), SECRET, KEY_ID)
    assert_never_named({"log": (printed.out + printed.err).encode()}, SECRET, KEY_ID)


def test_a_bucket_without_credentials_is_one_line(s3, work):
    """In a fresh process (fsspec caches file systems, credentials included), with none in
    the environment: the client's refusal in one line, no traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_ACCESS_KEY")}
    env = {k: v for k, v in env.items() if k != "AWS_SECRET_ACCESS_KEY"}
    args = ["build", "chestxray14", "--root", f"s3://{BUCKET}/nih", "--out",
            str(work / "never"), "--storage-options", json.dumps(s3)]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "mgll_data", *args], cwd=REPO, env=env, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr == (
        f"mgll-build-dataset: error: s3://{BUCKET}/nih: cannot list the release root "
        "(NoCredentialsError: Unable to locate credentials)\n"
    )


def test_credentials_in_a_url_are_used_and_never_shown(s3, release, work, capsys):
    """`s3://KEY:SECRET@bucket/...`: the credentials go to s3fs, never to a message."""
    url = f"s3://{KEY_ID}:{SECRET}@{BUCKET}/no-such-release"
    with pytest.raises(SystemExit) as failed:
        main(["build", "chestxray14", "--root", url, "--out", str(work / "none"),
              "--storage-options", json.dumps(s3)])  # fmt: skip
    assert failed.value.code == 2
    err = capsys.readouterr().err
    assert f"s3://{BUCKET}/no-such-release: release root is not a directory" in err
    assert SECRET not in err and KEY_ID not in err
    root = release_root(url, s3)
    assert (root.fs.key, root.fs.secret) == (KEY_ID, SECRET)
    assert SECRET not in str(root) and SECRET not in repr(root)


def test_scrub_removes_url_credentials_and_option_values():
    text = "cannot read s3://AKIAX:hunter2secret@bucket/x with token abcd1234 (region us)"
    assert scrub(text, {"token": "abcd1234", "region": "us"}) == (
        "cannot read s3://bucket/x with token *** (region us)"
    )


@pytest.mark.wires("mgll-build-dataset build", "--storage-options")
def test_storage_options_that_are_not_a_json_object_are_one_line(work, capsys):
    for text in ('{"anon": tru', '["anon"]'):
        with pytest.raises(SystemExit) as failed:
            main(["build", "chestxray14", "--root", "s3://bucket/x", "--out",
                  str(work / "never"), "--storage-options", text])  # fmt: skip
        assert failed.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("mgll-build-dataset: error: --storage-options: expected a JSON")
        assert text not in err and len(err.splitlines()) == 1


@pytest.mark.wires("mgll-build-dataset build", "--out-storage-options")
def test_a_release_read_from_one_store_is_written_to_another(s3, local, work, tmp_path):
    """--root on one S3 endpoint, --out on a second server that only the out options reach:
    without them the shards would go to the release's endpoint, which has no such bucket."""
    with moto_s3(tmp_path) as other:
        fs = s3fs.S3FileSystem(**other)
        fs.mkdir("mgll-built")
        _main("build", "chestxray14", "--root", f"s3://{BUCKET}/nih", "--out",
              "s3://mgll-built/nih", *OPTIONS, "--storage-options", json.dumps(s3),
              "--out-storage-options", json.dumps(other))  # fmt: skip
        down = work / "from-one-store-to-another"
        fs.get("mgll-built/nih/", f"{down}/", recursive=True)
    assert_same_build(down, local)
    assert not s3fs.S3FileSystem(**s3).exists("mgll-built")

    with pytest.raises(SystemExit) as failed:
        main(["build", "chestxray14", "--root", str(work), "--out", "s3://x/y",
              "--out-storage-options", '{"anon": tru'])  # fmt: skip
    assert failed.value.code == 2


def test_remote_images_are_refused_before_reading_when_over_the_cap_or_outside(s3):
    fs = s3fs.S3FileSystem(**s3)
    root = f"s3://{BUCKET}/hostile"
    fs.pipe_file(f"{BUCKET}/hostile/big.png", b"x" * 300)
    fs.pipe_file(f"{BUCKET}/hostile/sub/a.png", b"a")
    fs.pipe_file(f"{BUCKET}/outside.png", b"o")
    assert read_remote_file(f"{root}/big.png", root, s3) == b"x" * 300
    cases = {
        f"{root}/big.png": "image file is 300 bytes, over the 299-byte cap",
        f"{root}/../outside.png": "path leaves the release folder",
        f"{root}/missing.png": "missing image file: missing.png",
        f"{root}/sub": "not a regular file (directory)",
    }
    for url, reason in cases.items():
        with pytest.raises(ItemError) as refused:
            read_remote_file(url, root, s3, max_bytes=299)
        assert refused.value.reason == reason


def test_requester_pays_and_a_hub_endpoint_reach_the_file_systems():
    """Real fsspec constructors (they connect lazily): S3 requester-pays, a Hub endpoint."""
    fs, path = filesystem("s3://physionet-open/mimic", {"requester_pays": True})
    assert (fs.req_kw, path) == ({"RequestPayer": "requester"}, "physionet-open/mimic")
    hub = release_root("hf://datasets/org/name/raw", {"endpoint": "http://127.0.0.1:9"})
    assert (hub.fs.endpoint, hub.path) == ("http://127.0.0.1:9", "datasets/org/name/raw")


def test_gcs_requester_pays_reaches_gcsfs():
    pytest.importorskip("gcsfs", reason="gcsfs is not installed (pip install -e '.[cloud]')")
    options = {"requester_pays": True, "token": "anon"}  # anon: no credential lookup
    fs, path = filesystem("gs://mimic-cxr-jpg-2.1.0.physionet.org/files", options)
    assert (fs.requester_pays, path) == (True, "mimic-cxr-jpg-2.1.0.physionet.org/files")


def test_a_missing_backend_is_one_line():
    with pytest.raises(UserError, match=r"^nosuchproto://x: cannot open this storage"):
        filesystem("nosuchproto://x")
