"""Tokenizing the three texts of every sample: with the token cache against without it.

Category and impression texts repeat across images ("No finding.", "Cardiomegaly.", ...), so
`TextTokenizer` keeps token ids by text. This builds a demo dataset, reads its text columns in
training order (one epoch, shuffled), and tokenizes them with a cold cache and with the cache
disabled, interleaving the two arms (ABAB...) so that machine noise hits both alike.

    python benchmarks/tokenize_cache.py               # 2,000 images, 5 rounds, one thread
    python benchmarks/tokenize_cache.py --n 600 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from mgll_data.build.engine import BuildOptions, build
from mgll_data.build.pipeline import load_pipeline
from mgll_data.demo.nih_release import write_demo_release
from mgll_data.record import TEXT_COLUMNS
from mgll_train.data.tokenizer import TextTokenizer
from mgll_train.model import create_model


def epoch_texts(n: int, tmp: Path) -> list[str]:
    """The texts one epoch tokenizes, in a shuffled sample order (three per sample)."""
    raw = write_demo_release(tmp / "raw", n=n, seed=0, image_size=64, progress=False)
    out = tmp / "ds"
    build(load_pipeline("chestxray14"), raw, out, BuildOptions(image_size=64, progress=False))
    table = pq.read_table(sorted((out / "data").glob("*.parquet")), columns=list(TEXT_COLUMNS))
    rows = list(zip(*(table.column(c).to_pylist() for c in TEXT_COLUMNS), strict=True))
    order = np.random.default_rng(0).permutation(len(rows))
    return [text for i in order for text in rows[i] if text]


def tokenize_rate(tokenizer, texts: list[str], cache_size: int) -> float:
    """Texts/s through a fresh `TextTokenizer` (a worker's cold start)."""
    text_tok = TextTokenizer(tokenizer, cache_size=cache_size)
    start = time.perf_counter()
    for text in texts:
        text_tok.tokenize(text)
    return len(texts) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="images in the dataset (2000)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per arm (5)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = create_model("mgll-tiny").tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        texts = epoch_texts(args.n, Path(tmp))
    cached, plain = [], []
    for _ in range(args.rounds):
        plain.append(tokenize_rate(tokenizer, texts, cache_size=0))
        cached.append(tokenize_rate(tokenizer, texts, cache_size=65_536))
    ratios = sorted(c / p for c, p in zip(cached, plain, strict=True))
    print(f"{len(texts)} texts, {len(set(texts))} distinct ({len(set(texts)) / len(texts):.1%})")
    for name, rates in (("no cache", plain), ("cache", cached)):
        print(
            f"{name:>9}: {min(rates):8.0f} / {statistics.median(rates):8.0f} / "
            f"{max(rates):8.0f} texts/s (min / median / max)"
        )
    print(
        f"ratio cache / no cache: {ratios[0]:.2f} / {statistics.median(ratios):.2f} / "
        f"{ratios[-1]:.2f} (min / median / max over {args.rounds} interleaved rounds)"
    )


if __name__ == "__main__":
    main()
