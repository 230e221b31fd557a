"""The loss alone: forward + backward time of `--loss mgll` against `--loss clip`, same inputs.

`train_throughput.py` measures whole steps; this isolates what the MGLL objective itself costs
(soft targets from the labels, the point-wise term, the KL across granularities), so the ratio
can be read against a model's step time on any device, and counts the operators each loss
dispatches (on a GPU, small losses are bound by kernel launches, not FLOPs).

    python benchmarks/loss_cost.py                      # B=256, D=512, G=3 on the CPU
    python benchmarks/loss_cost.py --device cuda --precision amp_bf16

The two losses are timed in alternating rounds (ABAB), so load that drifts during the run (a
shared machine) hits both alike; each round's figure is the median of `--repeat` calls, and the
min / median / max over rounds are printed. CPU threads are pinned (`--threads`, 1).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from open_clip_train.precision import get_autocast
from torch.profiler import profile

from mgll_train.loss import MGLLLoss


def _inputs(args: argparse.Namespace, device: torch.device) -> dict:
    generator = torch.Generator().manual_seed(0)
    b, d, g, k = args.batch_size, args.dim, args.granularities, args.labels
    image = torch.nn.functional.normalize(torch.randn(b, d, generator=generator), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(g, b, d, generator=generator), dim=-1)
    return {
        "image_features": image.to(device).requires_grad_(),
        "text_features": text.to(device).requires_grad_(),
        "logit_scale": torch.tensor(14.3, device=device, requires_grad=True),
        "logit_bias": torch.tensor(-10.0, device=device, requires_grad=True),
        "labels": (torch.rand(b, k, generator=generator) < 0.1).float().to(device),
        "text_ids": torch.randint(0, 2**62, (g, b), generator=generator).to(device),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def loss_call(mode: str, args: argparse.Namespace, device: torch.device) -> Callable[[], None]:
    """One forward+backward of loss `mode` on the shared inputs, as a callable."""
    inputs = _inputs(args, device)
    loss_fn = MGLLLoss(mode=mode)
    autocast = get_autocast(args.precision, device_type=device.type)
    leaves = [v for v in inputs.values() if v.requires_grad]

    def call() -> None:
        for leaf in leaves:  # gradients must not pile up over the repeats
            leaf.grad = None
        with autocast():
            out = loss_fn(**inputs)
        out["loss"].backward()

    return call


def median_seconds(call: Callable[[], None], repeat: int, device: torch.device) -> float:
    """Median seconds of `repeat` calls."""
    times = []
    for _ in range(repeat):
        _sync(device)
        started = time.perf_counter()
        call()
        _sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def operator_count(call: Callable[[], None]) -> int:
    """Top-level operators one call dispatches."""
    with profile() as prof:
        call()
    return _top_level_aten_ops(prof.events())


def _top_level_aten_ops(events) -> int:
    """Operators not called by another operator, forward and backward (backward ones sit
    under `autograd::engine::evaluate_function`, which is not an operator)."""

    def nested(event) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::"):
                return True
            parent = parent.cpu_parent
        return False

    return sum(1 for e in events if e.name.startswith("aten::") and not nested(e))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256, help="global batch (256)")
    parser.add_argument("--dim", type=int, default=512, help="embedding width (512, ViT-B-16)")
    parser.add_argument("--granularities", type=int, default=3)
    parser.add_argument("--labels", type=int, default=29, help="label vector length (29)")
    parser.add_argument("--precision", default="fp32", help="fp32, amp or amp_bf16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=50, help="calls timed per round (50)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (5)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    calls = {mode: loss_call(mode, args, device) for mode in ("clip", "mgll")}
    for call in calls.values():
        for _ in range(args.warmup):
            call()
    seconds: dict[str, list[float]] = {mode: [] for mode in calls}
    for _ in range(args.rounds):  # ABAB: load drifting over the run hits both losses alike
        for mode, call in calls.items():
            seconds[mode].append(median_seconds(call, args.repeat, device))
    for mode, values in seconds.items():
        low, mid, high = (1e3 * v for v in (min(values), statistics.median(values), max(values)))
        print(
            f"{mode:5s} {low:8.2f} / {mid:8.2f} / {high:8.2f} ms per forward+backward "
            f"(min / median / max of {args.rounds} rounds), "
            f"{operator_count(calls[mode])} top-level operators"
        )
    ratios = [m / c for c, m in zip(seconds["clip"], seconds["mgll"], strict=True)]
    extra = statistics.median(seconds["mgll"]) - statistics.median(seconds["clip"])
    print(
        f"mgll/clip loss time per round {min(ratios):.2f} / {statistics.median(ratios):.2f} / "
        f"{max(ratios):.2f}x; MGLL adds {extra * 1e3:.2f} ms per step (B={args.batch_size}, "
        f"D={args.dim}, G={args.granularities}, {args.precision}, {device}, "
        f"{args.threads} threads)"
    )


if __name__ == "__main__":
    main()
