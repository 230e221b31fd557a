"""Every flag of `mgll-train fit` changes what it claims, seen from outside `fit`.

Runs `fit` in-process (`mgll_train.cli.main`) on a small real build rewritten with known labels
and texts, and checks each flag against an expectation the test computes on its own:

* loss flags: the step-1 loss in metrics.jsonl equals a loss this module writes out pair by pair
  (targets from the label vectors it stored, its own label policy) on the first batch, and differs
  from the default's — so `fit` passed the flag on;
* optimizer flags: the stored weights and AdamW moments after one step satisfy the AdamW update
  with the flag's values, computed here from the initial weights;
* data flags: which rows a step saw, read from the logged share of truncated descriptions (the
  fixture gives chosen rows a description longer than the context), and the row count in out.log;
* run flags: the files written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock

from mgll_data.build.engine import BuildOptions, build
from mgll_data.build.pipeline import load_pipeline
from mgll_data.demo.nih_release import write_demo_release
from mgll_train.cli import main as train_main
from mgll_train.data import SampleTransform, StreamingRecords, collate, make_dataset
from mgll_train.data.normalize import model_input
from mgll_train.data.tokenizer import TextTokenizer
from mgll_train.model import create_model
from mgll_train.sampler import GlobalBatchSampler

REPO = Path(__file__).resolve().parents[1]
BATCH = 4
ROWS_PER_GROUP = 4
TRAIN_ROWS = 32  # 8 row groups of 4; the groups with an even index have a long description
TEST_ROWS = 8  # split "test", every description long
# Twelve short sentences: ~100 tokens in all (over mgll-tiny's 64), each sentence ~10.
LONG = " ".join(
    f"The {side} {zone} zone shows finding number {i}."
    for i, (side, zone) in enumerate(
        (s, z)
        for s in ("left", "right")
        for z in ("upper", "middle", "lower", "apical", "basal", "hilar")
    )
)
# Stored values of the patterned labels (every other label the source annotates is 0, the rest
# NaN): positives, uncertain (-1) and unmentioned (NaN) in annotated labels, partial overlaps.
NAN = math.nan
PATTERNS: list[dict[str, float]] = [
    {"Cardiomegaly": 1, "Pleural Effusion": 1, "Edema": -1, "Atelectasis": NAN},
    {"Cardiomegaly": 1, "Edema": 1},
    {"Pleural Effusion": 1, "Edema": NAN, "Atelectasis": -1},
    {"Cardiomegaly": 1, "Pleural Effusion": -1, "Edema": 1, "Atelectasis": 1},
    {"No Finding": 1, "Edema": -1},
]


# ------------------------------------------------------------------------------- fixtures


def _pattern_texts(p: int) -> tuple[str, str, str]:
    """(category, short description, explanation) of pattern p: distinct, never truncated."""
    positives = [name for name, v in PATTERNS[p].items() if v == 1]
    category = ", ".join(positives)
    return category, f"Pattern {p}: {category.lower()}.", f"Findings of pattern {p} are described."


def _stored_labels(p: int, names: Sequence[str], annotated: set[str]) -> list[float]:
    """The label vector stored for pattern p: its values, 0 for other annotated labels, NaN."""
    values = [0.0 if n in annotated else NAN for n in names]
    for name, value in PATTERNS[p].items():
        values[names.index(name)] = float(value)
    return values


def _write(
    table: pa.Table,
    rows: Sequence[int],
    split: str,
    long: Callable[[int], bool],
    dst: Path,
    meta: dict[str, Any],
) -> None:
    """Rows of `table` with split, patterned labels and texts; `long(i)`: description is LONG."""
    names, annotated = meta["label_names"], set(meta["annotated_labels"])
    part = table.take(pa.array(rows))
    texts = [_pattern_texts(r % len(PATTERNS)) for r in rows]
    columns = {
        "split": pa.array([split] * len(rows)),
        "labels": pa.array(
            [_stored_labels(r % len(PATTERNS), names, annotated) for r in rows],
            type=pa.list_(pa.float32(), len(names)),
        ),
        "text_category": pa.array([t[0] for t in texts]),
        "text_description": pa.array([LONG if long(i) else t[1] for i, t in enumerate(texts)]),
        "text_explanation": pa.array([t[2] for t in texts]),
    }
    for name, column in columns.items():
        part = part.set_column(part.schema.get_field_index(name), name, column)
    dst.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(part, dst, row_group_size=ROWS_PER_GROUP)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Any]:
    """A 40-image demo build (64 px) rewritten with known labels, texts, splits, row groups.

    marked/data/train-…: 32 train rows, row i has PATTERNS[i % 5]; row groups of 4, long
    description in even groups. marked/data/test-…: 8 test rows, long descriptions.
    long/data/train-…: those 8 rows as train rows.
    """
    root = tmp_path_factory.mktemp("fit-flags")
    raw = write_demo_release(root / "raw", n=40, seed=5, image_size=96)
    build(
        load_pipeline("chestxray14"), raw, root / "ds", BuildOptions(image_size=64, progress=False)
    )
    files = sorted((root / "ds" / "data").glob("*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files]).sort_by("id")
    assert table.num_rows == TRAIN_ROWS + TEST_ROWS
    meta = json.loads(table.schema.metadata[b"mgll"])
    plain = {k: v for k, v in table.schema.metadata.items() if k != b"huggingface"}
    table = table.replace_schema_metadata(plain)
    train = root / "marked" / "data" / "train-00000-of-00001.parquet"
    test = root / "marked" / "data" / "test-00000-of-00001.parquet"
    long = root / "long" / "data" / "train-00000-of-00001.parquet"
    train_rows = list(range(TRAIN_ROWS))
    test_rows = list(range(TRAIN_ROWS, TRAIN_ROWS + TEST_ROWS))
    _write(table, train_rows, "train", lambda i: (i // ROWS_PER_GROUP) % 2 == 0, train, meta)
    _write(table, test_rows, "test", lambda i: True, test, meta)
    _write(table, test_rows, "train", lambda i: True, long, meta)
    ids = table["id"].to_pylist()
    return {
        "root": root,
        "train": train,
        "marked": root / "marked",
        "long": root / "long",
        "meta": meta,
        "pattern_of": {ids[r]: r % len(PATTERNS) for r in range(table.num_rows)},
        "is_long": {ids[r]: (r // ROWS_PER_GROUP) % 2 == 0 or r >= TRAIN_ROWS for r in range(40)},
    }


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Iterator[Path]:
    """The runs folder of this module; removed at the end (checkpoints are ~40 MB each)."""
    path = tmp_path_factory.mktemp("fit-flag-runs")
    yield path
    shutil.rmtree(path, ignore_errors=True)


# -------------------------------------------------------------------------------- helpers


def fit(logs: Path, name: str, train_data: Path | str, *flags: str) -> Path:
    """Run `mgll-train fit` in this process (batch 4, 1 step unless flags say otherwise)."""
    defaults = {
        "--train-data": str(train_data),
        "--batch-size": str(BATCH),
        "--max-steps": "1",
        "--workers": "0",
        "--device": "cpu",
        "--logs": str(logs),
        "--name": name,
        "--log-every-n-steps": "1",
        "--report-to": "none",
    }
    given = set(flags)
    argv = ["fit", *(x for k, v in defaults.items() if k not in given for x in (k, v)), *flags]
    root = logging.getLogger()
    saved = root.handlers[:], root.level, signal.getsignal(signal.SIGTERM)
    with one_thread():
        try:
            train_main(argv)
        finally:  # fit reconfigures logging and SIGTERM for its run; give them back
            for handler in root.handlers:
                if handler not in saved[0]:
                    handler.close()
            root.handlers[:] = saved[0]
            root.setLevel(saved[1])
            signal.signal(signal.SIGTERM, saved[2])
    return logs / name


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op thread (as the subprocess runs get with OMP_NUM_THREADS=1): the same float
    sums on any machine, and no oversubscription next to other test processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def records(run: Path) -> list[dict]:
    """The train records of metrics.jsonl."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [x["train"] for x in lines if "train" in x]


def checkpoint(run: Path, name: str = "epoch_latest.pt") -> dict[str, Any]:
    """A checkpoint of the run, on the CPU."""
    return torch.load(run / "checkpoints" / name, map_location="cpu", weights_only=False)


def long_rows_per_step(run: Path, batch: int = BATCH) -> list[int]:
    """How many rows with the long description each step saw (from the cumulative rates)."""
    seen = [round(r["truncated"]["description"] * r["step"] * batch) for r in records(run)]
    assert [r["step"] for r in records(run)] == list(range(1, len(seen) + 1))
    return [b - a for a, b in zip([0, *seen[:-1]], seen, strict=True)]


def rows_in_log(run: Path) -> int:
    """The row count `fit` reports in out.log ("training M on N rows ...")."""
    text = (run / "out.log").read_text()
    return int(text.split(" rows (")[0].rsplit(" on ", 1)[1])


def initial_weights(seed: int, loss: str = "mgll") -> dict[str, torch.Tensor]:
    """mgll-tiny as `fit --seed seed` creates it (open_clip's init after torch.manual_seed)."""
    torch.manual_seed(seed)
    model = create_model("mgll-tiny", init_logit_bias=-10.0 if loss == "mgll" else None).model
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------- the reference loss


def label_policy(stored: Sequence[float], names: Sequence[str], annotated: set[str],
                 uncertain: str, unmentioned: str) -> list[float]:  # fmt: skip
    """DESIGN §7 as the CLI help states it: -1 → NaN/1/0; NaN of an annotated label → 0/NaN."""
    out = []
    for name, value in zip(names, stored, strict=True):
        if value == -1:
            out.append({"ignore": NAN, "positive": 1.0, "negative": 0.0}[uncertain])
        elif math.isnan(value):
            out.append(0.0 if name in annotated and unmentioned == "negative" else NAN)
        else:
            out.append(value)
    return out


def pair_target(a: Sequence[float], b: Sequence[float], overlap: bool) -> float:
    """Jaccard of the positive sets over the labels annotated in both (both empty: 1; none: 0)."""
    common = [k for k in range(len(a)) if not (math.isnan(a[k]) or math.isnan(b[k]))]
    if not common:
        return 0.0
    pa_, pb_ = {k for k in common if a[k] > 0}, {k for k in common if b[k] > 0}
    value = len(pa_ & pb_) / len(pa_ | pb_) if pa_ | pb_ else 1.0
    return float(value > 0) if overlap else value


def reference_terms(
    img: torch.Tensor,
    txt: torch.Tensor,
    tokens: torch.Tensor,
    labels: list[list[float]],
    scale: float,
    bias: float | None,
    *,
    mode: str = "mgll",
    soft_target: str = "jaccard",
    pointwise_target: str = "binary",
    weights: Sequence[float] = (1.0, 1.0, 1.0),
    rows: slice = slice(None),
) -> dict[str, float]:
    """The loss terms written out from the README/DESIGN formulas, in float64.

    img [B, D], txt [G, B, D], tokens [G, B, L]; two texts are the same text when their tokens
    are (the fixture's texts are never cut, except LONG, which is one text). `rows`: the mean is
    over these image/text rows only (one rank's local loss).
    """
    img, txt = img.double(), txt.double()
    g_count, b = txt.shape[:2]
    logits = [scale * img @ txt[g].T for g in range(g_count)]
    eye = torch.arange(b)

    def same(g: int) -> torch.Tensor:
        return torch.tensor(
            [[float(torch.equal(tokens[g, i], tokens[g, j])) for j in range(b)] for i in range(b)],
            dtype=torch.float64,
        )

    if mode == "clip":
        soft = sum(0.5 * (F.cross_entropy(lg, eye, reduction="none")[rows]
                          + F.cross_entropy(lg.T, eye, reduction="none")[rows]).mean()
                   for lg in logits) / g_count  # fmt: skip
        return {"loss": float(soft), "soft_contrastive": float(soft), "pointwise": 0.0, "kl": 0.0}
    if mode == "mgll-official":
        soft = pointwise = 0.0
        for g, lg in enumerate(logits):
            y = same(g) / same(g).sum(1, keepdim=True)
            pointwise += F.binary_cross_entropy_with_logits(lg, y)
            ce_i = -(y * lg.log_softmax(1)).sum(1).mean()
            ce_t = -(y * lg.T.log_softmax(1)).sum(1).mean()
            soft += 0.25 * (ce_i + ce_t)
        mean = torch.stack(logits).mean(0)
        kl = torch.stack(
            [(mean * (mean.log() - lg.log())).sum() / b for lg in logits]
        ).mean()  # kl_div(log L_g, M, batchmean); NaN when a logit is <= 0
        kl = 0.5 * kl if torch.isfinite(kl) else torch.tensor(0.0)
        a1, a2, a3 = weights
        total = a1 * soft + a2 * pointwise + a3 * kl
        return {"loss": float(total), "soft_contrastive": float(soft),
                "pointwise": float(pointwise), "kl": float(kl)}  # fmt: skip
    soft_rows = torch.zeros(b, dtype=torch.float64)
    point_rows = torch.zeros(b, dtype=torch.float64)
    for g, lg in enumerate(logits):
        if g == 0 and soft_target != "exact":
            c = torch.tensor(
                [[pair_target(labels[i], labels[j], soft_target == "overlap") for j in range(b)]
                 for i in range(b)], dtype=torch.float64,
            )  # fmt: skip
        else:
            c = same(g)
        c[eye, eye] = 1.0
        w_img, w_txt = c / c.sum(1, keepdim=True), c.T / c.T.sum(1, keepdim=True)
        ce_i = -(w_img * lg.log_softmax(1)).sum(1)
        ce_t = -(w_txt * lg.T.log_softmax(1)).sum(1)
        soft_rows += 0.5 * (ce_i + ce_t)
        y = c if pointwise_target == "graded" else (c > 0).double()
        point_rows += F.binary_cross_entropy_with_logits(lg + bias, y, reduction="none").mean(1)
    probs = torch.stack([lg.softmax(1) for lg in logits])  # [G, B, B]
    mixture = probs.mean(0)
    kl_rows = (probs * (probs.log() - mixture.log())).sum((0, 2)) if g_count > 1 else 0 * soft_rows
    soft, point, kl = (float(x[rows].mean()) for x in (soft_rows, point_rows, kl_rows))
    a1, a2, a3 = weights
    return {"loss": a1 * soft + a2 * point + a3 * kl, "soft_contrastive": soft,
            "pointwise": point, "kl": kl}  # fmt: skip


def expected_step1(
    data: dict[str, Any],
    *,
    seed: int = 0,
    batch_size: int = BATCH,
    granularities: tuple[str, ...] = ("category", "description", "explanation"),
    uncertain: str = "ignore",
    unmentioned: str = "negative",
    text_sampling: str = "truncate",
    augment: bool = False,
    rows: slice = slice(None),
    **loss: Any,
) -> dict[str, Any]:
    """The step-1 loss terms of `fit` on data["train"] with these settings, and the batch ids.

    The first batch's rows and their images and tokens come from the data pipeline (seeded
    sampler, per-sample transforms); the label vectors from this module's own policy on the
    stored patterns; the features from open_clip's encoders at `--seed` initialisation.
    """
    mode = loss.get("mode", "mgll")
    torch.manual_seed(seed)
    bundle = create_model("mgll-tiny", init_logit_bias=-10.0 if mode == "mgll" else None)
    model = bundle.model
    transform = SampleTransform.from_model(
        model, bundle.tokenizer, granularities=granularities, uncertain=uncertain,
        unmentioned=unmentioned, text_sampling=text_sampling, augment=augment,
    )  # fmt: skip
    dataset = make_dataset(str(data["train"]), transform, seed=seed)
    sampler = GlobalBatchSampler(len(dataset), batch_size, seed=seed)
    batch = collate([dataset[i] for i in next(iter(sampler))])
    names, annotated = data["meta"]["label_names"], set(data["meta"]["annotated_labels"])
    labels = [
        label_policy(
            _stored_labels(data["pattern_of"][i], names, annotated),
            names, annotated, uncertain, unmentioned,
        )
        for i in batch["ids"]
    ]  # fmt: skip
    normalize = mode != "mgll-official"
    tokens = batch["texts"]
    g, b, length = tokens.shape
    with torch.no_grad():
        img = model.encode_image(model_input(batch["images"], model, "cpu"), normalize=normalize)
        txt = model.encode_text(tokens.reshape(g * b, length), normalize=normalize).reshape(
            g, b, -1
        )
        scale = float(model.logit_scale.exp())
        bias = float(model.logit_bias) if getattr(model, "logit_bias", None) is not None else None
    terms = reference_terms(img, txt, tokens, labels, scale, bias, rows=rows, **loss)
    return terms | {"ids": batch["ids"]}


def assert_terms(logged: dict[str, Any], expected: dict[str, Any], rel: float = 1e-5) -> None:
    """The four logged loss terms equal the reference's."""
    for key in ("loss", "soft_contrastive", "pointwise", "kl"):
        assert logged[key] == pytest.approx(expected[key], rel=rel, abs=1e-6), key


# ------------------------------------------------------------------------------ baseline


@pytest.fixture(scope="module")
def baseline(data, logs) -> dict[str, Any]:
    """`fit` with every flag at its default (one step, batch 4): run dir, record, expectation."""
    run = fit(logs, "baseline", data["train"])
    return {"run": run, "record": records(run)[0], "expected": expected_step1(data)}


@pytest.mark.wires("mgll-train fit", "--max-steps", "--report-to", "--train-data")
def test_default_run_matches_the_reference_loss(data, baseline):
    """The default run: the reference loss, the first batch's rows, one step, no TensorBoard."""
    run, record, expected = baseline["run"], baseline["record"], baseline["expected"]
    assert_terms(record, expected)
    assert record["kl"] > 0 and record["pointwise"] > 0
    long = sum(data["is_long"][i] for i in expected["ids"])
    assert 0 < long < BATCH  # a mixed first batch: the window/streaming tests rely on it
    assert record["truncated"] == {"category": 0.0, "description": long / BATCH, "explanation": 0.0}
    # --max-steps 1 stopped an 8-step epoch after one step
    assert len(records(run)) == 1 and checkpoint(run, "step_1.pt")["step"] == 1
    assert rows_in_log(run) == TRAIN_ROWS
    assert not (run / "tensorboard").exists()  # --report-to none (TensorBoard is installed)


# ------------------------------------------------------------------ loss and data flags


def _case(flags: list[str], settings: dict[str, Any], wires: pytest.MarkDecorator,
          rel: float = 1e-5) -> Any:  # fmt: skip
    """One row of the table: the flags, the reference's settings, the match tolerance."""
    return pytest.param(flags, settings, rel, marks=wires, id=" ".join(flags))


LOSS_CASES = [
    _case(["--soft-target", "overlap"], {"soft_target": "overlap"},
          pytest.mark.wires("mgll-train fit", "--soft-target")),
    _case(["--soft-target", "exact"], {"soft_target": "exact"},
          pytest.mark.wires("mgll-train fit", "--soft-target")),
    _case(["--pointwise-target", "graded"], {"pointwise_target": "graded"},
          pytest.mark.wires("mgll-train fit", "--pointwise-target")),
    _case(["--loss-weights", "0.5,2,3"], {"weights": (0.5, 2.0, 3.0)},
          pytest.mark.wires("mgll-train fit", "--loss-weights")),
    _case(["--loss", "clip"], {"mode": "clip"},
          pytest.mark.wires("mgll-train fit", "--loss")),
    _case(["--loss", "mgll-official"], {"mode": "mgll-official"},
          pytest.mark.wires("mgll-train fit", "--loss")),
    _case(["--uncertain", "positive"], {"uncertain": "positive"},
          pytest.mark.wires("mgll-train fit", "--uncertain")),
    _case(["--uncertain", "negative"], {"uncertain": "negative"},
          pytest.mark.wires("mgll-train fit", "--uncertain")),
    _case(["--unmentioned", "ignore"], {"unmentioned": "ignore"},
          pytest.mark.wires("mgll-train fit", "--unmentioned")),
    _case(["--granularities", "description,category"],
          {"granularities": ("description", "category")},
          pytest.mark.wires("mgll-train fit", "--granularities")),
    _case(["--text-sampling", "sentences"], {"text_sampling": "sentences"},
          pytest.mark.wires("mgll-train fit", "--text-sampling")),
    _case(["--augment"], {"augment": True},
          pytest.mark.wires("mgll-train fit", "--augment")),
    _case(["--seed", "3"], {"seed": 3},
          pytest.mark.wires("mgll-train fit", "--seed")),
    _case(["--batch-size", "6"], {"batch_size": 6},
          pytest.mark.wires("mgll-train fit", "--batch-size")),
    # two micro-batches of 4: the step's loss is the loss of all 8 rows
    _case(["--accum-freq", "2"], {"batch_size": 8},
          pytest.mark.wires("mgll-train fit", "--accum-freq")),
    # the YAML sets the loss and a batch size that the command line overrides
    _case(["--config", "{config}", "--batch-size", "4"], {"mode": "clip"},
          pytest.mark.wires("mgll-train fit", "--config")),
]  # fmt: skip


@pytest.mark.parametrize(("flags", "settings", "rel"), LOSS_CASES)
def test_flag_reaches_the_step1_loss(data, logs, baseline, tmp_path, flags, settings, rel):
    """Step-1 loss of `fit FLAGS` = the reference with the flag's setting ≠ the default's."""
    config = tmp_path / "run.yaml"
    config.write_text("loss: clip\nbatch-size: 6\n")
    flags = [str(config) if f == "{config}" else f for f in flags]
    # two cases may share settings: tmp_path's name keeps their run names apart
    name = "case-" + re.sub(r"[^a-z0-9]+", "_", str(sorted(settings.items()))) + tmp_path.name
    run = fit(logs, name, data["train"], *flags)
    record = records(run)[0]
    expected = expected_step1(data, **settings)
    assert_terms(record, expected, rel)
    default = baseline["expected"]
    # the flag's effect on this batch is far beyond the tolerance of the match
    assert abs(expected["loss"] - default["loss"]) > 20 * rel * abs(default["loss"])
    if "granularities" in settings:
        assert set(record["truncated"]) == {"description", "category"}
    if "text_sampling" in settings:  # the long descriptions now fit: nothing was cut
        assert any(data["is_long"][i] for i in expected["ids"])
        assert record["truncated"]["description"] == 0.0
    shutil.rmtree(run / "checkpoints")


@pytest.mark.wires("mgll-train fit", "--precision")
@pytest.mark.parametrize("precision", ["amp", "amp_bf16"])
def test_precision_autocasts_the_step(data, logs, baseline, precision):
    """amp (fp16 and a grad scaler) and amp_bf16 (bf16, no scaler) compute in low precision."""
    run = fit(logs, f"precision-{precision}", data["train"], "--precision", precision)
    record, state = records(run)[0], checkpoint(run)
    default = baseline["record"]["loss"]
    assert record["loss"] == pytest.approx(default, rel=2e-2)  # the same step ...
    if precision == "amp":  # ... with fp16 autocast and a GradScaler whose state is saved
        assert state["scaler"] is not None and state["scaler"]["scale"] > 1
        assert record["loss"] != default
    else:  # ... in bfloat16 (8 mantissa bits): visibly rounded, and no scaler
        assert state["scaler"] is None
        assert abs(record["loss"] - default) > 1e-5 * abs(default)
    assert checkpoint(baseline["run"])["scaler"] is None


# -------------------------------------------------------------------- optimizer flags


def _named_groups(initial: dict[str, torch.Tensor], trainable: set[str]) -> list[list[str]]:
    """Parameter names of fit's two AdamW groups: no decay (1-d, norms, biases, logit scale/bias,
    open_clip's rule), then decay, each in the model's parameter order."""
    no_decay, decay = [], []
    for name in initial:
        if name not in trainable:
            continue
        exclude = initial[name].ndim < 2 or any(
            k in name for k in ("bn", "ln", "bias", "logit_scale")
        )
        (no_decay if exclude else decay).append(name)
    return [no_decay, decay]


def _parameter_names(loss: str = "mgll") -> set[str]:
    """The names of mgll-tiny's parameters (all trainable unless a tower is locked)."""
    torch.manual_seed(0)
    model = create_model("mgll-tiny", init_logit_bias=-10.0 if loss == "mgll" else None).model
    return {n for n, _ in model.named_parameters()}


def _moments(state: dict, initial: dict, trainable: set[str]) -> dict[str, tuple[Any, ...]]:
    """{name: (exp_avg, exp_avg_sq, group)} from a checkpoint's AdamW state."""
    groups = state["optimizer"]["param_groups"]
    names = _named_groups(initial, trainable)
    out = {}
    for group, group_names in zip(groups, names, strict=True):
        assert len(group["params"]) == len(group_names)
        for pid, name in zip(group["params"], group_names, strict=True):
            s = state["optimizer"]["state"][pid]
            assert s["exp_avg"].shape == initial[name].shape, name
            out[name] = (s["exp_avg"].double(), s["exp_avg_sq"].double(), group)
    return out


@pytest.mark.wires(
    "mgll-train fit", "--lr", "--warmup", "--wd", "--beta1", "--beta2", "--eps", "--seed"
)
def test_optimizer_flags_give_the_adamw_step(data, logs):
    """After one step: m = (1-β1)g, v = (1-β2)g², p1 = p0(1 - lr_t·wd) - lr_t·g/(|g| + eps),
    lr_t = lr/warmup (the first warm-up step), p0 the `--seed` initialisation."""
    lr, warmup, wd, beta1, beta2, eps, seed = 0.01, 4, 0.5, 0.8, 0.95, 1e-3, 3
    run = fit(logs, "optimizer", data["train"], "--lr", str(lr), "--warmup", str(warmup),
              "--wd", str(wd), "--beta1", str(beta1), "--beta2", str(beta2), "--eps", str(eps),
              "--seed", str(seed))  # fmt: skip
    state = checkpoint(run)
    lr_t = lr * 1 / warmup
    assert records(run)[0]["lr"] == pytest.approx(lr_t)
    no_decay, decay = state["optimizer"]["param_groups"]
    assert (no_decay["weight_decay"], decay["weight_decay"]) == (0.0, wd)
    assert tuple(decay["betas"]) == (beta1, beta2) and decay["eps"] == eps
    initial = initial_weights(seed)
    assert not torch.equal(
        initial["visual.conv1.weight"], initial_weights(0)["visual.conv1.weight"]
    )
    moved = 0
    for name, (m, v, group) in _moments(state, initial, _parameter_names()).items():
        g = m / (1 - beta1)
        torch.testing.assert_close(v, (1 - beta2) * g * g, rtol=1e-4, atol=1e-20, msg=name)
        p0 = initial[name].double()
        decay_factor = 1 - lr_t * group["weight_decay"]
        expected = p0 * decay_factor - lr_t * g / (g.abs() + eps)
        torch.testing.assert_close(state["state_dict"][name].double(), expected, rtol=1e-5,
                                   atol=1e-7, msg=name)  # fmt: skip
        moved += int(g.abs().max() > 0)
    assert moved > 10
    shutil.rmtree(run / "checkpoints")


def _gradient_norm(state: dict, initial: dict, trainable: set[str], beta1: float = 0.9) -> float:
    """The global norm of the gradient AdamW stepped with (its first moment / (1 - β1))."""
    moments = _moments(state, initial, trainable)
    return math.sqrt(sum(float((m / (1 - beta1)).pow(2).sum()) for m, _, _ in moments.values()))


@pytest.mark.wires("mgll-train fit", "--grad-clip-norm")
def test_grad_clip_norm_bounds_the_stepped_gradient(data, logs, baseline):
    """The gradient AdamW stepped with has norm 0.05 (clipped), the default's norm is larger."""
    initial, trainable = initial_weights(0), _parameter_names()
    raw = _gradient_norm(checkpoint(baseline["run"]), initial, trainable)
    assert raw > 0.2
    run = fit(logs, "clip-norm", data["train"], "--grad-clip-norm", "0.05")
    assert _gradient_norm(checkpoint(run), initial, trainable) == pytest.approx(0.05, rel=1e-4)
    shutil.rmtree(run / "checkpoints")


TEXT_TOWER = (
    "token_embedding",
    "positional_embedding",
    "transformer.",
    "ln_final",
    "text_projection",
)


@pytest.mark.wires("mgll-train fit", "--lock-image", "--lock-text")
@pytest.mark.parametrize("flag", ["--lock-image", "--lock-text"])
def test_lock_freezes_one_tower(data, logs, baseline, flag):
    """The locked tower keeps its initial weights and has no optimizer state; the other moves."""
    initial = initial_weights(0)
    in_text = {k for k in initial if k.startswith(TEXT_TOWER)}
    in_visual = {k for k in initial if k.startswith("visual.")}
    assert in_text and in_visual and not in_text & in_visual
    locked, free = (in_visual, in_text) if flag == "--lock-image" else (in_text, in_visual)
    moved_by_default = {k for k, v in checkpoint(baseline["run"])["state_dict"].items()
                        if not torch.equal(v, initial[k])}  # fmt: skip
    assert locked <= moved_by_default
    run = fit(logs, f"lock{flag}", data["train"], flag)
    state = checkpoint(run)
    moved = {k for k, v in state["state_dict"].items() if not torch.equal(v, initial[k])}
    assert not moved & locked
    assert free & moved_by_default <= moved
    stepped = sum(len(g["params"]) for g in state["optimizer"]["param_groups"])
    assert stepped == len(_parameter_names() - locked)
    shutil.rmtree(run / "checkpoints")


@pytest.mark.wires("mgll-train fit", "--grad-checkpointing")
def test_grad_checkpointing_recomputes_the_blocks(data, logs):
    """Each transformer block runs once in the forward pass and once more in the backward pass
    (recomputation) when its activations were not kept."""
    calls: list[int] = []

    def count(module: torch.nn.Module, args: Any) -> None:
        if isinstance(module, ResidualAttentionBlock):
            calls.append(id(module))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(count)
    try:
        run = fit(logs, "checkpointing", data["train"], "--grad-checkpointing")
    finally:
        handle.remove()
    config = json.loads((REPO / "mgll_train" / "model_configs" / "mgll-tiny.json").read_text())
    blocks = config["vision_cfg"]["layers"] + config["text_cfg"]["layers"]
    assert len(set(calls)) == blocks  # one call per block without checkpointing ...
    assert len(calls) == 2 * blocks  # ... two with it
    assert records(run)[0]["loss"] > 0
    shutil.rmtree(run / "checkpoints")


# ----------------------------------------------------------------------- model and device


@pytest.mark.wires("mgll-train fit", "--pretrained")
def test_pretrained_checkpoint_path_is_the_starting_point(data, logs, tmp_path):
    """A state dict saved to a file is the run's step-0 model, not the seed's initialisation."""
    torch.manual_seed(123)
    weights = create_model("mgll-tiny").model.state_dict()
    path = tmp_path / "start.pt"
    torch.save(weights, path)
    run = fit(logs, "pretrained", data["train"], "--pretrained", str(path), "--max-steps", "0")
    start = checkpoint(run, "step_0.pt")["state_dict"]
    assert start.keys() == weights.keys()
    for key, value in weights.items():
        assert torch.equal(start[key], value), key
    assert not torch.equal(start["visual.conv1.weight"], initial_weights(0)["visual.conv1.weight"])
    shutil.rmtree(run / "checkpoints")


@pytest.mark.wires("mgll-train fit", "--model")
def test_model_is_built_from_the_named_config(data, logs, tmp_path):
    """`--model local-dir:DIR` (open_clip's schema): a model of that config, 32-d embeddings."""
    config = json.loads((REPO / "mgll_train" / "model_configs" / "mgll-tiny.json").read_text())
    config["embed_dim"] = 32
    folder = tmp_path / "model32"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config}))
    run = fit(logs, "model", data["train"], "--model", f"local-dir:{folder}")
    state = checkpoint(run)
    assert state["model_name"] == f"local-dir:{folder}"
    assert tuple(state["state_dict"]["text_projection"].shape) == (64, 32)
    assert tuple(state["state_dict"]["visual.proj"].shape) == (64, 32)
    shutil.rmtree(run / "checkpoints")


@pytest.mark.wires("mgll-train fit", "--device")
def test_device_selects_where_the_model_runs(data, logs):
    """cpu runs on the CPU without a word; cuda runs on the GPU, or says it falls back."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = fit(logs, "device-cpu", data["train"], "--device", "cpu")
    assert not [w for w in caught if "falling back" in str(w.message)]
    assert all(v.device.type == "cpu" for v in checkpoint(run)["state_dict"].values())
    shutil.rmtree(run / "checkpoints")
    if torch.cuda.is_available():
        run = fit(logs, "device-cuda", data["train"], "--device", "cuda")
        state = torch.load(run / "checkpoints" / "epoch_latest.pt", weights_only=False)
        assert all(v.is_cuda for v in state["state_dict"].values())
    else:  # one line in our words (in out.log too), not open_clip's warning with its path
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run = fit(logs, "device-cuda", data["train"], "--device", "cuda")
        assert not [w for w in caught if "falling back" in str(w.message)]
        expected = "--device cuda: no cuda device is available here; running on the CPU"
        assert expected in (run / "out.log").read_text()
    shutil.rmtree(run / "checkpoints")


# ------------------------------------------------------------------- rows seen by steps


@pytest.mark.wires("mgll-train fit", "--train-split")
def test_train_split_picks_the_rows(data, logs):
    """--train-split test: the 8 test rows (all with the long description), 2 steps."""
    run = fit(logs, "split", data["marked"], "--train-split", "test", "--max-steps", "100")
    assert rows_in_log(run) == TEST_ROWS
    assert long_rows_per_step(run) == [BATCH] * (TEST_ROWS // BATCH)  # only the test rows


@pytest.mark.wires("mgll-train fit", "--train-data", "--train-data-upsampling-factors")
def test_upsampling_factors_weight_the_sources(data, logs):
    """long (8 rows) x 3 :: the 32 marked rows x 0: 24 rows a epoch, all of them long ones."""
    sources = f"{data['long']}::{data['train']}"
    run = fit(logs, "upsampling", sources, "--train-data-upsampling-factors", "3::0",
              "--max-steps", "100")  # fmt: skip
    assert rows_in_log(run) == 3 * TEST_ROWS
    assert long_rows_per_step(run) == [BATCH] * (3 * TEST_ROWS // BATCH)


def _homogeneous(counts: list[int]) -> bool:
    """Every step saw only long or only short descriptions."""
    return set(counts) <= {0, BATCH}


@pytest.mark.wires("mgll-train fit", "--shuffle-window")
def test_shuffle_window_keeps_batches_within_row_groups(data, logs, baseline):
    """Window 1: each batch of 4 is one row group of 4, so all-long or all-short; every group
    once. The default order mixes them (the baseline's first batch)."""
    run = fit(logs, "window", data["train"], "--shuffle-window", "1", "--max-steps", "100")
    counts = long_rows_per_step(run)
    assert len(counts) == TRAIN_ROWS // BATCH and _homogeneous(counts)
    assert counts.count(BATCH) == TRAIN_ROWS // ROWS_PER_GROUP // 2


@pytest.mark.wires("mgll-train fit", "--streaming")
def test_streaming_reads_whole_row_groups(data, logs, baseline):
    """Streaming reads one row group (4 rows, all long or all short) per batch of 4."""
    run = fit(logs, "streaming", data["train"], "--streaming", "--max-steps", "100")
    counts = long_rows_per_step(run)
    assert len(counts) == TRAIN_ROWS // BATCH and _homogeneous(counts)
    assert counts.count(BATCH) == TRAIN_ROWS // ROWS_PER_GROUP // 2
    assert ", streaming" in (run / "out.log").read_text()


@pytest.mark.wires("mgll-train fit", "--workers", "--streaming")
@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
def test_streaming_workers_split_the_row_groups(data, logs, capsys):
    """Streaming, batch 8 (two row groups of 4): with N workers, worker w reads the groups at
    positions w, w+N, ... of the epoch's order (again from the start when it runs out) and the
    batches come from workers 0, 1, ..., N-1, 0, ... in turn. 3 workers (the default is 2)."""
    tokenizer = TextTokenizer(open_clip.get_tokenizer("ViT-B-16", context_length=64))
    transform = SampleTransform(tokenizer, 64, (0.5,) * 3, (0.5,) * 3)
    order = StreamingRecords([([data["train"]], 1.0)], transform, seed=0).order()
    long_group = [int(g) % 2 == 0 for g in order]  # is the group at each position long

    def expected(workers: int) -> list[int]:
        readers = max(workers, 1)  # 0 workers: the main process reads every group
        streams = [list(range(w, len(order), readers)) * 2 for w in range(readers)]
        batches = []
        for step in range(TRAIN_ROWS // 8):
            stream = streams[step % len(streams)]
            batches.append(stream[2 * (step // len(streams)) : 2 * (step // len(streams)) + 2])
        return [ROWS_PER_GROUP * sum(long_group[p] for p in pair) for pair in batches]

    assert expected(3) not in (expected(0), expected(2))  # the worker count shows
    run = fit(logs, "workers", data["train"], "--streaming", "--workers", "3",
              "--batch-size", "8", "--max-steps", "100")  # fmt: skip
    assert long_rows_per_step(run, batch=8) == expected(3)
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:  # 8 row groups cannot feed 9 workers
        fit(logs, "workers9", data["train"], "--streaming", "--workers", "9")
    assert refused.value.code == 2 and "cannot feed 9 readers" in capsys.readouterr().err


# ----------------------------------------------------------------------- files written


@pytest.mark.wires("mgll-train fit", "--resume", "--save-every-n-steps")
def test_resume_from_a_checkpoint_path_continues_exactly(data, logs):
    """Steps 1-3 with a step checkpoint every 2; a second run resumed from step_2.pt runs step 3
    only and ends with the same weights and optimizer state, byte for byte."""
    whole = fit(
        logs, "resume-whole", data["train"], "--max-steps", "3", "--save-every-n-steps", "2"
    )
    assert {p.name for p in (whole / "checkpoints").iterdir()} == {
        "step_2.pt", "step_3.pt", "epoch_latest.pt",
    }  # fmt: skip
    path = whole / "checkpoints" / "step_2.pt"
    resumed = fit(logs, "resume-cut", data["train"], "--max-steps", "3", "--resume", str(path))
    assert [r["step"] for r in records(resumed)] == [3]
    assert records(resumed)[0]["loss"] == records(whole)[2]["loss"]
    a, b = checkpoint(whole, "step_3.pt"), checkpoint(resumed, "step_3.pt")
    for key, value in a["state_dict"].items():
        assert torch.equal(b["state_dict"][key], value), key
    for pid, moments in a["optimizer"]["state"].items():
        assert torch.equal(b["optimizer"]["state"][pid]["exp_avg"], moments["exp_avg"]), pid
    shutil.rmtree(whole / "checkpoints")
    shutil.rmtree(resumed / "checkpoints")


@pytest.mark.wires("mgll-train fit", "--epochs", "--save-frequency", "--save-every-n-steps",
                   "--log-every-n-steps", "--val-data", "--val-split", "--val-frequency",
                   "--zeroshot-frequency", "--report-to", "--logs", "--name")  # fmt: skip
def test_schedule_flags_decide_what_is_written(data, logs):
    """8 rows, batch 4: 2 steps an epoch, 3 epochs. Checkpoints at epochs 2 (frequency) and 3
    (the last), steps 3 and 6; log lines at steps 1 and 4; retrieval every 2nd epoch and
    zero-shot every 3rd on the 8 test rows; TensorBoard events with the logged numbers."""
    run = fit(logs, "schedule", data["long"], "--epochs", "3", "--max-steps", "1000",
              "--save-frequency", "2", "--save-every-n-steps", "3", "--log-every-n-steps", "4",
              "--val-data", str(data["marked"]), "--val-split", "test", "--val-frequency", "2",
              "--zeroshot-frequency", "3", "--report-to", "tensorboard")  # fmt: skip
    assert run == logs / "schedule" and (run / "out.log").is_file()
    assert {p.name for p in (run / "checkpoints").iterdir()} == {
        "epoch_2.pt", "epoch_3.pt", "epoch_latest.pt", "step_3.pt", "step_6.pt",
    }  # fmt: skip
    assert [r["step"] for r in records(run)] == [1, 4]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [(x["epoch"], sorted(set(x["eval"]) & {"retrieval", "zeroshot"})) for x in lines
             if "eval" in x]  # fmt: skip
    assert evals == [(2, ["retrieval"]), (3, ["zeroshot"])]
    assert all(x["eval"]["split"] == "test" and x["eval"]["images"] == TEST_ROWS
               for x in lines if "eval" in x)  # fmt: skip
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [
        (r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in records(run)
    ]
    shutil.rmtree(run / "checkpoints")


# ---------------------------------------------------------------------- two processes


def _torchrun(logs: Path, name: str, train: Path, *flags: str) -> subprocess.CompletedProcess:
    """`fit` under torchrun, 2 CPU processes of batch 2, one step."""
    args = ["fit", "--train-data", str(train), "--batch-size", "2", "--max-steps", "1",
            "--workers", "0", "--device", "cpu", "--logs", str(logs), "--name", name,
            "--log-every-n-steps", "1", "--report-to", "none", *flags]  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "mgll_train", "--", *args],
        cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


@pytest.mark.wires("mgll-train fit", "--local-loss", "--gather-with-grad")
def test_local_loss_with_gather_with_grad_under_torchrun(data, logs, baseline):
    """2 processes x 2 rows = the baseline's global batch of 4. --local-loss: rank 0 logs the
    loss of its own 2 rows (the reference over rows 0-1), not the global one; --gather-with-grad:
    the gradient AdamW stepped with is the one-process gradient of the whole batch (without it,
    the terms through the other rank's features would be missing)."""
    result = _torchrun(logs, "ddp-local", data["train"], "--local-loss", "--gather-with-grad")
    assert result.returncode == 0, result.stderr[-3000:]
    run = logs / "ddp-local"
    assert "2 process(es)" in (run / "out.log").read_text()
    record = records(run)[0]
    local = expected_step1(data, rows=slice(0, 2))
    assert local["ids"] == baseline["expected"]["ids"]
    assert_terms(record, local, rel=1e-4)
    assert abs(record["loss"] - baseline["record"]["loss"]) > 1e-3 * baseline["record"]["loss"]
    initial, trainable = initial_weights(0), _parameter_names()
    one = _moments(checkpoint(baseline["run"]), initial, trainable)
    two = _moments(checkpoint(run), initial, trainable)
    for name, (m, _, _) in one.items():  # equal up to float summation order
        scale = float(m.abs().max())
        torch.testing.assert_close(two[name][0], m, rtol=1e-4, atol=1e-5 * scale, msg=name)
    shutil.rmtree(run / "checkpoints")
