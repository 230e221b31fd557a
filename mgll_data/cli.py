"""`mgll-build-dataset`: build, inspect and validate mgll datasets."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import phi_warnings
from .errors import UserError
from .storage import is_url, parse_location, parse_storage_options, scrub


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mgll-build-dataset",
        description="Turn raw public medical imaging releases into multi-granular image-text "
        "datasets (sharded Parquet laid out as a Hugging Face dataset).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    build = sub.add_parser(
        "build",
        help="build a dataset from a raw release",
        description="Build PIPELINE's dataset from the raw release at --root.",
    )
    build.add_argument("pipeline", help="pipeline name (see `list`) or path to a pipeline YAML")
    _add_build_options(build, remote=True)
    build.add_argument(
        "--root",
        required=True,
        type=parse_location,
        help="folder of the raw release, or its URL on object storage (s3://BUCKET/PREFIX, "
        "gs://..., hf://datasets/ORG/NAME/...; pip install 'mgll[cloud]' for s3 and gs)",
    )
    build.add_argument(
        "--storage-options",
        metavar="JSON",
        default=None,
        help="fsspec options for an --root or --out URL, as a JSON object, e.g. "
        '\'{"requester_pays": true}\' or \'{"client_kwargs": {"endpoint_url": "http://..."}}\'; '
        "credentials come from the environment or the usual config files (default: none)",
    )
    build.add_argument(
        "--out-storage-options",
        metavar="JSON",
        default=None,
        help="fsspec options for an --out URL when they differ from --root's, e.g. a release "
        "read from a requester-pays gs:// bucket written to your own s3:// bucket (default: "
        "--storage-options)",
    )
    build.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="where the stages run: local (--workers processes on this machine) or ray (one "
        "Ray task per shard; the same output bytes; pip install 'mgll[ray]') (local)",
    )
    build.add_argument(
        "--ray-address",
        metavar="HOST:PORT",
        default=None,
        help="--executor ray: the Ray cluster to join (default: RAY_ADDRESS if set, else a "
        "local Ray instance with --workers CPUs, started and stopped by the build)",
    )
    build.add_argument(
        "--max-image-pixels",
        type=_positive_int,
        default=None,
        metavar="N",
        help="quarantine images of more than N pixels (all frames), read from the file header "
        "before any decoding, e.g. decompression bombs (50000000 = 50 MP; the largest real "
        "radiographs are about 15 MP)",
    )
    source = build.add_argument_group("source options (for the sources that take them)")
    source.add_argument("--images", choices=("jpg", "dicom"), help="image files to read")
    source.add_argument(
        "--crop-borders",
        action="store_true",
        default=None,
        help="crop the black background around fundus photographs",
    )
    source.add_argument("--views", help="comma-separated views to keep, e.g. PA,AP (all)")
    source.add_argument(
        "--labels",
        choices=("chexpert", "negbio", "text", "mesh", "nih", "google"),
        help="where labels come from: MIMIC-CXR chexpert (default), negbio or text (the report "
        "labeler); IU X-ray mesh (its MeSH headings, default) or text; ChestX-ray14 nih "
        "(default) or google (the Google 2019 expert relabels replace four labels)",
    )
    source.add_argument(
        "--section-rules",
        metavar="SECTION_PARSER_PY",
        help="MIMIC-CXR: the official txt/section_parser.py (MIT-LCP/mimic-cxr), whose "
        "per-study special cases are read from it as data (never run)",
    )
    build.add_argument(
        "--push-to-hub",
        metavar="ORG/NAME",
        default=None,
        help="after a successful build, push it to this Hub dataset repo (see `push`)",
    )
    _add_hub_options(build)

    demo = sub.add_parser(
        "demo",
        help="generate a small synthetic ChestX-ray14-shaped release and build it",
        description="Generate a synthetic ChestX-ray14-shaped release (three patient-disjoint "
        "splits, a realistic label mix) under OUT/_raw and build it into OUT.",
    )
    demo.add_argument("--n", type=_positive_int, default=200, help="number of images (200)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (0)")
    demo.add_argument(
        "--learnable",
        action="store_true",
        help="a controlled task: 64-px images whose findings leave distinct visual signs, with "
        "report-like texts naming location and severity (use e.g. --n 2000)",
    )
    _add_build_options(demo, disposable=True)

    sub.add_parser(
        "list",
        help="list the shipped pipelines",
        description="List the shipped pipelines: name, domain, whether the source licence "
        "allows redistribution, and the licence.",
    )

    validate = sub.add_parser(
        "validate",
        help="check a built dataset against the schema",
        description="Check the dataset at OUT: every shard's schema and rows against the "
        "record schema, the card's data files and the manifest's hashes, unique ids and "
        "patient-disjoint splits. Prints each problem; exit status 1 if there is any.",
    )
    validate.add_argument("out", type=Path, help="dataset folder")

    info = sub.add_parser(
        "info",
        help="rows per split and label prevalence of a built dataset",
        description="Print the dataset at OUT in brief: rows per split, and per label the "
        "positives and their share of the annotated rows in each split.",
    )
    info.add_argument("out", type=Path, help="dataset folder")

    push = sub.add_parser(
        "push",
        help="publish a built dataset to a Hugging Face Hub dataset repo",
        description="Upload OUT's card and shards byte for byte (never _build/) in one commit; "
        "unchanged files are skipped and stale remote shards deleted. The source licence "
        "decides: redistribution 'none' allows only --card-only.",
    )
    push.add_argument("out", type=Path, help="dataset folder")
    push.add_argument("--repo-id", required=True, metavar="ORG/NAME", help="dataset repo")
    push.add_argument(
        "--card-only",
        action="store_true",
        help="publish only the card and rebuild recipe, no data (for restricted licences)",
    )
    _add_hub_options(push)

    merge = sub.add_parser(
        "merge",
        help="combine datasets of one domain into one dataset with a config per source",
        description="Copy the shards of datasets A B ... (same schema version, domain, "
        "vocabulary and label names) into OUT under data/{source}/, with a card that has "
        "one config per source and a default config of all.",
    )
    merge.add_argument("inputs", nargs="+", type=Path, metavar="DATASET", help="dataset folders")
    merge.add_argument("--out", required=True, type=Path, help="output dataset folder")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing OUT")

    export = sub.add_parser(
        "export",
        help="export a dataset as webdataset tar shards or the reference MGLL layout",
        description="webdataset: {split}-NNNNNN.tar shards of {key}.png/.json/.txt samples "
        "(open_clip --dataset-type webdataset). mgll-json: the reference MGLL code's layout "
        "(JSON lists, .npz images with key 'image', <list>_train.txt / _val.txt).",
    )
    export.add_argument("out", type=Path, help="dataset folder")
    export.add_argument(
        "--format",
        required=True,
        choices=("webdataset", "mgll-json"),
        help="webdataset tar shards, or the reference MGLL code's mgll-json layout",
    )
    export.add_argument("--out", dest="dest", required=True, type=Path, help="export folder")
    export.add_argument("--split", default=None, help="export only this split")
    export.add_argument(
        "--samples-per-tar",
        type=_positive_int,
        default=1000,
        help="samples per webdataset tar shard (1000)",
    )
    export.add_argument(
        "--list-name",
        default="2level_multi_disease_list",
        help="mgll-json: name of the JSON list (2level_multi_disease_list)",
    )
    export.add_argument("--overwrite", action="store_true", help="replace an existing export")
    return parser


def _add_hub_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument(
        "--token",
        default=None,
        help="Hub token (default: HF_TOKEN or the saved login); never printed",
    )


def _out_storage_options(args: argparse.Namespace) -> dict[str, Any] | None:
    text = getattr(args, "out_storage_options", None)
    if text is None:
        return None
    return parse_storage_options(text, flag="--out-storage-options")


def _add_build_options(
    parser: argparse.ArgumentParser, disposable: bool = False, remote: bool = False
) -> None:
    """The flags every build takes. A `disposable` build (the demo) always replaces its output
    and never quarantines, so it has no --overwrite or --max-errors; a `remote` one (`build`)
    may write to object storage."""
    if remote:
        parser.add_argument(
            "--out",
            required=True,
            type=parse_location,
            help="output dataset folder, or a URL on object storage (s3://BUCKET/PREFIX, ...): "
            "built in a local staging folder, each finished file uploaded",
        )
    else:
        parser.add_argument("--out", required=True, type=Path, help="output dataset folder")
    parser.add_argument(
        "--image-size",
        type=_positive_int,
        default=512,
        help="longest side of stored images, never upscaled (512)",
    )
    parser.add_argument(
        "--image-format",
        choices=("png", "jpeg"),
        default="png",
        help="encoding of stored images (png)",
    )
    parser.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        help="worker processes (1: work in this process)",
    )
    parser.add_argument(
        "--limit",
        type=_positive_int,
        default=None,
        help="build only the first N items (sorted by id)",
    )
    parser.add_argument(
        "--rows-per-shard", type=_positive_int, default=1000, help="rows per Parquet shard (1000)"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="finish an interrupted build (same inputs, options and versions)",
    )
    if not disposable:
        parser.add_argument("--overwrite", action="store_true", help="replace an existing build")
        parser.add_argument(
            "--max-errors",
            type=int,
            default=None,
            help="fail once more than N items are quarantined (default: never)",
        )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _build_options(args: argparse.Namespace):
    from .build.engine import BuildOptions

    # Only `build` has --max-image-pixels; unset, BuildOptions' default (50 MP) applies.
    pixels = getattr(args, "max_image_pixels", None)
    return BuildOptions(
        **({"max_image_pixels": pixels} if pixels is not None else {}),
        image_size=args.image_size,
        image_format=args.image_format,
        workers=args.workers,
        executor=getattr(args, "executor", "local"),  # only `build` has --executor
        ray_address=getattr(args, "ray_address", None),
        limit=args.limit,
        rows_per_shard=args.rows_per_shard,
        resume=args.resume,
        overwrite=args.overwrite,
        max_errors=getattr(args, "max_errors", None),
        progress=False if args.no_progress else None,
        crop_borders=getattr(args, "crop_borders", None),
        storage_options=parse_storage_options(getattr(args, "storage_options", None)),
        out_storage_options=_out_storage_options(args),
        source_options=tuple(
            (key, str(getattr(args, key)))
            for key in ("images", "views", "labels", "section_rules")
            if getattr(args, key, None) is not None
        ),
    )


def run(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit status. User errors raise UserError.

    A write the disk refuses (full, read-only, no permission) is a UserError too: its line
    names the folder the command writes (see `write_error_line`).
    """
    args = _parser().parse_args(argv)
    commands = {
        "list": _list,
        "build": _build,
        "demo": _demo,
        "push": _push,
        "merge": _merge,
        "export": _export,
        "validate": _validate,
        "info": _info,
    }
    try:
        return commands[args.command](args)
    except OSError as err:
        written = args.dest if args.command == "export" else getattr(args, "out", None)
        if args.command in ("validate", "info", "push"):
            written = None  # these write nothing locally: `out` is what they read
        line = write_error_line(err, written)
        if line is None:
            raise
        raise UserError(line) from None


# Why a write fails that a user can fix: a full disk or quota, a read-only file system, a folder
# without write permission. Every other OSError is a bug and keeps its traceback.
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def write_error_line(err: OSError, folder: Path | None) -> str | None:
    """`<folder>: cannot write (No space left on device)` for a write the disk refused in the
    folder a command writes; `<file>: <reason>` for such an error on another file; None for
    any other error."""
    if err.errno not in _DISK_ERRNOS:
        return None
    reason = os.strerror(err.errno)
    where = os.fsdecode(err.filename) if err.filename is not None else None
    if folder is not None:
        root = os.path.abspath(folder)
        if where is None or os.path.commonpath([root, os.path.abspath(where)]) == root:
            return f"{folder}: cannot write ({reason})"
    return f"{where}: {reason}" if where is not None else None


def _list(args: argparse.Namespace) -> int:
    from .build.pipeline import available_pipelines, load_pipeline

    for path in available_pipelines():
        pipeline = load_pipeline(str(path))
        licence = pipeline.license
        redistribution = f"redistribution={licence['redistribution']}"
        print(f"{pipeline.name:16} {pipeline.domain:11} {redistribution:28} {licence['id']}")
    return 0


def _build(args: argparse.Namespace) -> int:
    from .build.engine import build
    from .build.pipeline import load_pipeline

    if args.executor == "ray":  # before any work: Ray is missing, or no cluster answers
        from .build.ray_executor import preflight

        preflight(args.ray_address)
    if args.push_to_hub and is_url(args.out):
        raise UserError(f"{args.out}: --push-to-hub needs a local --out (push reads a folder)")
    summary = build(load_pipeline(args.pipeline), args.root, args.out, _build_options(args))
    print("\n".join(summary.lines()))
    if args.push_to_hub:
        from .publish.hub import push

        push(args.out, args.push_to_hub, private=args.private, token=args.token)
    return 0


def _demo(args: argparse.Namespace) -> int:
    """The demo is disposable: it regenerates its release (kept by --resume) and replaces its
    build."""
    from .build.lock import folder_lock

    args.overwrite = not args.resume
    with folder_lock(args.out):  # held while OUT/_raw is written, not only for the build
        summary = _write_and_build_demo(args)
    print("\n".join(summary.lines()))
    return 0


def _write_and_build_demo(args: argparse.Namespace):
    if args.learnable:
        from .demo.controlled_task import build_learnable

        print(f"writing a learnable synthetic release of {args.n} images to {args.out}/_raw")
        return build_learnable(args.out, args.n, args.seed, _build_options(args))
    from .demo.nih_release import build_demo

    print(f"writing a synthetic ChestX-ray14-shaped release of {args.n} images to {args.out}/_raw")
    return build_demo(args.out, args.n, args.seed, _build_options(args))


def _push(args: argparse.Namespace) -> int:
    from .publish.hub import push

    push(args.out, args.repo_id, private=args.private, token=args.token, card_only=args.card_only)
    return 0


def _merge(args: argparse.Namespace) -> int:
    from .publish.merge import merge

    print("\n".join(merge(args.inputs, args.out, overwrite=args.overwrite)))
    return 0


def _export(args: argparse.Namespace) -> int:
    from .publish.export import export

    lines = export(
        args.out,
        args.format,
        args.dest,
        split=args.split,
        samples_per_tar=args.samples_per_tar,
        list_name=args.list_name,
        overwrite=args.overwrite,
    )
    print("\n".join(lines))
    return 0


def _validate(args: argparse.Namespace) -> int:
    from .publish.inspect import validate_dataset

    problems = validate_dataset(args.out)
    for problem in problems:
        print(problem)
    verdict = f"INVALID, {len(problems)} problem(s)" if problems else "valid"
    print(f"{args.out}: {verdict}")
    return 1 if problems else 0


def _info(args: argparse.Namespace) -> int:
    from .publish.inspect import dataset_info

    print(dataset_info(args.out))
    return 0


def closed_stdout_status() -> int:
    """After a `BrokenPipeError` on stdout: silence stdout and return the exit status, 141.

    Nothing more can reach the reader; stdout is pointed at devnull so that the flush at exit
    does not raise again (`mgll-train` shares this).
    """
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 141


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: user errors become one line on stderr and exit status 2.

    A reader that stops early (`info OUT | head`) closes the pipe: the command then stops
    quietly with status 141 (128 + SIGPIPE), what a shell reports for any tool stopped that
    way, so a script can still tell a cut-short output from a complete one.
    """
    phi_warnings.install()  # before any worker forks: they inherit it
    try:
        status = run(argv)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
    except BrokenPipeError:
        status = closed_stdout_status()
    except UserError as err:
        # A URL's embedded credentials never reach the terminal or a log.
        print(f"mgll-build-dataset: error: {scrub(str(err))}", file=sys.stderr)
        status = 2
    except KeyboardInterrupt:
        print("mgll-build-dataset: interrupted (finish later with --resume)", file=sys.stderr)
        status = 130
    sys.exit(status)
