"""Pipeline configurations (`pipelines/<name>.yaml`): reader, label mapping, templates, policy.

The `image:` and `splits:` blocks, which the engine and every source share, are parsed once into
typed dataclasses with one set of defaults and validated when the file is loaded; errors name
the file and the key. Blocks whose keys belong to one source (`labels:`, `texts:`, `sections:`,
`options:`) stay plain mappings that the source reads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError
from ..resources import resource_dir

REDISTRIBUTION = ("public", "noncommercial", "none")


@dataclass(frozen=True)
class ImageConfig:
    """The `image:` block: how stored images look, and how DICOM pixels become grey levels."""

    color: str = "grey"  # "grey" for radiographs, "rgb" for photographs
    crop_borders: bool = False  # crop the black frame around a fundus disc (--crop-borders)
    voi: str = "auto"  # DICOM VOI step: "auto", "window" or "percentile" (see imaging/dicom.py)
    skip_for_processing: bool = True  # DICOM: skip images marked FOR PROCESSING


@dataclass(frozen=True)
class SplitConfig:
    """The `splits:` block, for releases whose splits are drawn by a hash of an id."""

    validation_fraction: float = 0.1
    test_fraction: float = 0.0
    hash_salt: str = ""  # empty: the pipeline's name
    official: bool = False  # the release's own train/validation/test sets are kept


_CHOICES = {("image", "color"): ("grey", "rgb"), ("image", "voi"): ("auto", "window", "percentile")}


@dataclass(frozen=True)
class Pipeline:
    """A parsed pipeline YAML. `raw` keeps every key for the source and the fingerprint."""

    name: str
    source: str
    domain: str
    description: str
    license: dict[str, Any]
    raw: dict[str, Any]
    path: Path
    image: ImageConfig = field(default_factory=ImageConfig)
    splits: SplitConfig = field(default_factory=SplitConfig)

    def section(self, key: str) -> dict[str, Any]:
        return dict(self.raw.get(key) or {})


def available_pipelines() -> list[Path]:
    """The pipeline YAMLs shipped with mgll, sorted by name."""
    return sorted(resource_dir("pipelines").glob("*.yaml"))


def load_pipeline(name_or_path: str) -> Pipeline:
    """Load a shipped pipeline by name, or any pipeline YAML by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = resource_dir("pipelines") / f"{name_or_path}.yaml"
        if not path.is_file():
            known = ", ".join(p.stem for p in available_pipelines())
            raise UserError(f"unknown pipeline {name_or_path!r}; known pipelines: {known}")
    if not path.is_file():
        raise UserError(f"{path}: pipeline file not found")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({err})".replace("\n", " ")) from err
    missing = [k for k in ("name", "source", "domain", "license") if k not in (raw or {})]
    if missing:
        raise UserError(f"{path}: pipeline lacks required keys {missing}")
    license_block = raw["license"]
    if license_block.get("redistribution") not in REDISTRIBUTION:
        raise UserError(f"{path}: license.redistribution must be one of {list(REDISTRIBUTION)}")
    splits = _typed_block(path, raw, "splits", SplitConfig)
    if (
        not 0 <= splits.validation_fraction + splits.test_fraction < 1
        or min(splits.validation_fraction, splits.test_fraction) < 0
    ):
        raise UserError(
            f"{path}: splits.validation_fraction and splits.test_fraction must be >= 0 "
            "and sum to less than 1"
        )
    return Pipeline(
        name=raw["name"],
        source=raw["source"],
        domain=raw["domain"],
        description=" ".join(str(raw.get("description", "")).split()),
        license=license_block,
        raw=raw,
        path=path,
        image=_typed_block(path, raw, "image", ImageConfig),
        splits=dataclasses.replace(splits, hash_salt=splits.hash_salt or str(raw["name"])),
    )


def _typed_block(path: Path, raw: dict[str, Any], key: str, kind: type) -> Any:
    """Parse the block `key` into the dataclass `kind`, naming the file and key on any error."""
    block = raw.get(key) or {}
    if not isinstance(block, dict):
        raise UserError(f"{path}: {key}: expected a mapping of settings, got {block!r}")
    fields = {f.name: f for f in dataclasses.fields(kind)}
    values = {}
    for name, value in block.items():
        if name not in fields:
            raise UserError(f"{path}: {key}.{name}: unknown setting; known: {sorted(fields)}")
        expected = type(fields[name].default)
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
            raise UserError(f"{path}: {key}.{name}: expected {expected.__name__}, got {value!r}")
        choices = _CHOICES.get((key, name))
        if choices and value not in choices:
            raise UserError(f"{path}: {key}.{name}: expected one of {list(choices)}, got {value!r}")
        values[name] = value
    return kind(**values)
