"""What every fundus reader shares: split settings, the item shape and quarantine entries."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ...build.items import QuarantineEntry, RawItem
from ..base import ScanResult, Source
from ..splits import hash_split

# Every fundus record asserts exactly one of these.
TOP = ("Normal", "Abnormal")


class FundusSource(Source):
    """Shared plumbing: hash splits, vocabulary order, quarantine and the fundus item shape."""

    def split_of(self, key: str) -> str:
        """train / validation / test by a salted hash of `key` (a patient, an image)."""
        splits = self.pipeline.splits
        return hash_split(key, splits.hash_salt, splits.validation_fraction, splits.test_fraction)

    def vocabulary_order(self, targets: Iterable[str]) -> list[str]:
        """`targets` that are vocabulary labels, in vocabulary order."""
        wanted = set(targets)
        return [name for name in self.vocab.names if name in wanted]

    def quarantine(self, result: ScanResult, item_id: str, where: str, reason: str) -> None:
        result.quarantine.append(QuarantineEntry(item_id, where, "scan", reason))

    def item(self, **fields: Any) -> RawItem:
        """A fundus photograph (modality `OP`) of this pipeline's source."""
        return RawItem(source=self.pipeline.name, modality="OP", **fields)
