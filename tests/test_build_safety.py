"""Build safety: one command per folder, no file outside the output, no trust in changed shards,
one-line disk errors, and `--resume` that notices a changed image.

The builds are real (a 40-image synthetic ChestX-ray14 release, 64-pixel images); the second
commands run as real `mgll-build-dataset` subprocesses where the command line is the point.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mgll_data.build.engine import BuildOptions, build
from mgll_data.build.lock import LOCK_NAME, folder_lock
from mgll_data.build.pipeline import load_pipeline
from mgll_data.cli import write_error_line
from mgll_data.demo.nih_release import write_demo_release
from mgll_data.errors import UserError
from mgll_data.publish.export import export
from mgll_data.publish.hub import local_files, push, read_manifest
from mgll_data.publish.inspect import validate_dataset
from mgll_data.publish.merge import merge
from tests.conftest import REPO, run_module
from tests.fake_hub import build_dataset

ERROR = "mgll-build-dataset: error: "
STARTED = r"started \d\d:\d\d:\d\d"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("build-safety")


@pytest.fixture(scope="module")
def release(work) -> Path:
    """40 synthetic radiographs in ChestX-ray14's layout (images/*.png and the tables)."""
    return write_demo_release(work / "raw", n=40, seed=1, image_size=64)


@pytest.fixture(scope="module")
def built(work, release) -> Path:
    """A finished build of `release`: 4 rows per shard, so several shards per split."""
    return build_dataset(release, work / "built", rows_per_shard=4)


def copy_of(dataset: Path, where: Path, pipeline: str | None = None) -> Path:
    """A copy of `dataset`; `pipeline` renames its source in the manifest (merge needs two)."""
    copy = Path(shutil.copytree(dataset, where))
    if pipeline is not None:
        manifest_path = copy / "_build" / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        manifest_path.write_text(json.dumps(dict(manifest, pipeline=pipeline)))
    return copy


def build_args(release: Path, out: Path, *extra: str) -> list[str]:
    return [
        "build", "chestxray14", "--root", str(release), "--out", str(out),
        "--image-size", "64", "--no-progress", *extra,
    ]  # fmt: skip


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The CLI's one error line (status 2, nothing else on stderr, no traceback)."""
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith(ERROR)
    return lines[0][len(ERROR) :]


def files_under(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def manifest_shards(dataset: Path) -> list[Path]:
    return [dataset / s["path"] for s in read_manifest(dataset)["shards"]]


@contextmanager
def held_by_child(folder: Path, shared: bool = False) -> Iterator[subprocess.Popen]:
    """Another process holding `folder`'s lock (through the module the CLI uses) until the
    block ends; the block may kill it instead."""
    code = (
        "import sys; from pathlib import Path; from mgll_data.build.lock import folder_lock\n"
        f"with folder_lock(Path(sys.argv[1]), shared={shared}):\n"
        "    print('held', flush=True); sys.stdin.read()\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(folder)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline() == "held\n"
        yield child
    finally:
        child.stdin.close()  # the holder's cue to release and exit (unless the block killed it)
        child.wait(timeout=30)
        child.stdout.close()


# -- one command per folder ---------------------------------------------------------------------


def test_a_build_is_refused_in_one_line_naming_the_holder(release, built, tmp_path):
    out = copy_of(built, tmp_path / "dataset")
    before = files_under(out)
    with folder_lock(out):  # this test process holds it, as a running build would
        result = run_module("mgll_data", build_args(release, out, "--overwrite"))
    line = one_error_line(result)
    assert re.fullmatch(
        rf"{re.escape(str(out))}: another mgll-build-dataset \(pid {os.getpid()}, {STARTED}\) "
        "is writing here",
        line,
    ), line
    assert files_under(out) == before  # the refused build touched nothing
    assert not (out / LOCK_NAME).exists()  # released and removed with the block


def test_readers_and_writers_exclude_each_other_and_readers_share(release, built, tmp_path):
    out = copy_of(built, tmp_path / "dataset")
    other = copy_of(built, tmp_path / "other", pipeline="nih_b")
    writing = (
        rf"{re.escape(str(out))}: another mgll-build-dataset \(pid \d+, {STARTED}\) is writing"
    )
    with held_by_child(out) as child:
        assert f"(pid {child.pid}," in _refusal(export, out, "webdataset", tmp_path / "wds")
        assert re.match(writing, _refusal(merge, [other, out], tmp_path / "merged"))
        assert re.match(writing, _refusal(push, out, "org/name"))  # refused before any network
    assert not (tmp_path / "wds").exists() and not (tmp_path / "merged").exists()

    options = BuildOptions(image_size=64, rows_per_shard=4, overwrite=True, progress=False)
    with held_by_child(out, shared=True) as child:
        refusal = _refusal(build, load_pipeline("chestxray14"), release, out, options)
        assert f"(pid {child.pid}," in refusal and refusal.endswith("is reading here")
        # another reader is welcome while the first reads
        export(out, "webdataset", tmp_path / "wds")
    assert sorted(p.name for p in (tmp_path / "wds").iterdir())[0].startswith("test-")
    assert not (out / LOCK_NAME).exists() and validate_dataset(out) == []


def _refusal(function, *args) -> str:
    with pytest.raises(UserError) as err:
        function(*args)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_interleaved_overwrite_builds_the_second_is_refused(release, built, tmp_path):
    out = copy_of(built, tmp_path / "dataset")  # an existing build: both pass --overwrite
    first = subprocess.Popen(
        [sys.executable, "-m", "mgll_data", *build_args(release, out, "--overwrite")]
        + ["--rows-per-shard", "3"],
        cwd=REPO,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    lock = out / LOCK_NAME
    deadline = time.time() + 120
    while not (lock.is_file() and lock.stat().st_size) and time.time() < deadline:
        time.sleep(0.001)
    os.kill(first.pid, signal.SIGSTOP)  # keep it mid-build while the second one starts
    try:
        assert first.poll() is None, "the first build ended before it could be paused"
        second = run_module(
            "mgll_data", build_args(release, out, "--overwrite", "--rows-per-shard", "5")
        )
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert f"another mgll-build-dataset (pid {first.pid}," in one_error_line(second)
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    assert validate_dataset(out) == []
    rows = [pq.ParquetFile(p).metadata.num_rows for p in manifest_shards(out)]
    assert max(rows) == 3 and sum(rows) == 40  # the first build's shards, all of them
    assert not lock.exists()


def test_a_killed_holders_lock_is_taken_over_with_a_note(release, built, tmp_path):
    from datasets import load_dataset

    out = copy_of(built, tmp_path / "dataset")
    with held_by_child(out) as child:
        child.kill()  # as a killed build leaves it: the file stays, the kernel drops the flock
        child.wait()
    assert (out / LOCK_NAME).is_file()
    # nothing that lists a dataset's files sees the lock file
    assert validate_dataset(out) == []
    assert LOCK_NAME not in " ".join(local_files(out, read_manifest(out)))
    loaded = load_dataset(str(out))
    assert sum(len(split) for split in loaded.values()) == 40

    result = run_module("mgll_data", build_args(release, out, "--overwrite"))
    assert result.returncode == 0, result.stderr[-2000:]
    note = (
        f"note: {out}: taking over the lock of an interrupted mgll-build-dataset (pid {child.pid}"
    )
    assert note in result.stderr
    assert not (out / LOCK_NAME).exists() and validate_dataset(out) == []


# -- no file outside the output -----------------------------------------------------------------


def _with_first_id(dataset: Path, new_id: str) -> Path:
    """Rewrite the dataset's first shard so that its first row has `new_id`, and record the new
    shard's hash in the manifest: a hostile dataset that is consistent with itself."""
    shard = manifest_shards(dataset)[0]
    table = pq.read_table(shard)
    ids = table["id"].to_pylist()
    table = table.set_column(table.schema.get_field_index("id"), "id", pa.array([new_id, *ids[1:]]))
    pq.write_table(table, shard)
    manifest_path = dataset / "_build" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["shards"][0]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(manifest))
    return shard


@pytest.mark.parametrize(
    "row_id",
    ["../../escape", "../../escape:x", "chestxray14:../../escape", "/tmp:x", "chest\0xray14:x"],
)
def test_export_refuses_an_id_that_would_write_outside(built, tmp_path, row_id):
    dataset = copy_of(built, tmp_path / "dataset")
    shard = _with_first_id(dataset, row_id)
    dest = tmp_path / "exports" / "a" / "mgll-json"
    before = files_under(tmp_path)
    refusal = _refusal(export, dataset, "mgll-json", dest)
    assert refusal.startswith(f"{shard}: row {row_id!r}:")
    assert files_under(tmp_path) == before and not dest.exists()  # nothing written anywhere


def test_webdataset_keys_of_hostile_ids_stay_inside(built, tmp_path):
    dataset = copy_of(built, tmp_path / "dataset")
    _with_first_id(dataset, "../../escape:x")
    dest = tmp_path / "exports" / "a" / "wds"
    export(dataset, "webdataset", dest)
    names = [m.name for tar in sorted(dest.glob("*.tar")) for m in tarfile.open(tar).getmembers()]
    assert "______escape_x.json" in names
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+\.(json|png|txt)", n) for n in names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset", "exports"]
    assert [p.name for p in (tmp_path / "exports").iterdir()] == ["a"]


def test_export_refuses_a_list_name_that_leaves_the_folder(built, tmp_path):
    refusal = _refusal(export, built, "mgll-json", tmp_path / "json", None, 1000, "../list")
    assert refusal.startswith("--list-name '../list' is not a safe file name")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "key,value,expected",
    [
        ("pipeline", "../evil", "the manifest's pipeline name '../evil' is not a safe"),
        ("shard", "../../outside.parquet", "shard path '../../outside.parquet' is not a safe"),
    ],
)
def test_merge_refuses_manifest_names_that_leave_the_folder(built, tmp_path, key, value, expected):
    a, b = copy_of(built, tmp_path / "a"), copy_of(built, tmp_path / "b", pipeline="nih_b")
    manifest_path = b / "_build" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if key == "pipeline":
        manifest["pipeline"] = value
    else:
        manifest["shards"][0]["path"] = value
    manifest_path.write_text(json.dumps(manifest))
    assert expected in _refusal(merge, [a, b], tmp_path / "merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


# -- no trust in changed shards -----------------------------------------------------------------


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_tampered_shard_is_refused_by_export_merge_and_push(built, tmp_path):
    dataset = copy_of(built, tmp_path / "dataset")
    shards = manifest_shards(dataset)
    _flip_byte(shards[2])
    _flip_byte(shards[1])  # the first tampered one in the manifest's order
    expected = f"{shards[1]}: sha256 differs from the manifest"
    result = run_module(
        "mgll_data",
        ["export", str(dataset), "--format", "webdataset", "--out", str(tmp_path / "wds")],
    )
    assert one_error_line(result).startswith(expected)
    other = copy_of(built, tmp_path / "b", pipeline="nih_b")
    assert _refusal(merge, [other, dataset], tmp_path / "m").startswith(expected)
    assert _refusal(push, dataset, "org/name").startswith(expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "dataset"]


def test_a_stray_or_missing_shard_is_refused(built, tmp_path):
    dataset = copy_of(built, tmp_path / "dataset")
    shards = manifest_shards(dataset)
    stray = dataset / "data" / "train-00000-of-00001.parquet"
    shutil.copyfile(shards[0], stray)
    assert _refusal(export, dataset, "webdataset", tmp_path / "wds").startswith(
        f"{stray}: not in {dataset / '_build' / 'manifest.json'}"
    )
    stray.unlink()
    shards[-1].unlink()
    assert _refusal(export, dataset, "webdataset", tmp_path / "wds").startswith(
        f"{shards[-1]}: listed in"
    )


# -- disk errors: one line ----------------------------------------------------------------------


def test_a_full_disk_is_one_line(release, tmp_path):
    # A real ENOSPC from the kernel: the manifest's temporary file is /dev/full.
    out = tmp_path / "out"
    (out / "_build").mkdir(parents=True)
    (out / "_build" / "manifest.json.tmp").symlink_to("/dev/full")
    result = run_module("mgll_data", build_args(release, out))
    assert one_error_line(result) == f"{out}: cannot write (No space left on device)"
    assert not (out / LOCK_NAME).exists()


def _honouring_permissions() -> list[str]:
    """A command prefix under which file permissions hold (root ignores them)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: a read-only folder cannot be made")
    return [setpriv, "--bounding-set", "-dac_override,-dac_read_search"]


@pytest.mark.parametrize("read_only", [".", "data"])
def test_a_read_only_output_is_one_line(release, tmp_path, read_only):
    # ".": the lock file cannot be made; "data": the finished shard cannot be renamed into it.
    out = tmp_path / "out"
    (out / read_only).mkdir(parents=True, exist_ok=True)
    (out / read_only).chmod(0o555)
    prefix = _honouring_permissions()
    try:
        result = subprocess.run(
            [*prefix, sys.executable, "-m", "mgll_data", *build_args(release, out)],
            cwd=REPO,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
            capture_output=True,
            text=True,
        )
    finally:
        (out / read_only).chmod(0o755)
    assert one_error_line(result) == f"{out}: cannot write (Permission denied)"


def test_write_error_line_names_the_folder_or_the_file(tmp_path):
    # EROFS cannot be made here without mounting: these are the OSErrors the calls raise.
    out = tmp_path / "out"
    inside = OSError(errno.EROFS, os.strerror(errno.EROFS), str(out / "data" / "x.parquet"))
    assert write_error_line(inside, out) == f"{out}: cannot write (Read-only file system)"
    arrow = OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] ...")
    assert write_error_line(arrow, out) == f"{out}: cannot write (No space left on device)"
    source = str(tmp_path / "raw" / "Data_Entry_2017.csv")
    denied = OSError(errno.EACCES, os.strerror(errno.EACCES), source)
    assert write_error_line(denied, out) == f"{source}: Permission denied"
    assert write_error_line(OSError(errno.ENOENT, "No such file", str(out)), out) is None


# -- --resume notices a changed image, and follows a moved release ----------------------------


def _rewind(out: Path, shards: int = 2) -> None:
    """The state an interrupted build leaves: the last shards unwritten, the manifest not done."""
    for shard in sorted((out / "data").glob("*.parquet"))[-shards:]:
        shard.unlink()
        (out / "_build" / "shards" / f"{shard.name}.json").unlink()
    manifest_path = out / "_build" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps(dict(manifest, complete=False)))


def test_resume_refuses_a_changed_image_and_follows_a_moved_release(release, tmp_path):
    def run(root: Path, resume: bool):
        options = BuildOptions(image_size=64, rows_per_shard=4, resume=resume, progress=False)
        return build(load_pipeline("chestxray14"), root, out, options)

    first = Path(shutil.copytree(release, tmp_path / "first"))
    out = tmp_path / "out"
    run(first, resume=False)
    whole = files_under(out / "data")

    _rewind(out)
    moved = first.rename(tmp_path / "moved")  # the same files, mtimes and all, elsewhere
    summary = run(moved, resume=True)
    assert (summary.shards_written, summary.shards_kept) == (2, len(whole) - 2)
    assert files_under(out / "data") == whole

    _rewind(out)
    image = sorted(moved.rglob("*.png"))[5]
    pixels = np.asarray(Image.open(image)).copy()
    pixels[:8, :8] = 255 - pixels[:8, :8]
    Image.fromarray(pixels).save(image)
    with pytest.raises(UserError, match="other inputs, options or library versions"):
        run(moved, resume=True)


def test_workers_die_with_a_killed_build(work):
    """kill -9 of a `--workers 2` build leaves no worker behind: the kernel kills each one
    (PR_SET_PDEATHSIG) instead of leaving it blocked on the task pipe."""
    import psutil

    release = write_demo_release(work / "raw-400", n=400, seed=2, image_size=64)
    command = [sys.executable, "-m", "mgll_data", *build_args(release, work / "killed"),
               "--workers", "2"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    parent = subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        workers: list[psutil.Process] = []
        while len(workers) < 2 and parent.poll() is None and time.time() < deadline:
            workers = psutil.Process(parent.pid).children()
            time.sleep(0.001)
        os.kill(parent.pid, signal.SIGSTOP)  # mid-build: its workers are alive and waiting
        assert len(workers) == 2 and all(w.is_running() for w in workers), workers
    finally:
        parent.kill()
        parent.wait()
    _, alive = psutil.wait_procs(workers, timeout=20)
    for orphan in alive:  # do not leave them behind when the test fails
        orphan.kill()
    assert not alive, [w.pid for w in alive]
