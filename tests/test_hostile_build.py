"""Hostile inputs never stop a build: each becomes one quarantine entry with its reason, and every
good item next to it is still built.

Three releases (a ChestX-ray14 one of real Data_Entry rows, a MIDRC Data Commons download and a
RICORD-1c download, from the shared fixtures) receive the hostile files: a 30000 x 30000 PNG
(about 110 KB, its pixels are never decoded), a FIFO, a socket, symlinks that leave the release
(to a file, to /dev/zero, to a folder), zip members over the size cap (2 GiB declared from 2 MB),
over the ratio cap, lying about their size, nested bombs and zips nested too deep, macOS
`__MACOSX/` and AppleDouble `._x` twins that are valid DICOMs (so a reader that took them would
show extra records), a DICOM whose header says 30000 x 30000, and a second file with another
image's SOPInstanceUID. Each release is built once through `mgll-build-dataset build` in a
subprocess (`--workers 1`), which reports its own peak memory (VmHWM) as it exits.
"""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import subprocess
import sys
import tarfile
import threading
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mgll_data.build.items import ImageRef, RawItem
from mgll_data.cli import main
from mgll_data.errors import ItemError
from mgll_data.imaging.files import open_release_file
from mgll_data.sources.base import stream_archives
from tests import midrc_fixture
from tests.midrc_fixture import add_ricord_duplicate, make_commons, make_ricord, series_folder
from tests.nih_fixture import make_release

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20
BOMB_REASON = "image is 30000x30000 = 900 MP, over the 50 MP limit (--max-image-pixels)"


# -- hostile files, generated small ------------------------------------------------------------


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A valid 1-bit PNG of width x height black pixels: 110 KB on disk, 900 MP decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    rows = bytes(1 + (width + 7) // 8) * 1000  # filter byte + packed bits, 1000 rows at a time
    deflate = zlib.compressobj(9)
    body = b"".join(deflate.compress(rows) for _ in range(height // 1000)) + deflate.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    )


def zero_deflate(mebibytes: int) -> bytes:
    """A raw deflate stream of `mebibytes` MiB of zeros, made from one repeated 1 KB block (after
    a full flush a block does not refer back, so copies of it concatenate)."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    deflate.compress(bytes(MIB))
    block = deflate.flush(zlib.Z_FULL_FLUSH)
    return block * mebibytes + deflate.flush(zlib.Z_FINISH)


def raw_zip(members: list[tuple[str, bytes, int, int]]) -> bytes:
    """A zip of (name, raw deflate data, crc32, declared size) members, written by hand because
    zipfile cannot store ready-made (or lying) deflate data."""
    local, central = io.BytesIO(), io.BytesIO()
    for name, data, crc, size in members:
        encoded = name.encode()
        offset = local.tell()
        local.write(
            struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 33, crc, len(data), size,
                        len(encoded), 0) + encoded + data
        )  # fmt: skip
        central.write(
            struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 33, crc, len(data),
                        size, len(encoded), 0, 0, 0, 0, 0, offset) + encoded
        )  # fmt: skip
    directory = central.getvalue()
    end = struct.pack(
        "<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(directory), local.tell(), 0
    )
    return local.getvalue() + directory + end


def plain(name: str, data: bytes) -> tuple[str, bytes, int, int]:
    """An honest member for `raw_zip`."""
    deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
    return name, deflate.compress(data) + deflate.flush(), zlib.crc32(data), len(data)


def nest(depth: int, name: str, data: bytes) -> bytes:
    """`data` as member `name` inside `depth` zips, each the only member of the next."""
    blob = midrc_fixture._zip({name: data})
    for level in range(depth - 1):
        blob = midrc_fixture._zip({f"level{level}.zip": blob})
    return blob


# -- building through the CLI, with the peak memory of the build process ----------------------


@dataclass
class Built:
    """One release built by the CLI: exit status, stderr, peak RSS, records and quarantine."""

    root: Path
    out: Path
    status: int
    stderr: str
    peak_rss: int  # bytes
    rows: list[dict]
    quarantine: list[dict]

    def reasons(self) -> list[str]:
        return sorted(q["reason"] for q in self.quarantine)

    def entry(self, reason_start: str) -> dict:
        found = [q for q in self.quarantine if q["reason"].startswith(reason_start)]
        assert len(found) == 1, (reason_start, self.reasons())
        return found[0]


# Runs the CLI and writes its peak resident memory (bytes) to the file named by argv[1] at exit.
# VmHWM belongs to the process's own address space, made new by exec: unlike the ru_maxrss of
# `wait4`, it does not start from the RSS of the (large) pytest process that launched it.
_PEAK_CLI = """
import atexit, sys
def _peak(path=sys.argv.pop(1)):
    kib = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    open(path, "w").write(str(kib * 1024))
atexit.register(_peak)
from mgll_data.cli import main
main(sys.argv[1:])
"""


def cli_build(pipeline: str, root: Path, out: Path, *flags: str, timeout: float = 300) -> Built:
    """`mgll-build-dataset build` in a subprocess; a build that blocks is killed at `timeout`."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    peak_file = out.parent / f"{out.name}.peak"
    command = [sys.executable, "-c", _PEAK_CLI, str(peak_file), "build", pipeline,
               "--root", str(root),
               "--out", str(out), "--workers", "1", "--image-size", "32", "--no-progress",
               *flags]  # fmt: skip
    log = out.parent / f"{out.name}.stderr"
    with open(log, "w") as stderr:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr
        )
        watchdog = threading.Timer(timeout, process.kill)
        watchdog.start()
        try:
            process.wait()
        finally:
            watchdog.cancel()
    rows = [r for p in sorted(out.glob("data/*.parquet")) for r in pq.read_table(p).to_pylist()]
    quarantine_file = out / "_build" / "quarantine.jsonl"
    quarantine = [json.loads(line) for line in quarantine_file.read_text().splitlines()]
    peak = int(peak_file.read_text()) if peak_file.exists() else -1  # -1: killed
    return Built(root, out, process.returncode, log.read_text(), peak, rows, quarantine)


# -- the releases -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> Path:
    """Files outside every release that symlinks point to (never to be read)."""
    folder = tmp_path_factory.mktemp("outside")
    Image.new("L", (16, 16), 200).save(folder / "outside.png")
    (folder / "images").mkdir()
    (folder / "outside.dcm").write_bytes(midrc_fixture.ricord_dicom("O", "R3a"))
    return folder


@pytest.fixture(scope="module")
def nih(tmp_path_factory, outside):
    """ChestX-ray14 (extracted layout): six good images replaced by hostile files."""
    root = tmp_path_factory.mktemp("hostile-nih") / "raw"
    fixture = make_release(root, count=18, layout="extracted")
    names = [r["index"] for r in fixture.rows]
    victims = [n for n in names[10:] if n in fixture.good][:6]
    assert len(victims) == 6
    images = root / "images"
    bomb, fifo, sock, link, zero, moved = (images / name for name in victims)
    bomb.write_bytes(png_bomb())
    for path in (fifo, sock, link, zero, moved):
        path.unlink()
    os.mkfifo(fifo)
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock))
    server.close()  # the socket file stays
    link.symlink_to(outside / "outside.png")
    zero.symlink_to("/dev/zero")
    # A folder symlink out of the release that holds a wanted image: the walk must not enter it.
    Image.new("L", (16, 16), 90).save(outside / "images" / moved.name)
    (root / "images_002").symlink_to(outside / "images", target_is_directory=True)
    out = tmp_path_factory.mktemp("hostile-nih-out") / "out"
    built = cli_build("chestxray14", root, out)
    hostile = dict(zip(("bomb", "fifo", "socket", "link", "zero", "moved"), victims, strict=True))
    good = {n for n in fixture.good if n not in victims}
    return built, hostile, good


def _ids(built: Built) -> set[str]:
    return {row["id"] for row in built.rows}


def _quarantined(built: Built, source: str, name: str) -> dict:
    image_id = f"{source}:{Path(name).stem}"
    entries = [q for q in built.quarantine if q["id"] == image_id]
    assert len(entries) == 1, (name, built.reasons())
    return entries[0]


def test_nih_build_finishes_and_builds_every_good_image(nih):
    built, _, good = nih
    assert built.status == 0, built.stderr
    assert _ids(built) == {f"chestxray14:{Path(n).stem}" for n in good}


def test_png_bomb_is_quarantined_from_its_header(nih):
    built, hostile, _ = nih
    entry = _quarantined(built, "chestxray14", hostile["bomb"])
    assert (entry["stage"], entry["reason"]) == ("image", BOMB_REASON)


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("fifo", "not a regular file (a FIFO)"),
        ("socket", "not a regular file (a socket)"),
        ("link", "symlink leaves the release folder"),
        ("zero", "symlink leaves the release folder"),
    ],
)
def test_special_files_are_quarantined_unread(nih, case, reason):
    built, hostile, _ = nih
    entry = _quarantined(built, "chestxray14", hostile[case])
    assert (entry["stage"], entry["reason"]) == ("image", reason)


def test_walk_does_not_follow_a_folder_symlink_out_of_the_release(nih):
    built, hostile, _ = nih
    entry = _quarantined(built, "chestxray14", hostile["moved"])
    # Not found by the walk, so looked for at its default place, where it is not.
    assert entry["reason"].startswith("missing image file: ")


def test_a_device_is_not_a_regular_file():
    with pytest.raises(ItemError, match=r"^not a regular file \(a character device\)$"):
        open_release_file("/dev/null")


@pytest.mark.wires("mgll-build-dataset build", "--max-image-pixels")
def test_max_image_pixels_sets_the_limit(nih, tmp_path):
    built, _, good = nih
    out = tmp_path / "small-limit"
    # The fixture's images are 16x16 (256 px) except one of 24x16 (384 px).
    with pytest.raises(SystemExit) as status:
        main(["build", "chestxray14", "--root", str(built.root), "--out", str(out),
              "--image-size", "32", "--no-progress", "--max-image-pixels", "300"])  # fmt: skip
    assert status.value.code == 0
    lines = (out / "_build/quarantine.jsonl").read_text().splitlines()
    over = [json.loads(x) for x in lines if "limit" in x]
    assert [q["reason"] for q in over] == [
        "image is 24x16 = 0.00038 MP, over the 0.0003 MP limit (--max-image-pixels)",
        BOMB_REASON.replace("the 50 MP", "the 0.0003 MP"),
    ]
    rows = [r for p in sorted(out.glob("data/*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert len(rows) == len(good) - 1


@pytest.fixture(scope="module")
def commons(tmp_path_factory):
    """The Data Commons fixture plus one study zip full of bombs and macOS clutter."""
    root = make_commons(tmp_path_factory.mktemp("hostile-commons"))
    study = midrc_fixture.DC_STUDY["C2"]
    c2 = dict(StudyInstanceUID=study, StudyDescription=midrc_fixture.EXAM["C2"])
    twin = midrc_fixture.ricord_dicom("M1", "R3a", **c2)  # valid DICOMs of study C2
    huge = midrc_fixture.ricord_dicom("M3", "R3a", **c2, Rows=30000, Columns=30000)
    two_gib = zero_deflate(2048)
    crc_two_gib = 0x4DBDF21C  # zlib.crc32 of 2 GiB of zeros
    ratio_bomb = zero_deflate(64)
    crc_64 = zlib.crc32(bytes(64 * MIB))
    members = [
        ("s/bomb.dcm", two_gib, crc_two_gib, 2048 * MIB),
        ("s/ratio.dcm", ratio_bomb, crc_64, 64 * MIB),
        ("s/lie.dcm", two_gib, crc_two_gib, 4096),  # declares 4 KB, inflates to 2 GiB
        plain("s/huge.dcm", huge),
        plain("__MACOSX/s/._J.dcm", twin),
        plain("s/._K.dcm", midrc_fixture.ricord_dicom("M2", "R3a", **c2)),
        plain("nested/outer.zip", nest(2, "deep.dcm", bytes(64 * MIB))),
        plain("deep/1.zip", nest(6, "1.dcm", twin)),
    ]
    folder = root / "downloads" / midrc_fixture.CASES["C2"]
    (folder / "hostile.zip").write_bytes(raw_zip(members))
    out = tmp_path_factory.mktemp("hostile-commons-out") / "out"
    return cli_build("midrc_commons", root, out)


def _descriptions(built: Built) -> list[str]:
    return sorted(row["text_description"] for row in built.rows)


def test_commons_build_finishes_and_builds_every_good_image(commons):
    assert commons.status == 0, commons.stderr
    # C1: three images (top level, nested, doubly nested), C2: one (the __MACOSX and ._ twins
    # would add two), C4: one.
    assert _descriptions(commons) == ["CHEST 1V"] + ["XR CHEST 1 VIEW AP"] * 3 + ["XR CHEST 2V PA"]


def test_zip_members_over_the_caps_are_quarantined(commons):
    declared = commons.entry("zip member declares")
    assert declared["reason"] == "zip member declares 2.0 GiB, over the 256.0 MiB cap"
    ratios = [q for q in commons.quarantine if "ratio cap" in q["reason"]]
    assert len(ratios) == 2  # s/ratio.dcm, and deep.dcm inside nested/outer.zip/level0.zip
    for entry in ratios:
        assert entry["stage"] == "scan"
        assert entry["reason"].endswith("to 64.0 MiB), over the 100x ratio cap (a zip bomb?)")
    lying = commons.entry("zip member unreadable")
    assert "Bad CRC-32" in lying["reason"] and "lie.dcm" not in lying["reason"]


def test_zips_nested_too_deep_are_quarantined(commons):
    assert commons.entry("zip nested")["reason"] == "zip nested deeper than 4 levels"


def test_dicom_over_the_pixel_limit_is_quarantined_from_its_header(commons):
    assert commons.entry("image is")["reason"] == BOMB_REASON


def test_build_with_bombs_stays_under_1_gb(nih, commons):
    built, _, _ = nih
    # The 2 GiB members and the 900 MP PNG, decoded, would each exceed this on their own.
    peaks = (built.peak_rss, commons.peak_rss)
    assert 100 * 2**20 < min(peaks) and max(peaks) < 1024**3, peaks  # measured, and bounded


@pytest.fixture(scope="module")
def ricord(tmp_path_factory, outside):
    """RICORD-1c with a duplicate SOPInstanceUID, an AppleDouble twin, a FIFO, a symlink out of
    the release and a 30000 x 30000 DICOM header."""
    base = make_ricord(tmp_path_factory.mktemp("hostile-ricord"))
    add_ricord_duplicate(base)
    (series_folder(base, "R1a") / "._1-1.dcm").write_bytes(
        midrc_fixture.ricord_dicom("T", "R1a")  # a valid DICOM: taken, it would be a record
    )
    r3 = series_folder(base, "R3a")
    os.mkfifo(r3 / "1-4.dcm")
    (r3 / "1-5.dcm").symlink_to(outside / "outside.dcm")
    (r3 / "1-6.dcm").write_bytes(midrc_fixture.ricord_dicom("H", "R3a", Rows=30000, Columns=30000))
    out = tmp_path_factory.mktemp("hostile-ricord-out") / "out"
    return cli_build("midrc_ricord", base, out)


def test_ricord_builds_the_four_distinct_good_images(ricord):
    assert ricord.status == 0, ricord.stderr
    # A and B (study R1: not the ._ twin), C (R2), D (R3).
    descriptions = _descriptions(ricord)
    assert descriptions == ["CHEST 1V"] * 2 + ["XR CHEST 1 VIEW AP"] * 2


def test_duplicate_uid_keeps_the_first_file_and_quarantines_the_duplicate(ricord):
    entry = ricord.entry("duplicate id")
    assert entry["path"] == "metadata.csv row 4 file 3"  # 1-3.dcm, the flat-field duplicate
    kept = [r for r in ricord.rows if r["id"] == entry["id"]]
    assert len(kept) == 1
    pixels = np.asarray(Image.open(io.BytesIO(kept[0]["image"]["bytes"])))
    assert pixels.std() > 10  # image C's chest phantom, not the duplicate's flat field


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("metadata.csv row 5 file 2", "not a regular file (a FIFO)"),
        ("metadata.csv row 5 file 3", "symlink leaves the release folder"),
        ("metadata.csv row 5 file 4", BOMB_REASON),
    ],
)
def test_ricord_special_files_and_pixel_limit(ricord, path, reason):
    entries = [q for q in ricord.quarantine if q["path"] == path]
    assert [(q["stage"], q["reason"]) for q in entries] == [("image", reason)]


def test_zip_reading_skips_macos_clutter():
    from mgll_data.sources.archives import members

    blob = midrc_fixture._zip(
        {"__MACOSX/a/._1.dcm": b"x", "a/._1.dcm": b"x", "a/.DS_Store": b"x", "a/1.dcm": b"x"}
    )
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        assert [info.filename for info in members(archive)] == ["a/1.dcm"]


def test_wide_images_rescale_in_row_blocks_across_the_whole_image():
    from mgll_data.imaging.raster import rescale_to_8bit

    # 600 rows: more than two row blocks. 1000 is the minimum, 3000 the maximum, 2000 halfway.
    values = np.full((600, 7), 2000, dtype=np.uint16)
    values[0], values[299], values[599] = 1000, 3000, 1000
    out = np.asarray(rescale_to_8bit(Image.fromarray(values)))
    assert out.dtype == np.uint8 and out.shape == (600, 7)
    assert (out[0] == 0).all() and (out[299] == 255).all() and (out[599] == 0).all()
    assert (out[300:599] == 128).all() and (out[1:299] == 128).all()


def test_tar_members_over_the_size_cap_are_quarantined_unread(tmp_path):
    """A tar(.gz) member is read only when its header's size is under the cap (a tar header
    states the true size); the oversized one becomes an error task, its neighbour is read."""
    archive = tmp_path / "images_001.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, size in (("images/big.png", 5000), ("images/small.png", 700)):
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, io.BytesIO(bytes(size)))
    wanted = [
        (("train", k), RawItem(name, "chestxray14", "train", ImageRef("", name), {}))
        for k, name in enumerate(("big.png", "small.png", "absent.png"))
    ]
    tasks = {t.item.id: t for t in stream_archives([archive], wanted, max_member_bytes=1000)}
    assert (
        tasks["big.png"].error
        == "archive member is 5,000 bytes, over the 1,000-byte cap for one image"
    )
    assert tasks["big.png"].image_bytes is None
    assert tasks["small.png"].error is None and tasks["small.png"].image_bytes == bytes(700)
    assert tasks["absent.png"].error == "image found in no archive"


def _deflated_dicom(pixel_bytes: int) -> bytes:
    """A Deflated Explicit VR Little Endian DICOM whose pixel data is `pixel_bytes` zeros (a
    few KB on disk however large), written by pydicom so that its header is real."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import DeflatedExplicitVRLittleEndian, SecondaryCaptureImageStorage

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    side = int((pixel_bytes // 2) ** 0.5)
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = side, side, 16, 16, 15
    ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(side * side * 2)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    assert pydicom.dcmread(io.BytesIO(data)).Rows == side  # a valid file
    return data


def test_a_deflated_dicom_is_refused_before_it_inflates_past_the_cap():
    """pydicom inflates a deflated data set whole; the reader inflates at most the cap first."""
    from mgll_data.imaging.dicom import read_dataset

    bomb = _deflated_dicom(4 * MIB)  # 4 MiB of pixels from about 4 KB on disk
    assert len(bomb) < 64 * 1024
    with pytest.raises(ItemError, match=r"deflated DICOM data set inflates past 1 MB"):
        read_dataset(bomb, max_bytes=1_000_000)
    assert read_dataset(bomb, max_bytes=8 * MIB).Rows == 1448  # within the cap: read as before
