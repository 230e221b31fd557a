"""Byte-identity check for refactors: sha256 of every build's `data/*.parquet` and `README.md`.

Builds the demo, the learnable demo and each test fixture release (ChestX-ray14 Kaggle and Box
layouts, MIMIC-CXR JPG / DICOM / text labels, the independent MIMIC release, MIDRC RICORD and
Data Commons, the seven fundus releases) through the command line, and prints one line per
output file. `--record FILE` writes the hashes as JSON; `--check FILE` compares against such a
file and exits 1 on any difference (a refactor must leave every output byte as it was).

Usage: python benchmarks/build_hashes.py [--record benchmarks/build_hashes.json | --check FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests import fundus_fixture, midrc_fixture, mimic_fixture, nih_fixture  # noqa: E402


def _cli(*args: str) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "mgll_data", *args], cwd=REPO, env=env, capture_output=True
    )
    if result.returncode not in (0, 1):  # 1: built with quarantined items (--max-errors)
        raise SystemExit(f"build {args} failed:\n{result.stderr.decode()[-2000:]}")


# name -> (pipeline, release maker, extra build flags)
RELEASES: dict[str, tuple[str, Callable[[Path], object], tuple[str, ...]]] = {
    "nih-kaggle": ("chestxray14", lambda r: nih_fixture.make_release(r, 300, "kaggle"), ()),
    "nih-box": ("chestxray14", lambda r: nih_fixture.make_release(r, 40, "box", "v2017"), ()),
    "mimic-jpg": ("mimic_cxr", mimic_fixture.make_release, ()),
    "mimic-dicom": ("mimic_cxr", mimic_fixture.make_release, ("--images", "dicom")),
    "mimic-text": ("mimic_cxr", mimic_fixture.make_release, ("--labels", "text")),
    "mimic-independent": ("mimic_cxr", mimic_fixture.make_independent_release, ()),
    "ricord": ("midrc_ricord", midrc_fixture.make_ricord, ()),
    "commons": ("midrc_commons", midrc_fixture.make_commons, ()),
    "odir-official": ("odir", fundus_fixture.make_odir_official, ()),
    "odir-kaggle": ("odir", fundus_fixture.make_odir_kaggle, ()),
    "rfmid": ("rfmid", fundus_fixture.make_rfmid, ()),
    "aptos": ("aptos", fundus_fixture.make_aptos, ()),
    "eyepacs": ("eyepacs", fundus_fixture.make_eyepacs, ()),
    "idrid": ("idrid", fundus_fixture.make_idrid, ("--crop-borders",)),
    "messidor2": ("messidor2", fundus_fixture.make_messidor2, ()),
}


def _hashes(out: Path, name: str) -> dict[str, str]:
    files = sorted((out / "data").rglob("*.parquet")) + [out / "README.md"]
    return {
        f"{name}/{p.relative_to(out)}": hashlib.sha256(p.read_bytes()).hexdigest() for p in files
    }


def all_hashes(work: Path) -> dict[str, str]:
    """Build everything under `work` and return {build/file: sha256}."""
    result: dict[str, str] = {}
    _cli("demo", "--out", str(work / "demo"))
    result |= _hashes(work / "demo", "demo")
    _cli("demo", "--learnable", "--n", "300", "--out", str(work / "learnable"))
    result |= _hashes(work / "learnable", "learnable")
    for name, (pipeline, maker, flags) in RELEASES.items():
        root = work / f"{name}-raw"
        maker(root)
        out = work / name
        _cli("build", pipeline, "--root", str(root), "--out", str(out), "--image-size", "64",
             "--rows-per-shard", "16", *flags)  # fmt: skip
        result |= _hashes(out, name)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--record", type=Path, help="write the hashes to this JSON file")
    group.add_argument("--check", type=Path, help="compare with the hashes in this JSON file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        hashes = all_hashes(Path(tmp))
    for key, digest in sorted(hashes.items()):
        print(f"{digest[:16]}  {key}")
    if args.record:
        args.record.write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")
    if args.check:
        expected = json.loads(args.check.read_text())
        changed = sorted(
            k for k in expected.keys() | hashes.keys() if expected.get(k) != hashes.get(k)
        )
        for key in changed:
            print(f"DIFFERS: {key}")
        print(f"{len(hashes) - len(changed)}/{len(expected | hashes)} files identical")
        sys.exit(1 if changed else 0)


if __name__ == "__main__":
    main()
