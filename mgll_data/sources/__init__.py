"""Source readers, one per release layout, looked up by the pipeline's `source` key.

A reader's module is imported when the reader is first looked up: a build imports the one it
uses, and a Ray worker, which needs only `base` (through the task types it unpickles), imports
none of them, nor pandas with them.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

from ..build.pipeline import Pipeline
from ..errors import UserError
from ..vocab import Vocabulary
from .base import ScanResult, Source

# Each reader class and the module (below this package) that defines it.
_MODULES = {
    "ChestXray14Source": ".chestxray14",
    "ChexpertSource": ".chexpert",
    "CovidxSource": ".covidx",
    "GradedSource": ".fundus",
    "OdirSource": ".fundus",
    "RfmidSource": ".fundus",
    "IuXraySource": ".iu_xray",
    "LearnableSource": ".learnable",
    "MidrcCommonsSource": ".midrc",
    "MidrcRicordSource": ".midrc",
    "MimicCxrSource": ".mimic_cxr",
    "ObjectCxrSource": ".object_cxr",
    "PadchestSource": ".padchest",
    "RsnaPneumoniaSource": ".rsna_pneumonia",
    "SiimAcrSource": ".siim_acr",
    "VindrCxrSource": ".vindr_cxr",
}


def _reader(name: str) -> type[Source]:
    return getattr(importlib.import_module(_MODULES[name], __name__), name)


class SourceRegistry(MutableMapping[str, type[Source]]):
    """`source` key -> reader class. An entry given as a class name (a key of `_MODULES`) is
    imported when it is read; one given as a class (a plug-in's) is kept as it is."""

    def __init__(self, entries: dict[str, str | type[Source]]):
        self._entries = dict(entries)

    def __getitem__(self, key: str) -> type[Source]:
        entry = self._entries[key]
        return _reader(entry) if isinstance(entry, str) else entry

    def __setitem__(self, key: str, value: type[Source]) -> None:
        self._entries[key] = value

    def __delitem__(self, key: str) -> None:
        del self._entries[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


SOURCES = SourceRegistry(
    {
        "chestxray14": "ChestXray14Source",
        "chexpert": "ChexpertSource",
        "vindr_cxr": "VindrCxrSource",
        "mimic_cxr": "MimicCxrSource",
        "iu_xray": "IuXraySource",
        "learnable": "LearnableSource",
        "midrc_ricord": "MidrcRicordSource",
        "midrc_commons": "MidrcCommonsSource",
        "siim_acr": "SiimAcrSource",
        "rsna_pneumonia": "RsnaPneumoniaSource",
        "covidx": "CovidxSource",
        "object_cxr": "ObjectCxrSource",
        "padchest": "PadchestSource",
        "odir": "OdirSource",
        "rfmid": "RfmidSource",
        # One reader for the graded releases: each pipeline's `release` section sets its layout.
        "aptos": "GradedSource",
        "eyepacs": "GradedSource",
        "idrid": "GradedSource",
        "messidor2": "GradedSource",
        "graded_fundus": "GradedSource",  # any other graded release, laid out by its pipeline
    }
)


def __getattr__(name: str) -> Any:
    """`from mgll_data.sources import ChestXray14Source` and the like: the reader's module is
    imported on first use."""
    if name in _MODULES:
        return _reader(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_source(
    pipeline: Pipeline, root: Path, vocab: Vocabulary, options: dict[str, str] | None = None
) -> Source:
    """Instantiate the reader that the pipeline names, with command-line source options."""
    try:
        source_class = SOURCES[pipeline.source]
    except KeyError:
        raise UserError(
            f"{pipeline.path}: unknown source {pipeline.source!r}; known: {sorted(SOURCES)}"
        ) from None
    return source_class(root, pipeline, vocab, options or {})


__all__ = ["SOURCES", "ScanResult", "Source", "SourceRegistry", "make_source", *_MODULES]
