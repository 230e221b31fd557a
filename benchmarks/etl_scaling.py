"""Build throughput of the local process pool against Ray, on one machine.

Builds one synthetic ChestX-ray14-shaped release (the demo's radiographs) with
`--executor local` and `--executor ray`, each with 1 and 2 worker processes. Every configuration
runs in a fresh Python process that builds the release twice:

- cold: the first build. On Ray its worker processes start and import mgll_data during it, as
  in every `mgll-build-dataset build --executor ray` (a Ray worker serves one driver). The Ray
  instance itself is started before it (a cluster is up before a build) and not counted.
- warm: a second build by the same driver, on the same instance: Ray's workers are up.

The configurations are interleaved (round r runs each once), so a slow spell of a shared machine
hits them all alike, and Ray is compared with the pool of as many workers in the same round:
the ratio of build times per round (min / median / max over the rounds). Wall-clock time on a
loaded machine is noisy, so the CPU time of each build (user + sys of the driver and of every
process under it: pool workers; Ray's workers and its own processes) is printed too, per image.

Usage: python benchmarks/etl_scaling.py [--n 96] [--source-size 1024] [--rounds 3]
                                        [--rows-per-shard 8]
Small shards show the fixed cost per Ray task (`--n 384 --rows-per-shard 32`); a realistic
shard size amortises it (`--n 2048 --source-size 512 --rows-per-shard 256`: at least four shards
per worker). CPU time misses a process that starts and ends within a build under Ray.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

CONFIGS = [("local", 1), ("ray", 1), ("local", 2), ("ray", 2)]
BUILDS = ("cold", "warm")
CPU_PARTS = ("driver", "workers", "other")


def _tree_cpu() -> dict[str, float]:
    """CPU seconds so far of this process ("driver"), of the worker processes under it (a local
    pool's once it has ended, Ray's while they run: "workers") and of Ray's other processes
    under it ("other")."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)  # a local pool's workers, once joined
    cpu = {"driver": own.ru_utime + own.ru_stime, "workers": reaped.ru_utime + reaped.ru_stime}
    cpu["other"] = 0.0
    for proc in psutil.Process().children(recursive=True):
        try:
            times = proc.cpu_times()
            command = " ".join(proc.cmdline())
        except psutil.Error:  # ended meanwhile
            continue
        # a Ray worker renames itself "ray::IDLE", "ray::_run_batch", ...
        worker = command.startswith("ray::") or "default_worker.py" in command
        cpu["workers" if worker else "other"] += (
            times.user + times.system + times.children_user + times.children_system
        )
    return cpu


def child(executor: str, workers: int, root: Path, out: Path, rows_per_shard: int) -> None:
    """Start Ray (for `ray`), then build twice; prints the start-up and each build's wall and
    CPU seconds as JSON."""
    from mgll_data.build.engine import BuildOptions, build
    from mgll_data.build.pipeline import load_pipeline

    pipeline = load_pipeline("chestxray14")
    started = time.perf_counter()
    if executor == "ray":
        import ray

        ray.init(address="local", num_cpus=workers, include_dashboard=False)
    result: dict = {"startup": time.perf_counter() - started}
    options = BuildOptions(
        image_size=256,
        rows_per_shard=rows_per_shard,
        workers=workers,
        executor=executor,
        progress=False,
    )
    for name in BUILDS:
        shutil.rmtree(out, ignore_errors=True)
        before, ready = _tree_cpu(), time.perf_counter()
        build(pipeline, root, out, options)
        wall, after = time.perf_counter() - ready, _tree_cpu()
        result[name] = {"wall": wall, **{k: after[k] - before[k] for k in after}}
    if executor == "ray":
        ray.shutdown()
    print(json.dumps(result))


def run_child(executor: str, workers: int, root: Path, out: Path, rows_per_shard: int) -> dict:
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
        runs: dict[tuple[str, int], list[dict]] = {config: [] for config in CONFIGS}
        for round_ in range(args.rounds):
            for executor, workers in CONFIGS:
                result = run_child(executor, workers, root, out, args.rows_per_shard)
                runs[(executor, workers)].append(result)
                walls = ", ".join(f"{b} {result[b]['wall']:.2f} s" for b in BUILDS)
                print(f"round {round_ + 1}: {executor} x{workers}: {walls}", flush=True)
    load = os.getloadavg()[0]
    print(
        f"\n{args.n} images, {args.rows_per_shard} rows per shard, {args.rounds} interleaved "
        f"rounds; 1-minute load average at the end {load:.1f} on {os.cpu_count()} CPUs"
    )
    for build_name in BUILDS:
        report(runs, build_name, args.n)


def _spread(values: list[float], form: str = "{:.2f}") -> str:
    values = sorted(values)
    return " / ".join(form.format(v) for v in (values[0], statistics.median(values), values[-1]))


def report(runs: dict[tuple[str, int], list[dict]], build_name: str, n: int) -> None:
    """Throughput, CPU per image, and Ray against the pool (per-round ratios) of one build."""
    print(
        f"\n{build_name} build: images/s (min / median / max); CPU ms per image, median "
        "(driver + workers + Ray's other processes)"
    )
    for (executor, workers), results in runs.items():
        builds = [r[build_name] for r in results]
        parts = [1000 * statistics.median(b[k] for b in builds) / n for k in CPU_PARTS]
        startup = statistics.median(r["startup"] for r in results)
        extra = f"   (Ray start-up {startup:.1f} s, not counted)" if executor == "ray" else ""
        print(
            f"  {executor:5} x{workers}: {_spread([n / b['wall'] for b in builds], '{:6.1f}')}   "
            f"CPU {sum(parts):6.1f} = {parts[0]:.1f} + {parts[1]:.1f} + {parts[2]:.1f}{extra}"
        )
    for workers in (1, 2):
        local = [r[build_name] for r in runs[("local", workers)]]
        ray = [r[build_name] for r in runs[("ray", workers)]]
        walls = [b["wall"] / a["wall"] for a, b in zip(local, ray, strict=True)]
        cpu = [_cpu(b) / _cpu(a) for a, b in zip(local, ray, strict=True)]
        extra = [1000 * (b["wall"] - a["wall"]) / n for a, b in zip(local, ray, strict=True)]
        print(
            f"  Ray / local pool, {workers} worker(s): build time x{_spread(walls)}, "
            f"CPU time x{_spread(cpu)}, {_spread(extra, '{:+.1f}')} ms/image"
        )
    one = [r[build_name]["wall"] for r in runs[("ray", 1)]]
    two = [r[build_name]["wall"] for r in runs[("ray", 2)]]
    speedup = _spread([a / b for a, b in zip(one, two, strict=True)])
    print(f"  Ray x2 against x1: {speedup} times as fast")


def _cpu(build_result: dict) -> float:
    return sum(build_result[k] for k in CPU_PARTS)


if __name__ == "__main__":
    main()
