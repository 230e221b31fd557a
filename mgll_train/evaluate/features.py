"""What one pass of the model over a split gives: image (and text) features, labels, patients.

Rows come in dataset order (the split in file order) and the model runs in eval mode, so the
features of a checkpoint are the same on every run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..data import SampleTransform, collate
from ..data.normalize import model_input


@dataclass
class Features:
    """What one pass of the model over a split gives."""

    image: np.ndarray  # [N, D] projected, unnormalised
    text: np.ndarray | None  # [N, D] category text features, unnormalised (or None)
    labels: np.ndarray  # [N, K] 1/0/NaN after the label policy
    ids: list[str]
    patients: list[str]


def patient_ids(dataset: Any) -> list[str]:
    """``patient_id`` of each row of a map-style dataset (the row id when missing)."""
    records = dataset.records
    per_file: dict[int, tuple[np.ndarray, list]] = {}
    for f, path in enumerate(records.files):
        meta = pq.read_metadata(path)
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        starts = np.concatenate([[0], np.cumsum(sizes)])
        names = pq.read_schema(path).names
        cols = ["id", "patient_id"] if "patient_id" in names else ["id"]
        table = pq.read_table(path, columns=cols).to_pydict()
        pids = table.get("patient_id") or [None] * len(table["id"])
        per_file[f] = (starts, [p if p else i for p, i in zip(pids, table["id"], strict=True)])
    out = []
    for file, group, row in records.index:
        starts, pids = per_file[int(file)]
        out.append(str(pids[int(starts[group] + row)]))
    return out


def eval_transform(model: torch.nn.Module, tokenizer: Any, args: Any) -> SampleTransform:
    """The samples evaluation reads: the category text only, labels under the eval policy."""
    return SampleTransform.from_model(
        model,
        tokenizer,
        granularities=("category",),
        uncertain=args.uncertain,
        unmentioned=args.unmentioned,
    )


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` in eval mode for the block, then back in the mode it had (also on errors)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def eval_batches(
    dataset: Any, batch_size: int, workers: int, desc: str, progress: bool | None = None
) -> Iterator[dict[str, Any]]:
    """The batches of ``dataset`` in order, behind a progress bar named ``desc`` (None: drawn
    only when stderr is a terminal)."""
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate
    )
    disable = None if progress is None else not progress
    yield from tqdm(loader, desc=desc, unit="batch", disable=disable, leave=False)


@torch.no_grad()
def extract_features(
    model: torch.nn.Module,
    dataset: Any,
    batch_size: int,
    workers: int,
    device: torch.device,
    texts: bool = True,
    progress: bool | None = None,
) -> Features:
    """Image (and category-text) features of every row, in dataset order.

    ``progress``: a bar over the batches; None draws it only when stderr is a terminal.
    """
    images, text_feats, labels, ids = [], [], [], []
    with evaluating(model):
        for batch in eval_batches(dataset, batch_size, workers, "features", progress):
            pixels = model_input(batch["images"], model, device)
            images.append(model.encode_image(pixels, normalize=False).float().cpu())
            if texts:
                tokens = batch["texts"][0].to(device)
                text_feats.append(model.encode_text(tokens, normalize=False).float().cpu())
            labels.append(batch["labels"])
            ids.extend(batch["ids"])
    return Features(
        image=torch.cat(images).numpy(),
        text=torch.cat(text_feats).numpy() if texts else None,
        labels=torch.cat(labels).numpy(),
        ids=ids,
        patients=patient_ids(dataset),
    )
