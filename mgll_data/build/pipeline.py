"""Pipeline configurations (`pipelines/<name>.yaml`): reader, label mapping, templates, policy.

Every block a source or the engine reads (`image:`, `splits:`, `labels:`, `texts:`,
`sections:`, `options:` and a graded fundus release's `release:`) is parsed once, when the file
is loaded, into a frozen dataclass that holds the block's one set of defaults. One generic parser
walks the dataclasses' type hints, so a wrong type, an unknown key or a bad nested value is a
one-line `UserError` naming the file and the key. `Pipeline.raw` keeps the YAML as written for
the build fingerprint and the card.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..errors import UserError
from ..resources import resource_dir

REDISTRIBUTION = ("public", "noncommercial", "none")
ImageMode = Literal["jpg", "dicom"]
LabelMode = Literal["chexpert", "negbio", "text", "mesh"]  # mesh: IU X-ray only


def _expect(text: str) -> dict[str, str]:
    """Field metadata: what the error message says a setting should be."""
    return {"expect": text}


@dataclass(frozen=True)
class ImageConfig:
    """The `image:` block: how stored images look, and how DICOM pixels become grey levels."""

    color: Literal["grey", "rgb"] = "grey"  # "grey" for radiographs, "rgb" for photographs
    crop_borders: bool = False  # crop the black frame around a fundus disc (--crop-borders)
    voi: Literal["auto", "window", "percentile"] = "auto"  # DICOM VOI step (imaging/dicom.py)
    skip_for_processing: bool = True  # DICOM: skip images marked FOR PROCESSING


@dataclass(frozen=True)
class SplitConfig:
    """The `splits:` block, for releases whose splits are drawn by a hash of an id."""

    validation_fraction: float = 0.1
    test_fraction: float = 0.0  # MIDRC pipelines default to 0.1: see _SOURCE_DEFAULTS
    hash_salt: str = ""  # empty: the pipeline's name
    official: bool = False  # the release's own train/validation/test sets are kept


_LABEL_MAP = _expect("a mapping of column -> label")


@dataclass(frozen=True)
class LabelConfig:
    """The `labels:` block. Each source reads the keys of its own release; the rest stay unset."""

    # release label or column -> vocabulary label (ChestX-ray14, MIMIC-CXR, RICORD, RFMiD)
    map: dict[str, str] = field(default_factory=dict, metadata=_LABEL_MAP)
    # ChestX-ray14: the box list's spellings, and the pixel frame its boxes are given in
    box_map: dict[str, str] = field(default_factory=dict, metadata=_LABEL_MAP)
    box_frame: tuple[int, int] | None = None
    # MIMIC-CXR: a study absent from the label CSV, the sections labels are mined from, the model
    missing: Literal["text", "quarantine"] = "text"
    text_sections: tuple[str, ...] = ()
    text_model: str | None = None
    # MIDRC Data Commons: the COVID-19 test window in days before the study
    covid_window_days: float = 14.0
    # RICORD: exclusive label groups, how readers are combined, studies no reader annotated
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    reader_policy: Literal["majority", "unanimous", "any"] = "majority"
    unannotated: Literal["keep", "quarantine"] = "keep"
    covid19_all_positive: bool = True
    # graded fundus releases: the vocabulary's grading, the DME wording by grade
    grading: str | None = None
    dme: dict[int, str] = field(default_factory=dict)
    # ODIR-5K: patient-level flag columns and its per-eye keywords
    patient_flags: tuple[str, ...] = ("N", "D", "G", "C", "A", "H", "M", "O")
    normal_keywords: tuple[str, ...] = ()
    quality_keywords: tuple[str, ...] = ()
    not_fundus_keywords: tuple[str, ...] = ()
    unknown_keyword_label: str = "Other Abnormality"
    # keyword -> a label, a list of labels, or {label: value} (-1: suspected)
    keywords: dict[str, str | tuple[str, ...] | dict[str, float]] = field(default_factory=dict)
    # ChestX-ray14 `--labels google`: relabel column -> label, and images without a relabel
    relabels: dict[str, str] = field(default_factory=dict, metadata=_LABEL_MAP)
    unrelabelled: Literal["keep", "drop"] = "keep"
    # CheXpert's 5x200 zero-shot set (sources/chexpert.py): empty labels build every image
    zero_shot_labels: tuple[str, ...] = ()
    zero_shot_per_label: int = 200
    zero_shot_others: Literal["not_positive", "negative_or_blank"] = "not_positive"
    zero_shot_seed: int = 0
    zero_shot_mode: Literal["only", "exclude"] = "only"  # build the set, or all rows but it
    # PadChest: every row, or only those whose labels a physician gave (`MethodLabel`)
    method: Literal["all", "physician"] = "all"


@dataclass(frozen=True)
class DescriptionConfig:
    """`texts.description`: the report sections tried in order, else the label template."""

    sections: tuple[str, ...] = ()
    positive: str = "{findings}."
    uncertain: str = "possible {findings}."
    negative: str = "no {findings}."
    none_positive: str = "No Finding."  # every shipped pipeline names its own
    max_negatives: int = 0  # asserted negatives mentioned, in vocabulary order


@dataclass(frozen=True)
class ExplanationConfig:
    """`texts.explanation`: the sections tried in order, else the vocabulary's explanations."""

    sections: tuple[str, ...] = ()


@dataclass(frozen=True)
class TextConfig:
    """The `texts:` block: where the description and explanation come from."""

    kind: Literal["labels", "report", "dicom"] = "labels"  # what the card says the texts are
    description: DescriptionConfig = field(default_factory=DescriptionConfig)
    explanation: ExplanationConfig = field(default_factory=ExplanationConfig)

    def templates(self) -> dict[str, Any]:
        """The block as the plain mapping the per-item stages read (every default filled in)."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SectionConfig:
    """MIMIC-CXR's `sections:` block: per-study rules for finding a report's conclusion."""

    official_rules: str | None = None  # MIT-LCP's section_parser.py, relative to the pipeline
    special_indices: dict[str, tuple[int, int]] = field(default_factory=dict)  # [start, end]
    special_section_names: dict[str, str] = field(default_factory=dict)  # study -> section


@dataclass(frozen=True)
class OptionsConfig:
    """The `options:` block (MIMIC-CXR, IU X-ray): defaults of the source's command-line flags."""

    images: ImageMode = "jpg"
    labels: LabelMode = "chexpert"
    views: str | tuple[str, ...] | None = None  # None: every view


@dataclass(frozen=True)
class ImageFolders:
    """Where a graded table's images are: a folder whose path has `within`, whose own name has
    `named` and whose path lacks `not_within`."""

    within: str = ""
    named: str = ""
    not_within: str = ""


@dataclass(frozen=True)
class GradedTable:
    """One grading table of a graded fundus release and where its images are."""

    split: Literal["train", "test"]
    files: tuple[str, ...]
    required: str = ""
    if_missing: str = ""
    prefer_folder: str = ""
    avoid: tuple[str, ...] = ()
    image_folders: ImageFolders | None = None


@dataclass(frozen=True)
class DmeColumn:
    """The column of diabetic macular edema grades, its name in messages and in `extra`."""

    column: str
    name: str
    extra_key: str


@dataclass(frozen=True)
class GradedLayout:
    """The `release:` block of a graded fundus release (see sources/fundus/graded.py)."""

    name: str
    id_column: str
    grade_column: str
    missing_image: str
    tables: tuple[GradedTable, ...]
    dme: DmeColumn | None = None
    gradable_column: str = ""
    strip_extensions: Literal["any"] | tuple[str, ...] = ()
    eye_suffix: bool = False
    ids_carry_split: bool = False
    skip_blank_ids: bool = False
    extra_columns: dict[str, str] = field(default_factory=dict)  # column -> `extra` key
    images: str = ""
    no_table: str = ""
    unlabelled: tuple[str, ...] = ()

    @classmethod
    def from_pipeline(cls, pipeline: Pipeline) -> GradedLayout:
        """The pipeline's `release:` block; a UserError when it has none."""
        if pipeline.release is None:
            raise UserError(f"{pipeline.path}: a graded fundus release needs a release: block")
        return pipeline.release


# Defaults that differ by source, kept beside the blocks so every default is in this file.
# MIDRC releases have no test set, so a MIDRC pipeline that names no test share draws 10 %.
_SOURCE_DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    ("midrc_commons", "splits"): {"test_fraction": 0.1},
    ("midrc_ricord", "splits"): {"test_fraction": 0.1},
    ("iu_xray", "options"): {"labels": "mesh"},  # IU's reports carry manual MeSH headings
}


@dataclass(frozen=True)
class Pipeline:
    """A parsed pipeline YAML: its typed blocks, and `raw` as written (for the fingerprint)."""

    name: str
    source: str
    domain: str
    description: str
    license: dict[str, Any]
    raw: dict[str, Any]
    path: Path
    image: ImageConfig = field(default_factory=ImageConfig)
    splits: SplitConfig = field(default_factory=SplitConfig)
    labels: LabelConfig = field(default_factory=LabelConfig)
    texts: TextConfig = field(default_factory=TextConfig)
    sections: SectionConfig = field(default_factory=SectionConfig)
    options: OptionsConfig = field(default_factory=OptionsConfig)
    release: GradedLayout | None = None  # graded fundus releases only


# The blocks parsed with their defaults alone (`splits` and `release` have their own steps).
_BLOCKS: dict[str, type] = {
    "image": ImageConfig,
    "labels": LabelConfig,
    "texts": TextConfig,
    "sections": SectionConfig,
    "options": OptionsConfig,
}


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
    blocks = {key: _typed_block(path, raw, key, kind) for key, kind in _BLOCKS.items()}
    return Pipeline(
        name=raw["name"],
        source=raw["source"],
        domain=raw["domain"],
        description=" ".join(str(raw.get("description", "")).split()),
        license=license_block,
        raw=raw,
        path=path,
        splits=dataclasses.replace(splits, hash_salt=splits.hash_salt or str(raw["name"])),
        release=_typed_block(path, raw, "release", GradedLayout) if raw.get("release") else None,
        **blocks,
    )


# --- the generic block parser ----------------------------------------------------------------


class _BadSetting(Exception):
    """A setting that does not fit its type: where it is (`labels.map['x']`) and what is wrong."""

    def __init__(self, where: str, problem: str):
        super().__init__(f"{where}: {problem}")
        self.where, self.problem = where, problem


def _typed_block(path: Path, raw: dict[str, Any], key: str, kind: type) -> Any:
    """Parse the block `key` into the dataclass `kind`, naming the file and key on any error."""
    defaults = _SOURCE_DEFAULTS.get((str(raw.get("source")), key), {})
    try:
        return _parse_dataclass(raw.get(key) or {}, kind, key, defaults)
    except _BadSetting as err:
        raise UserError(f"{path}: {err}") from None


def _parse_dataclass(value: Any, kind: type, where: str, defaults: dict[str, Any]) -> Any:
    """A mapping of settings as the dataclass `kind`: unknown keys refused, required ones named."""
    if not isinstance(value, dict):
        raise _BadSetting(where, f"expected a mapping of settings, got {value!r}")
    fields = {f.name: f for f in dataclasses.fields(kind)}
    hints = typing.get_type_hints(kind)
    for name in value:
        if name not in fields:
            raise _BadSetting(f"{where}.{name}", f"unknown setting; known: {sorted(fields)}")
    values = dict(defaults)
    for name, spec in fields.items():
        if name in value:
            expect = spec.metadata.get("expect")
            values[name] = _parse(value[name], hints[name], f"{where}.{name}", expect)
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise _BadSetting(f"{where}.{name}", "required setting missing")
    return kind(**values)


def _parse(value: Any, hint: Any, where: str, expect: str | None = None) -> Any:
    """`value` checked against the type `hint` (lists become tuples, ints fill floats)."""
    try:
        return _convert(value, hint, where)
    except _BadSetting as err:
        if expect is None or err.where != where:
            raise
        raise _BadSetting(where, f"expected {expect}, got {value!r}") from None


def _convert(value: Any, hint: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _parse_dataclass(value, hint, where, {})
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # an optional setting: name the problem inside it
            return _convert(value, options[0], where)
        for option in options:
            try:
                return _convert(value, option, where)
            except _BadSetting:
                continue
    elif origin is Literal:
        if any(type(value) is type(a) and value == a for a in args):
            return value
    elif origin is tuple and isinstance(value, list | tuple):
        variadic = len(args) == 2 and args[1] is Ellipsis
        if variadic or len(value) == len(args):
            kinds = [args[0]] * len(value) if variadic else list(args)
            return tuple(
                _convert(v, k, f"{where}[{i}]")
                for i, (v, k) in enumerate(zip(value, kinds, strict=True))
            )
    elif origin is dict and isinstance(value, dict):
        key_kind, value_kind = args
        return {
            _convert(k, key_kind, f"{where}[{k!r}]"): _convert(v, value_kind, f"{where}[{k!r}]")
            for k, v in value.items()
        }
    elif hint is float and type(value) is int:
        return float(value)  # YAML writes 14 for 14.0
    elif hint in (str, int, float, bool) and type(value) is hint:
        return value  # bool is not taken for int or float
    raise _BadSetting(where, f"expected {_describe(hint)}, got {value!r}")


def _describe(hint: Any) -> str:
    """A type as the error messages say it: `a list of str`, `one of ['grey', 'rgb']`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return "a mapping of settings"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return f"one of {list(args)}"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0])}"
        return f"a list of {len(args)} {_describe(args[0])}"
    if origin is dict:
        return f"a mapping of {_describe(args[0])} -> {_describe(args[1])}"
    return "null" if hint is type(None) else hint.__name__
