"""Pipeline YAML: every block a source or the engine reads is typed once, with one-line errors."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import yaml

from mgll_data.build.pipeline import (
    ImageConfig,
    OptionsConfig,
    SplitConfig,
    available_pipelines,
    load_pipeline,
)
from mgll_data.build.stages import build_texts
from mgll_data.cli import main
from mgll_data.errors import UserError
from mgll_data.sources import make_source
from mgll_data.vocab import load_vocabulary

DOCS_EXAMPLE = Path(__file__).parents[1] / "docs" / "examples" / "labels_csv.yaml"


def _pipeline(tmp_path: Path, **blocks) -> Path:
    raw = {
        "name": "mine",
        "source": "chestxray14",
        "domain": "chest_xray",
        "license": {"id": "cc0-1.0", "redistribution": "public"},
        **blocks,
    }
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def test_every_shipped_pipeline_loads_with_its_own_values():
    loaded = {p.stem: load_pipeline(str(p)) for p in available_pipelines()}
    assert loaded["aptos"].image == ImageConfig(color="rgb")
    assert loaded["aptos"].splits == SplitConfig(0.1, 0.1, "aptos-split")
    assert loaded["rfmid"].splits.official is True
    assert loaded["midrc_ricord"].splits.test_fraction == 0.1
    # A pipeline without a salt gets its own name, so two releases never share split draws.
    assert loaded["mimic_cxr"].splits.hash_salt == "mimic_cxr"


def test_defaults_fill_what_a_pipeline_leaves_out(tmp_path):
    pipeline = load_pipeline(str(_pipeline(tmp_path, image={"color": "rgb"})))
    assert pipeline.image == ImageConfig(color="rgb", crop_borders=False, voi="auto")
    assert pipeline.splits == SplitConfig(0.1, 0.0, "mine", official=False)
    ints = load_pipeline(str(_pipeline(tmp_path, splits={"validation_fraction": 0})))
    assert ints.splits.validation_fraction == 0.0


@pytest.mark.parametrize(
    ("blocks", "message"),
    [
        ({"image": {"colour": "rgb"}}, "image.colour: unknown setting"),
        ({"image": {"color": "blue"}}, "image.color: expected one of ['grey', 'rgb'], got 'blue'"),
        ({"image": {"voi": "window-ish"}}, "image.voi: expected one of"),
        ({"image": {"crop_borders": "yes"}}, "image.crop_borders: expected bool, got 'yes'"),
        ({"image": ["grey"]}, "image: expected a mapping of settings"),
        ({"splits": {"test_fraction": "0.1"}}, "splits.test_fraction: expected float, got '0.1'"),
        ({"splits": {"test_fraction": True}}, "splits.test_fraction: expected float, got True"),
        ({"splits": {"validation_fraction": 0.6, "test_fraction": 0.5}}, "sum to less than 1"),
        ({"splits": {"validation_fraction": -0.1}}, "must be >= 0"),
    ],
)
def test_bad_settings_name_the_file_and_key(tmp_path, blocks, message):
    path = _pipeline(tmp_path, **blocks)
    with pytest.raises(UserError) as caught:
        load_pipeline(str(path))
    assert str(caught.value).startswith(f"{path}: ")
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_the_cli_prints_a_bad_setting_as_one_line(tmp_path, capsys):
    path = _pipeline(tmp_path, image={"colour": "rgb"})
    (tmp_path / "raw").mkdir()
    with pytest.raises(SystemExit) as exit_:
        main(["build", str(path), "--root", str(tmp_path / "raw"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2
    assert err.count("\n") == 0 and "image.colour: unknown setting" in err and str(path) in err


# The keys of `labels:` as the refusal lists them (every source's keys; each reads its own).
LABEL_KEYS = (
    "['box_frame', 'box_map', 'covid19_all_positive', 'covid_window_days', 'dme', 'grading', "
    "'groups', 'keywords', 'map', 'method', 'missing', 'normal_keywords', 'not_fundus_keywords', "
    "'patient_flags', 'quality_keywords', 'reader_policy', 'relabels', 'text_model', "
    "'text_sections', 'unannotated', 'unknown_keyword_label', 'unrelabelled', "
    "'zero_shot_labels', 'zero_shot_mode', 'zero_shot_others', 'zero_shot_per_label', "
    "'zero_shot_seed']"
)
RELEASE = {"name": "a release", "id_column": "id", "grade_column": "grade", "missing_image": "x"}
TABLE = {"split": "train", "files": ["grades.csv"]}


@pytest.mark.parametrize(
    ("blocks", "message"),
    [
        ({"labels": "map"}, "labels: expected a mapping of settings, got 'map'"),
        ({"labels": {"mapping": {}}}, f"labels.mapping: unknown setting; known: {LABEL_KEYS}"),
        (
            {"labels": {"map": ["Effusion"]}},
            "labels.map: expected a mapping of column -> label, got ['Effusion']",
        ),
        ({"labels": {"map": {"Effusion": 3}}}, "labels.map['Effusion']: expected str, got 3"),
        ({"labels": {"map": {3: "Mass"}}}, "labels.map[3]: expected str, got 3"),
        (
            {"labels": {"missing": "ignore"}},
            "labels.missing: expected one of ['text', 'quarantine'], got 'ignore'",
        ),
        (
            {"labels": {"box_frame": [1024]}},
            "labels.box_frame: expected a list of 2 int, got [1024]",
        ),
        ({"labels": {"box_frame": [1024, "x"]}}, "labels.box_frame[1]: expected int, got 'x'"),
        ({"labels": {"dme": {"0": "none"}}}, "labels.dme['0']: expected int, got '0'"),
        (
            {"labels": {"keywords": {"glaucoma": 3}}},
            "labels.keywords['glaucoma']: expected str or a list of str or a mapping of "
            "str -> float, got 3",
        ),
        (
            {"labels": {"groups": {"grade": "Mild"}}},
            "labels.groups['grade']: expected a list of str, got 'Mild'",
        ),
        (
            {"labels": {"covid_window_days": "14"}},
            "labels.covid_window_days: expected float, got '14'",
        ),
        (
            {"labels": {"covid19_all_positive": "yes"}},
            "labels.covid19_all_positive: expected bool, got 'yes'",
        ),
        (
            {"texts": {"kind": "reports"}},
            "texts.kind: expected one of ['labels', 'report', 'dicom'], got 'reports'",
        ),
        (
            {"texts": {"description": {"sections": "impression"}}},
            "texts.description.sections: expected a list of str, got 'impression'",
        ),
        (
            {"texts": {"description": {"sections": ["impression", 3]}}},
            "texts.description.sections[1]: expected str, got 3",
        ),
        (
            {"texts": {"description": {"max_negatives": 1.5}}},
            "texts.description.max_negatives: expected int, got 1.5",
        ),
        (
            {"texts": {"explanation": {"positive": "{findings}."}}},
            "texts.explanation.positive: unknown setting; known: ['sections']",
        ),
        (
            {"sections": {"special_indices": {"s1": [0]}}},
            "sections.special_indices['s1']: expected a list of 2 int, got [0]",
        ),
        (
            {"sections": {"official_rules": 7}},
            "sections.official_rules: expected str, got 7",
        ),
        (
            {"options": {"images": "png"}},
            "options.images: expected one of ['jpg', 'dicom'], got 'png'",
        ),
        ({"options": {"views": 3}}, "options.views: expected str or a list of str or null, got 3"),
        ({"release": {"name": "a release"}}, "release.id_column: required setting missing"),
        (
            {"release": {**RELEASE, "tables": [{"split": "train"}]}},
            "release.tables[0].files: required setting missing",
        ),  # fmt: skip
        (
            {"release": {**RELEASE, "tables": [{**TABLE, "split": "validation"}]}},
            "release.tables[0].split: expected one of ['train', 'test'], got 'validation'",
        ),
        (
            {"release": {**RELEASE, "tables": [{**TABLE, "image_folders": {"inside": "x"}}]}},
            "release.tables[0].image_folders.inside: unknown setting; known: "
            "['named', 'not_within', 'within']",
        ),
        (
            {"release": {**RELEASE, "tables": [TABLE], "strip_extensions": "all"}},
            "release.strip_extensions: expected one of ['any'] or a list of str, got 'all'",
        ),
        (
            {"release": {**RELEASE, "tables": [TABLE], "dme": {"column": "dme"}}},
            "release.dme.name: required setting missing",
        ),
    ],
)
def test_bad_blocks_are_one_exact_line_naming_the_file_and_key(tmp_path, blocks, message):
    path = _pipeline(tmp_path, **blocks)
    with pytest.raises(UserError) as caught:
        load_pipeline(str(path))
    assert str(caught.value) == f"{path}: {message}"


def _differences(typed, written, where: str) -> list[str]:
    """Where the typed value does not say what the YAML wrote (lists read as tuples)."""
    if isinstance(written, dict) and dataclasses.is_dataclass(typed):
        return [
            problem
            for key, value in written.items()
            for problem in (
                _differences(getattr(typed, key), value, f"{where}.{key}")
                if hasattr(typed, key)
                else [f"{where}.{key}: not typed"]
            )
        ]
    if isinstance(written, dict) and isinstance(typed, dict) and typed.keys() == written.keys():
        return [p for k, v in written.items() for p in _differences(typed[k], v, f"{where}[{k!r}]")]
    if isinstance(written, list) and isinstance(typed, tuple) and len(typed) == len(written):
        return [
            p for i, v in enumerate(written) for p in _differences(typed[i], v, f"{where}[{i}]")
        ]
    same_kind = type(typed) is type(written) or (type(typed), type(written)) == (float, int)
    return [] if same_kind and typed == written else [f"{where}: {typed!r} != {written!r}"]


@pytest.mark.parametrize("path", [*available_pipelines(), DOCS_EXAMPLE], ids=lambda p: p.stem)
def test_every_shipped_pipeline_types_each_block_as_its_yaml_says(path):
    written = yaml.safe_load(path.read_text(encoding="utf-8"))
    pipeline = load_pipeline(str(path))
    assert pipeline.raw == written  # the fingerprint reads the YAML as written
    problems = []
    for key in ("image", "splits", "labels", "texts", "sections", "options", "release"):
        typed = getattr(pipeline, key)
        if key not in written:  # an absent block is all defaults; no release: none at all
            absent = {"release": None, "splits": SplitConfig(hash_salt=written["name"])}
            assert typed == absent.get(key, type(typed)()), key
            continue
        problems += _differences(typed, written[key], key)
    assert problems == []


def test_source_defaults_are_stated_once_and_kept(tmp_path):
    """The defaults each source applied itself before the blocks were typed."""
    bare = load_pipeline(str(_pipeline(tmp_path)))
    assert bare.labels.missing == "text" and bare.labels.text_model is None
    assert bare.labels.reader_policy == "majority" and bare.labels.unannotated == "keep"
    assert bare.labels.covid19_all_positive is True and bare.labels.covid_window_days == 14.0
    assert bare.labels.patient_flags == ("N", "D", "G", "C", "A", "H", "M", "O")
    assert bare.labels.unknown_keyword_label == "Other Abnormality"
    assert bare.options == OptionsConfig("jpg", "chexpert", None) and bare.texts.kind == "labels"
    assert bare.release is None
    # MIDRC releases have no test set: a MIDRC pipeline that names no test share draws 10 %.
    ricord = load_pipeline(str(_pipeline(tmp_path, source="midrc_ricord", splits={})))
    assert ricord.splits.test_fraction == 0.1 and bare.splits.test_fraction == 0.0
    source = make_source(ricord, tmp_path, load_vocabulary("chest_xray"))
    assert source.test_fraction == 0.1


def test_description_template_defaults_reach_the_text_stage():
    # The docs example names no `uncertain` template: the default one words an uncertain label.
    pipeline = load_pipeline(str(DOCS_EXAMPLE))
    vocab = load_vocabulary("chest_xray")
    labels = [-1.0 if name == "Cardiomegaly" else math.nan for name in vocab.names]
    texts, origins = build_texts(labels, {}, vocab, pipeline.texts.templates())
    assert texts[1] == "Possible cardiomegaly." and origins[1] == "label_template"


def test_a_reader_that_needs_a_label_map_says_so(tmp_path):
    path = _pipeline(tmp_path, labels={"box_map": {"Infiltrate": "Infiltration"}})
    with pytest.raises(UserError) as caught:
        make_source(load_pipeline(str(path)), tmp_path, load_vocabulary("chest_xray"))
    expected = f"{path}: labels.map: the chestxray14 source needs a mapping of column -> label"
    assert str(caught.value) == expected
