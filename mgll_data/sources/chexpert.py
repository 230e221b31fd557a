"""CheXpert v1.0 and v1.0-small: `train.csv`, `valid.csv` and `train/patientN/studyN/viewN_*.jpg`.

Header `Path,Sex,Age,Frontal/Lateral,AP/PA,<14 labels>`; label cells are 1.0 / 0.0 / -1.0, blank
for "not mentioned" (NaN in the record, never 0). Official splits: `valid.csv` is the test split
(the one papers report on), and a share of the `train.csv` patients, drawn by a hash of the
patient id, is the validation split.

With `labels.zero_shot_labels` set (pipelines/chexpert_5x200.yaml) the build is instead the
5x200 zero-shot set: `select_zero_shot` picks, from the training rows alone, frontal images
positive for exactly one of the given labels, `zero_shot_per_label` per label, by a seeded hash.
`labels.zero_shot_mode: exclude` builds the official splits without those images instead, so a
model trained on that build can be evaluated on the set.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from ..build.items import ImageRef, QuarantineEntry, RawItem
from ..errors import UserError
from .base import ScanResult, Source
from .splits import carve_validation, hash_fraction
from .tables import read_csv_table
from .toolkit import find_file, parse_age, parse_finite

REQUIRED_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")
# train/patient00001/study1/view1_frontal.jpg, after the release folder
_PATH = re.compile(r"^(train|valid|test)/(patient\d+)/(study\d+)/(view\d+_\w+)\.jpg$")
_SEX = {"male": "M", "female": "F"}
_VALUES = (1.0, 0.0, -1.0)


def select_zero_shot(
    rows: Iterable[Mapping[str, str]],
    columns: Sequence[str],
    per_label: int,
    seed: int,
    others: str = "not_positive",
) -> dict[str, list[Mapping[str, str]]]:
    """The zero-shot set: for each column, `per_label` rows drawn from its candidates.

    A candidate row is frontal (`Frontal/Lateral` = Frontal), 1.0 in exactly one of `columns`,
    and, with `others="negative_or_blank"`, 0.0 or blank (never -1.0) in the other columns. The
    draw takes the candidates with the smallest SHA-256 of the seed and the row's `Path`, so it
    depends on nothing but the rows and the seed. Fewer candidates than `per_label` give all of
    them (the caller decides whether that is an error).
    """
    candidates: dict[str, list[Mapping[str, str]]] = {c: [] for c in columns}
    for row in rows:
        if str(row["Frontal/Lateral"]).strip() != "Frontal":
            continue
        values = {c: parse_finite(row[c]) for c in columns}
        positive = [c for c in columns if values[c] == 1.0]
        if len(positive) != 1:
            continue
        if others == "negative_or_blank" and any(
            values[c] not in (None, 0.0) for c in columns if c != positive[0]
        ):
            continue
        candidates[positive[0]].append(row)
    salt = f"zero-shot-{seed}"
    return {
        column: sorted(found, key=lambda r: (hash_fraction(str(r["Path"]), salt), r["Path"]))[
            :per_label
        ]
        for column, found in candidates.items()
    }


class ChexpertSource(Source):
    """Reads CheXpert-v1.0(-small)/: the two label tables and the JPEG tree beside them."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.label_map = self.required_label_map()
        self.train_csv = find_file(self.root, ("train.csv",), max_depth=1)
        self.valid_csv = find_file(self.root, ("valid.csv",), max_depth=1)

    def input_files(self) -> list[Path]:
        """The label tables found (for the build fingerprint)."""
        return [p for p in (self.train_csv, self.valid_csv) if p is not None]

    def scan(self) -> ScanResult:
        mode = self.pipeline.labels.zero_shot_mode if self._zero_shot else None
        if self.train_csv is None or (self.valid_csv is None and mode != "only"):
            raise UserError(
                f"{self.root}: not a CheXpert release; expected train.csv and valid.csv "
                "(CheXpert-v1.0-small/ or CheXpert-v1.0/, or the folder holding them)"
            )
        required = REQUIRED_COLUMNS + tuple(self.label_map)
        train_table = read_csv_table(self.train_csv, required)
        train, lines = train_table.to_dict("records"), list(train_table.index)
        result = ScanResult(items=[], inputs=self.input_files())
        chosen = self._select(train) if mode else {}
        if mode == "only":
            self._scan_zero_shot(result, train, lines, chosen)
            return result
        assert self.valid_csv is not None
        valid_table = read_csv_table(self.valid_csv, required)
        valid = valid_table.to_dict("records")
        splits = self.pipeline.splits
        # zero_shot_mode: exclude keeps the zero-shot set's images out of every split
        held_out = {str(row["Path"]) for rows in chosen.values() for row in rows}
        for row_number, row in zip(lines, train, strict=True):
            if str(row["Path"]) in held_out:
                continue
            patient = _patient(row)
            split = carve_validation(patient, splits)
            self._add(result, self.train_csv, row_number, row, split)
        for row_number, row in zip(valid_table.index, valid, strict=True):
            self._add(result, self.valid_csv, row_number, row, "test")
        result.notes.append(
            f"{self.train_csv.name}: {len(train)} rows (train, validation by patient hash); "
            f"{self.valid_csv.name}: {len(valid)} rows (test)"
            + (f"; {len(held_out)} zero-shot set images left out" if held_out else "")
        )
        return result

    @property
    def _zero_shot(self) -> bool:
        return bool(self.pipeline.labels.zero_shot_labels)

    def _select(self, train: list[dict[str, str]]) -> dict[str, list[Mapping[str, str]]]:
        """The zero-shot set drawn from the training rows, by CSV column."""
        assert self.train_csv is not None
        labels = self.pipeline.labels
        column_of = {target: column for column, target in self.label_map.items()}
        unknown = [name for name in labels.zero_shot_labels if name not in column_of]
        if unknown:
            raise UserError(
                f"{self.pipeline.path}: labels.zero_shot_labels: {unknown[0]!r} is not a target "
                f"of labels.map (expected one of {sorted(column_of)})"
            )
        columns = [column_of[name] for name in labels.zero_shot_labels]
        per_label = labels.zero_shot_per_label
        chosen = select_zero_shot(
            train, columns, per_label, labels.zero_shot_seed, labels.zero_shot_others
        )
        short = {c: len(rows) for c, rows in chosen.items() if len(rows) < per_label}
        if short:
            raise UserError(
                f"{self.train_csv}: too few zero-shot candidates {short} for "
                f"labels.zero_shot_per_label = {per_label}"
            )
        return chosen

    def _scan_zero_shot(
        self,
        result: ScanResult,
        train: list[dict[str, str]],
        lines: list[int],
        chosen: dict[str, list],
    ) -> None:
        """The zero-shot set's items, all in the test split (`lines`: each train row's line)."""
        assert self.train_csv is not None
        labels = self.pipeline.labels
        number = {str(row["Path"]): n for n, row in zip(lines, train, strict=True)}
        for column, rows in chosen.items():
            for row in rows:
                item = self._add(result, self.train_csv, number[str(row["Path"])], row, "test")
                if item is not None:
                    item.extra["zero_shot_label"] = self.label_map[column]
        result.notes.append(
            f"{self.train_csv.name}: {len(train)} rows; zero-shot set of "
            f"{labels.zero_shot_per_label} frontal images per label for "
            f"{list(labels.zero_shot_labels)} (others {labels.zero_shot_others}, "
            f"seed {labels.zero_shot_seed})"
        )

    def _add(
        self, result: ScanResult, table: Path, row_number: int, row: dict[str, str], split: str
    ) -> RawItem | None:
        """Append the row's item (or its quarantine entry) to `result`."""
        rel = str(row["Path"]).strip().replace("\\", "/")
        parts = rel.split("/")
        # The path starts with the release folder (`CheXpert-v1.0-small/`), which holds the CSV
        # but may have been renamed; the rest is relative to it.
        inner = "/".join(parts[1:]) if parts and parts[0] not in ("train", "valid", "test") else rel
        match = _PATH.match(inner)
        item_id = f"{self.pipeline.name}:" + (
            "_".join(match.groups()[1:]) if match else f"{table.stem}-row-{row_number}"
        )
        where = f"{table.name} row {row_number}"
        if match is None:
            reason = f"Path {rel!r} is not <release>/train|valid/patientN/studyN/viewN_<view>.jpg"
            result.quarantine.append(QuarantineEntry(item_id, where, "scan", reason))
            return None
        labels = self._labels(row)
        if isinstance(labels, str):
            result.quarantine.append(QuarantineEntry(item_id, where, "labels", labels))
            return None
        _, patient, study, _ = match.groups()
        item = RawItem(
            id=item_id,
            source=self.pipeline.name,
            split=split,
            image=ImageRef(str(table.parent / inner)),
            labels=labels,
            patient_id=patient,
            study_id=f"{patient}_{study}",
            view=_view(row),
            age_years=_age(row["Age"]),
            sex=_SEX.get(str(row["Sex"]).strip().lower()),
            extra={"chexpert_path": rel},
        )
        result.items.append(item)
        return item

    def _labels(self, row: Mapping[str, str]) -> dict[str, float] | str:
        """The row's labels as given (blank: absent, i.e. NaN); a string: the quarantine reason."""
        labels: dict[str, float] = {}
        for column, target in self.label_map.items():
            raw = str(row[column]).strip()
            if not raw:
                continue
            value = parse_finite(raw)
            if value not in _VALUES:
                return f"{column} is {raw!r} (expected 1.0, 0.0, -1.0 or blank)"
            labels[target] = value
        return labels


def _patient(row: Mapping[str, str]) -> str:
    """The patient folder of a row's Path (`patient00001`), or the whole path when it has none."""
    found = re.search(r"(patient\d+)", str(row["Path"]))
    return found.group(1) if found else str(row["Path"])


def _view(row: Mapping[str, str]) -> str | None:
    """AP / PA (and the rare LL / RL) of a frontal image; LATERAL for a lateral one."""
    position = str(row["AP/PA"]).strip().upper()
    if position:
        return position
    return "LATERAL" if str(row["Frontal/Lateral"]).strip() == "Lateral" else None


def _age(raw: str) -> float | None:
    # CheXpert writes 0 where the age is unknown (its patients are adults).
    age = parse_age(raw)
    return age if age else None
