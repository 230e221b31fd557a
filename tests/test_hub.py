"""`push` against a fake Hub on 127.0.0.1, through the command line, on the default upload path.

Hub-talking code runs in subprocesses, because `HF_ENDPOINT` must be set before
`huggingface_hub`/`datasets` are imported (and conftest makes this process offline). With
`hf_xet` installed, `huggingface_hub` uploads file contents through Xet (a CAS write token, xorb
upload grants, shards) and the fake Hub serves that protocol and checks what arrives; one test
takes the legacy LFS path (`HF_HUB_DISABLE_XET=1`) that clients without `hf_xet` use.

The Hub's awkward answers come from the fake Hub too: listings in pages of three entries, 401
for an unknown token, 409 on creating an existing repo, 412 when the head moved under a push,
429 with `Retry-After` and 5xx, once (retried, then the push succeeds) or for good (one line).
Retry back-off is shortened through the clients' own knobs: `hf_xet`'s
`HF_XET_CLIENT_RETRY_BASE_DELAY`, and `huggingface_hub`'s `http_backoff` defaults (set by the
launcher below before `mgll-build-dataset`'s entry point runs; HTTP itself is untouched).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from mgll_data.publish.card import split_card
from tests.fake_hub import (
    FakeHub,
    Repo,
    bg4_ungroup,
    build_dataset,
    crc64_nvme,
    lz4_decompress,
    pipeline_variant,
    write_release,
    xet_hash_hex,
)

TOKEN = "hf_SECRETtoken0123456789"
ENV_TOKEN = "hf_dummy_env_token"
ROOT = Path(__file__).resolve().parents[1]
TREE = r"/api/datasets/{}/tree/.*"

# `mgll-build-dataset`'s console entry point, with huggingface_hub's retry back-off shortened.
LAUNCHER = """
import sys
from huggingface_hub.utils import http_backoff
http_backoff.__kwdefaults__.update(base_wait_time=0.05, max_wait_time=0.1)
from mgll_data.cli import main
sys.argv[0] = "mgll-build-dataset"
main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def hub():
    with FakeHub(tokens=[ENV_TOKEN, TOKEN], page_size=3) as server:
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


@pytest.fixture(scope="module")
def fewer(work, release):
    """The same release rebuilt with fewer, larger shards."""
    return build_dataset(release, work / "cxr-fewer", rows_per_shard=8)


def hub_env(hub: FakeHub, home: Path, **extra: str) -> dict[str, str]:
    """The environment of a client of `hub`: online, its own HF_HOME, a valid HF_TOKEN."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_XET"}
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HUB_OFFLINE="0",
        HF_DATASETS_OFFLINE="0",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_XET_CLIENT_RETRY_BASE_DELAY="10ms",
        HF_HOME=str(home),
        HF_TOKEN=ENV_TOKEN,
        PYTHONPATH=str(ROOT),
        OMP_NUM_THREADS="1",
    )
    env.update(extra)
    return env


def cli(hub: FakeHub, home: Path, *args, **env: str) -> subprocess.CompletedProcess:
    """`mgll-build-dataset ARGS` as a client of `hub`."""
    return subprocess.run(
        [sys.executable, "-c", LAUNCHER, *map(str, args)],
        env=hub_env(hub, home, **env),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=180,
    )


def remote(hub: FakeHub, repo_id: str) -> dict[str, bytes]:
    return dict(hub.repos[repo_id].files)


def local_published(out: Path) -> dict[str, bytes]:
    """What a data push of `out` must leave on the Hub: the card, shards and figures."""
    files = {"README.md": (out / "README.md").read_bytes()}
    for path in sorted(out.glob("data/*.parquet")) + sorted(out.glob("figures/*.png")):
        files[path.relative_to(out).as_posix()] = path.read_bytes()
    return files


def large_files(out: Path) -> set[str]:
    """sha256 of the shards and figures: the files whose contents go up outside the commit."""
    return {
        hashlib.sha256(data).hexdigest()
        for path, data in local_published(out).items()
        if path.endswith((".parquet", ".png"))
    }


def one_error_line(result: subprocess.CompletedProcess, repo_id: str) -> str:
    """The single stderr line of a failed push (and no traceback); returned for more checks."""
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(f"mgll-build-dataset: error: push to {repo_id}")
    assert "Traceback" not in result.stderr
    return lines[0]


def status_of(hub: FakeHub, path: str, token: str | None) -> int:
    """The HTTP status of GET `path` on `hub`, anonymously or with `token`."""
    request = urllib.request.Request(hub.url + path)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def test_fake_hub_decodes_hand_made_xet_inputs():
    """The fake Hub's decoders, on inputs written by hand from the formats' specifications."""
    # LZ4 block: token 0x22 = 2 literals "ab", then a match of 2+4 bytes at offset 2 (overlapping)
    block = b"\x22ab\x02\x00"
    assert lz4_decompress(block) == b"abababab"
    # the same block in an LZ4 frame (FLG 0x60: version 1, independent blocks; BD; HC), end mark 0
    frame = b"\x04\x22\x4d\x18\x60\x40\x82" + len(block).to_bytes(4, "little") + block
    assert lz4_decompress(frame + b"\x00" * 4) == b"abababab"
    # an uncompressed frame block (high bit set) is taken as is
    stored = (3 | 1 << 31).to_bytes(4, "little") + b"xyz"
    assert lz4_decompress(frame[:7] + stored + b"\x00" * 4) == b"xyz"
    assert bg4_ungroup(b"AEIBFJCGDH") == b"ABCDEFGHIJ"  # groups of bytes 0,4,8 / 1,5,9 / ...
    assert xet_hash_hex(bytes(range(32))).startswith("07060504030201000f0e0d0c0b0a0908")
    assert crc64_nvme(b"123456789") == 0xAE8B14860A799888  # the catalogued check value


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


@pytest.mark.wires("mgll-build-dataset push", "--repo-id")
def test_push_round_trips_and_second_push_uploads_only_changes(hub, built, fewer, work):
    home = work / "hf-home-1"
    uploads = len(hub.uploads())
    result = cli(hub, home, "push", built, "--repo-id", "org/cxr")
    assert result.returncode == 0, result.stderr
    shards = sorted(built.glob("data/*.parquet"))
    assert f"{len(local_published(built))} file(s) uploaded" in result.stdout
    assert any(p.startswith("figures/") for p in remote(hub, "org/cxr"))
    # byte for byte, and nothing of _build/
    assert remote(hub, "org/cxr") == local_published(built)
    assert not any(p.startswith("_build") for p in remote(hub, "org/cxr"))
    # a public repo, created as such
    assert not hub.repos["org/cxr"].private
    assert hub.created[-1]["name"] == "cxr" and hub.created[-1].get("visibility") != "private"
    # the contents went up through Xet, each shard and figure whole, and none through LFS
    assert set(hub.uploads()[uploads:]) == large_files(built)
    assert hub.count("POST", r"/v1/shards", 200) >= 1 and hub.xorbs
    assert hub.count("POST", r"/datasets/.*/info/lfs/objects/batch") == 0

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

    # nothing changed: the repo exists (409, fine), nothing uploaded, no commit
    conflicts, uploads = hub.count("POST", "/api/repos/create", 409), len(hub.uploads())
    commits = hub.repos["org/cxr"].commits
    again = cli(hub, home, "push", built, "--repo-id", "org/cxr")
    assert again.returncode == 0, again.stderr
    assert hub.count("POST", "/api/repos/create", 409) == conflicts + 1
    assert "0 file(s) uploaded" in again.stdout and "no commit" in again.stdout
    assert len(hub.uploads()) == uploads and hub.repos["org/cxr"].commits == commits

    # a rebuild with fewer shards: the stale remote shards are deleted, though every data file
    # is listed past the first page (its three entries: the folders data/, figures/, README.md)
    assert len(list(fewer.glob("data/*.parquet"))) < len(shards)
    pages = hub.count("GET", TREE.format("org/cxr"))
    third = cli(hub, home, "push", fewer, "--repo-id", "org/cxr")
    assert third.returncode == 0, third.stderr
    listed = 2 + len(local_published(built))  # the folders data/ and figures/, and the files
    assert hub.count("GET", TREE.format("org/cxr")) - pages == -(-listed // 3) > 1
    assert remote(hub, "org/cxr") == local_published(fewer)
    stale = {p.name for p in shards} - {p.name for p in fewer.glob("data/*.parquet")}
    assert stale and f"{len(stale)} deleted" in third.stdout


@pytest.mark.wires("mgll-build-dataset push", "--private")
def test_private_push_makes_a_private_repo(hub, built, work):
    home = work / "hf-home-private"
    result = cli(hub, home, "push", built, "--repo-id", "org/closed", "--private")
    assert result.returncode == 0, result.stderr
    assert hub.created[-1]["name"] == "closed" and hub.created[-1]["visibility"] == "private"
    assert hub.repos["org/closed"].private
    assert remote(hub, "org/closed") == local_published(built)
    # private on the Hub: hidden from anonymous reads, readable with a token
    assert status_of(hub, "/api/datasets/org/closed", None) == 401
    assert status_of(hub, "/api/datasets/org/closed", ENV_TOKEN) == 200
    hub.repos.setdefault("org/open", Repo("org/open", private=False))
    assert status_of(hub, "/api/datasets/org/open", None) == 200  # a public one is not hidden


@pytest.mark.wires("mgll-build-dataset push", "--token")
def test_unknown_token_fails_in_one_line_without_showing_it(hub, built, work):
    wrong = "hf_WRONGtoken9876543210"
    home = work / "hf-home-401"
    result = cli(hub, home, "push", built, "--repo-id", "org/denied", "--token", wrong)
    line = one_error_line(result, "org/denied")
    assert "401" in line
    # --token, not the environment's (valid) token, was sent; and it is never printed
    assert f"Bearer {wrong}" in {r.auth for r in hub.requests}
    assert wrong not in result.stdout + result.stderr
    assert "org/denied" not in hub.repos


@pytest.mark.wires("mgll-build-dataset push", "--token")
def test_failing_push_never_shows_the_token(hub, built, work):
    result = cli(
        hub, work / "hf-home-2", "push", built, "--repo-id", "org/forbidden-x", "--token", TOKEN
    )
    one_error_line(result, "org/forbidden-x")
    # the server did get the token and echoed it in its error body: only redaction hides it
    assert f"Bearer {TOKEN}" in {r.auth for r in hub.requests}
    assert TOKEN not in result.stdout + result.stderr


def test_transient_errors_are_retried_then_the_push_succeeds(hub, built, work):
    repo = "org/flaky"
    faults = [  # (method, path, statuses answered before the request goes through)
        ("GET", TREE.format(repo), [429]),  # rate limited, Retry-After: 0
        ("POST", rf"/api/datasets/{repo}/preupload/main", [503]),
        ("POST", r"/v1/xorb-grants/default/.*", [502, 500]),
        ("POST", r"/v1/shards", [503]),
    ]
    before = {(m, p): hub.count(m, p) for m, p, _ in faults}
    for method, path, statuses in faults:
        headers = {"Retry-After": "0"} if statuses == [429] else None
        hub.fail(method, path, statuses, headers)
    result = cli(hub, work / "hf-home-flaky", "push", built, "--repo-id", repo)
    assert result.returncode == 0, result.stderr[-3000:]
    assert remote(hub, repo) == local_published(built)
    for method, path, statuses in faults:
        # each failure was answered, then the same request was sent again and went through
        assert hub.count(method, path) - before[method, path] >= len(statuses) + 1, path
        for status in statuses:
            assert hub.count(method, path, status) >= 1, (path, status)
        assert not any(f.statuses for f in hub.faults if f.pattern == path)


def test_legacy_lfs_upload_path_retries_and_uploads(built, work):
    """Clients without hf_xet upload through the LFS batch API: that path works too."""
    with FakeHub(tokens=[ENV_TOKEN]) as fresh:  # an empty store: every object must be PUT
        fresh.fail("PUT", r"/lfs-upload/.*", [503])
        home = work / "hf-home-legacy"
        result = cli(fresh, home, "push", built, "--repo-id", "org/legacy", HF_HUB_DISABLE_XET="1")
        assert result.returncode == 0, result.stderr[-3000:]
        assert remote(fresh, "org/legacy") == local_published(built)
        assert set(fresh.uploads()) == large_files(built)
        assert fresh.count("POST", r"/datasets/org/legacy\.git/info/lfs/objects/batch") >= 1
        assert fresh.count("POST", r"/v1/.*") == 0
        assert fresh.count("PUT", r"/lfs-upload/.*", 503) == 1  # and retried
        assert fresh.count("PUT", r"/lfs-upload/.*", 200) == len(large_files(built))


@pytest.mark.parametrize(
    "method, path",
    [
        pytest.param("GET", TREE.format("org/down"), id="listing"),
        pytest.param("POST", r"/v1/shards", id="xet-shard"),
    ],
)
def test_persistent_server_error_fails_in_one_line(hub, built, work, method, path):
    hub.fail(method, path, [503], forever=True)
    try:
        before = hub.count(method, path, 503)
        home = work / f"hf-home-down-{method}"
        result = cli(hub, home, "push", built, "--repo-id", "org/down", "--token", TOKEN)
        line = one_error_line(result, "org/down")
        assert "503" in line
        assert TOKEN not in result.stdout + result.stderr
        assert hub.count(method, path, 503) - before > 1  # retried before giving up
        assert not hub.repos["org/down"].files  # nothing committed
    finally:
        hub.faults = [f for f in hub.faults if not f.forever]


@pytest.mark.wires("mgll-build-dataset push", "--repo-id")
def test_concurrent_commit_is_refused_not_merged(hub, built, fewer, work):
    home = work / "hf-home-race"
    first = cli(hub, home, "push", built, "--repo-id", "org/race")
    assert first.returncode == 0, first.stderr

    # Someone else commits after the push listed the repo and before it commits.
    shard = sorted(p for p in remote(hub, "org/race") if p.startswith("data/"))[0]
    theirs = {"README.md": b"their card\n", shard: b"their shard"}

    def other_writer(repo: Repo) -> None:
        repo.commit(theirs)

    hub.after_listing("org/race", other_writer)
    raced = cli(hub, home, "push", fewer, "--repo-id", "org/race")
    line = one_error_line(raced, "org/race")
    assert "the repo changed on the Hub during the push" in line and "push again" in line
    assert hub.count("POST", r"/api/datasets/org/race/commit/main", 412) == 1
    # nothing of the refused push was committed: the repo is the other writer's
    assert remote(hub, "org/race") == {**local_published(built), **theirs}

    again = cli(hub, home, "push", fewer, "--repo-id", "org/race")
    assert again.returncode == 0, again.stderr
    assert remote(hub, "org/race") == local_published(fewer)


@pytest.mark.wires("mgll-build-dataset push", "--card-only")
def test_redistribution_none_refuses_data_and_card_only_uploads_no_data(hub, work, release):
    restricted = pipeline_variant(
        work,
        id="PhysioNet Credentialed Health Data License 1.5.0",
        url="https://physionet.org/content/mimic-cxr/view-license/2.0.0/",
        redistribution="none",
    )
    out = build_dataset(release, work / "restricted", restricted)
    before = len(hub.requests)
    refused = cli(hub, work / "hf-home-3", "push", out, "--repo-id", "org/mimic")
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "--card-only" in lines[0] and "forbids redistribution" in lines[0]
    assert len(hub.requests) == before  # refused before any request
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
