"""Hostile inputs on the training side: checkpoints that would run code or are corrupt, export
that checks what it wrote, malformed label data, and images that do not decode mid-training.

Every command runs through `mgll_train.cli.main` in this process (a real 1-step `fit` of the
tiny model on a 64 px demo build); errors must be one line on stderr naming the file.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from mgll_train.cli import main as train_main
from mgll_train.errors import UserError
from mgll_train.export import verify_export
from tests.conftest import small_demo_build
from tests.test_fit_flags import fit as fit_in_process


class TouchOnUnpickle:
    """Unpickling this creates a file: what a hostile checkpoint could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return small_demo_build(tmp_path_factory.mktemp("hostile-data"), seed=5)


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hostile-logs")


@pytest.fixture(scope="module")
def checkpoint(dataset, logs) -> Path:
    """`epoch_latest.pt` of a real one-step run."""
    run = fit_in_process(logs, "base", dataset)
    return run / "checkpoints" / "epoch_latest.pt"


def _error_line(capsys, run: Callable[[], object]) -> str:
    """Run a command that must fail as a user error; return its one stderr line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run()
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("mgll-train: error: "), lines[0]
    return lines[0]


def _train_shard(dataset: Path) -> Path:
    (shard,) = sorted((dataset / "data").glob("train-*.parquet"))
    return shard


# ------------------------------------------------------------------------------- checkpoints


def test_a_checkpoint_holds_only_plain_values(checkpoint):
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)  # nothing to unpickle
    rng = state["rng"]
    assert isinstance(rng["numpy"]["keys"], list) and len(rng["numpy"]["keys"]) == 624
    assert isinstance(rng["python"]["internal"], list) and len(rng["python"]["internal"]) == 625
    assert isinstance(state["config"], dict) and state["config"]["model"] == "mgll-tiny"


def _hostile_checkpoints(
    checkpoint: Path, parquet: Path, where: Path, marker: Path
) -> dict[str, Path]:
    """Files named by what is wrong with them, made from a real checkpoint."""
    good = torch.load(checkpoint, map_location="cpu", weights_only=True)
    data = checkpoint.read_bytes()
    weights = good["state_dict"]
    half = dict(list(weights.items())[: len(weights) // 2])
    reshaped = dict(weights, **{"visual.proj": torch.zeros(3, 5)})
    files = {
        "pickled": {**good, "extra": TouchOnUnpickle(marker)},
        "foreign": {"weights": torch.zeros(2)},
        "keys-missing": {k: v for k, v in good.items() if k != "step"},
        "half-state-dict": {**good, "state_dict": half},
        "wrong-shape": {**good, "state_dict": reshaped},
    }
    paths = {}
    for name, state in files.items():
        paths[name] = where / f"{name}.pt"
        torch.save(state, paths[name])
    for name, content in (
        ("truncated", data[: len(data) // 2]),
        ("empty", b""),
        ("not-torch", parquet.read_bytes()),
    ):
        paths[name] = where / f"{name}.pt"
        paths[name].write_bytes(content)
    return paths


EXPECTED = {
    "pickled": "checkpoint holds pickled objects (written by an older mgll?); refusing to "
    "unpickle it",
    "foreign": "not a checkpoint written by mgll-train fit (expected model_name and state_dict",
    "keys-missing": "(step missing; expected model_name, state_dict, epoch, step",
    "half-state-dict": "does not fit open_clip model 'mgll-tiny' (expected every key and shape "
    "of the model: Missing key(s)",
    "wrong-shape": "size mismatch for visual.proj",
    "truncated": "not a torch zip archive: truncated",
    "empty": "(the file is empty)",
    "not-torch": "not a torch zip archive",
}


@pytest.fixture(scope="module")
def hostile(checkpoint, dataset, tmp_path_factory) -> tuple[dict[str, Path], Path]:
    where = tmp_path_factory.mktemp("hostile-checkpoints")
    marker = where / "unpickled-marker"
    paths = _hostile_checkpoints(checkpoint, _train_shard(dataset), where, marker)
    # the pickled file is really hostile: unpickling it the old way creates a file
    control = where / "control-marker"
    torch.save({"x": TouchOnUnpickle(control)}, where / "control.pt")
    torch.load(where / "control.pt", weights_only=False)
    assert control.exists()
    return paths, marker


@pytest.mark.parametrize("case", sorted(EXPECTED))
@pytest.mark.parametrize("command", ["export", "eval", "fit --resume"])
def test_hostile_checkpoints_are_one_line_errors(
    case, command, hostile, dataset, logs, tmp_path, capsys
):
    paths, marker = hostile
    path = paths[case]
    out = tmp_path / "out"
    if command == "export":
        run = lambda: train_main(["export", "--checkpoint", str(path), "--out", str(out)])  # noqa: E731
    elif command == "eval":
        run = lambda: train_main(  # noqa: E731
            ["eval", "--checkpoint", str(path), "--data", str(dataset), "--out", str(out),
             "--tasks", "zeroshot", "--workers", "0"]
        )  # fmt: skip
    else:
        name = f"resume-{case}"
        run = lambda: fit_in_process(logs, name, dataset, "--resume", str(path))  # noqa: E731
    line = _error_line(capsys, run)
    assert f"{path}: " in line and EXPECTED[case] in line, line
    assert not marker.exists()
    assert not out.exists()  # export and eval wrote nothing


# -------------------------------------------------------------------------------- export


def test_export_is_verified_and_readable_by_others(checkpoint, tmp_path, capsys):
    old_umask = os.umask(0o022)
    try:
        train_main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "a")])
        os.umask(0o027)
        train_main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "b")])
    finally:
        os.umask(old_umask)
    weights_file = "open_clip_model.safetensors"
    assert (tmp_path / "a" / weights_file).stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b" / weights_file).stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no staging folder left
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'a'}")
    loaded = model.state_dict()
    assert loaded.keys() == state["state_dict"].keys()
    assert all(torch.equal(loaded[k], v) for k, v in state["state_dict"].items())


def test_verify_export_refuses_a_folder_whose_weights_differ(checkpoint, tmp_path):
    out = tmp_path / "x"
    train_main(["export", "--checkpoint", str(checkpoint), "--out", str(out)])
    weights = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    verify_export(out, weights, checkpoint)  # as exported: identical
    stored = load_file(str(out / "open_clip_model.safetensors"))
    stored["visual.proj"] = stored["visual.proj"].clone()
    stored["visual.proj"][0, 0] += 1e-3
    save_file(stored, str(out / "open_clip_model.safetensors"))
    with pytest.raises(UserError, match=r"1 tensors differ, e\.g\. visual\.proj"):
        verify_export(out, weights, checkpoint)


# ----------------------------------------------------------------------------- label data


def _rewrite(shard: Path, out: Path, labels: list | None = None, names: list | None = None) -> Path:
    """A copy of ``shard`` with other label vectors and/or other metadata label names."""
    table = pq.read_table(shard)
    metadata = dict(table.schema.metadata)
    if labels is not None:
        column = table.schema.get_field_index("labels")
        table = table.set_column(column, "labels", pa.array(labels, pa.list_(pa.float32())))
    if names is not None:
        block = json.loads(metadata[b"mgll"])
        block["label_names"] = names
        block["annotated_labels"] = [n for n in block.get("annotated_labels", []) if n in names]
        metadata[b"mgll"] = json.dumps(block).encode()
    out.mkdir(parents=True)
    pq.write_table(table.replace_schema_metadata(metadata), out / shard.name)
    return out / shard.name


def _stored(shard: Path) -> tuple[np.ndarray, list[str]]:
    table = pq.read_table(shard)
    names = json.loads(table.schema.metadata[b"mgll"])["label_names"]
    return np.array(table["labels"].to_pylist(), dtype=np.float64), names


def _with_value(value: float) -> Callable[[np.ndarray, list[str]], dict]:
    def change(labels: np.ndarray, names: list[str]) -> dict:
        labels = labels.copy()
        labels[5, 2] = value
        return {"labels": labels.tolist()}

    return change


LABEL_CASES = {
    "vector-too-long": (
        lambda labels, names: {"labels": np.pad(labels, ((0, 0), (0, 1))).tolist()},
        "hold {k1} values; expected {k}, one per label_names entry of its mgll metadata",
    ),
    "names-too-short": (
        lambda labels, names: {"names": names[:-1]},
        "hold {k} values; expected {k_1}, one per label_names entry",
    ),
    "value-7": (_with_value(7.0), "has the label value 7; expected 1 (positive), 0 (negative)"),
    "value-minus-3": (_with_value(-3.0), "has the label value -3; expected 1"),
    "value-inf": (_with_value(np.inf), "has the label value inf; expected 1"),
    "all-nan": (
        lambda labels, names: {"labels": np.full_like(labels, np.nan).tolist()},
        "every stored label is NaN (nothing annotated); the MGLL losses and evaluation",
    ),
}


@pytest.mark.parametrize("case", sorted(LABEL_CASES))
def test_malformed_labels_are_refused_before_training(case, dataset, logs, tmp_path, capsys):
    shard = _train_shard(dataset)
    labels, names = _stored(shard)
    change, expected = LABEL_CASES[case]
    bad = _rewrite(shard, tmp_path / "data", **change(labels, names))
    line = _error_line(capsys, lambda: fit_in_process(logs, f"labels-{case}", bad))
    k = len(names)
    assert f"{bad}: " in line, line
    assert expected.format(k=k, k1=k + 1, k_1=k - 1) in line, line
    if case.startswith("value") or case == "vector-too-long":
        assert "record chestxray14:" in line  # the offending record is named
    assert not (logs / f"labels-{case}" / "checkpoints" / "epoch_1.pt").exists()


@pytest.mark.wires("mgll-train fit", "--loss")
def test_clip_trains_on_unannotated_data_with_one_warning(dataset, logs, tmp_path, capsys):
    shard = _train_shard(dataset)
    labels, _ = _stored(shard)
    bad = _rewrite(shard, tmp_path / "data", labels=np.full_like(labels, np.nan).tolist())
    capsys.readouterr()
    run = fit_in_process(logs, "clip-unannotated", bad, "--loss", "clip")
    assert (run / "checkpoints" / "epoch_latest.pt").is_file()
    warnings = [x for x in capsys.readouterr().out.splitlines() if "every stored label is NaN" in x]
    assert len(warnings) == 1 and "--loss clip trains on the texts alone" in warnings[0]


# ------------------------------------------------------------------------ unreadable images


@pytest.fixture(scope="module")
def damaged(dataset, tmp_path_factory) -> tuple[Path, list[str]]:
    """The train shard with two images cut to half their bytes (truncated PNGs)."""
    shard = _train_shard(dataset)
    table = pq.read_table(shard)
    images = table["image"].to_pylist()
    ids = table["id"].to_pylist()
    bad_rows = [3, 10]
    for row in bad_rows:
        data = images[row]["bytes"]
        images[row] = {**images[row], "bytes": data[: len(data) // 2]}
    column = table.schema.get_field_index("image")
    table = table.set_column(
        column, table.schema.field("image"), pa.array(images, table["image"].type)
    )
    out = tmp_path_factory.mktemp("damaged") / shard.name
    pq.write_table(table.replace_schema_metadata(table.schema.metadata), out)
    return out, [ids[r] for r in bad_rows]


@pytest.mark.wires("mgll-train fit", "--max-bad-samples")
def test_truncated_images_are_skipped_counted_and_limited(damaged, logs, capsys):
    shard, bad_ids = damaged
    rows = pq.read_metadata(shard).num_rows
    steps = str(rows // 4)  # one whole epoch: every row is read
    capsys.readouterr()
    run = fit_in_process(logs, "skip", shard, "--max-bad-samples", "2", "--max-steps", steps)
    out = capsys.readouterr().out.splitlines()
    for record_id in bad_ids:
        warned = [x for x in out if f"skipped {record_id} in {shard}" in x]
        assert len(warned) == 1, out[-20:]
    assert out[-1].endswith("; 2 unreadable images skipped"), out[-1]
    assert (run / "checkpoints" / "epoch_latest.pt").is_file()

    line = _error_line(
        capsys,
        lambda: fit_in_process(
            logs, "limit", shard, "--max-bad-samples", "1", "--max-steps", steps
        ),
    )
    assert f"{shard}: 2 unreadable images skipped, more than --max-bad-samples 1" in line, line


def test_a_clean_run_reports_nothing_skipped(checkpoint, logs):
    log = (logs / "base" / "out.log").read_text().strip().splitlines()
    assert "done: " in log[-1] and "unreadable" not in log[-1]
