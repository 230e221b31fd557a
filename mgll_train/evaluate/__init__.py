"""`mgll-train eval` and the evaluation during `fit`: zero-shot, linear probe, retrieval.

Features are extracted once per split; each task turns them into one block of metrics.json.

Where things live:

* `runner.py`    — `evaluate_model`: the tasks asked for, on one dataset split
* `features.py`  — one pass of the model: image (and category-text) features, labels, patients
* `metrics.py`   — AUROC, average precision, ROC curves, bootstrap intervals
* `zeroshot.py`  — prompt ensembles from the vocabulary, zero-shot scores
* `probe.py`     — patient-level subsets, the linear head, `--finetune`
* `retrieval.py` — label-aware Recall@k, chance level, graded mAP
* `report.py`    — JSON-safe metrics, the printed table, the plots
* `cli.py`       — the `eval` flags, loading a checkpoint, `run_eval`
"""

from .cli import add_eval_arguments, load_model_from_checkpoint, run_eval
from .report import clean_metrics
from .runner import TASKS, evaluate_model

__all__ = [
    "TASKS",
    "add_eval_arguments",
    "clean_metrics",
    "evaluate_model",
    "load_model_from_checkpoint",
    "run_eval",
]
