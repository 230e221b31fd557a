"""Named, versioned evaluation protocols: the fixed benchmarks papers compare on.

A protocol fixes which build it reads (by the pipeline that built it), the splits, the task,
the labels scored, the uncertain policy per label, the training fractions and the metric. Its
``setup`` says, in words, what it follows and where that comes from. `mgll-train eval
--protocol NAME` runs one; `--suite chest` runs every protocol of the suite whose build exists
(`suite.py`). A change to what a protocol computes is a new ``version``: metrics.json and the
tables name the protocol and version beside every number.

Settings come in two kinds. ``fixed`` ones define the benchmark (split, labels, uncertain
policy, fine-tuning or not): a flag given on the command line with another value is an error,
even when that value is the flag's default. ``defaults`` are training budgets (epochs, learning
rates) the protocol starts from; a flag given on the command line wins, whatever its value, and
when it differs from the protocol's it is recorded as an override beside the numbers.

Torch-free: the parser reads the names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..choices import UncertainPolicy, UnmentionedPolicy

CHEXPERT_COMPETITION = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
FRACTIONS = (0.01, 0.1, 1.0)

# What a protocol runs; each kind's numbers sit in one block of metrics.json.
KIND_BLOCK = {
    "probe": "linear_probe",
    "probe-multiclass": "linear_probe_multiclass",
    "zeroshot-multiclass": "zeroshot_multiclass",
    "segmentation": "segmentation",
}


@dataclass(frozen=True)
class Result:
    """One number of a protocol: where it was measured (``setting``), what, and its 95 % CI."""

    setting: str  # "1%", "10%", "100%" or "zero-shot"
    metric: str
    value: float | None
    ci95: tuple[float | None, float | None]


@dataclass(frozen=True)
class Protocol:
    """One benchmark protocol (see the module docstring)."""

    name: str
    version: int
    pipeline: str  # the pipeline whose build it reads (the build's manifest names it)
    kind: str  # a key of KIND_BLOCK
    labels: tuple[str, ...]  # the labels scored (classes, for the multi-class kinds)
    metrics: tuple[str, ...]  # keys of the kind's block, reported in this order
    setup: str  # the paper's setup, in words
    test_split: str = "test"
    train_split: str = "train"
    uncertain: tuple[tuple[str, UncertainPolicy], ...] = ()  # per label; others: ignore
    unmentioned: UnmentionedPolicy = "negative"
    fractions: tuple[float, ...] = FRACTIONS
    fixed: tuple[tuple[str, Any], ...] = ()  # eval flags (dest) the protocol fixes
    defaults: tuple[tuple[str, Any], ...] = ()  # eval flags (dest) it starts from

    @property
    def title(self) -> str:
        """``name vN``, as the tables print it."""
        return f"{self.name} v{self.version}"

    def describe(self) -> dict[str, Any]:
        """The protocol as metrics.json records it."""
        return {
            "name": self.name,
            "version": self.version,
            "pipeline": self.pipeline,
            "kind": self.kind,
            "labels": list(self.labels),
            "test_split": self.test_split,
            "train_split": self.train_split if self.kind != "zeroshot-multiclass" else None,
            "uncertain": dict(self.uncertain),
            "unmentioned": self.unmentioned,
            "fractions": list(self.fractions) if self.kind != "zeroshot-multiclass" else [],
            "metrics": list(self.metrics),
            "setup": self.setup,
        }

    def results(self, metrics: dict[str, Any]) -> list[Result]:
        """The protocol's numbers, read from the metrics.json it produced."""
        block = metrics.get(KIND_BLOCK[self.kind]) or {}
        settings = (
            ["zero-shot"]
            if self.kind == "zeroshot-multiclass"
            else [f"{f:.0%}" for f in self.fractions]
        )
        out = []
        for setting in settings:
            values = block if setting == "zero-shot" else block.get(setting, {})
            for metric in self.metrics:
                ci = values.get(_CI_KEY.get(metric, f"{metric}_ci95")) or [None, None]
                out.append(Result(setting, metric, values.get(metric), (ci[0], ci[1])))
        return out


# Where a metric's interval lives when it is not `<metric>_ci95` (the segmentation block).
_CI_KEY = {"dice": "dice_ci", "iou": "iou_ci"}

# What the tables call each metric.
METRIC_NAMES = {
    "macro_auroc": "AUROC",
    "accuracy": "accuracy",
    "macro_f1": "macro F1",
    "dice": "Dice",
    "iou": "IoU",
}

_MGCA_UNCERTAIN: tuple[tuple[str, UncertainPolicy], ...] = (
    ("Atelectasis", "positive"),
    ("Edema", "positive"),
    ("Pleural Effusion", "positive"),
    ("Cardiomegaly", "negative"),
    ("Consolidation", "negative"),
)
_PROBE_BUDGET = (("probe_epochs", 50), ("probe_lr", 1e-3))
_SEG_BUDGET = (("seg_epochs", 20), ("seg_lr", 1e-3))

CHEXPERT_PROBE = Protocol(
    name="chexpert-probe",
    version=1,
    pipeline="chexpert",
    kind="probe",
    labels=CHEXPERT_COMPETITION,
    metrics=("macro_auroc",),
    setup="CheXpert competition labels (Atelectasis, Cardiomegaly, Consolidation, Edema, "
    "Pleural Effusion); a linear head on the frozen image features trained on 1 / 10 / 100 % "
    "of the training patients; the official validation set (the build's test split) as test; "
    "macro AUROC over the five. Uncertain labels as in MGCA (after CheXpert's U-Ones/U-Zeros "
    "study): 1 for Atelectasis, Edema, Pleural Effusion; 0 for Cardiomegaly, Consolidation; "
    "blanks 0.",
    uncertain=_MGCA_UNCERTAIN,
    fixed=(("finetune", False),),
    defaults=_PROBE_BUDGET,
)
CHEXPERT_FINETUNE = Protocol(
    name="chexpert-finetune",
    version=1,
    pipeline="chexpert",
    kind="probe",
    labels=CHEXPERT_COMPETITION,
    metrics=("macro_auroc",),
    setup="As chexpert-probe, but the image tower is fine-tuned with the head (MGCA's "
    "fine-tuning setting); macro AUROC over the five competition labels.",
    uncertain=_MGCA_UNCERTAIN,
    fixed=(("finetune", True),),
    defaults=(("probe_epochs", 50), ("finetune_lr", 1.25e-4)),
)
CHEXPERT_5X200_ZEROSHOT = Protocol(
    name="chexpert-5x200-zeroshot",
    version=1,
    pipeline="chexpert_5x200",
    kind="zeroshot-multiclass",
    labels=CHEXPERT_COMPETITION,
    metrics=("accuracy", "macro_f1"),
    setup="CheXpert 5x200 (GLoRIA's set: 200 images positive for exactly one competition "
    "label each): zero-shot, each image assigned the class whose prompt ensemble is nearest "
    "(argmax over the five); accuracy and macro F1 with bootstrap 95 % intervals.",
    fixed=(("finetune", False),),
)
RSNA_PROBE = Protocol(
    name="rsna-probe",
    version=1,
    pipeline="rsna_pneumonia",
    kind="probe",
    labels=("Pneumonia",),
    metrics=("macro_auroc",),
    setup="RSNA Pneumonia (the challenge's Target, pneumonia or not): a linear head on frozen "
    "features trained on 1 / 10 / 100 % of the training patients; the build's 70/15/15 "
    "patient split (as MGCA's); AUROC on the test split.",
    fixed=(("finetune", False),),
    defaults=_PROBE_BUDGET,
)
COVIDX_PROBE = Protocol(
    name="covidx-probe",
    version=1,
    pipeline="covidx",
    kind="probe-multiclass",
    labels=("No Finding", "Pneumonia", "COVID-19"),
    metrics=("accuracy",),
    setup="COVIDx (normal / pneumonia / COVID-19, the release's list-file splits), MGCA's "
    "COVIDx setting: a linear head on frozen features (one logistic output per class, trained "
    "on one-hot targets) on 1 / 10 / 100 % of the training patients, each image assigned the "
    "class of its largest logit; accuracy with a bootstrap 95 % interval.",
    fixed=(("finetune", False),),
    defaults=_PROBE_BUDGET,
)
SIIM_SEGMENTATION = Protocol(
    name="siim-segmentation",
    version=1,
    pipeline="siim_acr",
    kind="segmentation",
    labels=("Pneumothorax",),
    metrics=("dice",),
    setup="SIIM-ACR pneumothorax segmentation: the frozen image encoder with a trained "
    "decoder, on 1 / 10 / 100 % of the training images, negatives balanced 1:1 with positives "
    "in training (as MGCA); Dice on the test split.",
    fixed=(("seg_balance_negatives", True), ("finetune", False)),
    defaults=_SEG_BUDGET,
)
RSNA_SEGMENTATION = Protocol(
    name="rsna-segmentation",
    version=1,
    pipeline="rsna_pneumonia",
    kind="segmentation",
    labels=("Pneumonia",),
    metrics=("dice",),
    setup="RSNA Pneumonia segmentation with masks drawn from the challenge's boxes: the frozen "
    "image encoder with a trained decoder on 1 / 10 / 100 % of the training images; Dice on "
    "the test split.",
    fixed=(("seg_balance_negatives", False), ("finetune", False)),
    defaults=_SEG_BUDGET,
)

PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        CHEXPERT_PROBE,
        CHEXPERT_FINETUNE,
        CHEXPERT_5X200_ZEROSHOT,
        RSNA_PROBE,
        COVIDX_PROBE,
        SIIM_SEGMENTATION,
        RSNA_SEGMENTATION,
    )
}
SUITES: dict[str, tuple[str, ...]] = {"chest": tuple(PROTOCOLS)}
