"""`mgll-build-dataset build --executor ray`: the same build on a real Ray cluster, byte for byte.

A two-CPU Ray head runs for the module in a subprocess (its temp folder is a short one under
/tmp, torn down afterwards: Ray's socket paths must stay under 108 bytes). Builds of the
ChestX-ray14 fixture (real Data_Entry rows, plain files and the NIH Box tar.gz layout) and of the
MIMIC-CXR fixture (DICOMs) run through the real CLI in subprocesses, joining that cluster or
starting their own instance, and every output file is compared with the local executor's build.
Which cluster did the work is read from Ray's own logs: the session folder holds a
`python-core-driver-*_<pid>.log` for every driver that joined it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

# Token authentication, Ray's default for a new instance (the head's token is written to
# ~/.ray/auth_token): a driver that joins by address must ask for it, and this process's Ray
# reads the setting once, when it is imported.
os.environ.setdefault("RAY_AUTH_MODE", "token")
ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")

from mgll_data.build.engine import BuildOptions, build, plan_shards  # noqa: E402
from mgll_data.build.executors import ExecutorSpec, run_tasks  # noqa: E402
from mgll_data.build.pipeline import load_pipeline  # noqa: E402
from mgll_data.build.ray_executor import run_on_ray, shard_batches  # noqa: E402
from mgll_data.build.stages import Task  # noqa: E402
from tests import mimic_fixture  # noqa: E402
from tests.nih_fixture import NihFixture, make_release  # noqa: E402
from tests.ray_cluster import processes_under, ray_env, ray_head, ray_pids  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ROWS_PER_SHARD = 8  # the 41-row fixture makes six shards over two splits
NIH_OPTIONS = ("--image-size", "32", "--rows-per-shard", ROWS_PER_SHARD, "--no-progress")
MIMIC_OPTIONS = ("--image-size", "32", "--rows-per-shard", "3", "--images", "dicom")

# -- the cluster and the reference builds ------------------------------------------------------


@pytest.fixture(scope="module")
def ray_tmp() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="mgll-ray-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(ray_tmp: Path) -> Iterator[tuple[str, Path]]:
    """A two-CPU Ray head in a subprocess: (its address, its session folder)."""
    with ray_head(ray_tmp / "head") as head:
        yield head


@pytest.fixture(scope="module")
def connected(cluster) -> Iterator[None]:
    """This process joined to the cluster: builds here run on it with warm workers."""
    ray.init(address=cluster[0], logging_level="WARNING")
    yield
    ray.shutdown()


def _cli(ray_tmp: Path, *args: object, **env: str) -> subprocess.Popen:
    """Start `mgll-build-dataset ARGS`; the caller waits (its pid tells its Ray logs)."""
    return subprocess.Popen(
        [sys.executable, "-m", "mgll_data", *map(str, args)],
        cwd=REPO,
        env=ray_env(ray_tmp, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen) -> str:
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr + stdout
    return stdout


def _files(out: Path) -> dict[str, bytes]:
    """Every output file but the manifest (it holds timestamps) and the lock."""
    return {
        str(path.relative_to(out)): path.read_bytes()
        for path in sorted(out.rglob("*"))
        if path.is_file() and path.name not in ("manifest.json",) and not path.name.endswith("lock")
    }


def assert_same_build(out: Path, reference: Path) -> None:
    ours, theirs = _files(out), _files(reference)
    assert sorted(ours) == sorted(theirs)
    assert [name for name in theirs if ours[name] != theirs[name]] == []
    assert sum(name.endswith(".parquet") for name in theirs) >= 2


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ray-builds")


@pytest.fixture(scope="module")
def nih(work: Path) -> NihFixture:
    return make_release(work / "nih", count=40, layout="kaggle")


@pytest.fixture(scope="module")
def nih_box(work: Path) -> NihFixture:
    """The NIH Box layout: images in images_00N.tar.gz, streamed by the driver."""
    return make_release(work / "nih-box", count=40, layout="box")


def _local(pipeline: str, root: Path, out: Path, *options: object) -> Path:
    """The reference: the same build with the local executor, through the CLI in this process."""
    from mgll_data.cli import main

    with pytest.raises(SystemExit) as done:
        main(["build", pipeline, "--root", str(root), "--out", str(out), *map(str, options)])
    assert done.value.code in (0, None)
    return out


@pytest.fixture(scope="module")
def nih_local(nih: NihFixture, work: Path) -> Path:
    return _local("chestxray14", nih.root, work / "nih-local", *NIH_OPTIONS)


# -- builds on the cluster ---------------------------------------------------------------------


@pytest.mark.wires("mgll-build-dataset build", "--executor", "--ray-address")
def test_nih_on_a_cluster_is_byte_identical_and_built_by_its_workers(
    nih, nih_local, cluster, ray_tmp, work
):
    address, session = cluster
    out = work / "nih-ray"
    audit = work / "driver-opens.txt"
    # The driver logs each image of the release it opens: on Ray, the cluster's workers do.
    images = str(nih.root / "images_00")  # images_001/, images_002/
    watch = (
        "import sys\n"
        f"log = open({str(audit)!r}, 'w', buffering=1)\n"
        f"sys.addaudithook(lambda e, a: e == 'open' and str(a[0]).startswith({images!r}) "
        "and log.write(str(a[0]) + '\\n'))\n"
        "from mgll_data.cli import main\nmain()\n"
    )
    args = ["build", "chestxray14", "--root", nih.root, "--out", out, *NIH_OPTIONS]
    proc = subprocess.Popen(
        [sys.executable, "-c", watch, *map(str, args), "--executor", "ray", "--ray-address",
         address],
        cwd=REPO, env=ray_env(ray_tmp / "none"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    stdout = _finish(proc)
    assert_same_build(out, nih_local)
    assert "built 37 records" in stdout
    assert proc.pid in ray_pids(session)  # it joined this cluster, as --ray-address said
    assert audit.read_text() == ""  # and decoded no image itself
    assert not (ray_tmp / "none").exists()  # nor started a Ray instance of its own


def test_mimic_dicoms_on_the_cluster_named_by_ray_address(cluster, ray_tmp, work):
    address, session = cluster
    root = mimic_fixture.make_release(work / "mimic")
    reference = _local("mimic_cxr", root, work / "mimic-local", *MIMIC_OPTIONS, "--no-progress")
    out = work / "mimic-ray"
    proc = _cli(
        ray_tmp / "none", "build", "mimic_cxr", "--root", root, "--out", out, *MIMIC_OPTIONS,
        "--no-progress", "--executor", "ray", RAY_ADDRESS=address,
    )  # fmt: skip
    _finish(proc)
    assert_same_build(out, reference)
    assert (reference / "_build" / "quarantine.jsonl").read_text() != ""  # the fixture's bad rows
    assert proc.pid in ray_pids(session)


def test_a_local_build_resumes_on_ray(nih, nih_local, connected, work):
    """The executor is not part of the fingerprint: a local build is finished on Ray."""
    out = work / "nih-resumed"
    shutil.copytree(nih_local, out)
    (out / "data" / "train-00001-of-00005.parquet").unlink()
    options = BuildOptions(
        image_size=32, rows_per_shard=ROWS_PER_SHARD, progress=False, resume=True, executor="ray"
    )
    summary = build(load_pipeline("chestxray14"), nih.root, out, options)
    assert (summary.shards_written, summary.shards_kept) == (1, 5)
    assert_same_build(out, nih_local)


@pytest.mark.wires("mgll-build-dataset build", "--workers")
def test_archives_on_a_local_instance_of_one_worker_the_build_starts_and_stops(
    nih_box, ray_tmp, work
):
    """No address and no RAY_ADDRESS: the build starts a Ray instance of --workers CPUs, and
    stops it. The images come out of tar.gz archives read by the driver and travel inside the
    tasks. (The cluster's builds above use two workers; the reference here uses two processes.)"""
    reference = _local("chestxray14", nih_box.root, work / "nih-box-local", *NIH_OPTIONS,
                       "--workers", "2")  # fmt: skip
    own = ray_tmp / "own"
    out = work / "nih-box-ray"
    proc = _cli(
        own, "build", "chestxray14", "--root", nih_box.root, "--out", out, *NIH_OPTIONS,
        "--executor", "ray", "--workers", 1,
    )  # fmt: skip
    stdout = _finish(proc)
    assert "2 archives read directly" in stdout
    assert_same_build(out, reference)
    session = (own / "ray" / "session_latest").resolve()
    assert proc.pid in ray_pids(session)  # the instance it started
    assert len(ray_pids(session, "worker")) == 1  # of one CPU: one worker process ran every shard
    assert processes_under(session) == []  # stopped when the build ended


# -- a worker dies mid-build -------------------------------------------------------------------

DRIVER = """
import os, signal, sys, time
import ray
address, root, out, fault, marker, victim = sys.argv[1:7]

def kill_once():
    '''In every worker: the first to reach the victim item's task kills its own process.'''
    import mgll_data.build.ray_executor as executor
    run_task = executor.run_task

    def dying(task, ctx):
        if task.item.id == victim:
            try:
                os.rename(marker, f"{marker}.{os.getpid()}")  # only one worker wins the rename
            except FileNotFoundError:
                return run_task(task, ctx)
            os.kill(os.getpid(), signal.SIGKILL)
        return run_task(task, ctx)

    executor.run_task = dying

def stale_mgll():
    '''In every worker: another mgll version, as on a node that was not updated.'''
    import mgll_data
    mgll_data.__version__ = "0.0.0+stale"

def gate():
    '''In every worker: the task of the first shard waits for one of the third shard to run
    (the marker file), giving up after a minute (the marker's ".timeout" file).'''
    import mgll_data.build.ray_executor as executor
    run_task = executor.run_task
    first, third = victim.split(",")

    def gated(task, ctx):
        if task.item.id == first:
            deadline = time.monotonic() + 60
            while not os.path.exists(marker) and time.monotonic() < deadline:
                time.sleep(0.05)
            if not os.path.exists(marker):
                open(f"{marker}.timeout", "w").close()
        elif task.item.id == third:
            open(marker, "w").close()
        return run_task(task, ctx)

    executor.run_task = gated

hook = {"kill": kill_once, "stale": stale_mgll, "gate": gate}[fault]
ray.init(address=address, runtime_env={"worker_process_setup_hook": hook})
# The CLI, on the connection made above (hooks and all), as a user's build runs.
from mgll_data.cli import main
main(["build", "chestxray14", "--root", root, "--out", out, "--image-size", "32",
      "--rows-per-shard", "8", "--no-progress", "--executor", "ray"])
"""


def test_a_worker_killed_mid_build_is_retried_with_identical_output(
    nih, nih_local, cluster, ray_tmp, work
):
    address, _ = cluster
    out = work / "nih-killed"
    marker = work / "kill-marker"
    marker.touch()
    # The first item of the second train shard: the first shard is done or under way.
    second = pq.read_table(nih_local / "data" / "train-00001-of-00005.parquet", columns=["id"])
    victim = second["id"][0].as_py()
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, address, nih.root, out, "kill", marker, victim],
        cwd=REPO, env=ray_env(ray_tmp / "none"), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    killed = [path for path in work.glob("kill-marker.*")]
    assert len(killed) == 1 and not marker.exists()  # one worker took the marker
    assert not psutil.pid_exists(int(killed[0].suffix[1:]))  # and died
    assert_same_build(out, nih_local)


def test_a_worker_with_other_library_versions_stops_the_build(nih, cluster, ray_tmp, work):
    """Byte-identical output needs the driver's versions everywhere: a stale node is refused."""
    from mgll_data import __version__

    address, _ = cluster
    out = work / "nih-stale"
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, address, nih.root, out, "stale", "-", "-"],
        cwd=REPO, env=ray_env(ray_tmp / "none"), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    # Ray's raylet may print lines of its own (a disk-space warning) around the CLI's error.
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mgll-build-dataset")]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith("mgll-build-dataset: error: Ray worker on ")
    assert f": mgll 0.0.0+stale where this machine has {__version__}; " in errors[0]
    assert "Traceback" not in proc.stderr
    assert list((out / "data").glob("*.parquet")) == []  # refused before any shard was written


# -- back-pressure and batching ----------------------------------------------------------------


def _tasks(nih: NihFixture, rows_per_shard: int) -> list[Task]:
    from mgll_data.build.engine import _planned
    from mgll_data.sources import make_source
    from mgll_data.vocab import load_vocabulary

    pipeline = load_pipeline("chestxray14")
    source = make_source(pipeline, nih.root, load_vocabulary(pipeline.domain), {})
    scan = source.scan()
    plans = plan_shards(sorted(scan.items, key=lambda i: i.id), rows_per_shard)
    return list(source.tasks(_planned(plans), scan.archives))


def test_the_driver_holds_a_bounded_window_of_shards(nih, connected):
    """The driver pulls tasks only as results are handed on. With two CPUs at most four shards
    are submitted and not yet handed on (two running, two finished early), so whenever an
    outcome comes out it has read at most five shards' tasks (that outcome's shard too) and
    the first task of the next beyond the outcomes already out: memory stays flat."""
    from mgll_data.build.engine import _context
    from mgll_data.vocab import load_vocabulary

    rows = 2
    pipeline = load_pipeline("chestxray14")
    options = BuildOptions(image_size=32, rows_per_shard=rows)
    ctx = _context(pipeline, load_vocabulary(pipeline.domain), options, nih.root)
    tasks = _tasks(nih, rows_per_shard=rows)
    bound = (2 * 2 + 1) * rows + 1
    assert len(tasks) > 3 * bound
    pulled: list[int] = []

    def counted() -> Iterator[Task]:
        for task in tasks:
            pulled.append(1)
            yield task

    spec = ExecutorSpec("ray", 2, None, rows)
    seen = [(len(pulled), o) for o in run_on_ray(counted(), ctx, spec)]
    assert max(read - out for out, (read, _) in enumerate(seen)) <= bound
    local = list(run_tasks(tasks, ctx, workers=1))
    assert [o.position for _, o in seen] == [o.position for o in local]
    # repr: labels hold NaN, which never equals itself
    assert [repr((o.record, o.quarantine)) for _, o in seen] == [
        repr((o.record, o.quarantine)) for o in local
    ]


def test_a_slow_shard_does_not_idle_the_other_cpus(nih, nih_local, cluster, ray_tmp, work):
    """While the driver waits for the first shard (its outcomes are written first), the CPU
    that finished the second shard goes on to the third: the first shard's task here waits
    until a task of the third has run, which needs that third shard submitted meanwhile."""
    address, _ = cluster
    out = work / "nih-gated"
    marker = work / "gate-marker"
    firsts = [
        pq.read_table(nih_local / "data" / f"train-0000{k}-of-00005.parquet", columns=["id"])
        for k in (0, 2)
    ]
    ids = ",".join(table["id"][0].as_py() for table in firsts)
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, address, nih.root, out, "gate", marker, ids],
        cwd=REPO, env=ray_env(ray_tmp / "none"), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert marker.exists()  # the third shard ran
    assert not Path(f"{marker}.timeout").exists()  # before the first shard's task gave up
    assert_same_build(out, nih_local)


# -- what a fresh worker imports ---------------------------------------------------------------

# A fresh Ray worker (Ray and cloudpickle imported) runs one shard from what the driver sends:
# the remote function and its arguments, pickled. It prints the modules that this imported.
FRESH_WORKER = """
import json, pickle, sys
import cloudpickle, ray
before = set(sys.modules)
run_batch, ctx, batch = pickle.loads(sys.stdin.buffer.read())
_, outcomes = run_batch(ctx, batch)
records = sum(o.record is not None for o in outcomes)
print(json.dumps({"records": records, "modules": sorted(set(sys.modules) - before)}))
"""


def test_a_fresh_worker_imports_no_source_reader_pandas_or_pydicom_for_png_shards(nih):
    """Each Ray worker imports what a shard task needs when it gets its first one, and a build
    pays for that on every worker: of PNGs, it needs no source reader (nor the pandas they
    use) and no DICOM decoder."""
    import cloudpickle

    from mgll_data.build.engine import _context
    from mgll_data.build.ray_executor import _run_batch
    from mgll_data.vocab import load_vocabulary

    pipeline = load_pipeline("chestxray14")
    ctx = _context(
        pipeline, load_vocabulary(pipeline.domain), BuildOptions(image_size=32), nih.root
    )
    batch = next(shard_batches(_tasks(nih, rows_per_shard=8), 8))
    done = subprocess.run(
        [sys.executable, "-c", FRESH_WORKER], input=cloudpickle.dumps((_run_batch, ctx, batch)),
        cwd=REPO, env=ray_env(Path("/nonexistent")), capture_output=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    report = json.loads(done.stdout)
    assert report["records"] >= 4  # the stages ran: PNGs decoded, records built
    modules = set(report["modules"])
    assert "mgll_data.build.stages" in modules  # what it imported is on the list
    assert {"pandas", "pydicom", "mgll_data.imaging.dicom"} & modules == set()
    assert [m for m in modules if m.startswith("mgll_data.sources.chestxray14")] == []


def test_a_batch_never_spans_two_shards_and_archive_runs_are_capped():
    from mgll_data.build.items import ImageRef, RawItem

    def task(split: str, index: int, data: bytes | None = None) -> Task:
        item = RawItem(f"x:{split}{index}", "x", split, ImageRef("p"), labels={})
        return Task((split, index), item, image_bytes=data)

    plain = [task("train", i) for i in range(10)] + [task("test", i) for i in range(3)]
    sizes = [[t.position for t in batch] for batch in shard_batches(plain, 4)]
    assert sizes == [
        [("train", 0), ("train", 1), ("train", 2), ("train", 3)],
        [("train", 4), ("train", 5), ("train", 6), ("train", 7)],
        [("train", 8), ("train", 9)],
        [("test", 0), ("test", 1), ("test", 2)],
    ]
    # archive order: shards interleave, and 10 bytes per task against a 25-byte cap
    streamed = [task("train", i, b"0123456789") for i in (0, 1, 4, 2, 3, 5, 6, 7)]
    batches = [[t.position[1] for t in b] for b in shard_batches(streamed, 4, max_bytes=25)]
    assert batches == [[0, 1], [4], [2, 3], [5, 6], [7]]


def test_without_ray_the_build_refuses_in_one_line(nih, work):
    """A Python where `import ray` fails (sys.modules['ray'] = None)."""
    no_ray = "import sys\nsys.modules['ray'] = None\nfrom mgll_data.cli import main\nmain()\n"
    out = work / "no-ray"
    proc = subprocess.run(
        [sys.executable, "-c", no_ray, "build", "chestxray14", "--root", str(nih.root), "--out",
         str(out), "--executor", "ray"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "mgll-build-dataset: error: --executor ray: Ray is not installed "
        "(pip install 'mgll[ray]', i.e. ray==2.60.0)"
    ]
    assert not out.exists()  # refused before any work


def test_an_address_where_nothing_listens_is_refused_in_one_line(nih, work, ray_tmp):
    port = _free_port()
    out = work / "nowhere"
    proc = _cli(
        ray_tmp / "none", "build", "chestxray14", "--root", nih.root, "--out", out,
        "--executor", "ray", "--ray-address", f"127.0.0.1:{port}",
    )  # fmt: skip
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert stderr.strip().splitlines() == [
        f"mgll-build-dataset: error: Ray cluster at 127.0.0.1:{port}: nothing answers there "
        "(Connection refused)"
    ]
    assert not out.exists()  # refused before any work


def _free_port() -> int:
    """A port that was just free on 127.0.0.1 (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
