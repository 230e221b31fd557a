"""`mgll-train eval` and the evaluation during `fit`: zero-shot, linear probe, retrieval,
segmentation.

Features are extracted once per split; each task turns them into one block of metrics.json.

Where things live:

* `runner.py`    — `evaluate_model`: the tasks asked for, on one dataset split
* `features.py`  — one pass of the model: image (and category-text) features, labels, patients
* `metrics.py`   — AUROC, average precision, ROC curves, bootstrap intervals
* `zeroshot.py`  — prompt ensembles from the vocabulary, zero-shot scores
* `probe.py`     — patient-level subsets, the linear head, `--finetune`
* `retrieval.py` — label-aware Recall@k, chance level, graded mAP
* `segmentation.py` — `--tasks segmentation`: subsets, Dice / IoU with intervals
* `decoder.py`   — patch tokens of the frozen tower, the decoder's training and prediction
* `report.py`    — JSON-safe metrics, the plots
* `table.py`     — the printed table (table.txt)
* `cli.py`       — loading a checkpoint, `run_eval`
* `flags.py`     — the `eval` flags and task names (torch-free: `--help` stays fast)
* `protocols.py` — named, versioned benchmark protocols and suites (torch-free)
* `suite.py`     — `--protocol` and `--suite`: builds recognised, flags checked, protocols run
* `suite_table.py` — a protocol's lines in table.txt; suite.md, suite.tex, suite.json
* `probe_multiclass.py` — the single-label probe (accuracy) of COVIDx
"""

from __future__ import annotations

import importlib
from typing import Any

from .flags import TASKS, add_eval_arguments

# The rest loads torch: imported on first use, so `mgll-train --help` does not pay for it.
_LAZY = {
    "clean_metrics": ".report",
    "evaluate_model": ".runner",
    "load_model_from_checkpoint": ".cli",
    "run_eval": ".cli",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name], __name__), name)


__all__ = [
    "TASKS",
    "add_eval_arguments",
    "clean_metrics",
    "evaluate_model",
    "load_model_from_checkpoint",
    "run_eval",
]
