"""Every flag of `mgll-build-dataset build`, `demo`, `merge` and `export`, through the CLI.

Each test runs the command line in this process (`mgll_data.cli.main`, the console entry point,
so exit statuses are real) with stdout captured and stderr on a pseudo-terminal, as a user at a
terminal sees it, and checks the effect its flag claims against expectations taken from the
fixtures (real ChestX-ray14 rows, the MIMIC-CXR and APTOS fixtures), not from the code under
test. Builds are shared per module; `--push-to-hub` runs in a subprocess against the fake Hub.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import termios
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from PIL import Image

from mgll_data.cli import main
from mgll_data.publish.inspect import validate_dataset
from mgll_data.record import read_mgll_metadata
from mgll_data.vocab import load_vocabulary
from tests import fundus_fixture, mimic_fixture
from tests.fake_hub import FakeHub
from tests.nih_fixture import NihFixture, make_release

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"


# -- running the CLI ---------------------------------------------------------------------------


@dataclass
class Run:
    """One CLI run: exit status, stdout, and what the terminal (stderr) showed."""

    status: int
    stdout: str
    terminal: str


def cli(*args: object) -> Run:
    """`mgll-build-dataset ARGS` in this process, stderr on a pseudo-terminal."""
    master, slave = os.openpty()
    # 24 rows x 80 columns, as a terminal window has (a new pty has 0 x 0: no room for a bar).
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    received: list[bytes] = []

    def drain() -> None:
        """Read the terminal until its last writer closes it."""
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the terminal's last writer closed it
                return
            if not data:
                return
            received.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    terminal = open(slave, "w", encoding="utf-8", buffering=1)
    stdout = io.StringIO()
    saved = sys.stderr
    sys.stderr = terminal
    try:
        with contextlib.redirect_stdout(stdout):
            try:
                main([str(a) for a in args])
                status = 0
            except SystemExit as done:
                status = int(done.code or 0)
    finally:
        sys.stderr = saved
        terminal.close()
        reader.join(timeout=30)
        os.close(master)
    return Run(status, stdout.getvalue(), b"".join(received).decode("utf-8", "replace"))


def ok(*args: object) -> Run:
    """`cli(*args)`, which must succeed."""
    run = cli(*args)
    assert run.status == 0, run.terminal + run.stdout
    return run


# -- watching which process reads the release (for --workers) ---------------------------------

_WATCH: dict[str, Any] | None = None
_HOOKED = False


def _audit(event: str, args: tuple) -> None:
    """The audit hook: count forks, log reads of files under the watched release."""
    watch = _WATCH
    if watch is None:
        return
    if event == "os.fork":  # raised in the forking (parent) process
        watch["forks"] += 1
    elif event == "open" and isinstance(args[0], str | os.PathLike):
        path, mode, flags = os.fspath(args[0]), args[1], args[2]
        if mode is None:  # os.open: the access mode is in the flags
            reading = flags & os.O_ACCMODE == os.O_RDONLY
        else:
            reading = isinstance(mode, str) and not set(mode) & set("wax+")
        if reading and isinstance(path, str) and path.startswith(watch["prefix"]):
            # Forked workers inherit this hook: each read is appended with the reader's pid.
            fd = os.open(watch["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, f"{os.getpid()}\t{path}\n".encode())
            finally:
                os.close(fd)


@contextlib.contextmanager
def watch_reads(release: Path, log: Path) -> Iterator[dict[str, Any]]:
    """Record forks of this process and every file under `release` opened for reading, with
    the reader's process id (a Python audit hook, inherited by forked workers). Yields
    {"forks": n, "reads": [(pid, path), ...]} (filled in on exit)."""
    global _WATCH, _HOOKED
    if not _HOOKED:
        sys.addaudithook(_audit)  # hooks cannot be removed; it is idle while _WATCH is None
        _HOOKED = True
    seen: dict[str, Any] = {"forks": 0, "reads": []}
    prefixes = tuple({os.path.abspath(release) + os.sep, os.path.realpath(release) + os.sep})
    _WATCH = {"prefix": prefixes, "log": str(log), "forks": 0}
    try:
        yield seen
    finally:
        seen["forks"] = _WATCH["forks"]
        _WATCH = None
        lines = log.read_text().splitlines() if log.exists() else []
        seen["reads"] = [(int(p), path) for p, path in (line.split("\t") for line in lines)]


# -- reading builds --------------------------------------------------------------------------


def rows_of(out: Path) -> dict[str, dict]:
    """Every row of a build (or merge) by id."""
    rows: dict[str, dict] = {}
    for path in sorted((out / "data").rglob("*.parquet")):
        rows.update({r["id"]: r for r in pq.read_table(path).to_pylist()})
    return rows


def shard_rows(out: Path) -> dict[str, int]:
    """Rows per shard file name, from the Parquet footers."""
    return {p.name: pq.ParquetFile(p).metadata.num_rows for p in (out / "data").glob("*.parquet")}


def quarantined(out: Path) -> dict[str, str]:
    """Quarantined item ids and the stage that rejected each."""
    lines = (out / "_build" / "quarantine.jsonl").read_text().splitlines()
    return {json.loads(x)["id"]: json.loads(x)["stage"] for x in lines}


def published(out: Path) -> dict[str, bytes]:
    """README.md and every file under data/ and figures/ of a build, by relative path."""
    files = {"README.md": (out / "README.md").read_bytes()}
    for path in sorted((out / "data").rglob("*")) + sorted((out / "figures").glob("*")):
        if path.is_file():
            files[path.relative_to(out).as_posix()] = path.read_bytes()
    return files


def decoded_size(row: dict) -> tuple[int, int]:
    """(width, height) of a row's stored image, decoded."""
    with Image.open(io.BytesIO(row["image"]["bytes"])) as image:
        return image.size


def check_shard_names(names: list[str], per_shard: dict[str, int], limit: int) -> None:
    """Shards are `{split}-{i:05d}-of-{n:05d}.parquet`, i = 0..n-1, each at most `limit` rows."""
    by_split: dict[str, list[str]] = {}
    for name in names:
        by_split.setdefault(name.split("-")[0], []).append(name)
    for split, members in by_split.items():
        n = len(members)
        assert sorted(members) == [f"{split}-{i:05d}-of-{n:05d}.parquet" for i in range(n)]
    assert all(0 < rows <= limit for rows in per_shard.values()), per_shard


# -- ChestX-ray14: a small release of real Data_Entry rows -----------------------------------

NIH_COUNT = 20
OPTIONS = ("--image-size", "8", "--rows-per-shard", "3")  # those of the reference build


def item_names(fixture: NihFixture) -> list[str]:
    """Image names (no extension) of the rows that pass the scan, sorted: the build's items."""
    scan_stage = {n for n, stage in fixture.bad.items() if stage == "scan"}
    unknown = {n for n, stage in fixture.bad.items() if stage == "labels"}
    names = [r["index"] for r in fixture.rows if r["index"] not in scan_stage | unknown]
    return sorted(n.removesuffix(".png") for n in names)


def cxr_id(name: str) -> str:
    """The record id of a ChestX-ray14 image name."""
    return "chestxray14:" + name.removesuffix(".png")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """One folder for the module's releases and builds."""
    return tmp_path_factory.mktemp("build-flags")


@pytest.fixture(scope="module")
def nih(work) -> NihFixture:
    """21 real Data_Entry rows (4 of them bad) with 16-pixel images, Kaggle layout."""
    return make_release(work / "nih", count=NIH_COUNT, layout="kaggle")


def build_args(nih: NihFixture, out: Path, *extra: object) -> list[object]:
    """`build chestxray14 --root NIH --out OUT EXTRA...`."""
    return ["build", "chestxray14", "--root", nih.root, "--out", out, *extra]


@pytest.fixture(scope="module")
def base(work, nih) -> tuple[Path, Run]:
    """The reference build: 8-pixel images, 3 rows per shard, one process, no bar."""
    out = work / "base"
    run = cli(*build_args(nih, out, *OPTIONS, "--max-errors", "4", "--no-progress"))
    return out, run


@pytest.fixture(scope="module")
def replaced(work, nih, base) -> dict[str, Any]:
    """A copy of the reference build, rebuilt in place with other options: refused without
    --overwrite, then replaced with it (and a progress bar: no --no-progress)."""
    out = work / "replaced"
    shutil.copytree(base[0], out)
    other = ("--image-size", "20", "--image-format", "jpeg", "--rows-per-shard", "100")
    before = published(out)
    refused = cli(*build_args(nih, out, *other, "--limit", "12"))
    after_refusal = published(out)
    done = cli(*build_args(nih, out, *other, "--limit", "12", "--overwrite"))
    return dict(out=out, before=before, refused=refused, after_refusal=after_refusal, done=done)


@pytest.fixture(scope="module")
def workers2(work, nih) -> tuple[Path, dict[str, Any]]:
    """The reference build again with two workers, its reads of the release watched."""
    out = work / "workers2"
    with watch_reads(nih.root, work / "reads-build.log") as seen:
        ok(*build_args(nih, out, *OPTIONS, "--workers", "2", "--no-progress"))
    return out, seen


@pytest.mark.wires("mgll-build-dataset build", "--root", "--out", "--no-progress")
def test_root_and_out_and_no_progress(base, nih, replaced):
    out, run = base
    assert run.status == 0, run.terminal
    assert str(out) in run.stdout
    assert validate_dataset(out) == []
    # The records are the release's good rows; its bad ones are quarantined.
    assert set(rows_of(out)) == {cxr_id(n) for n in nih.good}
    assert quarantined(out) == {cxr_id(n): stage for n, stage in nih.bad.items()}
    # --no-progress: no bar on the terminal; the same kind of build without it shows one.
    assert "build chestxray14" not in run.terminal and "img/s" not in run.terminal
    bar = replaced["done"].terminal
    assert "build chestxray14" in bar and "12/12" in bar, bar


@pytest.mark.wires("mgll-build-dataset build", "--image-size")
def test_image_size_is_the_stored_longest_side(base, replaced, nih):
    wide = cxr_id(nih.rows[9]["index"])  # the fixture's one 24 x 16 image; the others 16 x 16
    # --image-size 8: everything shrinks; 20: the wide one shrinks, 16-pixel ones never grow.
    for out, expected in (
        (base[0], {"wide": (8, 5), "square": (8, 8)}),
        (replaced["out"], {"wide": (20, 13), "square": (16, 16)}),
    ):
        rows = rows_of(out)
        assert wide in rows
        for row_id, row in rows.items():
            size = expected["wide" if row_id == wide else "square"]
            assert decoded_size(row) == (row["width"], row["height"]) == size
            assert (row["orig_width"], row["orig_height"]) == (
                (24, 16) if row_id == wide else (16, 16)
            )


@pytest.mark.wires("mgll-build-dataset build", "--image-format")
def test_image_format_jpeg_stores_jpeg(base, replaced):
    jpeg_rows = rows_of(replaced["out"])
    assert jpeg_rows
    for row_id, row in jpeg_rows.items():
        data = row["image"]["bytes"]
        assert data.startswith(JPEG_SIGNATURE)
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "JPEG" and image.mode == "L"
            image.load()  # decodable to the end
        assert row["image"]["path"] == f"{row_id}.jpg"
    for row_id, row in rows_of(base[0]).items():  # the default stays PNG
        assert row["image"]["bytes"].startswith(PNG_SIGNATURE)
        assert row["image"]["path"] == f"{row_id}.png"


@pytest.mark.wires("mgll-build-dataset build", "--limit")
def test_limit_builds_the_first_items_by_id(replaced, nih):
    out = replaced["out"]
    expected = {cxr_id(n) for n in item_names(nih)[:12]}
    image_stage = {i for i, stage in quarantined(out).items() if stage == "image"}
    assert set(rows_of(out)) | image_stage == expected
    assert not set(rows_of(out)) & image_stage
    manifest = json.loads((out / "_build" / "manifest.json").read_text())
    assert manifest["counts"]["items"] == 12 < len(item_names(nih))


@pytest.mark.wires("mgll-build-dataset build", "--rows-per-shard")
def test_rows_per_shard_cuts_shards(base, replaced):
    per_shard = shard_rows(base[0])
    check_shard_names(sorted(per_shard), per_shard, limit=3)
    train_rows = sum(r["split"] == "train" for r in rows_of(base[0]).values())
    train_shards = [n for n in per_shard if n.startswith("train-")]
    assert train_rows > 3 and len(train_shards) >= math.ceil(train_rows / 3)
    # --rows-per-shard 100: a single shard per split.
    names = sorted(p.name for p in (replaced["out"] / "data").glob("*.parquet"))
    splits = {r["split"] for r in rows_of(replaced["out"]).values()}
    assert names == sorted(f"{s}-00000-of-00001.parquet" for s in splits)


@pytest.mark.wires("mgll-build-dataset build", "--overwrite")
def test_overwrite_is_needed_to_replace_a_build(base, replaced):
    refused = replaced["refused"]
    assert refused.status == 2
    assert "already holds a build" in refused.terminal and "--overwrite" in refused.terminal
    assert replaced["after_refusal"] == replaced["before"]  # untouched
    assert replaced["done"].status == 0, replaced["done"].terminal
    out = replaced["out"]
    old = {p for p in replaced["before"] if p.startswith("data/")}
    new = {p for p in published(out) if p.startswith("data/")}
    assert new and not old & new  # none of the old shards is left
    manifest = json.loads((out / "_build" / "manifest.json").read_text())
    assert manifest["options"]["image_size"] == 20 and manifest["complete"]
    assert validate_dataset(out) == []


@pytest.mark.wires("mgll-build-dataset build", "--workers")
def test_two_workers_give_the_same_bytes_from_two_processes(base, workers2, nih):
    out, seen = workers2
    assert published(out) == published(base[0])
    # The work ran in two forked processes: every image was opened there, none here.
    assert seen["forks"] == 2
    image_reads = [(pid, Path(path).name) for pid, path in seen["reads"] if path.endswith(".png")]
    readers = {pid for pid, _ in image_reads}
    assert readers and os.getpid() not in readers and len(readers) <= 2
    assert set(nih.good) <= {name for _, name in image_reads}


@pytest.mark.wires("mgll-build-dataset build", "--resume", "--max-errors")
def test_max_errors_stops_a_build_and_resume_finishes_it(base, work, nih):
    out = work / "resumed"
    # 4 items of the release are bad: --max-errors 4 passes, 3 stops the build mid-way.
    assert base[1].status == 0 and len(quarantined(base[0])) == 4
    stopped = cli(*build_args(nih, out, *OPTIONS, "--max-errors", "3", "--no-progress"))
    assert stopped.status == 2
    assert "4 items quarantined, more than --max-errors 3" in stopped.terminal
    manifest = json.loads((out / "_build" / "manifest.json").read_text())
    done = sorted(p.name for p in (out / "data").glob("*.parquet"))
    total = sorted(p.name for p in (base[0] / "data").glob("*.parquet"))
    assert not manifest["complete"] and 0 < len(done) < len(total)

    resumed = ok(*build_args(nih, out, *OPTIONS, "--resume", "--no-progress"))
    assert f"shards written {len(total) - len(done)}, kept {len(done)}" in resumed.stdout
    assert published(out) == published(base[0])  # as if never interrupted
    assert not list((out / "_build" / "tmp").iterdir())


# -- source options: MIMIC-CXR and APTOS -----------------------------------------------------

MIMIC_NAME = {v: k for k, v in mimic_fixture.IDS.items()}


def mimic_rows(out: Path) -> dict[str, dict]:
    """Rows of a MIMIC-CXR build by the fixture's image name (A1, B1, ...)."""
    return {MIMIC_NAME[i.split(":", 1)[1]]: r for i, r in rows_of(out).items()}


@pytest.fixture(scope="module")
def mimic(work) -> Path:
    """The MIMIC-CXR + MIMIC-CXR-JPG fixture release."""
    return mimic_fixture.make_release(work / "mimic")


def mimic_build(mimic: Path, out: Path, *extra: object) -> Path:
    """Build the MIMIC-CXR fixture through the CLI with source options `extra`."""
    ok("build", "mimic_cxr", "--root", mimic, "--out", out, "--image-size", "64", "--no-progress",
       *extra)  # fmt: skip
    return out


@pytest.fixture(scope="module")
def mimic_text(work, mimic) -> Path:
    """The MIMIC-CXR fixture built with labels mined from the reports."""
    return mimic_build(mimic, work / "mimic-text", "--labels", "text")


@pytest.mark.wires("mgll-build-dataset build", "--images", "--section-rules")
def test_mimic_dicom_images_and_official_section_rules(work, mimic):
    from tests.test_sections import OFFICIAL_RULES

    rules = work / "section_parser.py"
    rules.write_text(OFFICIAL_RULES)
    out = mimic_build(mimic, work / "mimic-dicom", "--images", "dicom", "--section-rules", rules)
    rows = mimic_rows(out)
    assert sorted(rows) == ["A1", "A2", "B1", "B2", "B3", "C1", "D1", "E1", "E2", "F3"]
    for row in rows.values():
        # DICOMs are 32 x 40 (the JPGs 32 x 32) and leave their whitelisted header in `extra`.
        assert (row["orig_width"], row["orig_height"]) == (32, 40)
        assert json.loads(row["extra"])["dicom"]
    # The user's copy of the official rules: A1's last TECHNIQUE section is its conclusion.
    assert rows["A1"]["text_description"] == "Chest PA and lateral"
    assert json.loads(rows["A1"]["extra"])["report"] == "section_name"


@pytest.mark.wires("mgll-build-dataset build", "--views", "--labels")
def test_mimic_views_and_negbio_labels(work, mimic):
    out = mimic_build(mimic, work / "mimic-views", "--views", "PA,AP", "--labels", "negbio")
    frontal = {
        name
        for name, _s, _st, view, _d, _t, split, case in mimic_fixture.IMAGES
        if view in ("PA", "AP") and split is not None and case == "ok"
    }
    rows = mimic_rows(out)
    assert set(rows) == frontal and {r["view"] for r in rows.values()} == {"PA", "AP"}
    # NegBIO disagrees with CheXpert on s53189527's Edema: 0.0 there, -1.0 in CheXpert.
    names = load_vocabulary("chest_xray").names
    b1 = {n: v for n, v in zip(names, rows["B1"]["labels"], strict=True) if not math.isnan(v)}
    assert b1 == {k: float(v) for k, v in mimic_fixture.NEGBIO["53189527"].items()}
    assert b1["Edema"] == 0.0 and json.loads(rows["B1"]["extra"])["labels_from"] == "negbio"


@pytest.mark.wires("mgll-build-dataset build", "--labels")
def test_mimic_text_labels(mimic_text):
    rows = mimic_rows(mimic_text)
    assert rows and {json.loads(r["extra"])["labels_from"] for r in rows.values()} == {"text"}
    shard = next((mimic_text / "data").glob("*.parquet"))
    meta = read_mgll_metadata(pq.read_schema(shard), str(shard))
    assert meta["annotated_labels"] == load_vocabulary("chest_xray").names  # not the CSV's 14
    # D1's study has CheXpert labels but no report: with text labels there is nothing to mine.
    assert (
        "D1" not in rows
        and "no report text" in (mimic_text / "_build/quarantine.jsonl").read_text()
    )


@pytest.mark.wires("mgll-build-dataset build", "--crop-borders")
def test_crop_borders_removes_the_black_frame(work):
    fixture = fundus_fixture.make_aptos(work / "aptos")
    out = work / "aptos-cropped"
    ok("build", "aptos", "--root", fixture.root, "--out", out, "--image-size", "64",
       "--crop-borders", "--no-progress")  # fmt: skip
    rows = rows_of(out)
    # 002c21358ce6 is 40 x 20, black but for a disc in the box (12, 2)-(28, 18).
    dark = rows["aptos:002c21358ce6"]
    assert 15 <= dark["orig_width"] <= 18 and 15 <= dark["orig_height"] <= 18
    assert (
        decoded_size(dark)
        == (dark["width"], dark["height"])
        == (
            dark["orig_width"],
            dark["orig_height"],
        )
    )


# -- --push-to-hub, --private, --token: the fake Hub in a subprocess ---------------------------

TOKEN = "hf_FLAGStoken0123456789"
ENV_TOKEN = "hf_dummy_env_token"


@pytest.mark.wires("mgll-build-dataset build", "--push-to-hub", "--private", "--token")
def test_build_pushes_privately_with_the_given_token(work, nih):
    out = work / "pushed"
    with FakeHub(tokens=[TOKEN]) as hub:  # the environment's token is unknown there
        env = dict(
            os.environ,
            HF_ENDPOINT=hub.url,
            HF_HUB_DISABLE_XET="1",
            HF_HUB_OFFLINE="0",
            HF_DATASETS_OFFLINE="0",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            HF_HOME=str(work / "hf-home"),
            HF_TOKEN=ENV_TOKEN,
            OMP_NUM_THREADS="1",
            PYTHONPATH=str(ROOT),
        )
        result = subprocess.run(
            [sys.executable, "-m", "mgll_data", *map(str, build_args(nih, out, *OPTIONS)),
             "--no-progress", "--push-to-hub", "org/flags", "--private", "--token", TOKEN],
            env=env, capture_output=True, text=True, cwd=ROOT, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        repo = hub.repos["org/flags"]
        assert repo.private  # --private
        # --token, not the environment's token, went to the Hub (and was never printed).
        assert {r.auth for r in hub.requests} - {""} == {f"Bearer {TOKEN}"}
        assert TOKEN not in result.stdout + result.stderr
        local = {"README.md": (out / "README.md").read_bytes()}
        for path in sorted(out.glob("data/*.parquet")) + sorted(out.glob("figures/*.png")):
            local[path.relative_to(out).as_posix()] = path.read_bytes()
        assert dict(repo.files) == local


# -- demo --------------------------------------------------------------------------------------


def data_entry(out: Path) -> list[str]:
    """The data rows of the Data_Entry CSV a demo wrote under OUT/_raw."""
    return (out / "_raw" / "Data_Entry_2017_v2020.csv").read_text().splitlines()[1:]


DEMO_OPTIONS = ("--n", "5", "--image-size", "16", "--rows-per-shard", "1")


@pytest.fixture(scope="module")
def demo_one(work) -> tuple[Path, dict[str, bytes]]:
    """A demo built in one process, one row per shard, and its published bytes then."""
    out = work / "demo-one"
    ok("demo", "--out", out, *DEMO_OPTIONS, "--no-progress")
    return out, published(out)


@pytest.mark.wires("mgll-build-dataset demo", "--n", "--seed", "--limit", "--image-size",
                   "--image-format", "--rows-per-shard", "--no-progress", "--out")  # fmt: skip
def test_demo_release_and_build_options(work, demo_one):
    out = work / "demo-options"
    run = ok("demo", "--out", out, "--n", "5", "--seed", "3", "--limit", "4", "--image-size", "32",
             "--image-format", "jpeg", "--rows-per-shard", "2", "--no-progress")  # fmt: skip
    release = data_entry(out)
    assert len(release) == 5  # --n
    assert data_entry(demo_one[0]) != release  # --seed: not the release of seed 0 (and --n 5)
    names = sorted(line.split(",")[0].removesuffix(".png") for line in release)
    rows = rows_of(out)
    assert set(rows) == {f"chestxray14:{n}" for n in names[:4]}  # --limit
    for row_id, row in rows.items():
        assert (row["orig_width"], row["orig_height"]) == (1024, 1024)  # the release's images
        assert decoded_size(row) == (row["width"], row["height"]) == (32, 32)
        assert row["image"]["bytes"].startswith(JPEG_SIGNATURE)
        assert row["image"]["path"] == f"{row_id}.jpg"
    per_shard = shard_rows(out)
    check_shard_names(sorted(per_shard), per_shard, limit=2)
    for split in {r["split"] for r in rows.values()}:
        in_split = sum(r["split"] == split for r in rows.values())
        assert sum(n.startswith(f"{split}-") for n in per_shard) == math.ceil(in_split / 2)
    assert "build chestxray14" not in run.terminal  # --no-progress
    assert validate_dataset(out) == []


@pytest.mark.wires("mgll-build-dataset demo", "--workers", "--no-progress")
def test_demo_two_workers_same_bytes_and_a_bar_by_default(work, demo_one):
    out = work / "demo-two"
    log = work / "reads-demo.log"
    # The demo writes its release under OUT/_raw: watch the reads there.
    (out / "_raw").mkdir(parents=True)
    with watch_reads(out / "_raw", log) as seen:
        run = ok("demo", "--out", out, *DEMO_OPTIONS, "--workers", "2")
    assert published(out) == demo_one[1]
    assert seen["forks"] == 2  # the two workers (the release is written in this process)
    image_reads = [(pid, Path(path).name) for pid, path in seen["reads"] if path.endswith(".png")]
    readers = {pid for pid, _ in image_reads}
    assert readers and os.getpid() not in readers and len(readers) <= 2
    assert len({name for _, name in image_reads}) == 5
    assert "build chestxray14" in run.terminal and "5/5" in run.terminal  # default: a bar


@pytest.mark.wires("mgll-build-dataset demo", "--resume")
def test_demo_resume_keeps_finished_shards(work, demo_one):
    # Rewind the demo build (in place: the paths of its release are part of its fingerprint) to
    # the state an interrupted build leaves: the last two shards and their states not yet
    # written, the manifest not complete.
    out, whole = demo_one
    shards = sorted((out / "data").glob("*.parquet"))
    for shard in shards[-2:]:
        shard.unlink()
        (out / "_build" / "shards" / f"{shard.name}.json").unlink()
    manifest_path = out / "_build" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps(dict(manifest, complete=False)))
    run = ok("demo", "--out", out, *DEMO_OPTIONS, "--resume", "--no-progress")
    assert f"shards written 2, kept {len(shards) - 2}" in run.stdout
    assert published(out) == whole


@pytest.mark.wires("mgll-build-dataset demo", "--learnable")
def test_demo_learnable_builds_the_controlled_task(work):
    out = work / "demo-learnable"
    ok("demo", "--learnable", "--out", out, "--n", "20", "--no-progress")
    assert (out / "_raw" / "reports.jsonl").is_file()
    rows = rows_of(out)
    assert len(rows) == 20
    assert {r["source"] for r in rows.values()} == {"learnable"}
    assert {(r["width"], r["height"]) for r in rows.values()} == {(64, 64)}
    abnormal = [r for r in rows.values() if r["positive_labels"] != ["No Finding"]]
    assert abnormal
    assert all(r["text_origin"][1:] == ["learnable_report", "learnable_findings"] for r in abnormal)


# -- merge -------------------------------------------------------------------------------------


@pytest.mark.wires("mgll-build-dataset merge", "--out", "--overwrite")
def test_merge_out_and_overwrite(work, base, replaced, mimic_text):
    out = work / "merged"
    ok("merge", base[0], mimic_text, "--out", out)
    for source, build in (("chestxray14", base[0]), ("mimic_cxr", mimic_text)):
        for shard in (build / "data").glob("*.parquet"):
            assert (out / "data" / source / shard.name).read_bytes() == shard.read_bytes()
    assert validate_dataset(out) == []

    before = published(out)
    refused = cli("merge", replaced["out"], mimic_text, "--out", out)
    assert refused.status == 2 and "use --overwrite" in refused.terminal
    assert published(out) == before

    ok("merge", replaced["out"], mimic_text, "--out", out, "--overwrite")
    merged = sorted(p.name for p in (out / "data" / "chestxray14").iterdir())
    assert merged == sorted(p.name for p in (replaced["out"] / "data").glob("*.parquet"))
    assert validate_dataset(out) == []


# -- export ------------------------------------------------------------------------------------


def tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    """A webdataset tar's samples: key -> {extension: bytes}."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


@pytest.mark.wires("mgll-build-dataset export", "--format", "--out", "--samples-per-tar", "--split")
def test_export_webdataset_one_split_in_small_tars(work, base):
    dest = work / "wds"
    ok("export", base[0], "--format", "webdataset", "--out", dest, "--samples-per-tar", "2",
       "--split", "train")  # fmt: skip
    rows = rows_of(base[0])
    train = [r for r in rows.values() if r["split"] == "train"]
    assert any(r["split"] == "validation" for r in rows.values())  # there, but not exported
    tars = sorted(p.name for p in dest.iterdir())
    assert tars == [f"train-{i:06d}.tar" for i in range(math.ceil(len(train) / 2))]
    seen = {}
    for name in tars:
        samples = tar_samples(dest / name)
        assert 1 <= len(samples) <= 2
        seen.update(samples)
    assert len(seen) == len(train)
    for sample in seen.values():
        meta = json.loads(sample["json"])
        assert set(sample) == {"json", "png", "txt"}
        assert sample["png"] == rows[meta["id"]]["image"]["bytes"]
        assert sample["txt"].decode() == rows[meta["id"]]["text_description"]


@pytest.mark.wires("mgll-build-dataset export", "--format", "--list-name", "--out")
def test_export_mgll_json_with_a_list_name(work, base):
    dest = work / "mgll-json"
    ok("export", base[0], "--format", "mgll-json", "--out", dest, "--list-name", "flag_list")
    rows = rows_of(base[0])
    assert sorted(p.name for p in dest.glob("*.txt")) == [
        "flag_list_train.txt",
        "flag_list_val.txt",
    ]
    count = 0
    for suffix, split in (("train", "train"), ("val", "validation")):
        line = (dest / f"flag_list_{suffix}.txt").read_text().strip()
        assert line == f"/json/flag_list_{suffix}.json"
        records = json.loads((dest / line[1:]).read_text())
        assert {r["id"] for r in records} == {i for i, r in rows.items() if r["split"] == split}
        count += len(records)
    assert count == len(rows) == len(list(dest.rglob("*.npz")))


@pytest.mark.wires("mgll-build-dataset export", "--overwrite")
def test_export_overwrite_is_needed_to_replace(work, base):
    dest = work / "export-again"
    ok("export", base[0], "--format", "webdataset", "--out", dest)
    before = sorted(p.name for p in dest.iterdir())
    assert before == ["train-000000.tar", "validation-000000.tar"]
    refused = cli("export", base[0], "--format", "mgll-json", "--out", dest)
    assert refused.status == 2 and "use --overwrite" in refused.terminal
    assert sorted(p.name for p in dest.iterdir()) == before
    ok("export", base[0], "--format", "mgll-json", "--out", dest, "--overwrite")
    assert not list(dest.glob("*.tar")) and (dest / "2level_multi_disease_list_train.txt").is_file()
