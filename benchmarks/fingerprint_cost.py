"""What `--resume`'s per-image fingerprint costs: a stat of every image file against none.

The build fingerprint covers each image file by size and mtime, so `--resume` refuses a release
whose images changed. This writes N small files in a temporary folder (the release layout of
ChestX-ray14: one folder of PNGs), then times, in the same run, the fingerprint of N items as it
was (ids, splits and paths hashed, no file touched) and as it is (`engine._fingerprint`: the same
plus one `os.stat` per file and root-relative paths), and prints the ratio and the cost per
file. The files were just written, so their inodes are cached: a cold cache or a network file
system adds one metadata round trip per file on top.

    python benchmarks/fingerprint_cost.py            # N = 100000
    python benchmarks/fingerprint_cost.py --n 20000
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mgll_data.build import engine  # noqa: E402
from mgll_data.build.items import ImageRef, RawItem  # noqa: E402
from mgll_data.build.pipeline import load_pipeline  # noqa: E402
from mgll_data.sources.base import ScanResult  # noqa: E402
from mgll_data.vocab import load_vocabulary  # noqa: E402


def _release(root: Path, n: int) -> list[RawItem]:
    images = root / "images"
    images.mkdir(parents=True)
    items = []
    for k in range(n):
        path = images / f"{k:08d}_000.png"
        path.write_bytes(b"\x89PNG" + k.to_bytes(4, "little"))
        items.append(RawItem(f"nih:{k:08d}_000.png", "nih", "train", ImageRef(str(path)), {}))
    return items


def _previous_items_digest(items: list[RawItem]) -> str:
    """The per-item part of the fingerprint before file stamps: no file is touched."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(f"{item.id}\t{item.split}\t{item.image.describe()}\n".encode())
    return digest.hexdigest()


def _best(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="image files (100000)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs, best kept (5)")
    args = parser.parse_args()

    pipeline = load_pipeline("chestxray14")
    vocab = load_vocabulary(pipeline.domain)
    options = engine.BuildOptions()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "raw"
        started = time.perf_counter()
        items = _release(root, args.n)
        print(f"wrote {args.n} files in {time.perf_counter() - started:.1f} s")
        scan = ScanResult(items=items)
        # the configuration part (pipeline, vocabulary, versions) is the same in both
        empty = ScanResult([])
        fixed = _best(
            lambda: engine._fingerprint(pipeline, vocab, options, empty, [], root), args.repeats
        )
        before = fixed + _best(lambda: _previous_items_digest(items), args.repeats)
        after = _best(
            lambda: engine._fingerprint(pipeline, vocab, options, scan, items, root), args.repeats
        )
    per_file = (after - before) / args.n * 1e6
    print(f"fingerprint of {args.n} items without stat: {before:.3f} s (best of {args.repeats})")
    print(f"fingerprint of {args.n} items with stat:    {after:.3f} s (best of {args.repeats})")
    print(f"ratio {after / before:.2f}x; {per_file:.2f} us more per image file (warm cache)")


if __name__ == "__main__":
    main()
