"""Build throughput of the local process pool against Ray, on one machine.

Builds one synthetic ChestX-ray14-shaped release (the demo's radiographs) with
`--executor local` and `--executor ray`, each with 1 and 2 worker processes. Every build runs in
a fresh Python process and the configurations are interleaved (round r runs each once), so a
slow spell of a shared machine hits them all alike. Prints images/s of the build (min / median
/ max over the rounds), Ray's start-up (a local instance, started before the build and not
counted in it), and Ray's overhead per image against the local pool with as many workers:
(median build time on Ray - median on the pool) / images.

Usage: python benchmarks/etl_scaling.py [--n 96] [--source-size 1024] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = [("local", 1), ("ray", 1), ("local", 2), ("ray", 2)]


def child(executor: str, workers: int, root: Path, out: Path, rows_per_shard: int) -> None:
    """One build in this process; prints {"startup": s, "build": s} as JSON."""
    from mgll_data.build.engine import BuildOptions, build
    from mgll_data.build.pipeline import load_pipeline

    pipeline = load_pipeline("chestxray14")
    started = time.perf_counter()
    if executor == "ray":
        import ray

        ray.init(address="local", num_cpus=workers, include_dashboard=False)
    ready = time.perf_counter()
    options = BuildOptions(
        image_size=256,
        rows_per_shard=rows_per_shard,
        workers=workers,
        executor=executor,
        progress=False,
    )
    build(pipeline, root, out, options)
    done = time.perf_counter()
    if executor == "ray":
        ray.shutdown()
    print(json.dumps({"startup": ready - started, "build": done - ready}))


def run_child(executor: str, workers: int, root: Path, out: Path, rows_per_shard: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, __file__, "--child", executor, str(workers), str(root), str(out)]
    command += ["--rows-per-shard", str(rows_per_shard)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{executor} x{workers} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=96, help="images in the release (96)")
    parser.add_argument("--source-size", type=int, default=1024, help="source side, px (1024)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    parser.add_argument("--rows-per-shard", type=int, default=8, help="rows per shard (8)")
    parser.add_argument("--child", nargs=4, metavar=("EXECUTOR", "WORKERS", "ROOT", "OUT"))
    args = parser.parse_args()
    if args.child:
        executor, workers, root, out = args.child
        child(executor, int(workers), Path(root), Path(out), args.rows_per_shard)
        return

    from mgll_data.demo.nih_release import write_demo_release

    with tempfile.TemporaryDirectory(prefix="etl-scaling-") as tmp:
        root, out = Path(tmp) / "raw", Path(tmp) / "out"
        write_demo_release(root, n=args.n, seed=0, image_size=args.source_size)
        times: dict[tuple[str, int], list[dict]] = {config: [] for config in CONFIGS}
        for round_ in range(args.rounds):
            for executor, workers in CONFIGS:
                result = run_child(executor, workers, root, out, args.rows_per_shard)
                times[(executor, workers)].append(result)
                print(f"round {round_ + 1}: {executor} x{workers}: {result['build']:.2f} s")
    report(times, args.n, args.rounds)


def report(times: dict[tuple[str, int], list[dict]], n: int, rounds: int) -> None:
    print(f"\n{n} images, {rounds} interleaved rounds, images/s of the build (min/median/max)")
    for (executor, workers), runs in times.items():
        rates = sorted(n / run["build"] for run in runs)
        startup = statistics.median(run["startup"] for run in runs)
        extra = f"   start-up {startup:.1f} s (not counted)" if executor == "ray" else ""
        print(
            f"  {executor:5} x{workers}: {rates[0]:6.1f} / {statistics.median(rates):6.1f} / "
            f"{rates[-1]:6.1f}{extra}"
        )
    for workers in (1, 2):
        local = statistics.median(run["build"] for run in times[("local", workers)])
        ray = statistics.median(run["build"] for run in times[("ray", workers)])
        print(
            f"  Ray overhead with {workers} worker(s): {1000 * (ray - local) / n:+.1f} ms/image "
            f"(build time x{ray / local:.2f} of the local pool's)"
        )


if __name__ == "__main__":
    main()
