"""`build --root hf://datasets/…` against a fake Hugging Face Hub on 127.0.0.1.

The ChestX-ray14 fixture goes into dataset repos on the fake Hub (tests/fake_hub.py) through
`huggingface_hub`'s own upload and commit API, as a user's upload would; `mgll-build-dataset`
then reads it through fsspec's `HfFileSystem` (paginated tree listings, `resolve` downloads,
range reads) and must build the same bytes as from the same files on disk. Hub clients run in
subprocesses: `HF_ENDPOINT` is read when `huggingface_hub` is imported, and conftest makes this
process offline. Tokens reach them only through `HF_TOKEN`, with a distinctive value that no
output file and no log may contain.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from mgll_data.cli import main
from tests.fake_hub import FakeHub
from tests.nih_fixture import NihFixture, make_release
from tests.test_object_storage import _files, assert_never_named, assert_same_build

REPO = Path(__file__).resolve().parents[1]
TOKEN = "hf_mgllHubRead7d1e0bNeverInOutput"
WRONG = "hf_mgllUnknownToken93c4NeverShown"
OPTIONS = ("--image-size", "32", "--rows-per-shard", "8", "--no-progress")

# A user's upload: create the repo, then commit a folder (or commit changes to an existing one).
UPLOAD = """
import sys
from huggingface_hub import CommitOperationDelete, HfApi
repo_id, visibility, folder, *deleted = sys.argv[1:]
api = HfApi()
api.create_repo(repo_id, repo_type="dataset", private=visibility == "private", exist_ok=True)
if deleted:
    operations = [CommitOperationDelete(path) for path in deleted]
    info = api.create_commit(repo_id, operations, commit_message="drop", repo_type="dataset")
else:
    info = api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="dataset")
print(info.oid)
"""

# The fingerprint's stamp of each file listed under each root given, by path below the root;
# the paths it is asked about are built as sources build them (joined onto the root UPath).
STAMPS = """
import json, sys
from mgll_data.storage import RemoteStamps, release_root
out = {}
for url in sys.argv[1:]:
    root = release_root(url)
    stamps = RemoteStamps(root)
    names = [found[len(root.path) + 1 :] for found in root.fs.find(root.path)]
    out[url] = {name: stamps.of(str(root.joinpath(*name.split("/")))) for name in names}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHub]:
    """Tree listings in pages of five entries, so every listing of a release takes several."""
    with FakeHub(tokens=[TOKEN], page_size=5) as server:
        yield server


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hub-root")


@pytest.fixture(scope="module")
def made() -> dict[str, Any]:
    """What `release` and `reference` made in this process, by name (each made on first use)."""
    return {}


def release(made: dict, work: Path, layout: str) -> NihFixture:
    """The fixture release in `layout` (kaggle: PNG folders, box: tar.gz archives) on disk."""
    if layout not in made:
        made[layout] = make_release(work / f"nih-{layout}", count=24, layout=layout)
    return made[layout]


def reference(made: dict, work: Path, layout: str) -> Path:
    """The local build of `release(layout)`: what a build from the Hub must equal."""
    name = f"local-{layout}"
    if name not in made:
        root, out = release(made, work, layout).root, work / name
        with pytest.raises(SystemExit) as done:
            main(["build", "chestxray14", "--root", str(root), "--out", str(out), *OPTIONS])
        assert done.value.code in (0, None)
        made[name] = out
    return made[name]


def client_env(hub: FakeHub, home: Path, token: str | None) -> dict[str, str]:
    """A Hub client's environment: online, pointed at `hub`, its own empty HF_HOME (no stored
    token), and `token` as HF_TOKEN when given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HOME=str(home),
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        PYTHONPATH=str(REPO),
        OMP_NUM_THREADS="1",
    )
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def run(hub: FakeHub, work: Path, args: list[object], token: str | None = TOKEN, **env: str):
    """A Python subprocess as a client of `hub` (`env` added): `args` after the interpreter."""
    return subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=REPO,
        env={**client_env(hub, work / "hf-home", token), **env},
        capture_output=True,
        text=True,
        timeout=180,
    )


def upload(hub: FakeHub, work: Path, repo_id: str, folder: Path, private: bool = False) -> str:
    """Upload `folder` into dataset repo `repo_id` (created if new); the commit's sha."""
    visibility = "private" if private else "public"
    done = run(hub, work, ["-c", UPLOAD, repo_id, visibility, folder])
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split()[-1]


def build(
    hub: FakeHub, work: Path, root: str, out: Path, *more: str, token: str | None, **env: str
) -> subprocess.CompletedProcess:
    """`mgll-build-dataset build chestxray14 --root ROOT --out OUT` as a client of `hub`."""
    args = ["build", "chestxray14", "--root", root, "--out", out, *OPTIONS, *more]
    return run(hub, work, ["-m", "mgll_data", *args], token=token, **env)


def one_error_line(done: subprocess.CompletedProcess) -> str:
    """The single stderr line of a refused build (exit 2, no traceback)."""
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert lines[0].startswith("mgll-build-dataset: error: ")
    return lines[0]


@pytest.mark.wires("mgll-build-dataset build", "--root")
def test_a_public_repo_of_archives_builds_the_same_bytes_as_on_disk(hub, made, work):
    """Anonymous reads of the NIH Box layout: the tar.gz archives streamed from the Hub."""
    fixture, local = release(made, work, "box"), reference(made, work, "box")
    upload(hub, work, "tester/nih-box", fixture.root)
    out = work / "from-hub-box"
    done = build(hub, work, "hf://datasets/tester/nih-box", out, token=None)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 archives read directly" in done.stdout
    assert_same_build(out, local)
    assert_never_named(_files(out), "hf://", hub.url, "tester/nih", str(fixture.root))


@pytest.mark.wires("mgll-build-dataset build", "--root")
def test_a_private_repo_reads_with_the_token_from_the_environment(hub, made, work):
    """The Kaggle layout (PNG folders), each image downloaded by one of two workers: HF_TOKEN
    reaches them all, and is in no output file and no log."""
    fixture, local = release(made, work, "kaggle"), reference(made, work, "kaggle")
    upload(hub, work, "tester/nih-private", fixture.root, private=True)
    out = work / "from-private"
    done = build(hub, work, "hf://datasets/tester/nih-private", out, "--workers", "2", token=TOKEN)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "25 image files" in done.stdout
    assert_same_build(out, local)
    log = {"stdout": done.stdout.encode(), "stderr": done.stderr.encode()}
    assert_never_named(_files(out), TOKEN, "hf://", hub.url, "nih-private")
    assert_never_named(log, TOKEN)


def test_a_repo_the_hub_does_not_show_is_one_line_that_never_shows_the_token(hub, work):
    """A wrong token, no token for a private repo, an unknown repo or revision: the Hub's
    reason in one line; so too a path that names no repo, and offline mode. A folder the repo
    lacks: the usual missing-root line."""
    tiny = work / "tiny"
    tiny.mkdir()
    (tiny / "test_list.txt").write_text("00000001_000.png\n")
    upload(hub, work, "tester/nih-locked", tiny, private=True)
    root = "hf://datasets/tester/nih-locked"
    rev = "ab" * 20
    cases = {  # (root, HF_TOKEN, HF_HUB_OFFLINE): what the line says after "ROOT: "
        (root, WRONG, "0"): "the Hub does not show this repository or revision "
        "(401: Invalid credentials in Authorization header); ",
        (root, None, "0"): "the Hub does not show this repository or revision "
        "(401: Repository tester/nih-locked not found); ",
        ("hf://datasets/tester/nope", TOKEN, "0"): "the Hub does not show this repository or "
        "revision (404: Repository tester/nope not found); ",
        (f"{root}@{rev}", TOKEN, "0"): "the Hub does not show this repository or revision "
        f"(404: Invalid rev id: {rev}); ",
        ("hf://datasets/tester", TOKEN, "0"): "not a Hub repository path (Invalid HF URI ",
        (root, TOKEN, "1"): "cannot reach the Hub (Cannot reach ",
        (f"{root}/no/such/folder", TOKEN, "0"): "release root is not a directory",
    }
    outs = [work / f"never-{n}" for n in range(len(cases))]

    def refused(case: tuple[str, str | None, str], out: Path) -> subprocess.CompletedProcess:
        url, token, offline = case
        return build(hub, work, url, out, token=token, HF_HUB_OFFLINE=offline)

    with ThreadPoolExecutor(max_workers=3) as pool:  # short CLI runs side by side
        done = dict(zip(cases, pool.map(refused, cases, outs), strict=True))
    for (url, token, offline), said in cases.items():
        line = one_error_line(done[url, token, offline])
        assert line.startswith(f"mgll-build-dataset: error: {url}: {said}"), line
        assert WRONG not in line and TOKEN not in line
        assert ("HF_TOKEN" in line) == said.startswith("the Hub"), line
    assert not any(out.exists() for out in outs)


def test_a_hub_that_does_not_answer_is_one_line(hub, work):
    """Nothing listens at HF_ENDPOINT (a closed local port): one line, no traceback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    done = build(hub, work, "hf://datasets/tester/anything", work / "never-up", token=TOKEN,
                 HF_ENDPOINT=closed, HF_HUB_OFFLINE="0")  # fmt: skip
    line = one_error_line(done)
    assert line.startswith(
        "mgll-build-dataset: error: hf://datasets/tester/anything: cannot reach the Hub ("
    ), line
    assert TOKEN not in line


@pytest.mark.wires("mgll-build-dataset build", "--root")
def test_a_revision_in_the_url_builds_the_files_of_that_commit(hub, made, work):
    """`hf://datasets/u/r@SHA`: a later commit deleted half the images; the pinned build
    still reads them all, as on disk."""
    fixture, local = release(made, work, "kaggle"), reference(made, work, "kaggle")
    first = upload(hub, work, "tester/nih-pinned", fixture.root)
    done = run(hub, work, ["-c", UPLOAD, "tester/nih-pinned", "public", "-", "images_002/"])
    assert done.returncode == 0, done.stderr[-3000:]
    head = hub.repos["tester/nih-pinned"]
    assert head.sha != first and not any(p.startswith("images_002/") for p in head.files)
    out = work / "pinned"
    done = build(hub, work, f"hf://datasets/tester/nih-pinned@{first}", out, token=None)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_build(out, local)
    assert_never_named(_files(out), first)


@pytest.mark.wires("mgll-build-dataset build", "--resume")
def test_stamps_follow_file_contents_even_at_the_same_size(hub, made, work):
    """What `--resume` compares: re-uploading an archive with other bytes of the same size
    (only its gzip timestamp differs) changes its stamp and no other; a pinned revision keeps
    the old one. The Hub lists no ETag, so a stamp of size alone would miss the change."""
    fixture = release(made, work, "box")
    first = upload(hub, work, "tester/nih-stamps", fixture.root)
    changed = work / "changed"
    archive = fixture.root / "images" / "images_002.tar.gz"
    data = bytearray(archive.read_bytes())
    data[4:8] = (int.from_bytes(data[4:8], "little") + 1).to_bytes(4, "little")  # gzip MTIME
    (changed / "images").mkdir(parents=True)
    (changed / "images" / archive.name).write_bytes(bytes(data))
    upload(hub, work, "tester/nih-stamps", changed)

    root = "hf://datasets/tester/nih-stamps"
    done = run(hub, work, ["-c", STAMPS, f"{root}@{first}", root])
    assert done.returncode == 0, done.stderr[-3000:]
    pinned, head = json.loads(done.stdout).values()
    on_disk = sorted(p.relative_to(fixture.root).as_posix() for p in fixture.root.rglob("*.*"))
    assert sorted(pinned) == sorted(head) == on_disk
    for name, stamp in pinned.items():
        size = (fixture.root / name).stat().st_size
        assert stamp.startswith(f"{size}:") and len(stamp) > len(f"{size}:") + 8, (name, stamp)
    assert [n for n in on_disk if pinned[n] != head[n]] == ["images/images_002.tar.gz"]

    # Through the build: a build of the first commit resumes from it, not from the head.
    out = work / "resumable"
    done = build(hub, work, f"{root}@{first}", out, token=None)
    assert done.returncode == 0, done.stderr[-3000:]
    done = build(hub, work, f"{root}@{first}", out, "--resume", token=None)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "shards written 0, kept 4" in done.stdout
    line = one_error_line(build(hub, work, root, out, "--resume", token=None))
    assert line.endswith("the build there used other inputs, options or library versions; run "
                         "without --resume (and with --overwrite) to rebuild it")  # fmt: skip
