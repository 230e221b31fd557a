"""COVIDx CXR (COVID-Net): list files `train.txt`, `test.txt` (and `val.txt` from CXR-3 on)
beside the image folders `train/`, `test/` (and `val/`).

Each list line is `patient_id filename class [data_source]`, whitespace separated. Two label
variants exist, told apart by the class values: COVIDx v1-v8 (`COVID-19`, `pneumonia`,
`normal`, the source column from v5 on) and COVIDx CXR-2 onwards (`positive`, `negative` for
SARS-CoV-2). `labels.map` names the vocabulary label of each class; what each class asserts is
`CLASS_ASSERTS`. An unknown class, or one of the other variant, stops the scan with the file and
line. The lists are the splits; without a validation list, a share of the training patients (by
hash) is validation. A line that cannot be placed (too few or too many fields, a name that is
not a file name, a missing image, a file listed twice) is quarantined with its file and line;
images that no list names are ignored and counted.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..build.items import ImageRef, QuarantineEntry, RawItem
from ..errors import UserError
from .base import ScanResult, Source
from .splits import carve_validation
from .toolkit import find_listed, index_images, walk_release

# split -> (list file stem, image folder); older releases add a suffix (`train_COVIDx9A.txt`)
SPLITS = {"train": ("train", "train"), "validation": ("val", "val"), "test": ("test", "test")}
VARIANTS = {
    "three-class (COVIDx v1-v8)": ("covid-19", "pneumonia", "normal"),
    "two-class (COVIDx CXR-2 on)": ("positive", "negative"),
}
# class (lower case) -> {labels.map key: value}. The v1-v8 classes exclude each other
# (`pneumonia` is non-COVID pneumonia, `normal` neither), but a COVID-19 image may or may not
# show pneumonia, so it asserts nothing else. `negative` is any image of a SARS-CoV-2 negative
# patient, pneumonia or not.
CLASS_ASSERTS = {
    "covid-19": {"COVID-19": 1.0},
    "pneumonia": {"pneumonia": 1.0, "COVID-19": 0.0, "normal": 0.0},
    "normal": {"normal": 1.0, "COVID-19": 0.0, "pneumonia": 0.0},
    "positive": {"positive": 1.0},
    "negative": {"positive": 0.0},
}
MAP_KEYS = ("COVID-19", "pneumonia", "normal", "positive")
SPELLING = {"covid-19": "COVID-19"}  # as the lists write it (classes are read in any case)


@dataclass(frozen=True)
class Listing:
    """One line of a list file."""

    split: str
    list_path: Path
    line: int
    patient: str
    filename: str
    raw_class: str
    data_source: str | None

    @property
    def label_class(self) -> str:
        return self.raw_class.lower()

    @property
    def where(self) -> str:
        return f"{self.list_path.name} line {self.line}"


class CovidxSource(Source):
    """Reads a COVIDx CXR release: the split lists and the image folder named after each."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        label_map = self.required_label_map()
        missing = [key for key in MAP_KEYS if key not in label_map]
        if missing:
            raise UserError(
                f"{self.pipeline.path}: labels.map lacks the COVIDx class(es) {missing} "
                f"(expected a label for each of {list(MAP_KEYS)})"
            )
        self.label_map = label_map
        self.lists = _find_lists(self.root)

    def scan(self) -> ScanResult:
        for split in ("train", "test"):
            if split not in self.lists:
                raise UserError(
                    f"{self.root}: not a COVIDx CXR release; missing {SPLITS[split][0]}.txt "
                    "(expected train.txt and test.txt, optionally val.txt, beside the "
                    "train/ and test/ image folders)"
                )
        listings, result = self._read_lists()
        _check_variant(listings)
        folders = {split: self._folder(split) for split in self.lists}
        by_key: dict[str, list[Listing]] = {}
        for listing in listings:
            by_key.setdefault(Path(listing.filename).stem.lower(), []).append(listing)
        for key in sorted(by_key):
            first, *repeats = by_key[key]
            conflicting = any(
                (r.split, r.label_class, r.patient)
                != (first.split, first.label_class, first.patient)
                for r in repeats
            )
            if conflicting:
                self._quarantine_all(result, by_key[key])
                continue
            for repeat in repeats:
                reason = f"{repeat.filename} listed again ({repeat.where}; first at {first.where})"
                result.quarantine.append(self._entry(repeat, "scan", reason))
            self._add(result, first, folders[first.split])
        result.notes.append(self._note(listings, folders))
        return result

    def _read_lists(self) -> tuple[list[Listing], ScanResult]:
        """Every well-formed line of the lists; malformed ones quarantined."""
        result = ScanResult(items=[], inputs=[self.lists[s] for s in SPLITS if s in self.lists])
        listings = []
        for split, path in self.lists.items():
            for number, fields in _lines(path):
                if len(fields) not in (3, 4) or not _plain_name(fields[1]):
                    reason = (
                        f"{path.name} line {number}: {len(fields)} fields "
                        f"{' '.join(fields)[:80]!r}; expected `patient_id filename class "
                        "[data_source]` with a plain file name"
                    )
                    item_id = f"{self.pipeline.name}:{path.stem}-line-{number}"
                    where = f"{path.name} line {number}"
                    result.quarantine.append(QuarantineEntry(item_id, where, "scan", reason))
                    continue
                source = fields[3] if len(fields) == 4 else None
                listings.append(
                    Listing(split, path, number, fields[0], fields[1], fields[2], source)
                )
        return listings, result

    def _folder(self, split: str) -> dict[str, list[str]]:
        """The images under a split's folder by lower-case stem."""
        folder = self.lists[split].parent / SPLITS[split][1]
        if not folder.is_dir():
            raise UserError(
                f"{folder}: image folder missing; {self.lists[split].name} lists the images "
                f"of {SPLITS[split][1]}/ beside it"
            )
        return index_images(folder)

    def _add(self, result: ScanResult, listing: Listing, folder: dict[str, list[str]]) -> None:
        path = find_listed(folder, listing.filename, self.lists[listing.split].parent)
        if path is None:
            image_folder = SPLITS[listing.split][1]
            reason = f"missing image: {listing.where} lists {image_folder}/{listing.filename}"
            result.quarantine.append(self._entry(listing, "scan", reason))
            return
        split = listing.split
        if split == "train" and "validation" not in self.lists:
            split = carve_validation(listing.patient, self.pipeline.splits)
        extra = {"covidx_class": listing.label_class, "covidx_list": listing.list_path.name}
        if listing.data_source:
            extra["data_source"] = listing.data_source
        result.items.append(
            RawItem(
                id=self._id(listing),
                source=self.pipeline.name,
                split=split,
                image=ImageRef(path),
                labels=self._labels(listing.label_class),
                patient_id=listing.patient,
                extra=extra,
            )
        )

    def _labels(self, label_class: str) -> dict[str, float]:
        return {self.label_map[key]: v for key, v in CLASS_ASSERTS[label_class].items()}

    def annotated_labels(self) -> list[str]:
        """The labels the release's classes assert: COVID-19 alone in the two-class variant."""
        classes = {
            fields[2].lower()
            for path in self.lists.values()
            for _, fields in _lines(path)
            if len(fields) in (3, 4)
        }
        keys = {key for c in classes if c in CLASS_ASSERTS for key in CLASS_ASSERTS[c]}
        targets = {self.label_map[key] for key in keys}
        return [name for name in self.vocab.names if name in targets]

    def _quarantine_all(self, result: ScanResult, listings: list[Listing]) -> None:
        shown = "; ".join(f"{x.where}: {x.split}, {x.label_class}, {x.patient}" for x in listings)
        reason = f"{listings[0].filename} listed with conflicting split, class or patient ({shown})"
        for listing in listings:
            result.quarantine.append(self._entry(listing, "labels", reason))

    def _entry(self, listing: Listing, stage: str, reason: str) -> QuarantineEntry:
        return QuarantineEntry(self._id(listing), listing.where, stage, reason)

    def _id(self, listing: Listing) -> str:
        return f"{self.pipeline.name}:{Path(listing.filename).stem}"

    def _note(self, listings: list[Listing], folders: dict[str, dict[str, list[str]]]) -> str:
        listed = {(x.split, Path(x.filename).stem.lower()) for x in listings}
        unlisted = sum(
            (split, stem) not in listed for split, files in folders.items() for stem in files
        )
        shown = ", ".join(f"{path.name} ({split})" for split, path in self.lists.items())
        carve = "" if "validation" in self.lists else "; validation drawn from train by patient"
        return f"lists {shown}{carve}; {unlisted} images in the folders not listed (ignored)"


def _find_lists(root: Path) -> dict[str, Path]:
    """The list file of each split in the release root: `train.txt`, else one `train_*.txt`."""
    _, _, files = next(walk_release(root, max_depth=0), (None, [], []))
    found: dict[str, Path] = {}
    for split, (stem, _) in SPLITS.items():
        exact = [name for name in files if name.lower() == f"{stem}.txt"]
        suffixed = [n for n in files if re.fullmatch(rf"{stem}_[^/]*\.txt", n, re.IGNORECASE)]
        names = exact or suffixed
        if len(names) > 1:
            raise UserError(f"{root}: several {stem} lists {names}; keep one (e.g. {stem}.txt)")
        if names and (root / names[0]).is_file():
            found[split] = root / names[0]
    return found


def _plain_name(name: str) -> bool:
    """A file name alone: no folder part, not hidden (names such as `COVID-19(1).png` are)."""
    return not name.startswith(".") and not re.search(r"[/\\\x00-\x1f]", name)


def _lines(path: Path) -> Iterable[tuple[int, list[str]]]:
    """(line number, whitespace-separated fields) of each non-blank line."""
    for number, line in enumerate(_raw_lines(path), start=1):
        if line.strip():
            yield number, line.split()


def _raw_lines(path: Path) -> list[str]:
    # tables.read_list_file drops blank lines, which would shift the line numbers reasons name
    try:
        return path.read_bytes().decode("utf-8-sig", errors="replace").splitlines()
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err})") from err


def _check_variant(listings: list[Listing]) -> None:
    """Every class of one variant, else a UserError naming the first line that breaks it."""
    known = [c for classes in VARIANTS.values() for c in classes]
    shown = ", ".join(SPELLING.get(c, c) for c in known)
    first = next((x for x in listings if x.label_class in known), None)
    for listing in listings:
        if listing.label_class not in known:
            raise UserError(
                f"{listing.list_path}: line {listing.line}: unknown class "
                f"{listing.raw_class!r} (expected one of {shown})"
            )
        assert first is not None
        variant = next(v for v, classes in VARIANTS.items() if first.label_class in classes)
        if listing.label_class not in VARIANTS[variant]:
            raise UserError(
                f"{listing.list_path}: line {listing.line}: class {listing.raw_class!r} mixes "
                f"variants; {first.list_path.name} line {first.line} ({first.raw_class!r}) "
                f"is {variant}"
            )
