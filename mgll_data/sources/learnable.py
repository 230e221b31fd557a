"""The controlled task's release (`mgll-build-dataset demo --learnable`): ChestX-ray14's layout
plus `reports.jsonl`, whose report-like texts become the description and explanation and whose
run-length mask (the drawn findings' regions) becomes the `mask` column."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

from ..build.items import QuarantineEntry
from ..errors import UserError
from ..imaging.masks import MaskSpec, parse_siim_rle
from ..record import MASK_COLUMN
from .base import ScanResult
from .chestxray14 import ChestXray14Source

REPORTS = "reports.jsonl"


class LearnableSource(ChestXray14Source):
    """The ChestX-ray14 reader, with each image's report texts as `impression` and `findings`
    and its drawn regions as the mask."""

    OPTIONAL_COLUMNS: ClassVar[tuple[str, ...]] = (MASK_COLUMN,)

    def scan(self) -> ScanResult:
        path = self.root / REPORTS
        if not path.is_file():
            raise UserError(f"{self.root}: no {REPORTS} (write the release with demo --learnable)")
        reports = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            report = json.loads(line)
            reports[Path(report["image"]).stem] = report
        result = super().scan()
        result.inputs.append(path)
        kept = []
        for item in result.items:
            stem = item.id.split(":", 1)[1]
            report = reports.get(stem)
            if report is not None:
                item.sections = {
                    "learnable_report": report["description"],
                    "learnable_findings": report["explanation"],
                }
                mask = read_mask(report.get("mask"))
                if isinstance(mask, str):
                    where = f"{REPORTS} {report['image']}"
                    result.quarantine.append(QuarantineEntry(item.id, where, "mask", mask))
                    continue
                item.mask = mask
            kept.append(item)
        result.items = kept
        return result


def read_mask(entry: Any) -> MaskSpec | str | None:
    """A report's ``mask`` (``{"frame": [w, h], "rle": SIIM-ACR code}``) as a MaskSpec, None
    where the report has none (a release written before masks), or the reason it is unreadable."""
    if entry is None:
        return None
    frame = entry.get("frame") if isinstance(entry, dict) else None
    rle = entry.get("rle") if isinstance(entry, dict) else None
    if not (
        isinstance(frame, list)
        and len(frame) == 2
        and all(type(n) is int and n > 0 for n in frame)
        and isinstance(rle, str)
    ):
        return 'unreadable mask (expected {"frame": [width, height], "rle": "offset length ..."})'
    try:
        return MaskSpec(frame=(frame[0], frame[1]), runs=parse_siim_rle(rle, (frame[0], frame[1])))
    except ValueError as error:
        return f"unreadable mask ({error})"
