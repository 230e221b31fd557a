"""What a Source yields: one `RawItem` per image, before any text or image work."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..imaging.masks import MaskSpec


@dataclass(frozen=True)
class ImageRef:
    """Where an item's image lives: a file, or a member of an archive file."""

    path: str
    member: str | None = None
    format: str = "auto"  # "dicom", or "auto": DICOM when the name ends in .dcm / .dcm.gz

    @property
    def is_dicom(self) -> bool:
        name = (self.member or self.path).lower()
        return self.format == "dicom" or name.endswith((".dcm", ".dcm.gz", ".dicom"))

    def describe(self) -> str:
        return f"{self.path}!{self.member}" if self.member else self.path


@dataclass
class RawItem:
    """One image with its metadata, labels and (for report sources) report sections.

    `labels` maps canonical label names to 1/0/-1; a label absent from the mapping is NaN.
    `boxes` are in pixels of `box_frame` (default: the decoded source image); they are rescaled
    to the stored image.
    """

    id: str
    source: str
    split: str
    image: ImageRef
    labels: dict[str, float]
    patient_id: str | None = None
    study_id: str | None = None
    view: str | None = None
    modality: str | None = None
    laterality: str | None = None
    age_years: float | None = None
    sex: str | None = None
    sections: dict[str, str] = field(default_factory=dict)
    boxes: list[dict[str, Any]] = field(default_factory=list)
    box_frame: tuple[int, int] | None = None  # (width, height) boxes refer to; None: the image's
    mask: MaskSpec | None = None  # segmentation regions, for sources that fill the mask column
    extra: dict[str, Any] = field(default_factory=dict)
    # Where a source that supplies its own image bytes (MIDRC's nested zips) finds this item's
    # image; it travels with the item, so a de-duplicated item always keeps its own file.
    location: Any = None


@dataclass(frozen=True)
class QuarantineEntry:
    """One item that could not become a record, and why."""

    id: str
    path: str
    stage: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"id": self.id, "path": self.path, "stage": self.stage, "reason": self.reason}
