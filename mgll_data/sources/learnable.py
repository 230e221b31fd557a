"""The controlled task's release (`mgll-build-dataset demo --learnable`): ChestX-ray14's layout
plus `reports.jsonl`, whose report-like texts become the description and explanation."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from .base import ScanResult
from .chestxray14 import ChestXray14Source

REPORTS = "reports.jsonl"


class LearnableSource(ChestXray14Source):
    """The ChestX-ray14 reader, with each image's report texts as `impression` and `findings`."""

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
        for item in result.items:
            report = reports.get(item.id.split(":", 1)[1])
            if report is not None:
                item.sections = {
                    "learnable_report": report["description"],
                    "learnable_findings": report["explanation"],
                }
        return result
