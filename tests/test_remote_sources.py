"""Every source reads its release from object storage as it reads it from disk.

Each source's test fixture (the same layouts, quirks and hostile files its own tests use) is
built twice in this process: from its folder, and from a copy uploaded to a real S3 API (moto's
server, `tests/s3_server.py`). The two builds must agree byte for byte: shards, card, figures,
quarantine and shard states; the manifest up to its timestamps and fingerprint (local files are
identified by size and mtime, remote ones by size and ETag). Archives (tar.gz, zip, xlsx) are
read from the bucket in place, never downloaded whole.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

s3fs = pytest.importorskip("s3fs", reason="s3fs is not installed (pip install -e '.[test]')")
pytest.importorskip("moto", reason="moto is not installed (pip install -e '.[test]')")

from mgll_data.cli import main  # noqa: E402
from tests import (  # noqa: E402
    benchmark_fixture,
    fundus_fixture,
    iu_fixture,
    midrc_fixture,
    mimic_fixture,
    nih_fixture,
    segmentation_fixture,
)
from tests.s3_server import BUCKET, KEY_ID, SECRET, moto_s3  # noqa: E402
from tests.test_covidx import make_two_class  # noqa: E402
from tests.test_object_cxr import make_object_cxr  # noqa: E402
from tests.test_padchest import make_chosen_release  # noqa: E402

# name -> (pipeline, fixture maker, extra build flags): every source, each archive layout.
RELEASES: dict[str, tuple[str, Callable[[Path], object], tuple[str, ...]]] = {
    "nih-kaggle": ("chestxray14", lambda r: nih_fixture.make_release(r, 30, "kaggle"), ()),
    "nih-box": ("chestxray14", lambda r: nih_fixture.make_release(r, 30, "box", "v2017"), ()),
    "nih-google": ("chestxray14", benchmark_fixture.make_nih_with_relabels, ("--labels", "google")),
    "mimic-jpg": ("mimic_cxr", mimic_fixture.make_release, ()),
    "mimic-dicom": ("mimic_cxr", mimic_fixture.make_release, ("--images", "dicom")),
    "mimic-independent": (
        "mimic_cxr",
        mimic_fixture.make_independent_release,
        ("--labels", "text"),
    ),
    "midrc-ricord": ("midrc_ricord", midrc_fixture.make_ricord, ()),
    "midrc-commons": ("midrc_commons", midrc_fixture.make_commons, ()),
    "iu-tgz": ("iu_xray", lambda r: iu_fixture.make_release(r, "tgz"), ()),
    "iu-extracted": ("iu_xray", lambda r: iu_fixture.make_release(r, "extracted"), ()),
    "chexpert": ("chexpert", benchmark_fixture.make_chexpert, ()),
    "vindr": ("vindr_cxr", benchmark_fixture.make_vindr, ()),
    "siim": ("siim_acr", segmentation_fixture.make_siim, ()),
    "rsna": ("rsna_pneumonia", segmentation_fixture.make_rsna, ()),
    "padchest": ("padchest", make_chosen_release, ()),
    "covidx": ("covidx", make_two_class, ()),
    "object-cxr": ("object_cxr", make_object_cxr, ()),
    "odir-xlsx": ("odir", fundus_fixture.make_odir_official, ()),
    "odir-kaggle": ("odir", fundus_fixture.make_odir_kaggle, ()),
    "rfmid": ("rfmid", fundus_fixture.make_rfmid, ()),
    "aptos": ("aptos", fundus_fixture.make_aptos, ()),
    "eyepacs": ("eyepacs", fundus_fixture.make_eyepacs, ()),
    "idrid": ("idrid", fundus_fixture.make_idrid, ("--crop-borders",)),
    "messidor2": ("messidor2", fundus_fixture.make_messidor2, ()),
}
OPTIONS = ("--image-size", "32", "--rows-per-shard", "16", "--no-progress", "--workers", "1")
# Manifest fields that differ between any two builds (times) or by where files live.
VOLATILE = ("started_at", "finished_at", "fingerprint")


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> Iterator[dict]:
    with moto_s3(tmp_path_factory.mktemp("moto")) as options:
        yield options


def _build(*args: object) -> None:
    with pytest.raises(SystemExit) as done:
        main([str(a) for a in args])
    assert done.value.code in (0, 1), f"build failed: {done.value.code}"  # 1: quarantined items


def _files(out: Path) -> dict[str, bytes]:
    return {
        path.relative_to(out).as_posix(): path.read_bytes()
        for path in sorted(out.rglob("*"))
        if path.is_file() and not path.name.startswith(".")
    }


@pytest.mark.parametrize("name", sorted(RELEASES))
def test_a_release_in_a_bucket_builds_the_bytes_of_its_folder(name, s3, tmp_path, capsys):
    pipeline, make, flags = RELEASES[name]
    raw = tmp_path / "raw"
    make(raw)
    s3fs.S3FileSystem(**s3).put(f"{raw}/", f"{BUCKET}/{name}/", recursive=True)
    local, remote = tmp_path / "local", tmp_path / "remote"
    _build("build", pipeline, "--root", raw, "--out", local, *OPTIONS, *flags)
    capsys.readouterr()
    _build("build", pipeline, "--root", f"s3://{BUCKET}/{name}", "--out", remote, *OPTIONS,
           *flags, "--storage-options", json.dumps(s3))  # fmt: skip
    log = capsys.readouterr()

    ours, theirs = _files(remote), _files(local)
    assert sorted(ours) == sorted(theirs)
    assert any(path.startswith("data/") for path in theirs)
    manifest = "_build/manifest.json"
    assert [path for path in theirs if path != manifest and ours[path] != theirs[path]] == []
    ours_m, theirs_m = json.loads(ours[manifest]), json.loads(theirs[manifest])
    assert {k: v for k, v in ours_m.items() if k not in VOLATILE} == {
        k: v for k, v in theirs_m.items() if k not in VOLATILE
    }
    # No output names where the release lies (the bucket, the local folder) or a credential.
    for word in (SECRET, KEY_ID, BUCKET, "s3://", str(raw)):
        for files in (ours, theirs):
            assert [path for path, data in files.items() if word.encode() in data] == [], word
    assert SECRET not in log.out + log.err and KEY_ID not in log.out + log.err
