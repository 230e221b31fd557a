"""Source readers, one per release layout, looked up by the pipeline's `source` key."""

from __future__ import annotations

from pathlib import Path

from ..build.pipeline import Pipeline
from ..errors import UserError
from ..vocab import Vocabulary
from .base import ScanResult, Source
from .chestxray14 import ChestXray14Source
from .chexpert import ChexpertSource
from .covidx import CovidxSource
from .fundus import GradedSource, OdirSource, RfmidSource
from .iu_xray import IuXraySource
from .learnable import LearnableSource
from .midrc import MidrcCommonsSource, MidrcRicordSource
from .mimic_cxr import MimicCxrSource
from .object_cxr import ObjectCxrSource
from .padchest import PadchestSource
from .rsna_pneumonia import RsnaPneumoniaSource
from .siim_acr import SiimAcrSource
from .vindr_cxr import VindrCxrSource

SOURCES: dict[str, type[Source]] = {
    "chestxray14": ChestXray14Source,
    "chexpert": ChexpertSource,
    "vindr_cxr": VindrCxrSource,
    "mimic_cxr": MimicCxrSource,
    "iu_xray": IuXraySource,
    "learnable": LearnableSource,
    "midrc_ricord": MidrcRicordSource,
    "midrc_commons": MidrcCommonsSource,
    "siim_acr": SiimAcrSource,
    "rsna_pneumonia": RsnaPneumoniaSource,
    "covidx": CovidxSource,
    "object_cxr": ObjectCxrSource,
    "padchest": PadchestSource,
    "odir": OdirSource,
    "rfmid": RfmidSource,
    # One reader for the graded releases: each pipeline's `release` section sets its layout.
    "aptos": GradedSource,
    "eyepacs": GradedSource,
    "idrid": GradedSource,
    "messidor2": GradedSource,
    "graded_fundus": GradedSource,  # any other graded release, laid out by its pipeline alone
}


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


__all__ = ["SOURCES", "ScanResult", "Source", "make_source"]
