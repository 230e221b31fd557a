"""Images that fail to decode during training: skipped, counted, and a limit (`--max-bad-samples`).

A data worker that cannot decode a record's image takes the next row of the index in its place
(so every batch keeps its size: ranks gather equal batches) and reports what it skipped in the
sample's ``skipped`` list; `collate` joins them into the batch. The main process counts the
distinct records skipped with :class:`BadSampleGuard`, warns once for each, and stops the run
with one line once more than the limit were skipped. A build already quarantines unreadable
images, so one seen here was damaged after the build (disk, copy); a few are skipped, a broken
corpus stops the run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

from ..errors import UserError

log = logging.getLogger("mgll_train")

# Rows a worker tries in place of one unreadable image before it gives up on the batch.
MAX_SUBSTITUTES = 8

Skipped = tuple[str, str, str]  # (record id, Parquet file, why it did not decode)


class BadSampleGuard:
    """Counts the distinct unreadable records the batches report; fails past ``limit``."""

    def __init__(self, limit: int):
        self.limit = limit
        self.seen: set[str] = set()

    @property
    def count(self) -> int:
        """Distinct records skipped so far in this process."""
        return len(self.seen)

    def watch(self, batches: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Yield ``batches`` unchanged, counting and checking what each one skipped."""
        for batch in batches:
            for record_id, file, reason in batch.get("skipped", ()):
                self._add(record_id, file, reason)
            if batch.get("unusable"):
                record_id, file, reason = batch["skipped"][-1]
                raise UserError(
                    f"{file}: {MAX_SUBSTITUTES} images in a row do not decode (last: "
                    f"{record_id}: {reason}); expected PNG or JPEG bytes in the image column"
                )
            yield batch

    def _add(self, record_id: str, file: str, reason: str) -> None:
        if record_id in self.seen:
            return
        self.seen.add(record_id)
        log.warning("skipped %s in %s: its image does not decode (%s)", record_id, file, reason)
        if self.count > self.limit:
            raise UserError(
                f"{file}: {self.count} unreadable images skipped, more than --max-bad-samples "
                f"{self.limit} (last: {record_id}: {reason}); expected decodable images"
            )

    def note(self) -> str:
        """What the final summary adds: how many images were skipped (nothing when none)."""
        return f"; {self.count} unreadable images skipped" if self.count else ""
