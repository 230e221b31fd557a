"""The smallest real source: a folder of PNGs and one `labels.csv` (image,findings).

A release laid out as

    ROOT/labels.csv        image,findings          (findings joined by "|", or "No Finding")
    ROOT/images/<image>

becomes one record per CSV row. Splits are drawn by a hash of the image name; a row whose image
is missing goes to quarantine with a reason, an unknown finding likewise. See
`docs/architecture.md`, "Adding a source".
"""

from __future__ import annotations

import csv
from pathlib import Path

from mgll_data.build.items import ImageRef, QuarantineEntry, RawItem
from mgll_data.errors import UserError
from mgll_data.sources.base import ScanResult, Source
from mgll_data.sources.splits import hash_split


class LabelsCsvSource(Source):
    """`labels.csv` + `images/`: labels from the CSV, texts from the pipeline's templates."""

    def scan(self) -> ScanResult:
        table = self.root / "labels.csv"
        if not table.is_file():
            raise UserError(f"{self.root}: no labels.csv (image,findings) in the release")
        label_map = self.pipeline.labels.map  # release name -> vocabulary name
        splits = self.pipeline.splits  # typed, checked and defaulted when the YAML was loaded
        result = ScanResult(items=[], inputs=[table])  # the file that defines the items
        with open(table, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                name = row["image"]
                item_id, image = f"{self.pipeline.name}:{name}", self.root / "images" / name
                findings = row["findings"].split("|")
                unknown = [x for x in findings if x not in label_map]
                problem = None if image.is_file() else "no such image file"
                if Path(name).name != name:  # a name from data never leaves images/
                    problem = "image name is not a plain file name"
                elif unknown:
                    problem = f"unknown findings {unknown}"
                if problem:
                    result.quarantine.append(QuarantineEntry(item_id, str(image), "scan", problem))
                    continue
                # The release asserts the absence of every finding it does not list: 0, not NaN.
                labels = {name: 0.0 for name in set(label_map.values())}
                labels.update({label_map[x]: 1.0 for x in findings})
                split = hash_split(
                    row["image"],
                    splits.hash_salt,
                    splits.validation_fraction,
                    splits.test_fraction,
                )
                result.items.append(
                    RawItem(
                        id=item_id,
                        source=self.pipeline.name,
                        split=split,
                        image=ImageRef(str(image)),
                        labels=labels,
                    )
                )
        return result
