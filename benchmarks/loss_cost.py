"""The loss alone: forward + backward time of `--loss mgll` against `--loss clip`, same inputs.

`train_throughput.py` measures whole steps; this isolates what the MGLL objective itself costs
(soft targets from the labels, the point-wise term, the KL across granularities), so the ratio
can be read against a model's step time on any device, and counts the operators each loss
dispatches (on a GPU, small losses are bound by kernel launches, not FLOPs).

    python benchmarks/loss_cost.py                      # B=256, D=512, G=3 on the CPU
    python benchmarks/loss_cost.py --device cuda --precision amp_bf16
"""

from __future__ import annotations

import argparse
import statistics
import time

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


def time_loss(mode: str, args: argparse.Namespace, device: torch.device) -> tuple[float, int]:
    """Median seconds per forward+backward, and the number of operators one call dispatches."""
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

    for _ in range(args.warmup):
        call()
    times = []
    for _ in range(args.repeat):
        _sync(device)
        started = time.perf_counter()
        call()
        _sync(device)
        times.append(time.perf_counter() - started)
    with profile() as prof:
        call()
    return statistics.median(times), _top_level_aten_ops(prof.events())


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
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    device = torch.device(args.device)
    results = {mode: time_loss(mode, args, device) for mode in ("clip", "mgll")}
    for mode, (seconds, ops) in results.items():
        print(f"{mode:5s} {seconds * 1e3:8.2f} ms per forward+backward, {ops} top-level operators")
    extra = results["mgll"][0] - results["clip"][0]
    print(
        f"mgll/clip loss time {results['mgll'][0] / results['clip'][0]:.2f}x; MGLL adds "
        f"{extra * 1e3:.2f} ms per step (B={args.batch_size}, D={args.dim}, "
        f"G={args.granularities}, {args.precision}, {device})"
    )


if __name__ == "__main__":
    main()
