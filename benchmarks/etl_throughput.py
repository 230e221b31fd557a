"""ETL throughput of the ChestX-ray14 build on full-size synthetic radiographs.

Prints, each against a baseline measured in the same run:
  1. per-image cost of the image stage as a ratio to a bare full decode of the same files
     (PNG sources as in ChestX-ray14, and JPEG sources as in MIMIC-CXR-JPG, where draft-mode
     decoding can beat the full decode);
  2. build throughput (images/s) with 1 and 2 workers;
  3. peak memory of a build ten times larger than the small one, both at the default
     `--rows-per-shard` (it should stay flat: shards stream, card figures read only the rows
     they show).

Usage: python benchmarks/etl_throughput.py [--n 24] [--size 2048] [--workers 2] [--peak-images 200]
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from mgll_data.build.engine import BuildOptions, build
from mgll_data.build.pipeline import load_pipeline
from mgll_data.demo.nih_release import BBOX_HEADER, DATA_ENTRY_HEADER, sample_findings
from mgll_data.demo.synthetic import synthetic_radiograph
from mgll_data.imaging.raster import ImagePolicy, process_image


def _make_image(args: tuple[int, int, int]) -> tuple[bytes, bytes, str]:
    seed, width, height = args
    rng = np.random.default_rng(seed)
    findings = sample_findings(rng)
    pixels = Image.fromarray(synthetic_radiograph((width, height), set(findings), rng), "L")
    png, jpeg = io.BytesIO(), io.BytesIO()
    pixels.save(png, "PNG")
    pixels.save(jpeg, "JPEG", quality=95)
    return png.getvalue(), jpeg.getvalue(), "|".join(findings)


def write_release(root: Path, images: list[tuple[bytes, bytes, str]], copies: int) -> int:
    """A ChestX-ray14-shaped release; `copies` > 1 repeats each file under new names (links)."""
    folder = root / "images_001" / "images"
    folder.mkdir(parents=True)
    rows, names = [], []
    for k, (png, _, labels) in enumerate(images):
        first = folder / f"{k + 1:08d}_000.png"
        first.write_bytes(png)
        for copy in range(copies):
            name = f"{k + 1:08d}_{copy:03d}.png"
            if copy:
                os.link(first, folder / name)
            rows.append([name, labels, copy, k + 1, 50, "M", "PA", 2500, 2048, 0.143, 0.143])
            names.append(name)
    with open(root / "Data_Entry_2017_v2020.csv", "w", newline="") as f:
        f.write(DATA_ENTRY_HEADER + "\n")
        csv.writer(f, lineterminator="\n").writerows(rows)
    (root / "BBox_List_2017.csv").write_text(BBOX_HEADER + "\n")
    (root / "train_val_list.txt").write_text("\n".join(names) + "\n")
    (root / "test_list.txt").write_text("")
    return len(rows)


def _time(fn, repeats: int = 3) -> float:
    return statistics.median(_clock(fn) for _ in range(repeats))


def _clock(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _bare_decode(data: bytes) -> None:
    with Image.open(io.BytesIO(data)) as image:
        image.load()


def per_image_cost(images: list[tuple[bytes, bytes, str]]) -> None:
    policy = ImagePolicy()
    print("\n1. image stage vs bare decode (median of 3 per image, summed over images)")
    for label, index in (("PNG source ", 0), ("JPEG source", 1)):
        decode = sum(_time(lambda d=img[index]: _bare_decode(d)) for img in images)
        stage = sum(_time(lambda d=img[index]: process_image(d, policy)) for img in images)
        n = len(images)
        print(
            f"   {label}: bare decode {1000 * decode / n:6.1f} ms/img, "
            f"decode+resize+encode {1000 * stage / n:6.1f} ms/img, "
            f"ratio {stage / decode:.2f}x (target <= 1.3x)"
        )


def _decode_files(paths: list[Path]) -> float:
    return _clock(lambda: [_bare_decode(p.read_bytes()) for p in paths])


def parallel_ceiling(paths: list[Path], workers: int) -> float:
    """The machine's own speed-up: bare decodes of the same files in 1 and in N processes."""
    one = _decode_files(paths)
    with ProcessPoolExecutor(workers) as pool:
        pool.submit(len, []).result()  # start the workers outside the clock
        many = _clock(lambda: list(pool.map(_decode_files, [paths] * workers)))
    return workers * one / many


def throughput(root: Path, count: int, workers: int) -> None:
    pipeline = load_pipeline("chestxray14")
    print(f"\n2. build throughput ({count} images)")
    if workers > 1:
        paths = sorted(root.glob("images_*/images/*.png"))
        ceiling = parallel_ceiling(paths, workers)
        print(
            f"   baseline: bare decoding in {workers} processes runs {ceiling:.2f}x faster than"
            " in 1 on this machine (the ceiling for any build)"
        )
    rates = {}
    with tempfile.TemporaryDirectory() as out:
        for n_workers in sorted({1, workers}):
            options = BuildOptions(workers=n_workers, progress=False, overwrite=True)
            seconds = _clock(lambda o=options: build(pipeline, root, Path(out), o))
            rates[n_workers] = count / seconds
            print(f"   {n_workers} worker(s): {rates[n_workers]:6.2f} images/s")
    if workers > 1:
        print(
            f"   speed-up with {workers} workers: {rates[workers] / rates[1]:.2f}x "
            f"(target >= 1.7x with 2)"
        )


_PEAK = """
import resource, sys
from pathlib import Path
from mgll_data.build.engine import BuildOptions, build
from mgll_data.build.pipeline import load_pipeline
build(load_pipeline("chestxray14"), Path(sys.argv[1]), Path(sys.argv[2]),
      BuildOptions(progress=False))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_memory(base: Path, images: list[tuple[bytes, bytes, str]], target: int) -> None:
    """Peak RSS of a build of about `target` images against one ten times larger."""
    print("\n3. peak memory (one process, default --rows-per-shard)")
    peaks = {}
    copies_1x = max(1, round(target / len(images)))
    for scale in (1, 10):
        root = base / f"release-x{scale}"
        count = write_release(root, images, copies_1x * scale)
        result = subprocess.run(
            [sys.executable, "-c", _PEAK, str(root), str(base / f"out{scale}")],
            capture_output=True,
            text=True,
            check=True,
        )
        peaks[scale] = int(result.stdout.split()[-1]) / 1024
        print(f"   {count:5d} images: peak RSS {peaks[scale]:7.1f} MiB")
    print(f"   ratio 10x build / 1x build: {peaks[10] / peaks[1]:.3f} (target <= 1.10)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=24, help="distinct images (24)")
    parser.add_argument("--size", type=int, default=2048, help="image side in pixels (2048)")
    parser.add_argument("--workers", type=int, default=2, help="workers to compare with 1 (2)")
    parser.add_argument(
        "--peak-images", type=int, default=200, help="images of the smaller peak-memory build (200)"
    )
    args = parser.parse_args()

    print(f"generating {args.n} synthetic radiographs of about {args.size} px ...")
    shapes = [
        (seed, args.size + 8 * (seed % 3), args.size + 16 * (seed % 4)) for seed in range(args.n)
    ]
    with ProcessPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
        images = list(pool.map(_make_image, shapes))
    mean_png = sum(len(i[0]) for i in images) / len(images) / 1e6
    print(f"mean PNG size {mean_png:.2f} MB; stored at the default --image-size 512, PNG")

    per_image_cost(images)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        count = write_release(base / "release", images, copies=1)
        throughput(base / "release", count, args.workers)
        peak_memory(base, images, args.peak_images)


if __name__ == "__main__":
    main()
