"""The DICOM image stage against bare pydicom decoding of the same files.

Generates full-size 12-bit DX radiographs (synthetic content, MONOCHROME2 and MONOCHROME1) in
several transfer syntaxes and times, per file and in the same process:
  - bare decoding: `pydicom.dcmread(path).pixel_array` (the floor: every file is decoded once),
  - the stage: `mgll_data.imaging.dicom.process_dicom` (decode, modality LUT, window, polarity,
    resize to 512, PNG encode),
and prints ms per image for both, images/s of the stage, and the ratio.

Usage: python benchmarks/dicom_throughput.py [--n 6] [--size 2500x2048]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import JPEG2000Lossless, RLELossless

from mgll_data.demo.synthetic import synthetic_radiograph
from mgll_data.imaging.dicom import process_dicom
from mgll_data.imaging.raster import ImagePolicy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.dicom_fixture import make_dx  # noqa: E402  (the test suite's DX generator)


def write_files(folder: Path, n: int, size: tuple[int, int]) -> dict[str, list[Path]]:
    """`n` files per transfer syntax that pydicom can write here."""
    rng = np.random.default_rng(0)
    files: dict[str, list[Path]] = {}
    for k in range(n):
        grey = synthetic_radiograph(size, {"Cardiomegaly"} if k % 2 else set(), rng)
        pixels = (grey.astype(np.uint16) * 16).astype(np.uint16)  # 12-bit range
        photometric = "MONOCHROME1" if k % 3 == 0 else "MONOCHROME2"
        if photometric == "MONOCHROME1":
            pixels = (4095 - pixels).astype(np.uint16)
        for name, syntax in (("uncompressed", None), ("RLE lossless", RLELossless),
                             ("JPEG 2000 lossless", JPEG2000Lossless)):  # fmt: skip
            ds = make_dx(
                pixels,
                photometric=photometric,
                phi=False,
                ViewPosition="PA",
                WindowCenter=2048,
                WindowWidth=4096,
                RescaleSlope=1,
                RescaleIntercept=0,
            )
            try:
                if syntax is not None:
                    ds.compress(syntax)
            except Exception as err:  # an encoder this environment lacks
                print(f"   (skipping {name}: {type(err).__name__}: {err})")
                continue
            path = folder / f"{name.replace(' ', '_')}-{k}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.setdefault(name, []).append(path)
    return files


def _median_ms(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=6, help="files per transfer syntax (6)")
    parser.add_argument("--size", default="2500x2048", help="width x height (2500x2048)")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    policy = ImagePolicy()
    with tempfile.TemporaryDirectory() as tmp:
        files = write_files(Path(tmp), args.n, (width, height))
        print(f"{args.n} DX files of {width} x {height}, 12 bits, per syntax; stored at 512 px PNG")
        for name, paths in files.items():
            bare = sum(_median_ms(lambda p=p: pydicom.dcmread(p).pixel_array) for p in paths)
            stage = sum(_median_ms(lambda p=p: process_dicom(p, policy)) for p in paths)
            n = len(paths)
            print(
                f"   {name:20s} bare pydicom {bare / n:7.1f} ms/img, stage {stage / n:7.1f} "
                f"ms/img ({1000 * n / stage:5.1f} images/s), ratio {stage / bare:.2f}x"
            )


if __name__ == "__main__":
    main()
