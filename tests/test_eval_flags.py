"""Every flag of `mgll-train eval` and `mgll-train export` changes what it says it changes.

One small build (the demo release, 120 images: 92 train, 8 validation, 20 test rows) and one
1-step `fit` checkpoint are made per module; the commands then run in-process through
`mgll_train.cli.main`, the real argument parser and runner. Expected values come from the
Parquet files themselves (row and label counts read with pyarrow), from scikit-learn (AUROC, AP)
or from an exact symmetry (negating the image projection turns every zero-shot AUROC A into
1 − A), never from the code under test.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from mgll_data.build.engine import BuildOptions, build
from mgll_data.build.pipeline import load_pipeline
from mgll_data.demo.nih_release import write_demo_release
from mgll_train.cli import main
from tests.conftest import run_module

POLICY_LABEL = "No Finding"  # annotated by ChestX-ray14, both classes in the test split
UNCERTAIN_ROWS = [0, 1, 2]  # rows of the test shard whose POLICY_LABEL becomes -1 (uncertain)
UNMENTIONED_ROWS = [3, 4]  # ... and NaN (annotated but not mentioned)


@dataclass
class Bench:
    """The module's dataset, checkpoints and derived Parquet files, and a cache of eval runs."""

    root: Path
    data: Path
    checkpoint: Path
    negated: Path  # the checkpoint with visual.proj negated
    few_train: Path  # the first 5 train rows as one Parquet file
    policy_test: Path  # the test shard with uncertain/unmentioned values planted
    policy_labels: np.ndarray  # POLICY_LABEL's column of policy_test as written
    runs: dict[tuple[str, ...], dict[str, Any]] = field(default_factory=dict)

    def eval(self, *flags: str, checkpoint: Path | None = None) -> dict[str, Any]:
        """metrics.json of `mgll-train eval` with `flags` (cached: one run per flag set)."""
        key = (str(checkpoint or self.checkpoint), *flags)
        if key not in self.runs:
            out = self.root / f"eval-{len(self.runs)}"
            main(
                ["eval", "--checkpoint", key[0], "--data", str(self.data), "--out", str(out),
                 "--workers", "0", *flags]
            )  # fmt: skip
            self.runs[key] = json.loads((out / "metrics.json").read_text())
        return self.runs[key]


def _shard(data: Path, split: str) -> Path:
    (path,) = sorted((data / "data").glob(f"{split}-*.parquet"))
    return path


def _labels(path: Path) -> np.ndarray:
    """``[N, K]`` stored labels of a Parquet file (NaN where not given)."""
    rows = pq.read_table(path, columns=["labels"]).column("labels").to_pylist()
    return np.array(rows, dtype=np.float64)


def _label_names(path: Path) -> list[str]:
    return json.loads(pq.read_schema(path).metadata[b"mgll"])["label_names"]


def _split_rows(data: Path, split: str) -> pa.Table:
    """The rows of every shard of `data` whose split column is `split` (id, patient, labels)."""
    tables = [
        pq.read_table(p, columns=["id", "patient_id", "split", "labels"])
        for p in sorted((data / "data").glob("*.parquet"))
    ]
    table = pa.concat_tables(tables)
    return table.filter(pc.equal(table["split"], split))


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Bench:
    root = tmp_path_factory.mktemp("eval-flags")
    raw = write_demo_release(root / "raw", n=120, seed=5, image_size=96)
    data = root / "ds"
    build(load_pipeline("chestxray14"), raw, data, BuildOptions(image_size=64, progress=False))
    fit = run_module(
        "mgll_train",
        ["fit", "--train-data", str(data), "--max-steps", "1", "--workers", "0", "--device",
         "cpu", "--logs", str(root / "logs"), "--name", "run", "--batch-size", "8", "--warmup",
         "1", "--report-to", "none"],
        timeout=300,
    )  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-2000:]
    checkpoint = root / "logs" / "run" / "checkpoints" / "epoch_latest.pt"

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state["state_dict"]["visual.proj"] = -state["state_dict"]["visual.proj"]
    negated = root / "negated.pt"
    torch.save(state, negated)

    train = pq.read_table(_shard(data, "train"))
    few_train = root / "few-train.parquet"
    pq.write_table(train.slice(0, 5), few_train)  # keeps the schema's mgll metadata

    test = pq.read_table(_shard(data, "test"))
    labels = _labels(_shard(data, "test"))
    j = _label_names(_shard(data, "test")).index(POLICY_LABEL)
    labels[UNCERTAIN_ROWS, j] = -1.0
    labels[UNMENTIONED_ROWS, j] = np.nan
    column = pa.array(labels.astype(np.float32).tolist(), type=test.schema.field("labels").type)
    policy_test = root / "policy-test.parquet"
    index = test.schema.get_field_index("labels")
    pq.write_table(test.set_column(index, test.schema.field("labels"), column), policy_test)
    assert pq.read_schema(policy_test).metadata[b"mgll"] == test.schema.metadata[b"mgll"]
    return Bench(root, data, checkpoint, negated, few_train, policy_test, labels[:, j].copy())


def _sklearn_macro(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Macro AUROC and mAP over the labels with both classes among their non-NaN rows."""
    aurocs, aps = [], []
    for j in range(labels.shape[1]):
        keep = ~np.isnan(labels[:, j])
        y = labels[keep, j] > 0
        if y.all() or not y.any():
            continue
        aurocs.append(roc_auc_score(y, scores[keep, j]))
        aps.append(average_precision_score(y, scores[keep, j]))
    return float(np.mean(aurocs)), float(np.mean(aps))


# ----------------------------------------------------------------------------- data and split


@pytest.mark.wires("mgll-train eval", "--split", "--data")
def test_split_selects_the_rows_evaluated(bench):
    for split in ("test", "validation"):
        metrics = bench.eval("--split", split, "--tasks", "zeroshot", "--bootstrap", "0")
        rows = _split_rows(bench.data, split)
        assert metrics["split"] == split and metrics["images"] == rows.num_rows
        labels = np.array(rows["labels"].to_pylist(), dtype=np.float64)
        names = _label_names(_shard(bench.data, "test"))
        for name, result in metrics["zeroshot"]["per_label"].items():
            column = labels[:, names.index(name)]
            assert result["positives"] == int((column == 1).sum()), (split, name)
            assert result["negatives"] == int((column == 0).sum()), (split, name)
    # --data: a single file of five training rows is what gets evaluated.
    few = bench.eval("--data", str(bench.few_train), "--split", "train", "--tasks", "retrieval")
    assert few["images"] == few["retrieval"]["items"] == 5
    assert few["data"] == str(bench.few_train)


@pytest.mark.wires("mgll-train eval", "--tasks")
def test_tasks_selects_the_blocks_computed(bench):
    metrics = bench.eval("--tasks", "retrieval")
    assert "retrieval" in metrics
    assert "zeroshot" not in metrics and "linear_probe" not in metrics
    assert metrics["retrieval"]["items"] == _split_rows(bench.data, "test").num_rows
    both = bench.eval("--tasks", "zeroshot,retrieval", "--bootstrap", "0")
    assert {"zeroshot", "retrieval"} <= set(both) and "linear_probe" not in both


@pytest.mark.wires("mgll-train eval", "--uncertain", "--unmentioned", "--data")
def test_label_policies_decide_which_rows_count(bench):
    """-1 rows join the positives or negatives or are left out; NaN rows join the negatives."""
    stored = bench.policy_labels
    pos, neg = int((stored == 1).sum()), int((stored == 0).sum())
    n_uncertain, n_nan = int((stored == -1).sum()), int(np.isnan(stored).sum())
    assert (n_uncertain, n_nan) == (len(UNCERTAIN_ROWS), len(UNMENTIONED_ROWS))
    cases = {
        (): (pos, neg),  # the defaults: ignore both
        ("--uncertain", "positive"): (pos + n_uncertain, neg),
        ("--uncertain", "negative", "--unmentioned", "negative"): (pos, neg + n_uncertain + n_nan),
        ("--unmentioned", "negative"): (pos, neg + n_nan),
    }
    for flags, (want_pos, want_neg) in cases.items():
        metrics = bench.eval(
            "--data", str(bench.policy_test), "--tasks", "zeroshot", "--bootstrap", "0", *flags
        )
        result = metrics["zeroshot"]["per_label"][POLICY_LABEL]
        assert (result["positives"], result["negatives"]) == (want_pos, want_neg), flags
        # A label ChestX-ray14 does not annotate stays NaN whatever --unmentioned says.
        assert metrics["zeroshot"]["skipped"]["Lung Opacity"] == "not annotated in this split"


# --------------------------------------------------------------------------- checkpoint, out


@pytest.mark.wires("mgll-train eval", "--checkpoint", "--out")
def test_checkpoint_weights_are_used_and_outputs_land_in_out(bench, tmp_path, capsys):
    flags = ("--tasks", "zeroshot", "--bootstrap", "0")
    plain = bench.eval(*flags)
    negated = bench.eval(*flags, checkpoint=bench.negated)
    # Negated image features negate every score cos(v, pos) - cos(v, neg): AUROC A -> 1 - A.
    assert plain["zeroshot"]["per_label"]
    for name, result in plain["zeroshot"]["per_label"].items():
        flipped = negated["zeroshot"]["per_label"][name]["auroc"]
        assert flipped == pytest.approx(1 - result["auroc"], abs=1e-12), name
    assert negated["checkpoint"] == str(bench.negated)
    assert plain["step"] == torch.load(bench.checkpoint, weights_only=False)["step"] == 1

    out = tmp_path / "nested" / "out"
    capsys.readouterr()
    main(["eval", "--checkpoint", str(bench.checkpoint), "--data", str(bench.data),
          "--out", str(out), "--workers", "0", "--bootstrap", "20",
          "--probe-epochs", "2"])  # fmt: skip
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        "auroc_per_label.png",
        "metrics.json",
        "roc_curves.png",
        "table.txt",
    ]
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"zeroshot", "linear_probe", "retrieval"} <= set(metrics)
    table = (out / "table.txt").read_text()
    assert table == printed and table.startswith(f"evaluation of {bench.checkpoint}")
    for png in ("roc_curves.png", "auroc_per_label.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------ bootstrap and seed


@pytest.mark.wires("mgll-train eval", "--bootstrap")
def test_bootstrap_count_sets_the_interval(bench):
    one = bench.eval("--tasks", "zeroshot", "--bootstrap", "1")["zeroshot"]
    many = bench.eval("--tasks", "zeroshot", "--bootstrap", "200")["zeroshot"]
    none = bench.eval("--tasks", "zeroshot", "--bootstrap", "0")["zeroshot"]
    assert (one["bootstrap"], many["bootstrap"], none["bootstrap"]) == (1, 200, 0)
    assert none["macro_auroc_ci95"] == [None, None]
    # One resample: both percentiles are that one value (None where the resample lost a class).
    single = [r["ci95"] for r in one["per_label"].values() if r["ci95"] != [None, None]]
    assert single and all(lo == hi for lo, hi in single)
    lo, hi = many["macro_auroc_ci95"]
    assert hi - lo > 0.02
    assert all(r["ci95"][0] < r["ci95"][1] for r in many["per_label"].values())
    for name, result in many["per_label"].items():
        assert result["auroc"] == none["per_label"][name]["auroc"]  # resampling only adds CIs
        assert none["per_label"][name]["ci95"] == [None, None]


@pytest.mark.wires("mgll-train eval", "--seed")
def test_seed_changes_the_resamples_not_the_point_estimate(bench):
    flags = ("--tasks", "zeroshot", "--bootstrap", "200")
    zero, one = bench.eval(*flags)["zeroshot"], bench.eval(*flags, "--seed", "1")["zeroshot"]
    # A fresh run (other flags, so not the cached one) with the default seed given explicitly.
    again = bench.eval(*flags, "--seed", "0", "--batch-size", "64")["zeroshot"]
    assert again == zero
    assert one["macro_auroc"] == zero["macro_auroc"]
    assert one["macro_auroc_ci95"] != zero["macro_auroc_ci95"]
    assert (
        sum(one["per_label"][n]["ci95"] != r["ci95"] for n, r in zero["per_label"].items())
        >= len(zero["per_label"]) // 2
    )


# ------------------------------------------------------------------ batch size, workers, device


def _usage_error(bench: Bench, capsys, *flags: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--checkpoint", str(bench.checkpoint), "--data", str(bench.data),
              "--out", str(bench.root / "refused"), "--tasks", "zeroshot", *flags])  # fmt: skip
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.wires("mgll-train eval", "--batch-size")
def test_batch_size_reaches_the_loader_and_leaves_results_unchanged(bench, capsys):
    """The batch size changes only how many images go through the model at once."""
    err = _usage_error(bench, capsys, "--workers", "0", "--batch-size", "0")
    assert "--batch-size: must be a positive integer, got 0" in err.strip().splitlines()[-1]
    flags = ("--tasks", "zeroshot,retrieval", "--bootstrap", "0")
    default, small = bench.eval(*flags), bench.eval(*flags, "--batch-size", "3")
    for name, result in default["zeroshot"]["per_label"].items():
        assert small["zeroshot"]["per_label"][name]["auroc"] == pytest.approx(
            result["auroc"], abs=1e-9
        )
    assert small["retrieval"]["chance"] == default["retrieval"]["chance"]


@pytest.mark.wires("mgll-train eval", "--workers")
def test_workers_reach_the_loader(bench, capsys):
    err = _usage_error(bench, capsys, "--workers", "-1")
    assert "--workers: must be 0 or more, got -1" in err.strip().splitlines()[-1]
    flags = ("--tasks", "zeroshot", "--bootstrap", "0")
    one_worker = bench.eval(*flags, "--workers", "1")  # later --workers wins over the bench's 0
    assert one_worker == bench.eval(*flags)


@pytest.mark.wires("mgll-train eval", "--device")
def test_device_is_parsed_and_unavailable_accelerators_fall_back(bench, capsys):
    err = _usage_error(bench, capsys, "--workers", "0", "--device", "bogus")
    assert "--device" in err and "bogus" in err
    flags = ("--tasks", "zeroshot", "--bootstrap", "0")
    if not torch.cuda.is_available():  # documented fallback, as fit's
        assert bench.eval(*flags, "--device", "cuda") == bench.eval(*flags, "--device", "cpu")


# ------------------------------------------------------------------------------ linear probe


@pytest.mark.wires("mgll-train eval", "--train-data", "--train-split")
def test_probe_trains_on_the_named_rows(bench):
    flags = ("--tasks", "linear-probe", "--probe-epochs", "1")
    validation = bench.eval(*flags, "--train-split", "validation")["linear_probe"]
    rows = _split_rows(bench.data, "validation")
    assert validation["train_split"] == "validation"
    assert validation["100%"]["train_images"] == rows.num_rows == 8
    assert validation["100%"]["train_patients"] == len(set(rows["patient_id"].to_pylist()))
    default = bench.eval(*flags)["linear_probe"]  # the checkpoint's own: its data, split train
    assert default["100%"]["train_images"] == _split_rows(bench.data, "train").num_rows
    few = bench.eval(*flags, "--train-data", str(bench.few_train))["linear_probe"]
    assert few["train_data"] == str(bench.few_train) and few["100%"]["train_images"] == 5


def _probe_on_train(bench: Bench, *flags: str) -> dict[str, Any]:
    """The probe scored on its own training rows (--split train), where fitting shows."""
    return bench.eval("--tasks", "linear-probe", "--split", "train", *flags)["linear_probe"]


@pytest.mark.wires("mgll-train eval", "--probe-lr", "--probe-epochs", "--seed")
def test_probe_lr_and_epochs_follow_an_independent_fit(bench):
    from mgll_train.data import make_dataset
    from mgll_train.evaluate import load_model_from_checkpoint
    from mgll_train.evaluate.features import eval_transform, extract_features
    from mgll_train.evaluate.probe import train_linear_head

    fitted = _probe_on_train(bench, "--probe-lr", "0.05", "--probe-epochs", "60", "--seed", "2")
    frozen_lr = _probe_on_train(bench, "--probe-lr", "1e-7", "--probe-epochs", "60", "--seed", "2")
    one_epoch = _probe_on_train(bench, "--probe-lr", "0.05", "--probe-epochs", "1", "--seed", "2")
    # On its own training rows a head that learns ranks them far better than one that cannot.
    assert fitted["100%"]["macro_auroc"] > frozen_lr["100%"]["macro_auroc"] + 0.1
    assert fitted["100%"]["macro_auroc"] > one_epoch["100%"]["macro_auroc"] + 0.1
    assert fitted["epochs"] == 60 and one_epoch["epochs"] == 1

    # The 100 % result is scikit-learn's AUROC/AP of a head trained with those very settings.
    args = SimpleNamespace(uncertain="ignore", unmentioned="ignore")
    bundle, _ = load_model_from_checkpoint(bench.checkpoint, torch.device("cpu"))
    transform = eval_transform(bundle.model, bundle.tokenizer, args)
    train_set = make_dataset(str(bench.data), transform, split="train", seed=2)
    feats = extract_features(bundle.model, train_set, 64, 0, torch.device("cpu"), texts=False)
    labels = _labels(_shard(bench.data, "train"))
    assert feats.ids == pq.read_table(_shard(bench.data, "train"), columns=["id"])["id"].to_pylist()
    head = train_linear_head(feats.image, labels, epochs=60, lr=0.05, seed=2)
    with torch.no_grad():
        scores = head(torch.from_numpy(feats.image)).numpy()
    macro, mean_ap = _sklearn_macro(labels, scores)
    assert fitted["100%"]["macro_auroc"] == pytest.approx(macro, abs=1e-9)
    assert fitted["100%"]["map"] == pytest.approx(mean_ap, abs=1e-9)


# ------------------------------------------------------------------------------- fine-tuning


def _affine_residual(features: np.ndarray, scores: np.ndarray) -> float:
    """Relative residual of the best affine map from `features` to `scores` (0: affine)."""
    design = np.hstack([features, np.ones((len(features), 1))]).astype(np.float64)
    target = scores.astype(np.float64)
    coef, *_ = np.linalg.lstsq(design, target, rcond=None)
    centred = target - target.mean(axis=0)
    return float(np.linalg.norm(design @ coef - target) / np.linalg.norm(centred))


@pytest.fixture(scope="module")
def finetuned(bench) -> SimpleNamespace:
    """Fine-tuning run directly on all 92 training rows, scored on the same rows."""
    from mgll_train.data import make_dataset
    from mgll_train.evaluate import load_model_from_checkpoint
    from mgll_train.evaluate.features import eval_transform, extract_features
    from mgll_train.evaluate.probe import finetune_and_score

    cpu = torch.device("cpu")
    bundle, _ = load_model_from_checkpoint(bench.checkpoint, cpu)
    before = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    args = SimpleNamespace(
        seed=3, finetune_lr=3e-3, probe_epochs=2, workers=0, batch_size=64,
        uncertain="ignore", unmentioned="ignore",
    )  # fmt: skip
    transform = eval_transform(bundle.model, bundle.tokenizer, args)
    train_set = make_dataset(str(bench.data), transform, split="train", seed=3)
    rows = np.arange(len(train_set))
    k = len(train_set.label_names)
    scores = finetune_and_score(bundle.model, train_set, rows, train_set, k, args, cpu)
    still = finetune_and_score(
        bundle.model,
        train_set,
        rows,
        train_set,
        k,
        SimpleNamespace(**{**vars(args), "finetune_lr": 0.0}),
        cpu,
    )
    after = bundle.model.state_dict()
    features = extract_features(bundle.model, train_set, 64, 0, cpu, texts=False).image
    return SimpleNamespace(
        scores=scores, still=still, features=features, before=before, after=after
    )


def test_finetuning_trains_a_copy_of_the_image_tower(finetuned):
    """Frozen tower: logits are an affine function of its features. Fine-tuned: they are not."""
    assert len(finetuned.features) > finetuned.features.shape[1] + 1  # over-determined
    assert _affine_residual(finetuned.features, finetuned.still) < 1e-4  # lr 0: nothing moved
    assert _affine_residual(finetuned.features, finetuned.scores) > 1e-2
    for key, value in finetuned.before.items():  # the caller's model is left as it was
        assert torch.equal(value, finetuned.after[key]), key


@pytest.mark.wires("mgll-train eval", "--finetune", "--finetune-lr", "--probe-epochs", "--seed")
def test_finetune_result_is_sklearn_auroc_of_the_finetuned_scores(bench, finetuned):
    probe = _probe_on_train(
        bench, "--finetune", "--finetune-lr", "3e-3", "--probe-epochs", "2", "--seed", "3"
    )
    assert probe["mode"] == "finetune" and probe["epochs"] == 2
    labels = _labels(_shard(bench.data, "train"))
    macro, mean_ap = _sklearn_macro(labels, finetuned.scores)
    assert probe["100%"]["macro_auroc"] == pytest.approx(macro, abs=1e-9)
    assert probe["100%"]["map"] == pytest.approx(mean_ap, abs=1e-9)
    still_macro, _ = _sklearn_macro(labels, finetuned.still)
    assert abs(macro - still_macro) > 1e-3  # the learning rate matters
    linear = _probe_on_train(bench, "--probe-lr", "3e-3", "--probe-epochs", "2", "--seed", "3")
    assert linear["mode"] == "linear"
    assert linear["100%"]["macro_auroc"] != pytest.approx(probe["100%"]["macro_auroc"], abs=1e-6)


# ------------------------------------------------------------------------------------ export


@pytest.mark.wires("mgll-train export", "--checkpoint", "--out")
def test_export_writes_the_named_checkpoint_into_out(bench, tmp_path, capsys):
    out = tmp_path / "deep" / "exported"
    main(["export", "--checkpoint", str(bench.negated), "--out", str(out)])
    assert str(out) in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {
        "open_clip_config.json",
        "open_clip_model.safetensors",
        "README.md",
    }
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    negated = torch.load(bench.negated, weights_only=False)["state_dict"]
    original = torch.load(bench.checkpoint, weights_only=False)["state_dict"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, negated[key]), key
    assert torch.equal(model.state_dict()["visual.proj"], -original["visual.proj"])
