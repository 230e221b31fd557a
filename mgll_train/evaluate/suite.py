"""Running named protocols (`--protocol`) and suites of them (`--suite`) on a checkpoint.

A build is recognised by the pipeline that wrote it, read from its own rows (the ``source``
column every record carries), never from its folder name. A protocol's fixed settings replace
the task flags; a flag set to a value the protocol does not use is a one-line error, so no
number is labelled with a protocol it was not measured under. Its budgets (epochs, learning
rates) give way to flags the user set, and metrics.json lists those as ``overrides``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

from ..data import make_dataset, resolve_data
from ..data.labels import PerLabelPolicy, aligned_label_names, shard_metadata
from ..errors import UserError
from .features import eval_transform, extract_features
from .flags import eval_defaults, flag_given
from .metrics import single_class
from .probe_multiclass import multiclass_probe_block
from .protocols import KIND_BLOCK, PROTOCOLS, SUITES, Protocol
from .runner import evaluate_model
from .suite_table import protocol_lines, suite_json, suite_latex, suite_markdown
from .zeroshot import zeroshot_multiclass_block

log = logging.getLogger("mgll_train")


def build_sources(data: str | Path) -> set[str]:
    """The pipelines whose rows a dataset holds (the first row of each Parquet file)."""
    found = set()
    for file in resolve_data(str(data)):
        parquet = pq.ParquetFile(file)
        if "source" not in parquet.schema_arrow.names or not parquet.metadata.num_rows:
            continue
        found.add(str(parquet.read_row_group(0, columns=["source"])["source"][0]))
    return found


def check_build(protocol: Protocol, data: str) -> None:
    """Refuse ``data`` unless it is a build of the protocol's release alone."""
    sources = build_sources(data)
    if sources != {protocol.pipeline}:
        what = ", ".join(sorted(sources)) or "no rows with a source column"
        raise UserError(
            f"{data}: a build of {what}; protocol {protocol.title} needs a build of "
            f"{protocol.pipeline} (mgll-build-dataset build {protocol.pipeline})"
        )


def find_builds(folder: Path) -> dict[str, Path]:
    """``{pipeline: build folder}`` for the builds directly under ``folder`` (any names)."""
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder; expected a folder holding builds (--builds)")
    found: dict[str, Path] = {}
    for path in sorted(p for p in folder.iterdir() if (p / "data").is_dir()):
        if not any((path / "data").glob("*.parquet")):
            continue
        for source in build_sources(path):
            if source in found:
                raise UserError(
                    f"{folder}: two builds of {source} ({found[source].name}, {path.name}); "
                    "keep one per release"
                )
            found[source] = path
    return found


_CONFLICT_HINT = "drop the flag, or evaluate without --protocol"


def protocol_args(
    protocol: Protocol, args: argparse.Namespace, label_names: list[str]
) -> tuple[argparse.Namespace, dict[str, Any]]:
    """``(the args a protocol runs with, the user's overrides of its budgets)``."""
    defaults = eval_defaults()
    fixed: dict[str, Any] = {
        "split": protocol.test_split,
        "train_split": protocol.train_split,
        "train_data": None,  # the protocol's own build
        "tasks": None,  # the protocol's kind
        "uncertain": None,  # per label
        "unmentioned": protocol.unmentioned,
        **dict(protocol.fixed),
    }
    for dest, wanted in fixed.items():
        given = getattr(args, dest, defaults.get(dest))
        if flag_given(args, dest, defaults) and given != wanted:
            flag = "--" + dest.replace("_", "-")
            shown = flag if isinstance(given, bool) else f"{flag} {given}"
            if wanted is False:
                which = "does not use it"
            else:
                which = "fixes it" + ("" if wanted in (None, True) else f" to {wanted}")
            raise UserError(
                f"{shown} conflicts with protocol {protocol.title}, which {which}; {_CONFLICT_HINT}"
            )
    run = argparse.Namespace(**vars(args))
    for dest, value in fixed.items():
        setattr(run, dest, value)
    overrides = {}
    for dest, value in protocol.defaults:
        if not flag_given(args, dest, defaults):
            setattr(run, dest, value)
        elif getattr(args, dest) != value:
            overrides[dest] = getattr(args, dest)
    run.uncertain = "ignore"
    if protocol.kind != "segmentation":  # masks are the targets there, not labels
        run.uncertain = PerLabelPolicy.for_names(
            label_names, dict(protocol.uncertain), "ignore", protocol.labels
        )
    return run, overrides


def _multiclass_metrics(
    protocol: Protocol,
    data: str,
    run: argparse.Namespace,
    bundle: Any,
    device: torch.device,
    progress: bool | None,
) -> dict[str, Any]:
    """The metrics of a multi-class protocol (zero-shot or probe) on its build."""
    transform = eval_transform(bundle.model, bundle.tokenizer, run)
    dataset = make_dataset(data, transform, split=run.split, seed=run.seed)
    feats = extract_features(
        bundle.model, dataset, run.batch_size, run.workers, device, texts=False, progress=progress
    )
    truth = single_class(feats.labels, dataset.label_names, protocol.labels)
    absent = [c for i, c in enumerate(protocol.labels) if not (truth == i).any()]
    if absent:  # e.g. a two-class COVIDx build: no pneumonia or normal class at all
        raise UserError(
            f"{data}: no {run.split} image of class {', '.join(absent)}; protocol "
            f"{protocol.title} needs each of {', '.join(protocol.labels)}"
        )
    if protocol.kind == "zeroshot-multiclass":
        block = zeroshot_multiclass_block(
            bundle.model, bundle.tokenizer, dataset, feats, protocol.labels, run, device
        )
    else:
        train_set = make_dataset(data, transform, split=run.train_split, seed=run.seed)
        block = multiclass_probe_block(
            bundle.model, train_set, dataset, feats, protocol.labels, run, device, progress
        )
    return {
        "data": data,
        "split": run.split,
        "images": len(feats.ids),
        KIND_BLOCK[protocol.kind]: block,
    }


def evaluate_protocol(
    protocol: Protocol,
    data: str,
    args: argparse.Namespace,
    bundle: Any,
    device: torch.device,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(metrics, extras for the plots)`` of one protocol on a build of its release."""
    check_build(protocol, data)
    files = resolve_data(data)
    names, _ = aligned_label_names(files)
    annotated = set(shard_metadata(files[0]).get("annotated_labels", names))
    missing = [label for label in protocol.labels if label not in annotated]
    if missing:  # e.g. a two-class COVIDx release, which has no pneumonia or normal class
        raise UserError(
            f"{data}: the build does not annotate {', '.join(missing)}; protocol "
            f"{protocol.title} scores {', '.join(protocol.labels)}"
        )
    run, overrides = protocol_args(protocol, args, names)
    torch.manual_seed(run.seed)  # each protocol as if run alone, whatever ran before it
    progress = False if args.no_progress else None
    if protocol.kind in ("probe", "segmentation"):
        task = "linear-probe" if protocol.kind == "probe" else "segmentation"
        metrics, extras = evaluate_model(
            bundle.model,
            bundle.tokenizer,
            data,
            run.split,
            [task],
            run,
            device,
            train_data=data,
            train_split=run.train_split,
            progress=progress,
        )
        metrics.pop("seconds", None)
    else:
        metrics = _multiclass_metrics(protocol, data, run, bundle, device, progress)
        extras = {}
    metrics["protocol"] = protocol.describe() | {"overrides": overrides}
    return metrics, extras


def _header(args: argparse.Namespace, state: dict[str, Any]) -> dict[str, Any]:
    return {
        "checkpoint": str(args.checkpoint),
        "model": state["model_name"],
        "step": state.get("step"),
        "seed": args.seed,
    }


def run_protocol(args: argparse.Namespace, bundle: Any, state: dict[str, Any], device) -> dict:
    """`eval --protocol NAME`: metrics.json and table.txt in --out; print the table."""
    from .cli import write_outputs  # cli imports this module lazily

    protocol = PROTOCOLS[args.protocol]
    metrics, extras = evaluate_protocol(protocol, args.data, args, bundle, device)
    return write_outputs(_header(args, state) | metrics, extras, args.out, protocol_lines)


def run_suite(args: argparse.Namespace, bundle: Any, state: dict[str, Any], device) -> dict:
    """`eval --suite NAME --builds DIR`: each protocol whose build exists into OUT/<protocol>/,
    then OUT/suite.md, suite.tex and suite.json; the skipped ones say why."""
    from .cli import write_outputs

    builds = find_builds(args.builds)
    done: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for name in SUITES[args.suite]:
        protocol = PROTOCOLS[name]
        build = builds.get(protocol.pipeline)
        if build is None:
            skipped[name] = f"no build of {protocol.pipeline} under {args.builds}"
            log.warning("%s: skipped, %s", name, skipped[name])
            continue
        try:
            metrics, extras = evaluate_protocol(protocol, str(build), args, bundle, device)
        except UserError as err:  # one protocol that cannot run does not stop the others
            skipped[name] = str(err)
            log.warning("%s: skipped, %s", name, err)
            continue
        done[name] = write_outputs(
            _header(args, state) | metrics, extras, args.out / name, protocol_lines, show=False
        )
    summary = suite_json(args.suite, _header(args, state), done, skipped)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "suite.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    (args.out / "suite.md").write_text(suite_markdown(summary))
    (args.out / "suite.tex").write_text(suite_latex(summary))
    print(suite_markdown(summary), end="")
    return summary
