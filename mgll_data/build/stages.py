"""Per-item stages: RawItem -> texts -> image -> validated record
(`docs/architecture.md`, "Data flow").

Everything here is a pure function of one item and the build context, so it runs unchanged in
the main process, in a process pool, or on a Ray cluster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from ..errors import ItemError
from ..imaging.files import open_release_file, read_remote_file
from ..imaging.masks import render_mask
from ..imaging.raster import EncodedImage, ImagePolicy, process_image
from ..record import MASK_COLUMN
from ..schema import dumps_sorted, record_schema, validate_row
from ..storage import is_url
from ..text.templates import describe_labels, explain_labels, format_category, positive_names
from ..vocab import Vocabulary, load_vocabulary
from .items import QuarantineEntry, RawItem
from .pipeline import ImageConfig


@dataclass(frozen=True)
class BuildContext:
    """What every worker needs besides the item: vocabulary, image policy, text templates."""

    domain: str
    image_policy: ImagePolicy
    texts: dict[str, Any] = field(default_factory=dict)
    image: ImageConfig = field(default_factory=ImageConfig)  # the pipeline's `image` block
    # The release folder: image files that resolve outside it are refused (None: not checked).
    release_root: str | None = None
    # The optional record columns this build has (schemas/record.yaml), e.g. ("mask",).
    optional_columns: tuple[str, ...] = ()
    # fsspec options for a release on object storage (`--storage-options`); never printed.
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)

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


def build_texts(
    labels: list[float], sections: dict[str, str], vocab: Vocabulary, config: dict[str, Any]
) -> tuple[list[str], list[str]]:
    """The three texts and the origin of each.

    The category always comes from the labels (the shared formatter). Description and
    explanation take the first non-empty item section named in the pipeline's
    `texts.description.sections` / `texts.explanation.sections` (e.g. impression, then
    last_paragraph; a MIDRC study description); without one they are built from the labels
    (the description template) and from the vocabulary (the explanations of the positives).
    """
    description_config = config.get("description", {})
    explanation_config = config.get("explanation", {})
    description, description_origin = _first_section(sections, description_config)
    if description is None:
        description, description_origin = (
            describe_labels(labels, vocab, description_config),
            ("label_template"),
        )
    explanation, explanation_origin = _first_section(sections, explanation_config)
    if explanation is None:
        explanation, explanation_origin = explain_labels(labels, vocab), "vocabulary"
    return (
        [format_category(labels, vocab), description, explanation],
        ["labels", description_origin, explanation_origin],
    )


def _first_section(sections: dict[str, str], config: dict[str, Any]) -> tuple[str | None, str]:
    for name in config.get("sections", ()):
        text = " ".join(str(sections.get(name) or "").split())
        if text:
            return text, name
    return None, ""


def load_image(task: Task, ctx: BuildContext) -> tuple[EncodedImage, dict[str, Any]]:
    """The image stage: DICOM through the DICOM stage, anything else through the raster one.

    Returns the encoded image and, for DICOM, the whitelisted header fields. An image file is
    opened here for every source (`imaging/files.py`): a FIFO, socket, device, folder or a
    symlink out of the release is quarantined with its reason, never read.
    """
    ref = task.item.image
    if task.image_bytes is not None:
        return _decode(task.image_bytes, ref.is_dicom, ctx)
    what = "DICOM file" if ref.is_dicom else "image file"
    if is_url(ref.path):
        data = read_remote_file(ref.path, ctx.release_root, ctx.storage_options, what=what)
        return _decode(data, ref.is_dicom, ctx)
    with open_release_file(ref.path, ctx.release_root, what=what) as file:
        return _decode(file, ref.is_dicom, ctx)


def _decode(
    source: bytes | BinaryIO, is_dicom: bool, ctx: BuildContext
) -> tuple[EncodedImage, dict[str, Any]]:
    if is_dicom:
        # imported on first use: pydicom and its codecs take a fresh Ray worker ~0.3 s to
        # import, and most releases hold no DICOM
        from ..imaging.dicom import process_dicom

        return process_dicom(
            source,
            ctx.image_policy,
            skip_for_processing=ctx.image.skip_for_processing,
            voi=ctx.image.voi,
        )
    return process_image(source, ctx.image_policy), {}


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


def mask_column(item: RawItem, image: EncodedImage, ctx: BuildContext) -> dict[str, Any] | None:
    """The item's mask at the stored image's size (None when its source gave none)."""
    if item.mask is None:
        return None
    if ctx.image_policy.crop_borders:  # the crop box is not known here: the mask could not follow
        raise ItemError("mask", "a segmentation mask cannot follow --crop-borders")
    source_size = (image.orig_width, image.orig_height)
    data = render_mask(item.mask, source_size, (image.width, image.height))
    return {"bytes": data, "path": f"{item.id}.{MASK_COLUMN}.png"}


def build_record(task: Task, ctx: BuildContext) -> dict[str, Any]:
    """Run the text and image stages on one item and assemble its validated record."""
    item, vocab = task.item, ctx.vocab
    if task.error:
        raise ItemError("image", task.error)
    labels = label_vector(item.labels, vocab)
    texts, origins = build_texts(labels, item.sections, vocab, ctx.texts)
    if any(not t.strip() for t in texts):
        raise ItemError("text", "a text is empty after every fallback")
    image, dicom_fields = load_image(task, ctx)
    extra = dict(item.extra)
    if dicom_fields:
        extra["dicom"] = dicom_fields
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
    if MASK_COLUMN in ctx.optional_columns:
        record[MASK_COLUMN] = mask_column(item, image, ctx)
    schema = record_schema(len(vocab), ctx.optional_columns)
    problems = validate_row(record, schema, vocab.names)
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
