"""The learnable demo's `mask` column: the union of the regions of the findings it draws.

Expected regions are computed here, in pixel coordinates, from each case's attributes and the
placement the generator reports (shift, nodule and mass centres), with each Gaussian sign's
half-maximum written as a distance bound (exp(-d²) >= 1/2 <=> d² <= ln 2); pixels within
`EPS` of a region's boundary are left out of the comparison (float rounding may go either way
there).
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mgll_data.build.engine import BuildOptions, build
from mgll_data.build.pipeline import load_pipeline
from mgll_data.demo.controlled_task import draw, write_learnable_release
from tests.conftest import run_module

EPS = 1e-4
LN2 = math.log(2)
SIDES = {"right": (-1,), "left": (1,), "bilateral": (-1, 1)}  # image-left is patient's right


def _coords(placement: dict, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Each pixel's (u, v): -1..1 across the image from its index, minus the reported shift."""
    du, dv = placement["shift"]
    rows, cols = np.indices((size, size), dtype=float)
    return cols / (size / 2) - 1 - du, rows / (size / 2) - 1 - dv


def _ellipse(u, v, cx, cy, ax, ay, bound=1.0):
    """(inside, near the edge) of ((u-cx)/ax)² + ((v-cy)/ay)² <= bound."""
    q = ((u - cx) / ax) ** 2 + ((v - cy) / ay) ** 2
    return q <= bound, np.abs(q - bound) < EPS


def _finding_region(finding: str, a: dict, placement: dict, u, v):
    """(region, ambiguous pixels) of one finding, from its attributes and the placement."""
    sev, sides, zone_v = a["severity"], SIDES[a["side"]], {"upper": -0.35, "middle": 0.0}
    region, near = np.zeros(u.shape, bool), np.zeros(u.shape, bool)
    for s in sides:
        if finding == "Cardiomegaly":  # profile clip(1.3 - q, 0, 1) >= 1/2 <=> q <= 0.8
            inside, edge = _ellipse(u, v, -0.06, 0.3, (0.33, 0.38, 0.44)[sev], 0.24, 0.8)
        elif finding in ("Nodule", "Mass"):
            cx, cy = placement["centres"][finding]
            r = 0.06 if finding == "Nodule" else (0.14, 0.18, 0.22)[sev]
            inside, edge = _ellipse(u, v, cx, cy, r, r, LN2)
        elif finding == "Consolidation":
            cy = zone_v.get(a["zone"], 0.3)
            inside, edge = _ellipse(u, v, s * 0.42, cy, 0.16, 0.14, LN2)
        elif finding == "Atelectasis":  # a Gaussian band 0.035 high, cut to a width
            half_w = 0.12 + 0.06 * sev
            inside = (np.abs(v - 0.25) <= 0.035 * math.sqrt(LN2)) & (np.abs(u - s * 0.4) < half_w)
            edge = np.abs(np.abs(v - 0.25) - 0.035 * math.sqrt(LN2)) < EPS
            edge |= np.abs(np.abs(u - s * 0.4) - half_w) < EPS
        elif finding == "Effusion":  # fluid below a level rising towards the lung's centre
            level = (0.42, 0.3, 0.15)[sev] + 0.1 * np.abs(u - s * 0.4)
            inside = (v > level) & (np.sign(u) == s) & (np.abs(u) < 0.72)
            edge = (np.abs(v - level) < EPS) | (np.abs(np.abs(u) - 0.72) < EPS)
        elif finding == "Pneumothorax":  # a rim of the lung's outline, apical and lateral
            rim = ((u - s * 0.4) / 0.3) ** 2 + ((v + 0.1) / 0.6) ** 2
            inner = 1 - 4 * (0.06, 0.1, 0.15)[sev]
            inside = (rim > inner) & (rim < 1.05) & (v < 0) & (s * u > 0.25)
            edge = (np.abs(rim - inner) < EPS) | (np.abs(rim - 1.05) < EPS)
            edge |= (np.abs(v) < EPS) | (np.abs(s * u - 0.25) < EPS)
        else:  # Edema: bilateral haze times the lung field, at least half its peak
            lungs = np.maximum(
                *[np.clip(1.2 - (((u - t * 0.4) / 0.3) ** 2 + ((v + 0.05) / 0.62) ** 2), 0, 1)
                  for t in (-1, 1)]
            )  # fmt: skip
            w = 0.18 + 0.05 * sev
            haze = np.exp(-(((np.abs(u) - 0.22) / w) ** 2) - (v / 0.45) ** 2)
            inside, edge = haze * lungs >= 0.5, np.abs(haze * lungs - 0.5) < EPS
        region |= inside
        near |= edge
    return region, near


def expected_mask(case: dict, placement: dict, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The union of the case's regions, and the pixels too close to an edge to compare."""
    u, v = _coords(placement, size)
    region, near = np.zeros((size, size), bool), np.zeros((size, size), bool)
    for finding, a in case.items():
        inside, edge = _finding_region(finding, a, placement, u, v)
        region |= inside
        near |= edge
    return region, near


CASES = [
    {"Cardiomegaly": {"side": "bilateral", "zone": "middle", "severity": 2}},
    {"Edema": {"side": "bilateral", "zone": "upper", "severity": 1}},
    {"Effusion": {"side": "left", "zone": "lower", "severity": 0}},
    {"Effusion": {"side": "bilateral", "zone": "lower", "severity": 2}},
    {"Pneumothorax": {"side": "right", "zone": "upper", "severity": 2}},
    {"Atelectasis": {"side": "left", "zone": "lower", "severity": 1}},
    {"Consolidation": {"side": "right", "zone": "upper", "severity": 0}},
    {"Nodule": {"side": "left", "zone": "middle", "severity": 0}},
    {"Mass": {"side": "right", "zone": "lower", "severity": 2}},
    {  # several at once: the mask is their union
        "Cardiomegaly": {"side": "bilateral", "zone": "lower", "severity": 0},
        "Consolidation": {"side": "left", "zone": "lower", "severity": 2},
        "Effusion": {"side": "right", "zone": "lower", "severity": 1},
        "Nodule": {"side": "right", "zone": "upper", "severity": 0},
    },
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "+".join(c))
def test_mask_is_the_union_of_the_drawn_regions(case):
    drawing = draw(case, 64, np.random.default_rng(9))
    region, near = expected_mask(case, drawing.placement, 64)
    assert region.sum() >= 5 and near.sum() < 0.01 * region.size
    assert np.array_equal(drawing.mask[~near], region[~near])
    if len(case) > 1:  # every finding contributes: none of them alone is the union
        u, v = _coords(drawing.placement, 64)
        for f, a in case.items():
            assert not np.array_equal(_finding_region(f, a, drawing.placement, u, v)[0], region)


@pytest.mark.parametrize("case", CASES[:-1], ids=lambda c: "+".join(c))
def test_the_mask_covers_where_the_sign_changes_the_image(case):
    """The mask lies on the sign: the image differs from a normal one (same noise seed) far
    more inside the mask than outside it."""
    drawing = draw(case, 64, np.random.default_rng(3))
    normal = draw({}, 64, np.random.default_rng(3))
    assert not normal.mask.any()
    diff = np.abs(drawing.image.astype(float) - normal.image.astype(float))
    assert diff[drawing.mask].mean() > 3 * diff[~drawing.mask].mean() + 5


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The learnable demo at 32 px: the 64-px frame's masks resized with the image."""
    out = tmp_path_factory.mktemp("learnable_masks") / "ds"
    args = ["demo", "--learnable", "--n", "60", "--image-size", "32", "--out", str(out)]
    result = run_module("mgll_data", [*args, "--no-progress"], timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def test_built_masks_are_the_drawn_regions_at_the_stored_size(built):
    reports = {}
    for line in (built / "_raw" / "reports.jsonl").read_text().splitlines():
        report = json.loads(line)
        reports[f"learnable:{Path(report['image']).stem}"] = report
    rows = [
        r for p in sorted((built / "data").glob("*.parquet")) for r in pq.read_table(p).to_pylist()
    ]
    assert len(rows) == 60
    seen = set()
    for row in rows:
        mask = np.asarray(Image.open(io.BytesIO(row["mask"]["bytes"])))
        assert mask.shape == (row["height"], row["width"]) == (32, 32)
        assert set(np.unique(mask)) <= {0, 255}
        report = reports[row["id"]]
        region, near = expected_mask(report["case"], report["placement"], 64)
        # each stored pixel takes the frame pixel under its centre: 2i + 1 at half size
        region, near = region[1::2, 1::2], near[1::2, 1::2]
        assert np.array_equal(mask[~near] == 255, region[~near]), row["id"]
        if row["positive_labels"] == ["No Finding"]:
            assert not mask.any()
        seen |= set(report["case"])
    assert len(seen) == 8  # every kind of finding was checked


def test_load_dataset_sees_the_mask_column(built):
    import datasets

    loaded = datasets.load_dataset(str(built))
    train = loaded["train"]
    assert "mask" in train.features and isinstance(train.features["mask"], datasets.Image)
    row = train[0]
    assert row["mask"].size == row["image"].size == (32, 32)
    assert sum(len(s) for s in loaded.values()) == 60


def test_an_unreadable_mask_is_quarantined_and_the_build_goes_on(tmp_path):
    root = write_learnable_release(tmp_path / "raw", n=6, seed=1)
    lines = (root / "reports.jsonl").read_text().splitlines()
    bad = json.loads(lines[2])
    bad["mask"]["rle"] = "4090 10"  # runs past the 64 x 64 frame
    lines[2] = json.dumps(bad)
    (root / "reports.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "ds"
    summary = build(load_pipeline("learnable"), root, out, BuildOptions(progress=False))
    assert summary.quarantined == 1 and sum(summary.rows.values()) == 5
    quarantine = (out / "_build" / "quarantine.jsonl").read_text().splitlines()
    entries = [json.loads(x) for x in quarantine]
    assert [(e["id"], e["stage"]) for e in entries] == [
        (f"learnable:{Path(bad['image']).stem}", "mask")
    ]
    assert "past the 64x64 frame" in entries[0]["reason"]


def test_max_steps_ending_on_an_epoch_boundary_keeps_the_weights(built, tmp_path):
    """A run that --max-steps ends exactly at the end of an epoch that --save-frequency does
    not save still leaves a checkpoint of where it stopped (the benchmark's runs need it)."""
    import torch

    from mgll_train.cli import main

    train_rows = sum(pq.read_table(p).num_rows for p in (built / "data").glob("train-*.parquet"))
    batch = train_rows // 2  # two full batches an epoch (the last partial one is dropped)
    main(["fit", "--train-data", str(built), "--model", "mgll-tiny", "--device", "cpu",
          "--workers", "0", "--batch-size", str(batch), "--epochs", "50", "--max-steps", "4",
          "--save-frequency", "50", "--warmup", "1", "--logs", str(tmp_path), "--name", "r",
          "--loss", "clip", "--no-progress", "--report-to", "none"])  # fmt: skip
    state = torch.load(tmp_path / "r" / "checkpoints" / "epoch_latest.pt", weights_only=True)
    assert (state["step"], state["epoch"], state["batch"]) == (4, 2, 0)
