"""What the Kaggle chest DICOM releases with regions share (SIIM-ACR, RSNA Pneumonia).

Both ship one annotation CSV with one row per region of an image (or one row saying it has
none) and a folder tree of `<id>.dcm` files; both are label-only, give regions in pixels of the
1024 x 1024 DICOMs, and have no patient-disjoint split of their own, so splits are a salted hash
of one id per patient. A subclass reads one image's rows into an `Annotation`; this class does
the rest: the layout check, the grouping, the quarantine and the items.
"""

from __future__ import annotations

from abc import abstractmethod
from collections import defaultdict
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pandas as pd

from ..build.items import ImageRef, QuarantineEntry, RawItem
from ..errors import UserError
from ..imaging.masks import MaskSpec
from ..record import MASK_COLUMN
from .base import ScanResult, Source
from .splits import hash_split
from .tables import read_csv_table
from .toolkit import find_file, index_images

DEFAULT_FRAME = (1024, 1024)  # both releases' DICOMs, and so their annotations
Rows = list[tuple[int, dict[str, Any]]]  # one image's CSV rows, each with its line number


@dataclass
class Annotation:
    """What one image's rows say: its labels, its mask and any other RawItem fields."""

    labels: dict[str, float]
    mask: MaskSpec
    fields: dict[str, Any] = field(default_factory=dict)


class KaggleDicomSource(Source):
    """A release of `<id>.dcm` files anywhere under the root and one annotation CSV whose first
    required column is the image id."""

    OPTIONAL_COLUMNS: ClassVar[tuple[str, ...]] = (MASK_COLUMN,)
    TABLE_NAMES: ClassVar[tuple[str, ...]] = ()  # the annotation CSV's names, preferred first
    TABLE_COLUMNS: ClassVar[tuple[str, ...]] = ()  # the id column first
    RELEASE: ClassVar[str] = ""  # the release's name in messages

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.label_map = self.required_label_map()
        self.frame = self.pipeline.labels.box_frame or DEFAULT_FRAME
        self.table_path = find_file(self.root, self.TABLE_NAMES, max_depth=2)

    @abstractmethod
    def annotate(self, rows: Rows) -> Annotation | str:
        """One image's rows as an Annotation, or the reason (naming the line) they cannot be."""

    def scan(self) -> ScanResult:
        table, dicoms = self._read_release()
        assert self.table_path is not None
        rows: dict[str, Rows] = defaultdict(list)
        for line, row in zip(table.index, table.to_dict("records"), strict=True):
            rows[str(row[self.TABLE_COLUMNS[0]]).strip()].append((line, row))
        result = ScanResult(items=[], inputs=[self.table_path])
        for native_id in sorted(rows):
            annotation = self.annotate(rows[native_id])
            item_id = f"{self.pipeline.name}:{native_id}"
            where = f"{self.table_path.name} {native_id}"
            path = dicoms.get(native_id.lower())
            if isinstance(annotation, str):
                result.quarantine.append(QuarantineEntry(item_id, where, "labels", annotation))
            elif path is None:
                reason = f"missing DICOM: no {native_id}.dcm under the release"
                result.quarantine.append(QuarantineEntry(item_id, where, "scan", reason))
            else:
                result.items.append(self._item(item_id, native_id, path, annotation))
        result.notes.append(self._note(len(table), rows, dicoms))
        return result

    def split_of(self, key: str) -> str:
        """The split of a patient (or image) key: a salted SHA-256, never Python's hash()."""
        splits = self.pipeline.splits
        return hash_split(key, splits.hash_salt, splits.validation_fraction, splits.test_fraction)

    def ordered_labels(self, names: Sequence[str]) -> list[str]:
        """`names` in vocabulary order."""
        return [n for n in self.vocab.names if n in set(names)]

    def where(self, line: int) -> str:
        """A CSV line, as reasons name it."""
        assert self.table_path is not None
        return f"{self.table_path.name} line {line}"

    def _read_release(self) -> tuple[pd.DataFrame, dict[str, str]]:
        """The annotation table and every DICOM by lower-case stem; a UserError naming what
        is missing when the layout is not the release's."""
        dicoms = {stem: paths[0] for stem, paths in index_images(self.root, (".dcm",)).items()}
        missing = []
        if self.table_path is None:
            missing.append(f"{self.TABLE_NAMES[0]} (or .gz)")
        if not dicoms:
            missing.append("DICOM files (<id>.dcm)")
        if missing:
            raise UserError(
                f"{self.root}: not a {self.RELEASE} release; missing " + ", ".join(missing)
            )
        assert self.table_path is not None
        return read_csv_table(self.table_path, self.TABLE_COLUMNS), dicoms

    def _item(self, item_id: str, native_id: str, path: str, annotation: Annotation) -> RawItem:
        return RawItem(
            id=item_id,
            source=self.pipeline.name,
            split=self.split_of(annotation.fields.get("patient_id") or native_id),
            image=ImageRef(path, format="dicom"),
            labels=annotation.labels,
            mask=annotation.mask,
            box_frame=self.frame,
            **annotation.fields,
        )

    def _note(self, rows: int, ids: Collection[str], dicoms: dict[str, str]) -> str:
        assert self.table_path is not None
        unlisted = len(set(dicoms) - {i.lower() for i in ids})
        return (
            f"{self.table_path.name}: {rows} rows, {len(ids)} images; {len(dicoms)} DICOM files "
            f"found, {unlisted} not in the table (ignored)"
        )
