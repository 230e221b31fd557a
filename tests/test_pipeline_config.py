"""Pipeline YAML: the shared `image:` and `splits:` blocks typed once, with one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mgll_data.build.pipeline import ImageConfig, SplitConfig, available_pipelines, load_pipeline
from mgll_data.cli import main
from mgll_data.errors import UserError


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
