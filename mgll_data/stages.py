"""Per-item stages: RawItem -> texts -> image -> validated record (DESIGN §3).

Everything here is a pure function of one item and the build context, so it runs unchanged in
the main process, in a process pool, or on a Ray cluster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .errors import ItemError
from .images import EncodedImage, ImagePolicy, process_image
from .items import QuarantineEntry, RawItem
from .schema import dumps_sorted, record_schema, validate_row
from .text import describe_labels, explain_labels, format_category, positive_names
from .vocab import Vocabulary, load_vocabulary


@dataclass(frozen=True)
class BuildContext:
    """What every worker needs besides the item: vocabulary, image policy, text templates."""

    domain: str
    image_policy: ImagePolicy
    texts: dict[str, Any] = field(default_factory=dict)

    @property
    def vocab(self) -> Vocabulary:
        return load_vocabulary(self.domain)


@dataclass
class Task:
    """One unit of work: an item, with its image bytes when they came out of an archive."""

    position: tuple[str, int]  # (split, index within the split's sorted items)
    item: RawItem
    image_bytes: bytes | None = None
    error: str | None = None  # set when the image could not be found, e.g. in no archive


@dataclass
class Outcome:
    """The result of one task: a record, or the quarantine entry explaining why there is none."""

    position: tuple[str, int]
    record: dict[str, Any] | None
    quarantine: QuarantineEntry | None


def label_vector(labels: dict[str, float], vocab: Vocabulary) -> list[float]:
    """The fixed-length labels vector: the item's values in vocabulary order, NaN elsewhere."""
    unknown = sorted(set(labels) - set(vocab.names))
    if unknown:
        raise ItemError("labels", f"labels not in the {vocab.domain} vocabulary: {unknown}")
    return [float(labels.get(name, math.nan)) for name in vocab.names]


def label_texts(
    labels: list[float], vocab: Vocabulary, texts: dict[str, Any]
) -> tuple[list[str], list[str]]:
    """The three texts of a label-only source, and the origin of each."""
    return (
        [
            format_category(labels, vocab),
            describe_labels(labels, vocab, texts["description"]),
            explain_labels(labels, vocab),
        ],
        ["labels", "label_template", "vocabulary"],
    )


def rescale_boxes(
    boxes: list[dict[str, Any]], frame: tuple[int, int], image: EncodedImage
) -> list[dict[str, Any]]:
    """Boxes from pixels of `frame` (width, height) to pixels of the stored image."""
    sx = image.width / frame[0]
    sy = image.height / frame[1]
    return [
        {
            "label": box["label"],
            "x": round(box["x"] * sx, 2),
            "y": round(box["y"] * sy, 2),
            "w": round(box["w"] * sx, 2),
            "h": round(box["h"] * sy, 2),
        }
        for box in boxes
    ]


def build_record(task: Task, ctx: BuildContext) -> dict[str, Any]:
    """Run the text and image stages on one item and assemble its validated record."""
    item, vocab = task.item, ctx.vocab
    if task.error:
        raise ItemError("image", task.error)
    labels = label_vector(item.labels, vocab)
    texts, origins = label_texts(labels, vocab, ctx.texts)
    if any(not t.strip() for t in texts):
        raise ItemError("text", "a text is empty after every fallback")
    source = task.image_bytes if task.image_bytes is not None else item.image.path
    image = process_image(source, ctx.image_policy)
    extra = dict(item.extra)
    if item.boxes:
        frame = item.box_frame or (image.orig_width, image.orig_height)
        extra["boxes"] = rescale_boxes(item.boxes, frame, image)
        extra["box_source_frame"] = list(frame)
    record = {
        "id": item.id,
        "source": item.source,
        "image": {"bytes": image.data, "path": f"{item.id}.{image.extension}"},
        "width": image.width,
        "height": image.height,
        "orig_width": image.orig_width,
        "orig_height": image.orig_height,
        "modality": item.modality,
        "view": item.view,
        "laterality": item.laterality,
        "patient_id": item.patient_id,
        "study_id": item.study_id,
        "split": item.split,
        "labels": labels,
        "positive_labels": positive_names(labels, vocab),
        "text_category": texts[0],
        "text_description": texts[1],
        "text_explanation": texts[2],
        "text_origin": origins,
        "age_years": item.age_years,
        "sex": item.sex,
        "extra": dumps_sorted(extra),
    }
    problems = validate_row(record, record_schema(len(vocab)), vocab.names)
    if problems:
        raise ItemError("record", "; ".join(problems))
    return record


def run_task(task: Task, ctx: BuildContext) -> Outcome:
    """Build one record, turning a per-item failure into a quarantine entry."""
    try:
        return Outcome(task.position, build_record(task, ctx), None)
    except ItemError as err:
        entry = QuarantineEntry(task.item.id, task.item.image.describe(), err.stage, err.reason)
        return Outcome(task.position, None, entry)
