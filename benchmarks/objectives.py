"""CLIP, MGLL, MGCA, G2D and MGLL+G2D compared on the controlled task (`demo --learnable`).

Every objective trains the same model on the same build, texts, batches, steps and seeds
(`mgll-train fit`, arms in the table's order below), then `mgll-train eval` scores it on the
test split: zero-shot macro AUROC, linear-probe macro AUROC on 100 % of the train split,
label-aware retrieval (image→text Jaccard-graded mAP, `evaluate/retrieval.py`) and, where
`eval --tasks segmentation` exists, the Dice of a decoder trained on the frozen image tower
against the demo's masks (100 % of the train split). Each metric is the mean ± sd over seeds.

Step time is the training loop's seconds per optimizer step (between the first and the last
epoch line of `out.log`, so the first epoch's one-off costs are left out), relative to CLIP's in
the same seed's round: the arms run one after another within a seed, in an order rotated from
seed to seed, so a slow drift of machine load hits every arm alike; min / median / max over
seeds. Load that changes within a round still shows in the spread: time on a quiet machine.
G2D's dense term switches on after a quarter of the steps (`--g2d-start-step`).

Full run (3 seeds × 5 objectives × 400 steps of batch 64, 2000 images; not yet timed: the small
run below took about 2 min per objective and seed under heavy load, and the full one trains 20
times the samples and evaluates on 5 times the images, so expect 1–2 h on a quiet 2-core CPU):
    .venv/bin/python benchmarks/objectives.py --out /tmp/mgll-objectives
Small run (the README's numbers; about 35 min on a shared, heavily loaded 2-core machine):
    .venv/bin/python benchmarks/objectives.py --out /tmp/mgll-objectives-small --seeds 3 \\
        --steps 40 --images 400 --batch-size 32 --probe-epochs 10 --seg-epochs 5 --threads 1

Results go to OUT/results.jsonl (one line per run, appended: an interrupted benchmark continues
where it stopped) and OUT/summary.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import shutil
import statistics
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# This folder by path: an installed package may also be called `benchmarks`.
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import torch  # noqa: E402
from mgll_vs_clip import build_data, train  # noqa: E402

ARMS = {  # objective -> its fit flags
    "CLIP": ["--loss", "clip"],
    "MGLL": ["--loss", "mgll"],
    "MGCA": ["--loss", "mgca"],
    "G2D": ["--loss", "g2d"],
    "MGLL+G2D": ["--loss", "mgll", "--dense-loss", "g2d"],
}
BASELINE = "CLIP"
# reporting.py's epoch line: "epoch E of N done: S steps, mean loss L, R samples/s, T s"
EPOCH_LINE = re.compile(r"epoch \d+ of \d+ (?:done|stopped): (\d+) steps, .*, ([\d.]+) s$")
METRICS = (  # result key, column title
    ("zeroshot", "zero-shot macro AUROC"),
    ("probe100", "linear probe (100 %) macro AUROC"),
    ("retrieval", "retrieval graded mAP (image→text)"),
    ("dice", "segmentation Dice (100 %)"),
)


def eval_tasks() -> list[str]:
    """The eval tasks to run: segmentation only where this checkout's `eval` has it."""
    from mgll_train.evaluate.flags import TASKS

    tasks = ["zeroshot", "linear-probe", "retrieval"]
    return tasks + ["segmentation"] if "segmentation" in TASKS else tasks


def learnable_build(out: Path, images: int, seed: int) -> Path:
    """The learnable demo of `images` images under OUT, rebuilt if an older one lacks masks."""
    from mgll_data.record import MASK_COLUMN, OPTIONAL_COLUMNS_KEY, read_mgll_metadata

    work = out / f"learnable-{images}-seed{seed}"
    data = work / "data"
    shards = sorted((data / "data").glob("*.parquet"))
    if shards and MASK_COLUMN not in read_mgll_metadata(shards[0]).get(OPTIONAL_COLUMNS_KEY, []):
        shutil.rmtree(data)  # built before the demo drew masks
    return build_data(work, images, seed)


def step_seconds(run: Path) -> float:
    """Seconds per optimizer step of a finished run, from its `out.log` epoch lines: the time
    between the first and the last one (millisecond stamps) over the steps between them, so
    the first epoch's one-off costs are left out; with one epoch, that epoch's own seconds."""
    epochs = [
        (datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f"), int(m[1]), float(m[2]))
        for line in (run / "out.log").read_text().splitlines()
        if (m := EPOCH_LINE.search(line))
    ]
    if not epochs:
        raise SystemExit(f"{run}/out.log: no epoch lines (format changed?)")
    if len(epochs) == 1:
        return epochs[0][2] / max(epochs[0][1], 1)
    seconds = (epochs[-1][0] - epochs[0][0]).total_seconds()
    return seconds / max(sum(steps for _, steps, _ in epochs[1:]), 1)


def evaluate(ckpt: Path, data: Path, out: Path, tasks: list[str], args) -> dict[str, Any]:
    """`mgll-train eval` of one checkpoint on the test split; its metrics.json."""
    from mgll_train.cli import main

    argv = ["eval", "--checkpoint", str(ckpt), "--data", str(data), "--split", "test",
            "--train-data", str(data), "--train-split", "train", "--tasks", ",".join(tasks),
            "--out", str(out), "--bootstrap", "0", "--probe-epochs", str(args.probe_epochs),
            "--workers", "0", "--device", "cpu", "--no-progress"]  # fmt: skip
    if "segmentation" in tasks:
        argv += ["--seg-epochs", str(args.seg_epochs)]
    with contextlib.redirect_stdout(io.StringIO()):  # its table is in OUT/table.txt
        main(argv)
    return json.loads((out / "metrics.json").read_text())


def run_arm(arm: str, seed: int, data: Path, tasks: list[str], args) -> dict[str, Any]:
    """Train and evaluate one objective with one seed; the result row."""
    name = f"{arm.replace('+', '_')}-s{seed}"
    flags = [*ARMS[arm], "--g2d-start-step", str(args.steps // 4), "--no-progress"]
    flags += ["--model", args.model]  # after train()'s own --model: the last one counts
    shutil.rmtree(args.out / "runs" / name, ignore_errors=True)  # out.log of an interrupted try
    ckpt = train(data, args.out, name, flags, seed, args)
    m = evaluate(ckpt, data, args.out / "evals" / name, tasks, args)
    seg = m.get("segmentation", {}).get("100%", {})
    return {
        "arm": arm,
        "seed": seed,
        "tag": args.tag,
        "step_s": step_seconds(ckpt.parents[1]),
        "zeroshot": m["zeroshot"]["macro_auroc"],
        "probe100": m["linear_probe"]["100%"]["macro_auroc"],
        "retrieval": m["retrieval"]["image_to_text"]["graded_map"],
        "dice": seg.get("dice"),
    }


def _cell(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "n/a"
    sd = statistics.stdev(known) if len(known) > 1 else 0.0
    return f"{statistics.mean(known):.3f} ± {sd:.3f}"


def summarise(results: list[dict[str, Any]]) -> str:
    """The markdown table: each metric's mean ± sd over seeds, step time relative to CLIP."""
    base = {r["seed"]: r["step_s"] for r in results if r["arm"] == BASELINE}
    titles = [title for _, title in METRICS]
    lines = [
        "| objective | seeds | "
        + " | ".join(titles)
        + " | step time vs CLIP (min / median / max) |",
        "|---|---|" + "---|" * (len(titles) + 1),
    ]
    for arm in ARMS:
        rows = [r for r in results if r["arm"] == arm]
        if not rows:
            continue
        cells = [_cell([r[key] for r in rows]) for key, _ in METRICS]
        ratios = sorted(r["step_s"] / base[r["seed"]] for r in rows if r["seed"] in base)
        timing = (
            f"{ratios[0]:.2f} / {statistics.median(ratios):.2f} / {ratios[-1]:.2f}×"
            if ratios
            else "n/a"
        )
        lines.append(f"| {arm} | {len(rows)} | " + " | ".join(cells) + f" | {timing} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's options (the fit settings other than these are mgll_vs_clip.py's)."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("/tmp/mgll-objectives"), help="work folder")
    p.add_argument("--seeds", type=int, default=3, help="training seeds 0..N-1 per objective")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps per run")
    p.add_argument("--model", default="mgll-tiny", help="open_clip model (a ViT, for MGCA/G2D)")
    p.add_argument("--images", type=int, default=2000, help="images in the learnable demo")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the learnable demo")
    p.add_argument("--batch-size", type=int, default=64, help="batch size of every run")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=40, help="warm-up steps")
    p.add_argument("--workers", type=int, default=1, help="data loader workers of fit")
    p.add_argument(
        "--granularities", default="category,description,explanation", help="texts trained on"
    )
    p.add_argument("--probe-epochs", type=int, default=30, help="linear-probe epochs")
    p.add_argument("--seg-epochs", type=int, default=20, help="segmentation decoder epochs")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.steps < 1:
        p.error("--seeds and --steps must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    args.tag = (
        f"{args.model}-n{args.images}-d{args.data_seed}-steps{args.steps}-b{args.batch_size}"
        f"-lr{args.lr}-w{args.warmup}-{args.granularities}-p{args.probe_epochs}-s{args.seg_epochs}"
    )
    data = learnable_build(args.out, args.images, args.data_seed)
    tasks = eval_tasks()
    path = args.out / "results.jsonl"
    done = [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []
    results = [r for r in done if r["tag"] == args.tag]
    arms = list(ARMS)
    for seed in range(args.seeds):
        turn = seed % len(arms)  # rotated, so no objective always runs first in a round
        for arm in arms[turn:] + arms[:turn]:
            if any(r["arm"] == arm and r["seed"] == seed for r in results):
                continue
            row = run_arm(arm, seed, data, tasks, args)
            results.append(row)
            with open(path, "a") as f:
                f.write(json.dumps(row, sort_keys=True) + "\n")
            print(json.dumps(row), flush=True)
    summary = summarise([r for r in results if r["seed"] < args.seeds])
    if "segmentation" not in tasks:
        summary += "\n\nsegmentation: n/a (this checkout's `mgll-train eval` has no such task)"
    (args.out / "summary.md").write_text(f"{args.tag}\n\n{summary}\n")
    print(summary)


if __name__ == "__main__":
    main()
