"""The build engine: Source -> stages -> records -> shards, with manifest, quarantine and resume.

Output is deterministic: items are sorted by id, each split's items are cut into
shards by position, outcomes are written in position order whatever order they complete in,
and every JSON file has sorted keys. Timestamps live only in the manifest.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
from tqdm import tqdm

from ..errors import UserError
from ..imaging.raster import DEFAULT_MAX_PIXELS, ImagePolicy
from ..publish.card import write_card
from ..record import OPTIONAL_COLUMNS_KEY, SPLITS
from ..schema import dumps_sorted, schema_of_block, schema_version
from ..sources import make_source
from ..storage import Location, is_url, release_root
from ..vocab import Vocabulary, load_vocabulary
from .executors import ExecutorSpec, execute
from .fingerprint import file_stamps, library_versions
from .fingerprint import fingerprint as _fingerprint
from .items import QuarantineEntry, RawItem
from .lock import folder_lock
from .pipeline import Pipeline
from .remote_output import RemoteOutput, staged_output
from .stages import BuildContext, Task
from .writer import ShardPlan, ShardStats, ShardWriter, file_sha256, write_json

DEFAULT_ROWS_PER_SHARD = 1000


@dataclass(frozen=True)
class BuildOptions:
    """Options of one build. Those in `fingerprint_options()` change the output bytes."""

    image_size: int = 512
    image_format: str = "png"
    workers: int = 1
    limit: int | None = None
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD
    resume: bool = False
    overwrite: bool = False
    max_errors: int | None = None
    progress: bool | None = None  # None: show a bar when stderr is a terminal
    source_options: tuple[tuple[str, str], ...] = ()  # e.g. (("images", "dicom"),)
    crop_borders: bool | None = None  # None: as the pipeline's `image.crop_borders` says
    max_image_pixels: int = DEFAULT_MAX_PIXELS  # larger images are quarantined, never decoded
    # Where the stages run (executors.py); output and fingerprint are the same on either.
    executor: str = "local"
    ray_address: str | None = None
    # fsspec options for a release or output on object storage; never printed or written.
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    # Options for an output on object storage when they differ (None: `storage_options`).
    out_storage_options: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    def fingerprint_options(self) -> dict[str, Any]:
        return {
            "image_size": self.image_size,
            "image_format": self.image_format,
            "limit": self.limit,
            "rows_per_shard": self.rows_per_shard,
            "source_options": dict(self.source_options),
            "crop_borders": self.crop_borders,
            "max_image_pixels": self.max_image_pixels,
        }

    def executor_spec(self) -> ExecutorSpec:
        """Where the stages run; not part of the fingerprint, so either executor resumes."""
        return ExecutorSpec(self.executor, self.workers, self.ray_address, self.rows_per_shard)


@dataclass
class BuildSummary:
    """What a build produced."""

    out: Location  # a folder, or the URL of a build on object storage
    rows: dict[str, int]
    quarantined: int
    reasons: Counter
    shards_written: int
    shards_kept: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        total = sum(self.rows.values())
        per_split = ", ".join(f"{s} {n}" for s, n in self.rows.items() if n)
        rate = (total / self.seconds) if self.seconds > 0 else 0.0
        out = [
            f"built {total} records ({per_split}) into {self.out} in {self.seconds:.1f} s "
            f"({rate:.1f} records/s); shards written {self.shards_written}, "
            f"kept {self.shards_kept}",
        ]
        out += [f"note: {n}" for n in self.notes]
        if self.quarantined:
            out.append(
                f"quarantined {self.quarantined} items "
                f"(see {str(self.out).rstrip('/')}/_build/quarantine.jsonl):"
            )
            out += [f"  {n} x {reason}" for reason, n in self.reasons.most_common(10)]
        return out


def plan_shards(items: list[RawItem], rows_per_shard: int) -> list[tuple[ShardPlan, list[RawItem]]]:
    """Cut each split's sorted items into consecutive shards; the count is known up front."""
    plans = []
    for split in SPLITS:
        members = [item for item in items if item.split == split]
        count = math.ceil(len(members) / rows_per_shard)
        for index in range(count):
            chunk = members[index * rows_per_shard : (index + 1) * rows_per_shard]
            plans.append(
                (ShardPlan(split, index, count, index * rows_per_shard, len(chunk)), chunk)
            )
    return plans


class OutputDir:
    """The build directory: `data/`, `README.md`, and `_build/` (manifest, quarantine, state)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.data = self.root / "data"
        self.build = self.root / "_build"
        self.tmp = self.build / "tmp"
        self.shard_state = self.build / "shards"
        self.manifest = self.build / "manifest.json"
        self.quarantine = self.build / "quarantine.jsonl"
        # Called with each output file once it is final (a build on object storage uploads it).
        self.publish: Callable[[Path], None] = lambda path: None

    def prepare(self, fingerprint: str, resume: bool, overwrite: bool) -> dict[str, ShardStats]:
        """Make the directory ready; return the finished shards a resumed build may keep."""
        existing = self.manifest.is_file() or any(self.data.glob("*.parquet"))
        if resume and not self.manifest.is_file():
            raise UserError(f"{self.root}: nothing to resume (no _build/manifest.json)")
        if resume:
            previous = json.loads(self.manifest.read_text()).get("fingerprint")
            if previous != fingerprint:
                raise UserError(
                    f"{self.manifest}: the build there used other inputs, options or library "
                    "versions; run without --resume (and with --overwrite) to rebuild it"
                )
        elif existing and not overwrite:
            raise UserError(
                f"{self.root}: already holds a build; use --resume to finish it "
                "or --overwrite to replace it"
            )
        elif existing:
            shutil.rmtree(self.data, ignore_errors=True)
            shutil.rmtree(self.build, ignore_errors=True)
            (self.root / "README.md").unlink(missing_ok=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
        for folder in (self.data, self.tmp, self.shard_state):
            folder.mkdir(parents=True, exist_ok=True)
        return self._finished_shards() if resume else {}

    def _finished_shards(self) -> dict[str, ShardStats]:
        finished = {}
        for state in sorted(self.shard_state.glob("*.json")):
            stats = ShardStats(**json.loads(state.read_text()))
            shard = self.data / stats.name
            if shard.is_file() and file_sha256(shard) == stats.sha256:
                finished[stats.name] = stats
        return finished

    def remove_stale(self, planned: set[str]) -> None:
        """Drop shard files and states that the plan does not name (e.g. after a crash)."""
        for shard in self.data.glob("*.parquet"):
            if shard.name not in planned:
                shard.unlink()
        for state in self.shard_state.glob("*.json"):
            if state.stem not in planned:
                state.unlink()

    def save_shard(self, stats: ShardStats) -> None:
        state = self.shard_state / f"{stats.name}.json"
        write_json(state, stats.to_json())
        self.publish(self.data / stats.name)
        self.publish(state)


def build(pipeline: Pipeline, root: Location, out: Location, options: BuildOptions) -> BuildSummary:
    """Build the dataset of `pipeline` from the raw release at `root` into `out`.

    Either may be a URL on object storage (`s3://`, `gs://`, `hf://`, ...). A local `out` is
    held locked for the whole build: a second command writing or reading it is refused.
    """
    if is_url(out):
        resume, overwrite = options.resume, options.overwrite
        with staged_output(
            str(out), _out_options(options), resume=resume, overwrite=overwrite
        ) as remote:
            summary = _build(pipeline, root, remote.staging, options, remote)
        return replace(summary, out=remote.url)
    with folder_lock(out):
        return _build(pipeline, root, Path(out), options)


def _out_options(options: BuildOptions) -> dict[str, Any]:
    if options.out_storage_options is None:
        return options.storage_options
    return options.out_storage_options


def _build(
    pipeline: Pipeline,
    root: Location,
    out: Path,
    options: BuildOptions,
    remote: RemoteOutput | None = None,
) -> BuildSummary:
    started = time.time()
    vocab = load_vocabulary(pipeline.domain)
    root = release_root(root, options.storage_options)
    source = make_source(pipeline, root, vocab, dict(options.source_options))
    scan = source.scan()
    items, duplicates = _dedupe(sorted(scan.items, key=lambda i: i.id))
    if options.limit is not None:
        items = items[: options.limit]
    plans = plan_shards(items, options.rows_per_shard)
    fingerprint = _fingerprint(pipeline, vocab, options, scan, items, root)

    output = OutputDir(out)
    if remote is not None:
        output.publish = remote.upload
    finished = output.prepare(fingerprint, options.resume, options.overwrite)
    planned_names = {plan.name for plan, _ in plans}
    output.remove_stale(planned_names)
    finished = {name: s for name, s in finished.items() if name in planned_names}
    manifest = _start_manifest(output, fingerprint, pipeline, options)

    mgll_block = _mgll_block(vocab, source.annotated_labels(), source.OPTIONAL_COLUMNS)
    todo = [(plan, chunk) for plan, chunk in plans if plan.name not in finished]
    # Quarantine paths are relative to the release root: the output names no local folder or URL.
    relative = file_stamps(root).relative
    early = [_relative_entry(q, relative) for q in scan.quarantine + duplicates]
    arrow_schema = schema_of_block(mgll_block).arrow_schema(mgll_block)
    run = _ShardRun(output, arrow_schema, options, pipeline, relative)
    tasks = source.tasks(_planned(todo), scan.archives)
    ctx = _context(pipeline, vocab, options, root, tuple(source.OPTIONAL_COLUMNS))
    stats = run.write(tasks, todo, early, finished, ctx)

    all_stats = [stats[plan.name] for plan, _ in plans]
    entries = [q.to_json() for q in early] + [q for s in all_stats for q in s.quarantine]
    entries.sort(key=lambda q: (q["id"], q["stage"]))
    output.quarantine.write_text("".join(dumps_sorted(q) + "\n" for q in entries))
    rows = {
        split: sum(s.rows for p, s in zip(plans, all_stats, strict=True) if p[0].split == split)
        for split in SPLITS
    }
    write_card(out, pipeline, vocab, mgll_block, plans=[p for p, _ in plans], stats=all_stats)
    reasons = Counter(_reason_kind(q["reason"]) for q in entries)
    manifest.update(
        complete=True,
        finished_at=_now(),
        counts={"rows": rows, "quarantined": len(entries), "items": len(items)},
        quarantine_reasons=dict(reasons),
        shards=[{"path": f"data/{s.name}", "rows": s.rows, "sha256": s.sha256} for s in all_stats],
        card_sha256=file_sha256(out / "README.md"),
        notes=scan.notes,
    )
    write_json(output.manifest, manifest)
    if remote is not None:
        remote.finish(output.manifest)
    return BuildSummary(
        out=out,
        rows=rows,
        quarantined=len(entries),
        reasons=reasons,
        shards_written=len(todo),
        shards_kept=len(finished),
        seconds=time.time() - started,
        notes=scan.notes,
    )


def _start_manifest(
    output: OutputDir, fingerprint: str, pipeline: Pipeline, options: BuildOptions
) -> dict[str, Any]:
    """Write (and publish) the manifest of a build under way; return it for completion."""
    manifest: dict[str, Any] = {
        "complete": False,
        "fingerprint": fingerprint,
        "pipeline": pipeline.name,
        "config": pipeline.raw,
        "options": options.fingerprint_options(),
        "versions": library_versions(),
        "started_at": _now(),
    }
    write_json(output.manifest, manifest)
    output.publish(output.manifest)
    return manifest


def _mgll_block(
    vocab: Vocabulary, annotated: list[str], optional_columns: tuple[str, ...]
) -> dict[str, Any]:
    """The `mgll` block of the Parquet schema metadata."""
    block: dict[str, Any] = {
        "schema_version": schema_version(),
        "domain": vocab.domain,
        "vocab_version": vocab.version,
        "label_names": vocab.names,
        "annotated_labels": annotated,
    }
    if optional_columns:  # absent otherwise: builds without them keep their bytes
        block[OPTIONAL_COLUMNS_KEY] = list(optional_columns)
    return block


def _relative_entry(entry: QuarantineEntry, relative: Callable[[str], str]) -> QuarantineEntry:
    """`entry` with its path relative to the release root (an archive member keeps `!name`)."""
    path, bang, member = entry.path.partition("!")
    return replace(entry, path=relative(path) + bang + member)


def _context(
    pipeline: Pipeline,
    vocab: Vocabulary,
    options: BuildOptions,
    root: Path,
    optional_columns: tuple[str, ...] = (),
) -> BuildContext:
    """What the per-item stages need: the domain, the image policy and the text templates."""
    image = pipeline.image
    crop = image.crop_borders if options.crop_borders is None else options.crop_borders
    return BuildContext(
        domain=vocab.domain,
        image_policy=ImagePolicy(
            image_size=options.image_size,
            format=options.image_format,
            color=image.color,
            crop_borders=bool(crop),
            max_pixels=options.max_image_pixels,
        ),
        release_root=str(root),
        texts=pipeline.texts.templates(),
        image=image,
        optional_columns=optional_columns,
        # The root's own options: --storage-options plus credentials its URL carried.
        storage_options=dict(root.storage_options) if is_url(root) else options.storage_options,
    )


def _planned(todo: list[tuple[ShardPlan, list[RawItem]]]) -> list[tuple[tuple[str, int], RawItem]]:
    """Each item to build with its position: (split, index within the split)."""
    return [((p.split, p.first + k), item) for p, chunk in todo for k, item in enumerate(chunk)]


class _ShardRun:
    """Runs the stages over the shards still to write, with a progress bar and `--max-errors`."""

    def __init__(
        self,
        output: OutputDir,
        arrow_schema: pa.Schema,
        options: BuildOptions,
        pipeline: Pipeline,
        relative: Callable[[str], str] = str,
    ):
        self.output, self.arrow_schema, self.options = output, arrow_schema, options
        self.pipeline, self.relative = pipeline, relative

    def write(
        self,
        tasks: Iterator[Task],
        todo: list[tuple[ShardPlan, list[RawItem]]],
        early: list[QuarantineEntry],
        finished: dict[str, ShardStats],
        ctx: BuildContext,
    ) -> dict[str, ShardStats]:
        """Write every shard in `todo`; return the stats of all shards, finished ones included."""
        writers: dict[tuple[str, int], ShardWriter] = {}  # position -> the writer of its shard
        for plan, chunk in todo:
            writer = ShardWriter(plan, self.arrow_schema, self.output.tmp, self.output.data)
            writers.update({(plan.split, plan.first + k): writer for k in range(len(chunk))})
        stats = dict(finished)
        quarantined = len(early) + sum(len(s.quarantine) for s in finished.values())
        if early:
            _check_errors(quarantined, self.options.max_errors, early[-1])
        progress = self.options.progress
        bar = tqdm(
            total=sum(len(chunk) for _, chunk in todo),
            unit="img",
            desc=f"build {self.pipeline.name}",
            disable=None if progress is None else not progress,
        )
        try:
            for outcome in execute(tasks, ctx, self.options.executor_spec()):
                writer = writers.pop(outcome.position)
                writer.add(outcome.position[1], outcome.record)
                if outcome.quarantine is not None:
                    writer.quarantine.append(_relative_entry(outcome.quarantine, self.relative))
                    quarantined += 1
                    _check_errors(quarantined, self.options.max_errors, outcome.quarantine)
                if writer.done:
                    shard = writer.finish()
                    self.output.save_shard(shard)
                    stats[shard.name] = shard
                bar.update(1)
                bar.set_postfix(quarantined=quarantined, refresh=False)
        finally:
            bar.close()
        return stats


def _check_errors(quarantined: int, max_errors: int | None, last: QuarantineEntry) -> None:
    if max_errors is not None and quarantined > max_errors:
        raise UserError(
            f"{quarantined} items quarantined, more than --max-errors {max_errors}; "
            f"last: {last.id}: {last.reason} (finish the build with --resume after fixing it)"
        )


def _dedupe(items: list[RawItem]) -> tuple[list[RawItem], list[QuarantineEntry]]:
    """Keep the first item of each id; quarantine the rest (ids must be unique)."""
    kept: list[RawItem] = []
    dropped = []
    for item in items:
        if kept and kept[-1].id == item.id:
            dropped.append(
                QuarantineEntry(
                    item.id,
                    item.image.describe(),
                    "scan",
                    "duplicate id: another row has the same image",
                )
            )
        else:
            kept.append(item)
    return kept, dropped


def _reason_kind(reason: str) -> str:
    """Group reasons for the summary: the text before the first '(' or ':' detail."""
    return reason.split(" (")[0].split(": ")[0]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
