"""Pipeline configurations (`pipelines/<name>.yaml`): reader, label mapping, templates, policy."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError
from ..resources import resource_dir

REDISTRIBUTION = ("public", "noncommercial", "none")


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
    return Pipeline(
        name=raw["name"],
        source=raw["source"],
        domain=raw["domain"],
        description=" ".join(str(raw.get("description", "")).split()),
        license=license_block,
        raw=raw,
        path=path,
    )
